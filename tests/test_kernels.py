"""The Triton row kernels (`tailkd.kernels`) equal the float64 reference (tests/reference.py) and divergences.py.

Without CUDA they run on the CPU under Triton's interpreter: ``TRITON_INTERPRET=1`` is set below before triton is
imported, because ``triton.jit`` reads it (triton 3.x: ``triton.knobs.runtime.interpret``) when it decorates the
kernels, i.e. when `tailkd.kernels` is first imported. Skipped when triton is not installed (``pip install
tailkd[kernels]``).

Tolerances. The kernels compute the library's float32 formulas (log-probabilities (x − m) − log S, the same products
and sums), so each result is within `loss_bounds`' bound for one float32 evaluation of that divergence, with one
difference the bound is told of through its ``dz`` argument (an absolute error carried by every log-sum-exp of a
row; log-softmax is 2-Lipschitz, so each log-probability gets 2·dz more): the log-sum-exps are accumulated online.
Each fold of a block (or of one entry leaving TAD's running top-K) multiplies the running sum by exp(m_old − m_new)
and adds to it: at most 3 roundings relative to the sum (the subtraction's error u|m_old − m_new| multiplies a term
of weight exp(−|m_old − m_new|), so it is below u/e), hence dz = 3u·(number of folds). TAD's log α = (m_tail − m) +
log S_tail − log S is one log-sum-exp more than the linear tail sum the bound models, so dz also carries κ_V
(`bounds.lse_kappa`). bf16 inputs are exact in float32 (the reference reads the same values); a bf16 gradient is
rounded once more on store: + 2u_bf16·|G| (one ulp: round-to-nearest on the GPU is u_bf16, but Triton 3.9's
interpreter truncates float32 -> bf16, whose error is up to one ulp). The combination G = cd·∂D/∂s + cq·q adds at
most 4 roundings per entry on the magnitudes it combines. Values and gradients are compared with the float64
reference (exact up to 1e-12) within the bound, and with divergences.py's float32 kernels within twice the bound
(two float32 evaluations).
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

import bounds as B  # noqa: E402
import loss_bounds as LB  # noqa: E402
import reference as R  # noqa: E402

from tailkd import divergences as dv  # noqa: E402
from tailkd import fused, kernels  # noqa: E402
from tailkd.losses import tail_weight  # noqa: E402

if DEVICE == "cpu" and type(kernels._stats_kernel).__name__ != "InterpretedFunction":
    raise RuntimeError("tailkd.kernels was imported before TRITON_INTERPRET=1 was set: its kernels cannot run on the "
                       "CPU; run tests/test_kernels.py in its own process or import it first")

U = B.U32
BLOCK = 128  # columns per kernel step: V = 257 and 1000 span several blocks with a partial last one
LOSSES = {  # name: (kernels.RowLoss, divergences RowKernel, float64 reference, loss_bounds function)
    "kd": (kernels.RowLoss(0), dv.KL, R.forward_kl, LB.forward_kl),
    "rkl": (kernels.RowLoss(1), dv.RKL, R.reverse_kl, LB.reverse_kl),
    "jsd": (kernels.RowLoss(2, jsd_beta=0.3), dv.jsd_kernel(0.3), lambda s, t: R.jsd(s, t, 0.3),
            lambda s, t, dz_s=None, dz_t=None: LB.jsd(s, t, 0.3, dz_s=dz_s, dz_t=dz_t)),
}
SHAPES = [(1, 50), (7, 257), (33, 1000)]
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


def _dz(t: torch.Tensor, k: int = 0) -> torch.Tensor:
    """dz per row (module docstring): 3u per online fold (blocks, and for TAD the entries leaving the top-k),
    plus κ_V for TAD's log-space tail masses."""
    n, vocab = t.shape
    folds = math.ceil(vocab / BLOCK) * torch.ones(n, dtype=torch.float64)
    if k:
        folds = folds + _insertions(t, k) + k
    return 3 * U * folds + (B.lse_kappa(vocab) if k else 0.0)


def _ref_grad(fn, s, t):
    """(values [n], ∂(Σ values)/∂s [n, V]) of a float64 reference function of (s, t)."""
    leaf = s.double().requires_grad_(True)
    value = fn(leaf, t.double())
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


