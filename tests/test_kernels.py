"""The Triton row kernels (`tailkd.kernels`) equal the float64 reference (tests/reference.py) and divergences.py.

Without CUDA they run on the CPU under Triton's interpreter: ``TRITON_INTERPRET=1`` is set below before triton is
imported, because ``triton.jit`` reads it (triton 3.x: ``triton.knobs.runtime.interpret``) when it decorates the
kernels, i.e. when `tailkd.kernels` is first imported. Skipped when triton is not installed (``pip install
tailkd[kernels]``).

Tolerances. The kernels compute the library's float32 formulas (log-probabilities (x − m) − log S, the same products and
sums), so each result is within `loss_bounds`' bound for one float32 evaluation of that divergence, with one difference
the bound is told of through its ``dz`` argument (an absolute error carried by every log-sum-exp of a row; log-softmax
is 2-Lipschitz, so each log-probability gets 2·dz more): the log-sum-exps are accumulated online. Each fold of a block
(or of one entry leaving TAD's running top-K) multiplies the running sum by exp(m_old − m_new) and adds to it: at most 3
roundings relative to the sum (the subtraction's error u|m_old − m_new| multiplies a term of weight exp(−|m_old −
m_new|), so it is below u/e), hence dz = 3u·(number of folds); a tail sum that takes a block from the full sum's block
sum (S·e^(m − m') + B·e^(c − m')) has two roundings more: 5u per fold. TAD's log α = (m_tail − m) + log S_tail − log S
is one log-sum-exp more than the linear tail sum the bound models, so dz also carries κ_V (`bounds.lse_kappa`). bf16
inputs are exact in float32 (the reference reads the same values); a bf16 gradient is rounded once more on store: +
2u_bf16·|G| (one ulp: round-to-nearest on the GPU is u_bf16, but Triton 3.9's interpreter truncates float32 -> bf16,
whose error is up to one ulp). The combination G = cd·∂D/∂s + cq·q adds at most 4 roundings per entry on the magnitudes
it combines. Values and gradients are compared with the float64 reference (exact up to 1e-12) within the bound, and with
divergences.py's float32 kernels within twice the bound (two float32 evaluations).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (triton.jit reads it when decorating)

triton = pytest.importorskip("triton")

from conftest import triton_interpreter_problem  # noqa: E402

if triton_interpreter_problem():
    pytest.skip(triton_interpreter_problem(), allow_module_level=True)

import bounds as B  # noqa: E402
import loss_bounds as LB  # noqa: E402
import reference as R  # noqa: E402

from tailkd import divergences as dv  # noqa: E402
from tailkd import fused, kernels  # noqa: E402
from tailkd.losses import group_log_mean, log_alpha_mean, tail_log_weight  # noqa: E402

if DEVICE == "cpu" and type(kernels._stats_kernel).__name__ != "InterpretedFunction":
    raise RuntimeError("tailkd.kernels was imported before TRITON_INTERPRET=1 was set: its kernels cannot run on the "
                       "CPU; run tests/test_kernels.py in its own process or import it first")

U = B.U32
BLOCK = 128  # columns per kernel step: V = 257 and 1000 span several blocks with a partial last one
TWO_STAGE_BLOCK = 16  # TAD's two-stage pass 1: rows of 257 and 1000 columns have 17 and 63 blocks, most below θ
PASS1 = pytest.mark.parametrize("two_stage", [False, True], ids=["walk", "two-stage"])  # TAD's pass 1, both ways
LOSSES = {  # name: (kernels.RowLoss, divergences RowKernel, float64 reference, loss_bounds function)
    "kd": (kernels.RowLoss(0), dv.KL, R.forward_kl, LB.forward_kl),
    "rkl": (kernels.RowLoss(1), dv.RKL, R.reverse_kl, LB.reverse_kl),
    "jsd": (kernels.RowLoss(2, jsd_beta=0.3), dv.jsd_kernel(0.3), lambda s, t: R.jsd(s, t, 0.3),
            lambda s, t, dz_s=None, dz_t=None: LB.jsd(s, t, 0.3, dz_s=dz_s, dz_t=dz_t)),
}
# one program per row: rows beyond a few repeat the same path, the columns (several blocks, a partial last one) matter
SHAPES = [(1, 50), (7, 257), (9, 1000)]
BETA = 2.0


def _logits(n, vocab, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale
    return s.to(dtype), t.to(dtype)


def _insertions(t: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, how many entries enter the kernel's running top-k after the first k columns (each also evicts one):
    the scan of `kernels._stats_kernel` in column order, strict '>' against the buffer's minimum."""
    out = []
    for row in t.double().tolist():
        buf = sorted(row[:k])
        count = 0
        for x in row[k:]:
            if x > buf[0]:
                buf[0] = x
                buf.sort()
                count += 1
        out.append(count)
    return torch.tensor(out, dtype=torch.float64)


def _candidates(t: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Per row, a bound on the entries leaving the running top-k of the two-stage pass (`kernels._topk_kernel`): the
    entries ≥ θ, the k-th largest block maximum (only they enter its buffer, each at most once); where fewer than k
    blocks have a finite maximum (θ = −inf) it walks the row as the single pass does (`_insertions`)."""
    out = []
    for row, walk in zip(t.double(), _insertions(t, k)):
        maxima = torch.stack([c.max() for c in row.split(block)])
        theta = maxima.sort(descending=True).values[k - 1] if len(maxima) >= k else -math.inf
        out.append(float(walk) if theta == -math.inf else float((row >= theta).sum()))
    return torch.tensor(out, dtype=torch.float64)


def _folds(t: torch.Tensor, k: int = 0, block: int = BLOCK, two_stage: bool = False) -> torch.Tensor:
    """The online folds of a row's log-sum-exps: one per block, and for TAD one per entry leaving the top-k (plus k
    for the buffer's start) — of the single pass (`_insertions`) or of the two-stage one (`_candidates`)."""
    n, vocab = t.shape
    folds = math.ceil(vocab / block) * torch.ones(n, dtype=torch.float64)
    if k:
        folds = folds + (_candidates(t, k, block) if two_stage else _insertions(t, k)) + k
    return folds


def _dz(t: torch.Tensor, k: int = 0, tail: bool = False, block: int = BLOCK, two_stage: bool = False) -> torch.Tensor:
    """dz per row (module docstring): 3u per online fold (blocks, and for TAD the entries leaving the top-k), 5u
    where a tail sum is kept (TAD, or ``tail``: a cache teacher's α^S): a block folded into it from the full sum's
    block sum costs two roundings more (S·e^(m − m') + B·e^(c − m'): two exps, two products, one sum); plus κ_V for
    TAD's log-space tail masses. ``block``: the statistics pass's columns per step; ``two_stage``: TAD's top-k in two
    stages (`_folds`; its tail sums take the blocks below θ as one tree sum of such terms: within 5u per block)."""
    folds = _folds(t, k, block, two_stage)
    return (5 if k or tail else 3) * U * folds + (B.lse_kappa(t.shape[1]) if k else 0.0)


def _ref_grad(fn, s, t):
    """(values [n], ∂(Σ values)/∂s [n, V]) of a float64 reference function of (s, t)."""
    leaf = s.double().requires_grad_(True)
    value = fn(leaf, t.double())
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


def _log_w(abar):
    """TAD's row weight as its kernels take it, log β(X) [n] float64, from ᾱ [n]."""
    return tail_log_weight(log_alpha_mean(abar), BETA)


def _run(loss, s, t, cd, cq, w=None, out_dtype=None, y=None, cy=None, rescale=True, blocks=(BLOCK, BLOCK),
         two_stage=False, in_place=False):
    """Both passes, at ``blocks`` = (statistics pass, value + gradient pass) columns per step; ``two_stage``: TAD's
    top-k in two stages (`kernels.TAD_TWO_STAGE`); ``in_place``: G written over (a copy of) s, as the chunked layer
    does (``out`` = s)."""
    stats = kernels.row_stats(s, t, loss.k, block=blocks[0], rescale=rescale, two_stage=two_stage)
    if loss.kind == 3 and w is None:
        w = _log_w(stats.log_alpha.double().exp().mean().expand(s.shape[0]))
    if in_place:
        s = s.clone()
        out = s
    else:
        out = torch.empty(s.shape, dtype=out_dtype or s.dtype, device=s.device)
    value = kernels.row_values_and_grads(loss, s, t, stats, w, cd, cq, out, y=y, cy=cy, block=blocks[1])
    return value.cpu(), out.cpu(), stats


def _coefs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g)


def _onehot(n, vocab, seed):
    """The CLM's one-hot folded into G: a label per row (row 0 on column V − 1, the partial last block; row 1, if
    any, without one: −1) and its coefficient cy."""
    g = torch.Generator().manual_seed(seed + 1000)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[0] = vocab - 1
    if n > 1:
        y[1] = -1
    return y, torch.rand(n, generator=g) + 0.25


def _minus_onehot(ref_g, y, cy):
    """ref_g − cy·onehot(y) (float64; rows with y = −1 unchanged)."""
    out = ref_g.clone()
    rows = (y >= 0).nonzero().squeeze(1)
    out[rows, y[rows]] -= cy.double()[rows]
    return out


def _grad_bound(gb, s, cd, cq, dz, ref_g, p_w, out_dtype, y, cy):
    """|cd|·(∂D/∂s bound) + |cq|·(q's bound) + 4u per entry on what G combines, + one rounding of the one-hot's
    subtraction (u·(|G| + cy) at the label), + the bf16 store."""
    Q = LB._Dist(s, 1.0, dz)
    cd64, cq64 = cd.double()[:, None], cq.double()[:, None]
    bound = cd64.abs() * gb + cq64.abs() * B.SAFETY * Q.w * Q.rel
    bound = bound + B.SAFETY * 4 * U * (cd64.abs() + cq64.abs()) * (Q.w + p_w + ref_g.abs())
    label = _minus_onehot(torch.zeros_like(ref_g), y, cy) != 0  # the label entries (cy > 0)
    bound = bound + B.SAFETY * U * torch.where(label, ref_g.abs() + cy.double()[:, None], 0.0)
    if out_dtype == torch.bfloat16:
        bound = bound + 2 * B.U_BF16 * ref_g.abs()  # one ulp (module docstring)
    return bound


def _check_dense(name, s, t, seed, out_dtype=None, blocks=(BLOCK, BLOCK), in_place=False):
    loss, kern, ref_fn, bound_fn = LOSSES[name]
    n = s.shape[0]
    cd, cq = _coefs(n, seed)
    y, cy = _onehot(n, s.shape[1], seed)
    value, g, _ = _run(loss, s.to(DEVICE), t.to(DEVICE), cd.to(DEVICE), cq.to(DEVICE), out_dtype=out_dtype,
                       y=y.to(DEVICE), cy=cy.to(DEVICE), blocks=blocks, in_place=in_place)
    ref_v, ref_d = _ref_grad(ref_fn, s, t)
    q64 = torch.softmax(s.double(), -1)
    ref_g = _minus_onehot(cd.double()[:, None] * ref_d + cq.double()[:, None] * q64, y, cy)
    dz = _dz(t, block=blocks[0])
    vb, gb = bound_fn(s.float(), t.float(), dz_s=dz, dz_t=dz)
    gbound = _grad_bound(gb, s.float(), cd, cq, dz, ref_g, torch.softmax(t.double(), -1), out_dtype or s.dtype, y,
                         cy)
    B.assert_within(value, ref_v, vb + B.REF64_ATOL, msg=f"{name} value vs reference")
    B.assert_within(g, ref_g, gbound + B.REF64_ATOL, msg=f"{name} gradient vs reference")
    # divergences.py in float32, on the same (float32-valued) inputs: two evaluations, each within the bound
    s32, t32 = s.float(), t.float()
    v32, state = kern.forward(s32, torch.log_softmax(s32, -1), kern.teacher(t32.clone()), None)
    g32 = _minus_onehot(kern.backward(state, cd, cq).double(), y, cy)
    B.assert_within(value, v32, 2 * vb, msg=f"{name} value vs divergences.py")
    B.assert_within(g, g32, 2 * gbound, msg=f"{name} gradient vs divergences.py")


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("n,vocab", SHAPES)
def test_dense_kernels_equal_reference(name, n, vocab):
    s, t = _logits(n, vocab, seed=vocab + n)
    _check_dense(name, s, t, seed=n)


