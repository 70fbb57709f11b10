"""The divergences of tailkd as per-token functions (the registry of losses, `tailkd.registry`, names them); the
baselines of the DRKL paper that need no kernel of their own live in `tailkd.baselines`.

Student first, teacher second, logits ``[..., V]`` in any float dtype, computed in
float32 (float64 stays float64), one value per token ``[...]``; nothing here normalises across tokens
(`tailkd.objective` sums and divides once by the global count of valid tokens). Shared conventions
(``docs/formulas.md``; p = teacher, q = student distribution):

- ``temperature`` divides both sides' logits; there is no hidden τ² factor (scale outside if you want Hinton's);
- the teacher is a target: teacher tensors are detached, no gradient flows into them;
- ``0 · log 0 = 0``: a vocabulary entry where the weighting distribution is 0 contributes exactly 0, with a finite
  gradient; a student −inf where the teacher has mass gives +inf for forward KL, which is the right value (its
  gradient q − p stays finite); a teacher −inf (p = 0) where the student has mass gives +inf for the reverse-KL
  type (`reverse_kl`, and the losses built on it or on KL(q‖·): symmetric KL, AKL, DRKL, skew RKL at α = 0, α-β at
  α = 0, JSD at β = 1), whose gradient is not defined there: that row's gradient holds NaN and ±inf, the same in the
  dense, chunked and Triton paths (as torch's ``kl_div`` with such a target); a NaN logit gives a NaN row. The
  trainer skips a step whose loss is not finite (JSD with 0 < β < 1, skew KL/RKL with α > 0, TVD, α-β with α, β > 0
  stay finite);
- bad arguments raise ``ValueError`` naming the argument and the fix.

Where a divergence has a closed-form gradient its maths lives in `tailkd.divergences` (a `RowKernel`: teacher
statistics, value, gradient) and the function here only validates, scales and calls it through `_Rows`, the one
autograd Function of the dense path; the chunked layer (`tailkd.fused`) and the top-K cache call the same kernel.
The label-anchored decouplings (DKD, DRKL) and TVD are plain autograd; the chunked layer differentiates them per
chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from tailkd import divergences as dv
from tailkd.data import IGNORE_INDEX

__all__ = [
    "dkd",
    "cache_divergence",
    "drkl",
    "forward_kl",
    "hidden_cosine",
    "jsd",
    "reverse_kl",
    "sequence_alpha_mean",
    "sequence_log_alpha_mean",
    "tad",
    "tad_decompose",
    "topk_bucket_kl",
]

_INF = float("inf")


# --------------------------------------------------------------------------- validation


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(f"{name} must be a floating-point tensor of logits [..., V]; got {_describe(x)}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: student_logits has V={student_logits.shape[-1]}, teacher_logits has "
            f"V={teacher_logits.shape[-1]}; use a student and teacher with the same tokenizer, or slice both heads "
            "to the shared vocabulary before the loss"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(student_logits.shape)} vs teacher_logits "
            f"{tuple(teacher_logits.shape)}; pass the same tokens (same batch, length and label shift) to both"
        )


def _describe(x: object) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def finite_number(x) -> bool:
    """Whether ``x`` is a finite int or float: not a bool (Python counts True as 1), not a string or tensor."""
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def check_temperature(temperature: float) -> None:
    if not (finite_number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 (1.0 = no scaling); got {temperature!r}")


def check_nonnegative(name: str, value: float) -> None:
    if not (finite_number(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def check_unit_interval(name: str, value: float, *, closed: bool = False) -> None:
    if not (finite_number(value) and 0 <= value and (value <= 1 if closed else value < 1)):
        raise ValueError(f"{name} must be a finite number in [0, 1{']' if closed else ')'}; got {value!r}")


def _check_k(k: int, vocab: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < vocab:
        raise ValueError(f"k must be an integer with 1 <= k < V={vocab} (the tail must be non-empty); got {k!r}")


def _check_mask(mask: torch.Tensor, shape: torch.Size, name: str = "mask") -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != shape:
        raise ValueError(
            f"{name} must be a bool tensor of shape {tuple(shape)} (True = valid token, e.g. labels != -100); "
            f"got {_describe(mask)}"
        )


def _check_labels(labels: torch.Tensor, shape: torch.Size, vocab: int) -> torch.Tensor:
    """Validate labels [...] (ids in [0, V) or -100) and return the valid-position mask [...]."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.shape != shape:
        raise ValueError(
            f"labels must be an integer tensor of shape {tuple(shape)} (token ids, -100 = ignore); "
            f"got {_describe(labels)}"
        )
    valid = labels != IGNORE_INDEX  # [...]
    if bool(((labels < 0) | (labels >= vocab))[valid].any()):
        raise ValueError(f"labels must be token ids in [0, {vocab}) or -100 (ignore); found ids outside that range")
    return valid


