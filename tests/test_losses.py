"""tailkd.losses against the independent float64 reference (tests/reference.py), closed-form gradients, identities,
masking, numerics and argument validation."""

import math

import bounds as B
import loss_bounds as LB
import pytest
import reference as R
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tailkd import baselines as BL
from tailkd import losses as L
from tailkd.divergences import teacher_top_ids

FAST = settings(max_examples=12, deadline=None, derandomize=True)
INF = float("inf")


@st.composite
def cases(draw, min_vocab=3, max_vocab=20):
    """Random shapes/knobs; tensors come from a drawn seed so examples stay cheap to generate and to shrink."""
    vocab = draw(st.integers(min_vocab, max_vocab))
    return {
        "seed": draw(st.integers(0, 2**31 - 1)),
        "B": draw(st.integers(1, 3)),
        "T": draw(st.integers(1, 4)),
        "V": vocab,
        "k": draw(st.integers(1, vocab - 1)),
        "scale": draw(st.sampled_from([0.3, 2.0, 8.0])),
        "temperature": draw(st.sampled_from([1.0, 0.5, 2.5])),
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])),
    }


def make(c, *, mask_some=True):
    gen = torch.Generator().manual_seed(c["seed"])
    shape = (c["B"], c["T"], c["V"])
    s = (torch.randn(shape, generator=gen, dtype=torch.float64) * c["scale"]).to(c["dtype"])
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * c["scale"]).to(c["dtype"])
    mask = torch.rand(shape[:2], generator=gen) < 0.75 if mask_some else torch.ones(shape[:2], dtype=torch.bool)
    weight = torch.rand(shape[:2], generator=gen, dtype=torch.float64) + 0.5  # non-uniform upstream gradient
    labels = torch.randint(0, c["V"], shape[:2], generator=gen)
    return s, t, mask, weight, labels


F64_TOL = {"rtol": 1e-9, "atol": 1e-10}  # float64 vs the float64 reference (a glance: u64 ~ 1e-16)


def value_grad(fn, s, weight):
    """fn(x) and d(Σ weight·fn(x))/dx at x = s."""
    x = s.detach().clone().requires_grad_(True)
    out = fn(x)
    if not out.requires_grad:  # e.g. the reference at all-ignored positions: a constant
        return out.detach(), torch.zeros_like(x)
    (grad,) = torch.autograd.grad((out.double() * weight).sum(), x, allow_unused=True)
    return out.detach(), torch.zeros_like(x) if grad is None else grad


def assert_matches(fn, ref_fn, s, weight, dtype, bound, temperature=1.0):
    """fn vs the float64 reference, values and gradients. float32: within `bound()` = (per-token value bound, per-entry
    gradient bound wrt the scaled logits) of loss_bounds (the library's float32 operations, first order, SAFETY 2);
    the gradient wrt the raw logits is that times the upstream weight and 1/τ."""
    got, got_grad = value_grad(fn, s, weight)
    want, want_grad = value_grad(lambda x: ref_fn(R.f64(x)), s.double(), weight)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype == torch.float64:
        torch.testing.assert_close(got.double(), want, **F64_TOL)
        torch.testing.assert_close(got_grad.double(), want_grad, **F64_TOL)
        return
    value_bound, grad_bound = bound()
    B.assert_within(got, want, value_bound + B.REF64_ATOL, msg="value")
    B.assert_within(got_grad, want_grad, grad_bound * (weight / temperature)[..., None] + B.REF64_ATOL, msg="gradient")


# --------------------------------------------------------------------------- value and gradient vs reference


@FAST
@given(cases())
def test_forward_and_reverse_kl_match_reference(c):
    s, t, _, w, _ = make(c)
    tau = c["temperature"]
    assert_matches(lambda x: L.forward_kl(x, t, temperature=tau), lambda x: R.forward_kl(x, t, tau), s, w, c["dtype"],
                   lambda: LB.forward_kl(s, t, tau), tau)
    assert_matches(lambda x: L.reverse_kl(x, t, temperature=tau), lambda x: R.reverse_kl(x, t, tau), s, w, c["dtype"],
                   lambda: LB.reverse_kl(s, t, tau), tau)


@FAST
@given(cases())
def test_tvd_matches_reference(c):
    """TVD, added through the registry only (one function, one row): value and gradient vs the float64 reference."""
    s, t, _, w, _ = make(c)
    tau = c["temperature"]
    assert_matches(lambda x: BL.tvd(x, t, temperature=tau), lambda x: R.tvd(x, t, tau), s, w, c["dtype"],
                   lambda: LB.tvd(s, t, tau), tau)


def test_tvd_identities():
    """0 <= TVD <= 1, symmetric, 0 iff p = q, and 1 for disjoint supports."""
    gen = torch.Generator().manual_seed(12)
    s = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    t = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    v = BL.tvd(s, t)
    assert ((v >= 0) & (v <= 1)).all() and torch.equal(v, BL.tvd(t, s))
    assert torch.equal(BL.tvd(s, s.clone()), torch.zeros(7, dtype=torch.float64))  # the same softmax, exactly 0
    disjoint = torch.tensor([[0.0, -torch.inf], [-torch.inf, 0.0]], dtype=torch.float64)
    assert BL.tvd(disjoint[:1], disjoint[1:]).item() == 1.0


@FAST
@given(cases(), st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
def test_jsd_matches_reference(c, beta):
    s, t, _, w, _ = make(c)
    tau = c["temperature"]
    assert_matches(
        lambda x: L.jsd(x, t, beta=beta, temperature=tau), lambda x: R.jsd(x, t, beta, tau), s, w, c["dtype"],
        lambda: LB.jsd(s, t, beta, tau), tau,
    )


@pytest.mark.parametrize("gap", [66.0, 120.0, 400.0, 800.0])
def test_tad_with_teacher_tails_below_float32_and_float64_range_within_its_bound(gap):
    """Teacher tails `gap` nats below its top 3: α^T near 1e-30 (66), below float32's range (120, 400: the library's
    log-space rows) and below float64's (800: ᾱ too, β(X)·α^T = β·exp(log α^T − log ᾱ) ~ β). `loss_bounds.tad`
    bounds these rows by their log-space computation (W·KL(p̃‖q̃)); its linear-space count alone was ~10⁴× too small
    for the gradient at 800 and meaningless (β/ᾱ ~ 1e50 times sub-normal p_i) in between."""
    g = torch.Generator().manual_seed(0)
    n, vocab, k = 6, 257, 3
    s = torch.randn(1, n, vocab, generator=g) * 2
    t = torch.randn(1, n, vocab, generator=g) * 2
    t = t.scatter_add(-1, torch.topk(t, k).indices, torch.full((1, n, k), gap))
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, 4] = False
    w = torch.rand(1, n, generator=g) + 0.5
    assert_matches(lambda x: L.tad(x, t, mask, k=k, beta=2.0), lambda x: R.tad(x, t, mask, k, 2.0), s, w,
                   torch.float32, lambda: LB.tad(s, t, mask, k, 2.0))
    value_bound = LB.tad(s, t, mask, k, 2.0)[0]
    assert value_bound.max() < 0.05  # a bound that can fail: errors ~1e-4 here, values ~10


@FAST
@given(cases(), st.sampled_from([0.0, 0.5, 2.0, 5.0]), st.booleans())
def test_tad_matches_reference(c, beta, packed):
    s, t, mask, w, _ = make(c)
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    seg = torch.randint(0, 2, mask.shape, generator=gen).cumsum(1) if packed else None  # documents inside rows
    tau, k = c["temperature"], c["k"]
    assert_matches(
        lambda x: L.tad(x, t, mask, k=k, beta=beta, segment_ids=seg, temperature=tau),
        lambda x: R.tad(x, t, mask, k, beta, segment_ids=seg, temperature=tau),
        s,
        w,
        c["dtype"],
        lambda: LB.tad(s, t, mask, k, beta, segment_ids=seg, temperature=tau),
        tau,
    )


@FAST
@given(cases())
def test_tad_decompose_matches_reference(c):
    s, t, _, w, _ = make(c)
    tau, k = c["temperature"], c["k"]
    alpha = L.tad_decompose(s.requires_grad_(True), t, k=k, temperature=tau)[2]
    assert not alpha.requires_grad  # teacher-only
    want_alpha = R.tad_decompose(s.detach().double(), t, k, tau)[2]
    if c["dtype"] == torch.float64:
        torch.testing.assert_close(alpha.double(), want_alpha, **F64_TOL)
    else:  # exp(lse_tail − lse): relative error of two log-sum-exps (u·M each), plus 2^-149 if sub-normal
        B.assert_within(alpha, want_alpha, LB.tad_decompose(s, t, k, tau)[2], msg="alpha")
    for part in range(2):
        assert_matches(
            lambda x, part=part: L.tad_decompose(x, t, k=k, temperature=tau)[part],
            lambda x, part=part: R.tad_decompose(x, t, k, tau)[part],
            s,
            w,
            c["dtype"],
            lambda part=part: LB.tad_decompose(s, t, k, tau)[part],
            tau,
        )


@FAST
@given(cases(), st.sampled_from([(1.0, 8.0), (0.5, 2.0), (2.0, 0.0)]))
def test_dkd_matches_reference(c, alpha_beta):
    s, t, _, w, labels = make(c)
    labels[0, 0] = -100
    a, b = alpha_beta
    tau = c["temperature"]
    assert_matches(
        lambda x: L.dkd(x, t, labels, alpha=a, beta=b, temperature=tau),
        lambda x: R.dkd(x, t, labels, a, b, tau),
        s,
        w,
        c["dtype"],
        lambda: LB.dkd(s, t, labels, a, b, tau),
        tau,
    )


def test_dkd_defaults_are_the_dkd_papers_alpha_1_beta_8():
    """`dkd`'s docstring: defaults α = 1, β = 8 (the DKD paper's), τ = 1: the call without them is the call with them,
    bit for bit (the same float32 operations). A default β of 1 survived (mutation audit)."""
    s, t, _, _, labels = make({"seed": 3, "B": 2, "T": 4, "V": 11, "scale": 2.0, "dtype": torch.float32})
    assert torch.equal(L.dkd(s, t, labels), L.dkd(s, t, labels, alpha=1.0, beta=8.0, temperature=1.0))
    assert not torch.equal(L.dkd(s, t, labels), L.dkd(s, t, labels, alpha=1.0, beta=1.0))  # β counts here


