"""Chunked LM head + loss: from final hidden states to loss SUMS, never [N, V] logits at once.

At the paper's scale (V = 152k, T = 2048, batch 128) one float32 [B, T, V] logits tensor is ~159 GB. This module
computes the student's and the teacher's LM heads chunk by chunk (``chunk_size`` tokens at a time) and, per chunk,
the per-token CLM and divergence values AND their logit gradients G (Liger-style), accumulating

    grad_hidden[chunk] = G · W        grad_W += Gᵀ · h        (grad_bias += Σ_rows G)

so neither forward nor backward stores anything of size N·V. It returns sums over the valid tokens; the one
denominator (the global count of valid tokens) is `tailkd.objective`'s.

Per chunk, a divergence with a closed-form gradient runs its `divergences.RowKernel` (teacher rows → value →
gradient, the same functions the dense path uses) — on CUDA with triton installed, for kd, rkl, jsd and tad (K <=
64) in float32, and against a top-K cache teacher for every loss, the same formulas as Triton kernels instead
(`tailkd.kernels`: a statistics pass and a gradient pass written in place, the CLM's one-hot included, no [n, V]
temporaries besides the two sides' logits, which stay in the matmul's bf16/fp16 where that is exact:
`_low_logits`); one without (DKD, DRKL, TVD, any new
per-token loss) is differentiated by autograd on the chunk's logits. The CLM gradient softmax(z) − onehot(y) is folded
into the same buffer, then the chain rule goes through the model's logit transforms (`tailkd.head`) back to the
head's matmul.

Chunk sizes (`chunk_tokens`): on the CPU ~2^24 logits per chunk (cache-sized), and tail-weight losses grow their
chunks to whole sequences; on CUDA one rule for every loss, from the free device memory and the matmul shape
(thousands of tokens at V ≈ 150k), grown to whole rows where they fit the memory bound (so TAD needs no statistics
pass), so that losses are compared under the same chunking.

TAD's β(X) = β / ᾱ(X) needs the teacher tail mass of every valid token of a sequence (a row, or a document of a
packed row). Chunks are cut at sequence boundaries where possible; a chunk then holds whole sequences and ᾱ is
computed inside it for free. Sequences longer than a chunk get ᾱ from a cheap teacher-statistics pass first
(teacher head + top-K + log-sum-exp over their tokens, chunk by chunk). Chunk sizes therefore do not change the
loss or the gradients (tests/test_fused.py). A top-K teacher cache (`divergences.SparseTeacher`) gives ᾱ exactly.

No Hugging Face or config import here: heads come as `tailkd.head.Head`, the loss as a bound
`tailkd.registry.Divergence`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from tailkd import divergences as dv
from tailkd.data import IGNORE_INDEX, to_device
from tailkd.errors import TailkdError
from tailkd.head import Head, HeadSpec, transform, transform_backward
from tailkd.losses import group_log_mean, log_alpha_mean, sequence_index
from tailkd.registry import Divergence

__all__ = ["AUTO_BYTES", "ChunkSums", "chunk_tokens", "chunked_sums", "default_chunk_size", "device_chunk",
           "grows_to_whole_sequences", "teacher_log_tail_mass", "use_fused", "whole_sequence_chunk"]

AUTO_BYTES = 1 << 30  # fused_loss=auto: fuse when one side's float32 logits [N, V] would exceed 1 GiB
_CHUNK_ELEMENTS = 1 << 24  # default chunk: ~64 MiB per float32 [chunk, V] buffer (a chunk uses ~5 of them)
_WHOLE_SEQUENCE_ELEMENTS = 1 << 28  # tail-weight losses: grow chunks to whole sequences, up to 1 GiB per buffer
# CUDA (leads, to be measured on the card): 2^28 logits per chunk and at least `hidden` tokens keep the head matmuls
# on the tensor cores busy and the [V, d] weight-gradient accumulation (read + written once per chunk) a minor cost;
# memory: the torch path's ~6 float32 [chunk, V] buffers + the matmul-dtype gradient copy in a quarter of free memory
_GPU_CHUNK_ELEMENTS = 1 << 28
_GPU_FLOAT32_BUFFERS = 6
_GPU_FREE_FRACTION = 0.25
_GPU_MIN_TOKENS, _GPU_MAX_TOKENS, _GPU_ALIGN = 128, 16384, 128
_TRITON_DEVICES = ("cuda",)  # where the Triton row kernels replace the torch ones (tests add "cpu": interpreter)


def default_chunk_size(vocab: int) -> int:
    """Tokens per chunk: ~2^24 logits per [chunk, V] buffer, at least 16 and at most 4096 tokens."""
    return int(min(4096, max(16, _CHUNK_ELEMENTS // max(1, vocab))))


def whole_sequence_chunk(vocab: int, longest: int) -> int:
    """Tokens per chunk where `grows_to_whole_sequences`: `default_chunk_size`, grown to ``longest`` tokens (whole
    sequences: no statistics pass) up to 2^28 logits per [chunk, V] buffer."""
    return max(default_chunk_size(vocab), min(int(longest), _WHOLE_SEQUENCE_ELEMENTS // max(1, vocab)))


def grows_to_whole_sequences(d: Divergence | None, sparse: bool, device_type: str, chunk_size: int | None,
                             abar_given: bool = False) -> bool:
    """Whether the layer's chunks grow to whole sequences (`whole_sequence_chunk`): on the CPU (CUDA gives every loss
    the same chunk, `chunk_tokens`) when the caller gives no ``chunk_size``, for a computed divergence ``d`` with a
    tail weight whose ᾱ comes from the batch — not from a top-K cache (``sparse``: α^T is cached) nor given
    (``abar_given``: ``seq_alpha_mean``)."""
    return (d is not None and d.spec.tail_weight and not sparse and not abar_given and chunk_size is None
            and device_type != "cuda")


def chunk_tokens(device_type: str, vocab: int, hidden: int, free_bytes: int | None, dtype: torch.dtype,
                 row_tokens: int = 0) -> int:
    """Tokens per chunk when the caller gives none: the same for every loss on a device.

    CPU (and anything but CUDA): `default_chunk_size` (cache-sized). CUDA: max(2^28 / V, ``hidden``) tokens (the
    matmul shape), at most what fits ``_GPU_FLOAT32_BUFFERS`` float32 [chunk, V] buffers + one of the matmul
    ``dtype`` in a quarter of ``free_bytes``, rounded down to a multiple of 128, within [128, 16384]; grown to
    ``row_tokens`` (rounded up to a multiple of 128: whole rows of the batch) where that fits the same bounds, so a
    sequence never spans chunks and TAD's ᾱ needs no statistics pass (measured on an H200, bench/RESULTS.md: at
    N = 8192 in one row, chunks of 2048 tokens cost TAD that pass, 1.35-1.41× KD's time; one chunk of the row,
    1.03-1.06×; KD's time is flat in the chunk there)."""
    if device_type != "cuda":
        return default_chunk_size(vocab)
    vocab = max(1, int(vocab))
    by_shape = max(-(-_GPU_CHUNK_ELEMENTS // vocab), int(hidden))
    per_token = vocab * (_GPU_FLOAT32_BUFFERS * 4 + torch.empty(0, dtype=dtype).element_size())
    by_memory = int(max(0, free_bytes or 0) * _GPU_FREE_FRACTION) // per_token
    cap = min(by_memory, _GPU_MAX_TOKENS)
    tokens = min(by_shape, cap) // _GPU_ALIGN * _GPU_ALIGN
    whole = -(-int(row_tokens) // _GPU_ALIGN) * _GPU_ALIGN
    if tokens < whole <= cap:
        tokens = whole
    return int(max(_GPU_MIN_TOKENS, tokens))


def device_chunk(device: torch.device, vocab: int, hidden: int, dtype: torch.dtype, row_tokens: int = 0) -> int:
    """`chunk_tokens` for a device, reading its free memory on CUDA."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return chunk_tokens(device.type, vocab, hidden, free, dtype, row_tokens)


def use_fused(mode: str, num_tokens: int, vocab: int) -> bool:
    """The ``train.fused_loss`` decision: "on", "off", or "auto" (one side's float32 logits N·V·4 bytes > 1 GiB).

    Every loss of the registry has a chunked form (a row kernel, or autograd per chunk)."""
    if mode not in ("auto", "on", "off"):
        raise TailkdError(f"train.fused_loss={mode!r} is not one of auto, on, off")
    return num_tokens * vocab * 4 > AUTO_BYTES if mode == "auto" else mode == "on"


# --------------------------------------------------------------------------- the plan of one call


@dataclass
class _Plan:
    """Everything a pass over the chunks needs besides the differentiable student inputs (tokens = valid ones)."""

    d: Divergence | None  # None: CLM only
    kernel: dv.RowKernel | None  # the divergence's (or the sparse teacher's) row kernel; None: autograd per chunk
    spec: HeadSpec
    labels: torch.Tensor  # [M]
    chunks: list[tuple[int, int]]
    cdtype: torch.dtype
    mm_dtype: torch.dtype
    temperature: float = 1.0
    teacher_hidden: torch.Tensor | None = None  # [M, d_T]
    teacher_head: Head | None = None
    sparse: dv.SparseTeacher | None = None  # fields [M, ...]
    log_abar: torch.Tensor | None = None  # [M] float64 log ᾱ of the token's sequence (tail-weight losses); NaN = in
    # the chunk
    # chunk start -> (chunk-local sequence id [n] on the device, number of local ids) for the chunks holding
    # sequences they close themselves (ᾱ computed in the chunk); planned once, so no chunk asks the device
    local: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    triton: object | None = None  # kernels.RowLoss: the chunk's row maths by the Triton kernels
    # the dtype of the chunk's logits: cdtype, or the matmul dtype (bf16/fp16) where the Triton kernels read the
    # logits as the matmul wrote them and write G over them in it (`_low_logits`): no float32 copy of [n, V]
    logits_dtype: torch.dtype = torch.float32


class ChunkSums(NamedTuple):
    """``total`` = Σ_valid (clm_weight·CLM + div_weight·D), differentiable; ``clm``, ``div``: Σ_valid CLM and D."""

    total: torch.Tensor
    clm: torch.Tensor
    div: torch.Tensor


# --------------------------------------------------------------------------- one chunk


def _teacher_logits(plan: _Plan, a: int, b: int, scaled: bool) -> torch.Tensor:
    """Teacher logits of tokens [a, b) in the compute dtype (divided by τ when ``scaled``): [n, V]."""
    head = plan.teacher_head
    w = head.weight[: head.spec.vocab_size]
    mm = torch.promote_types(plan.teacher_hidden.dtype, w.dtype)
    # the kernels read bf16/fp16 teacher logits as the matmul wrote them where the student's are read so
    keep = (plan.logits_dtype != plan.cdtype and mm in (torch.bfloat16, torch.float16) and head.bias is None
            and _plain(head.spec) and (not scaled or plan.temperature == 1.0))
    t = (plan.teacher_hidden[a:b].to(mm) @ w.to(mm).T).to(mm if keep else plan.cdtype)  # [n, V] <- chunk-sized
    if head.bias is not None:
        t += head.bias[: head.spec.vocab_size].to(plan.cdtype)
    t = transform(t, head.spec)
    return t.div_(plan.temperature) if scaled and plan.temperature != 1.0 else t


def _row_weight(plan: _Plan, a: int, b: int, teacher) -> torch.Tensor | None:
    """The kernel's row weight for tokens [a, b) as its log, from log ᾱ (precomputed, or of the α^T of each
    chunk-closed sequence): log β(X) for TAD's kernel and a top-K cache teacher's; 0 (w = 1) for a sparse KD teacher
    with tail samples; None otherwise. float64."""
    if not plan.d.spec.tail_weight:
        return (torch.zeros(b - a, dtype=torch.float64, device=plan.labels.device) if plan.sparse is not None
                else None)
    log_abar = plan.log_abar[a:b]
    if a in plan.local:
        local, n_seq = plan.local[a]  # [n]
        log_abar = torch.where(torch.isnan(log_abar), group_log_mean(teacher.log_alpha, local, n_seq)[local],
                               log_abar)
    return plan.d.row_log_weight(log_abar)


def _autograd_div(plan: _Plan, z: torch.Tensor, a: int, b: int, coef: torch.Tensor, want_grad: bool):
    """(D [n], ∂(Σ coef·D)/∂z [n, V]) of a loss without a row kernel, by autograd on the chunk's logits z."""
    t = _teacher_logits(plan, a, b, scaled=False)  # [n, V] the per-token function applies τ itself
    y = plan.labels[a:b]
    mask = torch.ones_like(y, dtype=torch.bool)
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(want_grad)
        div = plan.d.per_token(leaf[None], t[None], y[None], mask[None])[0]  # [n]
        if not want_grad:
            return div.detach(), None
        (grad,) = torch.autograd.grad(div, leaf, grad_outputs=coef.to(div.dtype))
    return div.detach(), grad


def _chunk(plan: _Plan, a: int, b: int, h, w_mm, bias, coef_clm: float, coef_div: float, want_grad: bool):
    """Values (clm [n], div [n]) of tokens [a, b) and G [n, V] = ∂(coef_clm·clm + coef_div·div)/∂(raw head out)."""
    u = (h[a:b].to(plan.mm_dtype) @ w_mm.T).to(plan.logits_dtype)  # [n, V] <- chunk-sized logits
    if bias is not None:
        u += bias
    z = transform(u, plan.spec)  # [n, V] the model's logits (u consumed)
    y = plan.labels[a:b][:, None]  # [n, 1]
    n, tau = z.shape[0], plan.temperature
    c_clm = torch.full((n,), float(coef_clm), dtype=plan.cdtype, device=z.device)
    logz = torch.log_softmax(z, dim=-1) if plan.kernel is None or tau != 1.0 else None  # [n, V]
    if plan.d is None:  # CLM only
        clm = -logz.gather(-1, y).squeeze(-1)
        g = logz.exp_().mul_(c_clm[:, None]) if want_grad else None  # softmax(z), − onehot below
        div = torch.zeros_like(clm)
    elif plan.kernel is None:  # autograd on the chunk
        clm = -logz.gather(-1, y).squeeze(-1)
        div, g = _autograd_div(plan, z, a, b, z.new_full((n,), float(coef_div)), want_grad)
        if want_grad:
            g.add_(logz.exp_().mul_(c_clm[:, None]))
    elif plan.triton is not None:  # the same row maths by the Triton kernels (the one-hot folded in)
        clm, div, g = _triton_rows(plan, a, b, z, logz, c_clm, coef_div, want_grad)
        return clm, div, None if g is None else transform_backward(g, z, plan.spec)
    else:  # the divergence's row kernel, on s = z / τ
        s = z / tau if tau != 1.0 else z  # [n, V]
        logq = torch.log_softmax(s, dim=-1)  # [n, V]
        clm = -(logz if logz is not None else logq).gather(-1, y).squeeze(-1)  # [n] cross-entropy of z
        teacher = (dv.SparseTeacher(*(None if x is None else x[a:b] for x in plan.sparse)) if plan.sparse is not None
                   else plan.kernel.teacher(_teacher_logits(plan, a, b, scaled=True)))
        div, state = plan.kernel.forward(s, logq, teacher, _row_weight(plan, a, b, teacher))
        if div.shape != (n,):  # a registry row's own kernel (a broadcast would repeat a sum over the chunk's rows)
            raise ValueError(f"loss {plan.d.name!r}: its row kernel's forward returned values of shape "
                             f"{tuple(div.shape)} for {n} rows; it must return one value per row, ({n},)")
        del teacher, logq  # consumed: what backward needs is in the state
        g = None
        if want_grad:
            cd = z.new_full((n,), float(coef_div) / tau)
            g = plan.kernel.backward(state, cd, c_clm if logz is None else None)  # τ = 1: the CLM softmax is q
            if logz is not None:
                g.add_(logz.exp_().mul_(c_clm[:, None]))  # coef · softmax(z)
        del state
    if not want_grad:
        return clm, div, None
    g.scatter_add_(-1, y, -c_clm[:, None])  # − coef · onehot(y)
    return clm, div, transform_backward(g, z, plan.spec)


def _triton_rows(plan: _Plan, a: int, b: int, z, logz, c_clm, coef_div: float, want_grad: bool):
    """(clm [n], div [n], G [n, V]) of tokens [a, b) by `tailkd.kernels` (against the dense teacher's logits, or a top-K
    cache teacher: `kernels.SPARSE`): statistics pass, then value and G = ∂/∂z written over s (a copy of z only
    where the soft-cap's backward still needs z), the CLM's −onehot(y) included. At τ = 1 the CLM softmax is folded
    into G (cq) and CLM = −((z_y − m) − log S) comes from the statistics. z may be bf16/fp16 (`_Plan.logits_dtype`):
    the kernels compute in float32 and round G once to z's dtype."""
    from tailkd import kernels

    tau, y = plan.temperature, plan.labels[a:b][:, None]
    s = z / tau if tau != 1.0 else z  # [n, V]
    out = None
    if want_grad:
        out = torch.empty_like(s) if s is z and plan.spec.softcap is not None else s
    cd = torch.full((z.shape[0],), float(coef_div) / tau, dtype=torch.float32, device=z.device)
    cq = c_clm if logz is None else None  # τ = 1: the CLM softmax is q, folded into G
    sparse = plan.sparse is not None  # a top-K cache teacher
    if sparse:
        t = dv.SparseTeacher(*(None if x is None else x[a:b] for x in plan.sparse))
        stats = kernels.sparse_stats(s, t)
        w = _row_weight(plan, a, b, t)
    else:
        t = _teacher_logits(plan, a, b, scaled=True)  # [n, V]
        stats = kernels.row_stats(s, t, plan.triton.k)
        w = _row_weight(plan, a, b, stats)
    if logz is None:  # τ = 1: s is z; (m, log S) of s are both statistics' first two columns (read before G
        st = stats.stats  # overwrites s)
        clm = -((s.gather(-1, y).squeeze(-1).to(plan.cdtype) - st[:, 0]) - st[:, 1])
    else:
        clm = -logz.gather(-1, y).squeeze(-1)
    if sparse:
        div = kernels.sparse_values_and_grads(s, t, stats, w, cd, cq, out, y=y, cy=c_clm)
    else:
        div = kernels.row_values_and_grads(plan.triton, s, t, stats, w, cd, cq, out, y=y, cy=c_clm)
    if out is not None and logz is not None:
        out.add_(logz.exp_().mul_(c_clm[:, None]))  # coef · softmax(z)
    return clm, div, out


_WIDE_OUT = {"cuda"}  # devices whose bf16/fp16 matmuls may write float32 (addmm's out_dtype; not on the CPU)


def _matmul_into(out: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, accumulate: bool) -> None:
    """out (+)= m1 @ m2 in place, m1 and m2 in the matmul dtype. A wider ``out`` (float32 over bf16/fp16 products) on
    CUDA: one cuBLAS call with float32 output (addmm's ``out_dtype``), no product rounded to the matmul dtype and no
    [rows, cols] temporary (for grad_W of a float32 head: 1.2 GB at V = 151936, d = 2048); elsewhere the product in
    the matmul dtype, upcast."""
    if out.dtype == m1.dtype:
        if accumulate:
            out.addmm_(m1, m2)
        else:
            torch.mm(m1, m2, out=out)
        return
    if out.device.type in _WIDE_OUT and out.dtype == torch.float32 and m1.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(out, m1, m2, beta=1 if accumulate else 0, out_dtype=torch.float32, out=out)
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # a torch without addmm's out_dtype (or this dtype pair): the plain way
            _WIDE_OUT.discard(out.device.type)  # from now on
    if accumulate:
        out += (m1 @ m2).to(out.dtype)
    else:
        out.copy_(m1 @ m2)


def _run_chunks(plan: _Plan, h, w, bias, coef_clm: float, coef_div: float, need_h: bool, need_w: bool,
                need_b: bool):
    """One pass over the chunks: per-token values [M] and (if asked) the gradients of h [M, d], W, bias."""
    vocab = plan.spec.vocab_size
    w_v = w[:vocab]
    w_mm = w_v.detach().to(plan.mm_dtype)  # [V, d] cast once per pass
    b_c = bias[:vocab].detach().to(plan.cdtype) if bias is not None else None
    want_grad = need_h or need_w or need_b
    n_tok = h.shape[0]
    clm_all = torch.zeros(n_tok, dtype=plan.cdtype, device=h.device)
    div_all = torch.zeros_like(clm_all)
    grad_h = torch.zeros(h.shape, dtype=plan.cdtype, device=h.device) if need_h else None
    acc = torch.promote_types(plan.cdtype, w.dtype)
    # grad_W: the first chunk's product is written (β = 0), the later ones added: no zero fill of [V, d] first
    grad_w = torch.empty(w_v.shape, dtype=acc, device=w.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=w.device) if need_b else None
    h = h.detach()
    for a, b in plan.chunks:
        clm, div, g = _chunk(plan, a, b, h, w_mm, b_c, coef_clm, coef_div, want_grad)
        clm_all[a:b], div_all[a:b] = clm, div
        if g is None:
            continue
        g_mm = g.to(plan.mm_dtype)  # [n, V]
        if need_h:
            _matmul_into(grad_h[a:b], g_mm, w_mm, accumulate=False)  # [n, d] written in place
        if need_w:
            _matmul_into(grad_w, g_mm.T, h[a:b].to(plan.mm_dtype), accumulate=a > 0)  # [V, d] (+)= Gᵀ h (the
            # chunks cover [0, M) in order: the first starts at 0)
        if need_b:
            grad_b += g.sum(0).to(acc)
        del g, g_mm  # before the next chunk allocates its buffers: one chunk's [n, V] buffers alive at a time
    if grad_w is not None and not plan.chunks:  # no token
        grad_w.zero_()
    if grad_w is not None and w.shape[0] > vocab:  # padded head rows get no gradient
        grad_w = torch.cat([grad_w, grad_w.new_zeros(w.shape[0] - vocab, w.shape[1])])
    if grad_b is not None and bias.shape[0] > vocab:
        grad_b = torch.cat([grad_b, grad_b.new_zeros(bias.shape[0] - vocab)])
    return clm_all, div_all, *(None if g is None else g.to(like.dtype) for g, like in
                               ((grad_h, h), (grad_w, w), (grad_b, bias)))


def _scale_(g: torch.Tensor, g_total: torch.Tensor, expected: float) -> torch.Tensor:
    """g ·= g_total / expected in place: the layer's gradients, computed in forward at the scale ``expected`` (a
    float32 value), take the incoming gradient ``g_total`` — and nothing is done where g_total == expected (no pass
    over [V, d]): decided on the device by `kernels.scale_` where the Triton kernels run (no host read), by reading
    g_total on the CPU (nothing to wait for); on other devices g is always scaled. The product in float32 (float64
    for float64 g) rounded once to g's dtype."""
    if (g.device.type in _TRITON_DEVICES and g_total.dtype == torch.float32 and g.is_contiguous()
            and g.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        from tailkd import kernels

        if kernels.available():
            return kernels.scale_(g, g_total.reshape(1), expected)
    if g_total.device.type == "cpu" and float(g_total) == expected:
        return g
    r = g_total / expected
    if g.dtype in (torch.bfloat16, torch.float16):
        return g.copy_(g.float().mul_(r.float()))
    return g.mul_(r.to(g.dtype))


class _ChunkedSum(torch.autograd.Function):
    """Σ_t (coef_clm·CLM(t) + coef_div·D(t)) and the detached Σ CLM, Σ D; gradients computed in forward, chunk by
    chunk (Liger-style), at the scale ``grad_scale`` (the gradient ``total`` is expected to receive), and scaled by
    the incoming gradient in backward IN PLACE (`_scale_`: not at all where it is the expected one): no second
    [V, d] buffer for ∂W at the start of the backward pass (1.2 GB in float32 at V = 151936, d = 2048), which on the
    CPU is also a fresh allocation's page faults (~60 ms at d = 256). So the layer backpropagates once: a second
    backward through it (``retain_graph=True``) raises instead of scaling the gradients twice."""

    @staticmethod
    def forward(ctx, h, w, bias, plan: _Plan, coef_clm: float, coef_div: float, need: tuple, grad_scale: float):
        with torch.autocast(h.device.type, enabled=False):
            clm, div, gh, gw, gb = _run_chunks(plan, h, w, bias, coef_clm * grad_scale, coef_div * grad_scale,
                                               *need)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (gh, gw, gb)))
        ctx.present = tuple(g is not None for g in (gh, gw, gb))
        ctx.spent = False
        ctx.expected = grad_scale
        clm_sum, div_sum = clm.sum(), div.sum()
        ctx.mark_non_differentiable(clm_sum, div_sum)
        return coef_clm * clm_sum + coef_div * div_sum, clm_sum, div_sum

    @staticmethod
    def backward(ctx, g_total, _g_clm, _g_div):
        if ctx.spent:
            raise RuntimeError("tailkd.fused.chunked_sums backpropagates once: its gradients, computed in forward, "
                               "were scaled in place by the first backward; compute the loss again to backpropagate "
                               "again")
        ctx.spent = True
        grads = [_scale_(g, g_total, ctx.expected) if present else None for g, present in zip(ctx.saved_tensors,
                                                                                                ctx.present)]
        return (*grads, None, None, None, None, None)


# --------------------------------------------------------------------------- planning: valid tokens, chunks, ᾱ


def _plan_chunks(seq: torch.Tensor | None, n_tok: int, chunk: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Chunks over M tokens, cut at sequence boundaries when possible; returns (chunks, split-sequence mask [S])."""
    if seq is None or n_tok == 0:
        return [(a, min(a + chunk, n_tok)) for a in range(0, n_tok, chunk)], torch.zeros(0, dtype=torch.bool)
    n_seq = int(seq.max()) + 1
    pos = torch.arange(n_tok, device=seq.device)
    first = torch.full((n_seq,), n_tok, dtype=torch.long, device=seq.device).scatter_reduce_(0, seq, pos, "amin")
    last = torch.full((n_seq,), -1, dtype=torch.long, device=seq.device).scatter_reduce_(0, seq, pos, "amax")
    present = last >= 0
    delta = torch.zeros(n_tok + 1, dtype=torch.long, device=seq.device)
    delta.index_add_(0, first[present] + 1, torch.ones_like(first[present]))
    delta.index_add_(0, last[present] + 1, -torch.ones_like(last[present]))
    cover = delta.cumsum(0)  # cover[c] = number of sequences split by a cut before token c
    cands = ((cover[1:n_tok] == 0).nonzero().squeeze(1) + 1).tolist()
    chunks, start = [], 0
    while start < n_tok:
        limit = start + chunk
        if limit >= n_tok:
            end = n_tok
        else:
            j = bisect.bisect_right(cands, limit) - 1
            end = cands[j] if j >= 0 and cands[j] > start else limit
        chunks.append((start, end))
        start = end
    cuts = torch.tensor([a for a, _ in chunks[1:]], dtype=torch.long, device=seq.device)
    split = (torch.searchsorted(cuts, last, right=True) - torch.searchsorted(cuts, first, right=True)) > 0
    return chunks, split & present


@torch.no_grad()
def teacher_log_tail_mass(teacher_hidden: torch.Tensor, teacher_head: Head, kernel: dv.RowKernel, *,
                          temperature: float = 1.0, chunk_size: int | None = None, triton=None) -> torch.Tensor:
    """log α^T per token [...] (float64) from the teacher rows of a tail-weight ``kernel`` (TAD's top-K split), chunk
    by chunk: the statistics pass for sequences longer than a chunk. ``teacher_hidden`` [..., d_T]. ``triton``: the
    `kernels.RowLoss` of the chunk maths, whose statistics kernel then gives it (no device synchronisation)."""
    lead = teacher_hidden.shape[:-1]
    h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    cdtype = torch.float64 if torch.float64 in (h.dtype, teacher_head.weight.dtype) else torch.float32
    chunk = chunk_size or default_chunk_size(teacher_head.spec.vocab_size)
    low = triton is not None and h.dtype in (torch.bfloat16, torch.float16)  # the kernel reads bf16/fp16 logits
    plan = _Plan(d=None, kernel=kernel, spec=teacher_head.spec, labels=torch.empty(0), chunks=[], cdtype=cdtype,
                 mm_dtype=cdtype, temperature=temperature, teacher_hidden=h, teacher_head=teacher_head,
                 logits_dtype=h.dtype if low else cdtype)
    out = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
    if triton is not None:
        from tailkd import kernels
    for a in range(0, h.shape[0], chunk):
        b = min(a + chunk, h.shape[0])
        t = _teacher_logits(plan, a, b, scaled=True)
        if triton is not None:  # the statistics kernel on the teacher alone: α^T
            log_alpha = kernels.row_stats(None, t, triton.k).log_mass(1)
        else:
            log_alpha = kernel.teacher(t).log_alpha
        out[a:b] = log_alpha.double()
    return out.view(lead)


def _plain(spec: HeadSpec) -> bool:
    """Whether a head's logits are its raw output (no scale, no soft-cap)."""
    return spec.scale == 1.0 and spec.softcap is None


def _low_logits(plan: _Plan, student_head: Head) -> bool:
    """Whether the Triton kernels may read the student's chunk logits in the matmul dtype and write G over them:
    a bf16/fp16 matmul, τ = 1, no bias and no logit transform, so the logits are exactly what the matmul rounded
    and the kernels' float32 maths sees the same values as through a float32 copy (G is rounded once to the matmul
    dtype either way: the gradient matmuls take it in that dtype)."""
    return (plan.mm_dtype in (torch.bfloat16, torch.float16) and plan.temperature == 1.0 and plan.sparse is None
            and student_head.bias is None and _plain(plan.spec))


def kernel_form(d: Divergence | None, sparse: bool):
    """The `kernels.RowLoss` the Triton kernels compute for divergence ``d`` — against a top-K cache teacher
    (``sparse``) any loss: `kernels.SPARSE`; against a dense teacher kd / rkl / jsd / tad with K <= 64 — or None
    (the torch row maths), whatever the device and whether triton is installed (`_triton_loss`)."""
    from tailkd import kernels

    if d is None:
        return None
    return kernels.SPARSE if sparse else kernels.losses_for(d)


def _triton_loss(d: Divergence | None, sparse, cdtype: torch.dtype, device: torch.device):
    """`kernel_form` where the Triton kernels run (a device of ``_TRITON_DEVICES``, triton importable, float32
    softmax maths), else None."""
    if cdtype != torch.float32 or device.type not in _TRITON_DEVICES:
        return None
    from tailkd import kernels

    return kernel_form(d, sparse is not None) if kernels.available() else None


def _check_head(name: str, head: Head, hidden: torch.Tensor) -> None:
    if not isinstance(head, Head):
        raise TypeError(f"{name} must be a tailkd.head.Head (weight, bias, spec); use head.model_head(model, V)")
    if head.weight.dim() != 2 or head.weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}.weight {tuple(head.weight.shape)} does not match hidden width {hidden.shape[-1]}: "
                         "an LM head's weight is [V, d] (a transpose?)")
    if head.weight.shape[0] < head.spec.vocab_size:
        raise ValueError(f"{name}.weight has {head.weight.shape[0]} rows < vocab_size {head.spec.vocab_size}")


def _check_teacher(d, labels, vocab, teacher_hidden, teacher_head, sparse) -> None:
    if (teacher_hidden is not None) == (sparse is not None):
        raise ValueError(f"loss {d.name!r} needs exactly one teacher: teacher_hidden + teacher_head, or "
                         "sparse_teacher (a top-K cache)")
    if teacher_hidden is not None:
        _check_head("teacher_head", teacher_head, teacher_hidden)
        if teacher_hidden.shape[:-1] != labels.shape:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} does not match labels "
                             f"{tuple(labels.shape)}")
        if teacher_head.spec.vocab_size != vocab:
            raise ValueError(f"vocabulary mismatch: student head V={vocab}, teacher head "
                             f"V={teacher_head.spec.vocab_size}; pass both heads with the shared vocabulary")
        return
    d.check_sparse()
    if d.spec.tail_weight and sparse.topk_ids.shape[-1] != d.cfg.k:
        raise ValueError(f"sparse_teacher has K={sparse.topk_ids.shape[-1]} ids but loss.k={d.cfg.k}; truncate it "
                         "first (tailkd.cache.CacheReader does)")


