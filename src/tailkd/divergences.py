"""The maths of each divergence, once: teacher-side row statistics, per-row value, closed-form logit gradient.

Rows are token positions. For every divergence with a closed-form gradient there is one `RowKernel` of three plain
functions, used unchanged by every path that computes it:

- ``teacher(t) -> T``: the teacher side of rows from the teacher's temperature-scaled logits t [n, V] (t is
  CONSUMED: its buffer is reused), e.g. log p and p, or for TAD the top-K split and the tail mass α^T. A top-K
  teacher cache gives a `SparseTeacher` instead (see `SPARSE`).
- ``forward(s, logq, T, w) -> (value [n], state)``: the per-row divergence from the student's scaled logits
  s [n, V] and logq = log_softmax(s) (logq is CONSUMED), with an optional per-row weight w [n] (TAD's: log β(X)
  = log β − log ᾱ(X) in float64, a sequence statistic computed by the caller from the rows' α^T in log space; the
  top-K cache's, `SPARSE`: log β(X) too for TAD, 0 (w = 1) for KD, read only with tail points).
- ``backward(state, cd, cq, inplace=True) -> G [n, V] = cd·∂D/∂s + cq·q`` for per-row coefficients cd, cq [n] (cq
  may be None). ``inplace``: G is written into a state buffer (the chunked layer: one [n, V] allocation fewer);
  False leaves the state intact, so that backward can run again (autograd with ``retain_graph``, gradcheck).
  ``cq·q`` lets a caller fold the student's CLM softmax into the same buffer (the chunked layer does, at τ = 1).

Callers: `tailkd.losses` (the dense per-token functions, through one autograd Function), `tailkd.fused` (the
chunked LM-head layer: teacher → forward → backward per chunk, never [N, V] at once) and the top-K cache path (a
sparse teacher, dense or chunked student). A divergence's knobs (TAD's K, JSD's β) are bound when its kernel is
made (`tad_kernel`, `jsd_kernel`).

Conventions (``docs/formulas.md``; p = teacher, q = student at temperature τ; 𝒦 = the teacher's top-K):
- 0·log 0 = 0: an entry where the weighting distribution is 0 contributes 0 with a finite gradient; a row with a
  NaN logit (either side) gives NaN, so that the trainer sees it and skips the step;
- tail masses are summed over the tail itself (α^T = Σ_{i∉𝒦} p_i), never 1 − Σ top-K, which cancels when the top-K
  holds almost all the mass; a student tail sum that underflows is redone in log space.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

_INF = float("inf")


class RowKernel(NamedTuple):
    """A divergence's row maths: ``teacher``, ``forward``, ``backward`` (see the module docstring)."""

    teacher: Callable[..., Any]
    forward: Callable[..., tuple[torch.Tensor, Any]]
    backward: Callable[..., torch.Tensor]


# --------------------------------------------------------------------------- shared row helpers


def lse(x: torch.Tensor) -> torch.Tensor:
    """log Σ exp over the last dim, [n]; −inf (not NaN) for an all −inf row."""
    m = x.amax(-1, keepdim=True)  # [n, 1]
    m = torch.where(torch.isfinite(m), m, 0.0)
    return (x - m).exp_().sum(-1).log_().add_(m.squeeze(-1))  # [n]


def teacher_top_ids(t: torch.Tensor, k: int, block: int = 64) -> torch.Tensor:
    """Ids [..., K] of the k largest teacher logits t [..., V] (= largest p), in no particular order: 𝒦.

    Two-stage when 64 divides V (all common LM vocabularies) and V/64 > 4k: block maxima (one vectorised read),
    the k blocks with the largest maxima (they hold every top-k entry), then top-k among those k·64 candidates; 2-3x
    cheaper than torch.topk over V on CPU. Otherwise torch.topk. Ties at the k-th value are resolved by this selection
    (deterministic, implementation-defined): 𝒦 is then one of the valid top-k sets. The dense and chunked torch paths
    use this one (a top-K cache holds torch.topk's set, `tailkd.cache`); the Triton kernels take the smaller ids on
    such a tie (`tailkd.kernels`), another valid set.
    """
    vocab = t.shape[-1]
    n_blocks = vocab // block
    if vocab % block or n_blocks <= 4 * k:
        return torch.topk(t, k, dim=-1, sorted=False).indices
    flat = t.reshape(-1, vocab)  # [N, V]
    block_max = flat.unflatten(-1, (n_blocks, block)).amax(-1)  # [N, V/64]
    top_blocks = torch.topk(block_max, k, dim=-1, sorted=False).indices  # [N, K]
    cols = (top_blocks[..., None] * block + torch.arange(block, device=t.device)).flatten(1)  # [N, K*64]
    best = torch.topk(flat.gather(-1, cols), k, dim=-1, sorted=False).indices  # [N, K]
    return cols.gather(-1, best).view(*t.shape[:-1], k)