def test_drkl_teacher_argmax_anchor_is_the_argmax_of_the_teacher_logits():
    # p is monotone in the logits, so argmax p = argmax of the logits; dividing by the temperature first rounds two
    # logits one ulp apart (1.9 and the next float32, at T = 0.9) into a tie, and argmax then took the first
    a = torch.tensor(1.9)
    t = torch.stack([a, torch.nextafter(a, torch.tensor(2.0)), torch.tensor(-1.0)])[None]  # [1, 3]
    assert (t[0, 0] / 0.9) == (t[0, 1] / 0.9)  # the tie the division makes (else the test proves nothing)
    s = torch.tensor([[0.3, -0.2, 0.5]])
    labels = torch.tensor([1])
    got = L.drkl(s, t, labels, gamma=0.5, anchor="teacher_argmax", temperature=0.9)
    assert torch.equal(got, L.drkl(s, t, labels, gamma=0.5, anchor="label", temperature=0.9))
    assert not torch.equal(got, L.drkl(s, t, torch.tensor([0]), gamma=0.5, anchor="label", temperature=0.9))


@FAST
@given(cases(), st.sampled_from([0.0, 0.5, 3.0]), st.sampled_from(["label", "teacher_argmax"]))
def test_drkl_matches_reference(c, gamma, anchor):
    s, t, _, w, labels = make(c)
    labels[-1, -1] = -100
    tau = c["temperature"]
    assert_matches(
        lambda x: L.drkl(x, t, labels, gamma=gamma, anchor=anchor, temperature=tau),
        lambda x: R.drkl(x, t, labels, gamma, anchor, tau),
        s,
        w,
        c["dtype"],
        lambda: LB.drkl(s, t, labels, gamma, anchor, tau),
        tau,
    )


@FAST
@given(cases())
def test_topk_bucket_kl_matches_reference_and_d_kl1(c):
    s, t, _, w, _ = make(c)
    k = c["k"]
    ids = torch.topk(t, k).indices
    logprobs = torch.log_softmax(t.double(), -1).gather(-1, ids).to(c["dtype"])
    assert_matches(
        lambda x: L.topk_bucket_kl(x, ids, logprobs), lambda x: R.topk_bucket_kl(x, ids, logprobs), s, w, c["dtype"],
        lambda: LB.topk_bucket_kl(s, ids, logprobs),
    )
    d1, grad_d1 = value_grad(lambda x: L.tad_decompose(x, t, k=k)[0], s, w)
    got, grad = value_grad(lambda x: L.topk_bucket_kl(x, ids, logprobs), s, w)
    if c["dtype"] == torch.float64:
        torch.testing.assert_close(got, d1, **F64_TOL)
        torch.testing.assert_close(grad, grad_d1, **F64_TOL)
        return
    # two float32 evaluations of D_KL1: the sum of their bounds, plus the cached log-probs' own float32 rounding
    # (u|log p_k| each), which moves Σ p_k log p_k/q_k by u Σ p_k|log p_k|(|log p_k/q_k| + 1) and α^T (hence the bucket)
    # by u Σ p_k|log p_k| times |log α^T/α^S| + 1
    (v_sparse, g_sparse), ((v_dense, g_dense), _, _) = LB.topk_bucket_kl(s, ids, logprobs), LB.tad_decompose(s, t, k)
    d_logprobs = input_logprob_rounding(s, ids, logprobs)
    B.assert_within(got, d1, v_sparse + v_dense + d_logprobs, msg="value")
    B.assert_within(grad, grad_d1, (g_sparse + g_dense) * w[..., None] + d_logprobs[..., None], msg="gradient")


def input_logprob_rounding(s, ids, logprobs):
    """SAFETY × the first-order change of D_KL1 (and bound on its gradient, per entry <= this) when the top-K
    log-probabilities are rounded to float32 (each by u|log p_k|)."""
    lp = logprobs.double()
    lq = torch.log_softmax(s.double(), -1).gather(-1, ids)
    p = lp.exp()
    shift = B.U32 * p * lp.abs()  # |Δp_k| per entry
    alpha = (-torch.expm1(torch.logsumexp(lp, -1))).clamp_min(1e-300)
    tail = s.double().scatter(-1, ids, -INF)
    log_ratio = (alpha.log() - (torch.logsumexp(tail, -1) - torch.logsumexp(s.double(), -1))).abs()
    return B.SAFETY * ((shift * ((lp - lq).abs() + 2)).sum(-1) + shift.sum(-1) * (log_ratio + 1))


def test_topk_bucket_kl_accepts_stored_tail_mass():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 9, generator=gen, dtype=torch.float64), torch.randn(4, 9, generator=gen, dtype=torch.float64)
    ids = torch.topk(t, 3).indices
    logp = torch.log_softmax(t, -1)
    alpha = logp.exp().scatter(-1, ids, 0.0).sum(-1)
    got = L.topk_bucket_kl(s, ids, logp.gather(-1, ids), teacher_tail_mass=alpha)
    torch.testing.assert_close(got, L.tad_decompose(s, t, k=3)[0], rtol=1e-12, atol=1e-12)


def test_topk_bucket_kl_with_cached_logprobs_summing_above_one():
    """A teacher whose top-K holds all its mass, cached with log-probs rounded up (Σ_k p_k = 1 + 1e-9, as float32
    rounding of log p_k ≈ 0 gives): 1 − Σ p_k < 0 is rounding, α^T is 0 (clamped), the bucket is absent and the
    value is Σ_k p_k log(p_k/q_k), finite, not log of a negative mass (NaN). float64: the reference drops the
    bucket for α^T <= 0 alike (F64_TOL: u64-level rounding of a handful of terms)."""
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[0, 3], [6, 1], [2, 5]])
    logprobs = torch.log(torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.999, 0.001]], dtype=torch.float64)) + 1e-9
    assert (torch.logsumexp(logprobs, -1) > 0).all()  # Σ p_k > 1: the case meant
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    got, got_grad = value_grad(lambda x: L.topk_bucket_kl(x, ids, logprobs), s, w)
    want, want_grad = value_grad(lambda x: R.topk_bucket_kl(x, ids, logprobs), s, w)
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, **F64_TOL)
    torch.testing.assert_close(got_grad, want_grad, **F64_TOL)


@FAST
@given(cases(min_vocab=2, max_vocab=6), st.booleans())
def test_hidden_cosine_matches_reference(c, project):
    gen = torch.Generator().manual_seed(c["seed"])
    d_s, d_t = c["V"], c["V"] + c["k"]
    h_s = torch.randn(c["B"], c["T"], d_s, generator=gen, dtype=torch.float64).to(c["dtype"])
    h_t = torch.randn(c["B"], c["T"], d_t, generator=gen, dtype=torch.float64).to(c["dtype"])
    mask = torch.rand(c["B"], c["T"], generator=gen) < 0.7
    w = torch.rand(c["B"], c["T"], generator=gen, dtype=torch.float64)
    weight = torch.randn(d_t, d_s, generator=gen, dtype=torch.float64).to(c["dtype"]) if project else None
    assert_matches(
        lambda x: L.hidden_cosine(x, h_t, mask, projection=weight),
        lambda x: R.hidden_cosine(x, h_t, mask, weight),
        h_s,
        w,
        c["dtype"],
        lambda: LB.hidden_cosine(h_s, h_t, mask, weight),
    )


def test_hidden_cosine_projection_module_and_widths():
    gen = torch.Generator().manual_seed(0)
    h_s, h_t = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 6, generator=gen)
    mask = torch.ones(2, 3, dtype=torch.bool)
    proj = torch.nn.Linear(4, 6, bias=False)
    # the module and its weight run the same F.linear on the same float32 tensors: deterministic, bit-identical
    assert torch.equal(
        L.hidden_cosine(h_s, h_t, mask, projection=proj), L.hidden_cosine(h_s, h_t, mask, projection=proj.weight)
    )
    L.hidden_cosine(h_s, h_t, mask, projection=proj).sum().backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
    same = L.hidden_cosine(h_t[..., :4], h_t, mask)  # truncated teacher coordinates: identical vectors
    B.assert_within(same, torch.zeros(2, 3), LB.hidden_cosine(h_t[..., :4], h_t, mask)[0], msg="1 − cos(a, a)")
    # the teacher's hidden states are a target, as its logits are: a teacher tensor that requires grad gets none
    student, teacher = h_s.clone().requires_grad_(True), h_t.clone().requires_grad_(True)
    for projection in (None, proj, proj.weight):
        L.hidden_cosine(student, teacher, mask, projection=projection).sum().backward()
        assert teacher.grad is None and student.grad is not None


# --------------------------------------------------------------------------- gradcheck (float64, small)


def test_gradcheck_every_loss():
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64) * 2
    mask = torch.tensor([[True, True, False], [True, False, True]])
    seg = torch.tensor([[0, 1, 1], [0, 0, 0]])
    labels = torch.tensor([[1, -100, 5], [0, 2, 3]])
    ids = torch.topk(t, 2).indices
    logprobs = torch.log_softmax(t, -1).gather(-1, ids)
    stored_alpha = 1.5 * -torch.expm1(torch.logsumexp(logprobs, -1))
    checks = {
        "forward_kl": lambda x: L.forward_kl(x, t, temperature=1.7),
        "reverse_kl": lambda x: L.reverse_kl(x, t),
        "jsd": lambda x: L.jsd(x, t, beta=0.3),
        "tad": lambda x: L.tad(x, t, mask, k=2, beta=2.0),
        "tad_segments": lambda x: L.tad(x, t, mask, k=3, beta=5.0, segment_ids=seg, temperature=0.7),
        "tad_decompose": lambda x: L.tad_decompose(x, t, k=2),
        "dkd": lambda x: L.dkd(x, t, labels, alpha=1.0, beta=8.0, temperature=2.0),
        "drkl": lambda x: L.drkl(x, t, labels, gamma=0.5),
        "drkl_argmax": lambda x: L.drkl(x, t, None, gamma=0.5, anchor="teacher_argmax"),
        "tvd": lambda x: BL.tvd(x, t, temperature=1.3),
        "topk_bucket_kl": lambda x: L.topk_bucket_kl(x, ids, logprobs),
        # a stored α^T that is not 1 − Σ p_k (another precision than the log-probs): the gradient must be that of
        # the value computed with it, c·q_k − p_k with c = Σ p_k + α^T, not the c = 1 of a consistent cache
        "topk_bucket_kl_stored_mass": lambda x: L.topk_bucket_kl(x, ids, logprobs, teacher_tail_mass=stored_alpha),
        "hidden_cosine": lambda x: L.hidden_cosine(x, t, mask),
    }
    for name, fn in checks.items():
        assert torch.autograd.gradcheck(fn, (s,)), name
    weight = torch.randn(8, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, wt: L.hidden_cosine(x, h_t, mask, projection=wt), (s, weight))


