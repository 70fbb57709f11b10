"""A user's own loss, as README "A loss of your own" writes one: squared Hellinger distance, registered from outside
tailkd's source, with a per-token function (the dense path) and a closed-form RowKernel (the chunked layer)."""

from typing import NamedTuple

import torch

from tailkd import divergences as dv
from tailkd.losses import check_logits, check_temperature, scaled_pair
from tailkd.registry import LossSpec, per_token_by_kernel, register


def hellinger(student_logits, teacher_logits, *, temperature=1.0):
    """Squared Hellinger distance ½ Σ_i (√p_i − √q_i)² per token, by plain autograd (the user's per-token function)."""
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    s, t = scaled_pair(student_logits, teacher_logits, temperature)
    sqrt_p, sqrt_q = torch.exp(0.5 * torch.log_softmax(t, -1)), torch.exp(0.5 * torch.log_softmax(s, -1))
    return 0.5 * (sqrt_p - sqrt_q).square().sum(-1)


class _SqrtP(NamedTuple):
    sqrt_p: torch.Tensor


def h_teacher(t):
    return _SqrtP(torch.log_softmax(t, -1).mul_(0.5).exp_())


def h_forward(s, logq, teacher, w=None):
    sq = logq.mul_(0.5).exp_()
    value = 0.5 * (teacher.sqrt_p - sq).square().sum(-1)
    return value, (sq, teacher.sqrt_p, value)


def h_backward(state, cd, cq, inplace=True):
    """∂H²/∂s_j = ½ (q_j (1 − H²) − √(p_j q_j))."""
    sq, sp, value = state
    q = sq * sq
    g = q * (0.5 * cd * (1 - value))[:, None] - 0.5 * cd[:, None] * sp * sq
    return g if cq is None else g + cq[:, None] * q


HELLINGER = dv.RowKernel(h_teacher, h_forward, h_backward)


def hellinger_per_token(d, s, t, labels, mask, seg):
    return hellinger(s, t, temperature=d.cfg.temperature)


def register_hellinger(kernel: bool = True) -> LossSpec:
    """Register ``hellinger`` (with its kernel, or autograd per chunk without)."""
    return register(LossSpec("hellinger", "½ Σ (√p − √q)²", "squared Hellinger distance", hellinger_per_token,
                             kernel=(lambda c: HELLINGER) if kernel else None, flops_per_vocab=18,
                             knobs=("temperature",)))


# --------------------------------------------------------------------------- a loss with an option of its own


def amari(student_logits, teacher_logits, *, alpha=0.5, temperature=1.0):
    """Amari's α-divergence D_α(p‖q) = (1 − Σ_i p_i^α q_i^(1−α)) / (α(1−α)) per token, 0 < α < 1 (α → 1: KL(p‖q);
    α = ½: four times the squared Hellinger distance), by plain autograd (the user's per-token function)."""
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    s, t = scaled_pair(student_logits, teacher_logits, temperature)
    mixed = torch.exp(alpha * torch.log_softmax(t, -1) + (1 - alpha) * torch.log_softmax(s, -1)).sum(-1)
    return (1 - mixed) / (alpha * (1 - alpha))


class _LogP(NamedTuple):
    logp: torch.Tensor


def amari_kernel(cfg) -> dv.RowKernel:
    """The closed-form rows of D_α with α = ``cfg.options["alpha"]``; ValueError for an α outside (0, 1), raised where
    the kernel is made (the CLI's validation makes it: one line before the run starts). With A = Σ p^α q^(1−α):
    ∂D/∂s_j = −(p_j^α q_j^(1−α) − q_j A) / α."""
    alpha = cfg.options["alpha"]
    if not 0 < alpha < 1:
        raise ValueError(f"amari's alpha={alpha:g} must be in (0, 1) (alpha -> 1 is KL(p||q))")

    def teacher(t):
        return _LogP(torch.log_softmax(t, -1))

    def forward(s, logq, t, w=None):
        r = torch.exp(alpha * t.logp + (1 - alpha) * logq)
        mixed = r.sum(-1)
        return (1 - mixed) / (alpha * (1 - alpha)), (logq.exp_(), r, mixed)

    def backward(state, cd, cq, inplace=True):
        q, r, mixed = state
        g = (q * mixed[:, None] - r) * (cd / alpha)[:, None]
        return g if cq is None else g + cq[:, None] * q

    return dv.RowKernel(teacher, forward, backward)


def amari_per_token(d, s, t, labels, mask, seg):
    return amari(s, t, alpha=d.cfg.options["alpha"], temperature=d.cfg.temperature)


def register_amari(kernel: bool = True, dense_by_kernel: bool = False) -> LossSpec:
    """Register ``amari`` with its option ``alpha`` (default 0.5): ``--loss.options alpha=0.3``; with its kernel (else
    autograd per chunk), and with ``dense_by_kernel`` the kernel on the dense path too (`per_token_by_kernel`) instead
    of the autograd per-token function."""
    return register(LossSpec("amari", "(1 − Σ p^α q^(1−α)) / (α(1−α))", "Amari's α-divergence",
                             per_token_by_kernel if dense_by_kernel else amari_per_token,
                             kernel=amari_kernel if kernel else None, flops_per_vocab=20, knobs=("temperature",),
                             options={"alpha": 0.5}))