# --------------------------------------------------------------------------- numerics helpers


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def scaled_pair(student_logits, teacher_logits, temperature, *, own_teacher: bool = False):
    """(student, detached teacher) logits in the compute dtype, divided by the temperature. ``own_teacher``: the
    teacher tensor is a private copy (a row kernel consumes it), never the caller's."""
    dtype = _compute_dtype(student_logits, teacher_logits)
    s = student_logits.to(dtype)  # [..., V]
    t = teacher_logits.detach().to(dtype, copy=own_teacher)  # [..., V]
    if temperature != 1.0:
        s = s / temperature
        t = t.div_(temperature) if own_teacher else t / temperature
    return s, t


def _safe_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log Σ_i exp(x_i) over the last dim; −inf for an all −inf row, with a zero (not NaN) gradient there.

    Its gradient is exp(x − max)/Σ exp(x − max), accurate in float32 even for logits ~1e4, unlike
    torch.logsumexp's backward exp(x − result), which inherits the rounding of the large result.
    """
    m = x.detach().amax(-1, keepdim=True)  # [..., 1]
    m = torch.where(torch.isfinite(m), m, 0.0)  # [..., 1] shift of an empty row: any finite number
    total = torch.exp(x - m).sum(-1)  # [...]
    nonempty = total > 0  # [...]
    return torch.where(nonempty, m.squeeze(-1) + torch.log(torch.where(nonempty, total, 1.0)), -_INF)  # [...]


def zero_masked_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` [..., d] with its rows outside ``mask`` [...] (True = valid) set to 0 when one of them holds a NaN or ±inf,
    else ``x`` itself. Those rows' values are never used, but a loss masked by its value (torch.where on [...]) still
    backpropagates 0 into them, and 0·NaN = NaN: a single such row (e.g. the hidden states of a fully masked padding
    row under some attention implementations) made the whole step's gradient NaN. Through torch.where the gradient
    there is exactly 0 and the valid rows are untouched. One read of x ([...] row sums) and one device sync."""
    bad = ~mask & ~torch.isfinite(x.detach().sum(-1))  # [...] (a finite row whose sum overflows: zeroed, harmless)
    return torch.where(mask[..., None], x, 0.0) if bool(bad.any()) else x


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


