"""The fused, chunked LM-head + loss layer equals the dense path (objective on full logits), values and gradients."""

import types

import bounds as B
import loss_bounds as LB
import pytest
import reference as R
import torch

from tailkd import fused
from tailkd import head as head_mod
from tailkd.config import LossConfig
from tailkd.errors import TailkdError
from tailkd.head import Head, HeadSpec
from tailkd.objective import IGNORE_INDEX, chunked_objective, computed_divergence, objective

CASES = [
    ("clm", {}),
    ("kd", {}),
    ("kd", {"temperature": 2.0}),
    ("tad", {"k": 4}),
    ("tad", {"k": 4, "per_document": True}),
    ("tad", {"k": 3, "beta": 5.0, "temperature": 1.7}),
    ("rkl", {}),
    ("jsd", {}),
    ("jsd", {"jsd_beta": 0.1}),
    ("jsd", {"jsd_beta": 0.0}),
    ("jsd", {"jsd_beta": 1.0}),
    ("tad", {"k": 4, "clm_weight": 0.3, "div_weight": 2.0}),
]


def _inputs(dtype, *, B=3, T=9, d_s=8, d_t=12, V=37, rows=40, seed=0, bias=True):
    """Hidden states, padded heads with transforms, labels with masked tokens, packed segment ids."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, d_s, generator=g, dtype=dtype)
    h_t = torch.randn(B, T, d_t, generator=g, dtype=dtype) * 2
    w_s = torch.randn(rows, d_s, generator=g, dtype=dtype)
    w_t = torch.randn(rows, d_t, generator=g, dtype=dtype)
    b_s = torch.randn(rows, generator=g, dtype=dtype) * 0.1 if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = IGNORE_INDEX
    labels[1, :4] = IGNORE_INDEX
    seg = (torch.rand(B, T, generator=g) < 0.25).long().cumsum(1)  # packed documents: non-decreasing per row
    seg[1] = 0  # one row holds a single document
    spec_s = HeadSpec(V, scale=0.7, softcap=5.0)
    spec_t = HeadSpec(V, softcap=4.0)
    return h_s, w_s, b_s, spec_s, h_t, Head(w_t, None, spec_t), labels, seg


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def _dense(cfg, h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg):
    a, w, b = _leaf(h_s), _leaf(w_s), _leaf(b_s)
    n = int((labels != IGNORE_INDEX).sum())
    terms = objective(head_mod.apply_head(a, Head(w, b, spec_s)), labels, n, cfg=cfg,
                      teacher_logits=head_mod.apply_head(h_t, head_t), segment_ids=seg)
    terms.loss.backward()
    return terms, a.grad, w.grad, None if b is None else b.grad


def _fused(cfg, h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg, chunk):
    a, w, b = _leaf(h_s), _leaf(w_s), _leaf(b_s)
    n = int((labels != IGNORE_INDEX).sum())
    terms = chunked_objective(a, Head(w, b, spec_s), labels, n, cfg=cfg, teacher_hidden=h_t, teacher_head=head_t,
                              segment_ids=seg, chunk_size=chunk)
    terms.loss.backward()
    return terms, a.grad, w.grad, None if b is None else b.grad


def _close(got, ref, dtype, bounds=None, names=()):
    """float64: to 1e-10 (a glance: u64 ~ 1e-16). float32: fused and dense are two float32 evaluations of the same
    exact values, each within `bounds` (LB.head_objective: logits, per-token terms, sums, backward matmuls)."""
    if dtype == torch.float64:
        for x, y in zip(got, ref):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
        return
    for x, y, bound, name in zip(got, ref, bounds, names):
        if x is not None or y is not None:
            B.assert_within(x, y, 2 * bound, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,extra", CASES)
def test_fused_equals_dense_values_and_gradients(name, extra, dtype):
    inputs = _inputs(dtype)
    cfg = LossConfig(name=name, **extra)
    ref, *ref_grads = _dense(cfg, *inputs)
    n_valid = int((inputs[-2] != IGNORE_INDEX).sum())
    bound = LB.head_objective(cfg, *inputs) if dtype == torch.float32 else {}
    values, params = ("loss", "clm", "div"), ("h", "w", "b")
    for chunk in (4, 7, n_valid + 5, None):  # 4, 7: trailing partial chunk (TAD rows split); None: default policy
        got, *grads = _fused(cfg, *inputs, chunk)
        _close([got.loss, got.clm, got.div], [ref.loss, ref.clm, ref.div], dtype, [bound.get(k) for k in values],
               values)
        _close(grads, ref_grads, dtype, [bound.get(k) for k in params], params)


@pytest.mark.parametrize("name,extra", [("kd", {"temperature": 2.0}), ("tad", {"k": 4}), ("dkd", {})])
def test_a_teacher_head_bias_enters_the_teacher_logits(name, extra):
    """A teacher LM head with a bias (padded rows, as its weight): the chunked layer's teacher logits are h Wᵀ + b
    as the model's (`head.apply_head`) on every path — a row kernel (kd at τ = 2, tad, also through the statistics
    pass of the sequences that chunks of 4 split) and autograd per chunk (dkd). Float64, to 1e-10 (a glance: u64 ~
    1e-16); _inputs' teacher head has no bias, and dropping it from the chunks' teacher logits survived (mutation
    audit)."""
    h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg = _inputs(torch.float64)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(head_t.weight.shape[0], generator=g, dtype=torch.float64) * 2
    inputs = (h_s, w_s, b_s, spec_s, h_t, Head(head_t.weight, bias, head_t.spec), labels, seg)
    cfg = LossConfig(name=name, **extra)
    ref, *ref_grads = _dense(cfg, *inputs)
    for chunk in (4, None):
        got, *grads = _fused(cfg, *inputs, chunk)
        _close([got.loss, got.clm, got.div], [ref.loss, ref.clm, ref.div], torch.float64)
        _close(grads, ref_grads, torch.float64)


@pytest.mark.parametrize("per_document", [False, True])
def test_tad_chunk_size_does_not_change_loss_or_gradients(per_document):
    """β(X) needs ᾱ over whole sequences: chunks that cut sequences (statistics pass) == whole-sequence chunks."""
    inputs = _inputs(torch.float64, B=4, T=11, seed=3)
    cfg = LossConfig(name="tad", k=5, beta=2.0, per_document=per_document)
    ref, *ref_grads = _dense(cfg, *inputs)
    for chunk in (1, 2, 5, 11, 12, 30, 1000):
        got, *grads = _fused(cfg, *inputs, chunk)
        _close([got.loss, got.div], [ref.loss, ref.div], torch.float64)
        _close(grads, ref_grads, torch.float64)


def test_chunk_plan_cuts_at_sequence_boundaries_and_flags_split_sequences():
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3])
    chunks, split = fused._plan_chunks(seq, seq.numel(), 4)
    assert chunks == [(0, 3), (3, 5), (5, 9), (9, 11)]  # sequence 2 (5 tokens) must be cut
    assert split.tolist() == [False, False, True, False]
    chunks, split = fused._plan_chunks(seq, seq.numel(), 6)
    assert chunks == [(0, 5), (5, 11)] and not bool(split.any())


def test_frozen_head_gets_no_gradient_and_hidden_gradient_is_unchanged():
    h_s, w_s, _, spec_s, h_t, head_t, labels, seg = _inputs(torch.float64, bias=False)
    cfg = LossConfig(name="tad", k=4)
    _, ref_h, _, _ = _dense(cfg, h_s, w_s, None, spec_s, h_t, head_t, labels, seg)
    a = _leaf(h_s)
    frozen = w_s.clone()  # requires_grad False: no weight-gradient matmul
    terms = chunked_objective(a, Head(frozen, None, spec_s), labels, int((labels != -100).sum()), cfg=cfg,
                              teacher_hidden=h_t, teacher_head=head_t, chunk_size=5)
    terms.loss.backward()
    assert frozen.grad is None
    torch.testing.assert_close(a.grad, ref_h, rtol=1e-10, atol=1e-12)


def test_masked_tokens_get_zero_gradient_and_fully_masked_batch_is_zero():
    h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg = _inputs(torch.float64)
    _, gh, _, _ = _fused(LossConfig(name="kd"), h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg, 4)
    assert bool((gh[labels == IGNORE_INDEX] == 0).all()) and bool((gh[labels != IGNORE_INDEX] != 0).any())
    empty = torch.full_like(labels, IGNORE_INDEX)
    a, w = _leaf(h_s), _leaf(w_s)
    terms = chunked_objective(a, Head(w, None, spec_s), empty, 0, cfg=LossConfig(name="tad", k=3),
                              teacher_hidden=h_t, teacher_head=head_t, chunk_size=4)
    terms.loss.backward()
    assert float(terms.loss.detach()) == 0.0 and float(a.grad.abs().sum()) == 0.0 and float(w.grad.abs().sum()) == 0.0


def test_backward_scales_the_gradients_in_place_and_runs_once():
    """The layer's backward writes ∂W into the buffer its forward filled (scaled there by the incoming gradient; in
    float64 that is not the float32 1/n the layer expects, so the product runs): no
    [V, d] tensor is allocated in backward — every op there with a result of W's shape writes into one of its inputs'
    storage (autograd's AccumulateGrad takes the buffer itself as W.grad; with ``retain_graph`` it copies it, the
    buffer being still referenced) — and the gradients are those of the dense path. A second backward
    (``retain_graph``) raises instead of scaling them twice."""
    from torch.utils._python_dispatch import TorchDispatchMode

    h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg = _inputs(torch.float64)
    cfg = LossConfig(name="kd")
    _, ref_h, ref_w, ref_b = _dense(cfg, h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg)
    a, w, b = _leaf(h_s), _leaf(w_s), _leaf(b_s)
    terms = chunked_objective(a, Head(w, b, spec_s), labels, int((labels != IGNORE_INDEX).sum()), cfg=cfg,
                              teacher_hidden=h_t, teacher_head=head_t, chunk_size=5)
    fresh = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = {x.untyped_storage().data_ptr() for x in (*args, *(kwargs or {}).values())
                   if isinstance(x, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.shape == w.shape and out.untyped_storage().data_ptr() not in ins:
                fresh.append(str(func))
            return out

    with Allocations():
        terms.loss.backward()
    assert fresh == []
    torch.testing.assert_close(a.grad, ref_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, ref_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, ref_b, rtol=1e-10, atol=1e-12)
    again = chunked_objective(a, Head(w, b, spec_s), labels, 1, cfg=cfg, teacher_hidden=h_t, teacher_head=head_t,
                              chunk_size=5)
    again.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagates once"):
        again.loss.backward()


def scaling_check(monkeypatch, device="cpu", cfg=None, watch_ops=True):
    """(What `test_backward_scales_nothing_at_the_expected_gradient` asserts, on ``device``; ``watch_ops``: also that
    the factor-1 backward dispatches no op on a tensor of W's shape but autograd's detach.) Returns the number of
    `fused._scale_` calls seen."""
    from torch.utils._python_dispatch import TorchDispatchMode

    h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg = (x.to(device) if isinstance(x, torch.Tensor) else x
                                                        for x in _inputs(torch.float32))
    head_t = Head(head_t.weight.to(device), None, head_t.spec)
    cfg = cfg or LossConfig(name="tad", k=4)
    seen, real, own = [], fused._scale_, []

    def watched(g, g_total, expected):
        own.append(1)  # the watcher's own ops are not the layer's
        before = g.clone()
        own.pop()
        out = real(g, g_total, expected)
        own.append(1)
        seen.append((float(g_total), expected, torch.equal(out, before)))  # (holding no reference to the
        own.pop()  # gradient: autograd takes it as .grad without a copy)
        return out

    monkeypatch.setattr(fused, "_scale_", watched)

    touched = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (not own and any(isinstance(x, torch.Tensor) and x.shape == w_s.shape for x in args)
                    and "detach" not in str(func)):
                touched.append(str(func))
            return func(*args, **(kwargs or {}))

    def grads(n, factor, declared=1.0):
        a, w, b = _leaf(h_s), _leaf(w_s), _leaf(b_s)
        terms = chunked_objective(a, Head(w, b, spec_s), labels, n, cfg=cfg, teacher_hidden=h_t, teacher_head=head_t,
                                  segment_ids=seg, chunk_size=5, loss_scale=declared)
        if factor != 1:
            (terms.loss * factor).backward()
        elif watch_ops:
            with Ops():
                terms.loss.backward()
            assert touched == [], touched
        else:
            terms.loss.backward()
        return a.grad, w.grad, b.grad

    calls, unit = 0, None
    for n in (1, 32, 4096, 2**20, int((labels != IGNORE_INDEX).sum()), 3, 4099, 65537, 2**24 - 3):
        seen.clear()
        one = grads(n, 1)
        if n & (n - 1) == 0:  # e = 1/n = 2^-j exactly: scaling by it commutes with every float operation (no
            unit = unit or one  # value comes near float32's range ends), so the gradients at n are those at n = 1
            assert all(torch.equal(x * n, y) for x, y in zip(one, unit)), n  # divided by n, bit for bit
        assert len(seen) == 3  # ∂h, ∂W, ∂bias
        for g_total, expected, same in seen:
            assert g_total == expected == float(torch.tensor(1 / n, dtype=torch.float32)), (n, g_total, expected)
            assert same  # untouched
        seen.clear()
        three = grads(n, 3)
        assert len(seen) == 3 and all(g_total != expected for g_total, expected, *_ in seen)
        for got, ref in zip(three, one):
            # g_total = fl(3·e), r = g_total / e (a division, or a product by fl(1/e): 2 roundings), fl(x·r): 4u
            assert torch.all((got - 3 * ref).abs() <= 4 * B.U32 * (1 + 4 * B.U32) * (3 * ref).abs()), n
        for world in (2, 8):  # several processes: the loss times the world size, declared to the layer
            seen.clear()
            scaled = grads(n, world, declared=world)
            assert len(seen) == 3 and all(g == e and same for g, e, same in seen), (n, world, seen)
            # fl(world·e) = world·e exactly, and every operation commutes with a power-of-two factor
            assert all(torch.equal(x, world * y) for x, y in zip(scaled, one)), (n, world)
        calls += 12
    return calls


def test_backward_scales_nothing_at_the_expected_gradient(monkeypatch):
    """`tailkd.objective` has the layer compute its gradients at the scale 1/n (``grad_scale``), the gradient its
    division of the sums by the valid-token count n sends back: a training step's ``loss.backward()`` then brings
    exactly that (the float32 1/n: torch's float32 reciprocal of n and the host's 1/n rounded to float32 are both
    the correctly rounded value) and the backward scales nothing — the buffers the forward filled are returned
    untouched (no op on a tensor of W's shape: no pass over [V, d]). Any other incoming gradient (loss·3 here)
    scales them: each entry is the factor-1 gradient times r = fl(fl(3·e) / e), e = fl(1/n), within 4 roundings of
    3× it. Where n is a power of two the gradients are those at n = 1 divided by n, bit for bit (forgetting to
    compute them at 1/n fails here; that they are the loss's gradients is every other test of the layer's). The
    torch path (float32 on the CPU); tests/test_kernels.py runs the same with `kernels.scale_`. A loss the caller
    multiplies by a world size of 2 or 8 (several processes) and declares (``loss_scale``) is likewise not scaled
    in the backward, its gradients ``world`` times those of one process, bit for bit."""
    assert scaling_check(monkeypatch) == 108


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients_are_scaled_by_the_float32_ratio_and_rounded_once(dtype):
    """`fused._scale_` on bf16/fp16 gradients (the CPU torch path): each entry is g·r with r = g_total/expected in
    float32, rounded once to g's dtype — not g times r rounded to g's dtype first. Here expected = 2^-5 and r =
    1 + 2^-9 + 2^-10 (10 fraction bits: exact in float32 and float16, not in bf16, where it rounds to 1), so
    g·r in float32 is exact (at most 8 + 10 significant bits) and the result is that product rounded once,
    bit for bit."""
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    r = 1 + 2 ** -9 + 2 ** -10
    want = (g.float() * r).to(dtype)
    out = fused._scale_(g.clone(), torch.tensor(r * 2 ** -5, dtype=torch.float32), 2 ** -5)
    assert torch.equal(out, want)
    if dtype == torch.bfloat16:  # r rounded to bf16 first would leave g as it was: a test that can see it
        assert not torch.equal(want, g * torch.tensor(r).to(dtype))


def test_the_expected_gradient_is_cuda_s_division_by_a_host_count():
    """`objective._expected_gradient(n, s)`, the gradient ``(loss · s).backward()`` sends to the layer's total where
    loss = total / n on CUDA (which divides by a host scalar through its float32 reciprocal): fl(s · fl(1/n)) in
    float32, rounded once — for a loss_scale s that is not a power of two (a world size of 3), not fl(s/n), the
    correctly rounded quotient (also what a float64 1/n times s gives), which differs from it for 564 of the counts
    1..1999 (the layer's backward would then rescale every gradient needlessly). A device count: 1.0 (unknown on the
    host)."""
    from tailkd.objective import _expected_gradient

    f32 = torch.float32
    for n in range(1, 2000):
        assert _expected_gradient(n, 3.0) == float(torch.tensor(3.0, dtype=f32) * torch.tensor(1.0 / n, dtype=f32))
        assert _expected_gradient(n, 1.0) == float(torch.tensor(1.0, dtype=f32) / n)
    assert _expected_gradient(7, 3.0) != float(torch.tensor(3.0 / 7, dtype=torch.float64).float())
    assert _expected_gradient(torch.tensor(7), 3.0) == 1.0


def test_grad_scale_must_be_a_positive_float32(monkeypatch):
    h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg = _inputs(torch.float32)
    d = computed_divergence(LossConfig(name="kd"))
    for bad in (0.0, -1.0, float("inf"), float("nan"), 1e-50):
        with pytest.raises(ValueError, match="grad_scale"):
            fused.chunked_sums(h_s, Head(w_s, b_s, spec_s), labels, d, teacher_hidden=h_t, teacher_head=head_t,
                               grad_scale=bad)


def test_global_denominator_and_micro_batches_match_one_big_batch():
    h_s, w_s, _, spec_s, h_t, head_t, labels, seg = _inputs(torch.float64)
    cfg = LossConfig(name="tad", k=4)
    n = int((labels != IGNORE_INDEX).sum())
    ref, ref_h, ref_w, _ = _dense(cfg, h_s, w_s, None, spec_s, h_t, head_t, labels, seg)
    a, w = _leaf(h_s), _leaf(w_s)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 3)):
        part = chunked_objective(a[rows], Head(w, None, spec_s), labels[rows], n, cfg=cfg, teacher_hidden=h_t[rows],
                                 teacher_head=head_t, chunk_size=5)
        part.loss.backward()
        total += float(part.loss.detach())
    assert total == pytest.approx(float(ref.loss.detach()), rel=1e-12)
    torch.testing.assert_close(a.grad, ref_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, ref_w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,extra", [("tad", {"k": 4, "per_document": True}), ("jsd", {}), ("clm", {})])
def test_weighted_terms_and_their_gradients_match_dense(name, extra):
    """CLM and divergence weighted 1 : 3, float64: the chunked sums and their gradients equal the dense objective."""
    inputs = _inputs(torch.float64)
    cfg = LossConfig(name=name, clm_weight=1.0, div_weight=3.0, **extra)
    ref, *ref_grads = _dense(cfg, *inputs)
    got, *grads = _fused(cfg, *inputs, 4)
    _close([got.loss, got.clm, got.div], [ref.loss, ref.clm, ref.div], torch.float64)
    _close(grads, ref_grads, torch.float64)


@pytest.mark.parametrize("name,extra", [("dkd", {}), ("dkd", {"temperature": 2.0, "dkd_beta": 3.0}), ("drkl", {}),
                                        ("drkl", {"drkl_anchor": "teacher_argmax", "gamma": 0.2}), ("tvd", {}),
                                        ("tvd", {"temperature": 0.7}), ("sym_kl", {}),
                                        ("skew_kl", {"skew_alpha": 0.2}), ("skew_rkl", {"temperature": 1.5}),
                                        ("akl", {"akl_mu": 0.7}), ("alpha_beta", {"ab_alpha": 0.8, "ab_beta": 0.3})])
def test_losses_without_a_row_kernel_are_chunked_by_autograd(name, extra):
    """Losses without a closed-form kernel (DKD, DRKL, TVD, the DRKL paper's baselines): the chunked layer
    differentiates their per-token function chunk by chunk, and gives the dense objective's values and gradients
    (float64), whatever the chunking."""
    inputs = _inputs(torch.float64)
    cfg = LossConfig(name=name, **extra)
    ref, *ref_grads = _dense(cfg, *inputs)
    for chunk in (1, 4, 7, None):
        got, *grads = _fused(cfg, *inputs, chunk)
        _close([got.loss, got.clm, got.div], [ref.loss, ref.clm, ref.div], torch.float64)
        _close(grads, ref_grads, torch.float64)


@pytest.mark.parametrize("chunk", [2, None])
def test_tad_float32_with_a_subnormal_teacher_tail_mass(chunk):
    """Teacher logits with a 100-nat gap after the top 3 (α^T ~ 4e-44: sub-normal in float32): the chunked layer's
    β(X)·α^T·D_KL2 stays finite and equals the dense path's (2 tokens per chunk: ᾱ from the statistics pass)."""
    g = torch.Generator().manual_seed(21)
    V = 12
    t = torch.randn(2, 3, V, generator=g, dtype=torch.float64)
    t = t.scatter_add(-1, torch.topk(t, 3).indices, torch.full((2, 3, 3), 100.0, dtype=torch.float64)).float()
    head_t = Head(torch.eye(V), None, HeadSpec(V))  # the teacher's hidden states are its logits
    h_s = torch.randn(2, 3, 5, generator=g)
    w_s = torch.randn(V, 5, generator=g)
    labels = torch.randint(0, V, (2, 3), generator=g)
    cfg = LossConfig(name="tad", k=3)
    inputs = (h_s, w_s, None, HeadSpec(V), t, head_t, labels, None)
    ref, *ref_grads = _dense(cfg, *inputs)
    got, *grads = _fused(cfg, *inputs, chunk)
    assert torch.isfinite(got.loss) and all(torch.isfinite(x).all() for x in grads if x is not None)
    bound = LB.head_objective(cfg, *inputs)
    _close([got.loss, got.clm, got.div], [ref.loss, ref.clm, ref.div], torch.float32,
           [bound.get(k) for k in ("loss", "clm", "div")], ("loss", "clm", "div"))
    _close(grads, ref_grads, torch.float32, [bound.get(k) for k in ("h", "w", "b")], ("h", "w", "b"))


@pytest.mark.parametrize("chunk", [2, None])
def test_tad_teacher_tails_beyond_float64_range(chunk):
    """Every teacher tail 720 or 2000 nats below the top 3 (α^T, and so ᾱ, below float64's range: it was inf/NaN
    from 708 nats on and dropped the tail term from 745): ᾱ in log space keeps β(X)·α^T = β·α^T/ᾱ (~β). The layer
    (2 tokens per chunk: ᾱ from the statistics pass; None: in the chunk) equals the dense path, and both equal the
    value at a 300-nat gap, from which the exact one differs by < e^-290: the loss is continuous in the gap."""
    g = torch.Generator().manual_seed(22)
    V = 12
    base = torch.randn(2, 3, V, generator=g, dtype=torch.float64)
    top = torch.topk(base, 3).indices
    head_t = Head(torch.eye(V, dtype=torch.float64), None, HeadSpec(V))  # the teacher's hidden states: its logits
    h_s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    w_s = torch.randn(V, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 3), generator=g)
    cfg = LossConfig(name="tad", k=3)
    runs = {}
    for gap in (300.0, 720.0, 2000.0):
        t = base.scatter_add(-1, top, torch.full((2, 3, 3), gap, dtype=torch.float64))
        inputs = (h_s, w_s, None, HeadSpec(V), t, head_t, labels, None)
        ref, *ref_grads = _dense(cfg, *inputs)
        got, *grads = _fused(cfg, *inputs, chunk)
        _close([got.loss, got.div, *grads[:2]], [ref.loss, ref.div, *ref_grads[:2]], torch.float64)
        runs[gap] = [got.loss, got.div, *grads[:2]]
    # the tail term is there: D = D_KL1 + β·D_KL2-sized terms, far above D_KL1 alone (which the gap leaves ~unchanged)
    d1 = R.tad_decompose(head_mod.apply_head(h_s, Head(w_s, None, HeadSpec(V))), t, 3)[0].mean()  # div: per token
    assert float(runs[2000.0][1] - d1) > 1e-2
    # differences of the logit magnitudes M <= 2000 rounded: u64·M·(a few) ~ 1e-12 absolute per log term
    for gap in (720.0, 2000.0):
        for x, y in zip(runs[gap], runs[300.0]):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


def test_tad_float32_stays_accurate_when_the_student_tail_mass_underflows():
    """Student logits = 20 × the teacher's direction: α^S ~ 1e-40 (< float32 normal range) on most tokens."""
    _, _, _, spec_s, h_t, head_t, labels, seg = _inputs(torch.float32, d_s=12, seed=5)
    h_s, w_s = h_t.clone(), head_t.weight.clone()
    spec = HeadSpec(spec_s.vocab_size, scale=20.0)
    head_t = Head(head_t.weight, None, HeadSpec(spec_s.vocab_size, scale=2.0))
    cfg = LossConfig(name="tad", k=3)
    z = head_mod.apply_head(h_s.double(), Head(w_s.double(), None, spec))
    ids = head_mod.apply_head(h_t.double(), Head(head_t.weight.double(), None, head_t.spec)).topk(3, -1).indices
    log_as = z.scatter(-1, ids, -torch.inf).logsumexp(-1) - z.logsumexp(-1)
    assert float((log_as < -69).float().mean()) > 0.5  # the ratio α^T/α^S > 1e30 fallback is exercised
    f64 = [x.double() for x in (h_s, w_s)]
    ref64, *g64 = _dense(cfg, f64[0], f64[1], None, spec, h_t.double(),
                         Head(head_t.weight.double(), None, head_t.spec), labels, seg)
    got, *grads = _fused(cfg, h_s, w_s, None, spec, h_t, head_t, labels, seg, 5)
    assert torch.isfinite(got.loss) and all(torch.isfinite(g).all() for g in grads if g is not None)
    # one float32 evaluation vs the float64 one: logits ~1e2 (20 × a 12-term dot product), so log α^S = lse(tail) −
    # lse(all) carries absolute errors of a few u·|logit| (LB.head_objective)
    bound = LB.head_objective(cfg, h_s, w_s, None, spec, h_t, head_t, labels, seg)
    B.assert_within(got.loss, ref64.loss, bound["loss"], msg="loss")
    B.assert_within(grads[0], g64[0], bound["h"], msg="grad h")
    B.assert_within(grads[1], g64[1], bound["w"], msg="grad W")


# --------------------------------------------------------------------------- the model's own logit transforms


def _tiny_config(name, **extra):
    import transformers

    cls = getattr(transformers, name)
    return cls(**{"vocab_size": 70, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
                  "pad_token_id": None, **extra})


def _tiny_model(config_name, **extra):
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_tiny_config(config_name, **extra), dtype=torch.float32)
    with torch.no_grad():  # large logits so that soft-capping / scaling matter
        model.get_output_embeddings().weight.mul_(40.0)
    return model.eval()