def kl_sum(w: torch.Tensor, log_w: torch.Tensor, log_v: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i (log w_i − log v_i) per row [n], CONSUMING log_w (no [n, V] allocation).

    0·log 0 = 0: rows where a zero weight meets −inf logs (NaN products) are redone with explicit masking; rows in
    ``poisoned`` [n] (NaN inputs) stay NaN."""
    out = log_w.sub_(log_v).mul_(w).sum(-1)  # [n]
    bad = torch.isnan(out) & ~poisoned
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        out[rows] = torch.where(w[rows] > 0, log_w[rows], 0.0).sum(-1)
    return out


def _tiny(dtype: torch.dtype) -> float:
    """Below this a tail mass summed in linear space has lost its precision (subnormal summands): redo in log space."""
    return 1e-30 if dtype != torch.float64 else 1e-290


def student_tail(s: torch.Tensor, logq: torch.Tensor, ids: torch.Tensor):
    """From logq [n, V] (consumed into q, zeroed on 𝒦): (q on the tail [n, V], q_top [n, K], logq_top, log α^S [n]).

    α^S = Σ_{i∉𝒦} q_i summed over the tail; rows where it is tiny (< 1e-30 in float32: subnormal summands) redo
    log α^S = lse(tail logits) − lse(logits) in log space."""
    logq_top = logq.gather(-1, ids)  # [n, K]
    q = logq.exp_()  # [n, V]
    q_top = q.gather(-1, ids)
    q.scatter_(-1, ids, 0.0)  # [n, V] student tail
    alpha_s = q.sum(-1)  # [n]
    log_as = alpha_s.log()
    small = alpha_s < _tiny(s.dtype)
    if bool(small.any()):
        rows = small.nonzero().squeeze(1)
        log_as[rows] = lse(s[rows].scatter(-1, ids[rows], -_INF)) - lse(s[rows])
    return q, q_top, logq_top, log_as


def tail_log_softmax_(tail: torch.Tensor) -> torch.Tensor:
    """log q̃ = log q − log α^S [n, V], the student's log-softmax over its tail, in place over ``tail`` (its logits,
    −inf on 𝒦): as (s − m) − log S, torch's log_softmax formula — s − (m + log S) carries the rounding u·|m| of that
    sum into log q̃ (6e-4 at logits ~1e4), and log q − lse(log q) the rounding u·|log α^S| of each log q. NaN on a row
    without tail."""
    m = tail.amax(-1, keepdim=True)
    tail.sub_(torch.where(torch.isfinite(m), m, 0.0))
    return tail.sub_(lse(tail)[:, None])


def tail_softmax_(tail: torch.Tensor) -> torch.Tensor:
    """q̃ = q/α^S [n, V], the student's softmax over its tail, in place over ``tail`` (`tail_log_softmax_`)."""
    return tail_log_softmax_(tail).exp_()


def rest_bucket(alpha_t: torch.Tensor, log_at: torch.Tensor, log_as: torch.Tensor) -> torch.Tensor:
    """The rest bucket α^T log(α^T/α^S) per row; 0 where α^T = 0."""
    return torch.where(alpha_t > 0, alpha_t * (log_at - log_as), 0.0)


def tad_tiny_rows(alpha_t, log_alpha_t, poisoned, log_w, dtype) -> torch.Tensor:
    """TAD's rows computed in log space [n]: α^T below `_tiny` (its linear tail sum has lost its precision) but not
    an empty tail (α^T = 0 exactly, log α^T = −inf: tail term 0, gradient q − p, p̃ undefined), a finite row, and a
    positive weight (log w > −inf). Used by the torch path (`_tad_forward`); the Triton kernels compute the same per
    row (`kernels._tad_row`)."""
    return (alpha_t < _tiny(dtype)) & torch.isfinite(log_alpha_t) & ~poisoned & (log_w > -_INF)


