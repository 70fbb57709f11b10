"""Independent float64 reference for `tailkd.losses`: explicit per-token loops and per-index sums.

Deliberately a different code path from the library: softmax by explicit exp/sum with a max shift, top-K by
sorting Python lists, zero-probability entries dropped by listing the indices that have mass (no torch.where, no
log_softmax, no topk, no scatter, no fused autograd function). Everything runs in float64 torch so autograd through
it gives reference gradients. Inputs are [N, V] (or [B, T, V] where the loss is per sequence); outputs are [N]
([B, T]).
"""

import math

import torch

NEG_INF = float("-inf")


def f64(x: torch.Tensor) -> torch.Tensor:
    """Upcast to float64 keeping the autograd graph (a leaf that requires grad stays differentiable)."""
    return x.to(torch.float64)


def log_normaliser(z: torch.Tensor, ids: list[int] | None = None) -> torch.Tensor:
    """log Σ_{i∈ids} exp(z_i) for a 1-D tensor z (all ids when None); −inf when every selected z_i is −inf."""
    ids = list(range(z.shape[0])) if ids is None else ids
    finite = [i for i in ids if z[i].item() > NEG_INF]
    if not finite:
        return torch.tensor(NEG_INF, dtype=torch.float64)
    m = max(z[i].item() for i in finite)  # shift; a constant, so gradients are exact
    total = sum(torch.exp(z[i] - m) for i in finite)
    return m + torch.log(total)


def log_probs(z: torch.Tensor) -> torch.Tensor:
    """Explicit log-softmax of a 1-D tensor: z_i − log Σ_j exp(z_j)."""
    return z - log_normaliser(z)


def kl_from_logs(log_w: torch.Tensor, log_v: torch.Tensor, ids: list[int] | None = None) -> torch.Tensor:
    """Σ_{i∈ids, w_i>0} w_i (log w_i − log v_i) over 1-D log-probability vectors (0·log 0 = 0 by omission)."""
    ids = list(range(log_w.shape[0])) if ids is None else ids
    total = torch.zeros((), dtype=torch.float64)
    for i in ids:
        if log_w[i].item() > NEG_INF and math.exp(log_w[i].item()) > 0:
            total = total + torch.exp(log_w[i]) * (log_w[i] - log_v[i])
    return total


def rows(x: torch.Tensor) -> torch.Tensor:
    return f64(x).reshape(-1, x.shape[-1])


def top_ids(t_row: torch.Tensor, k: int) -> list[int]:
    """The k ids of largest teacher logit (= largest probability); ties broken by the smaller index."""
    values = t_row.tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


# --------------------------------------------------------------------------- whole-vocabulary divergences