def kl_terms(w: torch.Tensor, log_w: torch.Tensor, log_v: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i (log w_i − log v_i) over the last dim, with w_i = 0 entries contributing 0 (and 0 gradient)."""
    diff = torch.where(w > 0, log_w - log_v, 0.0)  # [..., V] NaN/inf of 0-weight entries never reach the sum
    return (w * diff).sum(-1)  # [...]


# --------------------------------------------------------------------------- the dense path of a row kernel


class _Rows(torch.autograd.Function):
    """Per-row values [N] of a `divergences.RowKernel` on student logits s [N, V], with its closed-form backward.

    ``teacher``: the kernel's teacher rows (``kernel.teacher(t)``, or `divergences.SparseTeacher`); ``w`` [N] or None:
    the per-row weight as its log (log β(X) for TAD's kernel and a top-K cache's, 0 for the cache's KD); ``valid``
    [N] bool or None: rows outside it give 0 and no gradient. Memory: the kernel's state (two [N, V] buffers for KL
    and TAD) is kept for backward only when s requires grad, as saved tensors, so that autograd frees it once this
    node's backward ran (not at the end of the pass: other [N, V] gradients, e.g. the CLM term's, are computed after
    it); backward allocates G and leaves the state intact (autograd may call it again with ``retain_graph``)."""

    @staticmethod
    def forward(ctx, s, kernel: dv.RowKernel, teacher, w, valid):
        logq = torch.log_softmax(s, dim=-1)  # [N, V]
        value, state = kernel.forward(s, logq, teacher, w)
        ctx.kernel, ctx.valid = kernel, valid
        if ctx.needs_input_grad[0]:  # the state's tensors through save_for_backward: autograd frees them right
            leaves, ctx.spec = tree_flatten(state)  # after this node's backward (unless retain_graph), not at the
            ctx.tensor_at = [isinstance(x, torch.Tensor) for x in leaves]  # end of the whole backward pass
            ctx.others = [None if is_t else x for x, is_t in zip(leaves, ctx.tensor_at)]
            ctx.save_for_backward(*(x for x, is_t in zip(leaves, ctx.tensor_at) if is_t))
        return value if valid is None else torch.where(valid, value, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        saved = iter(ctx.saved_tensors)
        state = tree_unflatten([next(saved) if is_t else x for x, is_t in zip(ctx.others, ctx.tensor_at)], ctx.spec)
        grad = ctx.kernel.backward(state, g, None, inplace=False)  # [N, V] g·∂D/∂s; the state stays intact
        if ctx.valid is not None and not bool(ctx.valid.all()):
            grad.masked_fill_(~ctx.valid[:, None], 0.0)
        return grad, None, None, None, None


def _dense_rows(kernel: dv.RowKernel, student_logits, teacher_logits, temperature) -> torch.Tensor:
    """Values [...] of ``kernel`` on logits [..., V] (validated), through `_Rows`."""
    s, t = scaled_pair(student_logits, teacher_logits, temperature, own_teacher=True)
    vocab = s.shape[-1]
    teacher = kernel.teacher(t.reshape(-1, vocab))  # [N, V] consumed: the private copy's buffer is reused
    return _Rows.apply(s.reshape(-1, vocab), kernel, teacher, None, None).view(s.shape[:-1])


def kernel_divergence(kernel: dv.RowKernel, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      temperature: float = 1.0) -> torch.Tensor:
    """Per-token values [...] of a `divergences.RowKernel` on full logits [..., V] (p = softmax(teacher_logits / τ),
    q = softmax(student_logits / τ)), its gradient the kernel's closed form: the dense path of a divergence defined by
    its kernel alone (`forward_kl`, `reverse_kl` and `jsd` are this with theirs; a loss of your own:
    `tailkd.registry.per_token_by_kernel`). Kernels that take a row weight (TAD's) are not for this function.
    Shapes: logits [..., V] -> [...]; float32 (float64 for float64 input)."""
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    return _dense_rows(kernel, student_logits, teacher_logits, temperature)


# --------------------------------------------------------------------------- whole-vocabulary divergences


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL (vanilla KD, Hinton): KL(p‖q) = Σ_i p_i (log p_i − log q_i), per token.

    p = softmax(teacher_logits / τ), q = softmax(student_logits / τ); no τ² factor. Gradient wrt the scaled student
    logits: q − p (closed form, `divergences.KL`). Shapes: logits [..., V] -> [...]; float32 (float64 for float64).
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    return _dense_rows(dv.KL, student_logits, teacher_logits, temperature)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL: KL(q‖p) = Σ_i q_i (log q_i − log p_i), per token (mode-seeking).

    p = softmax(teacher_logits / τ), q = softmax(student_logits / τ); no τ² factor. A teacher −inf where the student
    has mass gives +inf, and that row's gradient, not defined there, holds NaN and −inf (as torch's ``kl_div`` gives
    it), in every path: a training step with such a row is skipped. Gradient q_i (log(q_i/p_i) − KL(q‖p)) (closed form,
    `divergences.RKL`).
    Shapes: logits [..., V] -> [...]; float32 (float64 for float64 input).
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    return _dense_rows(dv.RKL, student_logits, teacher_logits, temperature)


def jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (TRL/Liger convention), per token.

    m = β p + (1 − β) q,  JSD_β = β KL(p‖m) + (1 − β) KL(q‖m), with p = teacher, q = student (both at temperature τ).
    The formula is degenerate (0) at the endpoints, which are special-cased as in TRL's ``generalized_jsd_loss``
    and Liger's JSD: ``beta == 0`` returns forward KL(p‖q) (`forward_kl`), ``beta == 1`` returns reverse KL(q‖p)
    (`reverse_kl`). (Near the endpoints JSD_β ≈ β·KL(p‖q) and (1 − β)·KL(q‖p): the endpoints are the limits of
    JSD_β divided by its scale.) Closed-form gradient (`divergences.jsd_kernel`).
    Shapes: logits [..., V] -> [...]; float32 (float64 for float64 input).
    """
    if not (finite_number(beta) and 0 <= beta <= 1):
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL); got {beta!r}")
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    return _dense_rows(dv.jsd_kernel(float(beta)), student_logits, teacher_logits, temperature)


# --------------------------------------------------------------------------- TAD