@pytest.mark.parametrize("name", list(LOSSES))
def test_dense_kernels_write_the_gradient_in_place_over_the_logits(name):
    """``out`` = s, as the chunked layer passes it (τ = 1, no soft-cap: G overwrites the chunk's logits): value and G
    against the float64 reference of the logits before the call, within the bounds above. RKL and JSD read s twice
    (the value pass, then the gradient pass, whose G holds the row value): their value pass must not write ``out``
    (where it wrote it with its zero coefficients, s was 0 when the gradient pass read it)."""
    s, t = _logits(7, 257, seed=71)
    _check_dense(name, s, t, seed=71, in_place=True)


@pytest.mark.parametrize("name", list(LOSSES))
def test_dense_kernels_bf16_inputs_and_gradient(name):
    s, t = _logits(7, 257, seed=11, dtype=torch.bfloat16)
    _check_dense(name, s, t, seed=3, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("name", list(LOSSES))
def test_dense_kernels_extreme_logits(name):
    """Logits offset by ±1e4 (per row and per entry) and −inf entries where the divergence stays finite: teacher
    zeros (p = 0) for kd and jsd, student zeros (q = 0) for rkl and jsd."""
    s, t = _logits(7, 257, seed=5, dtype=torch.float64)
    s = s + torch.tensor([1e4, -1e4, 0, 3e3, -5e3, 1e4, 0], dtype=torch.float64)[:, None]
    t = t - torch.tensor([1e4, 0, -1e4, 2e3, 1e4, -1e4, 0], dtype=torch.float64)[:, None]
    s[6, :40] += 1e4  # one row whose student mass sits on 40 entries, 1e4 above the rest
    if name in ("kd", "jsd"):
        t[:, 100:130] = -math.inf
    if name in ("rkl", "jsd"):
        s[:, 200:210] = -math.inf
    _check_dense(name, s.float(), t.float(), seed=4)


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.9])
def test_jsd_kernel_where_the_mixture_underflows(beta, monkeypatch):
    """Rows whose float32 mixture β p + (1 − β) q of an entry rounds to 0 although one side has mass there (2^-149
    against 0: `test_losses.jsd_underflow_logits`) gave log m = −inf, a value of +inf and NaN in G; within the bound
    of the float64 reference and of divergences.py, as every other row."""
    from test_losses import jsd_underflow_logits

    monkeypatch.setitem(LOSSES, "jsd_underflow", (
        kernels.RowLoss(2, jsd_beta=beta), dv.jsd_kernel(beta), lambda s, t: R.jsd(s, t, beta),
        lambda s, t, dz_s=None, dz_t=None: LB.jsd(s, t, beta, dz_s=dz_s, dz_t=dz_t)))
    _check_dense("jsd_underflow", *jsd_underflow_logits(), seed=7)


@pytest.mark.parametrize("beta", [1e-45, 1e-39, 1e-30])
@pytest.mark.parametrize("underflow", [False, True])
def test_jsd_kernel_of_a_tiny_beta(beta, underflow, monkeypatch):
    """The kernel takes β and 1 − β (never (1 − β)/β, beyond float32's range below β ~2.9e-39: inf · 0 = NaN where
    q = 0, or a launch argument out of range): within the bound of the float64 reference, as for every β.
    ``underflow``: 40 columns where q rounds to 0 (200 nats down) and p ~ e^-95 (sub-normal): m = βp rounds to 0,
    and so did β·(p·2^100) below β ~1e-39 — log m was −inf there, the value +inf."""
    monkeypatch.setitem(LOSSES, "jsd_tiny", (
        kernels.RowLoss(2, jsd_beta=beta), dv.jsd_kernel(beta), lambda s, t: R.jsd(s, t, beta),
        lambda s, t, dz_s=None, dz_t=None: LB.jsd(s, t, beta, dz_s=dz_s, dz_t=dz_t)))
    s, t = _logits(7, 257, seed=8)
    if underflow:
        s[:, 100:140] = torch.logsumexp(s, -1, keepdim=True) - 200.0
        t[:, 100:140] = torch.logsumexp(t, -1, keepdim=True) - 95.0
    _check_dense("jsd_tiny", s, t, seed=9)


@pytest.mark.parametrize("name", [*LOSSES, "tad", "tad two-stage"])
def test_kernels_at_their_cuda_launch_blocks_equal_reference(name):
    """Each pass at the columns per step `kernels.CUDA_LAUNCH` gives it on a GPU (2048 for the streaming passes,
    1024 for TAD's top-K statistics; the other tests use 128), on rows spanning several such blocks with a partial
    last one (TAD's two-stage pass 1 at K = 2: 3 blocks, one of them below θ)."""
    s, t = _logits(3, 4500, seed=41)
    go = kernels.CUDA_LAUNCH
    if name == "tad":
        _check_tad(s, t, 10, seed=6, blocks=(go["stats_topk"].block, go["tad"].block))
    elif name == "tad two-stage":
        _check_tad(s, t, 2, seed=6, blocks=(go["two_stage"].block, go["tad"].block), two_stage=True)
    else:
        _check_dense(name, s, t, seed=6, blocks=(go["stats"].block, go["dense"].block))


def test_launch_per_pass(monkeypatch):
    """On CUDA each pass takes its `CUDA_LAUNCH` entry (capped at the row's power of two; ``block``/``warps``
    override); the interpreter takes `INTERPRETER_BLOCK`; and each entry point asks for its own pass."""
    cuda = torch.device("cuda")
    assert kernels.launch(151936, cuda, kind="stats_topk") == kernels.CUDA_LAUNCH["stats_topk"]
    assert kernels.launch(151936, cuda, kind="tad") == kernels.CUDA_LAUNCH["tad"]
    assert kernels.launch(151936, cuda, kind="two_stage") == kernels.CUDA_LAUNCH["two_stage"]
    assert kernels.CUDA_LAUNCH["two_stage_topk"].block == kernels.CUDA_LAUNCH["two_stage"].block  # one unit
    assert kernels.launch(1000, cuda, kind="dense").block == 1024  # next_power_of_2(1000) < 2048
    assert kernels.launch(151936, cuda, block=512, warps=8, kind="stats") == (512, 8)
    assert kernels.launch(151936, torch.device("cpu"), kind="stats") == (kernels.INTERPRETER_BLOCK, 4)
    asked = []
    real = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda *a, **kw: asked.append(a[4] if len(a) > 4 else kw["kind"])
                        or real(*a, **kw))
    s, t = _logits(2, 300, seed=2)
    s, t = s.to(DEVICE), t.to(DEVICE)
    cd = torch.ones(2, device=DEVICE)
    for loss in (kernels.RowLoss(0), kernels.RowLoss(3, k=4)):
        stats = kernels.row_stats(s, t, loss.k)
        kernels.row_values_and_grads(loss, s, t, stats, torch.ones(2, dtype=torch.float64, device=DEVICE), cd)
    cache = _sparse_teacher(t.cpu().double(), 4, 0, 0)
    sparse = dv.SparseTeacher(*(None if x is None else x.to(DEVICE) for x in cache))
    kernels.sparse_values_and_grads(s, sparse, kernels.sparse_stats(s, sparse), None, cd)
    kernels.row_stats(s, t, 4, two_stage=True)
    assert asked == ["stats", "dense", "stats_topk", "tad", "sparse", "sparse", "two_stage", "two_stage_topk"]


def test_every_launch_pins_fp_contraction(monkeypatch):
    """Every kernel launch passes its `Launch.options`: its warps and ``enable_fp_fusion=True`` (Triton 3.9 warns
    that 3.10 turns floating-point contraction off by default; the kernels were timed and bounded with it on). The
    passes of kd, rkl, jsd, TAD and the cache teacher run with each kernel wrapped to record its keywords."""
    seen = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                seen.append((self.name, kwargs.get("num_warps"), kwargs.get("enable_fp_fusion")))
                return self.kernel[grid](*args, **kwargs)
            return call

    names = {n for n in dir(kernels) if n.startswith("_") and n.endswith("_kernel")}
    for name in names:
        monkeypatch.setattr(kernels, name, Spy(name, getattr(kernels, name)))
    s, t = _logits(2, 300, seed=2)
    s, t = s.to(DEVICE), t.to(DEVICE)
    cd = torch.ones(2, device=DEVICE)
    for loss in (kernels.RowLoss(0), kernels.RowLoss(1), kernels.RowLoss(2, jsd_beta=0.3), kernels.RowLoss(3, k=4)):
        stats = kernels.row_stats(s, t, loss.k)
        kernels.row_values_and_grads(loss, s, t, stats, torch.ones(2, dtype=torch.float64, device=DEVICE), cd,
                                     out=torch.empty_like(s))
    cache = _sparse_teacher(t.cpu().double(), 4, 0, 0)
    sparse = dv.SparseTeacher(*(None if x is None else x.to(DEVICE) for x in cache))
    kernels.sparse_values_and_grads(s, sparse, kernels.sparse_stats(s, sparse), None, cd, out=torch.empty_like(s))
    kernels.row_stats(s, t, 4, two_stage=True)  # TAD's pass 1 in two stages
    kernels.scale_(torch.ones(300, device=DEVICE), torch.full((1,), 2.0, device=DEVICE), 1.0)  # the backward's
    assert {name for name, _, _ in seen} == names and len(names) == 7
    assert all(warps and fusion is True for _, warps, fusion in seen), seen


# --------------------------------------------------------------------------- TAD


def _check_tad(s, t, k, seed, out_dtype=None, rescale=True, blocks=None, two_stage=False):
    """TAD's two passes against the float64 reference and divergences.py (value, G, 𝒦, log α^T) at ``blocks``
    (default: `BLOCK`; pass 1 at `TWO_STAGE_BLOCK` where ``two_stage``, its top-k in two stages)."""
    blocks = blocks or (TWO_STAGE_BLOCK if two_stage else BLOCK, BLOCK)
    n = s.shape[0]
    cd, cq = _coefs(n, seed)
    s64, t64 = s.double(), t.double()
    alpha = R.tad_decompose(s64, t64, k)[2]
    abar = alpha.mean().expand(1, n)  # the chunk is one sequence: ᾱ = mean α^T of its rows, from the reference
    w = _log_w(abar.reshape(-1))
    loss = kernels.RowLoss(3, k=k)
    y, cy = _onehot(n, s.shape[1], seed)
    value, g, stats = _run(loss, s.to(DEVICE), t.to(DEVICE), cd.to(DEVICE), cq.to(DEVICE), w=w.to(DEVICE),
                           out_dtype=out_dtype, y=y.to(DEVICE), cy=cy.to(DEVICE), rescale=rescale, blocks=blocks,
                           two_stage=two_stage)
    mask = torch.ones(1, n, dtype=torch.bool)
    ref_fn = lambda a, b: R.tad(a[None], b[None], mask, k, BETA, seq_alpha_mean=abar)[0]  # noqa: E731
    ref_v, ref_d = _ref_grad(ref_fn, s, t)
    ref_ids = [sorted(R.top_ids(row, k)) for row in t64]
    assert [sorted(r) for r in stats.ids.cpu().tolist()] == ref_ids  # 𝒦: ties to the smaller id, as the reference
    q64 = torch.softmax(s64, -1)
    ref_g = _minus_onehot(cd.double()[:, None] * ref_d + cq.double()[:, None] * q64, y, cy)
    dz = _dz(t, k, block=blocks[0], two_stage=two_stage)
    vb, gb = LB.tad(s.float()[None], t.float()[None], mask, k, BETA, seq_alpha_mean=abar, dz_s=dz[None],
                    dz_t=dz[None])
    vb, gb = vb[0], gb[0]
    gbound = _grad_bound(gb, s.float(), cd, cq, dz, ref_g, torch.softmax(t64, -1), out_dtype or s.dtype, y, cy)
    B.assert_within(value, ref_v, vb + B.REF64_ATOL, msg="tad value vs reference")
    B.assert_within(g, ref_g, gbound + B.REF64_ATOL, msg="tad gradient vs reference")
    la_ref = torch.log(alpha.reshape(-1))
    B.assert_within(stats.log_alpha.cpu(), la_ref, 2 * dz + 2 * B.lse_kappa(t.shape[1]) + U * la_ref.abs(),
                    msg="log α^T (two log-sum-exps, each within κ_V + dz, and the difference's rounding)")
    kern = dv.tad_kernel(k)
    s32, t32 = s.float(), t.float()
    teacher = kern.teacher(t32.clone())
    # divergences.teacher_top_ids resolves ties at the k-th value its own (valid) way: rows where it chose another
    # 𝒦 are checked against the reference only (above)
    same = torch.tensor([sorted(a) == b for a, b in zip(teacher.ids.tolist(), ref_ids)])
    v32, state = kern.forward(s32, torch.log_softmax(s32, -1), teacher, w)
    g32 = _minus_onehot(kern.backward(state, cd, cq).double(), y, cy)
    B.assert_within(value[same], v32[same], 2 * vb[same], msg="tad value vs divergences.py")
    B.assert_within(g[same], g32[same], 2 * gbound[same], msg="tad gradient vs divergences.py")
    return same


