"""tailkd.baselines (the divergences the DRKL paper compares with) against the independent float64 reference
(tests/reference.py): values and gradients, their identities and limits, masking through the registry, extreme
logits, and the chunked layer (tests/test_fused.py covers chunked == dense for every registry row)."""

import math
from pathlib import Path

import loss_bounds as LB
import pytest
import reference as R
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_losses import assert_matches, cases, make

from tailkd import baselines as BL
from tailkd import losses as L
from tailkd.config import LossConfig
from tailkd.registry import bind

FAST = settings(max_examples=10, deadline=None, derandomize=True)


@FAST
@given(cases())
def test_symmetric_kl_matches_reference(c):
    s, t, _, w, _ = make(c)
    tau = c["temperature"]
    assert_matches(lambda x: BL.symmetric_kl(x, t, temperature=tau), lambda x: R.symmetric_kl(x, t, tau), s, w,
                   c["dtype"], lambda: LB.symmetric_kl(s, t, tau), tau)


@pytest.mark.parametrize("alpha", [0.999, 0.99999])
@pytest.mark.parametrize("reverse", [False, True])
def test_skew_kls_near_alpha_one_within_their_bound(alpha, reverse):
    """Near α = 1 the terms shrink like 1 − α (the divergence like (1 − α)²) while the float32 rounding of the log m
    of the mixture does not: `loss_bounds.skew_kl` counts it (the terms' relative count alone was 10-500× too small
    at α = 0.999 - 0.99999, for values and the reverse form's gradients). Float32 rows at the logit scales of
    `cases`."""
    for seed, scale in enumerate([0.3, 2.0, 8.0]):
        g = torch.Generator().manual_seed(seed)
        s, t = (torch.randn(2, 3, 20, generator=g) * scale for _ in range(2))
        w = torch.rand(2, 3, generator=g) + 0.5
        fn, ref = (BL.skew_reverse_kl, R.skew_reverse_kl) if reverse else (BL.skew_forward_kl, R.skew_forward_kl)
        assert_matches(lambda x: fn(x, t, alpha=alpha), lambda x: ref(x, t, alpha, 1.0), s, w, torch.float32,
                       lambda: LB.skew_kl(s, t, alpha, 1.0, reverse=reverse))


@FAST
@given(cases(), st.sampled_from([0.0, 0.1, 0.5, 0.999]), st.booleans())
def test_skew_kls_match_reference(c, alpha, reverse):
    s, t, _, w, _ = make(c)
    tau = c["temperature"]
    fn, ref = (BL.skew_reverse_kl, R.skew_reverse_kl) if reverse else (BL.skew_forward_kl, R.skew_forward_kl)
    assert_matches(lambda x: fn(x, t, alpha=alpha, temperature=tau), lambda x: ref(x, t, alpha, tau), s, w,
                   c["dtype"], lambda: LB.skew_kl(s, t, alpha, tau, reverse=reverse), tau)