def tad_tiny_weight(log_w, log_alpha_t, dtype) -> torch.Tensor:
    """W = w·α^T = exp(log w + log α^T) [n], in float64 (w = β/ᾱ is beyond float64 where every tail of the sequence
    is beyond ~708 nats; W is at most β·n): TAD's tiny rows' weight, and the top-K cache's (`sparse_tail_points`)."""
    return (log_w.double() + log_alpha_t.double()).exp().to(dtype)


def tad_weight(log_w, alpha_t, tiny, dtype) -> torch.Tensor:
    """The weight w = β(X) [n] of the linear-space rows: 0 on the tiny rows (their weight is W, `tad_tiny_weight`)
    and where α^T = 0 (no tail: the value and gradient do not depend on w, which may be beyond float64 there)."""
    return torch.where(tiny | (alpha_t == 0), 0.0, log_w.double().exp()).to(dtype)


def tad_gradient_form(alpha_t, log_at, log_as, tiny, w):
    """(α^T/α^S [n], the rows whose tail gradient takes the q̃/p̃ form of `_tad_backward` [n]): α^S underflowed
    (the ratio is not finite or above 1e30, or w times it is: the tail coefficient 1 + (w − 1)·α^T/α^S, with w =
    β(X) up to ~1e30 where α^T is small, would overflow and meet q_i = 0) or α^T is tiny. ``log_at``: log α^T, any
    finite value where α^T = 0; ``w`` [n]: the row weight of `tad_weight`."""
    ratio = torch.where(alpha_t > 0, (log_at - log_as).exp(), 0.0)
    big = w.double() * ratio.double() > 1e30  # float64: the product itself may be beyond float32
    return ratio, (~torch.isfinite(ratio)) | (ratio > 1e30) | big | tiny