@pytest.mark.parametrize("n,vocab,k", [(1, 50, 1), (7, 257, 5), (7, 257, 10), (9, 1000, 10), (7, 1000, 1)])
@pytest.mark.parametrize("rescale", [True, False])
@PASS1
def test_tad_kernel_equals_reference(n, vocab, k, rescale, two_stage):
    """Both ways of keeping the tail sums: blocks where nothing entered the top-k (two-stage: blocks below θ) folded
    from the full sums' block sums (the default), or every block folded by the tail itself (rescale=False)."""
    s, t = _logits(n, vocab, seed=7 * k + vocab)
    _check_tad(s, t, k, seed=k, rescale=rescale, two_stage=two_stage)


@PASS1
def test_tad_kernel_bf16_inputs_and_gradient(two_stage):
    s, t = _logits(7, 257, seed=13, dtype=torch.bfloat16)
    _check_tad(s, t, 5, seed=2, out_dtype=torch.bfloat16, two_stage=two_stage)


def _extreme_logits():
    """(s, t) [6, 257] float64 of `test_tad_kernel_extreme_logits_ties_and_minus_inf`."""
    s, t = _logits(6, 257, seed=17, dtype=torch.float64)
    s = s + torch.tensor([1e4, -1e4, 0, 0, 5e3, 0], dtype=torch.float64)[:, None]
    t = t + torch.tensor([-1e4, 1e4, 0, 0, 0, 0], dtype=torch.float64)[:, None]
    t[2, :3] = -math.inf
    t[2, 150:170] = -math.inf
    t[3] = torch.round(t[3])  # many ties, also at the k-th value
    t[4] = torch.linspace(-5, 5, 257, dtype=torch.float64)
    return s, t


@PASS1
def test_tad_kernel_extreme_logits_ties_and_minus_inf(two_stage):
    """±1e4 offsets; teacher −inf entries (p = 0, some of them inside the first k columns, which the running top-k
    starts from); a row of tied teacher logits (𝒦 = the k smallest ids, as the reference); increasing teacher logits
    (every column enters the top-k: the most evictions)."""
    s, t = _extreme_logits()
    same = _check_tad(s.float(), t.float(), 5, seed=6, two_stage=two_stage)
    assert same[[0, 1, 2, 4, 5]].all()  # rows without ties: the same 𝒦 as divergences.py


@PASS1
def test_tad_kernel_subnormal_teacher_tail_and_underflowing_student_tail(two_stage):
    """Teacher: a 100-nat gap after its top 3 (α^T ~ e^-100, below float32's normal range: the log-space value
    KL(p̃‖q̃) and the q̃/p̃ gradient). Student (rows 3, 4): 2× the teacher's logits (α^S ~ e^-200 < 1e-30: the ratio α^T/α^S
    leaves the normal path)."""
    g = torch.Generator().manual_seed(21)
    t = torch.randn(5, 60, generator=g, dtype=torch.float64)
    t = t.scatter_add(-1, torch.topk(t, 3).indices, torch.full((5, 3), 100.0, dtype=torch.float64))
    s = torch.randn(5, 60, generator=g, dtype=torch.float64)
    s[3:] = 20 * t[3:] / 10
    _check_tad(s.float(), t.float(), 3, seed=9, two_stage=two_stage)
    # `_check_tad`'s bounds (`loss_bounds.tad`) count these log-space rows since 8a76889 (before, a linear tail sum
    # whose sub-normal summands each carried 2^-149 times β(X) ~ 1e43 here: vacuous). The direct bound below, derived
    # for the log-space value top + bucket + W·KL(p̃‖q̃) (W = β(X)·α^T ~ 1) and the q̃/p̃ gradient
    # cd(q + (W − α^T)q̃ − W p̃) + cq·q on their tail, is kept as a second check. Each float32 log-probability
    # (x − m) − log S is within ε = 6u(2M + log V) of its value (M = max |logit|: three roundings of magnitude
    # ≤ 2M + log V per side), so log α^T, hence W (relative), and every log(p̃/q̃), q, q̃, p̃ (relative) are within
    # ~2ε; then |Δ(W·KL)| ≤ 2ε|W|(KL + 1 + L), L = max_tail |log(p̃/q̃)|, the top and bucket terms are within
    # 2ε(1 + |top| + |bucket|), and each gradient entry within 2ε times the sum of its terms' magnitudes; 4× those
    # are the bounds.
    s32, t32 = s.float(), t.float()
    k, n, vocab = 3, s.shape[0], s.shape[1]
    (_d1, d_kl2, alpha) = R.tad_decompose(s, t, k)
    abar = alpha.mean().expand(1, n)
    w = _log_w(abar.reshape(-1))
    cd, cq = _coefs(n, 5)
    stats = kernels.row_stats(s32.to(DEVICE), t32.to(DEVICE), k, two_stage=two_stage,
                              block=TWO_STAGE_BLOCK if two_stage else None)
    out = torch.empty_like(s32).to(DEVICE)
    value = kernels.row_values_and_grads(kernels.RowLoss(3, k=k), s32.to(DEVICE), t32.to(DEVICE), stats,
                                         w.to(DEVICE), cd.to(DEVICE), cq.to(DEVICE), out).cpu().double()
    mask = torch.ones(1, n, dtype=torch.bool)
    ref, ref_d = _ref_grad(lambda a, b: R.tad(a[None], b[None], mask, k, BETA, seq_alpha_mean=abar)[0], s, t)
    q64 = torch.softmax(s, -1)
    ref_g = cd.double()[:, None] * ref_d + cq.double()[:, None] * q64
    big_w = w.exp() * alpha.reshape(-1)
    top = torch.zeros(n, vocab, dtype=torch.bool).scatter(-1, torch.topk(t, k).indices, True)
    tail_logp = torch.log_softmax(t.masked_fill(top, -math.inf), -1)  # log p̃ (−inf on 𝒦)
    tail_logq = torch.log_softmax(s.masked_fill(top, -math.inf), -1)
    L = (tail_logp - tail_logq).masked_fill(top, 0.0).abs().amax(-1)
    eps = 6 * U * (2 * max(s.abs().max(), t.abs().max()) + math.log(vocab))
    rest = (ref - big_w * d_kl2).abs()  # |top + bucket|
    bound = 4 * 2 * eps * (big_w * (d_kl2.abs() + 1 + L) + 1 + rest)
    assert (big_w > 0.1).all() and (bound < 0.1 * (big_w * d_kl2).abs()).all()  # the log-space term is seen
    B.assert_within(value, ref, bound, msg="tad value of sub-normal-α^T rows (log space) vs reference")
    p64, c, bw = torch.softmax(t, -1), cd.double()[:, None], big_w[:, None]
    terms = torch.where(top, (c + cq.double()[:, None]) * q64 + c * p64,
                        (c + cq.double()[:, None]) * q64 + c * ((bw - alpha.reshape(-1, 1)).abs() * tail_logq.exp()
                                                                + bw * tail_logp.exp()))
    B.assert_within(out.cpu().double(), ref_g, 4 * 2 * eps * terms + B.REF64_ATOL,
                    msg="tad gradient of sub-normal-α^T rows (q̃/p̃ form) vs reference")


@PASS1
def test_tad_kernel_log_space_rows_of_a_teacher_tail_between_1e_38_and_1e_30(two_stage):
    """Teacher top 3 84 nats above its tail: α^T ~1e-35, normal in float32 but below the 1e-30 under which `_tad_row`
    takes the row in log space (its "tiny", as `divergences.tad_tiny_rows`): linear sums of the tail's p_i, mostly
    sub-normal, lose their bits. Value and gradient within `_check_tad`'s bounds (float64 reference, divergences.py);
    a 1e-38 threshold put 6 gradient entries 3× beyond them (mutation audit)."""
    s, t = _logits(3, 257, seed=51, dtype=torch.float64)
    t = t.scatter_add(-1, torch.topk(t, 3).indices, torch.full((3, 3), 84.0, dtype=torch.float64))
    alpha = R.tad_decompose(s, t, 3)[2]
    assert ((1e-38 < alpha) & (alpha < 1e-30)).all()  # the case meant
    _check_tad(s.float(), t.float(), 3, seed=5, two_stage=two_stage)


@PASS1
def test_tad_kernel_student_tail_underflow_beside_a_normal_teacher_tail(two_stage):
    """Rows whose gradient takes the q̃/p̃ form while α^T is normal (not sub-normal: W = β(X)·α^T ~ 2, where
    W − α^T and W differ): the student's logits on the teacher's top 3 lifted by 200 nats (α^S ~ e^-200: the ratio
    α^T/α^S is not finite) or by 90.5 (α^T/α^S ~ e^88.3: finite but above 1e30, where the plain form's tail q, down
    to ~4e-42, is sub-normal: ~1e-4 relative precision), beside a row on the plain form."""
    g = torch.Generator().manual_seed(23)
    t = torch.randn(3, 60, generator=g, dtype=torch.float64)
    s = torch.randn(3, 60, generator=g, dtype=torch.float64)
    lift = torch.tensor([200.0, 90.5, 0.0], dtype=torch.float64)[:, None].expand(3, 3)
    s = s.scatter_add(-1, torch.topk(t, 3).indices, lift.contiguous())
    las = torch.logsumexp(s.scatter(-1, torch.topk(t, 3).indices, -math.inf), -1) - torch.logsumexp(s, -1)
    lat = torch.logsumexp(t.scatter(-1, torch.topk(t, 3).indices, -math.inf), -1) - torch.logsumexp(t, -1)
    log_ratio, log_max = lat - las, math.log(torch.finfo(torch.float32).max)  # log(α^T/α^S); float32's overflow
    assert lat.exp().min() > 0.1 and log_ratio[0] > log_max and 69.1 < log_ratio[1] < log_max and log_ratio[2] < 5
    _check_tad(s.float(), t.float(), 3, seed=10, two_stage=two_stage)