# --------------------------------------------------------------------------- identities and closed-form gradients


@FAST
@given(cases())
def test_kl_equals_d_kl1_plus_alpha_d_kl2(c):
    s, t, _, _, _ = make(c)
    s, t = s.double(), t.double()
    d1, d2, alpha = L.tad_decompose(s, t, k=c["k"])
    assert (d1 + alpha * d2 - L.forward_kl(s, t)).abs().max() <= 1e-10


def _probs_and_split(s, t, k):
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, torch.topk(t, k).indices, True)
    alpha_t = torch.where(in_top, 0.0, p).sum(-1, keepdim=True)
    alpha_s = torch.where(in_top, 0.0, q).sum(-1, keepdim=True)
    return q, p, in_top, alpha_t, alpha_s


@FAST
@given(cases(), st.sampled_from([0.5, 2.0, 10.0]))
def test_tad_gradient_is_eq6_and_autograd_of_plain_formula(c, beta):
    s, t, mask, _, _ = make(c, mask_some=False)
    s, t, k = s.double(), t.double(), c["k"]
    x = s.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(L.tad(x, t, mask, k=k, beta=beta).sum(), x)
    q, p, in_top, alpha_t, alpha_s = _probs_and_split(s, t, k)
    beta_x = (beta / alpha_t.squeeze(-1).mean(1))[:, None, None]  # one sequence per row, all tokens valid
    eq6 = (q - p) + (beta_x - 1) * (q * alpha_t / alpha_s - p)
    torch.testing.assert_close(got, torch.where(in_top, q - p, eq6), rtol=1e-10, atol=1e-12)
    d1, d2, alpha = L.tad_decompose(x, t, k=k)
    plain = d1 + beta_x[..., 0].detach() * alpha * d2  # Eq. 3 through plain autograd
    (want,) = torch.autograd.grad(plain.sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@FAST
@given(cases())
def test_d_kl1_gradient_is_eq12(c):
    s, t, _, _, _ = make(c)
    s, t, k = s.double(), t.double(), c["k"]
    x = s.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(L.tad_decompose(x, t, k=k)[0].sum(), x)
    q, p, in_top, alpha_t, alpha_s = _probs_and_split(s, t, k)
    tail = q * ((1 - alpha_t) - (1 - alpha_s)) / alpha_s
    assert (got - (q - p))[in_top].abs().max() <= 1e-12  # top-K logits get exactly q − p
    torch.testing.assert_close(got[~in_top], tail[~in_top], rtol=1e-10, atol=1e-12)


@FAST
@given(cases(), st.sampled_from([0.5, 2.0]))
def test_tad_with_unit_beta_x_is_forward_kl(c, beta):
    s, t, mask, w, _ = make(c)
    k, tau = c["k"], c["temperature"]
    ones = torch.full(mask.shape, beta, dtype=torch.float64)  # ᾱ = β  =>  β(X) = 1
    got, got_grad = value_grad(lambda x: L.tad(x, t, mask, k=k, beta=beta, seq_alpha_mean=ones, temperature=tau), s, w)
    want, want_grad = value_grad(lambda x: torch.where(mask, L.forward_kl(x, t, temperature=tau), 0.0), s, w)
    if c["dtype"] == torch.float64:
        torch.testing.assert_close(got, want, **F64_TOL)
        torch.testing.assert_close(got_grad, want_grad, **F64_TOL)
        return
    # two float32 evaluations of the same KL: each within its own bound of the exact value
    v_tad, g_tad = LB.tad(s, t, mask, k, beta, seq_alpha_mean=ones, temperature=tau)
    v_kl, g_kl = LB.forward_kl(s, t, tau)
    B.assert_within(got, want, v_tad + torch.where(mask, v_kl, 0.0), msg="value")
    g_bound = (g_tad + torch.where(mask[..., None], g_kl, 0.0)) * (w / tau)[..., None]
    B.assert_within(got_grad, want_grad, g_bound, msg="gradient")


@FAST
@given(cases(), st.sampled_from(["label", "teacher_argmax"]))
def test_drkl_with_gamma_one_minus_qy_is_reverse_kl(c, anchor):
    s, t, _, w, labels = make(c)
    s, t = s.double(), t.double()
    y = labels if anchor == "label" else t.argmax(-1)

    def rebuilt(x):  # KL(b^q‖b^p) + (1 − q_y) KL(q̂‖p̂), the two terms read off drkl by linearity in γ
        binary = L.drkl(x, t, labels, gamma=0.0, anchor=anchor)
        nontarget = L.drkl(x, t, labels, gamma=1.0, anchor=anchor) - binary
        q_y = torch.softmax(x, -1).gather(-1, y[..., None]).squeeze(-1)
        return binary + (1 - q_y) * nontarget

    got, got_grad = value_grad(rebuilt, s, w)
    want, want_grad = value_grad(lambda x: L.reverse_kl(x, t), s, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)
    # γ·KL(q̂‖p̂) does not push the anchor logit: its gradient at z_y is exactly 0
    _, g_nontarget = value_grad(
        lambda x: L.drkl(x, t, labels, gamma=1.0, anchor=anchor) - L.drkl(x, t, labels, gamma=0.0, anchor=anchor), s, w
    )
    assert g_nontarget.gather(-1, y[..., None]).abs().max() <= 1e-12


@FAST
@given(cases())
def test_dkd_parts_rebuild_forward_kl(c):
    s, t, _, w, labels = make(c)
    s, t = s.double(), t.double()

    def rebuilt(x):  # KL(b^p‖b^q) + (1 − p_y) KL(p̂‖q̂)
        p_y = torch.softmax(t, -1).gather(-1, labels[..., None]).squeeze(-1)
        return L.dkd(x, t, labels, alpha=1.0, beta=0.0) + (1 - p_y) * L.dkd(x, t, labels, alpha=0.0, beta=1.0)

    got, got_grad = value_grad(rebuilt, s, w)
    want, want_grad = value_grad(lambda x: L.forward_kl(x, t), s, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


def test_jsd_endpoints_limits_and_symmetry():
    gen = torch.Generator().manual_seed(11)
    s, t = (
        torch.randn(5, 13, generator=gen, dtype=torch.float64),
        torch.randn(5, 13, generator=gen, dtype=torch.float64),
    )
    assert torch.equal(L.jsd(s, t, beta=0.0), L.forward_kl(s, t))
    assert torch.equal(L.jsd(s, t, beta=1.0), L.reverse_kl(s, t))
    eps = 1e-7  # endpoints are the limits of JSD_β rescaled: JSD_β/β -> KL(p‖q), JSD_β/(1−β) -> KL(q‖p)
    torch.testing.assert_close(L.jsd(s, t, beta=eps) / eps, L.forward_kl(s, t), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(L.jsd(s, t, beta=1 - eps) / eps, L.reverse_kl(s, t), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(L.jsd(s, t, beta=0.5), L.jsd(t, s, beta=0.5), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(L.jsd(s, t, beta=0.3), L.jsd(t, s, beta=0.7), rtol=1e-12, atol=1e-14)


def jsd_underflow_logits(vocab: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) [4, V] float32: rows where one side's float32 probability of entry V − 1 is the smallest sub-normal,
    2^-149 (logit −149 ln 2 + log Σ_{i<V−1} e^(z_i)), and the other side's is 0 (logit −200):
    the mixture m = β p + (1 − β) q of that entry, rounded in float32, is 0.5·2^-149 (β = 0.5) or 0.3·2^-149 (β = 0.3,
    p side), which rounds to 0, although JSD_β is bounded (by log 2). Rows 0-1: the student's side, rows 2-3: the
    teacher's; rows 1 and 3 add a spread of ordinary logits."""
    s = torch.zeros(4, vocab, dtype=torch.float64)
    t = torch.zeros(4, vocab, dtype=torch.float64)
    s[:, 2:-1] = t[:, 2:-1] = -30.0  # more entries, far below the two at 0
    s[1, :-1] += torch.linspace(-1, 1, vocab - 1, dtype=torch.float64)
    t[3, :-1] += torch.linspace(1, -1, vocab - 1, dtype=torch.float64)
    for x, y, rows in ((s, t, slice(0, 2)), (t, s, slice(2, 4))):
        x[rows, -1] = -149 * math.log(2) + torch.logsumexp(x[rows, :-1], -1)
        y[rows, -1] = -200.0
    return s.float(), t.float()


def _check_jsd_dense_and_row_kernel(s: torch.Tensor, t: torch.Tensor, beta: float) -> None:
    """Float32 JSD_β of ``s`` against ``t``, dense (`jsd`) and the chunked layer's row maths (`divergences.jsd_kernel`:
    forward, backward), values and gradients against the float64 reference within `loss_bounds.jsd`."""
    from tailkd import divergences as dv

    n = s.shape[0]
    w = torch.ones(n, dtype=torch.float64)
    assert_matches(lambda x: L.jsd(x, t, beta=beta), lambda x: R.jsd(x, t, beta), s, w, torch.float32,
                   lambda: LB.jsd(s, t, beta))
    kern = dv.jsd_kernel(beta)
    value, state = kern.forward(s, torch.log_softmax(s, -1), kern.teacher(t.clone()), None)
    grad = kern.backward(state, torch.ones(n), None)
    want, want_grad = value_grad(lambda x: R.jsd(R.f64(x), t, beta), s.double(), w)
    value_bound, grad_bound = LB.jsd(s, t, beta)
    B.assert_within(value, want, value_bound + B.REF64_ATOL, msg="row kernel value")
    B.assert_within(grad, want_grad, grad_bound + B.REF64_ATOL, msg="row kernel gradient")


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.9])
def test_jsd_where_the_mixture_underflows_stays_finite_and_accurate(beta):
    """JSD_β <= −β log β − (1 − β) log(1 − β) <= log 2 is finite for every pair of distributions; float32 rows whose
    mixture m underflowed to 0 where one side still had mass (`jsd_underflow_logits`) gave log m = −inf, so the value
    +inf (and NaN gradients through the student's side): a step of ordinary finite logits skipped. Dense (`jsd`) and
    the chunked layer's row maths (`divergences.jsd_kernel`: forward, backward) against the float64 reference, within
    `loss_bounds.jsd` (the rescaled m has the relative error of the ordinary one; the 2^-149 entries weigh ~1e-45)."""
    s, t = jsd_underflow_logits()
    assert (torch.softmax(s, -1)[:2, -1] == 2.0**-149).all() and (torch.softmax(t, -1)[2:, -1] == 2.0**-149).all()
    _check_jsd_dense_and_row_kernel(s, t, beta)


@pytest.mark.parametrize("beta", [1e-45, 1e-39, 1e-30, 1e-7])
def test_jsd_of_a_tiny_beta_is_computed_and_matches_reference(beta):
    """0 < β < 1 is a valid mixing weight however small: the mixture is m = β p + (1 − β) q with the scalars β and
    1 − β (the form β (p + ((1 − β)/β) q) raised torch's "cannot be converted to type float without overflow" for
    β below ~2.9e-39, where (1 − β)/β exceeds float32's range). Dense (`jsd`) and the row kernel, float32 logits
    against the float64 reference within `loss_bounds.jsd`; the value is ~β KL(p‖q), so these check the float32
    rounding of a value that is itself tiny (or sub-normal)."""
    gen = torch.Generator().manual_seed(21)
    s = (torch.randn(5, 17, generator=gen, dtype=torch.float64) * 3).float()
    t = (torch.randn(5, 17, generator=gen, dtype=torch.float64) * 3).float()
    _check_jsd_dense_and_row_kernel(s, t, beta)


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(1, 40), st.booleans())
def test_blocked_top_k_selection_equals_torch_topk(seed, k, extra_blocks, dead_columns):
    gen = torch.Generator().manual_seed(seed)
    vocab = 64 * (4 * k + extra_blocks)  # 64 | V and enough blocks: the two-stage path
    t = torch.randn(3, 2, vocab, generator=gen) * 4
    if dead_columns:
        t[..., torch.randint(0, vocab, (vocab // 3,), generator=gen)] = -INF
    got = teacher_top_ids(t, k)
    assert got.shape == (3, 2, k)
    assert torch.equal(got.sort(-1).values, torch.topk(t, k).indices.sort(-1).values)


@pytest.mark.parametrize("vocab", [8, 64 * 13])  # torch.topk path, blocked path
def test_ties_give_a_valid_top_k_set_shared_by_tad_and_tad_decompose(vocab):
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(2, 2, vocab, dtype=torch.float64, generator=gen)
    t = torch.randint(0, 3, (2, 2, vocab), generator=gen).double()  # many exact ties at the k-th value
    t[1, 1] = 1.0  # an all-tied row
    k = 3
    ids = teacher_top_ids(t, k)
    chosen, rest = t.gather(-1, ids), t.scatter(-1, ids, -INF)
    assert (chosen.min(-1).values >= rest.max(-1).values).all()  # a valid top-K set ...
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # ... of distinct ids
    got = L.tad_decompose(s, t, k=k)
    want = R.tad_decompose(s, t, k, ids=ids)
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_, rtol=1e-10, atol=1e-12)
    mask = torch.ones(2, 2, dtype=torch.bool)
    d1, d2, alpha = got
    abar = alpha.mean(1, keepdim=True)
    torch.testing.assert_close(L.tad(s, t, mask, k=k), d1 + (2.0 / abar) * alpha * d2, rtol=1e-10, atol=1e-12)


def test_tad_on_a_blocked_vocabulary_matches_reference():
    gen = torch.Generator().manual_seed(18)
    vocab = 64 * 45  # 2880: two-stage top-K for k=10
    s, t = torch.randn(1, 3, vocab, generator=gen), torch.randn(1, 3, vocab, generator=gen) * 3
    mask = torch.tensor([[True, False, True]])
    w = torch.tensor([[1.0, 1.0, 0.5]], dtype=torch.float64)
    assert_matches(lambda x: L.tad(x, t, mask, k=10), lambda x: R.tad(x, t, mask, 10, 2.0), s, w, torch.float32,
                   lambda: LB.tad(s, t, mask, 10, 2.0))


# --------------------------------------------------------------------------- masks and sequences


def test_masked_positions_get_zero_gradient_and_leave_beta_x_unchanged():
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 6, 11, generator=gen), torch.randn(2, 6, 11, generator=gen) * 3
    mask = torch.tensor([[True, False, True, True, False, True], [False, True, True, True, True, True]])
    x = s.clone().requires_grad_(True)
    out = L.tad(x, t, mask, k=3)
    out.sum().backward()
    assert (out[~mask] == 0).all() and (x.grad[~mask] == 0).all() and (x.grad[mask] != 0).any()
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = torch.randn(int((~mask).sum()), 11, generator=gen) * 50
    t2[~mask] = float("nan")  # even garbage teacher rows at masked positions must not leak
    x2 = s2.clone().requires_grad_(True)
    out2 = L.tad(x2, t2, mask, k=3)
    out2.sum().backward()
    assert torch.equal(out2, out) and torch.equal(x2.grad[mask], x.grad[mask]) and (x2.grad[~mask] == 0).all()


def test_fully_masked_sequence_is_zero_with_finite_gradients():
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 5, 9, generator=gen), torch.randn(2, 5, 9, generator=gen)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0] = False
    x = s.clone().requires_grad_(True)
    out = L.tad(x, t, mask, k=2)
    out.sum().backward()
    assert (out[0] == 0).all() and torch.isfinite(x.grad).all() and (x.grad[0] == 0).all()
    # row 1 in a batch vs alone: two float32 evaluations of the same values (reductions may be split differently)
    B.assert_within(out[1], L.tad(s[1:], t[1:], mask[1:], k=2)[0], 2 * LB.tad(s[1:], t[1:], mask[1:], 2, 2.0)[0][0],
                    msg="row 1")
    assert (L.sequence_alpha_mean(torch.rand(2, 5), mask)[0] == 0).all()


def test_segment_ids_give_per_document_beta_x_and_match_unpacked_rows():
    gen = torch.Generator().manual_seed(6)
    a_s, a_t = (
        torch.randn(3, 10, generator=gen, dtype=torch.float64),
        torch.randn(3, 10, generator=gen, dtype=torch.float64) * 4,
    )
    b_s, b_t = (
        torch.randn(4, 10, generator=gen, dtype=torch.float64),
        torch.randn(4, 10, generator=gen, dtype=torch.float64) * 0.5,
    )
    packed_s, packed_t = torch.cat([a_s, b_s])[None], torch.cat([a_t, b_t])[None]  # [1, 7, V]
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    packed = L.tad(packed_s, packed_t, torch.ones(1, 7, dtype=torch.bool), k=2, segment_ids=seg)
    pad = torch.zeros(1, 10, dtype=torch.float64)
    rows_s = torch.stack([torch.cat([a_s, pad]), b_s])  # [2, 4, V], doc A padded
    rows_t = torch.stack([torch.cat([a_t, pad]), b_t])
    row_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    separate = L.tad(rows_s, rows_t, row_mask, k=2)
    torch.testing.assert_close(packed[0], torch.cat([separate[0, :3], separate[1]]), rtol=1e-12, atol=1e-12)
    whole_row = L.tad(packed_s, packed_t, torch.ones(1, 7, dtype=torch.bool), k=2)
    assert not torch.allclose(packed, whole_row)  # documents differ in ᾱ, so the row-level β(X) is different
    alpha = L.tad_decompose(packed_s, packed_t, k=2)[2]
    abar = L.sequence_alpha_mean(alpha, torch.ones(1, 7, dtype=torch.bool), seg)
    torch.testing.assert_close(abar[0, :3], alpha[0, :3].mean().expand(3))
    torch.testing.assert_close(abar[0, 3:], alpha[0, 3:].mean().expand(4))


def test_sequence_log_alpha_mean_is_the_log_of_the_mean_and_exact_below_float64_range():
    """log ᾱ per row / per document over the valid tokens, against plain sums: log of `sequence_alpha_mean` where ᾱ
    is in range; where every log α^T is below −745 (α^T is 0 in float64), m + log((1/n) Σ exp(log α − m)) with m the
    largest, which the linear mean cannot give; −inf for a sequence without valid tokens or without a tail."""
    gen = torch.Generator().manual_seed(61)
    log_alpha = torch.log(torch.rand(3, 6, generator=gen, dtype=torch.float64))
    mask = torch.rand(3, 6, generator=gen) > 0.3
    mask[2] = False
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]] * 3)
    for segment_ids in (None, seg):
        got = L.sequence_log_alpha_mean(log_alpha, mask, segment_ids)
        want = L.sequence_alpha_mean(log_alpha.exp(), mask, segment_ids).log()  # 0 (log: −inf) without valid tokens
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert (L.sequence_log_alpha_mean(log_alpha, mask)[2] == -math.inf).all()
    deep = torch.tensor([[-800.0, -801.0, -2000.0, -math.inf]], dtype=torch.float64)
    got = L.sequence_log_alpha_mean(deep, torch.ones(1, 4, dtype=torch.bool))
    want = -800.0 + math.log((1 + math.exp(-1.0) + math.exp(-1200.0)) / 4)
    torch.testing.assert_close(got, torch.full((1, 4), want, dtype=torch.float64), rtol=1e-15, atol=0)
    assert (L.sequence_alpha_mean(deep.exp(), torch.ones(1, 4, dtype=torch.bool)) == 0).all()  # linear: lost
    none = torch.full((1, 3), -math.inf, dtype=torch.float64)  # one-hot teachers: no tail anywhere
    assert (L.sequence_log_alpha_mean(none, torch.ones(1, 3, dtype=torch.bool)) == -math.inf).all()