def forward_kl(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    out = [kl_from_logs(log_probs(tr / temperature), log_probs(sr / temperature)) for sr, tr in zip(rows(s), rows(t))]
    return torch.stack(out).reshape(s.shape[:-1])


def reverse_kl(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    out = [kl_from_logs(log_probs(sr / temperature), log_probs(tr / temperature)) for sr, tr in zip(rows(s), rows(t))]
    return torch.stack(out).reshape(s.shape[:-1])


def jsd(s: torch.Tensor, t: torch.Tensor, beta: float, temperature: float = 1.0) -> torch.Tensor:
    """β KL(p‖m) + (1−β) KL(q‖m), m = β p + (1−β) q; β = 0 -> KL(p‖q), β = 1 -> KL(q‖p) (TRL endpoints)."""
    if beta == 0:
        return forward_kl(s, t, temperature)
    if beta == 1:
        return reverse_kl(s, t, temperature)
    out = []
    for sr, tr in zip(rows(s), rows(t)):
        logq, logp = log_probs(sr / temperature), log_probs(tr / temperature)
        total = torch.zeros((), dtype=torch.float64)
        for i in range(sr.shape[0]):
            p_i, q_i = torch.exp(logp[i]), torch.exp(logq[i])
            m_i = beta * p_i + (1 - beta) * q_i
            if p_i.item() > 0:
                total = total + beta * p_i * (logp[i] - torch.log(m_i))
            if q_i.item() > 0:
                total = total + (1 - beta) * q_i * (logq[i] - torch.log(m_i))
        out.append(total)
    return torch.stack(out).reshape(s.shape[:-1])


def tvd(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """½ Σ_i |p_i − q_i|, by explicit per-index terms."""
    out = []
    for sr, tr in zip(rows(s), rows(t)):
        logq, logp = log_probs(sr / temperature), log_probs(tr / temperature)
        total = torch.zeros((), dtype=torch.float64)
        for i in range(sr.shape[0]):
            total = total + 0.5 * torch.abs(torch.exp(logp[i]) - torch.exp(logq[i]))
        out.append(total)
    return torch.stack(out).reshape(s.shape[:-1])


def symmetric_kl(s, t, temperature=1.0):
    return forward_kl(s, t, temperature) + reverse_kl(s, t, temperature)


def _skew(w_row_logits, v_row_logits, alpha, temperature):
    """KL(w ‖ α w + (1 − α) v) of one row, by explicit per-index terms."""
    logw, logv = log_probs(w_row_logits / temperature), log_probs(v_row_logits / temperature)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(logw.shape[0]):
        w_i = torch.exp(logw[i])
        if w_i.item() > 0:
            m_i = alpha * w_i + (1 - alpha) * torch.exp(logv[i])
            total = total + w_i * (logw[i] - torch.log(m_i))
    return total


def skew_forward_kl(s, t, alpha, temperature=1.0):
    """KL(p ‖ αp + (1−α)q)."""
    out = [_skew(tr, sr, alpha, temperature) for sr, tr in zip(rows(s), rows(t))]
    return torch.stack(out).reshape(s.shape[:-1])


def skew_reverse_kl(s, t, alpha, temperature=1.0):
    """KL(q ‖ αq + (1−α)p)."""
    out = [_skew(sr, tr, alpha, temperature) for sr, tr in zip(rows(s), rows(t))]
    return torch.stack(out).reshape(s.shape[:-1])


def akl(s, t, mu, temperature=1.0):
    """AKL: the teacher's ids sorted by probability (ties by the smaller id); head = the first, and every id whose
    cumulative teacher probability is <= μ; g = Σ|p − q| per part with the student's probabilities as constants;
    g_head/(g_head + g_tail) · KL(p‖q) + g_tail/(g_head + g_tail) · KL(q‖p)."""
    out = []
    for sr, tr in zip(rows(s), rows(t)):
        logp, logq = log_probs(tr / temperature), log_probs(sr / temperature)
        p = [math.exp(v) for v in logp.tolist()]
        q = [math.exp(v) for v in logq.detach().tolist()]
        order = sorted(range(len(p)), key=lambda i: (-p[i], i))
        g_head = g_tail = 0.0
        cum = 0.0
        for rank, i in enumerate(order):
            cum += p[i]
            if rank == 0 or cum <= mu:
                g_head += abs(p[i] - q[i])
            else:
                g_tail += abs(p[i] - q[i])
        total = g_head + g_tail
        w_head, w_tail = (g_head / total, g_tail / total) if total > 0 else (0.0, 0.0)
        out.append(w_head * kl_from_logs(logp, logq) + w_tail * kl_from_logs(logq, logp))
    return torch.stack(out).reshape(s.shape[:-1])


def ab_divergence(s, t, alpha, beta, temperature=1.0):
    """The α-β divergence of p from q (Cichocki et al. 2011) and its limits, by explicit per-index terms."""
    out = []
    for sr, tr in zip(rows(s), rows(t)):
        logp, logq = log_probs(tr / temperature), log_probs(sr / temperature)
        total = torch.zeros((), dtype=torch.float64)
        for i in range(logp.shape[0]):
            lp, lq = logp[i], logq[i]
            if alpha == 0 and beta == 0:
                total = total + 0.5 * (lp - lq) ** 2
            elif beta == 0:
                pa, qa = torch.exp(alpha * lp), torch.exp(alpha * lq)
                total = total + (pa * (alpha * lp - alpha * lq) - pa + qa) / alpha**2
            elif alpha == 0:
                pb, qb = torch.exp(beta * lp), torch.exp(beta * lq)
                total = total + (qb * (beta * lq - beta * lp) - qb + pb) / beta**2
            else:
                ab = alpha + beta
                total = total - (torch.exp(alpha * lp + beta * lq) - alpha / ab * torch.exp(ab * lp)
                                 - beta / ab * torch.exp(ab * lq)) / (alpha * beta)
        out.append(total)
    return torch.stack(out).reshape(s.shape[:-1])


# --------------------------------------------------------------------------- TAD


def tad_terms_row(s_row, t_row, k, ids=None):
    """(D_KL1, D_KL2, α^T, log α^T, log α^S) for one token, straight from the definitions in formulas.md §2."""
    ids = top_ids(t_row, k) if ids is None else list(ids)
    tail = [i for i in range(s_row.shape[0]) if i not in ids]
    logq, logp = log_probs(s_row), log_probs(t_row)
    log_alpha_t = log_normaliser(logp, tail)  # log Σ_{i∉𝒦} p_i
    log_alpha_s = log_normaliser(logq, tail)
    d1 = kl_from_logs(logp, logq, ids)
    if log_alpha_t.item() > NEG_INF and math.exp(log_alpha_t.item()) > 0:
        d1 = d1 + torch.exp(log_alpha_t) * (log_alpha_t - log_alpha_s)
    if log_alpha_t.item() == NEG_INF:
        d2 = torch.zeros((), dtype=torch.float64)  # no teacher tail: renormalised tail undefined, term defined 0
    else:
        d2 = kl_from_logs(logp - log_alpha_t, logq - log_alpha_s, tail)
    return d1, d2, torch.exp(log_alpha_t), log_alpha_t, log_alpha_s


def tad_decompose(s, t, k, temperature=1.0, ids=None, with_log_alpha=False):
    """(d_kl1, d_kl2, alpha) [...] (and log alpha with ``with_log_alpha``); `ids` [..., K] overrides the top-K
    choice (to follow torch.topk on ties)."""
    sr, tr = rows(s) / temperature, rows(t) / temperature
    id_rows = [None] * sr.shape[0] if ids is None else ids.reshape(-1, ids.shape[-1]).tolist()
    parts = [tad_terms_row(a, b, k, i)[:4 if with_log_alpha else 3] for a, b, i in zip(sr, tr, id_rows)]
    return tuple(torch.stack(x).reshape(s.shape[:-1]) for x in zip(*parts))


def log_alpha_means(log_alpha: torch.Tensor, mask: torch.Tensor, segment_ids=None) -> torch.Tensor:
    """Per-position log of the mean α^T over the valid tokens of the same row (or same (row, segment)) from log α^T,
    by explicit loops in log space: log ᾱ = m + log((1/n) Σ exp(log α_u − m)), m the largest log α_u (exact where ᾱ
    is below float64's range); −inf where no valid token has a tail."""
    n_batch, n_time = mask.shape
    out = torch.full((n_batch, n_time), NEG_INF, dtype=torch.float64)
    for b in range(n_batch):
        for t in range(n_time):
            vals = [float(log_alpha[b, u]) for u in range(n_time) if bool(mask[b, u]) and (
                segment_ids is None or segment_ids[b, u].item() == segment_ids[b, t].item())]
            finite = [v for v in vals if v > NEG_INF]
            if finite:
                m = max(finite)
                out[b, t] = m + math.log(sum(math.exp(v - m) for v in finite) / len(vals))
    return out


def tad(s, t, mask, k, beta, segment_ids=None, seq_alpha_mean=None, temperature=1.0):
    """L_DIV = D_KL1 + β(X) α^T D_KL2 per token of [B, T, V] logits, 0 where mask is False (Eq. 3); β(X)·α^T =
    β·exp(log α^T − log ᾱ), exact also where ᾱ is below float64's range."""
    d1, d2, _alpha, log_alpha = tad_decompose(s, t, k, temperature, with_log_alpha=True)
    if seq_alpha_mean is None:
        log_abar = log_alpha_means(log_alpha.detach(), mask, segment_ids)
    else:
        abar = f64(seq_alpha_mean)
        log_abar = torch.where(abar > 0, torch.log(torch.where(abar > 0, abar, 1.0)), NEG_INF)
    n_batch, n_time = mask.shape
    out = []
    for b in range(n_batch):
        for u in range(n_time):
            if not bool(mask[b, u]) or float(log_abar[b, u]) == NEG_INF or beta == 0:  # β(X) = 0: no tail term,
                # also where D_KL2 = +inf (a student −inf under the teacher's tail: 0·inf is not taken as NaN)
                value = d1[b, u] if bool(mask[b, u]) else torch.zeros((), dtype=torch.float64)
            else:
                weight = beta * math.exp(float(log_alpha[b, u]) - float(log_abar[b, u]))  # β(X)·α^T
                value = d1[b, u] + weight * d2[b, u]
            out.append(value)
    return torch.stack(out).reshape(n_batch, n_time)


def topk_bucket_kl(s, ids, logprobs):
    out = []
    for s_row, id_row, lp_row in zip(rows(s), ids.reshape(-1, ids.shape[-1]).tolist(), rows(logprobs)):
        logq = log_probs(s_row)
        tail = [i for i in range(s_row.shape[0]) if i not in id_row]
        total = torch.zeros((), dtype=torch.float64)
        for j, i in enumerate(id_row):
            total = total + torch.exp(lp_row[j]) * (lp_row[j] - logq[i])
        alpha_t = 1.0 - sum(math.exp(v) for v in lp_row.tolist())
        if alpha_t > 0:
            total = total + alpha_t * (math.log(alpha_t) - log_normaliser(logq, tail))
        out.append(total)
    return torch.stack(out).reshape(s.shape[:-1])


# --------------------------------------------------------------------------- label-anchored decouplings


def target_split_row(w_row, v_row, y):
    """(KL(b^w‖b^v), KL(ŵ‖v̂)) with anchor y: binary (P(y), 1 − P(y)) and renormalised non-targets."""
    rest = [i for i in range(w_row.shape[0]) if i != y]
    log_w, log_v = log_probs(w_row), log_probs(v_row)
    log_w_rest, log_v_rest = log_normaliser(log_w, rest), log_normaliser(log_v, rest)  # log(1 − P(y))
    binary = kl_from_logs(torch.stack([log_w[y], log_w_rest]), torch.stack([log_v[y], log_v_rest]))
    if log_w_rest.item() == NEG_INF:
        return binary, torch.zeros((), dtype=torch.float64)
    return binary, kl_from_logs(log_w - log_w_rest, log_v - log_v_rest, rest)


def dkd(s, t, labels, alpha, beta, temperature=1.0):
    out = []
    for s_row, t_row, y in zip(rows(s) / temperature, rows(t) / temperature, labels.reshape(-1).tolist()):
        if y == -100:
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        tckd, nckd = target_split_row(t_row, s_row, y)
        out.append(alpha * tckd + beta * nckd)
    return torch.stack(out).reshape(s.shape[:-1])


def drkl(s, t, labels, gamma, anchor="label", temperature=1.0):
    out = []
    n = rows(s).shape[0]
    label_list = [0] * n if labels is None else labels.reshape(-1).tolist()
    for s_row, t_row, y in zip(rows(s) / temperature, rows(t) / temperature, label_list):
        if y == -100:
            out.append(torch.zeros((), dtype=torch.float64))
            continue
        if anchor == "teacher_argmax":
            values = t_row.tolist()
            y = max(range(len(values)), key=lambda i: values[i])
        binary, nontarget = target_split_row(s_row, t_row, y)
        out.append(binary + gamma * nontarget)
    return torch.stack(out).reshape(s.shape[:-1])


# --------------------------------------------------------------------------- hidden states


def hidden_cosine(h_s, h_t, mask, weight=None):
    """1 − Σ_j a_j b_j / (‖a‖‖b‖) per valid token; b = teacher's first d_S coordinates when no weight."""
    n_batch, n_time, d_s = h_s.shape
    out = torch.zeros(n_batch, n_time, dtype=torch.float64)
    for b in range(n_batch):
        for u in range(n_time):
            if not bool(mask[b, u]):
                continue
            a = f64(h_s[b, u])
            if weight is not None:
                w = f64(weight)
                a = torch.stack([sum(w[r, j] * a[j] for j in range(d_s)) for r in range(w.shape[0])])
            c = f64(h_t[b, u])[: a.shape[0]]
            dot = sum(a[j] * c[j] for j in range(a.shape[0]))
            norm = torch.sqrt(sum(a[j] ** 2 for j in range(a.shape[0]))) * torch.sqrt(
                sum(c[j] ** 2 for j in range(a.shape[0]))
            )
            out[b, u] = 1 - dot / norm
    return out