@pytest.mark.parametrize("student_tail_logit", [-25.0, -12.0])
def test_tad_kernel_gradient_where_beta_x_times_the_tail_ratio_overflows(student_tail_logit):
    """One row as its own sequence, a small normal teacher tail (α^T ~ e^-40: β(X) = β/α^T ~ 7e17) and a student tail
    at e^-105 (0 in float32) or e^-92 (sub-normal): α^T/α^S is below 1e30, but 1 + (β(X) − 1)·α^T/α^S overflows
    float32: the plain form's tail gradient was NaN (0·inf) or +inf (test_losses.py has the torch path's)."""
    s = torch.tensor([[80.0, 0.0, 0.0, student_tail_logit]])
    t = torch.tensor([[30.0, 29.0, 28.0, -10.0]])
    _check_tad(s, t, 3, seed=10)


@PASS1
def test_tad_kernel_empty_teacher_tail_beside_rows_with_tail_mass(two_stage):
    """Row 0's teacher is −inf outside its top 5 (α^T = 0 exactly) while the sequence's other rows have tail mass,
    so its weight w = β/ᾱ is finite and positive: its tail term is 0 and its gradient q − p (no log-space row: p̃ is
    undefined there; it was NaN on every tail entry)."""
    s, t = _logits(7, 257, seed=23, dtype=torch.float64)
    t[0, 5:] = -math.inf
    same = _check_tad(s.float(), t.float(), 5, seed=8, two_stage=two_stage)
    assert same.all()


def test_tad_kernel_empty_teacher_tail_with_a_weight_beyond_float32():
    """A row with α^T = 0 in a sequence whose other tails are sub-normal: log β(X) = 100 (β/ᾱ ~ e^100, inf as a
    float32 weight). The row's value and gradient do not depend on its weight (its tail term is 0, its gradient
    cd(q − p) + cq·q − cy·onehot): the weight is set to 0 on an empty tail before it meets the tail, so they equal
    those at log β(X) = 0 bit for bit (the same float32 operations on the same inputs), finite, not inf·0 = NaN."""
    s, t = _logits(1, 257, seed=31)
    t[0, 5:] = -math.inf
    cd, cq = _coefs(1, 4)
    y, cy = _onehot(1, 257, 4)
    s, t, cd, cq, y, cy = (x.to(DEVICE) for x in (s, t, cd, cq, y, cy))
    loss = kernels.RowLoss(3, k=5)
    runs = []
    for log_w in (0.0, 100.0):
        stats = kernels.row_stats(s, t, 5)
        assert stats.log_alpha.item() == -math.inf  # the case meant: an empty teacher tail
        out = torch.empty_like(s)
        value = kernels.row_values_and_grads(loss, s, t, stats, torch.full((1,), log_w, dtype=torch.float64,
                                                                           device=DEVICE), cd, cq, out, y=y, cy=cy)
        runs.append((value.cpu(), out.cpu()))
    (v0, g0), (v1, g1) = runs
    assert torch.isfinite(v1).all() and torch.isfinite(g1).all()
    assert torch.equal(v0, v1) and torch.equal(g0, g1)


def test_tad_kernel_is_plus_inf_where_the_student_has_no_tail():
    """Student −inf outside the teacher's top 5, teacher with tail mass: α^S = 0, the bucket α^T log(α^T/α^S) = +inf
    and KL(p‖q) = +inf; TAD's value is +inf (as `divergences._tad_forward`'s), not NaN from the tail term's
    inf − inf. Exact (IEEE inf), no tolerance."""
    s, t = _logits(2, 257, seed=37)
    ids = torch.topk(t, 5).indices
    s = torch.full_like(s, -math.inf).scatter(-1, ids, s.gather(-1, ids))
    s, t = s.to(DEVICE), t.to(DEVICE)
    stats = kernels.row_stats(s, t, 5)
    value = kernels.row_values_and_grads(kernels.RowLoss(3, k=5), s, t, stats,
                                         torch.zeros(2, dtype=torch.float64, device=DEVICE),
                                         torch.ones(2, device=DEVICE))
    assert torch.isposinf(value).all(), value


@pytest.mark.parametrize("tail_shift", [0.0, 80.0])
def test_tad_kernel_at_beta_zero_is_d_kl1_where_the_student_has_minus_inf_on_the_teacher_tail(tail_shift):
    """β = 0 (log β(X) = −inf: no tail term, L = D_KL1, as `divergences._tad_forward`): row 0's student is −inf at a
    tail entry where the teacher has mass, so D_KL2 = +inf while D_KL1 is finite; its value was 0·inf = NaN. Value
    and gradient against divergences.py on the same float32 inputs within twice `loss_bounds.tad_decompose`'s D_KL1
    bound (two evaluations, each within it), as the other rows. ``tail_shift`` 80: the teacher's tail 80 nats lower
    (α^T ≈ e^-80 < 1e-30), where `_tad_row` takes a row of positive weight to log space, and one of weight 0 must
    not go there (its W·D_KL2 would be 0·inf)."""
    s, t = _logits(2, 257, seed=43)
    tail = torch.ones_like(t, dtype=torch.bool).scatter(-1, torch.topk(t, 5).indices, False)
    t = t - tail_shift * tail
    s[0, tail[0].nonzero()[0]] = -math.inf
    cd = torch.ones(2)
    log_w = torch.full((2,), -math.inf, dtype=torch.float64)
    stats = kernels.row_stats(s.to(DEVICE), t.to(DEVICE), 5)
    out = torch.empty(s.shape, device=DEVICE)
    value = kernels.row_values_and_grads(kernels.RowLoss(3, k=5), s.to(DEVICE), t.to(DEVICE), stats,
                                         log_w.to(DEVICE), cd.to(DEVICE), out=out).cpu()
    kern = dv.tad_kernel(5)
    v32, state = kern.forward(s, torch.log_softmax(s, -1), kern.teacher(t.clone()), log_w)
    g32 = kern.backward(state, cd, None)
    (vb, gb), _, _ = LB.tad_decompose(s, t, 5)
    assert torch.isfinite(value).all() and torch.isfinite(out).all()
    B.assert_within(value, v32, 2 * vb + B.REF64_ATOL, msg="value vs divergences.py")
    B.assert_within(out.cpu(), g32, 2 * gb + B.REF64_ATOL, msg="gradient vs divergences.py")


def test_tad_kernel_gradient_at_beta_zero_where_the_tail_ratio_is_above_1e30():
    """β = 0 (log β(X) = −inf, w = 0) on a row whose student puts its top-1 88 nats above its tail while the teacher's
    tail holds most of the mass: α^T/α^S ≈ e^82 ≈ 4e35, finite in float32, and w·α^T/α^S = 0, so only `_tad_row`'s
    ratio > 1e30 test puts the row on the q̃/p̃ form (as `divergences.tad_gradient_form`; test_losses has the torch
    path): the plain c2 = 1 − α^T/α^S times q_i ≈ 2e-36·q̃_i, sub-normal where q̃_i is small, loses their bits.
    Value and gradient within loss_bounds.tad (float32, first order, the statistics pass's dz) of the float64
    reference."""
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(1, 200, generator=gen, dtype=torch.float64) * 2
    s = torch.randn(1, 200, generator=gen, dtype=torch.float64) * 2
    s = s.scatter_add(-1, torch.topk(t, 1).indices, torch.full((1, 1), 88.0, dtype=torch.float64)).float()
    t = t.float()
    cd = torch.ones(1)
    log_w = torch.full((1,), -math.inf, dtype=torch.float64)
    stats = kernels.row_stats(s.to(DEVICE), t.to(DEVICE), 1)
    assert math.log(1e30) < float(stats.log_mass(1) - stats.log_mass(0)) < math.log(3e38)  # the case meant
    out = torch.empty(s.shape, device=DEVICE)
    value = kernels.row_values_and_grads(kernels.RowLoss(3, k=1), s.to(DEVICE), t.to(DEVICE), stats,
                                         log_w.to(DEVICE), cd.to(DEVICE), out=out).cpu()
    mask = torch.ones(1, 1, dtype=torch.bool)
    ref_v, ref_g = _ref_grad(lambda a, b: R.tad(a[None], b[None], mask, 1, 0.0)[0], s, t)
    dz = _dz(t, 1)
    vb, gb = LB.tad(s[None], t[None], mask, 1, 0.0, dz_s=dz[None], dz_t=dz[None])
    B.assert_within(value, ref_v, vb[0] + B.REF64_ATOL, msg="value")
    B.assert_within(out.cpu(), ref_g, gb[0] + B.REF64_ATOL, msg="gradient")


def _block_edge_logits():
    """(s, t) [3, 257] float64 whose teacher top-7 sits where the ascending walk of `_tad_kernel` turns: column 0, both
    sides of a block edge (127 | 128), several ids in one block, the partial last block and column V − 1; and a row
    whose 𝒦 is all in its last block."""
    s, t = _logits(3, 257, seed=29, dtype=torch.float64)
    for row, cols in ((0, [0, 127, 128, 200, 201, 202, 256]), (1, [255, 256, 129, 3, 130, 131, 64]),
                      (2, [250, 251, 252, 253, 254, 255, 256])):
        t[row, cols] = 20.0 + torch.arange(len(cols), dtype=torch.float64)
    return s, t


@PASS1
def test_tad_kernel_top_k_at_block_edges_and_clustered(two_stage):
    """𝒦 at block edges and clustered (`_block_edge_logits`; 128 is also an edge of the two-stage pass's blocks)."""
    s, t = _block_edge_logits()
    same = _check_tad(s.float(), t.float(), 7, seed=4, two_stage=two_stage)
    assert same.all()


@PASS1
def test_tad_kernel_signed_zero_ties_at_the_k_th_value(two_stage):
    """Half of each teacher row at ±0 (−0.0 beside +0.0, equal as float comparisons have them), so that the K-th
    value is a tie among zeros: pass 1 keeps the smallest ids among them, as the reference does, and pass 2's rule
    (a column is in 𝒦 iff (t, −id) ≥ (t_k, −i_k), 𝒦's last entry) marks exactly those; value and G against the
    float64 reference."""
    g = torch.Generator().manual_seed(41)
    t = torch.randn(2, 300, generator=g, dtype=torch.float64).clamp(max=0.0)
    t[0, ::2] = -t[0, ::2].abs()
    s = torch.randn(2, 300, generator=g, dtype=torch.float64)
    _check_tad(s.float(), t.float(), 6, seed=6, two_stage=two_stage)


@PASS1
def test_row_stats_top_k_ascending_and_paired_with_both_sides(two_stage):
    """𝒦 is stored by ascending id (as `RowStats` says) with both sides' logits in the same order, exactly
    the logits at those ids; the teacher-only pass (s = None) gives the same teacher columns bit for bit."""
    s, t = _logits(9, 1000, seed=31, dtype=torch.bfloat16)
    s, t = s.to(DEVICE), t.to(DEVICE)
    block = TWO_STAGE_BLOCK if two_stage else BLOCK
    stats = kernels.row_stats(s, t, 16, block=block, two_stage=two_stage)
    ids = stats.ids.long()
    assert stats.ids.dtype == torch.int32 and bool((ids[:, 1:] > ids[:, :-1]).all())
    assert torch.equal(stats.t_top, t.float().gather(-1, ids))
    assert torch.equal(stats.s_top, s.float().gather(-1, ids))
    alone = kernels.row_stats(None, t, 16, block=block, two_stage=two_stage)
    assert torch.equal(alone.ids, stats.ids) and torch.equal(alone.t_top, stats.t_top)
    assert torch.equal(alone.stats[:, [2, 3, 6, 7]], stats.stats[:, [2, 3, 6, 7]])
    assert not alone.stats[:, [0, 1, 4, 5]].any() and not alone.s_top.any()
    assert torch.equal(alone.log_alpha, stats.log_alpha)