@FAST
@given(cases(), st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_akl_matches_reference(c, mu):
    s, t, _, w, _ = make(c)
    tau = c["temperature"]
    assert_matches(lambda x: BL.akl(x, t, mu=mu, temperature=tau), lambda x: R.akl(x, t, mu, tau), s, w,
                   c["dtype"], lambda: LB.akl(s, t, mu, tau), tau)


@FAST
@given(cases(), st.sampled_from([(0.5, 0.5), (0.2, 0.7), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (1.5, 0.3), (0.7, 0.0)]))
def test_alpha_beta_divergence_matches_reference(c, ab):
    s, t, _, w, _ = make(c)
    tau, (a, b) = c["temperature"], ab
    assert_matches(lambda x: BL.ab_divergence(x, t, alpha=a, beta=b, temperature=tau),
                   lambda x: R.ab_divergence(x, t, a, b, tau), s, w, c["dtype"],
                   lambda: LB.ab_divergence(s, t, a, b, tau), tau)


def _pair(seed=5, shape=(3, 4, 17), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale,
            torch.randn(shape, generator=g, dtype=torch.float64) * scale)


def test_identities_and_limits():
    """symmetric = FKL + RKL; skew at α = 0 is FKL / RKL exactly and leaves them with its first-order Taylor slope;
    the α-β divergence is FKL at (1, 0), RKL at (0, 1), its general formula continuous into those limits with the
    first-order slope in β (α), 4 × squared Hellinger at (½, ½); every one is 0 for p = q and >= 0."""
    s, t = _pair()
    fkl, rkl = L.forward_kl(s, t), L.reverse_kl(s, t)
    torch.testing.assert_close(BL.symmetric_kl(s, t), fkl + rkl, rtol=1e-14, atol=0)
    torch.testing.assert_close(BL.skew_forward_kl(s, t, alpha=0.0), fkl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(BL.skew_reverse_kl(s, t, alpha=0.0), rkl, rtol=1e-12, atol=1e-14)
    # Near their limits, each against its first-order Taylor term, within a remainder bound computed from the data
    # plus float64 rounding (u64 = 2^-53; L = the largest |log p|, |log q|, all finite here):
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    u, V = 2.0**-53, s.shape[-1]
    # skew: g(α) = KL(w ‖ αw + (1−α)v), g'(0) = 1 − Σ w²/v, g''(α) = Σ w (w − v)²/m² with m >= (1−α) v, so
    # |g(α) − g(0) − α g'(0)| <= α²/2 · Σ w (w − v)²/((1−α) v)²; each g rounds within ~V (1 + L) u
    for alpha in (1e-4, 1e-6):
        for got, zero, w, v in ((BL.skew_forward_kl(s, t, alpha=alpha), fkl, p, q),
                                (BL.skew_reverse_kl(s, t, alpha=alpha), rkl, q, p)):
            big_l = torch.maximum(w.log().abs().amax(-1), v.log().abs().amax(-1))
            slope = 1 - (w * w / v).sum(-1)
            tol = alpha**2 / 2 * (w * (w - v) ** 2 / ((1 - alpha) * v) ** 2).sum(-1) + 8 * V * (1 + big_l) * u
            assert ((got - zero - alpha * slope).abs() <= tol).all()
            assert (alpha * slope.abs() > 10 * tol).all()  # the check sees the first-order term
    # α-β at (1, β) as β -> 0 (and at (α, 1), the same with p and q exchanged): D = −f(β)/β with
    # f(β) = Σ p e^{βb} − p e^{βa}/(1+β) − β/(1+β) q e^{βb} (a = log p, b = log q), so D(1, 0) = −f'(0) = KL(p‖q),
    # ∂D/∂β(1, 0) = −f''(0)/2 = Σ p (a² − b²)/2 − p a + q b, and |D − KL − β ∂D/∂β| <= β² max|f'''|/6 with
    # |f'''| <= 3L³ + 6L² + 12L + 12 (a, b <= 0, Σ p = Σ q = 1, |d^m (1+β)^-1| <= m!). Rounding: its 3V terms (their
    # magnitudes sum to <= 3) carry <= (4 + 4L) u relative each, the sum V u more, all divided by αβ = β.
    for beta in (1e-4, 1e-5):
        for got, kl, lp, lq in ((BL.ab_divergence(s, t, alpha=1.0, beta=beta), fkl, t, s),
                                (BL.ab_divergence(s, t, alpha=beta, beta=1.0), rkl, s, t)):
            a, b = torch.log_softmax(lp, -1), torch.log_softmax(lq, -1)
            big_l = torch.maximum(a.abs().amax(-1), b.abs().amax(-1))
            slope = (a.exp() * (a * a - b * b) / 2 - a.exp() * a + b.exp() * b).sum(-1)
            tol = (beta**2 / 6 * (3 * big_l**3 + 6 * big_l**2 + 12 * big_l + 12)
                   + 3 * (V + 4 + 4 * big_l) * u / beta + 8 * V * (1 + big_l) * u)
            assert ((got - kl - beta * slope).abs() <= tol).all()
            assert (beta * slope.abs() > 10 * tol).all()
    hellinger2 = 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1)
    torch.testing.assert_close(BL.ab_divergence(s, t, alpha=0.5, beta=0.5), 4 * hellinger2, rtol=1e-12, atol=1e-14)
    h_w, t_w = BL.akl_weights(s, t, mu=0.5)
    torch.testing.assert_close(h_w + t_w, torch.ones_like(h_w), rtol=1e-14, atol=0)
    torch.testing.assert_close(BL.akl(s, t), h_w * fkl + t_w * rkl, rtol=1e-14, atol=0)
    # p = q gives 0 up to float64 rounding: a few roundings of each log-probability (|log p| <= max|log p|) in a
    # V-term sum, u64 = 2^-53
    zero_tol = 8 * s.shape[-1] * 2.0**-53 * (1 + torch.log_softmax(s, -1).abs().max())
    for fn in (BL.symmetric_kl, BL.skew_forward_kl, BL.skew_reverse_kl, BL.akl, BL.ab_divergence, BL.tvd):
        assert (fn(s, t) >= 0).all(), fn.__name__
        assert (fn(s, s.clone()).abs() <= zero_tol).all(), fn.__name__


def test_akl_tied_teacher_probabilities_split_head_and_tail_by_the_smaller_id():
    """A uniform teacher over V = 17 (every probability tied), μ = 0.5: the head is the first 8 tokens in the
    teacher's order, which on a tie is the smaller id first (as tests/reference.py and the sorted order of ids of a
    top-K set): {0, ..., 7}, not whatever order an unstable sort leaves tied entries in (torch.sort(descending=True)
    put id 8 first here, and the value depended on it). float64: the two differ by ~2e-4, the reference's own
    rounding is ~1e-16."""
    t = torch.zeros(1, 17, dtype=torch.float64)
    s = torch.arange(17, dtype=torch.float64)[None] * 0.1
    w_head, w_tail = BL.akl_weights(s, t, mu=0.5)
    q, p = torch.softmax(s, -1)[0], torch.softmax(t, -1)[0]
    g_head, g_tail = (q[:8] - p[:8]).abs().sum(), (q[8:] - p[8:]).abs().sum()
    torch.testing.assert_close(w_head[0], g_head / (g_head + g_tail), rtol=0, atol=1e-14)
    torch.testing.assert_close(w_tail[0], g_tail / (g_head + g_tail), rtol=0, atol=1e-14)
    torch.testing.assert_close(BL.akl(s, t, mu=0.5), R.akl(s, t, 0.5), rtol=0, atol=1e-12)


def test_akl_head_keeps_the_token_whose_cumulative_probability_equals_mu():
    """The head is the tokens whose cumulative teacher probability is <= μ (the docstring's rule): with μ set to the
    cumulative probability of the teacher's top two tokens, as the function computes it (so equal bit for bit), the
    second token is in the head — g_head = |p − q| over the top two, as plain sums — not in the tail (``>= μ``)."""
    t = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 1.5, 0.5, -1.0, -2.0]], dtype=torch.float64)
    p, q = torch.softmax(t, -1)[0], torch.softmax(s, -1)[0]
    mu = float(p.sort(descending=True, stable=True).values.cumsum(-1)[1])
    g_head, g_tail = (p[:2] - q[:2]).abs().sum(), (p[2:] - q[2:]).abs().sum()
    w_head, w_tail = BL.akl_weights(s, t, mu=mu)
    torch.testing.assert_close(w_head[0], g_head / (g_head + g_tail), rtol=0, atol=1e-14)
    torch.testing.assert_close(w_tail[0], g_tail / (g_head + g_tail), rtol=0, atol=1e-14)
    other = (p[0] - q[0]).abs() / (p - q).abs().sum()  # the head of the top token alone: far from it
    assert abs(float(w_head[0] - other)) > 0.1