@pytest.mark.parametrize("config_name,extra,expect", [
    ("Gemma2Config", {"final_logit_softcapping": 3.0, "tie_word_embeddings": False}, {"softcap": 3.0}),
    # RecurrentGemma (Griffin: recurrent and local attention blocks) caps its logits at logits_soft_cap (read as
    # "does not reproduce" before, max |diff| 0.018 on a tiny model)
    ("RecurrentGemmaConfig", {"logits_soft_cap": 3.0, "lru_width": 32, "attention_window_size": 8,
                              "num_hidden_layers": 3}, {"softcap": 3.0}),
    ("LlamaConfig", {}, {}),
    ("CohereConfig", {"logit_scale": 0.25}, {"scale": 0.25}),
    ("GraniteConfig", {"logits_scaling": 8.0}, {"scale": 1 / 8.0}),
    ("HyperCLOVAXConfig", {"logits_scaling": 0.5}, {"scale": 0.5}),  # multiplies, where Granite divides
    # its Mamba-2 mixers at small sizes: the defaults (128 heads, state 256, chunks of 256) took 16.8 GB and 11 s in
    # the forward of transformers 5.17's torch path (0.9 GB, 0.7 s in 5.25's); here 0.6 GB and 0.01 s in both
    ("FalconH1Config", {"lm_head_multiplier": 0.5, "mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_d_head": 8,
                        "mamba_d_state": 16, "mamba_chunk_size": 8}, {"scale": 0.5}),
    # MiniCPM3 divides its final hidden states by logits_scaling = hidden_size / dim_model_base (32 / 4) before a
    # head without bias: the same as dividing the logits (its multi-head latent attention needs its own sizes)
    ("MiniCPM3Config", {"dim_model_base": 4, "num_key_value_heads": 4, "head_dim": None, "qk_nope_head_dim": 4,
                        "qk_rope_head_dim": 4, "v_head_dim": 8, "q_lora_rank": 16, "kv_lora_rank": 8},
     {"scale": 1 / 8.0}),
])
def test_head_spec_reproduces_the_models_own_logits(config_name, extra, expect):
    model = _tiny_model(config_name, **extra)
    head = head_mod.model_head(model)
    assert head.spec == HeadSpec(70, **expect)
    ids = torch.randint(0, 70, (2, 6), generator=torch.Generator().manual_seed(0))
    # the model's own forward and apply_head on the same final hidden states: two float32 evaluations of the same
    # logits, each within LB.head_logits' bound (a 33-term dot product with |W| ×40, the scale, the soft-cap)
    with torch.no_grad():
        hidden = head_mod.final_hidden(model, ids)
    assert head_mod.verify_head(model, ids, head) <= 2 * float(LB.head_logits(hidden, head.weight, head.bias,
                                                                             head.spec)[1].max())
    if expect:  # leaving the transform out is caught (TRL #6629)
        with pytest.raises(TailkdError, match="does not reproduce"):
            head_mod.verify_head(model, ids, Head(head.weight, head.bias, HeadSpec(70)))