def _pass1_rows(k, seed):
    """(s, t) [6, 600] float64: the rows of `test_two_stage_top_k_equals_the_walk`."""
    s, t = _logits(6, 600, seed=seed, dtype=torch.float64)
    t[0] = torch.round(t[0])  # ties, also across the k-th place
    t[1] = -t[1].abs()
    t[1, [3, 70, 140, 500]] = torch.tensor([-0.0, 0.0, -0.0, 0.0], dtype=torch.float64)  # ±0 ties at the top
    t[2, 2:40] = -math.inf  # −inf entries, some in the first k columns
    t[3, 40:] = -math.inf  # 3 blocks hold a finite entry: θ = −inf for k > 3
    t[4, 300:316] += 30.0  # the top 16 in one block
    s[4, 0] = 120.0  # every later block of s, and of t on the next row, ~110 nats below the running maximum, where
    t[5, 0] = 120.0  # its block sums flushed to 0: re-read, not rescaled (`RESCALE_GAP`). s[4, 0] is not in 𝒦, so
    # s's tail max is that maximum too and its rescaled sums are right: the student's gap test is the case of
    # `test_row_stats_student_tail_where_its_top_k_entry_is_far_above_the_rest`
    return s, t


@pytest.mark.parametrize("k,block", [(1, 16), (10, 16), (64, 8)])  # K = 1, no power of two, MAX_K (75 blocks)
def test_two_stage_top_k_equals_the_walk(k, block):
    """`kernels.TAD_TWO_STAGE`: pass 1 in two stages gives the single pass's 𝒦 and both sides' logits on it exactly,
    every maximum exactly, the full sums within their roundings (stage A is the same streaming pass: the same
    operations, equal under the interpreter; a compiler may order another variant's arithmetic otherwise: each log S
    within 3u per block fold), and the tail sums likewise (each pass's within 5u per fold of its own, `_folds`), on the
    rows of `_pass1_rows` at ``block`` columns per block (more blocks than k, most below θ): float32 with and without
    the student side (α^T alone), and bf16."""
    s64, t64 = _pass1_rows(k, seed=k + 60)
    for dtype, sides in ((torch.float32, (True, False)), (torch.bfloat16, (True,))):
        s_, t_ = s64.to(dtype), t64.to(dtype)
        bound = 5 * U * (_folds(t_, k, block) + _folds(t_, k, block, two_stage=True))
        full = 2 * 3 * U * _folds(t_, 0, block)  # two evaluations of a full log-sum-exp, 3u per block fold each
        for side in sides:
            s_d = s_.to(DEVICE) if side else None
            walk = kernels.row_stats(s_d, t_.to(DEVICE), k, block=block, two_stage=False)
            two = kernels.row_stats(s_d, t_.to(DEVICE), k, block=block, two_stage=True)
            assert torch.equal(walk.ids, two.ids) and torch.equal(walk.t_top, two.t_top)
            assert torch.equal(walk.s_top, two.s_top)
            a, b = walk.stats.cpu().double(), two.stats.cpu().double()
            assert torch.equal(a[:, 0::2], b[:, 0::2])  # every maximum: of s, t, s's tail, t's tail
            for col, tol in ((1, full), (3, full), (5, bound), (7, bound)):  # log S: s, t, s's tail, t's tail
                finite = torch.isfinite(a[:, col])
                assert torch.equal(finite, torch.isfinite(b[:, col]))
                B.assert_within(b[finite, col], a[finite, col], tol[finite], msg=f"{dtype} log S, column {col}")


@PASS1
def test_row_stats_student_tail_where_its_top_k_entry_is_far_above_the_rest(two_stage):
    """The student's logit on a column of 𝒦 ~120 nats above the rest of its row, that column in the first block (row
    0), at a block's first column (row 1), inside a later block (row 2) and at a block's last column (row 3), with 𝒦
    (k = 3: that column and two more, all 30 nats up in t) complete by that block's end: from there on the running
    maximum of s has jumped ~110 nats above the tail's, the full sum's block sums of the later blocks flush to 0 in
    float32, and the student's tail sum must re-read those blocks (`RESCALE_GAP`, the student's own gap test; the
    teacher's passes it: t's jump is 30 nats) rather than rescale them. Pass 1's student statistics against float64:
    the maxima of s over the row and over the tail exactly (a float32 max of float32 values), the full log-sum-exp
    within κ_V + 3u per block fold + the rounding of m + log S, the tail's within dz (`_dz`: κ_V + 5u per fold) + the
    same rounding. Rescaling those flushed sums (0 · e^(~110), beyond float32) made every row's tail NaN. Pass 1 both
    ways (the two-stage one at 16-column blocks has its own gap test for s, in stage B)."""
    k = 3
    s, t = _logits(4, 1000, seed=67)
    cols = [0, 256, 300, 383]  # at BLOCK = 128: blocks 0, 2 (its first column), 2, 2 (its last column) of 8
    for r, c in enumerate(cols):
        t[r, [c, 5, 9] if c else [0, 5, 9]] += 30.0
        s[r, c] += 120.0
    block = TWO_STAGE_BLOCK if two_stage else BLOCK
    stats = kernels.row_stats(s.to(DEVICE), t.to(DEVICE), k, block=block, two_stage=two_stage)
    ids = stats.ids.cpu().long()
    assert ids.tolist() == [sorted(R.top_ids(row, k)) for row in t]
    assert all(c in row for c, row in zip(cols, ids.tolist()))  # the case meant: the far column is in 𝒦
    tail = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    s64, s_tail = s.double(), s.double().masked_fill(~tail, -math.inf)
    full_ref, tail_ref = torch.logsumexp(s64, -1), torch.logsumexp(s_tail, -1)
    assert bool((full_ref - tail_ref > 104).all())  # the tail below float32's range of the full sum
    st = stats.stats.cpu().double()
    assert torch.equal(st[:, 0], s64.amax(-1)) and torch.equal(st[:, 4], s_tail.amax(-1))
    full_bound = 3 * U * _folds(t, 0, block) + B.lse_kappa(s.shape[1]) + U * full_ref.abs()
    B.assert_within(stats.lse(0).cpu().double(), full_ref, full_bound, msg="log-sum-exp of s")
    tail_bound = _dz(t, k, block=block, two_stage=two_stage) + U * tail_ref.abs()
    B.assert_within(stats.lse(2).cpu().double(), tail_ref, tail_bound, msg="log-sum-exp of s over the tail")