def tad_decompose(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's Eq. 2 split KL(p‖q) = D_KL1 + α^T · D_KL2, evaluated term by term (plain autograd; for analysis).

    𝒦 = the k ids with the largest teacher probability, ranked by teacher logits (same order as p). Exact ties at
    the k-th place: 𝒦 is one valid top-k set, chosen deterministically by `divergences.teacher_top_ids`, the
    selection of the dense and chunked torch paths (a top-K cache holds the set torch.topk chose when it was written,
    `tailkd.cache`); the Triton kernels (CUDA) break such ties toward the smaller id (`tailkd.kernels`), so on an
    exact tie at the k-th place they may hold another valid 𝒦.
    - D_KL1 = Σ_{k∈𝒦} p_k log(p_k/q_k) + α^T log(α^T/α^S)       (k terms + the "rest" bucket)
    - D_KL2 = Σ_{i∉𝒦} p̃_i log(p̃_i/q̃_i),  p̃ = p/α^T, q̃ = q/α^S  (KL of the renormalised tails; 0 when α^T = 0)
    - α^T = Σ_{i∉𝒦} p_i, α^S likewise: log α = logsumexp(tail logits) − logsumexp(logits), never 1 − Σ top-K.
    Returns (d_kl1, d_kl2, alpha), each [...] for logits [..., V]; alpha carries no gradient. float32/float64.
    """
    check_logits(student_logits, teacher_logits)
    _check_k(k, student_logits.shape[-1])
    check_temperature(temperature)
    s, t = scaled_pair(student_logits, teacher_logits, temperature)
    ids = dv.teacher_top_ids(t, k)  # [..., K]
    tail_s, tail_t = s.scatter(-1, ids, -_INF), t.scatter(-1, ids, -_INF)  # [..., V] top-K masked out
    lse_tail_s, lse_tail_t = _safe_logsumexp(tail_s), _safe_logsumexp(tail_t)  # [...]
    log_alpha_s = lse_tail_s - _safe_logsumexp(s)  # [...]
    log_alpha_t = lse_tail_t - _safe_logsumexp(t)  # [...]
    alpha = log_alpha_t.exp()  # [...]
    logq_top = torch.log_softmax(s, dim=-1).gather(-1, ids)  # [..., K]
    logp_top = torch.log_softmax(t, dim=-1).gather(-1, ids)  # [..., K]
    bucket = kl_terms(alpha[..., None], log_alpha_t[..., None], log_alpha_s[..., None])  # [...]
    d_kl1 = kl_terms(logp_top.exp(), logp_top, logq_top) + bucket  # [...]
    log_p_tilde = tail_t - _finite_or_zero(lse_tail_t)[..., None]  # [..., V] −inf on 𝒦
    log_q_tilde = tail_s - _finite_or_zero(lse_tail_s)[..., None]  # [..., V]
    d_kl2 = kl_terms(log_p_tilde.exp(), log_p_tilde, log_q_tilde)  # [...]
    return d_kl1, d_kl2, alpha


def group_log_mean(log_values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per group [n_groups] float64, log of the mean of exp(``log_values``) over the elements whose id in ``group``
    is the group's, in log space (a log-sum-exp shifted by the group's largest value): exact where the mean itself
    is below float64's range (TAD's ᾱ of a sequence whose every tail is beyond ~708 nats); −inf for an empty group
    or one of zeros, NaN for one holding a NaN. No host-device synchronisation."""
    lv = log_values.double()
    peak = torch.full((n_groups,), -_INF, dtype=lv.dtype, device=lv.device).scatter_reduce(0, group, lv, "amax")
    shift = torch.where(torch.isfinite(peak), peak, 0.0)  # [G]
    total = lv.new_zeros(n_groups).index_add_(0, group, (lv - shift[group]).exp())
    count = lv.new_zeros(n_groups).index_add_(0, group, torch.ones_like(lv))
    return total.log() + shift - count.clamp_min(1).log()


def sequence_index(mask: torch.Tensor, segment_ids: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(the sequence index of every position [B*T], the number of sequences): rows, or with ``segment_ids`` [B, T]
    the documents (row, segment id) of packed rows, numbered in (row, segment id) order: TAD's sequences X, the
    dense path's and the chunked layer's (`tailkd.fused`)."""
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)  # [B, T]
    if segment_ids is None:
        return rows.reshape(-1), mask.shape[0]
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.is_floating_point() or segment_ids.shape != mask.shape:
        raise ValueError(
            f"segment_ids must be an integer tensor of shape {tuple(mask.shape)} (document id of each token in its "
            f"packed row); got {_describe(segment_ids)}"
        )
    pairs = torch.stack([rows, segment_ids.to(rows.dtype)], dim=-1).reshape(-1, 2)  # [B*T, 2]
    doc = torch.unique(pairs, dim=0, return_inverse=True)[1]  # [B*T] document index
    return doc, int(doc.max()) + 1 if doc.numel() else 0


def sequence_log_alpha_mean(
    log_alpha: torch.Tensor, mask: torch.Tensor, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """log ᾱ(X) for every position [B, T] float64, from log α^T [B, T]: `sequence_alpha_mean` in log space
    (`group_log_mean` over the valid tokens of the position's sequence), exact where ᾱ is below float64's range;
    −inf for a sequence without valid tokens or without any teacher tail. Detached."""
    if not isinstance(log_alpha, torch.Tensor) or log_alpha.dim() != 2 or not log_alpha.is_floating_point():
        raise ValueError(f"log_alpha must be a float tensor [B, T] of log teacher tail masses; got "
                         f"{_describe(log_alpha)}")
    _check_mask(mask, log_alpha.shape)
    doc, n_docs = sequence_index(mask, segment_ids)
    group = torch.where(mask.reshape(-1), doc, n_docs)  # masked positions: a group of their own, left out
    per_doc = group_log_mean(log_alpha.detach().reshape(-1), group, n_docs + 1)  # [D + 1]
    return per_doc[doc].view(log_alpha.shape)


def sequence_alpha_mean(
    alpha: torch.Tensor, mask: torch.Tensor, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """ᾱ(X) for every position [B, T]: the mean of α^T [B, T] over the valid tokens of the position's sequence.

    A sequence is a row, or with ``segment_ids`` [B, T] (int; packed rows) a document = (row, segment id). Masked
    positions do not contribute; they receive their sequence's value. A sequence without valid tokens gets 0.
    Detached (β(X) = β / ᾱ(X) is a teacher-only constant). TAD itself averages in log space
    (`sequence_log_alpha_mean`): ᾱ of tails beyond ~708 nats is below float64's range.
    """
    if not isinstance(alpha, torch.Tensor) or alpha.dim() != 2 or not alpha.is_floating_point():
        raise ValueError(f"alpha must be a float tensor [B, T] of teacher tail masses; got {_describe(alpha)}")
    _check_mask(mask, alpha.shape)
    a = torch.where(mask, alpha.detach(), 0.0)  # [B, T]
    doc, n_docs = sequence_index(mask, segment_ids)
    total = a.new_zeros(n_docs).index_add_(0, doc, a.reshape(-1))  # [D]
    count = a.new_zeros(n_docs).index_add_(0, doc, mask.reshape(-1).to(a.dtype)).clamp_min(1)  # [D]
    return (total / count)[doc].view_as(a)  # [B, T]


def log_alpha_mean(abar: torch.Tensor) -> torch.Tensor:
    """log ᾱ float64 of a given ᾱ (``seq_alpha_mean``); −inf (no tail term) where ᾱ ≤ 0."""
    abar = abar.detach().double()
    return torch.where(abar > 0, abar.log(), -_INF)


def tail_log_weight(log_abar: torch.Tensor, beta: float) -> torch.Tensor:
    """log β(X) = log β − log ᾱ(X) per position, float64: TAD's row weight as its kernels take it (β(X) itself
    overflows float64 where ᾱ is below its range; the kernels need it there only times α^T, as exp(log β(X) + log
    α^T)). −inf (no tail term) where ᾱ = 0, where it is NaN (a NaN logit in the sequence: that row is NaN anyway,
    the others keep D_KL1) and where β = 0."""
    log_abar = log_abar.double()
    if beta == 0:
        return torch.full_like(log_abar, -_INF)
    return torch.where((log_abar == -_INF) | torch.isnan(log_abar), -_INF, math.log(beta) - log_abar)


def tad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    k: int = 10,
    beta: float = 2.0,
    segment_ids: torch.Tensor | None = None,
    seq_alpha_mean: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Tail-Aware Distillation divergence L_DIV per token (paper Eq. 3), 0 at masked positions.

    L_DIV(t) = D_KL1(t) + β(X) · α^T(t) · D_KL2(t),  β(X) = β / ᾱ(X),  ᾱ(X) = mean α^T over the valid tokens of t's
    sequence (its row, or its document when ``segment_ids`` is given; see `sequence_alpha_mean`). β(X) depends on
    the teacher only and carries no gradient; ᾱ = 0 (no teacher tail anywhere in X) defines the tail term as 0. ᾱ
    is averaged in log space (`sequence_log_alpha_mean`) and the kernel takes log β(X): exact also where every tail
    of X is beyond ~708 nats (ᾱ below float64's range).
    ``seq_alpha_mean`` [B, T] supplies ᾱ computed elsewhere (chunked callers; β(X) ≡ 1 with ``seq_alpha_mean =
    beta`` gives forward KL). 𝒦 and the tail masses are those of `tad_decompose`. Cost is that of `forward_kl` (one
    pass, α^T·D_KL2 summed over the tail directly; closed-form gradient Eq. 6: `divergences.tad_kernel`). The paper
    uses τ = 1 (default), K = 10, β = 2. Shapes: logits [B, T, V], mask [B, T] bool -> [B, T]; float32 (float64 for
    float64 input).
    """
    check_logits(student_logits, teacher_logits)
    if student_logits.dim() != 3:
        raise ValueError(
            f"tad expects logits [B, T, V] (a batch of sequences: β(X) is per sequence); got shape "
            f"{tuple(student_logits.shape)}; add the batch dimension with unsqueeze(0)"
        )
    n_batch, n_time, vocab = student_logits.shape
    _check_k(k, vocab)
    check_nonnegative("beta", beta)
    check_temperature(temperature)
    _check_mask(mask, student_logits.shape[:-1])
    if seq_alpha_mean is not None and segment_ids is not None:
        raise ValueError("pass segment_ids or seq_alpha_mean, not both (seq_alpha_mean already fixes the sequences)")
    bad_abar = not isinstance(seq_alpha_mean, torch.Tensor) or seq_alpha_mean.shape != mask.shape
    if seq_alpha_mean is not None and bad_abar:
        raise ValueError(
            f"seq_alpha_mean must be a tensor of shape {tuple(mask.shape)} (ᾱ of each token's sequence, e.g. from "
            f"sequence_alpha_mean); got {_describe(seq_alpha_mean)}"
        )
    s, t = scaled_pair(student_logits, teacher_logits, temperature, own_teacher=True)
    kernel = dv.tad_kernel(k)
    teacher = kernel.teacher(t.reshape(-1, vocab))  # top-K split, α^T [B*T] (t's buffer consumed)
    if seq_alpha_mean is None:  # log ᾱ [B, T] float64, exact below float64's range
        log_abar = sequence_log_alpha_mean(teacher.log_alpha.view(n_batch, n_time), mask, segment_ids)
    else:
        log_abar = log_alpha_mean(seq_alpha_mean)
    log_w = tail_log_weight(log_abar, beta)  # [B, T] log β(X): the kernel's row weight
    loss = _Rows.apply(s.reshape(-1, vocab), kernel, teacher, log_w.reshape(-1), mask.reshape(-1))  # [B*T]
    return loss.view(n_batch, n_time)


def topk_bucket_kl(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    teacher_tail_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """D_KL1 from a sparse (cached) teacher: Σ_{k∈𝒦} p_k log(p_k/q_k) + α^T log(α^T/α^S), per token.

    ``teacher_topk_ids`` [..., K] (int) and ``teacher_topk_logprobs`` [..., K] are the teacher's top-K ids and their
    true log-probabilities under the full teacher softmax (not renormalised over K). α^T = 1 − Σ_k p_k is computed
    as −expm1(logsumexp(log p_k)) clamped at 0 (known to the absolute precision of the log-probs, ~1e-7 in float32);
    pass ``teacher_tail_mass`` [...] if the cache stored α^T itself. α^S comes from the student's tail. Equals
    `tad_decompose`'s d_kl1 for the same 𝒦 (closed-form gradient: `divergences.SPARSE`, the top-K cache's kernel).
    D_KL2 needs the teacher tail and is not available from such a cache. Shapes: student_logits [..., V] -> [...];
    float32 (float64 for float64 input).
    """
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be a floating-point tensor [..., V]; got {_describe(student_logits)}")
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    ids, lp = teacher_topk_ids, teacher_topk_logprobs
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.shape[:-1] != lead:
        raise ValueError(
            f"teacher_topk_ids must be an integer tensor [{', '.join(map(str, lead))}, K]; got {_describe(ids)}"
        )
    if not isinstance(lp, torch.Tensor) or not lp.is_floating_point() or lp.shape != ids.shape:
        raise ValueError(
            f"teacher_topk_logprobs must be a float tensor shaped like teacher_topk_ids {tuple(ids.shape)}; "
            f"got {_describe(lp)}"
        )
    _check_k(ids.shape[-1], vocab)
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(
            f"teacher_topk_ids must be token ids in [0, {vocab}); the cache and the student vocabulary differ"
        )
    dtype = _compute_dtype(student_logits, lp)
    s, lp = student_logits.to(dtype), lp.detach().to(dtype)  # [..., V], [..., K]
    if teacher_tail_mass is None:
        alpha_t = (-torch.expm1(torch.logsumexp(lp, dim=-1))).clamp_min(0)  # [...] 1 − Σ p_k
    elif isinstance(teacher_tail_mass, torch.Tensor) and teacher_tail_mass.shape == lead:
        alpha_t = teacher_tail_mass.detach().to(dtype).clamp_min(0)  # [...]
    else:
        raise ValueError(
            f"teacher_tail_mass must be a tensor of shape {tuple(lead)}; got {_describe(teacher_tail_mass)}"
        )
    K = ids.shape[-1]
    teacher = dv.SparseTeacher(ids.reshape(-1, K), lp.reshape(-1, K), torch.log(alpha_t).reshape(-1))
    return _Rows.apply(s.reshape(-1, vocab), dv.SPARSE, teacher, None, None).view(lead)


def cache_divergence(student_logits: torch.Tensor, teacher: dv.SparseTeacher, mask: torch.Tensor,
                     row_log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token divergence [B, T] of dense student logits [B, T, V] (τ = 1) against a top-K teacher cache
    (`divergences.SparseTeacher`, fields [B, T, ...]): D_KL1 exactly, plus w × the unbiased estimate of α^T·D_KL2
    where the cache holds tail samples, w given as ``row_log_weight`` [B, T] = log w (log β(X) for TAD, as
    `tail_log_weight` gives it; 0 for KD; None: D_KL1 only). 0 at masked positions. Closed-form gradient: the kernel
    of the chunked path, `divergences.SPARSE`."""
    dtype = _compute_dtype(student_logits)
    B, T, vocab = student_logits.shape
    rows = dv.SparseTeacher(*(None if x is None else x.detach().reshape(B * T, *x.shape[2:]) for x in teacher))
    w = None if row_log_weight is None else row_log_weight.reshape(-1)
    return _Rows.apply(student_logits.to(dtype).reshape(-1, vocab), dv.SPARSE, rows, w, mask.reshape(-1)).view(B, T)


# --------------------------------------------------------------------------- label-anchored decouplings


def _target_split(w_logits: torch.Tensor, v_logits: torch.Tensor, y: torch.Tensor):
    """(KL(b^w‖b^v), KL(ŵ‖v̂)) for the split of the vocabulary into the anchor y [...] and the rest.

    b = (P(y), 1 − P(y)) with 1 − P(y) from the rest's log-sum-exp; ŵ, v̂ = the distributions renormalised over
    i ≠ y (ŵ undefined when w has no mass off y: that term is then 0).
    """
    idx = y[..., None]  # [..., 1]
    rest_w, rest_v = w_logits.scatter(-1, idx, -_INF), v_logits.scatter(-1, idx, -_INF)  # [..., V]
    lse_rest_w, lse_rest_v = _safe_logsumexp(rest_w), _safe_logsumexp(rest_v)  # [...]
    lse_w, lse_v = _safe_logsumexp(w_logits), _safe_logsumexp(v_logits)  # [...]
    log_bw = torch.stack([w_logits.gather(-1, idx).squeeze(-1) - lse_w, lse_rest_w - lse_w], dim=-1)  # [..., 2]
    log_bv = torch.stack([v_logits.gather(-1, idx).squeeze(-1) - lse_v, lse_rest_v - lse_v], dim=-1)  # [..., 2]
    binary = kl_terms(log_bw.exp(), log_bw, log_bv)  # [...]
    log_w_hat = rest_w - _finite_or_zero(lse_rest_w)[..., None]  # [..., V] −inf at y
    log_v_hat = rest_v - _finite_or_zero(lse_rest_v)[..., None]  # [..., V]
    return binary, kl_terms(log_w_hat.exp(), log_w_hat, log_v_hat)


def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022), label-anchored, per token: α·KL(b^p‖b^q) + β·KL(p̂‖q̂)  (TCKD + NCKD).

    y = labels; b^p = (p_y, 1 − p_y), b^q likewise; p̂, q̂ = p, q renormalised over i ≠ y. Exact split:
    KL(p‖q) = KL(b^p‖b^q) + (1 − p_y) KL(p̂‖q̂). Defaults α = 1, β = 8 (the DKD paper's); τ divides both sides'
    logits, and unlike the DKD paper there is no τ² factor. Positions with label −100 give 0.
    Shapes: logits [..., V], labels [...] (int) -> [...]; float32 (float64 for float64 input).
    """
    check_logits(student_logits, teacher_logits)
    valid = _check_labels(labels, student_logits.shape[:-1], student_logits.shape[-1])  # [...]
    check_nonnegative("alpha", alpha)
    check_nonnegative("beta", beta)
    check_temperature(temperature)
    s, t = scaled_pair(zero_masked_rows(student_logits, valid), zero_masked_rows(teacher_logits, valid), temperature)
    tckd, nckd = _target_split(t, s, torch.where(valid, labels, 0))  # [...], [...]
    return torch.where(valid, alpha * tckd + beta * nckd, 0.0)


def drkl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    gamma: float = 0.5,
    anchor: str = "label",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Diversity-aware reverse KL (arXiv 2604.00223, formulas.md §4), per token: KL(b^q‖b^p) + γ·KL(q̂‖p̂).

    y = the anchor token: ``anchor="label"`` (default) uses labels, ``"teacher_argmax"`` uses argmax p (labels may
    then be None; if given, −100 still marks ignored positions). b^q = (q_y, 1 − q_y), q̂, p̂ = q, p renormalised
    over i ≠ y. Reverse KL is the same with γ replaced by (1 − q_y); a fixed γ removes the push of the non-target
    term on z_y (q̂ does not depend on z_y). Positions with label −100 give 0. τ divides both logits, no τ².
    Shapes: logits [..., V], labels [...] (int) or None -> [...]; float32 (float64 for float64 input).
    """
    check_logits(student_logits, teacher_logits)
    if anchor not in DRKL_ANCHORS:
        raise ValueError(f"anchor must be one of {', '.join(map(repr, DRKL_ANCHORS))}; got {anchor!r}")
    if labels is None and anchor == "label":
        raise ValueError("labels is None but anchor='label'; pass labels or use anchor='teacher_argmax'")
    lead = student_logits.shape[:-1]
    valid = torch.ones(lead, dtype=torch.bool, device=student_logits.device)  # [...]
    if labels is not None:
        valid = _check_labels(labels, lead, student_logits.shape[-1])
    check_nonnegative("gamma", gamma)
    check_temperature(temperature)
    if labels is not None:  # (without labels every position is valid)
        student_logits, teacher_logits = (zero_masked_rows(x, valid) for x in (student_logits, teacher_logits))
    # the teacher's mode from its logits: dividing by the temperature can round two of them into a tie
    y = teacher_logits.argmax(-1) if anchor == "teacher_argmax" else torch.where(valid, labels, 0)  # [...]
    s, t = scaled_pair(student_logits, teacher_logits, temperature)
    binary, nontarget = _target_split(s, t, y)  # [...], [...]
    return torch.where(valid, binary + gamma * nontarget, 0.0)


DRKL_ANCHORS = ("label", "teacher_argmax")


# --------------------------------------------------------------------------- hidden states


def hidden_cosine(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    projection: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor | None = None,
) -> torch.Tensor:
    """DistilBERT-style cosine loss per token: 1 − cos(h_S, h_T), 0 at masked positions.

    ``projection`` maps the student width d_S to the teacher's d_T: a callable / nn.Module, or a weight [d_T, d_S]
    (h_S Wᵀ). Without one and d_S < d_T, h_S is compared with the teacher's first d_S coordinates (consistent with
    a student initialised by width truncation). Shapes: hidden [B, T, d], mask [B, T] bool -> [B, T]; float32
    (float64 for float64 input).
    """
    for name, h in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.dim() != 3:
            raise ValueError(f"{name} must be a float tensor [B, T, d]; got {_describe(h)}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"shape mismatch: student_hidden {tuple(student_hidden.shape)} vs teacher_hidden "
            f"{tuple(teacher_hidden.shape)}; pass the same tokens to both models"
        )
    _check_mask(mask, student_hidden.shape[:-1])
    d_s, d_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
    h_s, h_t = zero_masked_rows(student_hidden, mask), zero_masked_rows(teacher_hidden.detach(), mask)  # [B, T, d]
    if projection is None:
        if d_s > d_t:
            raise ValueError(
                f"student width {d_s} > teacher width {d_t}; pass projection (a module or a [d_T, d_S] weight)"
            )
        h_t = h_t[..., :d_s]  # [B, T, d_S]
    elif isinstance(projection, torch.Tensor):
        if projection.shape != (d_t, d_s):
            raise ValueError(
                f"projection weight must have shape [d_T, d_S] = [{d_t}, {d_s}]; got {tuple(projection.shape)}"
            )
        h_s = F.linear(h_s, projection.to(h_s.dtype))  # [B, T, d_T]
    else:
        h_s = projection(h_s)  # [B, T, d_T]
        if h_s.shape[:-1] != h_t.shape[:-1] or h_s.shape[-1] != d_t:
            raise ValueError(f"projection must map [B, T, {d_s}] to [B, T, {d_t}]; it returned {tuple(h_s.shape)}")
    dtype = _compute_dtype(h_s, h_t)
    cos = F.cosine_similarity(h_s.to(dtype), h_t.to(dtype), dim=-1, eps=1e-8)  # [B, T]
    return torch.where(mask, 1 - cos, 0.0)
