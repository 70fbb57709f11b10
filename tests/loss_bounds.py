"""Per-token float32 error bounds of `tailkd.losses` (values and gradients), following the library's operations.

Each function recomputes in float64, from the same (float32-valued) inputs, every intermediate of the library's
float32 computation, attaches to it the error bound of bounds.py's model (first order, u = 2^-24 per rounding, κ_V
for a row's log Σ exp), propagates those bounds through the same sequence of operations, and returns
``(value_bound [...], grad_bound [..., V])`` = SAFETY × the propagated bound on |float32 result − exact|, per token
and per gradient entry wrt the scaled logits z/τ (the caller multiplies by its upstream weight and 1/τ, and adds
nothing else). Masked / ignored positions get 0: the library returns exact zeros there.

The building blocks:
- a log-probability from torch's log_softmax, (z_i − max) − log S: |Δ| <= κ_V + 2u|log q_i| (bounds docstring);
- a log-sum-exp m + log S (`_safe_logsumexp`, torch.logsumexp): κ_V + u|lse| — ABSOLUTE and of the logit scale M;
  a log-mass log α = lse_tail − lse carries two of them, a label log-probability z_y − lse one;
- a weight w = exp(log w): relative error |Δ log w| + u;
- Σ_i w_i (log w_i − log o_i) (`_kl_err`): each term w_i d_i gets |Δw_i||d_i| + w_i|Δd_i| + 2u|w_i d_i| and the
  n-term sum u·n_eff(n)·Σ|w_i d_i| — the bound scales with Σ|terms| (what may cancel), not with the value;
- log_softmax's backward h − q Σ h and log-sum-exp's backward (the softmax over its entries) (`_softmax_back`).
"""

from __future__ import annotations

import math

import torch
from bounds import F32_SUBNORMAL, SAFETY, U32, logit_scale, lse_kappa, n_eff

U = U32
NEG_INF = float("-inf")


def _abs_finite(x):
    return torch.where(torch.isfinite(x), x.abs(), 0.0)


def _lse(z, keep=None):
    z = z if keep is None else torch.where(keep, z, NEG_INF)
    return torch.logsumexp(z, -1)


def _renorm(z, drop):
    """log of softmax(z) renormalised over the entries not in `drop` (bool [..., V]); −inf on `drop`."""
    rest = torch.where(drop, NEG_INF, z)
    lse = torch.logsumexp(rest, -1, keepdim=True)
    return rest - torch.where(torch.isfinite(lse), lse, 0.0)


class _Dist:
    """One side: float64 scaled logits z/τ, log-probabilities l, probabilities w, and the per-entry bound `err` on the
    library's float32 log_softmax (κ_V + 2u|l|, plus u(|z| + M) for the rounded z/τ) and `rel` = err + u on w.
    `dz` [...] (optional): an absolute error the logits themselves carry (e.g. from the LM-head matmul), per row, in
    unscaled units: log-softmax is 2-Lipschitz in the max norm, so every log-probability gets 2dz/τ more."""

    def __init__(self, logits, temperature=1.0, dz=None):
        self.scaled = temperature != 1.0
        self.z = logits.detach().double() / temperature
        self.V = self.z.shape[-1]
        self.kappa = lse_kappa(self.V)
        self.M = logit_scale(logits, temperature)[..., None]  # [..., 1]
        self.dz = 0.0 if dz is None else dz.detach().double()[..., None] / temperature  # [..., 1]
        self.l = torch.log_softmax(self.z, -1)
        self.w = self.l.exp()
        self.err = self.kappa + 2 * U * _abs_finite(self.l) + self._scaling()
        self.rel = self.err + U

    def _scaling(self, extra_M=True):
        """The rounding of z/τ (u|z_i| in the entry, uM through the log-sum-exp) and the logits' own error."""
        own = (2 if extra_M else 1) * self.dz
        if not self.scaled:
            return own
        return own + U * (_abs_finite(self.z) + (self.M if extra_M else 0.0))

    def lse(self, keep=None):
        """(lse, |Δlse|) of the library's log-sum-exp over `keep` (all entries by default): κ + u|lse| (+ uM)."""
        value = _lse(self.z, keep)
        err = self.kappa + U * _abs_finite(value) + (U * self.M[..., 0] if self.scaled else 0.0) + self._dz_row()
        return value, err

    def _dz_row(self):
        return self.dz[..., 0] if isinstance(self.dz, torch.Tensor) else self.dz

    def log_ratio(self, keep):
        """log of the distribution renormalised over `keep` (z − lse_keep, −inf elsewhere), its per-entry bound, and
        the relative bound of the softmax weights that the log-sum-exp backward produces over `keep`."""
        lse, e_lse = self.lse(keep)
        lr = torch.where(keep, self.z - torch.where(torch.isfinite(lse), lse, 0.0)[..., None], NEG_INF)
        err = e_lse[..., None] + U * _abs_finite(lr) + self._scaling(extra_M=False)
        back_rel = self.kappa + U * _abs_finite(lr) + 3 * U + self._scaling()
        return lr, err, back_rel


def _kl_err(w, lw, ew, lo, eo, n):
    """Bound on Σ_i w_i (lw_i − lo_i) as `_kl_terms` computes it, w = exp(lw) (relative error ew + u), the log-ratio
    with error ew + eo + u|d|, the product u, the n-term sum u n_eff(n) over Σ|terms|."""
    d = (lw - lo).abs()
    per = ew + eo + (ew + U * (3 + n_eff(n))) * d
    return torch.where(w > 0, w * per, 0.0).sum(-1)


def _kl_val(w, lw, lo):
    return torch.where(w > 0, w * (lw - lo), 0.0).sum(-1)


def _softmax_back(h, dh, w, w_rel, n):
    """Bound on g = h − w Σ_i h_i (log_softmax's backward with w = exp(output); log-sum-exp's backward with w its
    softmax), given the exact h, its bound dh and the relative bound of w."""
    sh = h.sum(-1, keepdim=True)
    dsh = dh.sum(-1, keepdim=True) + U * n_eff(n) * h.abs().sum(-1, keepdim=True)
    g = h - w * sh
    return dh + w * (w_rel + 2 * U) * sh.abs() + w * dsh + U * g.abs()


def forward_kl(s, t, temperature=1.0, dz_s=None, dz_t=None):
    """KL(p‖q) (fused: Σ p(log p − log q)); closed-form gradient q − p."""
    Q, P = _Dist(s, temperature, dz_s), _Dist(t, temperature, dz_t)
    value = _kl_err(P.w, P.l, P.err, Q.l, Q.err, Q.V)
    grad = Q.w * Q.rel + P.w * P.rel + 3 * U * (Q.w - P.w).abs()
    return SAFETY * value, SAFETY * grad


def reverse_kl(s, t, temperature=1.0, dz_s=None, dz_t=None):
    """KL(q‖p) (autograd): h = ∂/∂log q = q(1 + d), d = log q − log p, then log_softmax's backward q(d − D)."""
    Q, P = _Dist(s, temperature, dz_s), _Dist(t, temperature, dz_t)
    value = _kl_err(Q.w, Q.l, Q.err, P.l, P.err, Q.V)
    d = torch.where(Q.w > 0, Q.l - P.l, 0.0)
    h = Q.w * (1 + d)
    dh = Q.w * (d.abs() * (Q.rel + 3 * U) + Q.err + P.err + Q.rel + U) + U * h.abs()
    return SAFETY * value, SAFETY * _softmax_back(h, dh, Q.w, Q.rel, Q.V)


def jsd(s, t, beta, temperature=1.0, dz_s=None, dz_t=None):
    """β KL(p‖m) + (1 − β) KL(q‖m), m = βp + (1 − β)q (relative error (βp rel_p + (1 − β)q rel_q)/m + 2u, log m one
    u|log m| more). Gradient: h = ∂/∂log q = (1 − β)q(1 + d) − (1 − β)q (the path through m, whose factor
    (βp + (1 − β)q)/m = 1 carries 2 rel_m), d = log q − log m; then log_softmax's backward."""
    if beta == 0:
        return forward_kl(s, t, temperature, dz_s, dz_t)
    if beta == 1:
        return reverse_kl(s, t, temperature, dz_s, dz_t)
    Q, P = _Dist(s, temperature, dz_s), _Dist(t, temperature, dz_t)
    m = beta * P.w + (1 - beta) * Q.w
    lm = torch.log(torch.where(m > 0, m, 1.0))
    rel_m = (beta * P.w * P.rel + (1 - beta) * Q.w * Q.rel) / torch.where(m > 0, m, 1.0) + 2 * U
    e_lm = rel_m + U * lm.abs()
    kl_p, kl_q = _kl_val(P.w, P.l, lm), _kl_val(Q.w, Q.l, lm)
    value = (beta * _kl_err(P.w, P.l, P.err, lm, e_lm, Q.V) + (1 - beta) * _kl_err(Q.w, Q.l, Q.err, lm, e_lm, Q.V)
             + 2 * U * (beta * kl_p.abs() + (1 - beta) * kl_q.abs()))
    d = torch.where(Q.w > 0, Q.l - lm, 0.0)
    h = (1 - beta) * Q.w * d
    dh = (1 - beta) * Q.w * ((1 + d).abs() * (Q.rel + 3 * U) + Q.err + e_lm + 2 * rel_m + Q.rel + 4 * U) + U * h.abs()
    return SAFETY * value, SAFETY * _softmax_back(h, dh, Q.w, Q.rel, Q.V)