# --------------------------------------------------------------------------- numerics


def _all_losses(s, t, mask, labels):
    return {
        "forward_kl": L.forward_kl(s, t),
        "reverse_kl": L.reverse_kl(s, t),
        "jsd": L.jsd(s, t, beta=0.4),
        "tad": L.tad(s, t, mask, k=3),
        "d_kl1": L.tad_decompose(s, t, k=3)[0],
        "d_kl2": L.tad_decompose(s, t, k=3)[1],
        "dkd": L.dkd(s, t, labels),
        "drkl": L.drkl(s, t, labels),
        "drkl_argmax": L.drkl(s, t, None, anchor="teacher_argmax"),
    }


def _all_bounds(s, t, mask, labels):
    """loss_bounds' (value bound, gradient bound) of every float32 loss of `_all_losses`."""
    d1, d2, _ = LB.tad_decompose(s, t, 3)
    return {
        "forward_kl": LB.forward_kl(s, t),
        "reverse_kl": LB.reverse_kl(s, t),
        "jsd": LB.jsd(s, t, 0.4),
        "tad": LB.tad(s, t, mask, 3, 2.0),
        "d_kl1": d1,
        "d_kl2": d2,
        "dkd": LB.dkd(s, t, labels, 1.0, 8.0),
        "drkl": LB.drkl(s, t, labels, 0.5),
        "drkl_argmax": LB.drkl(s, t, None, 0.5, anchor="teacher_argmax"),
    }