def _prepare(student_hidden, student_head, labels, d, teacher_hidden, teacher_head, sparse, segment_ids,
             seq_alpha_mean, chunk_size, matmul_dtype, kernels=True) -> tuple[torch.Tensor, _Plan]:
    """Validate, keep the valid tokens, plan the chunks and ᾱ. Returns (h_valid [M, d], plan).

    The plan (valid positions, sequences, chunk cuts) is computed where ``labels`` and ``segment_ids`` live: from
    host tensors it needs no device synchronisation (the training loop passes its host micro-batch); only index
    tensors then travel to the device, without blocking."""
    if student_hidden.dim() != 3 or labels.shape != student_hidden.shape[:-1]:
        raise ValueError(f"student_hidden must be [B, T, d] and labels [B, T]; got {tuple(student_hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    _check_head("student_head", student_head, student_hidden)
    vocab = student_head.spec.vocab_size
    if d is not None:
        _check_teacher(d, labels, vocab, teacher_hidden, teacher_head, sparse)
        if d.spec.tail_weight and not 1 <= d.cfg.k < vocab:
            raise ValueError(f"k must satisfy 1 <= k < V={vocab}; got {d.cfg.k}")
    dev = student_hidden.device
    mask = labels != IGNORE_INDEX  # [B, T] on the plan's device (labels')
    idx_p = mask.reshape(-1).nonzero().squeeze(1)  # [M] valid positions, row-major
    y = labels.reshape(-1)[idx_p]
    if bool(((y < 0) | (y >= vocab)).any()):
        raise ValueError(f"labels must be token ids in [0, {vocab}) or -100")
    idx = to_device(idx_p, dev)
    h = student_hidden.reshape(-1, student_hidden.shape[-1])[idx]  # [M, d_S] (autograd scatters grads back)
    floats = [student_hidden.dtype, student_head.weight.dtype]
    if teacher_hidden is not None:
        floats += [teacher_hidden.dtype, teacher_head.weight.dtype]
    cdtype = torch.float64 if torch.float64 in floats else torch.float32
    mm = matmul_dtype or torch.promote_types(student_hidden.dtype, student_head.weight.dtype)
    kernel = None if d is None else dv.SPARSE if sparse is not None else d.kernel
    plan = _Plan(d=d, kernel=kernel, spec=student_head.spec, labels=to_device(y, dev), chunks=[], cdtype=cdtype,
                 mm_dtype=mm, temperature=1.0 if d is None else d.temperature)
    chunk = int(chunk_size or device_chunk(dev, vocab, h.shape[-1], mm, labels.shape[1]))
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if d is not None and teacher_hidden is not None:
        plan.teacher_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[idx]
        plan.teacher_head = Head(teacher_head.weight.detach(),
                                 teacher_head.bias.detach() if teacher_head.bias is not None else None,
                                 teacher_head.spec)
    if d is not None and sparse is not None:
        plan.sparse = dv.SparseTeacher(*(None if x is None else x.detach().reshape(-1, *x.shape[2:])[idx]
                                      for x in sparse))
        if plan.sparse.topk_ids.device == labels.device and bool((plan.sparse.topk_ids.long() >= vocab).any()):
            raise ValueError(f"the cached teacher ids exceed the vocabulary V={vocab}")  # (the cache reader checks
            # its rows on the host before they go to a device)
    seq = None
    if d is not None and d.spec.tail_weight:
        seg = segment_ids if d.cfg.per_document else None
        if seq_alpha_mean is not None:
            plan.log_abar = log_alpha_mean(seq_alpha_mean.reshape(-1)[idx])
        else:
            seg = None if seg is None else seg.to(labels.device)
            seq = torch.unique(sequence_index(mask, seg)[0][idx_p], return_inverse=True)[1]  # dense 0..S-1
        if plan.sparse is not None and seq is not None:  # α^T is in the cache: ᾱ exactly, before any pass
            n_seq = int(seq.max()) + 1 if seq.numel() else 0
            seq_d = to_device(seq, dev)
            plan.log_abar = group_log_mean(plan.sparse.log_tail_mass, seq_d, n_seq)[seq_d]
            seq = None
        elif grows_to_whole_sequences(d, False, dev.type, chunk_size):  # no statistics pass
            longest = int(mask.sum(1).max()) if seg is None else labels.shape[1]
            chunk = whole_sequence_chunk(vocab, longest)
    plan.triton = _triton_loss(d, plan.sparse, cdtype, dev) if kernels else None
    plan.logits_dtype = mm if plan.triton is not None and _low_logits(plan, student_head) else cdtype
    plan.chunks, split = _plan_chunks(seq, idx_p.numel(), chunk)
    if seq is not None:
        plan.log_abar = torch.full((idx_p.numel(),), math.nan, dtype=torch.float64, device=dev)
        for a, b in plan.chunks:  # the sequences each chunk closes get their ᾱ inside it
            whole = ~split[seq[a:b]]
            if bool(whole.any()):
                local = torch.unique(seq[a:b], return_inverse=True)[1]
                plan.local[a] = (to_device(local, dev), int(local.max()) + 1)
        if bool(split.any()):  # statistics pass over the tokens of sequences that span chunks
            tok_p = split[seq].nonzero().squeeze(1)
            tok, seq_tok = to_device(tok_p, dev), to_device(seq[tok_p], dev)
            log_alpha = teacher_log_tail_mass(plan.teacher_hidden[tok], plan.teacher_head, kernel,
                                              temperature=plan.temperature, chunk_size=chunk, triton=plan.triton)
            plan.log_abar[tok] = group_log_mean(log_alpha, seq_tok, split.shape[0])[seq_tok]
    return h, plan


def chunked_sums(
    student_hidden: torch.Tensor,  # (B, T, d_S) final hidden states (post final norm)
    student_head: Head,
    labels: torch.Tensor,  # (B, T), -100 = ignore; on the host or the device (see below)
    divergence: Divergence | None,
    *,
    clm_weight: float = 1.0,
    div_weight: float = 1.0,
    teacher_hidden: torch.Tensor | None = None,  # (B, T, d_T)
    teacher_head: Head | None = None,
    sparse_teacher: dv.SparseTeacher | None = None,  # fields (B, T, ...)
    segment_ids: torch.Tensor | None = None,
    seq_alpha_mean: torch.Tensor | None = None,  # (B, T) ᾱ computed elsewhere
    chunk_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    kernels: bool = True,
    grad_scale: float = 1.0,
) -> ChunkSums:
    """Σ over valid tokens of clm_weight·CLM + div_weight·D, and Σ CLM, Σ D, from final hidden states in chunks.

    ``divergence``: a bound `tailkd.registry.Divergence`, or None for CLM only. The teacher is its final hidden
    states + LM head (exact), or a top-K cache's `divergences.SparseTeacher` (losses with a sparse form: D_KL1
    [+ sampled tail estimate]). Gradients flow to ``student_hidden`` and ``student_head.weight`` / ``.bias`` (unless
    they do not require grad: a frozen head costs no weight-gradient matmul); they are computed here, in forward,
    at the scale ``grad_scale`` (> 0: the gradient ``total`` is expected to receive; rounded to float32), and scaled
    in place by the one backward through ``total`` by the gradient it does receive divided by ``grad_scale`` —
    where the two are equal, not at all: no pass over [V, d] (`tailkd.objective` passes 1 / its denominator, the
    gradient its division sends back). A second backward (``retain_graph=True``) raises.
    ``matmul_dtype`` (e.g. torch.bfloat16 on GPU) sets the head matmuls' dtype; softmax math is float32 (float64 for
    float64 inputs).
    ``kernels=False`` keeps the torch row maths where the Triton kernels would apply (CUDA, triton installed).
    ``labels`` and ``segment_ids`` may be host tensors while the hidden states are on CUDA: the chunk plan is then
    computed on the host, without waiting for the device. Divide by the number of valid tokens yourself
    (`tailkd.objective` does, once).
    """
    expected = float(torch.tensor(grad_scale, dtype=torch.float32))
    if not 0 < expected < math.inf:
        raise ValueError(f"grad_scale must be positive and finite in float32; got {grad_scale}")
    h, plan = _prepare(student_hidden, student_head, labels, divergence, teacher_hidden, teacher_head,
                       sparse_teacher, segment_ids, seq_alpha_mean, chunk_size, matmul_dtype, kernels)
    w, bias = student_head.weight, student_head.bias
    grad_on = torch.is_grad_enabled()
    need = (grad_on and h.requires_grad, grad_on and w.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    return ChunkSums(*_ChunkedSum.apply(h, w, bias, plan, float(clm_weight),
                                        float(div_weight) if divergence is not None else 0.0, need, expected))