def test_two_stage_reads_only_the_blocks_reaching_theta(monkeypatch):
    """Stage B reads the blocks whose teacher maximum reaches θ (the k-th largest block maximum) and no other (on
    these rows no block below θ needs a re-read): with every other block of s and t overwritten by NaN after stage
    A took its block statistics, its results are those of the untouched logits, bit for bit — and those blocks are
    most of the row."""
    k, block = 10, TWO_STAGE_BLOCK
    s, t = _logits(3, 1000, seed=5)
    maxima = torch.stack([c.amax(-1) for c in t.split(block, -1)], -1)  # [n, blocks]
    theta = maxima.sort(-1, descending=True).values[:, k - 1 : k]
    below = (maxima < theta).repeat_interleave(block, -1)[:, : t.shape[1]]
    assert below.double().mean() > 0.7
    s, t = s.to(DEVICE), t.to(DEVICE)
    ref = kernels.row_stats(s, t, k, block=block, two_stage=True)
    real = kernels._topk_kernel

    class Spoiled:  # stage B, launched on logits spoiled where it must not look
        def __getitem__(self, grid):
            def call(s_, t_, *args, **kwargs):
                return real[grid](s_.masked_fill(below.to(DEVICE), math.nan),
                                  t_.masked_fill(below.to(DEVICE), math.nan), *args, **kwargs)
            return call

    monkeypatch.setattr(kernels, "_topk_kernel", Spoiled())
    got = kernels.row_stats(s, t, k, block=block, two_stage=True)
    for name in ("stats", "ids", "t_top", "s_top"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


@PASS1
def test_nan_logit_poisons_its_row_only(two_stage):
    """A NaN in the student's row 1 or the teacher's row 2 (TAD: pass 1 both ways, in two stages at 16-column blocks:
    row 2's block maximum may be NaN)."""
    s, t = _logits(4, 257, seed=1)
    s[1, 7] = math.nan
    t[2, 40] = math.nan
    blocks = (TWO_STAGE_BLOCK if two_stage else BLOCK, BLOCK)
    for loss in (kernels.RowLoss(0), kernels.RowLoss(1), kernels.RowLoss(2), kernels.RowLoss(3, k=4)):
        w = torch.ones(4, dtype=torch.float64, device=DEVICE) if loss.kind == 3 else None
        value, _, _ = _run(loss, s.to(DEVICE), t.to(DEVICE), torch.ones(4, device=DEVICE), None, w=w, blocks=blocks,
                           two_stage=two_stage)
        assert torch.isnan(value[[1, 2]]).all() and torch.isfinite(value[[0, 3]]).all()


def test_losses_for_maps_the_registry():
    from tailkd.config import LossConfig
    from tailkd.registry import bind

    assert kernels.losses_for(bind(LossConfig(name="kd"))) == kernels.RowLoss(0)
    assert kernels.losses_for(bind(LossConfig(name="jsd", jsd_beta=0.0))) == kernels.RowLoss(0)
    assert kernels.losses_for(bind(LossConfig(name="jsd", jsd_beta=1.0))) == kernels.RowLoss(1)
    assert kernels.losses_for(bind(LossConfig(name="jsd", jsd_beta=0.2))) == kernels.RowLoss(2, jsd_beta=0.2)
    assert kernels.losses_for(bind(LossConfig(name="tad", k=10))) == kernels.RowLoss(3, k=10)
    assert kernels.losses_for(bind(LossConfig(name="tad", k=64))) == kernels.RowLoss(3, k=64)  # MAX_K: the last
    assert kernels.losses_for(bind(LossConfig(name="tad", k=65))) is None  # beyond the register buffer
    assert kernels.losses_for(bind(LossConfig(name="dkd"))) is None  # no closed form: torch autograd per chunk


def test_run_log_names_the_row_maths_the_fused_layer_uses():
    """`prepare.loss_layer_text` (the run log) says Triton exactly where `fused.kernel_form` gives the fused layer a
    kernel form on CUDA: not for TAD with K above the register buffer, nor for a loss without a closed form against
    a dense teacher (an online one, or a cache of hidden states), nor where the divergence has weight 0; for any loss
    against a top-K cache."""
    from tailkd.config import DistillConfig
    from tailkd.prepare import loss_layer_text

    def text(name, sparse=False, kernels="auto", **loss):
        cfg = DistillConfig()
        cfg.loss.name, cfg.train.loss_kernels = name, kernels
        for key, value in loss.items():
            setattr(cfg.loss, key, value)
        return loss_layer_text(cfg, True, 1000, torch.device("cuda"), 64, sparse)

    assert text("kd").endswith("Triton row kernels)") and text("tad", k=64).endswith("Triton row kernels)")
    assert text("tad", k=65).endswith("torch row maths)") and text("dkd").endswith("torch row maths)")
    assert text("dkd", sparse=True).endswith("Triton row kernels)")
    assert text("kd", kernels="torch").endswith("torch row maths)")
    assert text("kd", div_weight=0.0).endswith("torch row maths)")  # no divergence computed: only the CLM's rows


# --------------------------------------------------------------------------- the chunked layer on the kernels


def _on_device(inputs):
    """test_fused._inputs' tensors on DEVICE for the layer (hidden states, heads); labels and segment ids stay on the
    host, as the training loop passes them."""
    h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg = inputs
    head_t = fused.Head(head_t.weight.to(DEVICE), None, head_t.spec)
    return h_s.to(DEVICE), w_s.to(DEVICE), b_s.to(DEVICE), spec_s, h_t.to(DEVICE), head_t, labels, seg


def _cpu(xs):
    return [None if x is None else x.detach().cpu() for x in xs]


@pytest.mark.parametrize("name,extra", [("kd", {}), ("tad", {"k": 4, "per_document": True}),
                                        ("tad", {"k": 3, "beta": 5.0, "temperature": 1.7}), ("rkl", {}),
                                        ("jsd", {"jsd_beta": 0.1})])
def test_chunked_layer_on_the_kernels_equals_dense(name, extra, monkeypatch):
    """`fused.chunked_sums` with the Triton row kernels against the dense objective on the CPU: masked tokens, chunks
    of 4 and 7 tokens (partial last chunk, TAD sequences split), soft-capped and scaled heads, bias. V = 37 fits one
    kernel block, so the online log-sum-exp is the plain one and each run is one float32 evaluation within
    `loss_bounds.head_objective` (as in test_fused.py). Without CUDA the layer runs on the CPU (the interpreter); with
    CUDA on the GPU (compiled kernels, float32 cuBLAS matmuls: the same float32 error model)."""
    import test_fused as TF

    from tailkd.config import LossConfig
    from tailkd.objective import IGNORE_INDEX

    monkeypatch.setattr(fused, "_TRITON_DEVICES", ("cuda", "cpu"))
    inputs = TF._inputs(torch.float32)
    dev = _on_device(inputs)
    cfg = LossConfig(name=name, **extra)
    plan = fused._prepare(dev[0], fused.Head(dev[1], dev[2], dev[3]), dev[6], _bind(cfg), dev[4], dev[5], None,
                          dev[7], None, 4, None)[1]
    assert plan.triton is not None  # the kernels really run
    ref, *ref_grads = TF._dense(cfg, *inputs)
    bound = LB.head_objective(cfg, *inputs)
    assert int((inputs[6] == IGNORE_INDEX).sum()) > 0
    for chunk in (4, 7):
        got, *grads = TF._fused(cfg, *dev, chunk)
        TF._close(_cpu([got.loss, got.clm, got.div]), [ref.loss, ref.clm, ref.div], torch.float32,
                  [bound.get(k) for k in ("loss", "clm", "div")], ("loss", "clm", "div"))
        TF._close(_cpu(grads), ref_grads, torch.float32, [bound.get(k) for k in ("h", "w", "b")], ("h", "w", "b"))


def test_chunked_layer_with_the_two_stage_top_k_equals_dense(monkeypatch):
    """The layer with `kernels.TAD_TWO_STAGE` on (TAD's pass 1 and the α^T-alone pass of its split sequences take
    `row_stats`' default): within the same bound as above, and stage B really runs."""
    calls = []
    real = kernels._topk_kernel

    class Counted:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels, "TAD_TWO_STAGE", True)
    monkeypatch.setattr(kernels, "_topk_kernel", Counted())
    test_chunked_layer_on_the_kernels_equals_dense("tad", {"k": 4, "per_document": True}, monkeypatch)
    assert calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_kernel_scales_by_the_ratio_or_leaves_the_tensor_as_it_is(dtype):
    """`kernels.scale_` (the layer's backward): where g equals ``expected`` the tensor is left bit for bit as it is
    (NaN, ±inf, −0, sub-normals included); otherwise every entry is x·r, r = g / expected correctly rounded in float32
    (`tl.math.div_rn`), the product rounded once to x's dtype — bit for bit torch's float32 product for float32 and
    fp16 (round to nearest), within one ulp (2u_bf16 relative) for bf16, whose store the interpreter truncates
    (module docstring). A NaN gradient makes every entry NaN. 1061 entries: 4 programs stride over several blocks
    with a partial last one under the interpreter."""
    g = torch.Generator().manual_seed(11)
    x0 = (torch.randn(1061, generator=g) * 3).to(dtype)
    x0[:6] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-40 if dtype == torch.float32 else 1e-7])
    expected = float(torch.tensor(1 / 4099, dtype=torch.float32))
    bits = torch.int32 if dtype == torch.float32 else torch.int16

    def run(g_value):
        x = x0.clone().to(DEVICE)
        out = kernels.scale_(x, torch.tensor([g_value], dtype=torch.float32, device=DEVICE), expected)
        assert out is x
        return x.cpu()

    assert torch.equal(run(expected).view(bits), x0.view(bits))
    for g_value in (3 * expected, 0.37, 1.0):
        got = run(g_value)
        r = torch.tensor(g_value, dtype=torch.float32) / torch.tensor(expected, dtype=torch.float32)
        want = (x0.float() * r).to(dtype)
        if dtype == torch.bfloat16:
            ok = torch.isfinite(want)
            torch.testing.assert_close(got[~ok], want[~ok], rtol=0, atol=0, equal_nan=True)  # NaN, ±inf
            assert torch.all((got[ok].float() - want[ok].float()).abs() <= 2 * B.U_BF16 * want[ok].float().abs())
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(run(math.nan)).all()
    with pytest.raises(ValueError, match="contiguous"):
        kernels.scale_(torch.ones(4, 4, device=DEVICE).T, torch.ones(1, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="one float32 element"):
        kernels.scale_(torch.ones(4, device=DEVICE), torch.ones(2, device=DEVICE), 1.0)


def test_chunked_layer_backward_on_the_kernels_scales_nothing_at_the_expected_gradient(monkeypatch):
    """tests/test_fused.py's `scaling_check` with the Triton kernels: the row maths and the backward's scaling
    (`kernels.scale_`, which decides on the device) — the gradients left as the forward computed them at the
    expected gradient 1/n, scaled by any other, bit for bit 1/n times those at n = 1 where n is a power of two, and
    a declared world size's loss not scaled."""
    import test_fused as TF

    monkeypatch.setattr(fused, "_TRITON_DEVICES", ("cuda", "cpu"))
    calls, real = [], kernels.scale_
    monkeypatch.setattr(kernels, "scale_", lambda *a: calls.append(a[0].shape) or real(*a))
    assert TF.scaling_check(monkeypatch, DEVICE, watch_ops=False) == 108
    assert len(calls) == 108  # every scaling by the kernel


def _bind(cfg):
    from tailkd.registry import bind

    return bind(cfg)


@pytest.mark.parametrize("name,extra", [("kd", {}), ("tad", {"k": 4}), ("jsd", {"jsd_beta": 0.3}), ("rkl", {})])
def test_chunked_layer_reads_bf16_logits_as_the_matmul_wrote_them(name, extra, monkeypatch):
    """With a bf16 matmul (τ = 1, no bias, plain heads) the kernels read the chunk's bf16 logits themselves and
    write G over them in bf16 (`fused._low_logits`), instead of through a float32 copy. Against the same layer with
    the float32 copy: the values are bit for bit equal (the same float32 maths on the same values: bf16 is exact in
    float32), and so is the float32 G before its one rounding to bf16 (by the kernel's store here, by torch's cast
    there: both are neighbours of G, at most one bf16 ulp = 2u_bf16·|G| apart). So ∂h = G W and ∂W = Σ_chunks Gᵀh
    differ by at most 2u_bf16·|G||W| (resp. |G|ᵀ|h|), plus each side's rounding of its bf16 matmul outputs
    (u_bf16·(1 + 2u_bf16)·|G||W| each) and float32 accumulation (K·u32 each, K = the contraction length + the
    chunks added), times SAFETY; |G| is the reference side's float32 G, recorded. On CUDA (compiled kernels, cuBLAS)
    as on the CPU (interpreter); labels stay on the host, as the training loop passes them."""
    from tailkd.config import LossConfig
    from tailkd.objective import chunked_objective

    monkeypatch.setattr(fused, "_TRITON_DEVICES", ("cuda", "cpu"))
    g = torch.Generator().manual_seed(3)
    B_, T, d, vocab, chunk = 2, 9, 16, 300, 7
    h_s = torch.randn(B_, T, d, generator=g).to(DEVICE, torch.bfloat16)
    w_s = (torch.randn(vocab, d, generator=g) * 0.5).to(DEVICE)
    h_t = torch.randn(B_, T, d, generator=g).to(DEVICE, torch.bfloat16)
    w_t = (torch.randn(vocab, d, generator=g) * 0.7).to(DEVICE, torch.bfloat16)
    labels = torch.randint(0, vocab, (B_, T), generator=g)
    labels[1, :3] = -100
    valid = (labels != -100).reshape(-1)
    cfg = LossConfig(name=name, **extra)
    spec = fused.HeadSpec(vocab)
    n = int(valid.sum())
    chunk_fn, recorded = fused._chunk, []

    def recording_chunk(*args, **kwargs):
        clm, div, g = chunk_fn(*args, **kwargs)
        recorded.append(g.abs().double().cpu())
        return clm, div, g

    def run(low):
        monkeypatch.setattr(fused, "_low_logits", lambda plan, head: low)
        hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        terms = chunked_objective(hs, fused.Head(ws, None, spec), labels, n, cfg=cfg, teacher_hidden=h_t,
                                  teacher_head=fused.Head(w_t, None, spec), chunk_size=chunk,
                                  matmul_dtype=torch.bfloat16)
        terms.loss.backward()
        plan = fused._prepare(hs, fused.Head(ws, None, spec), labels, _bind(cfg), h_t, fused.Head(w_t, None, spec),
                              None, None, None, chunk, torch.bfloat16)[1]
        return terms, hs.grad.cpu().reshape(-1, d)[valid], ws.grad.cpu(), plan

    got, gh, gw, plan = run(True)
    monkeypatch.setattr(fused, "_chunk", recording_chunk)
    ref, rh, rw, ref_plan = run(False)
    assert plan.triton is not None and plan.logits_dtype == torch.bfloat16
    assert ref_plan.triton is not None and ref_plan.logits_dtype == torch.float32
    for key in ("loss", "clm", "div"):
        assert torch.equal(getattr(got, key), getattr(ref, key)), key
    g_abs = torch.cat(recorded)  # [M, V] |G| of the reference side (computed at the expected gradient 1/n)
    ub, n_chunks = B.U_BF16, -(-n // chunk)

    def coef(k):
        return B.SAFETY * (2 * ub + 2 * ub * (1 + 2 * ub) + 2 * (k + n_chunks) * U)

    bound_h = coef(vocab) * g_abs @ w_s.to(torch.bfloat16).double().abs().cpu()
    bound_w = coef(chunk) * g_abs.T @ h_s.cpu().reshape(-1, d)[valid].double().abs()
    B.assert_within(gh, rh, bound_h, msg="∂h")
    B.assert_within(gw, rw, bound_w, msg="∂W")


# --------------------------------------------------------------------------- a top-K cache teacher (sparse)


def _sparse_teacher(t64, k, samples, seed):
    """A top-K cache of the float64 teacher logits t64 [n, V], as `tailkd.cache` stores it (float32 log-probs under
    the full softmax, log α^T summed over the tail), with ``samples`` tail points drawn from p̃ (weight α^T/J each,
    as its float32 log, as `cache.CacheReader.sparse_teacher` gives it)."""
    from tailkd.divergences import SparseTeacher

    logp = torch.log_softmax(t64, -1)
    ids = torch.stack([torch.tensor(R.top_ids(row, k)) for row in t64])
    ids = ids[:, torch.randperm(k, generator=torch.Generator().manual_seed(seed))]  # the cache's order: any
    tail = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ids, False)
    log_alpha = torch.logsumexp(logp.masked_fill(~tail, -math.inf), -1)
    if not samples:
        return SparseTeacher(ids, logp.gather(-1, ids).float(), log_alpha.float())
    p_tilde = (logp - log_alpha[:, None]).exp() * tail
    g = torch.Generator().manual_seed(seed + 1)
    tids = torch.multinomial(p_tilde, samples, replacement=True, generator=g)
    log_tw = (log_alpha[:, None] - math.log(samples)).expand(-1, samples)
    return SparseTeacher(ids, logp.gather(-1, ids).float(), log_alpha.float(), tids,
                         logp.gather(-1, tids).float(), log_tw.float())


def _sparse_ref(s64, sp, w):
    """The cache loss as plain float64 sums of its definition (`divergences.SparseTeacher`): Σ_𝒦 p (log p − log q) +
    α^T log(α^T/α^S), plus with tail points w·(Σ_j w_j (log p_j − log q_j) − α^T log(α^T/α^S))."""
    logq = torch.log_softmax(s64, -1)
    ids = sp.topk_ids.long()
    lp = sp.topk_logprobs.double()
    alpha = sp.log_tail_mass.double().exp()
    alpha_s = logq.exp().scatter(-1, ids, 0.0).sum(-1)
    bucket = alpha * (alpha.log() - alpha_s.log())
    value = (lp.exp() * (lp - logq.gather(-1, ids))).sum(-1) + bucket
    if sp.tail_ids is not None:
        tids, tw = sp.tail_ids.long(), sp.tail_log_weights.double().exp()
        value = value + w * ((tw * (sp.tail_logprobs.double() - logq.gather(-1, tids))).sum(-1) - bucket)
    return value


@pytest.mark.parametrize("n,vocab,k,samples,loss", [(7, 257, 5, 0, "kd"), (9, 1000, 10, 4, "tad"),
                                                    (7, 257, 5, 3, "kd"), (1, 50, 1, 2, "tad")])
@pytest.mark.parametrize("rescale", [True, False])
def test_sparse_kernels_equal_reference(n, vocab, k, samples, loss, rescale):
    """`kernels.sparse_values_and_grads` (a top-K cache teacher, in any order; tail points; the CLM one-hot) against
    the float64 plain sums of the definition within `loss_bounds.cache_tad` (the cache's float32 entries are exact
    inputs; dz: the online log-sum-exps' folds, as above), and against divergences.SPARSE in float32 within twice
    that."""
    _check_sparse(*_logits(n, vocab, seed=3 * k + vocab), k, samples, loss, rescale)


def test_sparse_kernels_at_logits_offset_by_1e4():
    """Student rows offset by ±1e4 (as `test_dense_kernels_extreme_logits`), one of them all equal: a log q the
    cache loss reads on 𝒦 and at the tail points is (s − m) − log S, as torch's log_softmax (`_Dist`'s error κ_V +
    2u|log q|), not s − (m + log S), whose rounded m + log S (u·1e4 ≈ 6e-4 here) would carry into q there."""
    s, t = _logits(4, 257, seed=19)
    s = s + torch.tensor([1e4, -1e4, 0.0, 1e4])[:, None]
    s[3] = 1e4  # every student logit equal: q = 1/V
    _check_sparse(s, t, 5, 3, "kd", True)


def test_sparse_kernels_with_tails_below_float32():
    """A cache teacher whose tails lie 110-160 nats below 𝒦: α^T and the tail points' weights are below float32's
    range, and TAD's tail term W·(Σ_j ŵ_j log(p_j/q_j) − log(α^T/α^S)) (W = β(X)·α^T of order β) is computed from
    their logs (`divergences.sparse_tail_points`); as `test_sparse_kernels_equal_reference`, against the float64
    plain sums. With linear float32 weights (0 there) the kernels dropped that term."""
    s, t = _logits(6, 257, seed=23)
    top = torch.zeros_like(t, dtype=torch.bool).scatter(-1, t.topk(5, -1).indices, True)
    t = torch.where(top, t, t - torch.linspace(110, 160, 6)[:, None])
    _check_sparse(s, t, 5, 4, "tad", True)


@pytest.mark.parametrize("scale", [0.6, 1.5])
def test_sparse_kernels_with_tail_weights_not_summing_to_the_tail_mass(scale):
    """Tail points whose weights sum to ``scale``·α^T (a hand-built `SparseTeacher`; a cache's sum to α^T up to
    rounding): value and gradient are still those of the definition's plain sums — the gradient's W(Σ_j ŵ_j − 1)·q
    term, ~0 for a cache's weights, is what makes it exact then."""
    _check_sparse(*_logits(7, 257, seed=29), 5, 4, "tad", True, weight_scale=scale)


@pytest.mark.parametrize("samples,loss", [(0, "kd"), (4, "kd"), (4, "tad")])
def test_sparse_kernels_bf16_inputs_and_gradient(samples, loss):
    """bf16 logits and gradient buffer (as the chunked path's bf16 logits), against the float64 reference within
    the float32 bound plus one bf16 ulp (`_grad_bound`): every entry one rounding of the float32 gradient, the tail
    points' too (their −w·w_j was added in bf16 to the kernel's rounded value before)."""
    s, t = _logits(9, 257, seed=17, dtype=torch.bfloat16)
    _check_sparse(s, t, 5, samples, loss, True, out_dtype=torch.bfloat16)


def _check_sparse(s, t, k, samples, loss, rescale, out_dtype=None, weight_scale=1.0):
    n, vocab = s.shape
    sp = _sparse_teacher(t.double(), k, samples, seed=k)
    if weight_scale != 1.0:  # tail weights that do not sum to α^T (a hand-built teacher's): Σ_j ŵ_j ≠ 1
        sp = sp._replace(tail_log_weights=sp.tail_log_weights + math.log(weight_scale))
    alpha = sp.log_tail_mass.double().exp()
    log_w = _log_w(alpha.mean().expand(n)) if loss == "tad" else torch.zeros(n, dtype=torch.float64)  # log β(X)
    w = log_w.exp()
    cd, cq = _coefs(n, seed=k)
    y, cy = _onehot(n, vocab, seed=k)
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    sp_d = type(sp)(*(dev(x) for x in sp))
    stats = kernels.sparse_stats(s.to(DEVICE), sp_d, block=BLOCK, rescale=rescale)
    out = torch.empty(s.shape, device=DEVICE, dtype=out_dtype or s.dtype)
    value = kernels.sparse_values_and_grads(s.to(DEVICE), sp_d, stats, log_w.to(DEVICE), cd.to(DEVICE), cq.to(DEVICE),
                                            out, y=y.to(DEVICE), cy=cy.to(DEVICE), block=BLOCK).cpu()
    g = out.cpu()
    leaf = s.double().requires_grad_(True)
    ref_v = _sparse_ref(leaf, sp, w)
    (ref_d,) = torch.autograd.grad(ref_v.sum(), leaf)
    q64 = torch.softmax(s.double(), -1)
    ref_g = _minus_onehot(cd.double()[:, None] * ref_d + cq.double()[:, None] * q64, y, cy)
    dz = _dz(s, tail=True)
    vb, gb = LB.cache_tad(s.float()[None], type(sp)(*(None if x is None else x[None] for x in sp)),
                          torch.ones(1, n, dtype=torch.bool), loss=loss, beta=BETA, dz_s=dz[None])
    vb, gb = vb[0], gb[0]
    # what G combines besides c·q: p on 𝒦, α^T·q̃ on the tail, w·w_j at the tail points
    ids = sp.topk_ids.long()
    top = torch.zeros_like(q64, dtype=torch.bool).scatter(-1, ids, True)
    q_tilde = torch.softmax(s.double().masked_fill(top, -math.inf), -1)
    p_w = torch.zeros_like(q64).scatter(-1, ids, sp.topk_logprobs.double().exp()) + alpha[:, None] * q_tilde
    if samples:
        p_w = p_w.scatter_add(-1, sp.tail_ids.long(), w[:, None] * sp.tail_log_weights.double().exp())
    gbound = _grad_bound(gb, s.float(), cd, cq, dz, ref_g, p_w, out_dtype or s.dtype, y, cy)
    B.assert_within(value, ref_v.detach(), vb + B.REF64_ATOL, msg="sparse value vs reference")
    B.assert_within(g, ref_g, gbound + B.REF64_ATOL, msg="sparse gradient vs reference")
    s32 = s.float()
    v32, state = dv.SPARSE.forward(s32, torch.log_softmax(s32, -1), sp, log_w if samples else None)
    g32 = _minus_onehot(dv.SPARSE.backward(state, cd, cq).double(), y, cy)
    B.assert_within(value, v32, 2 * vb, msg="sparse value vs divergences.py")
    B.assert_within(g, g32, 2 * gbound, msg="sparse gradient vs divergences.py")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_sparse_gradient_into_a_half_buffer_is_one_rounding_at_the_tail_points(out_dtype):
    """`kernels.sparse_values_and_grads` with a bf16 / fp16 ``out``: every entry is the float32 gradient rounded once.
    At a tail point the gradient is c·q_j + (β−1)α^T q̃_j − β·w_j: it was the kernel's value rounded to the half
    type plus −β·w_j rounded, added in the half type (three roundings; where the two nearly cancel, as here with
    w_j = c·q_j, the two roundings of ~c·q_j leave up to a half-type ulp of c·q_j beside a far smaller gradient).
    Bound: one rounding of the float32 result in any rounding mode (< 1 ulp ≤ eps·|g32|, or fp16's subnormal
    spacing below 6e-5; Triton's interpreter truncates its stores, a GPU rounds to nearest), plus the float32
    re-evaluation of the parts, 8·2⁻²⁴·(c·q_j + β·Σ_j w_j) for the few float32 operations of each side."""
    from tailkd.divergences import SparseTeacher

    n, vocab, k, samples = 6, 300, 5, 4
    s, t = _logits(n, vocab, seed=41)
    sp = _sparse_teacher(t.double(), k, samples, seed=7)
    q = torch.softmax(s.double(), -1)
    c = sp.topk_logprobs.double().exp().sum(-1) + sp.log_tail_mass.double().exp()  # Σ_𝒦 p + α^T
    tids, tlp = sp.tail_ids.clone(), sp.tail_logprobs.clone()
    tids[0, 1], tlp[0, 1] = tids[0, 0], tlp[0, 0]  # a point drawn twice: its two weights add
    tw = (c[:, None] * q.gather(-1, tids.long())).float()  # w_j = c·q_j: the tail point's gradient nearly cancels
    tw[0, :2] /= 2
    sp = SparseTeacher(sp.topk_ids, sp.topk_logprobs, sp.log_tail_mass, tids, tlp, tw.log())
    tids = tids.long()
    tw = sp.tail_log_weights.double().exp()  # w_j as the kernel uses them (from their float32 logs)
    w = torch.zeros(n, dtype=torch.float64)  # KD with tail points: β = 1, log β = 0
    cd, cq = torch.ones(n), torch.zeros(n)
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    sp_d, s_d = type(sp)(*(dev(x) for x in sp)), s.to(DEVICE)
    stats = kernels.sparse_stats(s_d, sp_d, block=BLOCK)
    g32 = torch.empty(s.shape, device=DEVICE)
    kernels.sparse_values_and_grads(s_d, sp_d, stats, w.to(DEVICE), cd.to(DEVICE), cq.to(DEVICE), g32, block=BLOCK)
    gh = torch.empty(s.shape, device=DEVICE, dtype=out_dtype)
    kernels.sparse_values_and_grads(s_d, sp_d, stats, w.to(DEVICE), cd.to(DEVICE), cq.to(DEVICE), gh, block=BLOCK)
    g32, gh = g32.cpu(), gh.cpu()
    fi = torch.finfo(out_dtype)
    parts = torch.zeros(s.shape, dtype=torch.float64).scatter_add(-1, tids, tw.double()) + c[:, None] * q
    bound = fi.eps * g32.double().abs() + fi.tiny * fi.eps + 8 * 2.0 ** -24 * parts  # eps = 2u; + subnormal spacing
    err = (gh.double() - g32.double()).abs()
    assert (err <= bound).all(), (err / bound).max()
    # the entries torch writes (𝒦, the tail points) are rounded to nearest on any device: within half an ulp of
    # their float32 value (exactly g32's on 𝒦, its re-evaluation within the 8u·parts above at the tail points)
    written = torch.zeros(s.shape, dtype=torch.bool).scatter(-1, sp.topk_ids.long(), True).scatter(-1, tids, True)
    e32 = 8 * 2.0 ** -24 * parts
    near = fi.eps / 2 * (g32.double().abs() + e32) + fi.tiny * fi.eps / 2 + e32
    assert (err <= near)[written].all(), (err / near)[written].max()


@pytest.mark.parametrize("name,extra,samples", [("kd", {}, 0), ("kd", {}, 3), ("tad", {"k": 4}, 3),
                                                ("tad", {"k": 4, "per_document": True}, 0)])
def test_chunked_layer_with_a_cache_teacher_on_the_kernels(name, extra, samples, monkeypatch):
    """`fused.chunked_sums` with a top-K cache teacher on the Triton kernels (`kernels.SPARSE`; here interpreted)
    against the same layer on the torch row maths: soft-capped and scaled student head with bias, masked tokens,
    chunks of 4 and 7 tokens, tail points. Two float32 evaluations of the same exact inputs, each within
    `loss_bounds.head_objective` with the cache teacher (V = 37: one kernel block, the plain log-sum-exp). With CUDA
    both run on the GPU (the cache on the device, labels and segment ids on the host)."""
    import test_fused as TF

    from tailkd.config import LossConfig
    from tailkd.head import apply_head
    from tailkd.objective import IGNORE_INDEX, chunked_objective

    h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg = TF._inputs(torch.float32)
    t64 = apply_head(h_t.double(), fused.Head(head_t.weight.double(), None, head_t.spec))
    lead = t64.shape[:-1]
    flat = _sparse_teacher(t64.reshape(-1, t64.shape[-1]), 4, samples, seed=5)
    sp = type(flat)(*(None if x is None else x.reshape(*lead, *x.shape[1:]) for x in flat))
    dev_sp = type(sp)(*(None if x is None else x.to(DEVICE) for x in sp))
    h_d, w_d, b_d = (x.to(DEVICE) for x in (h_s, w_s, b_s))
    cfg = LossConfig(name=name, **extra)
    n = int((labels != IGNORE_INDEX).sum())

    def run(on, chunk):
        monkeypatch.setattr(fused, "_TRITON_DEVICES", ("cuda", "cpu") if on else ())
        a, w, b = (x.detach().clone().requires_grad_(True) for x in (h_d, w_d, b_d))
        terms = chunked_objective(a, fused.Head(w, b, spec_s), labels, n, cfg=cfg, sparse_teacher=dev_sp,
                                  segment_ids=seg, chunk_size=chunk)
        terms.loss.backward()
        plan = fused._prepare(a, fused.Head(w, b, spec_s), labels, _bind(cfg), None, None, dev_sp, seg, None, chunk,
                              None)[1]
        return terms, (a.grad, w.grad, b.grad), plan

    bound = LB.head_objective(cfg, h_s, w_s, b_s, spec_s, None, None, labels, seg, n=n, sparse=sp)
    for chunk in (4, 7):
        got, grads, plan = run(True, chunk)
        ref, ref_grads, ref_plan = run(False, chunk)
        assert plan.triton == kernels.SPARSE and ref_plan.triton is None
        TF._close(_cpu([got.loss, got.clm, got.div]), _cpu([ref.loss, ref.clm, ref.div]), torch.float32,
                  [bound.get(k) for k in ("loss", "clm", "div")], ("loss", "clm", "div"))
        TF._close(_cpu(grads), _cpu(ref_grads), torch.float32, [bound.get(k) for k in ("h", "w", "b")],
                  ("h", "w", "b"))


@PASS1
def test_tad_kernel_teacher_tails_beyond_float64_range(two_stage):
    """Every teacher tail 800 nats below the row's top 3 (α^T, and ᾱ of the rows, below float64's range): the kernel
    takes log β(X) and forms W = exp(log β(X) + log α^T) (~β) on these rows, so the tail term is there (it was
    inf/NaN from 708 nats on, dropped from 745). Against the float64 reference (log-space ᾱ): every log-probability
    the kernel forms (of p, q, p̃, q̃, α^T) is a difference of numbers of size <= M = 800 + max|logit| rounded a few
    times, within ε = 8u·M absolute entry by entry (u = 2^-24); so |ΔD| <= ε(2 + W(4 + 2·max_tail |log p̃/q̃| +
    2 D_KL2)) per row, and each gradient entry (q_k − p_k on 𝒦; q_i + (W − α^T) q̃_i − W p̃_i on the tail) is within
    4ε·cd·(q_i + W(q̃_i + p̃_i) + p_i) + ε·cq·q_i."""
    n, vocab, k = 6, 257, 3
    s, t = _logits(n, vocab, seed=41)
    t = t.scatter_add(-1, torch.topk(t, k).indices, torch.full((n, k), 800.0))
    cd, cq = _coefs(n, 41)
    stats = kernels.row_stats(s.to(DEVICE), t.to(DEVICE), k, block=TWO_STAGE_BLOCK if two_stage else BLOCK,
                              two_stage=two_stage)
    one = torch.zeros(n, dtype=torch.long, device=DEVICE)  # the rows are one sequence
    log_w = tail_log_weight(group_log_mean(stats.log_alpha, one, 1)[one], BETA)
    assert torch.isfinite(log_w).all() and bool((stats.log_alpha < -745).all())  # exp(log α^T) is 0 in float64
    out = torch.empty(s.shape, dtype=s.dtype, device=DEVICE)
    value = kernels.row_values_and_grads(kernels.RowLoss(3, k=k), s.to(DEVICE), t.to(DEVICE), stats, log_w,
                                         cd.to(DEVICE), cq.to(DEVICE), out, block=BLOCK).cpu().double()
    mask = torch.ones(1, n, dtype=torch.bool)
    ref, ref_d = _ref_grad(lambda a, b: R.tad(a[None], b[None], mask, k, BETA)[0], s, t)
    s64, t64 = s.double(), t.double()
    d1, d2, _, log_alpha = R.tad_decompose(s64, t64, k, with_log_alpha=True)
    big_w = BETA * (log_alpha - R.log_alpha_means(log_alpha[None], mask)[0]).exp()  # [n] β(X)·α^T
    assert ((ref - d1) > 1e-2).all() and (big_w > 0.1).all()  # the tail term is there
    top = torch.zeros(n, vocab, dtype=torch.bool).scatter(-1, torch.topk(t64, k).indices, True)
    log_pt = torch.log_softmax(t64.masked_fill(top, -math.inf), -1)
    log_qt = torch.log_softmax(s64.masked_fill(top, -math.inf), -1)
    spread = torch.where(top, 0.0, (log_pt - log_qt).abs()).amax(-1)
    eps = 8 * 2.0**-24 * (800 + float(t64.abs().max().clamp_min(s64.abs().max())))
    B.assert_within(value, ref, eps * (2 + big_w * (4 + 2 * spread + 2 * d2)), msg="value")
    q = torch.softmax(s64, -1)
    ref_g = cd.double()[:, None] * ref_d + cq.double()[:, None] * q
    tail_terms = torch.where(top, 0.0, big_w[:, None] * (log_qt.exp() + log_pt.exp()))
    bound = 4 * eps * cd.double()[:, None] * (q + tail_terms + torch.softmax(t64, -1)) + eps * cq.double()[:, None] * q
    B.assert_within(out.cpu().double(), ref_g, bound, msg="gradient")


def test_sparse_kernels_top_k_at_block_edges():
    """A cache teacher whose 𝒦 sits at block edges and clustered (`_block_edge_logits`: column 0, both sides of the
    edge 127 | 128, the partial last block, column V − 1): the statistics pass walks 𝒦 ascending block by block
    (`kernels._walk`), and an id at a block's first column is that block's, not the one before's (where the walk
    ended there, column 128 was in no block's 𝒦: α^S counted it)."""
    s, t = _block_edge_logits()
    _check_sparse(s.float(), t.float(), 7, 3, "tad", True)


def test_sparse_stats_where_the_student_top_k_is_far_above_its_tail():
    """The student's logit on a column of 𝒦 ~120 nats above the rest of its row: the full log-sum-exp's block sums
    of the later blocks, relative to that maximum, flush to 0 in float32, so the tail's sums re-read those blocks
    (`RESCALE_GAP`) rather than rescale them. The tail's log-sum-exp within κ_V + dz (5u per fold: `_dz`) plus the
    rounding of m + log S of the float64 one over the columns outside 𝒦; rescaling the flushed sums lost every
    block but the first (~log 2 here)."""
    s, t = _logits(4, 257, seed=47)
    t[:, 0] += 30.0  # column 0 in every row's 𝒦
    s[:, 0] += 120.0
    sp = _sparse_teacher(t.double(), 5, 0, seed=3)
    assert bool((sp.topk_ids == 0).any(-1).all())  # the case meant
    stats = kernels.sparse_stats(s.to(DEVICE), type(sp)(*(None if x is None else x.to(DEVICE) for x in sp)),
                                 block=BLOCK)
    tail = torch.ones_like(s, dtype=torch.bool).scatter(-1, sp.topk_ids.long(), False)
    ref = torch.logsumexp(s.double().masked_fill(~tail, -math.inf), -1)
    assert bool((torch.logsumexp(s.double(), -1) - ref > 104).all())  # the tail below float32's range of the full sum
    got = stats.lse(tail=True).cpu().double()
    B.assert_within(got, ref, _dz(s, tail=True) + B.lse_kappa(s.shape[1]) + U * ref.abs(),
                    msg="log-sum-exp of s over the tail")


def test_sparse_kernels_with_the_label_in_the_top_k():
    """Each row's label (the CLM's one-hot) on a column of the cache teacher's 𝒦, whose K entries of G torch sets
    after the gradient pass: the one-hot is subtracted there as well."""
    s, t = _logits(7, 257, seed=53)
    y, _ = _onehot(7, 257, seed=5)  # `_check_sparse`'s labels at k = 5
    rows = (y >= 0).nonzero().squeeze(1)
    t[rows, y[rows]] += 30.0
    _check_sparse(s, t, 5, 3, "tad", True)


def test_entry_points_refuse_what_the_kernels_cannot_read():
    """`row_stats` refuses a top-k not below V (TAD needs a tail) or above `MAX_K` (the register buffer), and rows
    whose columns are not contiguous (the kernels step through a row by unit column stride)."""
    s, t = _logits(2, 8, seed=1)
    for k in (8, 9, kernels.MAX_K + 1):
        with pytest.raises(ValueError, match="k must be"):
            kernels.row_stats(s.to(DEVICE), t.to(DEVICE), k)
    kernels.row_stats(s.to(DEVICE), t.to(DEVICE), 7)  # k = V − 1: the last one allowed
    strided = t.T.contiguous().T.to(DEVICE)  # [2, 8] with column stride 2
    with pytest.raises(ValueError, match="unit column stride"):
        kernels.row_stats(s.to(DEVICE), strided, 1)
    with pytest.raises(ValueError, match="unit column stride"):
        kernels.row_stats(strided, t.to(DEVICE), 0)


@pytest.mark.parametrize("name", ["kd", "rkl", "tad"])
def test_gradient_without_labels_has_no_one_hot(name):
    """``y`` None (no labels): G has no one-hot, whatever ``cy`` says — the same G, bit for bit, as with ``cy`` None
    (the same float32 operations on the same inputs)."""
    s, t = _logits(3, 257, seed=61)
    s, t = s.to(DEVICE), t.to(DEVICE)
    loss = kernels.RowLoss(3, k=4) if name == "tad" else LOSSES[name][0]
    stats = kernels.row_stats(s, t, loss.k)
    w = torch.zeros(3, dtype=torch.float64, device=DEVICE) if name == "tad" else None
    cd = torch.ones(3, device=DEVICE)
    outs = []
    for cy in (None, torch.full((3,), 0.5, device=DEVICE)):
        out = torch.empty_like(s)
        outs.append((kernels.row_values_and_grads(loss, s, t, stats, w, cd, out=out, cy=cy), out))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