def tvd(s, t, temperature=1.0, dz_s=None, dz_t=None):
    """½ Σ|p − q| from two float32 softmaxes (relative error rel on each probability, the difference and abs one u,
    the V-term sum u·n_eff(V)). Gradient (autograd): h_i = ½ sign(q_i − p_i) into the softmax backward q(h − Σ q h);
    where |q_i − p_i| is within the two probabilities' errors the float32 sign may flip: |Δh_i| <= 1 there."""
    Q, P = _Dist(s, temperature, dz_s), _Dist(t, temperature, dz_t)
    diff = (Q.w - P.w).abs()
    e_diff = Q.w * Q.rel + P.w * P.rel + U * diff
    value = 0.5 * (e_diff.sum(-1) + U * n_eff(Q.V) * diff.sum(-1)) + U * 0.5 * diff.sum(-1)
    h = 0.5 * torch.sign(Q.w - P.w)
    dh = torch.where(diff <= e_diff, 1.0, 0.0) + U * h.abs()
    return SAFETY * value, SAFETY * _softmax_back(h, dh, Q.w, Q.rel, Q.V)


def first_order(loss64, terms64, s, t, temperature=1.0, n_ops=8, dz_s=None, dz_t=None):
    """A generic first-order bound for a per-token loss computed by plain autograd from the float32 log-softmaxes of
    both sides (the DRKL-paper baselines of `tailkd.baselines`). ``loss64(lp, lq)``: the loss of one row as a float64
    function of the teacher's and the student's log-probabilities [V]; ``terms64(lp, lq)`` [V]: the entries its
    V-term sum adds up.
    - value: Σ_k |∂D/∂lp_k| err_p,k + |∂D/∂lq_k| err_q,k (the log-softmax errors of `_Dist`), plus u·(n_ops + n_eff(V))
      Σ_k |term_k| for the elementwise operations (at most n_ops roundings per entry) and the sum;
    - gradient wrt the scaled student logits, g = h − q Σ h with h = ∂D/∂lq (log_softmax's backward): h's error is
      the first-order change |∂h/∂lp| err_p + |∂h/∂lq| err_q (Jacobians in float64) plus u·n_ops·|h|, then
      `_softmax_back`. Second-order terms and 1-ulp transcendental kernels: SAFETY."""
    from torch.func import grad, jacrev

    Q, P = _Dist(s, temperature, dz_s), _Dist(t, temperature, dz_t)
    V = Q.V
    lp, lq = P.l.reshape(-1, V), Q.l.reshape(-1, V)
    ep, eq = P.err.reshape(-1, V), Q.err.reshape(-1, V)
    d_value = grad(loss64, argnums=(0, 1))
    jac_h = jacrev(grad(loss64, argnums=1), argnums=(0, 1))
    values, hs, dhs = [], [], []
    for a, b, ea, eb in zip(lp, lq, ep, eq):
        da, db = d_value(a, b)
        ja, jb = jac_h(a, b)  # [V, V]: ∂h_j/∂lp_k, ∂h_j/∂lq_k
        values.append((da.abs() * ea + db.abs() * eb).sum() + U * (n_ops + n_eff(V)) * terms64(a, b).abs().sum())
        hs.append(db)
        dhs.append(ja.abs() @ ea + jb.abs() @ eb + U * n_ops * db.abs())
    lead = Q.l.shape[:-1]
    h, dh = torch.stack(hs).view(*lead, V), torch.stack(dhs).view(*lead, V)
    return SAFETY * torch.stack(values).view(lead), SAFETY * _softmax_back(h, dh, Q.w, Q.rel, V)


def _kl64(a, b):
    """Σ exp(a)(a − b): KL between two float64 log-probability rows (0·log 0 = 0)."""
    return torch.where(a > NEG_INF, a.exp() * (a - b), 0.0)


def symmetric_kl(s, t, temperature=1.0):
    """FKL + RKL: the sum of the two closed-form bounds, plus the rounding of the sum."""
    vf, gf = forward_kl(s, t, temperature)
    vr, gr = reverse_kl(s, t, temperature)
    Q, P = _Dist(s, temperature), _Dist(t, temperature)
    total = _kl_val(P.w, P.l, Q.l) + _kl_val(Q.w, Q.l, P.l)
    grad = (Q.w - P.w) + Q.w * (Q.l - P.l - _kl_val(Q.w, Q.l, P.l)[..., None])
    return vf + vr + SAFETY * U * total.abs(), gf + gr + SAFETY * U * grad.abs()


def skew_kl(s, t, alpha, temperature=1.0, reverse=False):
    """KL(w ‖ αw + (1 − α)v) with (w, v) = (p, q), or (q, p) for the reverse form: `first_order`, plus the rounding of
    the mixture's log m = logaddexp(lw + log α, lv + log(1 − α)) in float32, an absolute error the terms' relative
    count misses: (log α, log(1 − α) rounded to float32, the two sums, |x − y| and the result, and ~2 ulps of
    exp / log1p) δ_k ≤ u(2|log α| + 2|log(1 − α)| + 2|lw_k| + 2|lv_k| + |lm_k| + 2). As α → 1, the terms shrink
    like (1 − α) and D like (1 − α)² while δ_k does not: Σ_k w_k δ_k is then the error (`first_order` alone was
    10-500× too small at α = 0.999-0.99999). It enters the value as Σ_k |∂D/∂lm_k| δ_k and the gradient through
    |∂h/∂lm| δ (Jacobians in float64), then log_softmax's backward (linear in the bound of h)."""
    from torch.func import grad, jacrev

    la, lb = math.log(alpha) if alpha > 0 else NEG_INF, math.log1p(-alpha)

    def parts(lp, lq):
        return (lq, lp) if reverse else (lp, lq)

    def log_mix(w, v):
        """log m; at α = 0 log v, as the library computes it (logaddexp(w − inf, v)'s second derivative is NaN)."""
        return v if alpha == 0 else torch.logaddexp(w + la, v + lb)

    def loss64(lp, lq, d=None):
        w, v = parts(lp, lq)
        lm = log_mix(w, v)
        return _kl64(w, lm if d is None else lm + d).sum()

    def terms(lp, lq):
        w, v = parts(lp, lq)
        return _kl64(w, log_mix(w, v))

    value, gbound = first_order(loss64, terms, s, t, temperature, n_ops=8)
    if alpha == 0:  # log m = lv exactly: no mixture is computed
        return value, gbound
    Q, P = _Dist(s, temperature), _Dist(t, temperature)
    V = Q.V
    d_lm = grad(loss64, argnums=2)
    jac_h_lm = jacrev(grad(loss64, argnums=1), argnums=2)
    extra_v, extra_h = [], []
    for a, b in zip(P.l.reshape(-1, V), Q.l.reshape(-1, V)):
        w, v = parts(a, b)
        lm = log_mix(w, v)
        delta = U * (2 * abs(la) + 2 * abs(lb) + 2 * _abs_finite(w) + 2 * _abs_finite(v) + _abs_finite(lm) + 2)
        delta = torch.where(lm > NEG_INF, delta, 0.0)  # an entry neither side has: −inf, no term
        zero = torch.zeros_like(a)
        extra_v.append((d_lm(a, b, zero).abs() * delta).sum())
        extra_h.append(jac_h_lm(a, b, zero).abs() @ delta)
    lead = Q.l.shape[:-1]
    dh = torch.stack(extra_h).view(*lead, V)
    g_extra = dh + Q.w * dh.sum(-1, keepdim=True)  # `_softmax_back`'s part that is linear in the bound of h
    return value + SAFETY * torch.stack(extra_v).view(lead), gbound + SAFETY * g_extra


