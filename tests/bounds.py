"""Rounding-error bounds behind every float32 / bfloat16 tolerance of the test suite.

Model (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 2-4). A correctly rounded float32 operation
returns (x op y)(1 + δ) with |δ| <= u = 2^-24 ≈ 6.0e-8 (bfloat16: u = 2^-8 ≈ 3.9e-3). The exp/log/tanh kernels of
torch's CPU back ends (SLEEF "u10", glibc, MKL VML) are within 1 ulp = 2u; the bounds charge them u, and
SAFETY = 2 covers that factor together with the first-order truncation (products of (1 + δ_i) expanded to first
order: every bound here has n·u < 1e-3, so the neglected second-order terms are < 0.1 % of the bound).

Accumulation. An n-term sum (or dot product) computed in ANY order has |error| <= γ_{n-1} Σ|terms|,
γ_n = n u / (1 − n u): this deterministic bound holds whatever SIMD width, blocking or thread split torch
picks, and is the default below. Note that it scales with Σ|terms|, not |Σ terms|: a sum of terms of mixed sign
(a KL written as a difference, a gradient q − p) is bounded by the size of what cancels. `gamma_rw` is the
probabilistic alternative of Higham & Mary (SIAM J. Sci. Comput. 41, 2019): modelling the rounding errors as
independent, mean-zero random variables, |error| <= λ √n u Σ|terms| with probability >= 1 − 2n·exp(−λ²/2)
(λ = 7: <= 5e-11 per rounding); a test uses it only where it says so (long sums, whole networks).

Sums longer than λ² = 49 terms are charged the random-walk n_eff = λ√n instead of n (`n_eff`); shorter ones the
deterministic n.

Condition of log-sum-exp and log-softmax (`loss_bounds.py` builds on this). For logits z [V], m = max z, M = max|z|:
- S = Σ_j exp(z_j − m) (terms <= 1, S >= 1): the V-term sum, the rounded exp arguments (Σ_j e_j·u|z_j − m| <= (V−1)u/e)
  and the exp kernel give S a relative error, which the log turns into an absolute one common to every output:
  κ_V = u(1.4 n_eff(V) + ln V + 2);
- log-sum-exp = m + log S rounds a number of size up to M + ln V: its error κ_V + u|lse| is ABSOLUTE and proportional
  to the logit scale M (whatever the size of the loss built from it) — the 1e4-logit tests live on this term;
- torch's CPU log_softmax computes (z_i − m) − log S (both rounded: u|z_i − m| + u|log q_i| <= 2u|log q_i|), so its
  error, κ_V + 2u|log q_i|, is small where the mass is and grows like u·|log q_i| <= u(2M + ln V) in the far tail;
- q_i = exp(log q_i) carries that error plus u as a relative error; z/τ rounds each logit once more: u(|z_i| + M).
"""

from __future__ import annotations

import math

import torch

U32 = 2.0**-24  # float32 unit roundoff (half an ulp of 1)
U_BF16 = 2.0**-8  # bfloat16 unit roundoff (8 significand bits)
F32_SUBNORMAL = 2.0**-149  # float32 spacing below 2^-126: the absolute rounding error of a (sub-normal) tiny value
SAFETY = 2.0  # 1-ulp transcendental kernels (charged u above) and first-order truncation; see the docstring
REF64_ATOL = 1e-12  # a float64 reference's own rounding (u64 = 1.1e-16 times magnitudes <= 1e3-1e4), where the float32
# bound is 0 (entries the library computes exactly, e.g. a structurally zero gradient) but the reference is not
LAMBDA = 7.0  # probabilistic (random-walk) bounds: failure probability <= 2n·exp(−λ²/2) = 4.6e-11·n


def gamma(n: int, u: float = U32) -> float:
    """γ_n = n u / (1 − n u): the relative error bound of an (n+1)-term sum or dot product, in any order."""
    n = max(int(n), 0)
    return n * u / (1.0 - n * u)


def gamma_rw(n: int, u: float = U32, lam: float = LAMBDA) -> float:
    """λ √n u: the random-walk (Higham-Mary) version of γ_n, for long accumulations; see the module docstring."""
    return lam * math.sqrt(max(int(n), 0)) * u


def n_eff(n: int, lam: float = LAMBDA) -> float:
    """The number of rounding errors an n-term accumulation is charged: n (deterministic) up to λ² = 49 terms, the
    random-walk λ√n (Higham-Mary, see the module docstring) beyond."""
    n = max(int(n), 0)
    return min(float(n), lam * math.sqrt(n))


def f32_sum_tol(n_terms: int, magnitude: float, *, random_walk: bool = False, u: float = U32) -> float:
    """SAFETY · γ_{n−1} · Σ|terms|: |error| of a float32 sum of `n_terms` terms whose absolute values sum to
    `magnitude` (the deterministic bound; λ√n u Σ|terms| with ``random_walk``). The same bound, doubled, covers two
    evaluations of the sum in different orders."""
    g = gamma_rw(n_terms, u) if random_walk else gamma(n_terms - 1, u)
    return SAFETY * g * float(magnitude)