def _poison(value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.where(rows, torch.nan, value)


# --------------------------------------------------------------------------- dense teacher: log p and p


class Dense(NamedTuple):
    """Teacher rows: log p [n, V] (a buffer the kernels consume), p [n, V], NaN rows [n]."""

    logp: torch.Tensor
    p: torch.Tensor
    nan: torch.Tensor


def dense_teacher(t: torch.Tensor) -> Dense:
    logp = torch.log_softmax(t, dim=-1)  # [n, V]
    p = torch.exp(logp, out=t)  # [n, V] into t's buffer: one [n, V] allocation fewer
    return Dense(logp, p, logp[:, 0].isnan())


# --------------------------------------------------------------------------- forward KL (vanilla KD)


def _kl_forward(s, logq, teacher: Dense, w=None):
    """KL(p‖q) = Σ_i p_i (log p_i − log q_i)."""
    poisoned = teacher.nan | logq[:, 0].isnan()
    value = kl_sum(teacher.p, teacher.logp, logq, poisoned)  # teacher.logp consumed
    return _poison(value, poisoned), (logq, teacher.p)


def _kl_backward(state, cd, cq, inplace=True):
    """∂KL/∂s = q − p."""
    logq, p = state
    q = logq.exp_() if inplace else logq.exp()
    g = q.mul_((cd if cq is None else cd + cq)[:, None])
    return g.addcmul_(p, cd[:, None], value=-1.0)


KL = RowKernel(dense_teacher, _kl_forward, _kl_backward)


# --------------------------------------------------------------------------- reverse KL


def _rkl_forward(s, logq, teacher: Dense, w=None):
    """KL(q‖p) = Σ_i q_i (log q_i − log p_i)."""
    poisoned = teacher.nan | logq[:, 0].isnan()
    q = logq.exp()  # [n, V]
    fq = logq.sub_(teacher.logp).mul_(q)  # [n, V] q log(q/p) (logq consumed)
    value = fq.sum(-1)
    bad = torch.isnan(value) & ~poisoned
    if bool(bad.any()):  # q = 0 against log p = −inf: 0·log 0
        rows = bad.nonzero().squeeze(1)
        fq[rows] = torch.where(q[rows] > 0, fq[rows], 0.0)
        value[rows] = fq[rows].sum(-1)
    return _poison(value, poisoned), (fq, q, value)


def _rkl_backward(state, cd, cq, inplace=True):
    """∂KL(q‖p)/∂s_i = q_i (log(q_i/p_i) − KL(q‖p))."""
    fq, q, value = state
    coef = -cd * value if cq is None else cq - cd * value
    g = fq.mul_(cd[:, None]) if inplace else fq * cd[:, None]
    return g.addcmul_(q, coef[:, None])


RKL = RowKernel(dense_teacher, _rkl_forward, _rkl_backward)


# --------------------------------------------------------------------------- generalized JSD


JSD_RESCALE = 2.0**100  # `jsd_log_mix`: p, q, β and 1 − β times this are normal (>= 2^-49); where m rounds to 0
# (β p, (1 − β) q < 2^-149) the products of two of them lie in [2^-98, 2^51]: the mixture is exact to 3u


def jsd_log_mix(p: torch.Tensor, q: torch.Tensor, bj: float) -> torch.Tensor:
    """log m = log(β p + (1 − β) q) [n, V], the mixture of `_jsd_forward` for the rows given: where m rounds to 0
    although p or q is not 0 (sub-normal p, q: float32's 2^-149 times 0.5 is 0), from p, q, β and 1 − β each times
    `JSD_RESCALE` (exact), minus the log of its square (β·(p·2^100) alone is 0 again below β ~2^-100·2^-149/p);
    −inf only where p = q = 0. The Triton kernel (`kernels._dense_kernel`) does the same. β and 1 − β are the
    scalars (never (1 − β)/β, which overflows float32 for β below ~2.9e-39)."""
    m = torch.mul(p, bj).add_(q, alpha=1 - bj)
    under = m == 0
    big = torch.mul(p * JSD_RESCALE, bj * JSD_RESCALE).add_(q * JSD_RESCALE, alpha=(1 - bj) * JSD_RESCALE)
    return torch.where(under, big.log_().sub_(2 * math.log(JSD_RESCALE)), m.log_())


def _jsd_forward(s, logq, teacher: Dense, w, bj: float):
    """JSD_β = β KL(p‖m) + (1 − β) KL(q‖m), m = βp + (1 − β)q, 0 < β < 1. JSD_β <= log 2: where m of an entry
    rounds to 0 while p or q does not (sub-normal probabilities), log m is taken from rescaled p, q (`jsd_log_mix`)."""
    poisoned = teacher.nan | logq[:, 0].isnan()
    q = logq.exp()  # [n, V]
    log_m = torch.mul(teacher.p, bj).add_(q, alpha=1 - bj).log_()  # [n, V]
    fq = logq.sub_(log_m).mul_(q)  # [n, V] q log(q/m) (logq consumed)
    kl_qm = fq.sum(-1)  # [n]: not finite exactly where an entry is not (a finite entry's |q log(q/m)| <= max(1/e,
    bad = ~torch.isfinite(kl_qm)  # −log(1 − β)) < 37: no row sum overflows), so the check reads [n], not [n, V]
    if bool(bad.any()):  # 0·log 0 (NaN: q = 0 against −inf), or +inf/NaN where m underflowed
        rows = bad.nonzero().squeeze(1)
        log_m[rows] = lm = jsd_log_mix(teacher.p[rows], q[rows], bj)
        fq[rows] = torch.where(q[rows] > 0, (torch.log_softmax(s[rows], -1) - lm) * q[rows], 0.0)
        kl_qm[rows] = fq[rows].sum(-1)
    value = bj * kl_sum(teacher.p, teacher.logp, log_m, poisoned)
    del log_m
    value = value + (1 - bj) * kl_qm
    return _poison(value, poisoned), (fq, q, kl_qm, bj)


def _jsd_backward(state, cd, cq, inplace=True):
    """∂JSD_β/∂s_i = (1 − β) q_i (log(q_i/m_i) − KL(q‖m))."""
    fq, q, kl_qm, bj = state
    c = cd * (1 - bj)
    coef = -c * kl_qm if cq is None else cq - c * kl_qm
    g = fq.mul_(c[:, None]) if inplace else fq * c[:, None]
    return g.addcmul_(q, coef[:, None])


def jsd_kernel(beta: float) -> RowKernel:
    """Generalized JSD with mixing β; the degenerate endpoints are special-cased as in TRL / Liger: β = 0 is forward
    KL(p‖q), β = 1 reverse KL(q‖p)."""
    if beta == 0:
        return KL
    if beta == 1:
        return RKL
    return RowKernel(dense_teacher, lambda s, logq, teacher, w=None: _jsd_forward(s, logq, teacher, w, beta),
                     _jsd_backward)


# --------------------------------------------------------------------------- TAD (paper Eq. 2-3, 5-6)


class TopK(NamedTuple):
    """Teacher rows split at its top-K 𝒦: ids [n, K]; log p [n, V] (consumed by the kernels); p on the tail only
    [n, V]; p, log p on 𝒦 [n, K]; α^T = Σ_{i∉𝒦} p_i [n] and log α^T [n] (from the tail's log-sum-exp where α^T is
    too small for a linear sum: callers average exp(log α^T) in float64 for ᾱ); NaN rows [n]."""

    ids: torch.Tensor
    logp: torch.Tensor
    p_tail: torch.Tensor
    p_top: torch.Tensor
    logp_top: torch.Tensor
    alpha: torch.Tensor
    log_alpha: torch.Tensor
    nan: torch.Tensor


def topk_teacher(t: torch.Tensor, k: int) -> TopK:
    """𝒦 = `teacher_top_ids` and the split of p; α^T summed over the tail itself."""
    ids = teacher_top_ids(t, k)  # [n, K]
    logp = torch.log_softmax(t, dim=-1)  # [n, V]
    p = torch.exp(logp, out=t)  # [n, V] into t's buffer
    p_top, logp_top = p.gather(-1, ids), logp.gather(-1, ids)  # [n, K]
    p.scatter_(-1, ids, 0.0)  # [n, V] the teacher tail
    alpha = p.sum(-1)  # [n]
    log_alpha = alpha.log()
    tiny = alpha < _tiny(t.dtype)  # sub-normal summands (or none left): log α^T in log space
    if bool(tiny.any()):
        rows = tiny.nonzero().squeeze(1)
        log_alpha[rows] = lse(logp[rows].scatter(-1, ids[rows], -_INF))
    return TopK(ids, logp, p, p_top, logp_top, alpha, log_alpha, logp[:, 0].isnan())


def _tad_forward(s, logq, teacher: TopK, log_w):
    """L_DIV = D_KL1 + w·α^T·D_KL2 with w = β(X) per row, given as log w [n] (float64: β/ᾱ overflows float64 where
    every tail of the sequence is beyond ~708 nats). α^T·D_KL2 = Σ_{i∉𝒦} p_i log(p_i/q_i) − α^T log(α^T/α^S) is
    summed over the tail (one pass over V, as KL; never KL − D_KL1); where α^T itself is below `_tiny` (1e-30 in
    float32) but not 0, W = w·α^T = exp(log w + log α^T) and D_KL2 = KL(p̃‖q̃) are computed in log space instead.
    w = 1 (log w = 0) gives KL(p‖q); log w = −inf (β = 0) D_KL1, also where D_KL2 = +inf."""
    poisoned = teacher.nan | logq[:, 0].isnan()
    tiny = tad_tiny_rows(teacher.alpha, teacher.log_alpha, poisoned, log_w, s.dtype)
    small = None
    if bool(tiny.any()):  # before logp and logq are consumed: log p̃ and log q̃ of those rows
        rows = tiny.nonzero().squeeze(1)
        ids_r = teacher.ids[rows]
        log_pt = teacher.logp[rows].scatter(-1, ids_r, -_INF) - teacher.log_alpha[rows, None]  # [r, V] log p̃
        log_qt = tail_log_softmax_(s[rows].scatter(-1, ids_r, -_INF))  # [r, V] log q̃ from the tail logits alone
        p_tilde = log_pt.exp()
        d_kl2 = torch.where(p_tilde > 0, p_tilde * (log_pt - log_qt), 0.0).sum(-1)  # [r] KL(p̃‖q̃)
        big_w = tad_tiny_weight(log_w[rows], teacher.log_alpha[rows], s.dtype)  # [r] W = β(X)·α^T
        small = (rows, p_tilde, big_w, d_kl2)
    tail_kl = kl_sum(teacher.p_tail, teacher.logp, logq, poisoned)  # [n] (p is 0 on 𝒦); teacher.logp consumed
    q, q_top, logq_top, log_as = student_tail(s, logq, teacher.ids)  # logq consumed
    p_top, alpha_t = teacher.p_top, teacher.alpha
    top = torch.where(p_top > 0, p_top * (teacher.logp_top - logq_top), 0.0).sum(-1)  # [n] Σ_{k∈𝒦} p_k log(p_k/q_k)
    log_at = torch.log(torch.where(alpha_t > 0, alpha_t, 1.0))
    bucket = rest_bucket(alpha_t, log_at, log_as)  # [n] α^T log(α^T/α^S)
    tail = torch.where(torch.isfinite(bucket), tail_kl - bucket, 0.0)  # [n] α^T·D_KL2
    wd = tad_weight(log_w, alpha_t, tiny, s.dtype)  # [n] (the tiny rows' weight is W, applied below)
    value = top + bucket + torch.where(log_w > -_INF, wd * tail, 0.0)  # log w = −inf (β = 0): no tail term, not
    # 0·inf = NaN where D_KL2 = +inf (a student −inf where the teacher's tail has mass)
    if small is not None:
        rows, _, big_w, d_kl2 = small
        value[rows] = top[rows] + bucket[rows] + big_w * d_kl2
    kept = teacher._replace(logp=None)  # its log p was consumed above: not held until backward
    return _poison(value, poisoned), (s, q, kept, q_top, log_at, log_as, wd, small)


def _tad_backward(state, cd, cq, inplace=True):
    """Eq. 5/6: q_k − p_k on 𝒦; q_i (1 + (w − 1) α^T/α^S) − w p_i = q_i + (W − α^T) q̃_i − W p̃_i on the tail
    (W = w·α^T, q̃ = q/α^S, p̃ = p/α^T): the second form, with q̃ from the tail logits, where α^S underflowed (also
    relative to W: w·α^T/α^S above 1e30) or α^T is sub-normal."""
    s, q, teacher, q_top, log_at, log_as, w, small = state
    ids, p, p_top, alpha_t = teacher.ids, teacher.p_tail, teacher.p_top, teacher.alpha
    cq0 = torch.zeros_like(cd) if cq is None else cq
    tiny = torch.zeros_like(alpha_t, dtype=torch.bool)
    if small is not None:
        tiny[small[0]] = True
    ratio, bad = tad_gradient_form(alpha_t, log_at, log_as, tiny, w)  # [n] α^T/α^S; α^S underflowed or α^T tiny
    fix = None
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        q_tilde = tail_softmax_(s[rows].scatter(-1, ids[rows], -_INF))  # [r, V] q̃ from the tail logits alone
        big_w = w[rows] * alpha_t[rows]  # [r] W
        p_tilde = p[rows] / torch.where(alpha_t[rows] > 0, alpha_t[rows], 1.0)[:, None]  # [r, V]
        if small is not None:  # sub-normal α^T: W and p̃ from log space
            where = torch.searchsorted(rows, small[0])
            big_w[where], p_tilde[where] = small[2], small[1]
        c_r = cd[rows]
        fix = (rows, q[rows] * (c_r + cq0[rows])[:, None] + q_tilde * (c_r * (big_w - alpha_t[rows]))[:, None]
               - p_tilde * (c_r * big_w)[:, None])
    coef_q = (cd * (1 + (w - 1) * torch.where(bad, 0.0, ratio)) + cq0)[:, None]
    g = q.mul_(coef_q) if inplace else q * coef_q
    g.addcmul_(p, (cd * w)[:, None], value=-1.0)  # [n, V] the tail rule (Eq. 6), times cd, + cq q
    if fix is not None:
        g[fix[0]] = fix[1]
    g.scatter_(-1, ids, cd[:, None] * (q_top - p_top) + cq0[:, None] * q_top)  # q_k − p_k on 𝒦 (Eq. 5)
    return g


def tad_kernel(k: int) -> RowKernel:
    """TAD with the teacher's top-``k`` (its row weight is log β(X) = log β − log ᾱ(X), computed by the caller)."""
    return RowKernel(lambda t: topk_teacher(t, k), _tad_forward, _tad_backward)


# --------------------------------------------------------------------------- a top-K teacher cache (sparse)


class SparseTeacher(NamedTuple):
    """A teacher known only through a top-K cache (`tailkd.cache`), per row (or per token [B, T, ...]).

    ``topk_ids`` [n, K] int (𝒦: the K largest teacher probabilities), ``topk_logprobs`` [n, K] (TRUE log-probs under
    the full teacher softmax at τ = 1, not renormalised over K), ``log_tail_mass`` [n] = log α^T. Optional tail
    support points ``tail_ids`` / ``tail_logprobs`` / ``tail_log_weights`` [n, J], ids outside 𝒦 with their true
    log p and the logs of weights w_j, Σ_j w_j = α^T, such that Σ_j w_j f(id_j) estimates Σ_{i∉𝒦} p_i f(i) without
    bias: M ids drawn with replacement from the renormalised tail p̃ = p/α^T get w = α^T/M each (sparse logit
    sampling, Anshumann et al. 2025); ids known exactly (cache ranks K_run..K_cache−1) get w = p_i. The weights are
    logs, as α^T is: a tail ~100 nats below 𝒦 has α^T and w_j below float32's range, and TAD's row weight β(X) =
    β/ᾱ(X) makes its tail term count all the same. Without tail points the divergence is D_KL1 (the K+1 bucket
    loss); with them and a row weight w_X it is D_KL1 + w_X · (Σ_j w_j log(p_j/q_j) − α^T log(α^T/α^S)), an unbiased
    estimate of D_KL1 + w_X · α^T·D_KL2 (w_X = β(X) for TAD, 1 for KD, whose expectation is then KL(p‖q)).
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    log_tail_mass: torch.Tensor
    tail_ids: torch.Tensor | None = None
    tail_logprobs: torch.Tensor | None = None
    tail_log_weights: torch.Tensor | None = None


def sparse_tail_points(teacher: SparseTeacher, log_w, dtype):
    """(W [n], tail ids [n, J], ŵ [n, J]) where the cache loss uses its tail points (they exist and a row weight is
    given as log w_X [n]), else (None, None, None). The tail term w_X·(Σ_j w_j d_j − α^T log(α^T/α^S)) is computed
    as W·(Σ_j ŵ_j d_j − log(α^T/α^S)) with W = w_X·α^T = exp(log w_X + log α^T) and ŵ_j = w_j/α^T = exp(log w_j −
    log α^T) (Σ_j ŵ_j = 1), both in float64 then rounded once to ``dtype``: finite where w_X, α^T and w_j are beyond
    float32 (or, for w_X, float64: every tail of a sequence ~745 nats down) — W is at most β·n. 0 where α^T = 0 (no
    tail). Shared by `_sparse_forward` and the kernels."""
    if teacher.tail_ids is None or log_w is None:
        return None, None, None
    log_at = teacher.log_tail_mass.double()
    has = log_at > -_INF  # a row with tail mass (NaN rows are poisoned by the callers)
    big_w = torch.where(has, tad_tiny_weight(log_w, log_at, torch.float64), 0.0).to(dtype)  # W = exp(log w + log α^T)
    tw = torch.where(has[:, None], (teacher.tail_log_weights.double() - log_at[:, None]).exp(), 0.0).to(dtype)
    return big_w, teacher.tail_ids.long(), tw


def sparse_value(p_top, logp_top, logq_top, log_at, log_as, big_w=None, tw=None, logp_t=None, logq_t=None):
    """The cache loss per row [n] from its parts: D_KL1 = Σ_𝒦 p (log p − log q) + α^T log(α^T/α^S), plus with tail
    points (W not None, `sparse_tail_points`) W·(Σ_j ŵ_j (log p_j − log q_j) − log(α^T/α^S)); the tail term is 0
    where log(α^T/α^S) is not finite (α^S = 0: D_KL1 is +inf already) or W = 0. Shared by `_sparse_forward` and the
    kernels."""
    alpha_t = log_at.exp()
    value = torch.where(p_top > 0, p_top * (logp_top - logq_top), 0.0).sum(-1) + rest_bucket(alpha_t, log_at, log_as)
    if big_w is not None:
        spread = log_at - log_as  # [n] log(α^T/α^S)
        tail = torch.where(tw > 0, tw * (logp_t - logq_t), 0.0).sum(-1) - spread  # [n]
        value = value + torch.where(torch.isfinite(spread) & (big_w > 0), big_w * tail, 0.0)
    return value


def sparse_grad_coefs(p_top, alpha_t, big_w=None, tw=None):
    """(c, w_tail) [n] of the cache loss's gradient: c·q_i + w_tail·q̃_i on the tail, c·q_k − p_k on 𝒦, − W·ŵ_j at
    the tail points (`_sparse_backward`). Shared by `_sparse_backward` and the kernels."""
    c = p_top.sum(-1) + alpha_t  # [n]
    if big_w is None:
        return c, -alpha_t
    return c + big_w * (tw.sum(-1) - 1), big_w - alpha_t  # w_X(Σ_j w_j − α^T) = W(Σ_j ŵ_j − 1); (w_X − 1)α^T


def _sparse_forward(s, logq, teacher: SparseTeacher, log_w=None):
    """D_KL1 = Σ_{k∈𝒦} p_k log(p_k/q_k) + α^T log(α^T/α^S) (exact); with tail points and a row weight given as log w
    (w = β(X) for TAD, 1 for KD) + w·(Σ_j w_j log(p_j/q_j) − α^T log(α^T/α^S)), an unbiased estimate of
    w·α^T·D_KL2, computed as W·(Σ_j ŵ_j log(p_j/q_j) − log(α^T/α^S)) (`sparse_tail_points`: in range however far
    down the teacher's tail is)."""
    ids = teacher.topk_ids.long()
    logp_top = teacher.topk_logprobs.to(s.dtype)
    log_at = teacher.log_tail_mass.to(s.dtype)
    alpha_t, p_top = log_at.exp(), logp_top.exp()
    big_w, tids, tw = sparse_tail_points(teacher, log_w, s.dtype)
    logq_t = logq.gather(-1, tids) if big_w is not None else None  # [n, J]
    poisoned = logq[:, 0].isnan() | log_at.isnan()
    q, q_top, logq_top, log_as = student_tail(s, logq, ids)  # logq consumed
    logp_t = teacher.tail_logprobs.to(s.dtype) if big_w is not None else None
    value = sparse_value(p_top, logp_top, logq_top, log_at, log_as, big_w, tw, logp_t, logq_t)
    return _poison(value, poisoned), (s, q, q_top, ids, p_top, alpha_t, tids, tw, big_w)


def _sparse_backward(state, cd, cq, inplace=True):
    """∂D_KL1/∂s: c·q_k − p_k on 𝒦 and c·q_i − α^T q̃_i on the tail (q̃ = q/α^S on the tail), c = Σ_𝒦 p + α^T (1 up
    to the cache's rounding, kept for the exact gradient of the value computed); the tail estimate adds
    W (q̃_i − Σ_j ŵ_j e_{id_j}) + W (Σ_j ŵ_j − 1) q (W = w·α^T, ŵ_j = w_j/α^T: `sparse_tail_points`)."""
    s, q, q_top, ids, p_top, alpha_t, tids, tw, big_w = state
    cq0 = torch.zeros_like(cd) if cq is None else cq
    q_tilde = tail_softmax_(s.scatter(-1, ids, -_INF))  # [n, V] q̃ = q/α^S on the tail, from the tail alone
    c, w_tail = sparse_grad_coefs(p_top, alpha_t, big_w, tw)
    coef_q = (cd * c + cq0)[:, None]
    g = (q.mul_(coef_q) if inplace else q * coef_q).add_(q_tilde.mul_((cd * w_tail)[:, None]))
    if big_w is not None:
        g.scatter_add_(-1, tids, -((cd * big_w)[:, None] * tw))  # − W Σ_j ŵ_j e_{id_j}
    g.scatter_(-1, ids, (cd * c + cq0)[:, None] * q_top - cd[:, None] * p_top)
    return g


SPARSE = RowKernel(lambda rows: rows, _sparse_forward, _sparse_backward)