def akl(s, t, mu, temperature=1.0):
    """w_head·FKL + w_tail·RKL. `first_order` with the weights held at their exact values, plus what the float32
    weights can be off: each |p_i − q_i| within p rel_p + q rel_q + u|p − q|, the cumulative teacher sum near μ
    (within V·u + the p errors) possibly moving a token between head and tail (its |p_i − q_i| then counts on the
    other side); the weights' error times |FKL|, |RKL| and their gradients."""
    Q, P = _Dist(s, temperature), _Dist(t, temperature)
    p_sorted, order = P.w.sort(dim=-1, descending=True, stable=True)  # ties: the smaller id first, as akl
    q_sorted = Q.w.gather(-1, order)
    gap = (p_sorted - q_sorted).abs()
    e_gap = p_sorted * P.rel.gather(-1, order) + q_sorted * Q.rel.gather(-1, order) + U * gap
    cum = p_sorted.cumsum(-1)
    e_cum = (p_sorted * P.rel.gather(-1, order)).cumsum(-1) + U * n_eff(Q.V) * cum
    tail = cum > mu
    tail[..., 0] = False
    unsure = ((cum - mu).abs() <= e_cum) & (torch.arange(Q.V) > 0)
    g_tail, g_head = torch.where(tail, gap, 0.0).sum(-1), torch.where(tail, 0.0, gap).sum(-1)
    dg = e_gap.sum(-1) + torch.where(unsure, gap + e_gap, 0.0).sum(-1) + U * n_eff(Q.V) * gap.sum(-1)
    total = g_head + g_tail
    safe = torch.where(total > 0, total, 1.0)
    w_head, w_tail = g_head / safe, g_tail / safe
    dw = torch.where(total > 0, dg * (1 + w_head + w_tail) / safe + 4 * U, 0.0)  # d(g_part/total), both weights

    def loss64(lp, lq, wh, wt):
        return (wh * _kl64(lp, lq) + wt * _kl64(lq, lp)).sum()

    fo_v, fo_g = [], []
    flat = lambda x: x.reshape(-1)  # noqa: E731
    for i, (sr, tr) in enumerate(zip(s.reshape(-1, Q.V), t.reshape(-1, Q.V))):
        wh, wt = float(flat(w_head)[i]), float(flat(w_tail)[i])
        v, g = first_order(lambda a, b, wh=wh, wt=wt: loss64(a, b, wh, wt),
                           lambda a, b, wh=wh, wt=wt: wh * _kl64(a, b) + wt * _kl64(b, a), sr[None], tr[None],
                           temperature, n_ops=8)
        fo_v.append(v[0])
        fo_g.append(g[0])
    lead = Q.l.shape[:-1]
    fkl, rkl = _kl_val(P.w, P.l, Q.l), _kl_val(Q.w, Q.l, P.l)
    g_fkl, g_rkl = Q.w - P.w, Q.w * (Q.l - P.l - rkl[..., None])
    value = torch.stack(fo_v).view(lead) + SAFETY * dw * (fkl.abs() + rkl.abs())
    grad = torch.stack(fo_g).view(*lead, Q.V) + SAFETY * dw[..., None] * (g_fkl.abs() + g_rkl.abs())
    return value, grad


def ab_divergence(s, t, alpha, beta, temperature=1.0):
    """The α-β divergence by `first_order` (powers from scaled log-probabilities: 3 roundings each, then the products,
    the weighted difference and the 1/(αβ) scaling). The general form sums terms of size ~1 whose total is ~αβ·D:
    the accumulation bound is relative to Σ|terms|/(αβ), so it grows as αβ shrinks, which is the real cancellation."""
    ab = alpha + beta

    def terms(lp, lq):
        if alpha == 0 and beta == 0:
            return 0.5 * (lp - lq) ** 2
        if beta == 0:
            pa = (alpha * lp).exp()
            return (pa * alpha * (lp - lq) - pa + (alpha * lq).exp()) / alpha**2
        if alpha == 0:
            qb = (beta * lq).exp()
            return (qb * beta * (lq - lp) - qb + (beta * lp).exp()) / beta**2
        return -((alpha * lp + beta * lq).exp() - alpha / ab * (ab * lp).exp() - beta / ab * (ab * lq).exp()) / (
            alpha * beta)

    def abs_terms(lp, lq):  # the sizes that are summed (before the cancellation)
        if alpha == 0 or beta == 0:
            return terms(lp, lq).abs() + (lp.exp() + lq.exp()) / max(alpha, beta) ** 2
        return ((alpha * lp + beta * lq).exp() + alpha / ab * (ab * lp).exp() + beta / ab * (ab * lq).exp()) / (
            alpha * beta)

    return first_order(lambda a, b: terms(a, b).sum(), abs_terms, s, t, temperature, n_ops=10)


def _same_tokens(mask, segment_ids):
    """[B, T, T]: token u counts for position t (the same row, or the same (row, segment), and valid)."""
    if segment_ids is None:
        same = torch.ones(mask.shape[0], mask.shape[1], mask.shape[1], dtype=torch.bool)
    else:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same & mask[:, None, :]


def _seq_mean(x, mask, segment_ids):
    """Per-position mean of x over the valid tokens of the same row (or the same (row, segment)), 0 if none."""
    a = torch.where(mask, x, 0.0)
    same = _same_tokens(mask, segment_ids)
    count = same.sum(-1)
    return torch.where(count > 0, (same * a[:, None, :]).sum(-1) / count.clamp_min(1), 0.0)


def _seq_log_mean(log_x, mask, segment_ids):
    """`_seq_mean` in log space: log of the per-position mean of exp(log_x) over the same row's (segment's) valid
    tokens (−inf if none), exact where the mean is below float64's range."""
    same = _same_tokens(mask, segment_ids)
    count = same.sum(-1)
    total = torch.logsumexp(torch.where(same, log_x[:, None, :], NEG_INF), -1)
    return torch.where(count > 0, total - count.clamp_min(1).double().log(), NEG_INF)


def _tiny_tail(P, Q, top, valid, beta, segment_ids, seq_alpha_mean, lat, e_lat):
    """(value bound [...], tail gradient bound [..., V], W) of TAD's log-space rows (`divergences.tad_tiny_rows`:
    α^T below 1e-30, where the linear tail sums have lost their precision): the tail term W·D_KL2 with W = β·α^T/ᾱ
    = exp(log β − log ᾱ + log α^T) and D_KL2 = KL(p̃‖q̃) from log p̃ = log p − log α^T (error P.err + Δlog α^T +
    u|log p̃|) and log q̃ the log_softmax of the tail's logits, (z − m) − log S (κ_V + 2u|log q̃|, as any
    log-probability: no u|log α^S|);
    W's relative error Δlog α^T + Δlog ᾱ (ᾱ averaged in float64 from the float32 log α^T: the largest Δlog α^T of
    the sequence) + 2u. Gradient on the tail: q_i + (W − α^T) q̃_i − W p̃_i, each factor's relative error."""
    if seq_alpha_mean is None:
        log_abar = _seq_log_mean(torch.where(valid, lat, NEG_INF), valid, segment_ids)
        e_labar = _seq_mean(e_lat, valid, segment_ids).clamp_min(0) + torch.where(
            valid, e_lat, 0.0).amax(-1, keepdim=True) + 1e-15
    else:
        abar = seq_alpha_mean.detach().double()
        log_abar = torch.where(abar > 0, abar.clamp_min(1e-300).log(), NEG_INF)
        e_labar = torch.full_like(abar, U)
    has = torch.isfinite(lat) & (log_abar > NEG_INF)
    big_w = torch.where(has, beta * (lat - torch.where(has, log_abar, 0.0)).exp(), 0.0)
    e_w = e_lat + e_labar + 2 * U
    lpt = torch.where(top, NEG_INF, P.l - torch.where(torch.isfinite(lat), lat, 0.0)[..., None])
    e_lpt = P.err + e_lat[..., None] + U * _abs_finite(lpt)
    lqt = _renorm(Q.z, top)  # log q̃: the tail's own log_softmax of the logits (`divergences.tail_log_softmax_`)
    e_lqt = Q.kappa + 2 * U * _abs_finite(lqt) + Q._scaling()
    p_t, q_t = torch.where(top, 0.0, lpt.exp()), torch.where(top, 0.0, lqt.exp())
    n_tail = Q.V - int(top[(0,) * (top.dim() - 1)].sum())
    d_kl2 = _kl_val(p_t, torch.where(top, 0.0, lpt), torch.where(top, 0.0, lqt))
    e_kl2 = _kl_err(p_t, torch.where(top, 0.0, lpt), torch.where(top, 0.0, e_lpt), torch.where(top, 0.0, lqt),
                    torch.where(top, 0.0, e_lqt), n_tail)
    value = big_w * (e_kl2 + d_kl2.abs() * (e_w + U))
    alpha_t = torch.where(torch.isfinite(lat), lat.exp(), 0.0)[..., None]
    coef = (big_w[..., None] - alpha_t).abs()
    grad = (Q.w * (Q.rel + 2 * U) + coef * q_t * (e_lqt + e_w[..., None] + 4 * U) + alpha_t * q_t * U
            + big_w[..., None] * p_t * (e_lpt + e_w[..., None] + 4 * U))
    return value, grad, big_w


def _underflow_path(alpha_s, vocab):
    """(normal, underflow): which α^S path(s) TAD may take — log space below V·tiny/eps (`losses`) or 1e-30 (`fused`);
    both near the thresholds."""
    threshold = vocab * torch.finfo(torch.float32).tiny / torch.finfo(torch.float32).eps
    return alpha_s >= 0.5 * min(threshold, 1e-30), alpha_s < 2 * max(threshold, 1e-30)


