"""The training objective: CLM + divergence (+ hidden cosine), normalised in ONE place.

Per valid token t (labels already shifted once by the data pipeline, -100 = ignore)::

    L(t) = clm_weight * CE(q_t, y_t) + div_weight * D(t) + cosine_weight * (1 - cos(h_S, h_T))

and the value returned for backward is ``Σ_t L(t) / num_valid_tokens`` where ``num_valid_tokens``
is the GLOBAL number of valid tokens of the optimizer step: summed over every gradient-accumulation
micro-batch and every data-parallel rank, counted before the step. With that denominator the
accumulated gradient equals the gradient of one big batch (the TRL #4719 class of bugs cannot
happen). The default weights are the paper's Eq. 4: CLM + L_DIV per token, no mixing weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tailkd import losses
from tailkd.config import LossConfig

IGNORE_INDEX = -100


def valid_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: positions that carry a next-token label."""
    return labels != IGNORE_INDEX


def count_valid_tokens(labels: torch.Tensor) -> int:
    return int(valid_mask(labels).sum().item())


def per_token_divergence(
    cfg: LossConfig,
    student_logits: torch.Tensor,  # (B, T, V)
    teacher_logits: torch.Tensor,  # (B, T, V)
    labels: torch.Tensor,  # (B, T), -100 = ignore
    *,
    segment_ids: torch.Tensor | None = None,  # (B, T), documents of packed rows
) -> torch.Tensor:
    """The divergence named by ``cfg.name`` per token, ``[B, T]`` float32, 0 where labels are -100."""
    mask = valid_mask(labels)
    name = cfg.name
    if name == "tad":
        seg = segment_ids if cfg.per_document else None
        div = losses.tad(student_logits, teacher_logits, mask, k=cfg.k, beta=cfg.beta, segment_ids=seg,
                         temperature=cfg.temperature)
    elif name == "kd":
        div = losses.forward_kl(student_logits, teacher_logits, temperature=cfg.temperature)
    elif name == "rkl":
        div = losses.reverse_kl(student_logits, teacher_logits, temperature=cfg.temperature)
    elif name == "jsd":
        div = losses.jsd(student_logits, teacher_logits, beta=cfg.jsd_beta, temperature=cfg.temperature)
    elif name == "dkd":
        div = losses.dkd(student_logits, teacher_logits, labels, alpha=cfg.dkd_alpha, beta=cfg.dkd_beta,
                         temperature=cfg.temperature)
    elif name == "drkl":
        div = losses.drkl(student_logits, teacher_logits, labels, gamma=cfg.gamma, anchor=cfg.drkl_anchor)
    else:
        raise ValueError(f"loss {name!r} has no divergence; choose tad, kd, rkl, jsd, dkd or drkl")
    return torch.where(mask, div, torch.zeros_like(div))


@dataclass
class ObjectiveTerms:
    """``loss`` is differentiable; the other terms are detached, in the same normalisation."""

    loss: torch.Tensor
    clm: torch.Tensor
    div: torch.Tensor
    cos: torch.Tensor


def objective(
    student_logits: torch.Tensor,  # (B, T, V), already sliced to the shared vocabulary
    labels: torch.Tensor,  # (B, T)
    num_valid_tokens: int | torch.Tensor,
    *,
    cfg: LossConfig | None = None,
    teacher_logits: torch.Tensor | None = None,  # (B, T, V); None only for loss "clm"
    segment_ids: torch.Tensor | None = None,
    student_hidden: torch.Tensor | None = None,  # (B, T, d_S)
    teacher_hidden: torch.Tensor | None = None,  # (B, T, d_T)
    divergence: torch.Tensor | None = None,  # (B, T) precomputed per-token divergence (e.g. from a teacher cache)
) -> ObjectiveTerms:
    """Σ over valid tokens of the weighted terms, divided by the global valid-token count of the step."""
    cfg = cfg or LossConfig()
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(student_logits.shape)}")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32  # float32 math, f64 stays
    denom = torch.as_tensor(num_valid_tokens, dtype=dtype, device=student_logits.device).clamp_min(1.0)
    mask = valid_mask(labels)
    V = student_logits.shape[-1]

    clm_tok = F.cross_entropy(student_logits.to(dtype).reshape(-1, V), labels.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none").view_as(labels)  # (B, T)
    clm_sum = clm_tok.sum()
    zero = student_logits.new_zeros((), dtype=dtype)

    div_sum = zero
    if cfg.name != "clm":
        if divergence is None:
            if teacher_logits is None:
                raise ValueError(f"loss {cfg.name!r} needs teacher_logits (or a precomputed divergence)")
            divergence = per_token_divergence(cfg, student_logits, teacher_logits, labels, segment_ids=segment_ids)
        div_sum = torch.where(mask, divergence, torch.zeros_like(divergence)).sum()

    cos_sum = zero
    if cfg.cosine_weight > 0:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError("cosine_weight > 0 needs student_hidden and teacher_hidden")
        cos_sum = losses.hidden_cosine(student_hidden, teacher_hidden, mask).sum()

    total = cfg.clm_weight * clm_sum + cfg.div_weight * div_sum + cfg.cosine_weight * cos_sum
    return ObjectiveTerms(
        loss=total / denom,
        clm=(clm_sum / denom).detach(),
        div=(div_sum / denom).detach(),
        cos=(cos_sum / denom).detach(),
    )