def _run(loss, s, t, cd, cq, w=None, out_dtype=None):
    stats = kernels.row_stats(s, t, loss.k, block=BLOCK)
    if loss.kind == 3 and w is None:
        w = tail_weight(stats.log_alpha.double().exp().mean().expand(s.shape[0]), BETA)
    out = torch.empty(s.shape, dtype=out_dtype or s.dtype, device=s.device)
    value = kernels.row_values_and_grads(loss, s, t, stats, w, cd, cq, out, block=BLOCK)
    return value.cpu(), out.cpu(), stats


def _coefs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g)


def _grad_bound(gb, s, cd, cq, dz, ref_g, p_w, out_dtype):
    """|cd|·(∂D/∂s bound) + |cq|·(q's bound) + 4u per entry on what G combines, + the bf16 store."""
    Q = LB._Dist(s, 1.0, dz)
    cd64, cq64 = cd.double()[:, None], cq.double()[:, None]
    bound = cd64.abs() * gb + cq64.abs() * B.SAFETY * Q.w * Q.rel
    bound = bound + B.SAFETY * 4 * U * (cd64.abs() + cq64.abs()) * (Q.w + p_w + ref_g.abs())
    if out_dtype == torch.bfloat16:
        bound = bound + 2 * B.U_BF16 * ref_g.abs()  # one ulp (module docstring)
    return bound


def _check_dense(name, s, t, seed, out_dtype=None):
    loss, kern, ref_fn, bound_fn = LOSSES[name]
    n = s.shape[0]
    cd, cq = _coefs(n, seed)
    value, g, _ = _run(loss, s.to(DEVICE), t.to(DEVICE), cd.to(DEVICE), cq.to(DEVICE), out_dtype=out_dtype)
    ref_v, ref_d = _ref_grad(ref_fn, s, t)
    q64 = torch.softmax(s.double(), -1)
    ref_g = cd.double()[:, None] * ref_d + cq.double()[:, None] * q64
    dz = _dz(t)
    vb, gb = bound_fn(s.float(), t.float(), dz_s=dz, dz_t=dz)
    gbound = _grad_bound(gb, s.float(), cd, cq, dz, ref_g, torch.softmax(t.double(), -1), out_dtype or s.dtype)
    B.assert_within(value, ref_v, vb + B.REF64_ATOL, msg=f"{name} value vs reference")
    B.assert_within(g, ref_g, gbound + B.REF64_ATOL, msg=f"{name} gradient vs reference")
    # divergences.py in float32, on the same (float32-valued) inputs: two evaluations, each within the bound
    s32, t32 = s.float(), t.float()
    v32, state = kern.forward(s32, torch.log_softmax(s32, -1), kern.teacher(t32.clone()), None)
    g32 = kern.backward(state, cd, cq)
    B.assert_within(value, v32, 2 * vb, msg=f"{name} value vs divergences.py")
    B.assert_within(g, g32, 2 * gbound, msg=f"{name} gradient vs divergences.py")


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("n,vocab", SHAPES)
def test_dense_kernels_equal_reference(name, n, vocab):
    s, t = _logits(n, vocab, seed=vocab + n)
    _check_dense(name, s, t, seed=n)


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


# --------------------------------------------------------------------------- TAD