def tad(s, t, mask, k, beta, segment_ids=None, seq_alpha_mean=None, temperature=1.0, ids=None, dz_s=None, dz_t=None):
    """L = top + bucket + β_x·(tail KL − bucket) as `_TailWeightedKL` computes it: top = Σ_𝒦 p(log p − log q) (K
    terms), tail KL = Σ_tail p(log p − log q) (a V-term sum), α^T = Σ_tail p (V terms; a sub-normal p adds 2^-149 each),
    α^S = Σ_tail q (or, when it underflows, log α^S = lse_tail − lse: two u·M roundings), bucket = α^T(log α^T −
    log α^S), β_x = β/ᾱ with ᾱ the T-term mean of the float32 α^T. Closed-form gradient: (q − p) on 𝒦; on the tail
    q_i(1 + (β_x − 1)α^T/α^S) − β_x p_i, or q̃_i(α^S + (β_x − 1)α^T) − β_x p_i on the underflow path. Rows whose
    α^T is below 1e-30 (the library's log-space rows, also where α^T and ᾱ are below float64's range) by `_tiny_tail`;
    both counts near that threshold."""
    Q, P = _Dist(s, temperature, dz_s), _Dist(t, temperature, dz_t)
    V = Q.V
    if ids is None:
        ids = torch.topk(P.z, k, dim=-1).indices
    top = torch.zeros_like(P.w, dtype=torch.bool).scatter(-1, ids, True)
    valid = mask.bool()
    p_tail, q_tail = torch.where(top, 0.0, P.w), torch.where(top, 0.0, Q.w)
    n_tail = V - ids.shape[-1]  # the tail sums add K exact zeros (exactly): n_tail rounded terms
    alpha_t = p_tail.sum(-1)
    d_alpha_t = (p_tail * P.rel).sum(-1) + U * n_eff(n_tail) * alpha_t + V * F32_SUBNORMAL
    alpha_s = q_tail.sum(-1)
    lse_tail, e_lse_tail = Q.lse(~top)
    lse_all, e_lse_all = Q.lse()
    log_alpha_s = lse_tail - lse_all
    d_alpha_s = (q_tail * Q.rel).sum(-1) + U * n_eff(n_tail) * alpha_s + V * F32_SUBNORMAL
    normal, under = _underflow_path(alpha_s, V)
    e_las = torch.maximum(torch.where(normal, d_alpha_s / alpha_s.clamp_min(1e-300), 0.0),
                          torch.where(under, e_lse_tail + e_lse_all, 0.0)) + U * _abs_finite(log_alpha_s)
    has_tail = alpha_t > 0
    log_alpha_t = torch.log(torch.where(has_tail, alpha_t, 1.0))
    rel_alpha_t = torch.where(has_tail, d_alpha_t / torch.where(has_tail, alpha_t, 1.0), 0.0)
    B = torch.where(has_tail, log_alpha_t - log_alpha_s, 0.0)
    bucket = alpha_t * B
    d_bucket = torch.where(has_tail, alpha_t * (rel_alpha_t * B.abs() + rel_alpha_t + U * log_alpha_t.abs() + e_las
                                                + U * B.abs()) + U * bucket.abs(), 0.0)
    K = ids.shape[-1]
    p_top = torch.where(top, P.w, 0.0)
    top_val, d_top = _kl_val(p_top, P.l, Q.l), _kl_err(p_top, P.l, P.err, Q.l, Q.err, K)
    # α^T·D_KL2 = tail KL − bucket. Both read the same float32 p_i (α^T = Σ_tail p_i), so a relative error ρ_i of p_i
    # enters as p_i ρ_i (d_i − B − 1), d_i − B = log(p̃_i/q̃_i) (first order, exact); the log-probability errors, the
    # roundings of the V-term sums (α^T's too, times |B + 1|), products and differences do not cancel.
    d_pq = torch.where(p_tail > 0, P.l - Q.l, 0.0)
    tail_kl = _kl_val(p_tail, P.l, Q.l)
    tail = torch.where(has_tail, tail_kl - bucket, 0.0)
    weights = (p_tail * (P.rel * (d_pq - B[..., None] - 1).abs() + P.err + Q.err)).sum(-1)
    rounding = (U * (2 + n_eff(n_tail)) * (p_tail * d_pq.abs()).sum(-1) + U * n_eff(n_tail) * alpha_t * (B + 1).abs()
                + alpha_t * (U * log_alpha_t.abs() + e_las + U * B.abs()) + U * bucket.abs() + U * tail.abs())
    subnormal = F32_SUBNORMAL * (_abs_finite(d_pq).sum(-1) + V * (B + 1).abs())
    d_tail = torch.where(has_tail, weights + rounding + subnormal, 0.0)
    n_time = mask.shape[-1]
    if seq_alpha_mean is None:
        abar = _seq_mean(alpha_t, valid, segment_ids)
        d_abar = _seq_mean(d_alpha_t, valid, segment_ids) + U * (n_time + 1) * abar
    else:
        abar = seq_alpha_mean.detach().double()
        d_abar = U * abar  # cast to float32
    beta_x = torch.where(abar > 0, beta / abar.clamp_min(1e-300), 0.0)
    rel_bx = torch.where(abar > 0, d_abar / abar.clamp_min(1e-300), 0.0) + 2 * U
    loss = top_val + bucket + beta_x * tail
    value = (d_top + d_bucket + beta_x * (d_tail + rel_bx * tail.abs())
             + U * (top_val.abs() + bucket.abs() + 2 * beta_x * tail.abs() + loss.abs()))
    # rows computed in log space (α^T below 1e-30 in float32, `divergences.tad_tiny_rows`; both bounds near it):
    # their tail term is W·D_KL2 from log p̃, log q̃ — the linear-space count above charges sub-normal p_i's and a
    # β/ᾱ beyond float64's range, which does not describe them
    (ltt, e_ltt), (lt_all, e_lt_all) = P.lse(~top), P.lse()
    lat = ltt - lt_all
    e_lat = torch.where(torch.isfinite(lat), e_ltt + e_lt_all + U * _abs_finite(lat), 0.0)
    alpha64 = torch.where(torch.isfinite(lat), lat.exp(), 0.0)
    maybe_tiny = (alpha64 < 2e-30) & torch.isfinite(lat)
    maybe_linear = ~(alpha64 < 0.5e-30) | ~torch.isfinite(lat)
    v_tiny, g_tiny, _ = _tiny_tail(P, Q, top, valid, beta, segment_ids, seq_alpha_mean, lat, e_lat)
    v_tiny = v_tiny + d_top + d_bucket + U * (top_val.abs() + bucket.abs() + loss.abs())
    value = torch.maximum(torch.where(maybe_linear, value, 0.0), torch.where(maybe_tiny, v_tiny, 0.0))
    # gradient
    g_top = Q.w * Q.rel + P.w * P.rel + 3 * U * (Q.w - P.w).abs()
    bx, at = beta_x[..., None], alpha_t[..., None]
    p_term = bx * P.w * (P.rel + rel_bx[..., None] + 3 * U)
    ratio = torch.where(alpha_s > 0, alpha_t / alpha_s.clamp_min(1e-300), 0.0)[..., None]
    rel_ratio = (rel_alpha_t + torch.where(alpha_s > 0, d_alpha_s / alpha_s.clamp_min(1e-300), 0.0))[..., None] + U
    c1 = 1 + (bx - 1) * ratio
    d_c1 = (bx + 1) * ratio * (rel_ratio + rel_bx[..., None] + 3 * U) + U * c1.abs()
    g_normal = Q.w * (Q.rel * c1.abs() + 2 * U * c1.abs()) + Q.w * d_c1 + p_term
    lq_tilde, _, back_q_tilde = Q.log_ratio(~top)  # q̃ as the tail's softmax, (s − m) − log S (`tail_softmax_`)
    q_tilde = lq_tilde.exp()
    coef = alpha_s[..., None] + (bx - 1) * at
    d_coef = (alpha_s[..., None] * (e_las[..., None] + U) + (bx + 1) * at * (rel_alpha_t[..., None] + rel_bx[..., None]
                                                                           + 2 * U) + U * coef.abs())
    g_under = q_tilde * ((back_q_tilde + 3 * U) * coef.abs() + d_coef) + p_term
    g_tail = torch.maximum(torch.where(normal[..., None], g_normal, 0.0), torch.where(under[..., None], g_under, 0.0))
    grad = torch.where(top, g_top, g_tail + U * (Q.w * c1.abs() + bx * P.w))
    grad = torch.maximum(torch.where(maybe_linear[..., None], grad, 0.0),
                         torch.where(maybe_tiny[..., None], torch.where(top, g_top, g_tiny), 0.0))
    return SAFETY * torch.where(valid, value, 0.0), SAFETY * torch.where(valid[..., None], grad, 0.0)


