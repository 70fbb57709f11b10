"""Teacher analysis, the paper's Figure 2 (``tailkd analyze-teacher``, entry point `tailkd.commands.analyze_teacher`):
tail mass and mode mismatch.

Per valid position i (labels != -100) with teacher distribution p_i sorted decreasingly
p_i(1) ≥ p_i(2) ≥ … ≥ p_i(V) (ties in torch.topk order):

- tail mass    α_K(i) = Σ_{j>K} p_i(j) = 1 − Σ_{j≤K} p_i(j),  K = 1..K_max (default 100); α_K = 0 for K ≥ V.
  Computed in float64 from the tail, never as 1 − Σ top-K (which cancels when the top-K holds almost
  all the mass): α_{K_max} = exp(logsumexp of the log-probabilities outside the top K_max), then
  α_K = α_{K_max} + Σ_{K<j≤K_max} p_i(j) by suffix sums of non-negative terms, so α_K is
  non-increasing in K by construction (floating-point addition is monotone).
- mismatch rate = (1/N) Σ_i 1[argmax p_i ≠ y_i], y_i the actual next token (paper Fig. 2b: 39–46 %).

Reported per K: the mean of α_K over positions (float64 sums, one division at the end) and its
quartiles q25, median, q75 over positions (exact, from the per-position values kept as float32
``[N, K_max]`` — small: 16k positions × 100 × 4 B = 6.4 MB). All fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from tailkd.data import model_inputs
from tailkd.errors import TailkdError
from tailkd.evaluate import IGNORE_INDEX, _chunks, forward_logits, refuse_broken

KMAX = 100


def tail_mass(logits: torch.Tensor, kmax: int = KMAX) -> torch.Tensor:
    """α_K for K = 1..kmax of each row of ``logits`` ``[N, V]``: float64 ``[N, kmax]`` (0 for K ≥ V)."""
    if kmax < 1:
        raise ValueError(f"kmax={kmax} must be >= 1")
    logp = torch.log_softmax(logits.double(), dim=-1)  # (N, V) float64
    n, vocab = logp.shape
    k = min(kmax, vocab)
    top_logp, top_ids = logp.topk(k, dim=-1)  # (N, k), decreasing
    rest = logp.scatter(-1, top_ids, float("-inf"))  # (N, V): the tail outside the top-k
    alpha_k = rest.logsumexp(-1).exp()  # (N,) α_k from the tail; exactly 0 when k == V
    top_p = top_logp.exp()  # (N, k)
    # suffix[:, K-1] = Σ_{K<j≤k} p(j): reverse cumulative sum, shifted by one
    suffix = torch.flip(torch.cumsum(torch.flip(top_p, [-1]), -1), [-1])  # (N, k): Σ_{j≥K} p(j)
    suffix = torch.cat([suffix[:, 1:], torch.zeros(n, 1, dtype=suffix.dtype, device=suffix.device)], dim=-1)
    alpha = alpha_k[:, None] + suffix  # (N, k)
    if k < kmax:  # K ≥ V: nothing left in the tail
        alpha = torch.cat([alpha, torch.zeros(n, kmax - k, dtype=alpha.dtype, device=alpha.device)], dim=-1)
    return alpha


@torch.no_grad()
def teacher_statistics(teacher, batches: Iterable[dict], vocab_size: int, *, kmax: int = KMAX, device="cpu",
                       autocast_dtype=None) -> dict:
    """Tail-mass curve and mode-mismatch rate of ``teacher`` over the valid positions of ``batches``.

    Returns ``k`` (1..kmax), ``alpha_mean``, ``alpha_q25``, ``alpha_median``, ``alpha_q75`` (lists of
    kmax floats), ``mismatch_rate``, ``tokens`` (N), ``teacher_clm`` (mean −log p_iy, nats/token). Logits without a
    softmax (NaN or +inf) at a valid position are a TailkdError (`tailkd.evaluate.refuse_broken`), not NaN results.
    """
    per_position: list[torch.Tensor] = []  # float32 [N_b, kmax] per chunk
    alpha_sum = torch.zeros(kmax, dtype=torch.float64)
    mismatches = nll = 0.0
    n = first_row = 0
    for batch in batches:
        rows = batch["input_ids"].shape[0]
        first_row += rows
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        mask = labels != IGNORE_INDEX  # (B, T)
        if not bool(mask.any()):
            continue
        logits = forward_logits(teacher, input_ids, vocab_size, autocast_dtype=autocast_dtype,
                                **model_inputs(batch, device))
        logits, y = logits[mask], labels[mask]  # (N, V), (N,)
        broken = 0.0  # positions whose logits have no softmax (NaN / +inf): every statistic would be NaN
        for sl in _chunks(y.numel(), logits.shape[-1]):
            chunk = logits[sl]
            logp_y = torch.log_softmax(chunk.double(), -1).gather(-1, y[sl, None])  # (n, 1); NaN: no softmax
            broken += float(logp_y.isnan().sum())
            alpha = tail_mass(chunk, kmax)  # (n, kmax) float64
            alpha_sum += alpha.sum(0).cpu()
            per_position.append(alpha.float().cpu())
            mismatches += float((chunk.argmax(-1) != y[sl]).sum())
            nll -= float(logp_y.sum())
            n += int(y[sl].numel())
        refuse_broken("teacher", broken, y.numel(), first_row - rows, rows)
    if n == 0:
        raise TailkdError("no valid positions to analyse; give more data (--data) or a shorter --seq-len")
    values = torch.cat(per_position).numpy()  # (N, kmax) float32
    q25, median, q75 = np.quantile(values.astype(np.float64), [0.25, 0.5, 0.75], axis=0)
    return {"k": list(range(1, kmax + 1)), "alpha_mean": (alpha_sum / n).tolist(), "alpha_q25": q25.tolist(),
            "alpha_median": median.tolist(), "alpha_q75": q75.tolist(), "mismatch_rate": mismatches / n,
            "tokens": n, "teacher_clm": nll / n}


def format_summary(results: dict) -> str:
    """One line per teacher: mean α_K at K = 1, 5, 10, 20, 50, 100 (those up to kmax), the mismatch rate and N."""
    ks = [k for k in (1, 5, 10, 20, 50, 100) if k <= len(next(iter(results.values()))["k"])]
    head = f"{'teacher':<28} " + " ".join(f"{'α_' + str(k):>8}" for k in ks) + f" {'mismatch':>9} {'tokens':>8}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        vals = " ".join(f"{r['alpha_mean'][k - 1]:>8.4f}" for k in ks)
        lines.append(f"{name[-28:]:<28} {vals} {r['mismatch_rate']:>9.2%} {r['tokens']:>8}")
    return "\n".join(lines)