def test_akl_weights_carry_no_gradient_and_follow_the_gaps():
    """μ = 0.98: the teacher's head is its two top tokens. A student that swaps them (same head mass, so the same
    tail) is off on the head only: all weight on FKL; one that permutes the tail is off on the tail only: all weight
    on RKL. The weights take no gradient."""
    t = torch.tensor([[4.0, 3.0, 0.0, -0.5, -1.0, -1.5]], dtype=torch.float64)
    head_swapped = torch.tensor([[3.0, 4.0, 0.0, -0.5, -1.0, -1.5]], dtype=torch.float64)
    tail_permuted = torch.tensor([[4.0, 3.0, -1.5, -1.0, -0.5, 0.0]], dtype=torch.float64)
    w_head, w_tail = BL.akl_weights(head_swapped, t, mu=0.98)
    assert w_head.item() == pytest.approx(1.0, abs=1e-12) and w_tail.item() == pytest.approx(0.0, abs=1e-12)
    w_head, w_tail = BL.akl_weights(tail_permuted, t, mu=0.98)
    assert w_head.item() == pytest.approx(0.0, abs=1e-12) and w_tail.item() == pytest.approx(1.0, abs=1e-12)
    x = head_swapped.clone().requires_grad_(True)
    assert not any(w.requires_grad for w in BL.akl_weights(x, t))


