"""The divergences the DRKL paper (arXiv 2604.00223) compares with, per token, beside `tailkd.losses`: symmetric KL,
skew forward / reverse KL (DistiLLM), adaptive KL (AKL), the α-β divergence (ABKD) and total variation distance.

Same conventions as `tailkd.losses` (student first, teacher second, logits [..., V], float32 or float64, one value
per token, τ divides both sides, no τ² factor). Plain autograd, or sums of `tailkd.losses`' closed-form functions;
the chunked layer differentiates them chunk by chunk (`tailkd.fused`). Each is one row of `tailkd.registry`.
"""

from __future__ import annotations

import math

import torch

from tailkd.losses import (
    check_logits,
    check_nonnegative,
    check_temperature,
    check_unit_interval,
    forward_kl,
    kl_terms,
    reverse_kl,
    scaled_pair,
)

__all__ = ["ab_divergence", "akl", "akl_weights", "skew_forward_kl", "skew_reverse_kl", "symmetric_kl", "tvd"]


def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance TVD(p, q) = ½ Σ_i |p_i − q_i|, per token (in [0, 1]; symmetric, bounded).

    p = softmax(teacher_logits / τ), q = softmax(student_logits / τ). Plain autograd (the chunked layer
    differentiates it per chunk): the gradient ½ q_i (sign(q_i − p_i) − Σ_j q_j sign(q_j − p_j)), with sign(0) = 0.
    Used for distillation by e.g. Wen et al. 2023 (f-divergence minimisation for sequence-level KD).
    Shapes: logits [..., V] -> [...]; float32 (float64 for float64 input).
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    s, t = scaled_pair(student_logits, teacher_logits, temperature)
    return 0.5 * (torch.softmax(t, dim=-1) - torch.softmax(s, dim=-1)).abs().sum(-1)


def symmetric_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                 temperature: float = 1.0) -> torch.Tensor:
    """Symmetric KL (Jeffreys divergence) KL(p‖q) + KL(q‖p), per token: one of the baselines of the DRKL paper.

    The sum of `forward_kl` and `reverse_kl` (both closed form). Shapes: logits [..., V] -> [...]; float32 (float64
    for float64 input).
    """
    return (forward_kl(student_logits, teacher_logits, temperature=temperature)
            + reverse_kl(student_logits, teacher_logits, temperature=temperature))


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(α a + (1 − α) b) from log a, log b (α in [0, 1)), without forming the probabilities."""
    if alpha == 0:
        return log_b
    dead = torch.isneginf(log_a) & torch.isneginf(log_b)  # an entry neither side has: −inf, with a 0 gradient
    mixed = torch.logaddexp(torch.where(dead, 0.0, log_a) + math.log(alpha),
                            torch.where(dead, 0.0, log_b) + math.log1p(-alpha))
    return torch.where(dead, -torch.inf, mixed)


def _skew_logs(student_logits, teacher_logits, alpha: float, temperature: float):
    """(log q, log p) of the checked, τ-scaled logits of a skew divergence."""
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    check_unit_interval("alpha", alpha)
    s, t = scaled_pair(student_logits, teacher_logits, temperature)
    return torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)


def skew_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, alpha: float = 0.1,
                    temperature: float = 1.0) -> torch.Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024): KL(p ‖ αp + (1−α)q) per token; α = 0 is forward KL.

    The mixture keeps the target finite where the student puts no mass (bounded by log 1/α). Plain autograd.
    Shapes: logits [..., V] -> [...]; float32 (float64 for float64 input).
    """
    logq, logp = _skew_logs(student_logits, teacher_logits, alpha, temperature)
    return kl_terms(logp.exp(), logp, _log_mix(logp, logq, alpha))


def skew_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, alpha: float = 0.1,
                    temperature: float = 1.0) -> torch.Tensor:
    """Skew reverse KL (DistiLLM, Ko et al. 2024): KL(q ‖ αq + (1−α)p) per token; α = 0 is reverse KL.

    Plain autograd. Shapes: logits [..., V] -> [...]; float32 (float64 for float64 input).
    """
    logq, logp = _skew_logs(student_logits, teacher_logits, alpha, temperature)
    return kl_terms(logq.exp(), logq, _log_mix(logq, logp, alpha))