def tad_decompose(s, t, k, temperature=1.0, ids=None):
    """(d_kl1, d_kl2, alpha) of `tad_decompose` (plain autograd, log space): log α = lse_tail − lse (two log-sum-exps:
    the u·M terms), bucket = α(log α^T − log α^S), d_kl1 = Σ_𝒦 p(log p − log q) + bucket, d_kl2 = KL(p̃‖q̃) with
    log p̃ = z − lse_tail. Returns ((v1, g1), (v2, g2), alpha_bound)."""
    Q, P = _Dist(s, temperature), _Dist(t, temperature)
    V = Q.V
    if ids is None:
        ids = torch.topk(P.z, k, dim=-1).indices
    K = ids.shape[-1]
    top = torch.zeros_like(P.w, dtype=torch.bool).scatter(-1, ids, True)
    (lts, e_lts), (ls, e_ls) = Q.lse(~top), Q.lse()
    (ltt, e_ltt), (lt, e_lt) = P.lse(~top), P.lse()
    las, lat = lts - ls, ltt - lt
    e_las, e_lat = e_lts + e_ls + U * _abs_finite(las), e_ltt + e_lt + U * _abs_finite(lat)
    alpha = lat.exp()
    alpha_bound = alpha * (e_lat + U) + F32_SUBNORMAL
    p_top = torch.where(top, P.w, 0.0)
    top_val = _kl_val(p_top, P.l, Q.l)
    bucket = torch.where(alpha > 0, alpha * (lat - las), 0.0)
    d_bucket = _kl_err(alpha[..., None], lat[..., None], e_lat[..., None], las[..., None], e_las[..., None], 1)
    v1 = _kl_err(p_top, P.l, P.err, Q.l, Q.err, K) + d_bucket + U * (top_val.abs() + bucket.abs())
    lq_t, e_lq_t, back_q_t = Q.log_ratio(~top)
    lp_t, e_lp_t, _ = P.log_ratio(~top)
    q_t, p_t = lq_t.exp(), lp_t.exp()
    v2 = _kl_err(p_t, lp_t, e_lp_t, lq_t, e_lq_t, V)
    # d_kl1's gradient: the top term through log_softmax (h = −p on 𝒦) and the bucket through lse_tail − lse
    back_q = Q.kappa + U * _abs_finite(Q.l) + 3 * U + Q._scaling()
    g_top = _softmax_back(-p_top, U * 2 * p_top + p_top * P.rel, Q.w, Q.rel, V)
    a = alpha[..., None]
    g_bucket = a * (q_t * (back_q_t + e_lat[..., None] + 3 * U) + Q.w * (back_q + e_lat[..., None] + 3 * U))
    g1 = g_top + g_bucket + U * ((p_top - Q.w * (1 - a)).abs() + a * (q_t + Q.w))
    # d_kl2's gradient: −p̃ through log q̃ = z − lse_tail: −p̃_j + q̃_j Σ p̃ on the tail
    g2 = _softmax_back(-p_t, p_t * (e_lp_t + 2 * U), q_t, back_q_t, V)
    return (SAFETY * v1, SAFETY * g1), (SAFETY * v2, SAFETY * g2), SAFETY * alpha_bound


class _LabelSplit:
    """`_target_split` for one side: log b = (z_y − lse, lse_rest − lse) and log x̂ = z − lse_rest (i ≠ y), their
    bounds, and the relative bounds of the softmax weights of the two log-sum-exp backwards."""

    def __init__(self, D: _Dist, onehot):
        (lse, e_lse), (lse_r, e_lse_r) = D.lse(), D.lse(~onehot)
        zy = torch.where(onehot, D.z, 0.0).sum(-1)
        self.lb = torch.stack([zy - lse, lse_r - lse], -1)
        self.e_lb = torch.stack([e_lse + U * _abs_finite(zy - lse) + (U * zy.abs() if D.scaled else 0.0) + D._dz_row(),
                                 e_lse_r + e_lse + U * _abs_finite(lse_r - lse)], -1)
        self.l_hat, self.e_hat, self.back_hat = D.log_ratio(~onehot)
        self.hat = self.l_hat.exp()
        self.back = D.kappa + U * _abs_finite(D.l) + 3 * U + D._scaling()


def dkd(s, t, labels, alpha, beta, temperature=1.0):
    """α·KL(b^p‖b^q) + β·KL(p̂‖q̂) through `_target_split` (log-sum-exps: u·M terms). Gradient wrt z_j:
    α[−b^p_y δ_jy + b^p_y q_j − b^p_r q̂_j + b^p_r q_j] (the two lse backwards) + β(−p̂_j + q̂_j Σ p̂)."""
    Q, P = _Dist(s, temperature), _Dist(t, temperature)
    valid = labels != -100
    y = torch.where(valid, labels, 0)
    onehot = torch.zeros_like(P.w, dtype=torch.bool).scatter(-1, y[..., None], True)
    sq, sp = _LabelSplit(Q, onehot), _LabelSplit(P, onehot)
    bp = sp.lb.exp()
    tckd, nckd = _kl_val(bp, sp.lb, sq.lb), _kl_val(sp.hat, sp.l_hat, sq.l_hat)
    value = (alpha * _kl_err(bp, sp.lb, sp.e_lb, sq.lb, sq.e_lb, 2) + beta * _kl_err(sp.hat, sp.l_hat, sp.e_hat,
                                                                                       sq.l_hat, sq.e_hat, Q.V)
             + 2 * U * (alpha * tckd.abs() + beta * nckd.abs()) + U * (alpha * tckd + beta * nckd).abs())
    rel_b = sp.e_lb + U  # [..., 2]
    by, br = bp[..., :1], bp[..., 1:]
    ry, rr = rel_b[..., :1], rel_b[..., 1:]
    g_bin = (onehot * by * ry + by * Q.w * (ry + sq.back + 2 * U) + br * sq.hat * (rr + sq.back_hat + 2 * U)
             + br * Q.w * (rr + sq.back + 2 * U) + 3 * U * (onehot * by + Q.w + br * sq.hat))
    g_nc = _softmax_back(-sp.hat, sp.hat * (sp.e_hat + 2 * U), sq.hat, sq.back_hat, Q.V)
    grad = alpha * g_bin + beta * g_nc + U * (alpha * (onehot * by + Q.w + br * sq.hat) + beta * (sq.hat + sp.hat))
    return SAFETY * torch.where(valid, value, 0.0), SAFETY * torch.where(valid[..., None], grad, 0.0)


def drkl(s, t, labels, gamma, anchor="label", temperature=1.0):
    """KL(b^q‖b^p) + γ·KL(q̂‖p̂) (student-weighted, through `_target_split`). Gradient: h_b = b^q_b(1 + d_b) into
    log b^q = (z_y − lse, lse_rest − lse) gives h_y(δ_jy − q_j) + h_r(q̂_j − q_j); the non-target part is reverse-KL
    shaped: ĥ = γ q̂(1 + d̂) through log q̂ = z − lse_rest."""
    Q, P = _Dist(s, temperature), _Dist(t, temperature)
    valid = torch.ones(P.w.shape[:-1], dtype=torch.bool) if labels is None else labels != -100
    y = P.z.argmax(-1) if anchor == "teacher_argmax" else torch.where(valid, labels, 0)
    onehot = torch.zeros_like(P.w, dtype=torch.bool).scatter(-1, y[..., None], True)
    sq, sp = _LabelSplit(Q, onehot), _LabelSplit(P, onehot)
    bq = sq.lb.exp()
    binary, nontarget = _kl_val(bq, sq.lb, sp.lb), _kl_val(sq.hat, sq.l_hat, sp.l_hat)
    value = (_kl_err(bq, sq.lb, sq.e_lb, sp.lb, sp.e_lb, 2) + gamma * _kl_err(sq.hat, sq.l_hat, sq.e_hat, sp.l_hat,
                                                                                sp.e_hat, Q.V)
             + 2 * U * (binary.abs() + gamma * nontarget.abs()) + U * (binary + gamma * nontarget).abs())
    d_b = torch.where(bq > 0, sq.lb - sp.lb, 0.0)
    h_b = bq * (1 + d_b)
    dh_b = bq * (d_b.abs() * (sq.e_lb + 4 * U) + sq.e_lb + sp.e_lb + sq.e_lb + 2 * U) + U * h_b.abs()
    hy, hr, dhy, dhr = h_b[..., :1].abs(), h_b[..., 1:].abs(), dh_b[..., :1], dh_b[..., 1:]
    g_bin = (dhy * (onehot + Q.w) + hy * Q.w * (sq.back + 2 * U) + dhr * (sq.hat + Q.w)
             + hr * (sq.hat * (sq.back_hat + 2 * U) + Q.w * (sq.back + 2 * U))
             + 3 * U * (hy * (onehot + Q.w) + hr * (sq.hat + Q.w)))
    d_hat = torch.where(sq.hat > 0, sq.l_hat - sp.l_hat, 0.0)
    h = gamma * sq.hat * (1 + d_hat)
    dh = gamma * sq.hat * (d_hat.abs() * (sq.e_hat + 4 * U) + 2 * sq.e_hat + sp.e_hat + 2 * U) + U * h.abs()
    g_nt = _softmax_back(h, dh, sq.hat, sq.back_hat, Q.V)
    grad = g_bin + g_nt
    return SAFETY * torch.where(valid, value, 0.0), SAFETY * torch.where(valid[..., None], grad, 0.0)