def _finite_values_and_grads(s, t, mask, labels, skip=()):
    for name in set(_all_losses(s, t, mask, labels)) - set(skip):
        x = s.detach().clone().requires_grad_(True)
        out = _all_losses(x, t, mask, labels)[name]
        out.float().sum().backward()
        assert torch.isfinite(out).all(), name
        assert torch.isfinite(x.grad).all(), name


def test_logits_up_to_1e4_are_finite_and_accurate_in_float32():
    gen = torch.Generator().manual_seed(8)
    s = (torch.rand(2, 4, 12, generator=gen) * 2 - 1) * 1e4
    t = (torch.rand(2, 4, 12, generator=gen) * 2 - 1) * 1e4
    mask = torch.ones(2, 4, dtype=torch.bool)
    labels = torch.randint(0, 12, (2, 4), generator=gen)
    _finite_values_and_grads(s, t, mask, labels)
    w = torch.ones(2, 4, dtype=torch.float64)
    # values ~1e4: the log-probabilities carry absolute errors of a few u·1e4 (loss_bounds)
    assert_matches(lambda x: L.forward_kl(x, t), lambda x: R.forward_kl(x, t), s, w, torch.float32,
                   lambda: LB.forward_kl(s, t))
    assert_matches(lambda x: L.tad(x, t, mask, k=3), lambda x: R.tad(x, t, mask, 3, 2.0), s, w, torch.float32,
                   lambda: LB.tad(s, t, mask, 3, 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tad_student_tail_mass_underflow_is_exact(dtype):
    """Student sure of the teacher's top-K (margin 1e4): α^S underflows, L and Eq. 6 stay exact via log space."""
    gen = torch.Generator().manual_seed(9)
    t = torch.randn(1, 3, 10, generator=gen, dtype=torch.float64)
    s = torch.randn(1, 3, 10, generator=gen, dtype=torch.float64)
    s = s.scatter_add(-1, torch.topk(t, 4).indices, torch.full((1, 3, 4), 1e4, dtype=torch.float64)).to(dtype)
    mask = torch.ones(1, 3, dtype=torch.bool)
    w = torch.tensor([[1.0, 0.3, 2.0]], dtype=torch.float64)
    assert (R.tad(s.double(), t, mask, 4, 2.0) > 1e3).all()  # α^T log(α^T/α^S) with log α^S ≈ −1e4
    # float32: log α^S = lse(tail) − lse(all) rounds numbers ~1e4, an ABSOLUTE error of a few u·1e4 ≈ 1e-3 per
    # log-sum-exp, amplified by β_x ≈ 9 in the tail term (loss_bounds.tad); not relative to the value
    t_in = t.to(dtype)
    assert_matches(lambda x: L.tad(x, t_in, mask, k=4), lambda x: R.tad(x, t, mask, 4, 2.0), s, w, dtype,
                   lambda: LB.tad(s, t_in, mask, 4, 2.0))
    # the explicit D_KL1 and the sparse-teacher D_KL1 read α^S from the tail too (1 − Σ top-K q would be 0 here)
    ids = torch.topk(t, 4).indices
    logprobs = torch.log_softmax(t, -1).gather(-1, ids).to(dtype)
    assert_matches(lambda x: L.tad_decompose(x, t_in, k=4)[0], lambda x: R.tad_decompose(x, t, 4)[0], s, w, dtype,
                   lambda: LB.tad_decompose(s, t_in, 4)[0])
    if dtype == torch.float64:
        assert_matches(lambda x: L.topk_bucket_kl(x, ids, logprobs), lambda x: R.tad_decompose(x, t, 4)[0], s, w,
                       dtype, None)
    else:  # against the reference on the same (float32) cached log-probs; their own rounding is checked above
        assert_matches(lambda x: L.topk_bucket_kl(x, ids, logprobs), lambda x: R.topk_bucket_kl(x, ids, logprobs), s,
                       w, dtype, lambda: LB.topk_bucket_kl(s, ids, logprobs))


def test_tad_q_tilde_form_rows_at_logits_offset_by_1e4():
    """Rows whose tail gradient takes the q̃/p̃ form (α^S underflowed: the student's top-K 200 nats above its tail) at
    student logits offset by 1e4: q̃ is the tail's softmax as (s − m) − log S (`divergences.tail_softmax_`, as the
    kernels and log_softmax), within the log-sum-exp backward's relative error (`loss_bounds.tad`); it was
    s − (m + log S), whose rounding u·1e4 ≈ 6e-4 went into q̃ and the gradient's (β(X)α^T − α^T)·q̃ term."""
    gen = torch.Generator().manual_seed(21)
    t = torch.randn(1, 3, 12, generator=gen, dtype=torch.float64)
    s = torch.randn(1, 3, 12, generator=gen, dtype=torch.float64) + 1e4
    s = s.scatter_add(-1, torch.topk(t, 4).indices, torch.full((1, 3, 4), 200.0, dtype=torch.float64)).float()
    mask = torch.ones(1, 3, dtype=torch.bool)
    w = torch.tensor([[1.0, 0.3, 2.0]], dtype=torch.float64)
    t_in = t.float()
    assert_matches(lambda x: L.tad(x, t_in, mask, k=4), lambda x: R.tad(x, t_in.double(), mask, 4, 2.0), s, w,
                   torch.float32, lambda: LB.tad(s, t_in, mask, 4, 2.0))


def test_tad_log_space_rows_with_a_student_tail_1e4_nats_down():
    """Rows TAD computes in log space (the teacher's tail 100 nats below its top 3: α^T < 1e-30) whose student puts its
    top 3 1e4 nats above its tail (log α^S ≈ −1e4): log q̃ in W·KL(p̃‖q̃) is the tail's own log-softmax of the logits
    (`divergences.tail_log_softmax_`, as the backward's q̃ and the kernels), within κ_V + 2u|log q̃| of its value
    (`loss_bounds.tad`); as log q − lse(log q) it carried each log q's rounding u·|log α^S| ≈ 6e-4 (2× the value
    bound here, whose old count allowed it)."""
    gen = torch.Generator().manual_seed(22)
    t = torch.randn(1, 4, 40, generator=gen, dtype=torch.float64)
    ids = torch.topk(t, 3).indices
    t = t.scatter_add(-1, ids, torch.full((1, 4, 3), 100.0, dtype=torch.float64)).float()
    s = torch.randn(1, 4, 40, generator=gen, dtype=torch.float64)
    s = s.scatter_add(-1, ids, torch.full((1, 4, 3), 1e4, dtype=torch.float64)).float()
    mask = torch.ones(1, 4, dtype=torch.bool)
    w = torch.tensor([[1.0, 0.3, 2.0, 0.7]], dtype=torch.float64)
    assert_matches(lambda x: L.tad(x, t, mask, k=3), lambda x: R.tad(x, t.double(), mask, 3, 2.0), s, w,
                   torch.float32, lambda: LB.tad(s, t, mask, 3, 2.0))


def _tad_float32_finite_and_within_bound(s, t32, mask, w):
    """TAD (K = 3, β = 2) of float32 s, t32 [1, T, V]: value and gradient (upstream weight w) finite and within
    loss_bounds.tad (float32, first order, SAFETY 2) of the float64 reference on the same float32 inputs; returns
    (value, reference value)."""
    got, got_grad = value_grad(lambda x: L.tad(x, t32, mask, k=3), s, w)
    want, want_grad = value_grad(lambda x: R.tad(R.f64(x), t32.double(), mask, 3, 2.0), s.double(), w)
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    value_bound, grad_bound = LB.tad(s, t32, mask, 3, 2.0)
    B.assert_within(got, want, value_bound + B.REF64_ATOL, msg="value")
    B.assert_within(got_grad, want_grad, grad_bound * w[..., None] + B.REF64_ATOL, msg="gradient")
    return got, want


@pytest.mark.parametrize("gap", [80.0, 95.0, 100.0, 110.0, 300.0])
def test_tad_float32_with_a_subnormal_teacher_tail_mass(gap):
    """Teacher top-3 logits `gap` nats above the rest: α^T ~ e^-gap, below float32's normal range from ~87 on (and 0
    once it underflows, ~104). β(X) = β/ᾱ would overflow float32 and α^T·D_KL2 would vanish; computed in float64 /
    log space, L = D_KL1 + β(X)·α^T·D_KL2 stays finite and equals the float64 reference within the float32 bound."""
    gen = torch.Generator().manual_seed(13)
    t = torch.randn(1, 2, 12, generator=gen, dtype=torch.float64)
    t = t.scatter_add(-1, torch.topk(t, 3).indices, torch.full((1, 2, 3), gap, dtype=torch.float64))
    s = torch.randn(1, 2, 12, generator=gen, dtype=torch.float64).float()
    t32 = t.float()
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = torch.tensor([[1.0, 0.7]], dtype=torch.float64)
    got, want = _tad_float32_finite_and_within_bound(s, t32, mask, w)
    # the tail term is really there: L − D_KL1 = β(X)·α^T·D_KL2 = β·D_KL2 (one token per sequence of one row: here
    # two tokens, each row's ᾱ averages them); dropping it would leave D_KL1 alone
    d1 = R.tad_decompose(s.double(), t32.double(), 3)[0]
    assert ((want - d1).abs() > 1e-3).all() and ((got.double() - d1).abs() > 1e-3).all()


@pytest.mark.parametrize("student_tail_logit", [-25.0, -12.0])
def test_tad_float32_gradient_where_beta_x_times_the_tail_ratio_overflows(student_tail_logit):
    """A one-token sequence with a small but normal teacher tail (α^T ~ e^-40: β(X) = β/α^T ~ 7e17) and a student
    tail far below it (α^S ~ e^-105, 0 in float32, or e^-92, sub-normal): α^T/α^S ~ 1e28 / 4e22 is below the 1e30
    of the q̃/p̃ gradient form, but the tail coefficient 1 + (β(X) − 1)·α^T/α^S overflows float32, and q_i times it
    was NaN (q_i = 0) or +inf on the one tail entry, whose exact gradient is α^S − α^T ~ −3e-18. Value and gradient
    finite and within loss_bounds.tad (float32, first order, SAFETY 2) of the float64 reference."""
    s = torch.tensor([[[80.0, 0.0, 0.0, student_tail_logit]]])
    t32 = torch.tensor([[[30.0, 29.0, 28.0, -10.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    _tad_float32_finite_and_within_bound(s, t32, mask, torch.ones(1, 1, dtype=torch.float64))


def test_tad_float32_gradient_at_beta_zero_where_the_tail_ratio_is_above_1e30():
    """β = 0 (w = β(X) = 0: L = D_KL1) on a row whose student puts its top-1 88 nats above its tail (log α^S ≈ −82)
    while the teacher's tail holds most of the mass (α^T ≈ 0.9): α^T/α^S ≈ e^82 ≈ 4e35, finite in float32. Only the
    ratio > 1e30 test of `divergences.tad_gradient_form` sends the row to the q̃/p̃ form (w·α^T/α^S = 0): the plain
    form's q_i(1 − α^T/α^S) multiplies q_i ≈ 2e-36·q̃_i, sub-normal and rounded to few bits where q̃_i is small, by
    4e35. Value and gradient within loss_bounds.tad (float32, first order) of the float64 reference; a 1e38
    threshold there put 3 tail entries 57× beyond the gradient bound (mutation audit)."""
    gen = torch.Generator().manual_seed(5)
    t = torch.randn(1, 1, 200, generator=gen, dtype=torch.float64) * 2
    s = torch.randn(1, 1, 200, generator=gen, dtype=torch.float64) * 2
    s = s.scatter_add(-1, torch.topk(t, 1).indices, torch.full((1, 1, 1), 88.0, dtype=torch.float64)).float()
    t32 = t.float()
    mask = torch.ones(1, 1, dtype=torch.bool)
    w = torch.ones(1, 1, dtype=torch.float64)
    tail = torch.ones(200, dtype=torch.bool).scatter(0, torch.topk(t32[0, 0], 1).indices, False)
    log_ratio = float(torch.log_softmax(t32.double(), -1)[0, 0, tail].logsumexp(0)
                      - torch.log_softmax(s.double(), -1)[0, 0, tail].logsumexp(0))  # log(α^T/α^S)
    assert math.log(1e30) < log_ratio < math.log(3e38)  # the case meant: above 1e30, finite in float32
    got, got_grad = value_grad(lambda x: L.tad(x, t32, mask, k=1, beta=0.0), s, w)
    want, want_grad = value_grad(lambda x: R.tad(R.f64(x), t32.double(), mask, 1, 0.0), s.double(), w)
    value_bound, grad_bound = LB.tad(s, t32, mask, 1, 0.0)
    B.assert_within(got, want, value_bound + B.REF64_ATOL, msg="value")
    B.assert_within(got_grad, want_grad, grad_bound + B.REF64_ATOL, msg="gradient")


@pytest.mark.parametrize("tail_shift", [0.0, 80.0])
def test_tad_at_beta_zero_is_d_kl1_where_the_student_has_minus_inf_on_the_teacher_tail(tail_shift):
    """β = 0: no tail term (`losses.tail_log_weight`: log β(X) = −inf), L = D_KL1, as from a top-K cache
    (test_cache's test_cache_tad_with_beta_0_is_d_kl1). Token 0's student is −inf at a tail entry where the teacher
    has mass, so D_KL2 = +inf but D_KL1 is finite (α^S > 0): its value was 0·inf = NaN. Value and gradient (dense
    `tad`, whose row kernel the chunked layer runs) against the float64 reference's D_KL1 within
    `loss_bounds.tad_decompose` (float32, first order); token 1 is an ordinary row. ``tail_shift`` 80: the teacher's
    tail 80 nats lower, α^T ≈ e^-80 below float32's tiny-row threshold (1e-30), where a row of positive weight is
    computed in log space; a row of weight 0 must not be (`divergences.tad_tiny_rows`: log w > −inf)."""
    gen = torch.Generator().manual_seed(41)
    t = torch.randn(1, 2, 12, generator=gen, dtype=torch.float64)
    s = torch.randn(1, 2, 12, generator=gen, dtype=torch.float64)
    tail = torch.ones_like(t, dtype=torch.bool).scatter(-1, torch.topk(t, 3).indices, False)
    t = t - tail_shift * tail
    s[0, 0, tail[0, 0].nonzero()[0]] = -INF
    s, t32 = s.float(), t.float()
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = torch.tensor([[1.0, 0.7]], dtype=torch.float64)
    assert torch.isinf(R.tad_decompose(s.double(), t32.double(), 3)[1][0, 0])  # the case meant: D_KL2 = +inf
    assert torch.equal(R.tad(s.double(), t32.double(), mask, 3, 0.0), R.tad_decompose(s.double(), t32.double(), 3)[0])
    got, got_grad = value_grad(lambda x: L.tad(x, t32, mask, k=3, beta=0.0), s, w)
    want, want_grad = value_grad(lambda x: R.tad_decompose(R.f64(x), t32.double(), 3)[0], s.double(), w)
    (value_bound, grad_bound), _, _ = LB.tad_decompose(s, t32, 3)
    B.assert_within(got, want, value_bound + B.REF64_ATOL, msg="value")
    B.assert_within(got_grad, want_grad, grad_bound * w[..., None] + B.REF64_ATOL, msg="gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tad_empty_teacher_tail_beside_tokens_with_tail_mass(dtype):
    """Token 0's teacher is −inf outside its top 3 (α^T = 0 exactly), token 1's is not: ᾱ > 0, so token 0's weight
    β(X) = β/ᾱ is finite and positive. Its tail term is 0 and its gradient q − p, finite (it was NaN on every tail
    entry: the log-space branch for tiny α^T took the empty tail for a tiny one)."""
    gen = torch.Generator().manual_seed(29)
    t = torch.randn(1, 2, 12, generator=gen, dtype=torch.float64)
    t[0, 0, 3:] = -INF
    s = torch.randn(1, 2, 12, generator=gen, dtype=torch.float64).to(dtype)
    t_in = t.to(dtype)
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = torch.tensor([[1.0, 0.7]], dtype=torch.float64)
    got, got_grad = value_grad(lambda x: L.tad(x, t_in, mask, k=3), s, w)
    want, want_grad = value_grad(lambda x: R.tad(R.f64(x), t, mask, 3, 2.0), s.double(), w)
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    value_bound, grad_bound = LB.tad(s, t_in, mask, 3, 2.0)
    B.assert_within(got, want, value_bound + B.REF64_ATOL, msg="value")
    B.assert_within(got_grad, want_grad, grad_bound * w[..., None] + B.REF64_ATOL, msg="gradient")
    q, p = torch.softmax(s.double()[0, 0], -1), torch.softmax(t[0, 0], -1)
    B.assert_within(got_grad[0, 0], w[0, 0] * (q - p), grad_bound[0, 0] * w[0, 0] + B.REF64_ATOL, msg="q − p")


def test_tad_empty_teacher_tail_beside_a_subnormal_one_in_float32():
    """Token 0's teacher tail is empty (α^T = 0 exactly), token 1's is sub-normal in float32 (top-3 logits 95 nats
    up: α^T ~ 1e-42), so β(X) = β/ᾱ ~ 1e42 is beyond float32 (inf as a float32 weight). Token 0's value and
    gradient do not depend on β(X) (its tail term is 0, its gradient q − p): they must stay finite, not inf·0 = NaN
    (the weight of an empty-tail row is set to 0 before it meets the tail). Bounds: loss_bounds.tad (float32, first
    order, SAFETY 2) as in the tests above."""
    gen = torch.Generator().manual_seed(29)
    t = torch.randn(1, 2, 12, generator=gen, dtype=torch.float64)
    t[0, 0, 3:] = -INF
    t[0, 1] = t[0, 1].scatter_add(-1, torch.topk(t[0, 1], 3).indices, torch.full((3,), 95.0, dtype=torch.float64))
    s = torch.randn(1, 2, 12, generator=gen, dtype=torch.float64).float()
    t32 = t.float()
    mask = torch.ones(1, 2, dtype=torch.bool)
    alpha = L.tad_decompose(s, t32, k=3)[2]
    assert alpha[0, 0] == 0 and 0 < alpha[0, 1] < 1e-38 and torch.isinf(2.0 / alpha.mean())  # the case meant
    w = torch.tensor([[1.0, 0.7]], dtype=torch.float64)
    _tad_float32_finite_and_within_bound(s, t32, mask, w)


def test_tail_term_stays_accurate_and_nonnegative_in_float32_for_peaked_teachers():
    """Top-K holding ~1 − 1e-6 of the mass: the tail term is summed over the tail, not taken as KL − D_KL1."""
    gen = torch.Generator().manual_seed(10)
    t = torch.randn(1, 12, 300, generator=gen, dtype=torch.float64) * 2
    t[..., :10] += 18.0  # top-10 dominate: α^T ~ 1e-6
    s = t + torch.randn(1, 12, 300, generator=gen, dtype=torch.float64) * 0.5
    mask = torch.ones(1, 12, dtype=torch.bool)
    s, t = s.float(), t.float()  # the float32 inputs; the reference runs on the same values
    with torch.no_grad():
        _, d2, alpha = R.tad_decompose(s.double(), t.double(), 10)
    assert alpha.max() < 1e-4
    abar = alpha.mean(1, keepdim=True)
    want_tail = (2.0 / abar) * alpha * d2  # β(X) α^T D_KL2, float64 reference
    got = L.tad(s, t, mask, k=10).double()
    got_tail = got - L.tad_decompose(s, t, k=10)[0].double()
    # bounds: the fused L and the explicit D_KL1, each from loss_bounds; L >= 0 exactly
    bound_tad, bound_d1 = LB.tad(s, t, mask, 10, 2.0)[0], LB.tad_decompose(s, t, 10)[0][0]
    assert (got >= -bound_tad).all()
    B.assert_within(got_tail, want_tail, bound_tad + bound_d1, msg="β(X) α^T D_KL2")
    # ... and the check discriminates: taking the tail term as β(X)(KL − D_KL1) would lose ONE rounding of the KL,
    # u·KL·β(X), per operation — more than the whole bound
    one_rounding = B.U32 * L.forward_kl(s, t).double() * 2.0 / abar
    assert float((bound_tad + bound_d1).sum()) < float(one_rounding.sum())


def test_neg_inf_columns_on_both_sides_match_the_reduced_vocabulary():
    gen = torch.Generator().manual_seed(12)
    s, t = torch.randn(2, 3, 10, generator=gen), torch.randn(2, 3, 10, generator=gen) * 2
    dead = torch.tensor([1, 4, 5])
    keep = torch.tensor([i for i in range(10) if i not in dead.tolist()])
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., dead], t_inf[..., dead] = -INF, -INF
    mask = torch.ones(2, 3, dtype=torch.bool)
    labels = keep[torch.randint(0, len(keep), (2, 3), generator=gen)]
    labels_small = torch.searchsorted(keep, labels)
    full_x = s_inf.clone().requires_grad_(True)
    small_x = s[..., keep].clone().requires_grad_(True)
    full, small = _all_losses(full_x, t_inf, mask, labels), _all_losses(small_x, t[..., keep], mask, labels_small)
    # the same exact values (exp(−inf) = 0 adds exactly), two float32 evaluations: the sum of their bounds
    full_bounds, small_bounds = _all_bounds(s_inf, t_inf, mask, labels), _all_bounds(s[..., keep], t[..., keep], mask,
                                                                                     labels_small)
    for name in full:
        (v_full, gb_full), (v_small, gb_small) = full_bounds[name], small_bounds[name]
        B.assert_within(full[name], small[name], v_full + v_small, msg=name)
        (g_full,) = torch.autograd.grad(full[name].sum(), full_x)
        (g_small,) = torch.autograd.grad(small[name].sum(), small_x)
        assert (g_full[..., dead] == 0).all(), name
        B.assert_within(g_full[..., keep], g_small, gb_full[..., keep] + gb_small, msg=name)


def test_neg_inf_everywhere_but_the_top_on_both_sides_gives_an_empty_tail():
    """Both sides −inf outside the same 3 ids: α^T = α^S = 0, D_KL2 = 0, all finite (0·log 0 conventions)."""
    gen = torch.Generator().manual_seed(17)
    s, t = torch.randn(2, 2, 8, generator=gen), torch.randn(2, 2, 8, generator=gen)
    s[..., 3:], t[..., 3:] = -INF, -INF
    mask = torch.ones(2, 2, dtype=torch.bool)
    labels = torch.randint(0, 3, (2, 2), generator=gen)
    _finite_values_and_grads(s, t, mask, labels)
    _, d2, alpha = L.tad_decompose(s, t, k=3)
    assert (alpha == 0).all() and (d2 == 0).all()
    # the same 3 terms summed over K (tad) or over V with zeros (forward_kl): the sum of the two bounds
    B.assert_within(L.tad(s, t, mask, k=3), L.forward_kl(s, t), LB.tad(s, t, mask, 3, 2.0)[0] + LB.forward_kl(s, t)[0],
                    msg="empty tail")
    one_hot = torch.full((1, 1, 5), -INF).index_fill(-1, torch.tensor([2]), 0.0)  # both one-hot on the label
    label = torch.tensor([[2]])
    for fn in (
        lambda x: L.dkd(x, one_hot, label),
        lambda x: L.drkl(x, one_hot, label),
        lambda x: L.tad(x, one_hot, torch.ones(1, 1, dtype=torch.bool), k=1),
    ):
        x = one_hot.clone().requires_grad_(True)
        out = fn(x)
        out.sum().backward()
        assert (out == 0).all() and torch.isfinite(x.grad).all()


def test_neg_inf_on_one_side_only():
    gen = torch.Generator().manual_seed(13)
    s, t = torch.randn(3, 7, generator=gen, dtype=torch.float64), torch.randn(3, 7, generator=gen, dtype=torch.float64)
    t_dead = t.clone()
    t_dead[:, 2] = -INF  # teacher prob 0: contributes 0 to forward KL, reverse KL is +inf
    torch.testing.assert_close(L.forward_kl(s, t_dead), R.forward_kl(s, t_dead))
    assert torch.isinf(L.reverse_kl(s, t_dead)).all()
    s_dead = s.clone().requires_grad_(True)
    with torch.no_grad():
        s_dead[:, 2] = -INF  # student prob 0 where the teacher has mass: forward KL = +inf, gradient q − p finite
    out = L.forward_kl(s_dead, t)
    out.sum().backward()
    assert torch.isposinf(out).all() and torch.isfinite(s_dead.grad).all()
    torch.testing.assert_close(s_dead.grad, torch.softmax(s_dead.detach(), -1) - torch.softmax(t, -1))


def test_tad_is_plus_inf_not_nan_when_the_student_has_no_tail_where_the_teacher_has_one():
    """Student −inf on every id outside the teacher's top 3, teacher with tail mass: α^S = 0, so D_KL1's bucket
    α^T log(α^T/α^S) = +inf and KL(p‖q) = +inf; TAD's value is +inf too (like forward KL's, the right value), not
    NaN: its tail term Σ_tail p log(p/q) − bucket is inf − inf there and must be left out, not added. Exact
    (IEEE inf), no tolerance."""
    gen = torch.Generator().manual_seed(31)
    s, t = torch.randn(1, 2, 8, generator=gen), torch.randn(1, 2, 8, generator=gen)
    ids = torch.topk(t, 3).indices
    s_dead = torch.full_like(s, -INF).scatter(-1, ids, s.gather(-1, ids))
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert torch.isposinf(L.forward_kl(s_dead, t)).all()
    assert torch.isposinf(L.tad_decompose(s_dead, t, k=3)[0]).all()  # D_KL1 = +inf
    # D_KL2 too: the student puts no mass where p̃ has some (the forward-KL convention), not NaN from −inf − (−inf)
    assert torch.isposinf(L.tad_decompose(s_dead, t, k=3)[1]).all()
    for beta in (0.5, 2.0):
        assert torch.isposinf(L.tad(s_dead, t, mask, k=3, beta=beta)).all(), beta


def test_bf16_inputs_compute_in_float32():
    gen = torch.Generator().manual_seed(14)
    s, t = torch.randn(2, 4, 16, generator=gen).bfloat16(), (torch.randn(2, 4, 16, generator=gen) * 3).bfloat16()
    mask = torch.ones(2, 4, dtype=torch.bool)
    labels = torch.randint(0, 16, (2, 4), generator=gen)
    for name, out in _all_losses(s, t, mask, labels).items():
        assert out.dtype == torch.float32, name
        # bf16 -> float32 is exact: the same float32 values through the same kernels, bit for bit (computing in
        # bf16 would be off by ~u_bf16·|logit| = 1e-2)
        assert torch.equal(out, _all_losses(s.float(), t.float(), mask, labels)[name]), name
    _finite_values_and_grads(s, t, mask, labels)
    x = s.clone().requires_grad_(True)
    L.tad(x, t, mask, k=3).sum().backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["neg_inf", "margin_1e4"])
def test_one_hot_teacher_has_finite_values_and_gradients(kind):
    gen = torch.Generator().manual_seed(15)
    s = torch.randn(2, 3, 9, generator=gen)
    hot = torch.randint(0, 9, (2, 3), generator=gen)
    base = torch.full((2, 3, 9), -INF) if kind == "neg_inf" else torch.randn(2, 3, 9, generator=gen)
    t = base.scatter(-1, hot[..., None], 1e4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    # KL(q‖p) to a teacher with −inf entries is +inf (the student has mass where the teacher has none)
    reverse = ("reverse_kl", "drkl", "drkl_argmax") if kind == "neg_inf" else ()
    _finite_values_and_grads(s, t, mask, hot, skip=reverse)
    d1, _, alpha = L.tad_decompose(s, t, k=3)
    assert (alpha == 0).all()
    if kind == "neg_inf":
        # ᾱ = 0: the tail term is 0, L = D_KL1 = KL. In float32 the teacher is exactly one-hot (exp(−inf) = 0, log Σ =
        # log 1 = 0, so log p_hot = 0): all three are 1·(0 − log q_hot) from the same log_softmax of s, plus exact 0s
        assert torch.equal(L.tad(s, t, mask, k=3), d1)
        assert torch.equal(d1, L.forward_kl(s, t))
        return
    # margin 1e4: α^T ~ e^-1e4 is 0 in float32 and float64 but not in log space, where ᾱ is averaged: each token's
    # tail term β·(α^T/ᾱ)·D_KL2 (β(X)·α^T ~ β) is there, as in the float64 reference (it was dropped when ᾱ
    # underflowed: a value discontinuous in the margin)
    s64, t64 = s.double(), t.double()
    w = torch.ones(2, 3, dtype=torch.float64)
    assert_matches(lambda x: L.tad(x, t64, mask, k=3), lambda x: R.tad(x, t64, mask, 3, 2.0), s64, w, torch.float64,
                   None)
    want = R.tad(s64, t64, mask, 3, 2.0)
    d1_64, d2_64, _, log_alpha = R.tad_decompose(s64, t64, 3, with_log_alpha=True)
    big_w = 2.0 * (log_alpha - R.log_alpha_means(log_alpha, mask)).exp()  # β(X)·α^T per token
    assert ((want - d1_64) > 1e-3).all() and (big_w > 0.1).all()  # the tail term is really there
    # float32: every log-probability (of p, q, p̃, q̃ and log α^T, log ᾱ) is a difference of numbers of size <= M = 1e4
    # rounded a few times, within ε = 8u·M (u = 2^-24) absolute, entry by entry; then |ΔD_KL1| <= 2ε (its weights
    # sum to <= 1), |ΔD_KL2| <= ε(2 + 2 max_tail |log p̃/q̃|) and W within 2ε relative: |ΔL| <= ε(2 + W(4 + 2·max_tail
    # |log p̃/q̃| + 2 D_KL2)) per token
    eps = 8 * 2.0**-24 * 1e4
    top = torch.zeros(2, 3, 9, dtype=torch.bool).scatter(-1, torch.topk(t64, 3).indices, True)
    log_pt = torch.log_softmax(t64.masked_fill(top, -INF), -1)
    log_qt = torch.log_softmax(s64.masked_fill(top, -INF), -1)
    spread = torch.where(top, 0.0, (log_pt - log_qt).abs()).amax(-1)
    got = L.tad(s, t, mask, k=3)
    B.assert_within(got, want, eps * (2 + big_w * (4 + 2 * spread + 2 * d2_64)), msg="float32 value")


def test_tad_backward_can_run_twice_and_teacher_gets_no_gradient():
    gen = torch.Generator().manual_seed(16)
    s = torch.randn(2, 3, 8, generator=gen, requires_grad=True)
    t = torch.randn(2, 3, 8, generator=gen, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = L.tad(s, t, mask, k=2)
    (g1,) = torch.autograd.grad(out.sum(), s, retain_graph=True)
    (g2,) = torch.autograd.grad(out.sum(), s)
    assert torch.equal(g1, g2)
    labels = torch.randint(0, 8, (2, 3), generator=gen)
    for name, value in _all_losses(s, t, mask, labels).items():
        value.sum().backward()
        assert t.grad is None, name


def test_nan_logits_propagate():
    s, t = torch.randn(2, 6), torch.randn(2, 6)
    s[0, 3] = float("nan")
    assert torch.isnan(L.forward_kl(s, t)[0]) and torch.isfinite(L.forward_kl(s, t)[1])
    assert torch.isnan(L.tad(t[None], s[None], torch.ones(1, 2, dtype=torch.bool), k=2)[0, 0])
    # TAD with a NaN teacher logit: ᾱ of its sequence is NaN, so β(X) is undefined; that row is NaN and the other
    # rows of the sequence keep D_KL1 (tail_log_weight: no tail term), finite, not NaN. The same float32 operations
    # as tad_decompose's D_KL1 up to summation order: loss_bounds of both (first order, SAFETY 2)
    x = t[None].clone().requires_grad_(True)
    out = L.tad(x, s[None], torch.ones(1, 2, dtype=torch.bool), k=2)
    out.sum().backward()
    assert torch.isnan(out[0, 0]) and torch.isfinite(out[0, 1]) and torch.isfinite(x.grad[0, 1]).all()
    d1 = L.tad_decompose(t[1], s[1], k=2)[0]
    bound = LB.tad_decompose(t[None, 1:], s[None, 1:], 2)[0][0][0, 0] + LB.tad(t[None, 1:], s[None, 1:],
                                                                                 torch.ones(1, 1, dtype=torch.bool),
                                                                                 2, 0.0)[0][0, 0]
    B.assert_within(out[0, 1], d1, bound, msg="the NaN row's neighbour keeps D_KL1")


def test_a_nan_teacher_logit_makes_its_row_nan_for_every_dense_divergence():
    """A NaN teacher logit gives a NaN row (the trainer sees it and skips the step), its neighbour finite, for KL,
    reverse KL and JSD: the teacher's NaN rows are poisoned (`divergences.dense_teacher`), as kl_sum's 0·log 0 redo
    of a NaN row (NaN > 0 is false) would otherwise make forward KL's row 0."""
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    t[0, 3] = float("nan")
    for name, value in {"forward_kl": L.forward_kl(s, t), "reverse_kl": L.reverse_kl(s, t),
                        "jsd": L.jsd(s, t, beta=0.3)}.items():
        assert torch.isnan(value[0]) and torch.isfinite(value[1]), name

# --------------------------------------------------------------------------- validation


def test_argument_errors_name_the_argument():
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.ones(2, 3, dtype=torch.bool)
    labels = torch.zeros(2, 3, dtype=torch.long)
    ids, lp = torch.zeros(2, 3, 2, dtype=torch.long), torch.full((2, 3, 2), -2.0)
    cases_ = [
        ("k must", lambda: L.tad(s, t, mask, k=0)),
        ("k must", lambda: L.tad(s, t, mask, k=8)),
        ("k must", lambda: L.tad_decompose(s, t, k=8)),
        ("k must", lambda: L.topk_bucket_kl(s, torch.zeros(2, 3, 8, dtype=torch.long), torch.zeros(2, 3, 8))),
        ("beta must", lambda: L.tad(s, t, mask, k=2, beta=-1.0)),
        ("beta must", lambda: L.dkd(s, t, labels, beta=-0.1)),
        ("alpha must", lambda: L.dkd(s, t, labels, alpha=-1.0)),
        ("gamma must", lambda: L.drkl(s, t, labels, gamma=-0.5)),
        ("temperature must", lambda: L.forward_kl(s, t, temperature=0.0)),
        ("temperature must", lambda: L.tad(s, t, mask, k=2, temperature=-1.0)),
        ("temperature must", lambda: L.jsd(s, t, temperature=float("nan"))),
        ("beta must be in \\[0, 1\\]", lambda: L.jsd(s, t, beta=1.5)),
        ("beta must be in \\[0, 1\\]", lambda: L.jsd(s, t, beta=-0.1)),
        ("vocabulary mismatch", lambda: L.forward_kl(s, torch.randn(2, 3, 9))),
        ("vocabulary mismatch", lambda: L.tad(s, torch.randn(2, 3, 9), mask, k=2)),
        ("shape mismatch", lambda: L.reverse_kl(s, torch.randn(2, 4, 8))),
        ("shape mismatch", lambda: L.hidden_cosine(s, torch.randn(2, 4, 8), mask)),
        ("mask must", lambda: L.tad(s, t, torch.ones(2, 4, dtype=torch.bool), k=2)),
        ("mask must", lambda: L.tad(s, t, torch.ones(2, 3), k=2)),
        ("mask must", lambda: L.hidden_cosine(s, t, torch.ones(3, 2, dtype=torch.bool))),
        ("labels must", lambda: L.dkd(s, t, torch.zeros(2, 4, dtype=torch.long))),
        ("labels must", lambda: L.dkd(s, t, torch.full((2, 3), 8))),
        ("labels is None", lambda: L.drkl(s, t, None)),
        ("anchor must", lambda: L.drkl(s, t, labels, anchor="argmax")),
        ("segment_ids must", lambda: L.tad(s, t, mask, k=2, segment_ids=torch.zeros(2, 4, dtype=torch.long))),
        ("not both", lambda: L.tad(s, t, mask, k=2, segment_ids=labels, seq_alpha_mean=torch.ones(2, 3))),
        ("seq_alpha_mean must", lambda: L.tad(s, t, mask, k=2, seq_alpha_mean=torch.ones(2))),
        ("tad expects logits \\[B, T, V\\]", lambda: L.tad(s[0], t[0], mask[0], k=2)),
        ("teacher_topk_ids must", lambda: L.topk_bucket_kl(s, ids.float(), lp)),
        ("teacher_topk_ids must be token ids", lambda: L.topk_bucket_kl(s, ids + 8, lp)),
        ("teacher_topk_logprobs must", lambda: L.topk_bucket_kl(s, ids, lp[..., :1])),
        ("student_logits must", lambda: L.forward_kl(torch.zeros(2, 3, 8, dtype=torch.long), t)),
        ("projection", lambda: L.hidden_cosine(torch.randn(2, 3, 9), s, mask)),
        ("projection weight", lambda: L.hidden_cosine(s, s, mask, projection=torch.randn(8, 7))),
        # the unit-interval knobs of the baselines: a value that is not a number is named too (it was a TypeError
        # from the comparison with 1, made before the type check)
        ("alpha must", lambda: BL.skew_forward_kl(s, t, alpha="0.1")),
        ("alpha must", lambda: BL.skew_reverse_kl(s, t, alpha=None)),
        ("mu must", lambda: BL.akl(s, t, mu="0.5")),
        ("mu must", lambda: BL.akl(s, t, mu=None)),
        # their open end: at α = 1 the skew's mixture is its target itself (0 whatever the student), and at μ = 1 only
        # rounding of the cumulative sum decides whether AKL's tail is empty
        ("alpha must", lambda: BL.skew_forward_kl(s, t, alpha=1.0)),
        ("alpha must", lambda: BL.skew_reverse_kl(s, t, alpha=1.0)),
        ("mu must", lambda: BL.akl(s, t, mu=1.0)),
        # a bool is not a number here (Python counts True as 1): each kind of knob check refuses it
        ("temperature must", lambda: L.forward_kl(s, t, temperature=True)),
        ("beta must", lambda: L.tad(s, t, mask, k=2, beta=True)),
        ("alpha must", lambda: BL.skew_forward_kl(s, t, alpha=False)),
        ("beta must be in \\[0, 1\\]", lambda: L.jsd(s, t, beta=True)),
    ]
    for pattern, call in cases_:
        with pytest.raises(ValueError, match=pattern):
            call()


def test_output_dtypes_and_shapes():
    for dtype, want in [(torch.float16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        s, t = torch.randn(2, 3, 8).to(dtype), torch.randn(2, 3, 8).to(dtype)
        out = L.forward_kl(s, t)
        assert out.dtype == want and out.shape == (2, 3)
    assert L.forward_kl(torch.randn(8), torch.randn(8)).shape == ()
    # a float64 cache under a float32 student: the top-K log-probs are not rounded to float32
    ids = torch.topk(torch.randn(2, 3, 8), 2).indices
    lp = torch.full((2, 3, 2), -2.0, dtype=torch.float64)
    assert L.topk_bucket_kl(torch.randn(2, 3, 8), ids, lp).dtype == torch.float64
    # identical inputs through the same log_softmax: log p − log q = 0 exactly
    assert float(L.forward_kl(torch.zeros(5), torch.zeros(5))) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_per_token_functions_ignore_non_finite_rows_at_masked_positions(bad):
    """dkd, drkl and tad (labels -100 / mask False) and hidden_cosine: NaN or ±inf in a masked row of either side leaves
    the other rows' values and gradients exactly as they were and gives 0 gradient there (dkd, drkl and
    hidden_cosine gave NaN: 0·NaN in the backward of their masked value)."""
    gen = torch.Generator().manual_seed(21)
    s, t = torch.randn(2, 5, 9, generator=gen), torch.randn(2, 5, 9, generator=gen) * 2
    labels = torch.randint(0, 9, (2, 5), generator=gen)
    labels[0, :2], labels[1, 4] = -100, -100
    mask = labels != -100
    hs, ht = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 6, generator=gen)
    fns = {"dkd": lambda x, y: L.dkd(x, y, labels), "drkl": lambda x, y: L.drkl(x, y, labels),
           "drkl_argmax": lambda x, y: L.drkl(x, y, labels, anchor="teacher_argmax"),
           "tad": lambda x, y: L.tad(x, y, mask, k=3), "cosine": lambda x, y: L.hidden_cosine(x, y, mask)}
    for name, fn in fns.items():
        a, b = (hs, ht) if name == "cosine" else (s, t)
        x = a.clone().requires_grad_(True)
        clean = fn(x, b)
        (g_clean,) = torch.autograd.grad(clean.sum(), x)
        x = a.masked_fill(~mask[..., None], bad).requires_grad_(True)
        spoilt = fn(x, b.masked_fill(~mask[..., None], bad))
        (g,) = torch.autograd.grad(spoilt.sum(), x)
        assert torch.equal(spoilt, clean), name
        assert torch.equal(g[mask], g_clean[mask]) and (g[~mask] == 0).all(), name
