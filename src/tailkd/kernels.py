"""Triton kernels of the chunked loss layer's row maths: row statistics and closed-form logit gradients (CUDA).

The torch functions of `tailkd.divergences` stay the definition, the CPU path and the reference; these kernels
compute the same formulas for a chunk of rows without the [n, V] temporaries (log q, p, q, log m, ...) of the torch
path. Per chunk (rows = tokens; s = student logits at temperature τ, t = teacher logits at τ, both [n, V], bf16,
fp16 or float32 in, float32 arithmetic):

1. `row_stats` — one streaming pass over s and t: the online log-sum-exp of both sides, kept as (max m, log S) so
   that a log-probability is (x_i − m) − log S, the formula of torch's log_softmax; for TAD also the teacher's
   top-K 𝒦 (K ≤ 64: a running top-K in registers, ties to the smaller id as `tests/reference.py`) and the online
   log-sum-exps of both sides over the tail (every entry that is not, or no longer, in the running top-K is
   folded into the tail sums as it leaves), so α^T and α^S are sums over the tail itself (never 1 − Σ top-K) and
   log α = (m_tail − m) + log S_tail − log S is never sub-normal. A block where nothing entered the top-K is all
   tail: its tail sums are the full sums' block sums rescaled (`_fold_rescaled`, no exp per entry) while the tail
   max is within `RESCALE_GAP` nats of the full one — so TAD's pass 1 does KD's per-entry work on such blocks.
   `TAD_TWO_STAGE` (an A/B, off by default): the same results in two stages — KD's streaming pass also storing each
   block's maximum and sums (stage A), then `_topk_kernel` (stage B), which folds the blocks below θ, the K-th
   largest block maximum, into the tail sums from those sums and reads only the ~K blocks that reach θ.
2. `row_values_and_grads` — a second pass writing G = cd·∂D/∂s + cq·q (cq: the CLM softmax folded in, as
   `RowKernel.backward`) into ``out`` (which may be s itself: in place) and returning the per-row value. KD and
   TAD read s and t twice in all (TAD's top-K and tail sums ride on pass 1; its per-row coefficients and the value's
   K terms on 𝒦 are computed by pass 2's programs themselves, `_tad_row`: no [n]-sized torch ops between the passes,
   whose launches would cost TAD ~100 small kernels per chunk more than KD). RKL and JSD need the row value inside
   their gradient, so they add a value pass before the gradient pass (three passes).
3. `scale_` — the layer's backward: its gradients (of h, W, bias), computed in forward at the gradient the loss is
   expected to receive, scaled by the one it does receive — on the device, without a host read, and not at all (no
   pass over [V, d]) where the two are equal, as in a training step.

Which `tailkd.divergences` function each kernel implements:
- `_stats_kernel`: `divergences.lse` / torch.log_softmax of both sides; `topk_teacher` (𝒦, α^T) and
  `student_tail` (α^S) for TAD; `_topk_kernel` the latter two in two stages;
- `_dense_kernel`: LOSS=0 `_kl_forward` + `_kl_backward`; LOSS=1 `_rkl_forward` (value pass) and `_rkl_backward`
  (gradient pass); LOSS=2 `_jsd_forward` / `_jsd_backward` likewise;
- `_tad_kernel` (two launches: the rows on the plain formulas, then the rare rows below): `_tad_forward`'s value
  (the tail sum Σ_tail p log(p/q), or KL(p̃‖q̃) on rows whose α^T is below 1e-30, where a linear tail sum has lost
  its precision, but not 0; the K terms on 𝒦 and the bucket) and `_tad_backward` (Eq. 5 on 𝒦, Eq. 6 on the tail,
  or its q̃/p̃ form where α^S underflowed, also relative to β(X): β(X)·α^T/α^S above 1e30, or α^T < 1e-30); its
  per-row quantities (`_tad_row`) are those of `divergences.tad_tiny_rows`, `tad_gradient_form`, `tad_tiny_weight`
  and `rest_bucket`. It finds 𝒦's columns by comparing each with 𝒦's last entry in pass 1's order (no read of 𝒦 per
  block).

Against a top-K cache teacher (`divergences.SparseTeacher`: 𝒦, its log-probabilities, α^T, optional tail points)
`sparse_values_and_grads` implements `divergences._sparse_forward` / `_sparse_backward`: `_sparse_stats_kernel`
(both log-sum-exps of s, the tail's over the columns outside 𝒦, walked ascending), [n, K] torch ops for the value,
`_sparse_grad_kernel` for c·q + c_t·q̃ on every column, then 𝒦's K entries and the tail points set in torch.

`losses_for` maps a bound registry divergence to its kernels (kd, rkl, jsd, tad with K ≤ 64) or None; `available`
says whether triton imports. Tested on the CPU under ``TRITON_INTERPRET=1`` (tests/test_kernels.py), which must be
set before this module is imported: ``triton.jit`` reads it when it decorates.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from tailkd import divergences as dv

try:  # optional: pip install tailkd[kernels]
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

__all__ = ["MAX_K", "SPARSE", "RowLoss", "RowStats", "SparseStats", "available", "losses_for", "padded_k", "row_stats",
           "row_values_and_grads", "scale_", "sparse_stats", "sparse_values_and_grads"]

MAX_K = 64  # the largest teacher top-K the register buffer holds


def available() -> bool:
    """Whether triton is importable (the kernels need it; CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    return triton is not None


class RowLoss(NamedTuple):
    """A divergence the kernels compute: ``kind`` 0 = KL(p‖q), 1 = KL(q‖p), 2 = JSD_β, 3 = TAD with top-``k``, 4 =
    against a top-K cache teacher (`divergences.SPARSE`, any loss: `sparse_values_and_grads`)."""

    kind: int
    k: int = 0
    jsd_beta: float = 0.5


_KINDS = {"kl": 0, "rkl": 1, "jsd": 2, "tad": 3}
SPARSE = RowLoss(4)  # the row maths against a top-K cache teacher


def losses_for(divergence) -> RowLoss | None:
    """The kernels' form of a bound `tailkd.registry.Divergence` (its registry row's ``triton`` form with its
    knobs), or None (the torch path): no form, or TAD with K above `MAX_K`."""
    form = divergence.triton if divergence is not None else None
    if form is None:
        return None
    kind, args = form
    if kind == "tad" and not 1 <= args["k"] <= MAX_K:
        return None
    return RowLoss(_KINDS[kind], k=args.get("k", 0), jsd_beta=args.get("beta", 0.5))


class RowStats(NamedTuple):
    """Pass 1's per-row results. ``stats`` [n, 8] float32: (m, log S) of s, t, s on the tail, t on the tail (the
    tail columns are 0 without a top-K); ``ids`` [n, K] int32 (TAD only): 𝒦 by ascending id, ``t_top``, ``s_top``
    [n, K] float32: both sides' logits on it, in the same order."""

    stats: torch.Tensor
    ids: torch.Tensor | None = None
    t_top: torch.Tensor | None = None
    s_top: torch.Tensor | None = None

    def lse(self, side: int) -> torch.Tensor:
        """log Σ exp of side 0 (s), 1 (t), 2 (s on the tail), 3 (t on the tail), [n]."""
        return self.stats[:, 2 * side] + self.stats[:, 2 * side + 1]

    def log_mass(self, side: int) -> torch.Tensor:
        """log α of side 0 (student, α^S) or 1 (teacher, α^T) = (m_tail − m) + log S_tail − log S, [n]."""
        st = self.stats
        return (st[:, 4 + 2 * side] - st[:, 2 * side]) + st[:, 5 + 2 * side] - st[:, 2 * side + 1]

    @property
    def log_alpha(self) -> torch.Tensor:
        """log α^T [n], as `divergences.TopK.log_alpha` (the chunked layer's ᾱ reads it)."""
        return self.log_mass(1)

    @property
    def poisoned(self) -> torch.Tensor:
        """Rows with a NaN logit on either side [n] (their value is NaN, as in `divergences`)."""
        return torch.isnan(self.lse(0)) | torch.isnan(self.lse(1))


# --------------------------------------------------------------------------- the kernels

TAD_TWO_STAGE = False  # TAD's pass 1 finds the top-K by a running top-K over every column (`_stats_kernel`, measured);
# True: in two stages — KD's statistics pass also storing block statistics, then `_topk_kernel` re-reading only the
# ~K blocks whose maximum reaches the K-th largest block maximum. The same 𝒦; not yet measured on a GPU: the A/B of
# bench_kernels.py ("two-stage") and bench_gpu.py (tailkd_fused_triton_two_stage)
RESCALE_GAP = 50.0  # nats: a tail log-sum-exp reuses the full one's block sums while its max is this close to the
# full max (`_fold_rescaled`); row_stats/sparse_stats(rescale=False) pass -1: never (the A/B of bench_kernels.py)

if triton is not None:

    @triton.jit
    def _lse_fold(m, big_s, x):
        """Online log-sum-exp: fold the block x [BLOCK] (−inf = absent) into (max m, S = Σ exp(x − m))."""
        m_new, big_s, _, _ = _lse_fold_parts(m, big_s, x, tl.max(x, 0))
        return m_new, big_s

    @triton.jit
    def _lse_fold_parts(m, big_s, x, x_max):
        """`_lse_fold` given the block's maximum x_max, also returning the shift used and the block's own sum
        Σ exp(x − shift)."""
        m_new = tl.maximum(m, x_max)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        block_sum = tl.sum(tl.exp(x - shift), 0)
        return m_new, big_s * tl.exp(m - shift) + block_sum, shift, block_sum

    @triton.jit
    def _load_fold(row_ptr, cols, ok, m, big_s):
        """Load a block of a row in float32 (−inf past V) and fold it into (m, S): (x, its maximum, m, S, the
        shift and the block's sum of `_lse_fold_parts`)."""
        x = tl.load(row_ptr + cols, mask=ok, other=float("-inf")).to(tl.float32)
        x_max = tl.max(x, 0)
        m, big_s, shift, block_sum = _lse_fold_parts(m, big_s, x, x_max)
        return x, x_max, m, big_s, shift, block_sum

    @triton.jit
    def _fold_rescaled(m, big_s, x_max, shift, block_sum):
        """Fold a whole block into (m, S) from its sum Σ exp(x − shift) taken for another log-sum-exp (shift ≥ the
        new m): no per-entry exp. Exact up to roundings where shift − m_new is moderate (the caller checks)."""
        m_new = tl.maximum(m, x_max)
        own = tl.where(m_new == float("-inf"), 0.0, m_new)
        return m_new, big_s * tl.exp(m - own) + block_sum * tl.exp(shift - own)

    @triton.jit
    def _lse_add(m, big_s, v):
        """Online log-sum-exp: fold one value v into (m, S)."""
        m_new = tl.maximum(m, v)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        return m_new, big_s * tl.exp(m - shift) + tl.exp(v - shift)

    @triton.jit
    def _walk(ids_row, lo, K: tl.constexpr, end):
        """The ascending ids ids_row[lo:hi] below ``end`` (a block's): returns hi. A scalar walk: a tensor carried
        through a while loop costs a layout conversion per step; past the K-th id a sentinel ends it."""
        hi = lo
        while tl.load(ids_row + hi, mask=hi < K, other=2147483647) < end:
            hi += 1
        return hi

    @triton.jit
    def _marked(cols, ids_row, lo, hi):
        """The mask of ``cols`` [BLOCK] holding one of ids_row[lo:hi] (call where hi > lo: the mask built in the loop
        is converted to the block's layout, which those blocks alone then pay)."""
        top = cols < 0
        for kk in range(lo, hi):
            top = top | (cols == tl.load(ids_row + kk))
        return top

    @triton.jit
    def _tile(s_row, t_row, cols, ok, m_s, ls_s, m_t, ls_t):
        """Pass 2's tile of a row: s and t at ``cols`` in float32 (−inf past V), log q, log p (the log_softmax
        formula (x − m) − log S with pass 1's statistics), q and p."""
        s = tl.load(s_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        lq = (s - m_s) - ls_s
        lp = (t - m_t) - ls_t
        return s, t, lq, lp, tl.exp(lq), tl.exp(lp)

    @triton.jit
    def _enter(t, s, cols, offs, start, later, thr, buf_t, buf_s, buf_i, slots, m_tt, sum_tt, m_st, sum_st,
               STUDENT: tl.constexpr):
        """A block's insertions into the running top-K (buffer buf_t, buf_s, buf_i [KP], minimum thr): its entries in
        ``later`` above thr enter in the order (value desc, id asc), each evicting the buffer's minimum (the smallest
        t, among equal ones the latest id) into the tail sums (m_tt, sum_tt; m_st, sum_st for s). Only scalars are
        carried through the while loop besides the buffer (the last entry taken, (lv, lc)): a block-sized tensor
        carried there would cost a layout conversion per step. Returns the buffer, thr, the tail sums and (lv, lc):
        what entered is later & (t > thr before) & (t, −id) ≥ (lv, −lc) (lv = inf: nothing)."""
        lv = float("inf")
        lc = -1
        best = tl.max(tl.where(later & (t > thr), t, float("-inf")), 0)
        while best > thr:
            after = (t < lv) | ((t == lv) & (cols > lc))
            j = tl.argmax(tl.where(later & (t > thr) & after, t, float("-inf")), 0, tie_break_left=True)
            slot = tl.argmax(tl.where(buf_t == thr, buf_i, -2147483647), 0)
            here = slots == slot
            m_tt, sum_tt = _lse_add(m_tt, sum_tt, thr)  # the evicted entry joins the tail (an empty slot: −inf)
            buf_t = tl.where(here, best, buf_t)
            if STUDENT:
                m_st, sum_st = _lse_add(m_st, sum_st, tl.sum(tl.where(here, buf_s, 0.0), 0))
                buf_s = tl.where(here, tl.sum(tl.where(offs == j, s, 0.0), 0), buf_s)
            buf_i = tl.where(here, start + j, buf_i)
            lv, lc = best, start + j
            thr = tl.min(buf_t, 0)
            after = (t < lv) | ((t == lv) & (cols > lc))
            best = tl.max(tl.where(later & (t > thr) & after, t, float("-inf")), 0)
        return buf_t, buf_s, buf_i, thr, m_tt, sum_tt, m_st, sum_st, lv, lc

    @triton.jit
    def _store_lse(out, m_a, sum_a, m_b, sum_b, A: tl.constexpr):
        """Two online log-sum-exps as (m, log S) pairs: (m_a, log sum_a) at out[0:2] (A = False: not stored), (m_b,
        log sum_b) at out[2:4]."""
        if A:
            tl.store(out + 0, m_a)
            tl.store(out + 1, tl.log(sum_a))
        tl.store(out + 2, m_b)
        tl.store(out + 3, tl.log(sum_b))

    @triton.jit
    def _store_topk(stats_ptr, ids_ptr, ttop_ptr, stop_ptr, row, buf_t, buf_s, buf_i, real, m_tt, sum_tt, m_st,
                    sum_st, K: tl.constexpr, STUDENT: tl.constexpr):
        """Store the tail log-sum-exps (stats_ptr[row, 4:8]) and the top-K, slot j at its rank among the K ids (they
        are distinct), so that 𝒦 is stored ascending (`RowStats`)."""
        _store_lse(stats_ptr + row * 8 + 4, m_st, sum_st, m_tt, sum_tt, STUDENT)
        rank = tl.sum(((buf_i[None, :] < buf_i[:, None]) & real[None, :]).to(tl.int32), 1)
        dst = row * K + rank
        tl.store(ids_ptr + dst, buf_i, mask=real)
        tl.store(ttop_ptr + dst, buf_t, mask=real)
        if STUDENT:
            tl.store(stop_ptr + dst, buf_s, mask=real)

    @triton.jit
    def _stats_kernel(s_ptr, t_ptr, stats_ptr, ids_ptr, ttop_ptr, stop_ptr, blk_ptr, V, stride_s, stride_t, gap,
                      K: tl.constexpr, KP: tl.constexpr, STUDENT: tl.constexpr, KEEP: tl.constexpr,
                      NBP: tl.constexpr, BLOCK: tl.constexpr):
        """Pass 1 of one row: (m, log S) of s and t; with K > 0 the teacher's running top-K (initially the first K
        columns; a column enters when its t is larger than the buffer's minimum, which leaves: the smallest, and
        among equal ones the latest id) and the tail log-sum-exps of both sides over what is not in the buffer,
        stored by ascending id. STUDENT = False: the teacher's statistics only (s is not read; its columns stay
        0). KEEP (with K = 0: stage A of the two-stage top-K, `_topk_kernel`): also store, per block b of the row,
        blk_ptr[row, j, b] for j = 0..5: t's block maximum, the shift of its fold (the running maximum, 0 while
        −inf) and the block's Σ exp(t − shift), then the same three of s. (A buffer seeded by a tl.topk of the
        row's first 4096 columns was slower at K = 10 on an H200: bench/RESULTS.md, 2026-12-04.)"""
        row = tl.program_id(0).to(tl.int64)
        s_row, t_row = s_ptr + row * stride_s, t_ptr + row * stride_t
        offs = tl.arange(0, BLOCK)
        m_s = tl.full([], float("-inf"), tl.float32)
        m_t, m_st, m_tt = m_s, m_s, m_s
        sum_s = tl.zeros([], tl.float32)
        sum_t, sum_st, sum_tt = sum_s, sum_s, sum_s
        slots = tl.arange(0, KP)
        real = slots < K
        buf_i = slots
        buf_t = tl.load(t_row + buf_i, mask=real, other=float("inf")).to(tl.float32)
        buf_s = buf_t  # (teacher only: never read)
        if STUDENT:
            buf_s = tl.load(s_row + buf_i, mask=real, other=0.0).to(tl.float32)
        thr = tl.min(buf_t, 0)  # the buffer's minimum
        for start in range(0, V, BLOCK):
            cols = start + offs
            ok = cols < V
            t, t_max, m_t, sum_t, shift_t, block_t = _load_fold(t_row, cols, ok, m_t, sum_t)
            s = t  # (teacher only: never read)
            if STUDENT:
                s, s_max, m_s, sum_s, shift_s, block_s = _load_fold(s_row, cols, ok, m_s, sum_s)
            if KEEP:
                blk = blk_ptr + row * (6 * NBP) + start // BLOCK
                tl.store(blk, t_max)
                tl.store(blk + NBP, shift_t)
                tl.store(blk + 2 * NBP, block_t)
                if STUDENT:
                    tl.store(blk + 3 * NBP, s_max)
                    tl.store(blk + 4 * NBP, shift_s)
                    tl.store(blk + 5 * NBP, block_s)
            if K > 0:
                # entries enter while above the buffer's minimum thr (`_enter`). Most blocks hold no entry above
                # thr: the block maximum of the log-sum-exp says so without another reduction.
                later = ok & (cols >= K)  # the first K columns are the initial buffer
                search = t_max > thr
                thr0 = thr
                lv = float("inf")
                lc = -1
                if search:
                    buf_t, buf_s, buf_i, thr, m_tt, sum_tt, m_st, sum_st, lv, lc = _enter(
                        t, s, cols, offs, start, later, thr, buf_t, buf_s, buf_i, slots, m_tt, sum_tt, m_st, sum_st,
                        STUDENT)
                none = (lv == float("inf")) & (start >= K)  # nothing entered
                # The tail's share of the block: where nothing entered (past the first block) it is the whole
                # block, whose sums the log-sum-exps above already took; rescaled to the tail's shift they cost no
                # exp per entry. That needs the tail's max within ``gap`` (RESCALE_GAP) nats of the full one
                # (entries 87 nats below the full max flush to 0: then ≥ 37 nats below the tail max, < 1e-16 of it
                # each); else, and where entries entered, the tail folds its own entries.
                plain = none & (shift_t - tl.maximum(m_tt, t_max) < gap)
                if STUDENT:
                    plain = plain & (shift_s - tl.maximum(m_st, s_max) < gap)
                if plain:
                    m_tt, sum_tt = _fold_rescaled(m_tt, sum_tt, t_max, shift_t, block_t)
                    if STUDENT:
                        m_st, sum_st = _fold_rescaled(m_st, sum_st, s_max, shift_s, block_s)
                else:
                    taken = later & (t > thr0) & ((t > lv) | ((t == lv) & (cols <= lc)))  # what entered, in order
                    rest = later & ~taken
                    m_tt, sum_tt = _lse_fold(m_tt, sum_tt, tl.where(rest, t, float("-inf")))
                    if STUDENT:
                        m_st, sum_st = _lse_fold(m_st, sum_st, tl.where(rest, s, float("-inf")))
        _store_lse(stats_ptr + row * 8, m_s, sum_s, m_t, sum_t, STUDENT)
        if K > 0:
            _store_topk(stats_ptr, ids_ptr, ttop_ptr, stop_ptr, row, buf_t, buf_s, buf_i, real, m_tt, sum_tt, m_st,
                        sum_st, K, STUDENT)

    @triton.jit
    def _topk_kernel(s_ptr, t_ptr, stats_ptr, blk_ptr, ids_ptr, ttop_ptr, stop_ptr, V, stride_s, stride_t, gap,
                     K: tl.constexpr, KP: tl.constexpr, NBP: tl.constexpr, STUDENT: tl.constexpr,
                     BLOCK: tl.constexpr):
        """Stage B of the two-stage top-K (`TAD_TWO_STAGE`), after `_stats_kernel` with KEEP stored the row's block
        statistics: the teacher's top-K 𝒦 (the same as the single pass's: ties to the smaller id) and both sides'
        tail log-sum-exps into stats_ptr[row, 4:8], 𝒦 and both sides' logits on it stored by ascending id.

        θ = the K-th largest block maximum of t: K distinct blocks hold an entry ≥ θ, so 𝒦's K-th value is ≥ θ and
        no entry < θ is in 𝒦. A block whose maximum is < θ is all tail: its stored sum, rescaled, is folded into the
        tail sums without reading it, where its shift is within ``gap`` nats of the tail's maximum (bounded below by
        the largest such block maximum: an entry the sum flushed to 0, 87 nats below the shift, is then ≥ 37 nats
        below the tail's maximum), else it is read and folded entry by entry. The blocks with maximum ≥ θ (~K of
        them) are read in ascending order: their entries ≥ θ go through the single pass's insertion into a running
        top-K that starts empty (empty slots hold −inf and leave first, adding nothing to the tail), the others and
        whatever leaves the buffer are folded into the tail sums. Where fewer than K blocks have a finite maximum
        (θ = −inf) or a block maximum is NaN, every block is read and the buffer starts from the first K columns,
        as in the single pass."""
        row = tl.program_id(0).to(tl.int64)
        s_row, t_row = s_ptr + row * stride_s, t_ptr + row * stride_t
        nb = tl.cdiv(V, BLOCK)
        bidx = tl.arange(0, NBP)
        bok = bidx < nb
        blk = blk_ptr + row * (6 * NBP) + bidx
        t_max = tl.load(blk, mask=bok, other=float("-inf"))
        shift_t = tl.load(blk + NBP, mask=bok, other=0.0)
        sum_t = tl.load(blk + 2 * NBP, mask=bok, other=0.0)
        nan_row = tl.max((t_max != t_max).to(tl.int32), 0) > 0
        left = tl.where(t_max == t_max, t_max, float("-inf"))
        theta = tl.full([], float("-inf"), tl.float32)
        for _ in range(K):  # θ: the largest block maximum, removed, K times (−inf once the blocks run out)
            theta = tl.max(left, 0)
            left = tl.where(bidx == tl.argmax(left, 0, tie_break_left=True), float("-inf"), left)
        theta = tl.where(nan_row, float("-inf"), theta)  # θ = −inf: every block is read, from the first K columns
        k0 = tl.where(theta == float("-inf"), K, 0)  # (masks below compare with scalars: triton 3.9's interpreter
        # does not broadcast a scalar condition into a block's mask)
        outside = bok & (t_max < theta)  # all tail
        m_out = tl.max(tl.where(outside, t_max, float("-inf")), 0)  # ≤ the tail's maximum
        plain = outside & (shift_t - m_out < gap)
        if STUDENT:
            s_max = tl.load(blk + 3 * NBP, mask=bok, other=float("-inf"))
            shift_s = tl.load(blk + 4 * NBP, mask=bok, other=0.0)
            sum_s = tl.load(blk + 5 * NBP, mask=bok, other=0.0)
            m_out_s = tl.max(tl.where(outside, s_max, float("-inf")), 0)
            plain = plain & (shift_s - m_out_s < gap)
        # the plain blocks' sums relative to m_out: Σ_b B_b·e^(shift_b − m_out), each factor ≤ e^gap (finite: where
        # m_out = −inf no block is plain). (m_out, S) is a log-sum-exp state whose m bounds every entry in S.
        some = tl.max(plain.to(tl.int32), 0) > 0
        m_tt = tl.where(some, m_out, float("-inf"))
        sum_tt = tl.sum(tl.where(plain, sum_t * tl.exp(shift_t - tl.where(some, m_out, 0.0)), 0.0), 0)
        m_st, sum_st = m_tt, sum_tt  # (teacher only: never read)
        if STUDENT:
            m_st = tl.where(some, m_out_s, float("-inf"))
            sum_st = tl.sum(tl.where(plain, sum_s * tl.exp(shift_s - tl.where(some, m_out_s, 0.0)), 0.0), 0)
        slots = tl.arange(0, KP)
        real = slots < K
        first = slots < k0  # the first K columns are the initial buffer where θ = −inf
        buf_i = tl.where(first, slots, slots - KP)  # empty slots: distinct negative ids
        buf_t = tl.where(real, tl.load(t_row + slots, mask=first, other=float("-inf")).to(tl.float32), float("inf"))
        buf_s = buf_t  # (teacher only: never read)
        if STUDENT:
            buf_s = tl.load(s_row + slots, mask=first, other=float("-inf")).to(tl.float32)
        thr = tl.min(buf_t, 0)
        offs = tl.arange(0, BLOCK)
        read = bok & ~plain
        b = tl.min(tl.where(read, bidx, NBP), 0)
        while b < nb:
            start = b * BLOCK
            cols = start + offs
            ok = cols < V
            t = tl.load(t_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
            s = t  # (teacher only: never read)
            if STUDENT:
                s = tl.load(s_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
            fresh = ok & (cols >= k0)
            later = fresh & (t >= theta)  # the candidates: every entry of 𝒦 is one
            thr0 = thr
            buf_t, buf_s, buf_i, thr, m_tt, sum_tt, m_st, sum_st, lv, lc = _enter(  # the single pass's insertion
                t, s, cols, offs, start, later, thr, buf_t, buf_s, buf_i, slots, m_tt, sum_tt, m_st, sum_st, STUDENT)
            taken = later & (t > thr0) & ((t > lv) | ((t == lv) & (cols <= lc)))  # what entered, in order
            rest = fresh & ~taken
            m_tt, sum_tt = _lse_fold(m_tt, sum_tt, tl.where(rest, t, float("-inf")))
            if STUDENT:
                m_st, sum_st = _lse_fold(m_st, sum_st, tl.where(rest, s, float("-inf")))
            b = tl.min(tl.where(read & (bidx > b), bidx, NBP), 0)
        _store_topk(stats_ptr, ids_ptr, ttop_ptr, stop_ptr, row, buf_t, buf_s, buf_i, real, m_tt, sum_tt, m_st, sum_st,
                    K, STUDENT)

    @triton.jit
    def _dense_kernel(s_ptr, t_ptr, out_ptr, stats_ptr, coef_ptr, y_ptr, value_ptr, V, stride_s, stride_t,
                      stride_o, bj, cj, LOSS: tl.constexpr, VALUE: tl.constexpr, WRITE: tl.constexpr,
                      BLOCK: tl.constexpr):
        """One pass over a row of a whole-vocabulary divergence (LOSS 0 = KL(p‖q), 1 = KL(q‖p), 2 = JSD_bj with
        log m = log(bj·p + cj·q), cj = 1 − bj, from p, q, bj, cj each times 2^100 where m rounds to 0 although p
        or q is not 0: `divergences.jsd_log_mix`). VALUE: value_ptr[row] = (Σ of the value's terms, and for JSD
        Σ q log(q/m)). WRITE: out = c_q·q + c_f·f − c_p·p − c_y·[col = y] with coef_ptr[row] = (c_q, c_f, c_p,
        c_y) and y = y_ptr[row] (the label: the CLM's one-hot, −1 = none), f the entry's term q log(q/p) (RKL) or
        q log(q/m) (JSD)."""
        row = tl.program_id(0).to(tl.int64)
        st = stats_ptr + row * 8
        m_s, ls_s, m_t, ls_t = tl.load(st + 0), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3)
        cf = coef_ptr + row * 4
        c_q, c_f, c_p, c_y = tl.load(cf), tl.load(cf + 1), tl.load(cf + 2), tl.load(cf + 3)
        y = tl.load(y_ptr + row)
        offs = tl.arange(0, BLOCK)
        acc1 = tl.zeros([BLOCK], tl.float32)
        acc2 = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            ok = cols < V
            s, t, lq, lp, q, p = _tile(s_ptr + row * stride_s, t_ptr + row * stride_t, cols, ok, m_s, ls_s, m_t,
                                       ls_t)
            if LOSS == 0:
                f = tl.where(p > 0, p * (lp - lq), 0.0)  # kl_sum: p (log p − log q), 0·log 0 = 0
                acc1 += tl.where(ok, f, 0.0)
                g = c_q * q - c_p * p
            elif LOSS == 1:
                f = tl.where(q > 0, q * (lq - lp), 0.0)
                acc1 += tl.where(ok, f, 0.0)
                g = c_q * q + c_f * f
            else:
                m = bj * p + cj * q
                under = m == 0.0  # p or q sub-normal, m rounded to 0: p, q, bj, cj times 2^100, log m − 200 ln 2
                big = ((bj * 1.2676506002282294e30) * (p * 1.2676506002282294e30)  # (the same as jsd_log_mix)
                       + (cj * 1.2676506002282294e30) * (q * 1.2676506002282294e30))
                lm = tl.log(tl.where(under, big, m)) - tl.where(under, 138.62943611198907, 0.0)
                acc1 += tl.where(ok & (p > 0), p * (lp - lm), 0.0)
                f = tl.where(q > 0, q * (lq - lm), 0.0)
                acc2 += tl.where(ok, f, 0.0)
                g = c_q * q + c_f * f
            if WRITE:
                g = tl.where(cols == y, g - c_y, g)
                tl.store(out_ptr + row * stride_o + cols, g.to(out_ptr.dtype.element_ty), mask=ok)
        if VALUE:
            tl.store(value_ptr + row * 2, tl.sum(acc1, 0))
            tl.store(value_ptr + row * 2 + 1, tl.sum(acc2, 0))

    @triton.jit
    def _tad_row(stats_ptr, w_ptr, row):
        """TAD's per-row quantities from pass 1's statistics and the row weight as log w = log β(X) (float64: β/ᾱ
        overflows float64 where every tail of the sequence is beyond ~708 nats), as `divergences._tad_forward` /
        `_tad_backward` define them:
        (α^T, log α^T (0 where α^T = 0), log α^S, the sub-normal-α^T rows "tiny" (`divergences.tad_tiny_rows`),
        the rows on the q̃/p̃ gradient form "bad" and α^T/α^S (`divergences.tad_gradient_form`), the weight wd (0 on
        tiny rows and where α^T = 0: `divergences.tad_weight`) and W = w·α^T (exp(log w + log α^T) in float64 on
        tiny rows: `divergences.tad_tiny_weight`))."""
        st = stats_ptr + row * 8
        m_s, ls_s, m_t, ls_t = tl.load(st + 0), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3)
        la = (tl.load(st + 6) - m_t) + tl.load(st + 7) - ls_t  # `RowStats.log_mass`
        las = (tl.load(st + 4) - m_s) + tl.load(st + 5) - ls_s
        alpha_t = tl.exp(la.to(tl.float64)).to(tl.float32)  # (float64: torch's correctly rounded exp, sub-normal
        log_at = tl.where(alpha_t > 0, la, 0.0)  # results kept; float32 tl.exp is approximate, ~|x|·u relative)
        lse_s, lse_t = m_s + ls_s, m_t + ls_t
        poisoned = (lse_s != lse_s) | (lse_t != lse_t)  # `RowStats.poisoned`: a NaN logit on either side
        log_w = tl.load(w_ptr + row).to(tl.float64)
        tiny = (alpha_t < 1e-30) & (la == la) & (tl.abs(la) < float("inf")) & ~poisoned & (log_w > float("-inf"))
        wd = tl.where(tiny | (alpha_t == 0), 0.0, tl.exp(log_w)).to(tl.float32)
        ratio = tl.where(alpha_t > 0, tl.exp((log_at - las).to(tl.float64)).to(tl.float32), 0.0)
        big = wd.to(tl.float64) * ratio.to(tl.float64) > 1e30  # (1 + (wd − 1)·ratio would overflow float32)
        bad = ~((ratio == ratio) & (tl.abs(ratio) < float("inf"))) | (ratio > 1e30) | big | tiny
        big_w = tl.where(tiny, tl.exp(log_w + la.to(tl.float64)).to(tl.float32), wd * alpha_t)
        return alpha_t, log_at, las, tiny, bad, wd, ratio, big_w

    @triton.jit
    def _tad_kernel(s_ptr, t_ptr, out_ptr, stats_ptr, ids_ptr, ttop_ptr, stop_ptr, w_ptr, cd_ptr, cq_ptr, cy_ptr,
                    y_ptr, value_ptr, V, stride_s, stride_t, stride_o, K: tl.constexpr, KP: tl.constexpr,
                    WRITE: tl.constexpr, RARE: tl.constexpr, BLOCK: tl.constexpr):
        """Pass 2 of TAD for one row, its per-row maths in the kernel (`_tad_row`; no [n]-sized torch ops around
        it). value_ptr[row] = Σ_𝒦 p log(p/q) + α^T log(α^T/α^S) + wd·(Σ_tail p log(p/q) − α^T log(α^T/α^S)), or
        on tiny rows (α^T sub-normal) Σ_𝒦 … + α^T log(α^T/α^S) + W·Σ_tail p̃ log(p̃/q̃) (`divergences._tad_forward`).
        Gradient (`divergences._tad_backward`, times cd = cd_ptr[row], plus cq·q, cq = cq_ptr[row]): on 𝒦
        (cd + cq)·q − cd·p; on the tail c2·q − cd·wd·p with c2 = cd(1 + (wd − 1)α^T/α^S) + cq, or on "bad" rows
        (cd + cq)·q + cd(W − α^T)·q̃ − cd·W·p̃ with q̃ = exp(s − lse_tail(s)), p̃ = exp(t − lse_tail(t)); − cy at the
        label column y_ptr[row] (−1 = none), cy = cy_ptr[row]. RARE = False does the rows that are neither tiny nor
        bad, RARE = True the others (each launch skips the other's rows): the rare rows' maths in the same loop
        would hold ~3× the registers. 𝒦's columns: those at or above its last entry (t_k, i_k) in the order
        (t descending, id ascending) that pass 1 kept — two comparisons per entry, no load of 𝒦 in the loop (𝒦's
        ids held in registers instead, each block marking its own, was slower on an H200: bench/RESULTS.md,
        2026-12-04)."""
        row = tl.program_id(0).to(tl.int64)
        alpha_t, log_at, las, tiny, bad, wd, ratio, big_w = _tad_row(stats_ptr, w_ptr, row)
        if (tiny | bad) == RARE:
            st = stats_ptr + row * 8
            m_s, ls_s, m_t, ls_t = tl.load(st + 0), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3)
            cd, cq, c_y = tl.load(cd_ptr + row), tl.load(cq_ptr + row), tl.load(cy_ptr + row)
            y = tl.load(y_ptr + row)
            c0 = cd + cq  # on 𝒦: c0·q − cd·p
            if RARE:  # on the tail: c2·q + c4·q̃ − c5·p̃
                c2 = cd + cq
                c4 = cd * (big_w - alpha_t)
                c5 = cd * big_w
                m_st, ls_st, m_tt, ls_tt = tl.load(st + 4), tl.load(st + 5), tl.load(st + 6), tl.load(st + 7)
            else:  # on the tail: c2·q − c3·p
                c2 = cd * (1 + (wd - 1) * ratio) + cq
                c3 = cd * wd
            offs = tl.arange(0, BLOCK)
            acc = tl.zeros([BLOCK], tl.float32)
            ids_row = ids_ptr + row * K
            slots = tl.arange(0, KP)
            real = slots < K
            # 𝒦's last entry by (t descending, id ascending): the smallest t, among equal ones the largest id
            t_top = tl.load(ttop_ptr + row * K + slots, mask=real, other=float("inf"))
            t_k = tl.min(t_top, 0)
            i_k = tl.max(tl.where(real & (t_top == t_k), tl.load(ids_row + slots, mask=real, other=-1), -1), 0)
            for start in range(0, V, BLOCK):
                cols = start + offs
                ok = cols < V
                s, t, lq, lp, q, p = _tile(s_ptr + row * stride_s, t_ptr + row * stride_t, cols, ok, m_s, ls_s,
                                           m_t, ls_t)
                top = (t > t_k) | ((t == t_k) & (cols <= i_k))  # in 𝒦 iff (t, −id) ≥ (t_k, −i_k): pass 1 read
                # the same t (NaN: in no 𝒦)
                if RARE:
                    lqt = (s - m_st) - ls_st
                    lpt = (t - m_tt) - ls_tt
                    pt = tl.exp(lpt)
                    g_tail = c2 * q + c4 * tl.exp(lqt) - c5 * pt
                    if tiny:
                        term = tl.where(pt > 0, pt * (lpt - lqt), 0.0)
                    else:
                        term = tl.where(p > 0, p * (lp - lq), 0.0)
                else:
                    g_tail = c2 * q - c3 * p
                    term = tl.where(p > 0, p * (lp - lq), 0.0)
                acc += tl.where(ok & ~top, term, 0.0)
                if WRITE:
                    g = tl.where(top, c0 * q - cd * p, g_tail)
                    g = tl.where(cols == y, g - c_y, g)
                    tl.store(out_ptr + row * stride_o + cols, g.to(out_ptr.dtype.element_ty), mask=ok)
            tail_sum = tl.sum(acc, 0)
            # the value (`divergences._tad_forward`): the K terms on 𝒦 from pass 1's logits there, the bucket. The
            # row's quantities are loaded and computed again rather than held through the loop (+12 registers
            # there: fewer resident warps)
            alpha_t, log_at, las, tiny, bad, wd, ratio, big_w = _tad_row(stats_ptr, w_ptr, row)
            logp_top = (tl.load(ttop_ptr + row * K + slots, mask=real, other=float("-inf")) - m_t) - ls_t
            logq_top = (tl.load(stop_ptr + row * K + slots, mask=real, other=0.0) - m_s) - ls_s
            p_top = tl.exp(logp_top)
            top_sum = tl.sum(tl.where(p_top > 0, p_top * (logp_top - logq_top), 0.0), 0)
            bucket = tl.where(alpha_t > 0, alpha_t * (log_at - las), 0.0)  # `divergences.rest_bucket`
            if tiny:
                value = top_sum + bucket + big_w * tail_sum
            else:
                finite = (bucket == bucket) & (tl.abs(bucket) < float("inf"))
                term = wd * tl.where(finite, tail_sum - bucket, 0.0)  # log w = −inf (β = 0): no tail term, not
                value = top_sum + bucket + tl.where(tl.load(w_ptr + row) > float("-inf"), term, 0.0)  # 0·inf = NaN
            tl.store(value_ptr + row, value)

    @triton.jit
    def _sparse_stats_kernel(s_ptr, ids_ptr, stats_ptr, V, stride_s, gap, K: tl.constexpr, BLOCK: tl.constexpr):
        """Pass 1 of a row against a top-K cache teacher: (m, log S) of s over all columns and over the tail (the
        columns not in 𝒦 = ids_ptr[row], ascending), so log α^S = lse_tail − lse is never sub-normal."""
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride_s
        ids_row = ids_ptr + row * K
        offs = tl.arange(0, BLOCK)
        m_s = tl.full([], float("-inf"), tl.float32)
        m_st = m_s
        sum_s = tl.zeros([], tl.float32)
        sum_st = sum_s
        lo = 0
        for start in range(0, V, BLOCK):
            cols = start + offs
            ok = cols < V
            s, s_max, m_s, sum_s, shift_s, block_s = _load_fold(s_row, cols, ok, m_s, sum_s)
            hi = _walk(ids_row, lo, K, start + BLOCK)  # ids[lo:hi] lie in this block
            if (hi == lo) & (shift_s - tl.maximum(m_st, s_max) < gap):  # the whole block is tail (see
                m_st, sum_st = _fold_rescaled(m_st, sum_st, s_max, shift_s, block_s)  # `_stats_kernel`)
            else:
                top = cols < 0
                if hi > lo:
                    top = _marked(cols, ids_row, lo, hi)
                m_st, sum_st = _lse_fold(m_st, sum_st, tl.where(top, float("-inf"), s))
            lo = hi
        _store_lse(stats_ptr + row * 4, m_s, sum_s, m_st, sum_st, True)

    @triton.jit
    def _sparse_grad_kernel(s_ptr, out_ptr, stats_ptr, coef_ptr, y_ptr, V, stride_s, stride_o, BLOCK: tl.constexpr):
        """Pass 2 against a top-K cache teacher: out = c_q·q + c_t·q̃ − c_y·[col = y] on every column (q̃ = exp(s −
        lse_tail)), coef_ptr[row] = (c_q, c_t, c_y); the K columns of 𝒦 are then overwritten by the caller."""
        row = tl.program_id(0).to(tl.int64)
        st = stats_ptr + row * 4
        m_s, ls_s, m_st, ls_st = tl.load(st + 0), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3)
        c_q, c_t, c_y = tl.load(coef_ptr + row * 3), tl.load(coef_ptr + row * 3 + 1), tl.load(coef_ptr + row * 3 + 2)
        y = tl.load(y_ptr + row)
        offs = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            cols = start + offs
            ok = cols < V
            s = tl.load(s_ptr + row * stride_s + cols, mask=ok, other=float("-inf")).to(tl.float32)
            g = c_q * tl.exp((s - m_s) - ls_s) + c_t * tl.exp((s - m_st) - ls_st)
            g = tl.where(cols == y, g - c_y, g)
            tl.store(out_ptr + row * stride_o + cols, g.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _scale_kernel(x_ptr, g_ptr, expected, numel, BLOCK: tl.constexpr):
        """x ·= g / expected in place, unless g == expected (g: the one float32 element at g_ptr, the backward's
        incoming gradient; every program reads it: no host read): the product in float32, rounded once to x's
        dtype. The programs stride over x's elements."""
        g = tl.load(g_ptr)
        if g != expected:
            r = tl.math.div_rn(g, expected)  # correctly rounded (`/` may not be on a GPU)
            offs = tl.arange(0, BLOCK)
            for start in range(tl.program_id(0) * BLOCK, numel, tl.num_programs(0) * BLOCK):
                idx = start + offs
                ok = idx < numel
                x = tl.load(x_ptr + idx, mask=ok).to(tl.float32)
                tl.store(x_ptr + idx, (x * r).to(x_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- torch side


class Launch(NamedTuple):
    """How a kernel is launched: ``block`` columns per program step, ``warps`` warps per program (one row)."""

    block: int
    warps: int

    @property
    def options(self) -> dict:
        """The launch options: ``num_warps``, and floating-point contraction (a·b + c as one FMA) on — Triton's
        default through 3.9, which warns that 3.10 turns it off: pinned, as the kernels were measured and timed."""
        return {"num_warps": self.warps, "enable_fp_fusion": True}


# On CUDA, per pass, from the launch sweep on an H200 (bench/results/h200-2026-11-30/call1_kernels.md: 2048 rows x
# 151936 bf16, each pass timed alone, the same inputs for every launch; ms at 1024 x 4 -> 2048 x 4): the streaming
# passes take 2048 columns x 4 warps (the statistics without a top-K 0.480 -> 0.387, KD's value + G 0.718 -> 0.617,
# TAD's pass 2 1.863 -> 1.545; JSD's gradient pass 1.488 -> 1.526, its total still 1.965 -> 1.914), the running top-K
# of TAD's statistics keeps 1024 x 4 (1.564 vs 1.751 at K = 10, 3.705 vs 4.127 at K = 64), and so do the cache
# teacher's passes (0.556 vs 0.544 and 1.030 vs 1.208). RKL shares the dense kernel's launch (not timed alone). No
# variant spills at these launches (bench/kernel_report.py).
# The two-stage top-K (`TAD_TWO_STAGE`, not yet timed): stage A at the statistics pass's launch, stage B at the same
# columns per block (one unit: it reads stage A's per-block sums; `row_stats` gives it stage A's block) by 8 warps:
# compiled for sm_90 (bench/kernel_report.py, triton 3.6) its 2048-column tile holds 179 registers by 4 warps (8
# warps/SM), 102 by 8 (16 warps/SM), no spills.
CUDA_LAUNCH = {"stats": Launch(2048, 4), "stats_topk": Launch(1024, 4), "dense": Launch(2048, 4),
               "tad": Launch(2048, 4), "sparse": Launch(1024, 4), "two_stage": Launch(2048, 4),
               "two_stage_topk": Launch(2048, 8), "scale": Launch(4096, 8)}
SCALE_PROGRAMS_PER_SM = 4  # `scale_`: programs striding over the tensor (on CUDA, per multiprocessor)
INTERPRETER_BLOCK = 128  # under the CPU interpreter: several blocks per row at test sizes


def launch(vocab: int, device: torch.device, block: int | None = None, warps: int | None = None,
           kind: str = "dense") -> Launch:
    """The launch of the kernels of pass ``kind`` (a key of `CUDA_LAUNCH`: "stats" / "stats_topk" = pass 1 without /
    with TAD's top-K, "two_stage" / "two_stage_topk" = stage A / B of TAD's pass 1 in two stages, "dense" =
    KD/RKL/JSD's value and gradient, "tad" = TAD's pass 2, "sparse" = both passes against a cache teacher, "scale" =
    `scale_`, whose ``vocab`` is the tensor's size) for rows of ``vocab`` columns: on CUDA `CUDA_LAUNCH`'s, under
    the CPU interpreter `INTERPRETER_BLOCK` columns by 4 warps; never more columns than the row's power of two.
    ``block`` and ``warps`` override (bench/bench_kernels.py sweeps them)."""
    base = CUDA_LAUNCH[kind] if device.type == "cuda" else Launch(INTERPRETER_BLOCK, 4)
    return Launch(block or min(base.block, max(16, triton.next_power_of_2(vocab))), warps or base.warps)


def padded_k(k: int) -> int:
    """KP: the kernels' register buffer for a top-k (a power of two >= max(k, 2); its slots past k are padding)."""
    return max(2, triton.next_power_of_2(max(k, 1)))


def _check(s: torch.Tensor, t: torch.Tensor) -> None:
    if s.dim() != 2 or s.shape != t.shape or s.stride(-1) != 1 or t.stride(-1) != 1:
        raise ValueError(f"s and t must be [n, V] with unit column stride; got {tuple(s.shape)}, {tuple(t.shape)}")


def row_stats(s: torch.Tensor | None, t: torch.Tensor, k: int = 0, *, block: int | None = None,
              warps: int | None = None, rescale: bool = True, two_stage: bool | None = None) -> RowStats:
    """Pass 1 over rows s, t [n, V] (student and teacher logits at the loss's temperature); ``k`` > 0: TAD's
    teacher top-k (ids ascending, int32) and tail statistics. ``s`` None: the teacher's statistics only (the
    student columns of ``stats`` are 0; what α^T needs, one read of t). ``rescale`` False: the tail sums fold every
    block themselves (`RESCALE_GAP`). ``two_stage``: the top-k in two stages (`_topk_kernel`; None =
    `TAD_TWO_STAGE`): the same 𝒦 and logits on it, tail sums within their roundings."""
    _check(t if s is None else s, t)
    if not 0 <= k <= MAX_K or (k and k >= t.shape[1]):
        raise ValueError(f"k must be in [0, {MAX_K}] and < V={t.shape[1]}; got {k}")
    n, vocab = t.shape
    stats = torch.zeros(n, 8, dtype=torch.float32, device=t.device)
    ids = torch.empty(n, max(k, 1), dtype=torch.int32, device=t.device)
    t_top = torch.empty(n, max(k, 1), dtype=torch.float32, device=t.device)
    s_top = torch.zeros_like(t_top) if s is None else torch.empty_like(t_top)
    two = bool(k) and (TAD_TWO_STAGE if two_stage is None else two_stage)
    if n:
        go = launch(vocab, t.device, block, warps, "two_stage" if two else "stats_topk" if k else "stats")
        kp = padded_k(k)
        src = t if s is None else s
        gap = RESCALE_GAP if rescale else -1.0
        nbp = max(2, triton.next_power_of_2(triton.cdiv(vocab, go.block))) if two else 2
        blk = torch.empty(n, 6, nbp, dtype=torch.float32, device=t.device) if two else stats
        _stats_kernel[(n,)](src, t, stats, ids, t_top, s_top, blk, vocab, src.stride(0), t.stride(0), gap,
                            K=0 if two else k, KP=kp, STUDENT=s is not None, KEEP=two, NBP=nbp, BLOCK=go.block,
                            **go.options)
        if two:  # stage B at stage A's columns per block
            go = Launch(go.block, launch(vocab, t.device, block, warps, "two_stage_topk").warps)
            _topk_kernel[(n,)](src, t, stats, blk, ids, t_top, s_top, vocab, src.stride(0), t.stride(0), gap, K=k,
                               KP=kp, NBP=nbp, STUDENT=s is not None, BLOCK=go.block, **go.options)
    if not k:
        return RowStats(stats)
    return RowStats(stats, ids, t_top, s_top)


def _dense(loss: RowLoss, s, t, stats: RowStats, cd, cq, y, cy, out, go: Launch):
    """Value [n] and (``out`` not None) the gradient of KD, RKL or JSD: one pass for KD, value then gradient for RKL
    and JSD (their gradient holds the row value)."""
    n, vocab = s.shape
    bj = float(loss.jsd_beta)
    cj = 1 - bj
    value = torch.zeros(n, 2, dtype=torch.float32, device=s.device)
    zero = torch.zeros_like(cd)
    coef = torch.stack([cd + cq, zero, cd, cy], 1) if loss.kind == 0 else torch.zeros(n, 4, device=s.device)
    o = out if out is not None else s
    args = dict(BLOCK=go.block, LOSS=loss.kind, **go.options)
    if n:
        _dense_kernel[(n,)](s, t, o, stats.stats, coef, y, value, vocab, s.stride(0), t.stride(0), o.stride(0), bj,
                            cj, VALUE=True, WRITE=out is not None and loss.kind == 0, **args)
    if loss.kind == 0:
        return value[:, 0]
    if loss.kind == 1:  # _rkl_backward: cd·q log(q/p) + (cq − cd·KL(q‖p))·q
        row, c = value[:, 0], cd
    else:  # _jsd_backward: c·q log(q/m) + (cq − c·KL(q‖m))·q, c = cd(1 − β)
        row, c = value[:, 1], cd * (1 - bj)
    if out is not None and n:
        coef = torch.stack([cq - c * row, c, zero, cy], 1)
        _dense_kernel[(n,)](s, t, out, stats.stats, coef, y, value, vocab, s.stride(0), t.stride(0), out.stride(0),
                            bj, cj, VALUE=False, WRITE=True, **args)
    return value[:, 0] if loss.kind == 1 else bj * value[:, 0] + (1 - bj) * value[:, 1]


def _tad(loss: RowLoss, s, t, stats: RowStats, w, cd, cq, y, cy, out, go: Launch):
    """TAD's pass 2: the value and the gradient, the per-row coefficients and the value's K terms on 𝒦 computed in
    the kernel (`_tad_row`): two launches (the plain rows, then the rare ones), no [n]-sized torch ops."""
    n, vocab = s.shape
    value = torch.empty(n, dtype=torch.float32, device=s.device)
    o = out if out is not None else s
    if n:
        w = w.to(torch.float64).contiguous()  # log β(X)
        for rare in (False, True):  # the second launch's programs return at once unless their row is rare
            _tad_kernel[(n,)](s, t, o, stats.stats, stats.ids, stats.t_top, stats.s_top, w, cd, cq, cy, y, value,
                              vocab, s.stride(0), t.stride(0), o.stride(0), K=loss.k, KP=padded_k(loss.k),
                              WRITE=out is not None, RARE=rare, BLOCK=go.block, **go.options)
    return value


def _row_coefs(cd, cq, cy, y):
    """The pass-2 row coefficients in float32 (``cq``, ``cy`` None = 0) and the label columns [n] (None = −1: no
    one-hot), contiguous (the kernels read entry ``row`` of each)."""
    cd = cd.to(torch.float32).contiguous()
    cq = torch.zeros_like(cd) if cq is None else cq.to(torch.float32).contiguous()
    cy = torch.zeros_like(cd) if cy is None else cy.to(torch.float32).contiguous()
    y = torch.full_like(cd, -1, dtype=torch.long) if y is None else y.reshape(-1).contiguous()
    return cd, cq, cy, y


def row_values_and_grads(loss: RowLoss, s: torch.Tensor, t: torch.Tensor, stats: RowStats, w: torch.Tensor | None,
                         cd: torch.Tensor, cq: torch.Tensor | None = None, out: torch.Tensor | None = None, *,
                         y: torch.Tensor | None = None, cy: torch.Tensor | None = None, block: int | None = None,
                         warps: int | None = None) -> torch.Tensor:
    """Per-row value [n] (float32; NaN on rows with a NaN logit) of ``loss`` and, when ``out`` [n, V] is given (it
    may be ``s``: in place, in s's dtype), G = cd·∂D/∂s + cq·q − cy·onehot(y) written into it: computed in float32
    and rounded once on store. ``w`` [n]: TAD's row weight as log β(X) (float64), None otherwise; ``cd``, ``cq``,
    ``cy`` [n] float32 (None = 0); ``y`` [n] integer label columns (the CLM's one-hot; None: no one-hot).
    ``block``, ``warps``: as `launch`.
    """
    _check(s, t)
    go = launch(s.shape[1], s.device, block, warps, "tad" if loss.kind == 3 else "dense")
    cd, cq, cy, y = _row_coefs(cd, cq, cy, y)
    if out is not None and (out.shape != s.shape or out.stride(-1) != 1):
        raise ValueError(f"out must be [n, V] like s; got {tuple(out.shape)}")
    if loss.kind == 3:
        if w is None or stats.ids is None:
            raise ValueError("TAD needs the row weight w and row_stats(..., k) with its top-k")
        value = _tad(loss, s, t, stats, w, cd, cq, y, cy, out, go)
    else:
        value = _dense(loss, s, t, stats, cd, cq, y, cy, out, go)
    return torch.where(stats.poisoned, math.nan, value)


class SparseStats(NamedTuple):
    """`sparse_stats`' per-row results: ``stats`` [n, 4] float32 (m, log S) of s over all columns and over the tail;
    ``ids`` [n, K] 𝒦 ascending, ``logp_top`` [n, K] float32 its cached log-probabilities in the same order."""

    stats: torch.Tensor
    ids: torch.Tensor
    logp_top: torch.Tensor

    def lse(self, tail: bool = False) -> torch.Tensor:
        """log Σ exp of s over all columns, or over the tail, [n]."""
        return self.stats[:, 2 * tail] + self.stats[:, 2 * tail + 1]


def sparse_stats(s: torch.Tensor, teacher, *, block: int | None = None, warps: int | None = None,
                 rescale: bool = True) -> SparseStats:
    """Pass 1 against a top-K cache teacher (`divergences.SparseTeacher`): both log-sum-exps of s [n, V]
    (``rescale``: as `row_stats`)."""
    _check(s, s)
    n, vocab = s.shape
    ids, order = teacher.topk_ids.long().sort(-1)  # 𝒦 ascending (the statistics pass walks it)
    stats = torch.zeros(n, 4, dtype=torch.float32, device=s.device)
    if n:
        go = launch(vocab, s.device, block, warps, "sparse")
        _sparse_stats_kernel[(n,)](s, ids.to(torch.int32).contiguous(), stats, vocab, s.stride(0),
                                   RESCALE_GAP if rescale else -1.0, K=ids.shape[1],
                                   BLOCK=go.block, **go.options)
    return SparseStats(stats, ids, teacher.topk_logprobs.gather(-1, order).to(torch.float32))


def sparse_values_and_grads(s: torch.Tensor, teacher, stats: SparseStats, w: torch.Tensor | None, cd: torch.Tensor,
                            cq: torch.Tensor | None = None, out: torch.Tensor | None = None, *,
                            y: torch.Tensor | None = None, cy: torch.Tensor | None = None, block: int | None = None,
                            warps: int | None = None) -> torch.Tensor:
    """`divergences.SPARSE` (a top-K cache teacher, `divergences.SparseTeacher`) by the kernels, after
    `sparse_stats`: per-row value [n] (NaN on rows with a NaN logit or tail mass) and, when ``out`` is given (it may
    be ``s``), G = cd·∂D/∂s + cq·q − cy·onehot(y) written into it. ``w`` [n]: the row weight of the tail points
    as its log (log β(X) for TAD, 0 for KD; used only with tail points; `divergences.sparse_tail_points`). [n, K]
    and [n, J] torch ops for the value and the coefficients, a gradient pass, then the K entries of 𝒦 and the tail
    points' −W·ŵ_j set in torch, as `divergences._sparse_backward` does (into a bf16 / fp16 ``out``, the tail
    points' whole gradient is re-evaluated in float32 and rounded once)."""
    _check(s, s)
    n, vocab = s.shape
    go = launch(vocab, s.device, block, warps, "sparse")
    cd, cq0, cy, y = _row_coefs(cd, cq, cy, y)
    ids, logp_top = stats.ids, stats.logp_top
    log_at = teacher.log_tail_mass.to(torch.float32)
    st = stats.stats
    log_as = (st[:, 2] - st[:, 0]) + st[:, 3] - st[:, 1]  # as `RowStats.log_mass`

    def logq(cols):  # log q at ``cols`` [n, J]: (s − m) − log S, torch's log_softmax formula (not s − (m + log S))
        return (s.gather(-1, cols).to(torch.float32) - st[:, :1]) - st[:, 1:2]

    logq_top = logq(ids)
    alpha_t, p_top = log_at.exp(), logp_top.exp()
    big_w, tids, tw = dv.sparse_tail_points(teacher, w, torch.float32)
    logp_t = logq_t = None
    if big_w is not None:
        logp_t = teacher.tail_logprobs.to(torch.float32)
        logq_t = logq(tids)
    value = dv.sparse_value(p_top, logp_top, logq_top, log_at, log_as, big_w, tw, logp_t, logq_t)
    if out is not None and n:
        c, w_tail = dv.sparse_grad_coefs(p_top, alpha_t, big_w, tw)
        coef_q = cd * c + cq0
        coef = torch.stack([coef_q, cd * w_tail, cy], 1).contiguous()
        _sparse_grad_kernel[(n,)](s, out, stats.stats, coef, y, vocab, s.stride(0), out.stride(0), BLOCK=go.block,
                                  **go.options)
        top = coef_q[:, None] * logq_top.exp() - cd[:, None] * p_top - cy[:, None] * (ids == y[:, None])
        out.scatter_(-1, ids, top.to(out.dtype))
        if big_w is not None:
            points = -(cd * big_w)[:, None] * tw  # [n, J] − W Σ_j ŵ_j e_{id_j}
            if out.dtype == torch.float32:
                out.scatter_add_(-1, tids, points)
            else:  # one rounding: the kernel's float32 value at the points re-evaluated, their terms added, written
                at = (coef_q[:, None] * logq_t.exp() + (cd * w_tail)[:, None] * (logq_t - log_as[:, None]).exp()
                      - cy[:, None] * (tids == y[:, None]))
                same = tids[:, :, None] == tids[:, None, :]  # [n, J, J]: a point drawn twice gets both weights
                out.scatter_(-1, tids, (at + (same * points[:, None, :]).sum(-1)).to(out.dtype))
    poisoned = torch.isnan(stats.lse()) | torch.isnan(log_at)
    return torch.where(poisoned, math.nan, value)


def scale_(x: torch.Tensor, g: torch.Tensor, expected: float) -> torch.Tensor:
    """x ·= g / ``expected`` in place, unless g == ``expected``, decided on the device (no host read): the chunked
    layer's backward, whose gradients were computed in forward at the scale ``expected``, taking the incoming
    gradient ``g`` (one float32 element on x's device). ``expected`` is compared exactly with g (pass a float32
    value). Where g differs the product is computed in float32 and rounded once to x's dtype (float32, bf16 or
    fp16, contiguous). Returns x."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float32, bf16 or fp16 tensor; got {x.dtype}, "
                         f"{'contiguous' if x.is_contiguous() else 'not contiguous'}")
    if g.numel() != 1 or g.dtype != torch.float32 or g.device != x.device:
        raise ValueError(f"g must be one float32 element on {x.device}; got {tuple(g.shape)} {g.dtype} on {g.device}")
    numel = x.numel()
    if numel:
        go = launch(numel, x.device, kind="scale")
        per = SCALE_PROGRAMS_PER_SM * (torch.cuda.get_device_properties(x.device).multi_processor_count
                                       if x.device.type == "cuda" else 1)
        _scale_kernel[(min(triton.cdiv(numel, go.block), per),)](x, g, float(expected), numel, BLOCK=go.block,
                                                                  **go.options)
    return x