def topk_bucket_kl(s, ids, logprobs, tail_mass=None):
    """D_KL1 from a sparse teacher: the cached log-probs are exact inputs (weights exp(log p_k): u), α^T =
    −expm1(logsumexp(log p_k)) carries (1 − α^T)(κ_K + u|lse|) + uα^T absolute (only u·α^T when given), log α^S =
    lse_tail − lse (two u·M terms); gradient as d_kl1's."""
    Q = _Dist(s, 1.0)
    V, K = Q.V, ids.shape[-1]
    lp = logprobs.detach().double()
    top = torch.zeros_like(Q.w, dtype=torch.bool).scatter(-1, ids, True)
    if tail_mass is None:
        lse_lp = torch.logsumexp(lp, -1)
        alpha = (-torch.expm1(lse_lp)).clamp_min(0)
        d_alpha = (1 - alpha) * (lse_kappa(K) + U * lse_lp.abs()) + U * alpha
    else:
        alpha = tail_mass.detach().double().clamp_min(0)
        d_alpha = U * alpha
    (lts, e_lts), (ls, e_ls) = Q.lse(~top), Q.lse()
    las = lts - ls
    e_las = e_lts + e_ls + U * _abs_finite(las)
    has_tail = alpha > 0
    lat = torch.log(torch.where(has_tail, alpha, 1.0))
    e_lat = torch.where(has_tail, d_alpha / torch.where(has_tail, alpha, 1.0), 0.0) + U * lat.abs()
    bucket = torch.where(has_tail, alpha * (lat - las), 0.0)
    d_bucket = _kl_err(alpha[..., None], lat[..., None], e_lat[..., None], las[..., None], e_las[..., None], 1)
    p_k = lp.exp()
    lq_k, e_lq_k = Q.l.gather(-1, ids), Q.err.gather(-1, ids)
    top_val = _kl_val(p_k, lp, lq_k)
    value = _kl_err(p_k, lp, torch.zeros_like(lp), lq_k, e_lq_k, K) + d_bucket + U * (top_val.abs() + bucket.abs())
    p_top = torch.zeros_like(Q.w).scatter(-1, ids, p_k)
    lq_t, _, back_q_t = Q.log_ratio(~top)
    q_t = lq_t.exp()
    back_q = Q.kappa + U * _abs_finite(Q.l) + 3 * U
    a = alpha[..., None]
    g_top = _softmax_back(-p_top, 3 * U * p_top, Q.w, Q.rel, V)
    g_bucket = a * (q_t * (back_q_t + e_lat[..., None] + 3 * U) + Q.w * (back_q + e_lat[..., None] + 3 * U))
    grad = g_top + g_bucket + U * ((p_top - Q.w * (1 - a)).abs() + a * (q_t + Q.w))
    return SAFETY * value, SAFETY * grad


def hidden_cosine(h_s, h_t, mask, weight=None):
    """1 − cos(a, b), a = h_s (or h_s Wᵀ), b = the teacher's first d coordinates. F.cosine_similarity normalises first
    (two d-term norms, halved by the sqrt; two divisions), then sums d products: |Δcos| <= u(2d + 5), and 1 − cos one u
    more; a projection adds 2δ_a, δ_a = γ_{d_S}‖|W||h_S|‖/‖W h_S‖ (relative error of the projected vector).
    Gradient wrt a, −(b̂ − cos â)/‖a‖: G_a = (|b̂| + |cos||â|)/‖a‖ with relative error u(2d + 10), plus 3δ_a/‖a‖ from
    the projected input; through the projection's backward matmul (d_T terms): (bound_a + γ_{d_T} G_a) @ |W|."""
    from bounds import gamma

    hs, ht = h_s.detach().double(), h_t.detach().double()
    if weight is not None:
        w = weight.detach().double()
        a = hs @ w.T
        delta_a = gamma(hs.shape[-1]) * (hs.abs() @ w.abs().T).norm(dim=-1) / a.norm(dim=-1)
    else:
        a, delta_a = hs, torch.zeros(hs.shape[:-1], dtype=torch.float64)
    d = a.shape[-1]
    b = ht[..., :d]
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    a_hat, b_hat = a / na, b / nb
    cos = (a_hat * b_hat).sum(-1, keepdim=True)
    value = U * (2 * d + 7) + 2 * delta_a
    G_a = (b_hat.abs() + cos.abs() * a_hat.abs()) / na
    bound_a = U * (2 * d + 10) * G_a + 3 * delta_a[..., None] / na
    grad = bound_a if weight is None else (bound_a + gamma(d) * G_a) @ weight.detach().double().abs()
    valid = mask.bool()
    return SAFETY * torch.where(valid, value, 0.0), SAFETY * torch.where(valid[..., None], grad, 0.0)


# --------------------------------------------------------------------------- an LM head + the objective


def head_logits(h, weight, bias, spec):
    """Float64 logits softcap(scale·(h Wᵀ + b)) [..., V] of `head_mod.apply_head` from the float32 inputs, and the bound
    [...] (per row, its max) on the float32 logits: the (d+1)-term dot product γ_{d+1}(|h||W|ᵀ + |b|) times |scale|, the
    scaling u|x|, and cap·tanh(x/cap) (tanh' <= 1 passes the input error on; x/cap, tanh, ×cap add u|x| + 2u|z|)."""
    from bounds import gamma

    V = spec.vocab_size
    h, w = h.detach().double(), weight.detach().double()[:V]
    b = None if bias is None else bias.detach().double()[:V]
    u = h @ w.T + (0.0 if b is None else b)
    mag = h.abs() @ w.abs().T + (0.0 if b is None else b.abs())
    x = spec.scale * u
    dx = gamma(h.shape[-1] + 1) * mag * abs(spec.scale) + (U * x.abs() if spec.scale != 1.0 else 0.0)
    if spec.softcap is None:
        return x, dx.amax(-1)
    z = spec.softcap * torch.tanh(x / spec.softcap)
    return z, (dx + U * x.abs() + 2 * U * z.abs()).amax(-1)