def f32_dot_atol(k: int, abs_product, *, u: float = U32):
    """SAFETY · γ_k · (|A| @ |B|): elementwise |error| of a float32 matrix product with inner dimension k, given the
    product of the absolute values (computed in float64 by the caller); tensor in, tensor out."""
    return SAFETY * gamma(k, u) * abs_product


def rope_rows_atol(k: int, pair_product):
    """|error| allowed between two float32 models' q (or k) rows after RoPE, each row a k-term product of the same
    inputs and weights summed in its own blocking (f32_dot_atol each) and RoPE mixing it with its pair partner
    (|cos| + |sin| <= √2) and rounding 3 times (u|q cos| + u|q' sin| + u|sum|): twice one model's;
    ``pair_product`` the larger |x|·|W| of a row and its partner (float64)."""
    return 2 * (math.sqrt(2) * f32_dot_atol(k, pair_product) + SAFETY * 3 * U32 * math.sqrt(2) * pair_product)


def logit_scale(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """M = max_i |z_i| / τ over the finite entries of each row of z [..., V] -> [...] float64 (0 for a row without
    finite entries): the condition of log-softmax (its rounding error is absolute, u·M)."""
    a = z.detach().double().abs()
    a = torch.where(torch.isfinite(a), a, 0.0)
    return a.amax(-1) / temperature


def lse_kappa(n: int, u: float = U32) -> float:
    """κ_n = u(1.4 n_eff(n) + ln n + 2): the error of log Σ_j exp(z_j − max z) over n entries, common to every output
    of a float32 log-sum-exp / log-softmax (module docstring)."""
    return u * (1.4 * n_eff(n) + math.log(max(n, 1)) + 2.0)


def decoder_fan_in(config, seq_len: int, *, head: bool = True) -> int:
    """N: the number of rounded terms accumulated on the path from the embeddings to one logit (``head=False``: to one
    final hidden unit) of a pre-norm decoder (Llama, Qwen2, Mistral, Gemma-2, GPT-2 configs): per layer two norms (d
    terms each), q/k/v (d), the scores (head_dim), the softmax and the attention-weighted sum over the T positions,
    o_proj (d), gate/up (d) and down (d_ff); then the final norm (d) and the LM head (d)."""
    d = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    d_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    head_dim = getattr(config, "head_dim", None) or d // heads
    per_layer = 2 * d + 3 * d + head_dim + 2 * seq_len + d + 2 * d + d_ff
    return layers * per_layer + d + (d if head else 0)


def f32_forward_rel(fan_in: int) -> float:
    """SAFETY · λ √N u: relative error bound (against the magnitude |h|·|W| of the last accumulation) of a float32
    network output whose dependency path accumulates N = `fan_in` rounded terms (`decoder_fan_in`). Model: the
    random-walk rounding errors of Higham-Mary (N is in the thousands: the deterministic N u would be ~λ√N times
    larger and never attained), and layers of unit condition — pre-norm residual blocks renormalise every sublayer's
    input, so an error relative to a layer's activations reaches the output relative to the output's magnitude. Two
    forwards of the same network on the same row (another batch, another length, another kernel) differ by at most
    twice this. A model, not a theorem: the tests that use it say so."""
    return SAFETY * gamma_rw(fan_in)


def assert_within(got, want, atol, rtol=0.0, msg: str = "") -> None:
    """|got − want| <= atol + rtol·|want| elementwise, in float64, with `atol` a number or a tensor broadcastable to
    the values (a per-element bound; NaN where the reference is finite is no bound: refused). Non-finite entries must
    agree exactly (same infinity, or both NaN)."""
    got = torch.as_tensor(got).detach().double()
    want = torch.as_tensor(want).detach().double()
    assert got.shape == want.shape, f"{msg}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    finite = torch.isfinite(want)
    same_nonfinite = (got == want) | (torch.isnan(got) & torch.isnan(want))
    assert bool((finite | same_nonfinite).all()), f"{msg}: non-finite entries differ: {got[~finite]} vs {want[~finite]}"
    assert bool(torch.isfinite(got[finite]).all()), f"{msg}: got non-finite values where the reference is finite"
    allowed = torch.as_tensor(atol, dtype=torch.float64) + rtol * want.abs()
    allowed = torch.broadcast_to(allowed, want.shape)
    assert not bool(torch.isnan(allowed[finite]).any()), f"{msg}: the bound is NaN where the reference is finite"
    diff = torch.where(finite, (got - want).abs(), 0.0)
    over = diff > allowed
    if bool(over.any()):
        ratio = torch.where(finite, diff / allowed.clamp_min(1e-300), 0.0)
        i = int(ratio.argmax())
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), want.shape)) if want.dim() else ()
        raise AssertionError(
            f"{msg}: {int(over.sum())}/{over.numel()} entries beyond the bound; worst at {idx}: got "
            f"{got.reshape(-1)[i].item():.10g}, want {want.reshape(-1)[i].item():.10g}, |diff| "
            f"{diff.reshape(-1)[i].item():.3g} > allowed {allowed.reshape(-1)[i].item():.3g} "
            f"(x{ratio.reshape(-1)[i].item():.3g})"
        )