def test_gemma3n_final_hidden_states_are_its_decoders_output(monkeypatch):
    """Gemma 3n's hidden states stack its AltUp streams ([2, B, T, d] here), mixed and normalized only after its last
    layer: `final_hidden` takes its decoder's output, one row per token, and its head (soft-capped at 30) reproduces
    the model's own logits (within 2 x LB.head_logits' bound, as every family's). Read from the hidden states, as
    before, they are not one row per token: verify_head says so in one line (the fused run failed with an
    IndexError)."""
    import transformers

    sliding, full = "sliding_attention", "full_attention"
    config = transformers.Gemma3nTextConfig(
        vocab_size=70, vocab_size_per_layer_input=70, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size_per_layer_input=8,
        num_kv_shared_layers=2, sliding_window=4, layer_types=[sliding, full] * 2,
        activation_sparsity_pattern=[0.0] * 4, laurel_rank=4, altup_num_inputs=2, final_logit_softcapping=30.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    head = head_mod.model_head(model)
    ids = torch.randint(0, 70, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = head_mod.final_hidden(model, ids)
    assert hidden.shape == (2, 6, 32) and head.spec == HeadSpec(70, softcap=30.0)
    assert head_mod.verify_head(model, ids, head) <= 2 * float(LB.head_logits(hidden, head.weight, head.bias,
                                                                             head.spec)[1].max())
    monkeypatch.setattr(head_mod, "DECODER_OUTPUT_MODELS", ())
    fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with pytest.raises(TailkdError, match=r"^the fused loss layer reads Gemma3nForCausalLM's final hidden states as "
                                          r"\[2, 2, 6, 32\], not one row per token of \[2, 6\]: .*; set "
                                          r"train.fused_loss=off$"):
        head_mod.verify_head(fresh, ids)


def test_verify_head_names_a_model_whose_own_logits_are_not_finite():
    """A teacher with a NaN in its weights: its logits are NaN, and verify_head said "the fused loss layer does not
    reproduce LlamaForCausalLM's logits (max |diff| nan): its forward transforms the logits in a way tailkd does not
    model; set train.fused_loss=off" (distill --train.fused_loss on, cache-teacher), blaming the head. It now names
    the model's non-finite logits; where only some positions are NaN (a NaN embedding row: every position of a row
    holding its token, 0·NaN in the attention), the head is checked on the finite ones, the others must be NaN alike."""
    model = _tiny_model("Gemma2Config", final_logit_softcapping=3.0, tie_word_embeddings=False)
    ids = torch.randint(0, 70, (2, 6), generator=torch.Generator().manual_seed(0))
    ids[1][ids[1] == 5], ids[0, 3] = 6, 5
    with torch.no_grad():
        model.get_input_embeddings().weight[5] = float("nan")  # row 0's logits: NaN
    assert head_mod.verify_head(model, ids) < 1e-3 * 40
    with pytest.raises(TailkdError, match="does not reproduce"):  # the missing soft-cap is still caught
        head_mod.verify_head(model, ids, Head(model.lm_head.weight, None, HeadSpec(70)))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every logit
    with pytest.raises(TailkdError, match=r"^Gemma2ForCausalLM's own logits are not finite") as err:
        head_mod.verify_head(model, ids)
    assert "fused_loss" not in str(err.value)


def test_verify_head_refuses_a_scale_off_by_one_percent():
    """verify_head's tolerance is 1e-3 × max(1, max |logit|) in float32 (its docstring): a Cohere head read with
    logit_scale 0.25·1.01 instead of 0.25 is off by 1% of each logit, 10× that tolerance where max |logit| >= 1:
    refused (the right one passes: test_head_spec_reproduces_the_models_own_logits). A tolerance of 1e-1 survived
    (mutation audit)."""
    model = _tiny_model("CohereConfig", logit_scale=0.25)
    ids = torch.randint(0, 70, (2, 6), generator=torch.Generator().manual_seed(0))
    head = head_mod.model_head(model)
    with pytest.raises(TailkdError, match=r"does not reproduce CohereForCausalLM's logits \(V=70, scale=0\.2525; max "):
        head_mod.verify_head(model, ids, Head(head.weight, head.bias, HeadSpec(70, scale=0.25 * 1.01)))


def test_a_head_spec_describes_its_transforms():
    """The words a refusal of `verify_head` names the head by: the vocabulary, then each transform it applies."""
    assert HeadSpec(70).describe() == "V=70"
    assert HeadSpec(70, scale=0.125, softcap=30.0).describe() == "V=70, scale=0.125, softcap=30"
    assert HeadSpec(5, softcap=3.5).describe() == "V=5, softcap=3.5"


def test_verify_head_tolerance_grows_with_the_largest_logit(monkeypatch):
    """The tolerance is 1e-3 x max(1, max |logit|) (float32): final hidden states off by a relative 2e-4 give logits
    off by 2e-4 x |logit| <= 2e-4 x max |logit|, within it (and past 1e-3 where max |logit| > 5, as here)."""
    model = _tiny_model("LlamaConfig")
    ids = torch.randint(0, 70, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top = float(model(input_ids=ids).logits.abs().max())
        hidden = head_mod.final_hidden(model, ids)
    head = head_mod.model_head(model)
    rounding = 2 * float(LB.head_logits(hidden, head.weight, head.bias, head.spec)[1].max())  # each side's float32
    assert top > 10 and rounding < 1e-4 * top
    real = head_mod.final_hidden
    monkeypatch.setattr(head_mod, "final_hidden", lambda m, i, **kw: real(m, i, **kw) * (1 + 2e-4))
    assert 1e-3 < head_mod.verify_head(model, ids) <= 2e-4 * top * (1 + 2e-4) + rounding


def test_verify_head_refuses_nan_logits_where_the_models_own_are_finite(monkeypatch):
    """A head that gives NaN where the model's logits are finite does not reproduce them (max |diff| NaN, which no
    comparison with the tolerance accepts)."""
    model = _tiny_model("LlamaConfig")
    ids = torch.randint(0, 70, (2, 6), generator=torch.Generator().manual_seed(0))
    real = head_mod.final_hidden
    monkeypatch.setattr(head_mod, "final_hidden", lambda m, i, **kw: real(m, i, **kw).index_fill(1, torch.tensor([2]),
                                                                                              float("nan")))
    with pytest.raises(TailkdError, match=r"does not reproduce LlamaForCausalLM's logits \(V=70; max \|diff\| nan"):
        head_mod.verify_head(model, ids)


def test_verify_head_refuses_finite_logits_where_the_models_own_are_not(monkeypatch):
    """Where the model's own logits are NaN (row 0: a NaN embedding), `final_hidden` + `apply_head` must give NaN
    there too; final hidden states that are finite there (NaN replaced by 0) are a head that does not reproduce the
    model, refused, although the finite positions (row 1) agree. Comparing the finite positions alone survived
    (mutation audit)."""
    model = _tiny_model("Gemma2Config", final_logit_softcapping=3.0, tie_word_embeddings=False)
    ids = torch.randint(0, 70, (2, 6), generator=torch.Generator().manual_seed(0))
    ids[1][ids[1] == 5], ids[0, 3] = 6, 5
    with torch.no_grad():
        model.get_input_embeddings().weight[5] = float("nan")  # row 0's logits: NaN
    assert head_mod.verify_head(model, ids) < 1e-3 * 40  # NaN alike: accepted
    real = head_mod.final_hidden
    monkeypatch.setattr(head_mod, "final_hidden", lambda m, i, **kw: torch.nan_to_num(real(m, i, **kw)))
    with pytest.raises(TailkdError, match="does not reproduce"):
        head_mod.verify_head(model, ids)


def test_head_spec_reads_a_multimodal_config_s_text_config_and_refuses_a_short_head():
    """A config with a text config (Gemma-3's multimodal one) keeps the language model's settings there: the
    soft-cap and the vocabulary are read from it. A head with fewer rows than the vocabulary is refused."""
    model = _tiny_model("LlamaConfig")
    text = types.SimpleNamespace(vocab_size=70, final_logit_softcapping=3.0)
    model.config = types.SimpleNamespace(model_type="gemma3", get_text_config=lambda: text)
    assert head_mod.head_spec(model) == HeadSpec(70, softcap=3.0)
    assert head_mod.head_spec(model, vocab_size=69) == HeadSpec(69, softcap=3.0)  # the shared vocabulary
    with pytest.raises(TailkdError, match=r"^the LM head has 70 rows, fewer than the vocabulary \(71\)$"):
        head_mod.head_spec(model, vocab_size=71)


def test_model_head_of_a_wrapped_model_is_the_model_s_own():
    """A DDP-wrapped student (its model at ``.module``): model_head gives the wrapped model's own head parameters
    (the gradients flow into them) and spec."""
    model = _tiny_model("CohereConfig", logit_scale=0.25)
    head = head_mod.model_head(types.SimpleNamespace(module=model))
    assert head.weight is model.get_output_embeddings().weight and head.spec == HeadSpec(70, scale=0.25)


def test_model_head_takes_the_head_s_bias():
    """A head with a bias (Phi's): model_head returns it, and final_hidden + apply_head reproduce the logits with it."""
    model = _tiny_model("LlamaConfig")
    torch.manual_seed(1)
    model.lm_head = torch.nn.Linear(32, 70, bias=True)
    with torch.no_grad():
        model.lm_head.bias.mul_(50.0)  # larger than verify_head's tolerance of 1e-3 x max |logit|
    head = head_mod.model_head(model)
    assert head.bias is model.lm_head.bias and head.weight is model.lm_head.weight
    ids = torch.randint(0, 70, (2, 6), generator=torch.Generator().manual_seed(0))
    head_mod.verify_head(model, ids, head)
    with pytest.raises(TailkdError, match="does not reproduce"):
        head_mod.verify_head(model, ids, Head(head.weight, None, head.spec))


class _KeywordsOnly(torch.nn.Module):
    """A causal LM whose forward takes every argument through ``**kwargs`` (none named logits_to_keep)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes no logits_to_keep; its decoder is ``base_model``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def base_model(self):
        return self.inner.model

    def forward(self, input_ids, use_cache=False, output_hidden_states=False):
        return self.inner(input_ids=input_ids, use_cache=use_cache, output_hidden_states=output_hidden_states)


def test_final_hidden_runs_a_forward_that_takes_keywords_and_refuses_a_sharded_one_that_cannot():
    """A forward taking ``**kwargs`` is given logits_to_keep (its own forward runs: DDP's and FSDP's hooks with it);
    one that takes none runs its decoder (`base_model`) instead, which an FSDP-sharded model cannot (its forward
    unshards the weights): refused, naming the model's own class, not fully_shard's FSDP<name>. Both give the final
    hidden states the head reads."""
    from torch.distributed.fsdp import FSDPModule

    model = _tiny_model("LlamaConfig")
    ids = torch.randint(0, 70, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(head_mod.final_hidden(_KeywordsOnly(model), ids), want)
        assert torch.equal(head_mod.final_hidden(_NoLogitsToKeep(model), ids), want)
        sharded = _NoLogitsToKeep(model)
        sharded.__class__ = type("FSDP_NoLogitsToKeep", (FSDPModule, _NoLogitsToKeep), {})  # as fully_shard does
        with pytest.raises(TailkdError, match=r"^_NoLogitsToKeep\.forward takes no logits_to_keep, which the "
                                              r"chunked loss layer needs under DDP / FSDP"):  # its own class
            head_mod.final_hidden(sharded, ids)
        from tailkd.calibration import measure

        with pytest.raises(TailkdError, match=r"^_NoLogitsToKeep\.forward takes no logits_to_keep, which a "
                                              r"calibration pass over a teacher sharded with FSDP2 needs: use "
                                              r"--teacher\.parallel replicate$"):  # the calibration's own reason
            measure(sharded, None, [{"input_ids": ids}], {})


@pytest.mark.parametrize("training", [True, False])
def test_verify_head_compares_without_dropout_and_leaves_the_mode(training):
    """verify_head runs the two forwards in eval mode (dropout would make them differ) and leaves the model in the
    mode it found it in."""
    model = _tiny_model("LlamaConfig", attention_dropout=0.5)
    model.train(training)
    ids = torch.randint(0, 70, (2, 6), generator=torch.Generator().manual_seed(0))
    head_mod.verify_head(model, ids)
    assert model.training is training


def test_apply_head_computes_in_the_wider_dtype_and_refuses_a_model_without_a_head():
    """apply_head multiplies in the wider of the hidden states' and the head's dtypes (bf16 hidden states and a
    float32 head: float32, exactly the float32 product of the upcast states), or in the dtype asked for; a model whose
    output embeddings have no weight is refused as without an LM head."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 16, generator=g).bfloat16()
    head = Head(torch.randn(9, 16, generator=g), None, HeadSpec(9))
    got = head_mod.apply_head(hidden, head)
    assert got.dtype == torch.float32 and torch.equal(got, hidden.float() @ head.weight.T)
    assert head_mod.apply_head(hidden, head, dtype=torch.float64).dtype == torch.float64
    model = _tiny_model("LlamaConfig")
    model.get_output_embeddings = torch.nn.Identity
    with pytest.raises(TailkdError, match=r"^LlamaForCausalLM has no LM head \(get_output_embeddings\); set "
                                          r"train\.fused_loss=off$"):
        head_mod.head_spec(model)


def test_head_spec_reads_a_scaling_its_config_lacks_from_the_base_model():
    """A Granite-type model whose config has no logits_scaling but whose base model (model.model) has one: head_spec
    takes the base model's (Granite divides: scale 1/8). Ignoring the base model (scale 1) survived (mutation
    audit)."""
    model = _tiny_model("GraniteConfig", logits_scaling=8.0)
    model.config = types.SimpleNamespace(model_type="granite", vocab_size=70)  # (a config field cannot be None)
    model.model.logits_scaling = 8.0
    assert head_mod.head_spec(model) == HeadSpec(70, scale=1 / 8.0)


def test_fused_objective_on_gemma2_equals_objective_on_model_logits():
    student = _tiny_model("Gemma2Config", final_logit_softcapping=3.0, tie_word_embeddings=False)
    teacher = _tiny_model("Gemma2Config", final_logit_softcapping=5.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 70, (2, 8), generator=g)
    labels = torch.randint(0, 70, (2, 8), generator=g)
    cfg = LossConfig(name="tad", k=5)
    n = int(labels.numel())
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    ref = objective(student(input_ids=ids).logits, labels, n, cfg=cfg, teacher_logits=t_logits)
    ref.loss.backward()
    ref_grad = student.get_output_embeddings().weight.grad.clone()
    student.zero_grad()
    with torch.no_grad():
        h_t = head_mod.final_hidden(teacher, ids)
    got = chunked_objective(head_mod.final_hidden(student, ids), head_mod.model_head(student), labels, n, cfg=cfg,
                            teacher_hidden=h_t, teacher_head=head_mod.model_head(teacher), chunk_size=5)
    got.loss.backward()
    # both read the same float32 final hidden states (the same forward, deterministic); from there two float32
    # evaluations of the head and the objective, each within LB.head_objective
    with torch.no_grad():
        h_s = head_mod.final_hidden(student, ids)
    head_s = head_mod.model_head(student)
    bound = LB.head_objective(cfg, h_s, head_s.weight, head_s.bias, head_s.spec, h_t, head_mod.model_head(teacher),
                              labels)
    B.assert_within(got.loss, ref.loss, 2 * bound["loss"], msg="loss")
    B.assert_within(student.get_output_embeddings().weight.grad, ref_grad, 2 * bound["w"], msg="grad W")


def test_unknown_scaling_attribute_is_refused():
    model = _tiny_model("LlamaConfig")
    model.config.logits_scaling = 4.0
    with pytest.raises(TailkdError, match="does not know"):
        head_mod.head_spec(model)
    model.config.logits_scaling = 1.0  # a scaling of 1 changes nothing: accepted (refusing it survived)
    assert head_mod.head_spec(model) == HeadSpec(70)


def test_selection_and_errors():
    assert not fused.use_fused("auto", 1000, 32000)
    assert fused.use_fused("auto", 8192, 151936)  # one side's float32 logits: 5 GB > 1 GiB
    assert fused.use_fused("on", 10, 10) and not fused.use_fused("off", 10**9, 10**6)
    # auto fuses above 1 GiB, not at it: 2^18 tokens x 2^10 entries x 4 bytes is 1 GiB exactly (mutation audit)
    assert not fused.use_fused("auto", 2**18, 2**10) and fused.use_fused("auto", 2**18 + 1, 2**10)
    with pytest.raises(TailkdError, match="auto, on, off"):
        fused.use_fused("maybe", 10, 10)
    assert fused.default_chunk_size(151936) == 110 and fused.default_chunk_size(100) == 4096
    h_s, w_s, _, spec_s, h_t, head_t, labels, _ = _inputs(torch.float64)
    with pytest.raises(ValueError, match="exactly one teacher"):
        chunked_objective(h_s, Head(w_s, None, spec_s), labels, 5, cfg=LossConfig(name="dkd"))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        chunked_objective(h_s, Head(w_s, None, spec_s), labels, 5, cfg=LossConfig(name="kd"), teacher_hidden=h_t,
                          teacher_head=Head(head_t.weight, None, HeadSpec(36)))
    # a negative chunk size is refused, not planned as no chunk at all (a loss of 0 without a gradient; 0 or None
    # takes the default rule)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_objective(h_s, Head(w_s, None, spec_s), labels, 5, cfg=LossConfig(name="kd"), teacher_hidden=h_t,
                          teacher_head=head_t, chunk_size=-1)


# --------------------------------------------------------------------------- chunk sizes


def test_chunk_rule_cpu_keeps_cache_sized_chunks():
    for vocab in (100, 32000, 151936):
        for free in (None, 10**12):
            assert fused.chunk_tokens("cpu", vocab, 2048, free, torch.bfloat16) == fused.default_chunk_size(vocab)


def test_chunk_rule_cuda_from_matmul_shape_and_free_memory():
    gib = 1 << 30
    # the paper-like point on a card with 100 GiB free: max(2^28/V = 1767, d = 2048) tokens, memory allows 6795
    assert fused.chunk_tokens("cuda", 151936, 2048, 100 * gib, torch.bfloat16) == 2048
    # a narrower model: 2^28/V = 1767 tokens, rounded down to a multiple of 128
    assert fused.chunk_tokens("cuda", 151936, 576, 100 * gib, torch.bfloat16) == 1664
    # 8 GiB free: a quarter over 151936·(6·4 + 2) bytes per token = 543 tokens -> 512
    assert fused.chunk_tokens("cuda", 151936, 2048, 8 * gib, torch.bfloat16) == 512
    # float32 matmuls: 28 bytes per vocabulary entry and token -> 504 -> 384
    assert fused.chunk_tokens("cuda", 151936, 2048, 8 * gib, torch.float32) == 384
    # almost no memory: never below 128 tokens; a small vocabulary: capped at 16384
    assert fused.chunk_tokens("cuda", 151936, 2048, 1 << 20, torch.bfloat16) == 128
    assert fused.chunk_tokens("cuda", 1000, 64, 100 * gib, torch.bfloat16) == 16384


def test_chunk_rule_cuda_grows_to_whole_rows_where_they_fit():
    gib = 1 << 30
    # rows of 4096 tokens fit 100 GiB free (6795 tokens): one row per chunk, for every loss
    assert fused.chunk_tokens("cuda", 151936, 2048, 100 * gib, torch.bfloat16, 4096) == 4096
    # a row length that is no multiple of 128 is rounded up (whole rows), shorter rows keep the matmul shape's 2048
    assert fused.chunk_tokens("cuda", 151936, 2048, 100 * gib, torch.bfloat16, 3000) == 3072
    assert fused.chunk_tokens("cuda", 151936, 2048, 100 * gib, torch.bfloat16, 1000) == 2048
    # rows of 8192 do not fit (6795): no partial growth, the shape rule stands; 140 GiB free (9513 tokens): they fit
    assert fused.chunk_tokens("cuda", 151936, 2048, 100 * gib, torch.bfloat16, 8192) == 2048
    assert fused.chunk_tokens("cuda", 151936, 2048, 140 * gib, torch.bfloat16, 8192) == 8192
    # a row of exactly the cap (16384 tokens, 300 GiB free) fits, one token more does not
    assert fused.chunk_tokens("cuda", 151936, 2048, 300 * gib, torch.bfloat16, 16384) == 16384
    assert fused.chunk_tokens("cuda", 151936, 2048, 300 * gib, torch.bfloat16, 16385) == 2048
    # the CPU keeps its cache-sized chunks (its tail-weight losses grow per call, in _prepare)
    assert fused.chunk_tokens("cpu", 151936, 2048, 100 * gib, torch.bfloat16, 4096) == fused.default_chunk_size(151936)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_matmul_into_a_float32_gradient_from_bf16_products(device, accumulate):
    """The gradient matmuls of the fused layer: float32 out (+)= bf16 @ bf16 in place. bf16 inputs are exact in
    float32 and float64, so against the float64 product the only error is the product's own: on CUDA one float32
    accumulation (out_dtype): ~k·u32 relative to Σ|a||b| with k = 96 terms, bounded here by 1e-5; on the CPU the
    product rounded to bf16 once (u_bf16 = 2^-8 relative to each entry) and the float32 add: 2^-8 + 1e-6."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 96, generator=g).to(device, torch.bfloat16)
    if accumulate:  # as grad_W += Gᵀ h: a transposed view
        a = torch.randn(96, 40, generator=g).to(device, torch.bfloat16).T
    b = torch.randn(96, 24, generator=g).to(device, torch.bfloat16)
    out0 = torch.randn(40, 24, generator=g).to(device)
    out = out0.clone()
    fused._matmul_into(out, a, b, accumulate=accumulate)
    prod = a.double() @ b.double()
    ref = out0.double() + prod if accumulate else prod
    scale = a.double().abs() @ b.double().abs()
    err = ((out.double() - ref).abs() / scale).max().item()
    assert out.dtype == torch.float32 and err <= (1e-5 if device == "cuda" else 2.0 ** -8 + 1e-6)
    # into a row slice of a larger buffer (grad_h[a:b]): the rest untouched
    big = torch.zeros(50, 24, device=device)
    fused._matmul_into(big[5:45], a, b, accumulate=False)
    assert torch.equal(big[:5], torch.zeros_like(big[:5])) and torch.equal(big[45:], torch.zeros_like(big[45:]))
    assert ((big[5:45].double() - prod).abs() / scale).max().item() <= (1e-5 if device == "cuda" else 2.0 ** -8 + 1e-6)


def test_run_loss_chunk_fixes_whole_rows_of_seq_len_on_cuda(monkeypatch):
    """The training run's chunk (prepare.run_loss_chunk): on CUDA the rule of fused.device_chunk told the row length
    data.seq_len (so TAD's rows are whole chunks where memory allows); train.loss_chunk_size wins; the CPU keeps
    its per-call rule (None)."""
    from types import SimpleNamespace

    from tailkd.config import DistillConfig
    from tailkd.prepare import run_loss_chunk

    seen = []
    monkeypatch.setattr(fused, "device_chunk", lambda *a: seen.append(a) or 4096)
    student = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(hidden_size=64)))
    cfg = DistillConfig()
    cfg.data.seq_len, cfg.train.precision = 4000, "bf16"
    assert run_loss_chunk(cfg, 1000, student, torch.device("cuda")) == 4096
    assert seen == [(torch.device("cuda"), 1000, 64, torch.bfloat16, 4000)]
    assert run_loss_chunk(cfg, 1000, student, torch.device("cpu")) is None
    cfg.train.loss_chunk_size = 512
    assert run_loss_chunk(cfg, 1000, student, torch.device("cuda")) == 512 and len(seen) == 1


def test_run_log_states_the_chunk_the_cpu_layer_uses():
    """The run log's chunk (prepare.loss_layer_text, CPU, no train.loss_chunk_size) is the longest chunk the fused
    layer plans for rows of data.seq_len tokens: the cache-sized default, and for TAD against the online teacher
    (or a cache of hidden states) chunks grown to whole sequences; a top-K cache gives TAD its ᾱ, no growth."""
    from tailkd.config import DistillConfig
    from tailkd.prepare import loss_layer_text

    V, T, d = 65536, 1000, 4  # default chunk 2^24 / V = 256 tokens; whole rows of 1000 fit 2^28 / V = 4096
    g = torch.Generator().manual_seed(0)
    h_s, h_t = torch.randn(2, T, d, generator=g), torch.randn(2, T, d, generator=g)
    w = torch.randn(V, d, generator=g)
    labels = torch.randint(0, V, (2, T), generator=g)

    def planned(name, div_weight=1.0):
        d_ = computed_divergence(LossConfig(name=name, k=10, div_weight=div_weight))
        _, plan = fused._prepare(h_s, Head(w, None, HeadSpec(V)), labels, d_, h_t, Head(w, None, HeadSpec(V)),
                                 None, None, None, None, None)
        return max(b - a for a, b in plan.chunks)

    def logged(name, sparse=False, div_weight=1.0, seq_len=T):
        cfg = DistillConfig()
        cfg.loss.name, cfg.loss.div_weight, cfg.data.seq_len = name, div_weight, seq_len
        return loss_layer_text(cfg, True, V, torch.device("cpu"), None, sparse)

    assert planned("kd") == 256 and "chunks of 256 tokens" in logged("kd")
    assert planned("tad") == T and f"chunks of up to {T} tokens (whole sequences)" in logged("tad")
    assert "chunks of 256 tokens" in logged("tad", sparse=True)
    # a divergence of weight 0 is not computed (objective.computed_divergence): no ᾱ, no growth
    assert planned("tad", div_weight=0.0) == 256 and "chunks of 256 tokens" in logged("tad", div_weight=0.0)
    # rows shorter than the default chunk: the chunk stays the default (several rows each), nothing grows
    assert "chunks of 256 tokens," in logged("tad", seq_len=100)


def test_matmul_into_falls_back_where_addmm_has_no_out_dtype(monkeypatch):
    """Where addmm's float32 out_dtype is unavailable (a torch without it: imitated, on the CPU told to try it), the
    product is taken the plain way, once and from then on for that device."""
    real = torch.addmm

    def old_addmm(*args, **kwargs):
        if "out_dtype" in kwargs:
            raise TypeError("addmm() got an unexpected keyword argument 'out_dtype'")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", old_addmm)
    monkeypatch.setattr(fused, "_WIDE_OUT", {"cuda", "cpu"})
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    b = torch.randn(5, 4, generator=g).to(torch.bfloat16)
    out = torch.ones(6, 4)
    fused._matmul_into(out, a, b, accumulate=True)
    torch.testing.assert_close(out, 1 + (a @ b).float(), rtol=0, atol=0)  # exactly the plain way's result
    assert fused._WIDE_OUT == {"cuda"}


def test_bad_segment_ids_are_refused_alike_dense_and_chunked():
    """TAD per document: the chunked layer numbers the sequences with the dense path's `losses.sequence_index`, so a
    float (or misshapen) ``segment_ids`` is the same one-line ValueError on both paths, not accepted by one."""
    h_s, w_s, b_s, spec_s, h_t, head_t, labels, seg = _inputs(torch.float64)
    cfg = LossConfig(name="tad", k=4, per_document=True)
    for bad in (seg.double(), seg[:, :-1]):
        for run in (_dense, lambda *a: _fused(*a, None)):
            with pytest.raises(ValueError, match="segment_ids must be an integer tensor"):
                run(cfg, h_s, w_s, b_s, spec_s, h_t, head_t, labels, bad)


def test_a_label_equal_to_the_vocabulary_size_is_refused():
    """Labels are ids in [0, V): one equal to V (a row of the padded head, past the vocabulary) is the layer's one-line
    ValueError, as is V + 1; V - 1 is a label."""
    h_s, w_s, b_s, spec_s, h_t, head_t, labels, _ = _inputs(torch.float64)  # V = 37 of 40 head rows
    cfg = LossConfig(name="kd")
    for bad in (37, 38):
        wrong = labels.clone()
        wrong[2, 5] = bad
        with pytest.raises(ValueError, match=r"^labels must be token ids in \[0, 37\) or -100$"):
            chunked_objective(h_s, Head(w_s, b_s, spec_s), wrong, 5, cfg=cfg, teacher_hidden=h_t, teacher_head=head_t,
                              chunk_size=4)
    last = labels.clone()
    last[2, 5] = 36
    chunked_objective(h_s, Head(w_s, b_s, spec_s), last, 5, cfg=cfg, teacher_hidden=h_t, teacher_head=head_t,
                      chunk_size=4)


def test_whole_sequence_chunks_grow_to_the_longest_row_of_valid_tokens():
    """TAD on the CPU grows its chunks to whole sequences: to the longest row's VALID tokens (masked ones are dropped
    before chunking), not to the row length. Three rows of 300 valid of 1000 tokens: chunks of 300 (one row each);
    grown to 1000 they would hold all three rows in one chunk."""
    V, T, d = 65536, 1000, 4  # default chunk 2^24 / V = 256 tokens < 300 valid per row < 2^28 / V = 4096
    g = torch.Generator().manual_seed(0)
    h_s, h_t = torch.randn(3, T, d, generator=g), torch.randn(3, T, d, generator=g)
    w = torch.randn(V, d, generator=g)
    labels = torch.randint(0, V, (3, T), generator=g)
    labels[:, 300:] = IGNORE_INDEX
    d_ = computed_divergence(LossConfig(name="tad", k=10))
    _, plan = fused._prepare(h_s, Head(w, None, HeadSpec(V)), labels, d_, h_t, Head(w, None, HeadSpec(V)),
                             None, None, None, None, None)
    assert plan.chunks == [(0, 300), (300, 600), (600, 900)]


def test_no_gradient_matmul_runs_under_no_grad(monkeypatch):
    """Under torch.no_grad the layer computes values only: no gradient matmul (`_matmul_into`), though the hidden states
    and the head weight require grad; with gradients on, each chunk runs them."""
    h_s, w_s, b_s, spec_s, h_t, head_t, labels, _ = _inputs(torch.float64)
    calls = []
    real = fused._matmul_into
    monkeypatch.setattr(fused, "_matmul_into", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    a, w, b = _leaf(h_s), _leaf(w_s), _leaf(b_s)
    cfg = LossConfig(name="kd")
    with torch.no_grad():
        terms = chunked_objective(a, Head(w, b, spec_s), labels, 5, cfg=cfg, teacher_hidden=h_t, teacher_head=head_t,
                                  chunk_size=4)
    assert calls == [] and not terms.loss.requires_grad
    chunked_objective(a, Head(w, b, spec_s), labels, 5, cfg=cfg, teacher_hidden=h_t, teacher_head=head_t, chunk_size=4)
    assert len(calls) == 2 * 6  # ∂h and ∂W per chunk: 22 valid tokens in chunks of at most 4