def head_objective(cfg, h_s, w_s, b_s, spec_s, h_t, head_t, labels, segment_ids=None, *, n=None, sparse=None):
    """Bounds on ONE float32 evaluation (dense `objective(apply_head(...))` or `objective.chunked_objective`) of the
    loss, clm and div terms and of the gradients wrt h_s, W_s and b_s: the logits' bound (`head_logits`) enters the
    per-token bounds as dz; CE = −log q_y (log_softmax entry), divergence per `cfg.name`; the sums over the n valid
    tokens (u·n_eff(n)·Σ|terms|); the per-logit gradient G = ∂loss/∂z (exact, float64 autograd) times the
    transform's derivative scale·(1 − tanh²) (recomputed from the rounded z); then the backward matmuls G W (V
    terms) and Gᵀh, Σ G (over the tokens). ``sparse``: a `SparseTeacher` (teacher cache) instead of h_t/head_t
    (`cache_tad`). ``n``: the objective's denominator (default: the number of valid tokens). Returns SAFETY × {loss,
    clm, div, h [B, T, d], w [rows, d], b [rows]}."""
    import torch.nn.functional as F
    from bounds import gamma

    from tailkd.losses import zero_masked_rows
    from tailkd.objective import IGNORE_INDEX
    from tailkd.registry import bind

    V = spec_s.vocab_size
    z_s, dz_s = head_logits(h_s, w_s, b_s, spec_s)
    mask = labels != IGNORE_INDEX
    n = max(int(mask.sum()) if n is None else int(n), 1)
    cw, dw, tau = cfg.clm_weight, cfg.div_weight, cfg.temperature
    zz = z_s.clone().requires_grad_(True)
    ce = F.cross_entropy(zz.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    ce = ce.view(labels.shape)
    Qz = _Dist(z_s, 1.0, dz_s)
    y = torch.where(mask, labels, 0)[..., None]
    onehot = torch.zeros_like(Qz.w).scatter(-1, y, 1.0)
    b_ce = torch.where(mask, Qz.err.gather(-1, y)[..., 0], 0.0)
    g_ce = Qz.w * Qz.rel + 3 * U * (Qz.w - onehot).abs()
    if cfg.name == "clm":
        div = torch.zeros_like(ce)
        b_div, g_div = torch.zeros_like(ce), torch.zeros_like(z_s)
    elif sparse is not None:
        seg = segment_ids if cfg.per_document else None
        div = bind(cfg).sparse_per_token(zz, _sparse64(sparse), mask, segment_ids)
        b_div, g_div = cache_tad(z_s, sparse, mask, loss=cfg.name, beta=cfg.beta, segment_ids=seg, dz_s=dz_s)
        b_div, g_div = b_div / SAFETY, g_div / SAFETY
    else:
        z_t, dz_t = head_logits(h_t, head_t.weight, head_t.bias, head_t.spec)
        div = bind(cfg).per_token(zero_masked_rows(zz, mask), zero_masked_rows(z_t, mask), labels, mask, segment_ids)
        if cfg.name == "kd":
            b_div, g_div = forward_kl(z_s, z_t, tau, dz_s, dz_t)
        elif cfg.name == "rkl":
            b_div, g_div = reverse_kl(z_s, z_t, tau, dz_s, dz_t)
        elif cfg.name == "jsd":
            b_div, g_div = jsd(z_s, z_t, cfg.jsd_beta, tau, dz_s, dz_t)
        elif cfg.name == "tad":
            seg = segment_ids if cfg.per_document else None
            b_div, g_div = tad(z_s, z_t, mask, cfg.k, cfg.beta, segment_ids=seg, temperature=tau, dz_s=dz_s,
                               dz_t=dz_t)
        else:
            raise ValueError(f"no bound for {cfg.name!r}")
        b_div = torch.where(mask, b_div, 0.0) / SAFETY
        g_div = torch.where(mask[..., None], g_div, 0.0) / SAFETY / tau
    total = (cw * ce.sum() + dw * torch.where(mask, div, 0.0).sum()) / n
    (G,) = torch.autograd.grad(total, zz)
    ce, div = ce.detach(), torch.where(mask, div.detach(), 0.0)
    acc = U * n_eff(n)
    e_clm = b_ce.sum() + acc * ce.abs().sum()
    e_div = b_div.sum() + acc * div.abs().sum()
    out = {
        "clm": e_clm / n + U * ce.sum().abs() / n,
        "div": e_div / n + U * div.sum().abs() / n,
        "loss": (cw * e_clm + dw * e_div) / n + 3 * U * (cw * ce.abs().sum() + dw * div.abs().sum()) / n,
    }
    dG = (cw * torch.where(mask[..., None], g_ce, 0.0) + dw * g_div) / n + 3 * U * G.abs()
    # the transform's derivative, recomputed in float32 from the rounded logits
    if spec_s.softcap is None:
        c, dc = torch.full_like(z_s, spec_s.scale), torch.zeros_like(z_s)
    else:
        tt = z_s / spec_s.softcap
        c = spec_s.scale * (1 - tt.square())
        dc = abs(spec_s.scale) * (2 * tt.abs() * (dz_s[..., None] / spec_s.softcap + U * tt.abs()) + 3 * U)
    G_u = G * c
    dG_u = dG * c.abs() + G.abs() * dc + U * G_u.abs()
    w = w_s.detach().double()[:V]
    h = h_s.detach().double()
    out["h"] = dG_u @ w.abs() + gamma(V) * (G_u.abs() @ w.abs())
    flat_dG, flat_G, flat_h = dG_u.reshape(-1, V), G_u.reshape(-1, V), h.reshape(-1, h.shape[-1])
    rows = w_s.shape[0]
    out["w"] = torch.zeros(rows, h.shape[-1], dtype=torch.float64)
    out["w"][:V] = flat_dG.T @ flat_h.abs() + gamma(n) * (flat_G.abs().T @ flat_h.abs())
    out["b"] = torch.zeros(rows, dtype=torch.float64)
    out["b"][:V] = flat_dG.sum(0) + gamma(n) * flat_G.abs().sum(0)
    return {key: SAFETY * value for key, value in out.items()}


def _sparse64(sp):
    """A `SparseTeacher` with float64 tensors (the exact values of its float32 entries)."""
    from tailkd.divergences import SparseTeacher

    def f(x):
        return None if x is None else (x.double() if x.is_floating_point() else x)

    return SparseTeacher(*(f(x) for x in sp))


def cache_tad(s, sparse, mask, *, loss="tad", beta=2.0, segment_ids=None, dz_s=None):
    """`Divergence.sparse_per_token` (and the chunked path's `divergences.SPARSE`) from a top-K cache with tail support
    points, its float32 inputs exact: D_KL1 = `topk_bucket_kl` with the cached α^T (its bound), plus the tail term
    as `divergences.sparse_tail_points` computes it, W·(Σ_j ŵ_j(log p_j − log q_j) − B): W = w_X·α^T and ŵ_j =
    w_j/α^T each one float32 rounding of a float64 value (u; float64's own error, ~T·2⁻⁵³ for the log-space mean ᾱ,
    is far below; ŵ_j may also be sub-normal: 2⁻¹⁴⁹ absolute), log q_j = s_j − lse(s) (κ + u|lse| + u|log q_j|),
    B = log α^T − log α^S with log α^S = lse(tail) − lse (two u·M terms), w_X = β/ᾱ or 1. Gradient: D_KL1's plus
    W(q_i Σŵ + Σ_{j: id_j = i} ŵ_j + q̃_i + q_i) with the lse backward's relative error, and the rounding of the
    coefficient W − α^T of q̃. Exact where α^T and the w_j are below float32's range (tails ~100 nats below 𝒦)."""
    Q = _Dist(s, 1.0, dz_s)
    ids = sparse.topk_ids.long()
    alpha = sparse.log_tail_mass.double().exp()
    value, grad = topk_bucket_kl(s, ids, sparse.topk_logprobs, tail_mass=alpha)
    if dz_s is not None:  # the student logits' own error enters topk_bucket_kl's log q like the log-sum-exps
        extra_v, extra_g = _dz_topk(Q, ids, sparse.topk_logprobs.double(), alpha)
        value, grad = value + SAFETY * extra_v, grad + SAFETY * extra_g
    valid = mask.bool()
    if sparse.tail_ids is None:
        return torch.where(valid, value, 0.0), torch.where(valid[..., None], grad, 0.0)
    lat = sparse.log_tail_mass.double()
    has = lat > -math.inf
    tids, tlp = sparse.tail_ids.long(), sparse.tail_logprobs.double()
    tw = torch.where(has[..., None], (sparse.tail_log_weights.double() - lat[..., None]).exp(), 0.0)  # ŵ_j
    top = torch.zeros_like(Q.w, dtype=torch.bool).scatter(-1, ids, True)
    (lse, e_lse), (lse_t, e_lse_t) = Q.lse(), Q.lse(~top)
    lq_j = Q.z.gather(-1, tids) - lse[..., None]
    e_lq_j = e_lse[..., None] + U * lq_j.abs() + Q._scaling(extra_M=False)
    d_j = tlp - lq_j
    J = tids.shape[-1]
    tail_sum = torch.where(tw > 0, tw * d_j, 0.0).sum(-1)  # Σ_j ŵ_j d_j
    d_tail_sum = torch.where(tw > 0, tw * (e_lq_j + U * (4 + n_eff(J)) * d_j.abs()) + F32_SUBNORMAL * d_j.abs(),
                             0.0).sum(-1)
    las = lse_t - lse
    e_las = e_lse + e_lse_t + U * _abs_finite(las)
    spread = torch.where(has, lat - las, 0.0)  # B = log(α^T/α^S)
    d_spread = torch.where(has, e_las + U * spread.abs(), 0.0)
    tail = tail_sum - spread
    if loss == "tad":
        log_abar = _seq_log_mean(lat, valid, segment_ids)
        log_beta = math.log(beta) if beta > 0 else -math.inf
        big_w = torch.where(has & (log_abar > -math.inf), (log_beta - log_abar + lat).exp(), 0.0)  # W
    else:
        big_w = torch.where(has, alpha, 0.0)
    value = value + SAFETY * (big_w * (d_tail_sum + d_spread + U * tail.abs()) + 5 * U * (big_w * tail).abs())
    lq_tilde, _, back_q_tilde = Q.log_ratio(~top)
    back_q = Q.kappa + U * _abs_finite(Q.l) + 3 * U + Q._scaling()
    hits = torch.zeros_like(Q.w).scatter_add(-1, tids, tw)
    q_tilde = lq_tilde.exp()
    sum_w = tw.sum(-1, keepdim=True)
    G = (Q.w * sum_w * (back_q + (4 + n_eff(J)) * U) + hits * 5 * U + q_tilde * (back_q_tilde + 4 * U)
         + Q.w * (back_q + 4 * U))
    grad = grad + SAFETY * (big_w[..., None] * G + U * alpha[..., None] * q_tilde)
    return torch.where(valid, value, 0.0), torch.where(valid[..., None], grad, 0.0)


def _dz_topk(Q: _Dist, ids, lp, alpha):
    """The part of topk_bucket_kl's error due to a logit error dz (2dz on every log q, dz on each log-sum-exp)."""
    dz = Q.dz if isinstance(Q.dz, torch.Tensor) else torch.zeros_like(Q.w[..., :1])
    p = lp.exp()
    top = torch.zeros_like(Q.w, dtype=torch.bool).scatter(-1, ids, True)
    q_tilde = _renorm(Q.z, top).exp()
    value = (p.sum(-1, keepdim=True) * 2 * dz)[..., 0] + alpha * 2 * dz[..., 0]
    return value, (Q.w + alpha[..., None] * (q_tilde + Q.w)) * 2 * dz


def topk_input_shift(s, ids, logprobs, d_logprobs, d_alpha):
    """First-order bound on how much D_KL1 (`topk_bucket_kl`) and its gradient move when the cached top-K
    log-probabilities are off by at most `d_logprobs` [..., K] and α^T by `d_alpha` [...] (absolute): ∂D/∂log p_k =
    p_k(log p_k/q_k + 1), ∂D/∂α^T = log(α^T/α^S) + 1; the gradient q_j(Σp + α) − p_j𝟙_𝒦 − α(q̃_j − q_j) moves by
    q_j(Σ Δp + Δα) + Δp_j + Δα(q̃_j + q_j), Δp_k = p_k·d_logprobs_k. Returns SAFETY × (value [...], grad [..., V])."""
    z = s.detach().double()
    lq = torch.log_softmax(z, -1)
    lp = logprobs.detach().double()
    p = lp.exp()
    alpha = (-torch.expm1(torch.logsumexp(lp, -1))).clamp_min(1e-300)
    top = torch.zeros_like(lq, dtype=torch.bool).scatter(-1, ids, True)
    las = torch.logsumexp(torch.where(top, NEG_INF, z), -1) - torch.logsumexp(z, -1)
    dp = p * d_logprobs
    value = (dp * ((lp - lq.gather(-1, ids)).abs() + 1)).sum(-1) + d_alpha * ((alpha.log() - las).abs() + 1)
    q, q_tilde = lq.exp(), _renorm(z, top).exp()
    da = d_alpha[..., None]
    grad = q * (dp.sum(-1, keepdim=True) + da) + torch.zeros_like(q).scatter(-1, ids, dp) + da * (q_tilde + q)
    return SAFETY * value, SAFETY * grad


def lm_logits_err(model, input_ids, vocab=None):
    """(final hidden h [B, T, d], per-token bounds on its float32 error [B, T] and on the float32 logits' [B, T]) of
    `model` on `input_ids`, from `bounds.f32_forward_rel` (a model: random-walk roundings along `decoder_fan_in` terms,
    unit-condition layers): hidden: rel(N_hidden)·max|h|; logits: rel(N)·max_v (|h|·|W_v|)."""
    from bounds import decoder_fan_in, f32_forward_rel

    from tailkd import head as head_mod

    with torch.no_grad():
        h = head_mod.final_hidden(model, input_ids)
    head = head_mod.model_head(model, vocab)
    w = head.weight.detach().double()[: head.spec.vocab_size]
    seq = input_ids.shape[-1]
    mag = h.double().abs() @ w.abs().T * abs(head.spec.scale)
    rel_h = f32_forward_rel(decoder_fan_in(model.config, seq, head=False))
    rel_z = f32_forward_rel(decoder_fan_in(model.config, seq))
    return h, rel_h * h.double().abs().amax(-1), rel_z * mag.amax(-1)


def tad_teacher_sensitivity(s, h_t, head_t, mask, k, beta, segment_ids=None, n=1):
    """∂(Σ_valid L_DIV / n)/∂h_T [B, T, d] in float64: TAD of student logits `s` and teacher logits apply_head(h_T),
    differentiable in the teacher (β(X) = β/ᾱ included; 𝒦 fixed), for first-order / random-walk bounds of a
    perturbation of the teacher's hidden states (e.g. their bf16 rounding)."""
    V = head_t.spec.vocab_size
    h = h_t.detach().double().clone().requires_grad_(True)
    w = head_t.weight.detach().double()[:V]
    t = h @ w.T
    if head_t.bias is not None:
        t = t + head_t.bias.detach().double()[:V]
    t = t * head_t.spec.scale
    if head_t.spec.softcap is not None:
        t = head_t.spec.softcap * torch.tanh(t / head_t.spec.softcap)
    z = s.detach().double()
    lp, lq = torch.log_softmax(t, -1), torch.log_softmax(z, -1)
    top = torch.zeros_like(lq, dtype=torch.bool).scatter(-1, torch.topk(t.detach(), k, dim=-1).indices, True)
    p = lp.exp()
    d = lp - lq
    alpha_t = torch.where(top, 0.0, p).sum(-1)
    log_alpha_s = _lse(z, ~top) - _lse(z)
    bucket = alpha_t * (alpha_t.log() - log_alpha_s)
    d_kl1 = torch.where(top, p * d, 0.0).sum(-1) + bucket
    tail = torch.where(top, 0.0, p * d).sum(-1) - bucket  # α^T·D_KL2
    valid = mask.bool()
    a = torch.where(valid, alpha_t, 0.0)
    same = (torch.ones_like(valid[:, :, None] & valid[:, None, :]) if segment_ids is None
            else segment_ids[:, :, None] == segment_ids[:, None, :]) & valid[:, None, :]
    abar = (same * a[:, None, :]).sum(-1) / same.sum(-1).clamp_min(1)
    loss = torch.where(valid, d_kl1 + beta / abar * tail, 0.0).sum() / n
    (g,) = torch.autograd.grad(loss, h)
    return g


def heldout_bounds(s_logits, t_logits, labels, dz_s, dz_t, bins=None):
    """Bounds on how far `tailkd.evaluate`'s held-out metrics can move between TWO float32 evaluations whose logits are
    each within dz_s, dz_t [..] (per token) of the same exact logits `s_logits`, `t_logits` [.., V] (labels −100 are
    skipped). The float64 sums and the final divisions are negligible (u64).
    - kl, rkl: 2 × the mean of LB.forward_kl / reverse_kl (with the logits' error); student/teacher_clm: 2 × the mean
      of the log-softmax bound at the label (κ + 2u|log q_y| + 2dz); ppl: ppl · Δclm;
    - agreement, acc: an argmax can change only where the top-2 log-probability gap is within twice its bound: the
      share of such tokens;
    - Full-ECE, ECE: the continuous part, (1/N) Σ |Δq| (each q within q·rel of exact, twice), plus 2/N for every
      probability (or top-1 confidence) within its perturbation of a bin edge (it may change bins: two bin sums move by
      <= 1 each), plus the argmax changes for top-1 hits."""
    mask = labels != -100
    s, t, y = s_logits.detach().double()[mask], t_logits.detach().double()[mask], labels[mask]
    dz_s, dz_t = dz_s.detach().double()[mask], dz_t.detach().double()[mask]
    N = s.shape[0]
    Q, P = _Dist(s, 1.0, dz_s), _Dist(t, 1.0, dz_t)
    out = {"tokens": 0.0}
    out["kl"] = 2 * float(forward_kl(s, t, dz_s=dz_s, dz_t=dz_t)[0].mean())
    out["rkl"] = 2 * float(reverse_kl(s, t, dz_s=dz_s, dz_t=dz_t)[0].mean())
    for who, D in (("student", Q), ("teacher", P)):
        label_lp = D.l.gather(-1, y[:, None])[:, 0]
        out[f"{who}_clm"] = 2 * SAFETY * float(D.err.gather(-1, y[:, None]).mean())
        out[f"{who}_ppl"] = float(torch.exp(-label_lp.mean())) * out[f"{who}_clm"]
    top2 = {}
    for who, D in (("student", Q), ("teacher", P)):
        v, i = D.l.topk(2, dim=-1)
        margin = 2 * SAFETY * (D.err.gather(-1, i)).sum(-1)
        top2[who] = (v[:, 0] - v[:, 1]) <= margin
        out[f"{who}_acc"] = float(top2[who].double().mean())
    out["agreement"] = float((top2["student"] | top2["teacher"]).double().mean())
    if bins:
        edges = torch.arange(1, bins, dtype=torch.float64) / bins
        for who, D in (("student", Q), ("teacher", P)):
            dq = 2 * SAFETY * D.w * D.rel
            near = ((D.w[..., None] - edges).abs() <= dq[..., None]).any(-1)
            out[f"{who}_full_ece"] = float(dq.sum() / N + 2 * near.sum() / N)
            conf, pred = D.w.max(-1)
            dconf = dq.gather(-1, pred[:, None])[:, 0]
            near_conf = ((conf[:, None] - edges).abs() <= dconf[:, None]).any(-1)
            out[f"{who}_ece"] = float((dconf.sum() + 2 * near_conf.sum() + top2[who].sum()) / N)
    return out


def model_logits(model, input_ids, vocab):
    """Float32 logits [B, T, V] of `model` (no grad) and the per-token forward-error bound of `lm_logits_err`."""
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[..., :vocab]
    return logits, lm_logits_err(model, input_ids, vocab)[2]


def two_forwards_heldout_bounds(student, teacher, batch, vocab, bins=10):
    """Held-out metrics of the same rows from two float32 forwards (another batch size, process, device, ...): each
    forward within `lm_logits_err`'s model, the metrics then within `heldout_bounds`. `batch` = all the rows."""
    s, dz_s = model_logits(student, batch["input_ids"], vocab)
    t, dz_t = model_logits(teacher, batch["input_ids"], vocab)
    return heldout_bounds(s, t, batch["labels"], dz_s, dz_t, bins)