def _check_tad(s, t, k, seed, out_dtype=None):
    n = s.shape[0]
    cd, cq = _coefs(n, seed)
    s64, t64 = s.double(), t.double()
    alpha = R.tad_decompose(s64, t64, k)[2]
    abar = alpha.mean().expand(1, n)  # the chunk is one sequence: ᾱ = mean α^T of its rows, from the reference
    w = tail_weight(abar.reshape(-1), BETA)
    loss = kernels.RowLoss(3, k=k)
    value, g, stats = _run(loss, s.to(DEVICE), t.to(DEVICE), cd.to(DEVICE), cq.to(DEVICE), w=w.to(DEVICE),
                           out_dtype=out_dtype)
    mask = torch.ones(1, n, dtype=torch.bool)
    ref_fn = lambda a, b: R.tad(a[None], b[None], mask, k, BETA, seq_alpha_mean=abar)[0]  # noqa: E731
    ref_v, ref_d = _ref_grad(ref_fn, s, t)
    ref_ids = [sorted(R.top_ids(row, k)) for row in t64]
    assert [sorted(r) for r in stats.ids.cpu().tolist()] == ref_ids  # 𝒦: ties to the smaller id, as the reference
    q64 = torch.softmax(s64, -1)
    ref_g = cd.double()[:, None] * ref_d + cq.double()[:, None] * q64
    dz = _dz(t, k)
    vb, gb = LB.tad(s.float()[None], t.float()[None], mask, k, BETA, seq_alpha_mean=abar, dz_s=dz[None],
                    dz_t=dz[None])
    vb, gb = vb[0], gb[0]
    gbound = _grad_bound(gb, s.float(), cd, cq, dz, ref_g, torch.softmax(t64, -1), out_dtype or s.dtype)
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
    g32 = kern.backward(state, cd, cq)
    B.assert_within(value[same], v32[same], 2 * vb[same], msg="tad value vs divergences.py")
    B.assert_within(g[same], g32[same], 2 * gbound[same], msg="tad gradient vs divergences.py")
    return same


@pytest.mark.parametrize("n,vocab,k", [(1, 50, 1), (7, 257, 5), (7, 257, 10), (33, 1000, 10), (7, 1000, 1)])
def test_tad_kernel_equals_reference(n, vocab, k):
    s, t = _logits(n, vocab, seed=7 * k + vocab)
    _check_tad(s, t, k, seed=k)


def test_tad_kernel_bf16_inputs_and_gradient():
    s, t = _logits(7, 257, seed=13, dtype=torch.bfloat16)
    _check_tad(s, t, 5, seed=2, out_dtype=torch.bfloat16)


def test_tad_kernel_extreme_logits_ties_and_minus_inf():
    """±1e4 offsets; teacher −inf entries (p = 0, some of them inside the first k columns, which the running top-k
    starts from); a row of tied teacher logits (𝒦 = the k smallest ids, as the reference); increasing teacher logits
    (every column enters the top-k: the most evictions)."""
    s, t = _logits(6, 257, seed=17, dtype=torch.float64)
    s = s + torch.tensor([1e4, -1e4, 0, 0, 5e3, 0], dtype=torch.float64)[:, None]
    t = t + torch.tensor([-1e4, 1e4, 0, 0, 0, 0], dtype=torch.float64)[:, None]
    t[2, :3] = -math.inf
    t[2, 150:170] = -math.inf
    t[3] = torch.round(t[3])  # many ties, also at the k-th value
    t[4] = torch.linspace(-5, 5, 257, dtype=torch.float64)
    same = _check_tad(s.float(), t.float(), 5, seed=6)
    assert same[[0, 1, 2, 4, 5]].all()  # rows without ties: the same 𝒦 as divergences.py


def test_tad_kernel_subnormal_teacher_tail_and_underflowing_student_tail():
    """Teacher: a 100-nat gap after its top 3 (α^T ~ e^-100, below float32's normal range: the log-space value
    KL(p̃‖q̃) and the q̃/p̃ gradient). Student (rows 3, 4): 2× the teacher's logits (α^S ~ e^-200 < 1e-30: the ratio α^T/α^S
    leaves the normal path)."""
    g = torch.Generator().manual_seed(21)
    t = torch.randn(5, 60, generator=g, dtype=torch.float64)
    t = t.scatter_add(-1, torch.topk(t, 3).indices, torch.full((5, 3), 100.0, dtype=torch.float64))
    s = torch.randn(5, 60, generator=g, dtype=torch.float64)
    s[3:] = 20 * t[3:] / 10
    _check_tad(s.float(), t.float(), 3, seed=9)


def test_tad_kernel_empty_teacher_tail_beside_rows_with_tail_mass():
    """Row 0's teacher is −inf outside its top 5 (α^T = 0 exactly) while the sequence's other rows have tail mass,
    so its weight w = β/ᾱ is finite and positive: its tail term is 0 and its gradient q − p (no log-space row: p̃ is
    undefined there; it was NaN on every tail entry)."""
    s, t = _logits(7, 257, seed=23, dtype=torch.float64)
    t[0, 5:] = -math.inf
    same = _check_tad(s.float(), t.float(), 5, seed=8)
    assert same.all()