@pytest.mark.parametrize("name", ["sym_kl", "skew_kl", "skew_rkl", "akl", "alpha_beta", "tvd"])
def test_masked_tokens_and_extreme_logits_through_the_registry(name):
    """Through the registry (the objective's path): masked positions give exactly 0 and no gradient; logits of
    ±1e4 and −inf entries give finite values and gradients (float32)."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 12, generator=g) * 1e4
    t = torch.randn(2, 3, 12, generator=g) * 1e4
    s[0, 0, 3] = t[0, 0, 3] = -torch.inf  # a token both sides rule out
    labels = torch.randint(0, 12, (2, 3), generator=g)
    labels[1, 2] = -100
    mask = labels != -100
    x = s.clone().requires_grad_(True)
    div = bind(LossConfig(name=name)).per_token(x, t, labels, mask)
    assert div[1, 2] == 0
    div.sum().backward()
    assert torch.isfinite(div).all() and torch.isfinite(x.grad).all(), name
    assert (x.grad[1, 2] == 0).all()


def test_alpha_beta_limits_are_cichockis_and_the_docs_say_how_abkds_code_differs():
    """At β = 0 (α = 0) the α-β divergence is the continuous limit (1/α²) Σ (p^α log(p^α/q^α) − p^α + q^α) (resp.
    (1/β²) ...); ABKD's reference code (ab_div) divides these branches by α (β): α (β) times tailkd's value. The
    docstring and the README said nothing of it, so a run ported from ABKD's code at (0.6, 0) got 1/0.6 its loss."""
    s, t = _pair()
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    for a, b in ((0.6, 0.0), (0.0, 0.3)):
        w, v, e = (p, q, a) if b == 0 else (q, p, b)  # ABKD's branch: (1/e) Σ w^e log(w^e/v^e) − w^e + v^e
        abkd_code = ((w**e) * torch.log(w**e / v**e) - w**e + v**e).sum(-1) / e
        torch.testing.assert_close(e * BL.ab_divergence(s, t, alpha=a, beta=b), abkd_code, rtol=1e-12, atol=1e-14)
    assert "ABKD's reference code" in BL.ab_divergence.__doc__
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (row,) = [ln for ln in readme.splitlines() if ln.startswith("| `alpha_beta` |")]
    assert "ABKD's code divides" in row


def test_skew_kls_stay_finite_where_one_side_alone_has_no_mass():
    """The mixture keeps the target finite where the student (skew KL) or the teacher (skew RKL) puts no mass: the
    value is at most log 1/α (each term p log(p/(αp + ...)) <= p log 1/α), not +inf from a mixture taken as −inf."""
    gen = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 7, generator=gen, dtype=torch.float64), torch.randn(3, 7, generator=gen, dtype=torch.float64)
    s[:, 2], t[:, 4] = -float("inf"), -float("inf")
    for fn in (BL.skew_forward_kl, BL.skew_reverse_kl):
        got = fn(s, t, alpha=0.1)
        assert torch.isfinite(got).all() and (got <= math.log(10) + 1e-12).all(), fn.__name__


def test_alpha_beta_at_zero_zero_is_infinite_where_one_side_alone_has_mass():
    """At α = β = 0, ½ Σ (log p − log q)²: an entry where one side has mass and the other none (a teacher's −inf on a
    banned token, a student's −inf) makes it +inf, as it is the limit of every branch there (the entry's term
    q^(α+β)/(α(α+β)) grows without bound); an entry neither side has counts 0, as in the reduced vocabulary. The
    entry was dropped (a finite value: the student could put mass on the teacher's banned tokens at no cost)."""
    s, t = _pair(seed=8, shape=(2, 3, 9))
    for side in ("teacher", "student", "both"):
        s2, t2 = s.clone(), t.clone()
        if side != "student":
            t2[..., 4] = -torch.inf
        if side != "teacher":
            s2[..., 4] = -torch.inf
        got = BL.ab_divergence(s2, t2, alpha=0.0, beta=0.0)
        if side == "both":
            keep = [i for i in range(9) if i != 4]
            torch.testing.assert_close(got, R.ab_divergence(s[..., keep], t[..., keep], 0.0, 0.0), rtol=1e-12, atol=0)
            assert torch.equal(got, bind(LossConfig(name="alpha_beta", ab_alpha=0.0, ab_beta=0.0)).per_token(
                s2, t2, None, torch.ones(2, 3, dtype=torch.bool)))
        else:
            assert torch.isposinf(got).all(), side
        for eps in (1e-2, 1e-4):  # the branch α, β > 0 grows toward it (both −inf: toward the finite value)
            near = BL.ab_divergence(s2, t2, alpha=eps, beta=eps)
            assert (near > 1 / (4 * eps * eps) if side != "both" else (near - got).abs() < 0.1 * got).all(), side