def akl_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, mu: float = 0.5,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AKL's (head, tail) weights [...] (Wu et al. 2024), detached: the teacher's tokens sorted by probability (tied
    probabilities by the smaller id: a stable sort, the same split on every device and for every batch shape),
    the head = those whose cumulative teacher probability is <= μ (the most likely token always), the tail = the
    rest; g = Σ |p_i − q_i| over each part; weights g_head / (g_head + g_tail) and g_tail / (g_head + g_tail)
    (0 and 0 where p = q)."""
    s, t = scaled_pair(student_logits.detach(), teacher_logits, temperature)
    p, q = torch.softmax(t, dim=-1), torch.softmax(s, dim=-1)  # [..., V]
    p_sorted, order = p.sort(dim=-1, descending=True, stable=True)
    gap = (p_sorted - q.gather(-1, order)).abs()  # [..., V]
    tail = p_sorted.cumsum(-1) > mu
    tail[..., 0] = False
    g_tail = torch.where(tail, gap, 0.0).sum(-1)
    g_head = torch.where(tail, 0.0, gap).sum(-1)
    total = g_head + g_tail
    safe = torch.where(total > 0, total, 1.0)
    return torch.where(total > 0, g_head / safe, 0.0), torch.where(total > 0, g_tail / safe, 0.0)


def akl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, mu: float = 0.5,
        temperature: float = 1.0) -> torch.Tensor:
    """Adaptive KL (AKL, Wu et al. 2024, "Rethinking KL divergence in KD for LLMs", arXiv 2404.02657), per token:
    w_head·KL(p‖q) + w_tail·KL(q‖p), the weights from the student's gaps to the teacher on the teacher's head and
    tail (`akl_weights`, no gradient): forward KL where the head is off, reverse KL where the tail is.

    Shapes: logits [..., V] -> [...]; float32 (float64 for float64 input).
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    check_unit_interval("mu", mu)
    w_head, w_tail = akl_weights(student_logits, teacher_logits, mu=mu, temperature=temperature)
    return (w_head * forward_kl(student_logits, teacher_logits, temperature=temperature)
            + w_tail * reverse_kl(student_logits, teacher_logits, temperature=temperature))


def ab_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, alpha: float = 0.5,
                  beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """The α-β divergence (Cichocki et al. 2011; ABKD, Wang et al. 2025, arXiv 2505.04560) of the teacher p from the
    student q, per token, for α, β >= 0:

        D_AB = −1/(αβ) Σ_i (p_i^α q_i^β − α/(α+β) p_i^(α+β) − β/(α+β) q_i^(α+β)),

    with its limits (1/α²) Σ (p^α log(p^α/q^α) − p^α + q^α) at β = 0 (α = 1: KL(p‖q)), (1/β²) Σ (q^β log(q^β/p^β)
    − q^β + p^β) at α = 0 (β = 1: KL(q‖p)) and ½ Σ (log p − log q)² at α = β = 0, +inf where one side alone has mass
    (Cichocki et al.'s limits, continuous in α and β; ABKD's reference code, ``ab_div`` in its distillm/losses.py,
    divides those two branches by α and β instead of α² and β²: α resp. β times these values, equal at α = 1 resp.
    β = 1). α trades the focus on the
    teacher's modes, β the spread of the student's mass. Default α = β = 0.5: 2 Σ (√p − √q)². Plain autograd;
    powers formed from log-probabilities. Shapes: logits [..., V] -> [...]; float32 (float64 for float64 input).
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    check_nonnegative("alpha", alpha)
    check_nonnegative("beta", beta)
    s, t = scaled_pair(student_logits, teacher_logits, temperature)
    logq, logp = torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)  # [..., V]
    if alpha == 0 and beta == 0:  # an entry that one side alone rules out: +inf; that both do: 0 (no NaN gradient)
        d = torch.where(torch.isneginf(logp) & torch.isneginf(logq), 0.0, logp - logq)
        return 0.5 * d.square().sum(-1)
    if beta == 0:
        pa, qa = (alpha * logp).exp(), (alpha * logq).exp()
        return (kl_terms(pa, alpha * logp, alpha * logq) - (pa - qa).sum(-1)) / alpha**2
    if alpha == 0:
        pb, qb = (beta * logp).exp(), (beta * logq).exp()
        return (kl_terms(qb, beta * logq, beta * logp) - (qb - pb).sum(-1)) / beta**2
    ab = alpha + beta
    terms = ((alpha * logp + beta * logq).exp() - alpha / ab * (ab * logp).exp() - beta / ab * (ab * logq).exp())
    return -terms.sum(-1) / (alpha * beta)
