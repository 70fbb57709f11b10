"""A user's own loss, as README "A loss of your own" writes one: squared Hellinger distance, registered from outside
tailkd's source, with a per-token function (the dense path) and a closed-form RowKernel (the chunked layer)."""

from typing import NamedTuple

import torch

from tailkd import divergences as dv
from tailkd.losses import check_logits, check_temperature, scaled_pair
from tailkd.registry import LossSpec, register


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