def test_nan_logit_poisons_its_row_only():
    s, t = _logits(3, 257, seed=1)
    s[1, 7] = math.nan
    for loss in (kernels.RowLoss(0), kernels.RowLoss(1), kernels.RowLoss(2), kernels.RowLoss(3, k=4)):
        w = torch.ones(3, dtype=torch.float64) if loss.kind == 3 else None
        value, _, _ = _run(loss, s.to(DEVICE), t.to(DEVICE), torch.ones(3, device=DEVICE), None, w=w)
        assert torch.isnan(value[1]) and torch.isfinite(value[[0, 2]]).all()


def test_losses_for_maps_the_registry():
    from tailkd.config import LossConfig
    from tailkd.registry import bind

    assert kernels.losses_for(bind(LossConfig(name="kd"))) == kernels.RowLoss(0)
    assert kernels.losses_for(bind(LossConfig(name="jsd", jsd_beta=0.0))) == kernels.RowLoss(0)
    assert kernels.losses_for(bind(LossConfig(name="jsd", jsd_beta=1.0))) == kernels.RowLoss(1)
    assert kernels.losses_for(bind(LossConfig(name="jsd", jsd_beta=0.2))) == kernels.RowLoss(2, jsd_beta=0.2)
    assert kernels.losses_for(bind(LossConfig(name="tad", k=10))) == kernels.RowLoss(3, k=10)
    assert kernels.losses_for(bind(LossConfig(name="tad", k=65))) is None  # beyond the register buffer
    assert kernels.losses_for(bind(LossConfig(name="dkd"))) is None  # no closed form: torch autograd per chunk


# --------------------------------------------------------------------------- the chunked layer on the kernels


@pytest.mark.skipif(DEVICE != "cpu", reason="runs the layer on CPU tensors, i.e. under the interpreter")
@pytest.mark.parametrize("name,extra", [("kd", {}), ("tad", {"k": 4, "per_document": True}),
                                        ("tad", {"k": 3, "beta": 5.0, "temperature": 1.7}), ("rkl", {}),
                                        ("jsd", {"jsd_beta": 0.1})])
def test_chunked_layer_on_the_kernels_equals_dense(name, extra, monkeypatch):
    """`fused.chunked_sums` with the Triton row kernels (as on CUDA; here the interpreter) against the dense
    objective: masked tokens, chunks of 4 and 7 tokens (partial last chunk, TAD sequences split), soft-capped and
    scaled heads, bias. V = 37 fits one kernel block (BLOCK = 128 on the CPU), so the online log-sum-exp is the plain
    one and each run is one float32 evaluation within `loss_bounds.head_objective` (as in test_fused.py)."""
    import test_fused as TF

    from tailkd.config import LossConfig
    from tailkd.objective import IGNORE_INDEX

    monkeypatch.setattr(fused, "_TRITON_DEVICES", ("cuda", "cpu"))
    inputs = TF._inputs(torch.float32)
    cfg = LossConfig(name=name, **extra)
    plan = fused._prepare(inputs[0], fused.Head(inputs[1], inputs[2], inputs[3]), inputs[6], _bind(cfg), inputs[4],
                          inputs[5], None, inputs[7], None, 4, None)[1]
    assert plan.triton is not None  # the kernels really run
    ref, *ref_grads = TF._dense(cfg, *inputs)
    bound = LB.head_objective(cfg, *inputs)
    assert int((inputs[6] == IGNORE_INDEX).sum()) > 0
    for chunk in (4, 7):
        got, *grads = TF._fused(cfg, *inputs, chunk)
        TF._close([got.loss, got.clm, got.div], [ref.loss, ref.clm, ref.div], torch.float32,
                  [bound.get(k) for k in ("loss", "clm", "div")], ("loss", "clm", "div"))
        TF._close(grads, ref_grads, torch.float32, [bound.get(k) for k in ("h", "w", "b")], ("h", "w", "b"))


def _bind(cfg):
    from tailkd.registry import bind

    return bind(cfg)
