"""The loss of a training step: student forward → dense | chunked | sparse divergence, normalised in ONE place.

Per valid token t (labels already shifted once by the data pipeline, -100 = ignore)::

    L(t) = clm_weight * CE(q_t, y_t) + div_weight * D(t) + cosine_weight * (1 - cos(h_S, h_T))

(a term of weight 0 among div and cosine is not computed: the teacher does not enter it, even with NaN logits)

plus, for a mixture-of-experts student whose config sets ``output_router_logits`` (as transformers' models then add
it to their own loss), ``router_aux_loss_coef`` times the model's router load-balancing loss (``aux_loss``) of each
micro-batch, weighted by the micro-batch's valid tokens (``aux``: in one micro-batch exactly the model's own
``coef * aux_loss``; transformers computes it over the positions its attention mask keeps: a batch of padded rows
(`tailkd.sft.SFTRows`, on-policy rows) hands the student its ``attention_mask``, so padding routes no token)

and the value returned for backward is ``Σ_t L(t) / num_valid_tokens`` where ``num_valid_tokens`` is the GLOBAL
number of valid tokens of the optimizer step: summed over every gradient-accumulation micro-batch and every
data-parallel rank, counted before the step. With that denominator the accumulated gradient equals the gradient of
one big batch (the TRL #4719 class of bugs cannot happen). The default weights are the paper's Eq. 4: CLM + L_DIV
per token, no mixing weight. `_normalised` is the only division.

Three ways to the sums, one per teacher signal (`tailkd.teacher.TeacherSignal`) and loss layer:
- dense: the student's full logits [B, T, V] and the registry's per-token function (`tailkd.losses`);
- chunked: the student's final hidden states and LM head (`tailkd.fused`, never [B, T, V]);
- sparse: a top-K teacher cache (`divergences.SPARSE`), with either student path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tailkd import fused, losses, registry
from tailkd.data import IGNORE_INDEX, model_inputs, to_device
from tailkd.divergences import SparseTeacher
from tailkd.errors import TailkdError
from tailkd.head import Head, apply_head, forward_hidden, model_head

__all__ = ["IGNORE_INDEX", "ObjectiveTerms", "chunked_objective", "computed_divergence", "count_valid_tokens",
           "check_router_aux", "distill_loss", "objective", "router_weight", "step_terms"]


def valid_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: positions that carry a next-token label."""
    return labels != IGNORE_INDEX


def count_valid_tokens(labels: torch.Tensor) -> int:
    return int(valid_mask(labels).sum().item())


@dataclass
class ObjectiveTerms:
    """``loss`` is differentiable; the other terms are detached, in the same normalisation (``aux``: the router
    load-balancing term, already weighted by its coefficient; 0 for a dense student)."""

    loss: torch.Tensor
    clm: torch.Tensor
    div: torch.Tensor
    cos: torch.Tensor
    aux: torch.Tensor


def _denominator(num_valid_tokens, like: torch.Tensor | None) -> torch.Tensor | float:
    """THE denominator: the step's global valid-token count (>= 1); a tensor count on ``like``'s device and dtype."""
    if isinstance(num_valid_tokens, torch.Tensor):
        return num_valid_tokens.to(like.device, like.dtype).clamp_min(1.0)
    return float(max(1, num_valid_tokens))  # a Python count: no host-to-device copy (a CUDA tensor made from a
    # scalar waits for the device)


def _expected_gradient(num_valid_tokens, loss_scale: float) -> float:
    """The gradient that ``(loss * loss_scale).backward()`` sends to the total `_normalised` divides by a host
    count: float32 ``loss_scale`` times the float32 ``1 / n``, rounded once — how CUDA divides by a host scalar
    (by its reciprocal); the CPU divides, the same value where ``loss_scale`` is a power of two (one process: 1).
    The layer's backward compares, and scales its gradients only where the incoming gradient differs (a device
    count: unknown here, 1.0 — the backward then scales)."""
    if isinstance(num_valid_tokens, torch.Tensor):
        return 1.0
    one = torch.tensor(1.0 / _denominator(num_valid_tokens, None), dtype=torch.float32)
    return float(one * torch.tensor(loss_scale, dtype=torch.float32))


def _normalised(total, clm_sum, div_sum, cos_sum, num_valid_tokens, aux_sum=None) -> ObjectiveTerms:
    """Every sum over valid tokens divided by `_denominator` (``aux_sum``: the router term times the micro-batch's
    valid tokens, added to the total)."""
    denom = _denominator(num_valid_tokens, total)
    if aux_sum is None:  # a dense student: the total as it is (no extra device operation)
        aux_sum = total.new_zeros(())
    else:
        aux_sum = aux_sum.to(total.dtype)
        total = total + aux_sum
    return ObjectiveTerms(loss=total / denom, clm=(clm_sum / denom).detach(), div=(div_sum / denom).detach(),
                          cos=(cos_sum / denom).detach(), aux=(aux_sum / denom).detach())


def _divergence(cfg) -> registry.Divergence | None:
    """The bound divergence of a `LossConfig`, or None when the loss needs no teacher (``clm``)."""
    d = registry.bind(cfg)
    return d if d.spec.needs_teacher else None


def computed_divergence(cfg) -> registry.Divergence | None:
    """The divergence a step computes for loss config ``cfg``: `_divergence`, or None when ``cfg.div_weight`` is 0 —
    a divergence of weight 0 is not computed, so the teacher does not enter the step (0·D would be NaN for a teacher
    with NaN logits, and cost a pass over [N, V]); its knobs are checked all the same (`registry.bind`)."""
    d = _divergence(cfg)
    return d if cfg.div_weight != 0 else None


def _cosine_sum(cfg, student_hidden, teacher_hidden, labels, dtype) -> torch.Tensor | None:
    if cfg.cosine_weight <= 0:
        return None
    if student_hidden is None or teacher_hidden is None:
        raise ValueError("cosine_weight > 0 needs student_hidden and teacher_hidden")
    mask = to_device(valid_mask(labels), student_hidden.device)
    return losses.hidden_cosine(student_hidden, teacher_hidden, mask).sum().to(dtype)


def objective(
    student_logits: torch.Tensor,  # (B, T, V), already sliced to the shared vocabulary
    labels: torch.Tensor,  # (B, T)
    num_valid_tokens: int | torch.Tensor,
    *,
    cfg=None,  # tailkd.config.LossConfig
    teacher_logits: torch.Tensor | None = None,  # (B, T, V); None for loss "clm" or a sparse teacher
    sparse_teacher: SparseTeacher | None = None,  # fields (B, T, ...): a top-K teacher cache
    segment_ids: torch.Tensor | None = None,
    student_hidden: torch.Tensor | None = None,  # (B, T, d_S)
    teacher_hidden: torch.Tensor | None = None,  # (B, T, d_T)
    router_aux: torch.Tensor | None = None,  # coef * aux_loss * this micro-batch's valid tokens (`step_terms`)
) -> ObjectiveTerms:
    """The dense path: Σ over valid tokens of the weighted terms from full logits, / the global valid-token count."""
    from tailkd.config import LossConfig

    cfg = cfg or LossConfig()
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(student_logits.shape)}")
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32  # float32 math, f64 stays
    mask = valid_mask(labels)
    # NaN/±inf rows at ignored positions (padding rows of some attention implementations): zeroed, so that their
    # gradient is 0, not 0·NaN, and the valid positions' values and gradients are exactly as without them
    student_logits = losses.zero_masked_rows(student_logits, mask)
    if teacher_logits is not None:
        teacher_logits = losses.zero_masked_rows(teacher_logits, mask)
    V = student_logits.shape[-1]
    clm_sum = F.cross_entropy(student_logits.to(dtype).reshape(-1, V), labels.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
    zero = student_logits.new_zeros((), dtype=dtype)
    div_sum = zero
    d = computed_divergence(cfg)
    if d is not None:
        if sparse_teacher is not None:
            div = d.sparse_per_token(student_logits, sparse_teacher, mask, segment_ids)
        elif teacher_logits is None:
            raise ValueError(f"loss {cfg.name!r} needs teacher_logits (or a sparse teacher)")
        else:
            div = d.per_token(student_logits, teacher_logits, labels, mask, segment_ids)
        div_sum = div.sum().to(dtype)
    cos_sum = _cosine_sum(cfg, student_hidden, teacher_hidden, labels, dtype)
    cos_sum = zero if cos_sum is None else cos_sum
    total = cfg.clm_weight * clm_sum + cfg.div_weight * div_sum + cfg.cosine_weight * cos_sum
    return _normalised(total, clm_sum, div_sum, cos_sum, num_valid_tokens, router_aux)


def chunked_objective(
    student_hidden: torch.Tensor,  # (B, T, d_S) final hidden states (post final norm)
    student_head: Head,
    labels: torch.Tensor,  # (B, T), -100 = ignore; may stay on the host (the chunk plan then needs no device sync)
    num_valid_tokens: int | torch.Tensor,
    *,
    cfg=None,  # tailkd.config.LossConfig
    teacher_hidden: torch.Tensor | None = None,  # (B, T, d_T)
    teacher_head: Head | None = None,
    sparse_teacher: SparseTeacher | None = None,
    segment_ids: torch.Tensor | None = None,
    seq_alpha_mean: torch.Tensor | None = None,  # (B, T) TAD ᾱ computed elsewhere
    chunk_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    kernels: bool = True,
    loss_scale: float = 1.0,
    router_aux: torch.Tensor | None = None,  # coef * aux_loss * this micro-batch's valid tokens (`step_terms`)
) -> ObjectiveTerms:
    """The chunked path: the same terms as `objective` from final hidden states + LM heads (`fused.chunked_sums`;
    ``kernels``: its Triton row kernels where they apply), never [B, T, V] logits; same denominator.

    ``loss_scale``: the factor the caller multiplies the returned loss by before ``backward`` (several processes:
    `tailkd.distributed.loss_scale`). It changes no value; the layer computes its gradients at the gradient its
    total will then receive, so that its backward has nothing to scale."""
    from tailkd.config import LossConfig

    cfg = cfg or LossConfig()
    expected = _expected_gradient(num_valid_tokens, loss_scale)
    sums = fused.chunked_sums(student_hidden, student_head, labels, computed_divergence(cfg),
                              clm_weight=cfg.clm_weight, div_weight=cfg.div_weight, teacher_hidden=teacher_hidden,
                              teacher_head=teacher_head, sparse_teacher=sparse_teacher, segment_ids=segment_ids,
                              seq_alpha_mean=seq_alpha_mean, chunk_size=chunk_size, matmul_dtype=matmul_dtype,
                              kernels=kernels, grad_scale=expected)
    total, cos_sum = sums.total, _cosine_sum(cfg, student_hidden, teacher_hidden, labels, sums.total.dtype)
    if cos_sum is not None:
        total = total + cfg.cosine_weight * cos_sum
    return _normalised(total, sums.clm, sums.div, total.new_zeros(()) if cos_sum is None else cos_sum,
                       num_valid_tokens, router_aux)


def router_weight(student) -> float:
    """The weight of a mixture-of-experts student's router load-balancing loss (its forward's ``aux_loss``):
    ``router_aux_loss_coef`` where its config sets ``output_router_logits`` (transformers' models then add
    ``coef * aux_loss`` to their own loss), else 0 (a dense student, or the setting off: transformers' default)."""
    config = getattr(getattr(student, "module", student), "config", None)  # DDP keeps the model in .module
    if not getattr(config, "output_router_logits", False):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", None) or 0.0)


def _aux_loss(student, out) -> torch.Tensor:
    """The forward output's ``aux_loss``, or a one-line TailkdError where the model returns none."""
    aux = getattr(out, "aux_loss", None)
    if not isinstance(aux, torch.Tensor):
        raise TailkdError(f"the student's config sets output_router_logits, but its forward "
                          f"({type(getattr(student, 'module', student)).__name__}) returned no aux_loss: set "
                          "output_router_logits to false in its config.json")
    return aux


def check_router_aux(student, input_ids: torch.Tensor, fused_path: bool) -> None:
    """Before a run touches its folder: a student whose config asks for the router term (`router_weight`) returns
    an ``aux_loss`` from the forward a step runs (one no-grad forward of ``input_ids``, a few tokens)."""
    if not router_weight(student):
        return
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # router jitter draws nothing from the run's RNG
        out = forward_hidden(student, input_ids)[1] if fused_path else student(input_ids=input_ids, use_cache=False)
    _aux_loss(student, out)


def _router_aux(student, out, labels, coef: float) -> torch.Tensor | None:
    """``coef * aux_loss * valid tokens`` of a micro-batch (``coef``: `router_weight`; ``labels``: host labels where
    given: no device wait)."""
    if not coef:
        return None
    return _aux_loss(student, out).double() * (coef * count_valid_tokens(labels))  # rounded once, to the total's dtype


def _padding_mask(coef: float, batch: dict, host: dict) -> dict:
    """``{"attention_mask": ...}`` where the student's router term is on (``coef``: `router_weight`) and the rows are
    right-padded (an ``attention_mask`` with a 0, read from the host batch: no device wait), else ``{}``. Causal
    attention over right padding changes no real token's output; the mask keeps the padding out of the router's
    load-balancing statistics, which transformers' models compute over the positions it keeps. Without the term
    the forward takes no mask, so attention keeps its unmasked (causal) kernel."""
    if "attention_mask" not in batch or not coef or bool(host["attention_mask"].all()):
        return {}
    return {"attention_mask": batch["attention_mask"]}


def step_terms(student, batch: dict, signal, num_valid_tokens, cfg, *, vocab_size: int, fused_path: bool,
               chunk_size: int | None = None, autocast_dtype=None, student_head: Head | None = None,
               kernels: bool = True, host_batch: dict | None = None, loss_scale: float = 1.0):
    """`ObjectiveTerms` of one micro-batch (``batch`` on the student's device) from its teacher signal
    (`tailkd.teacher.TeacherSignal`; None only for loss clm): the student forward, then `chunked_objective` on its
    final hidden states (``fused_path``) or `objective` on its logits, with a mixture-of-experts student's router
    load-balancing term where its config asks for it (`router_weight`; over the rows' real tokens: `_padding_mask`).
    ``host_batch``: the same micro-batch on the host, whose labels, segment ids and attention mask the fused layer and
    the router term read without a device synchronisation.
    ``loss_scale``: the factor ``loss`` is multiplied by before backward (`chunked_objective`; no value changes)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    segment_ids = batch.get("segment_ids")
    want_cos = cfg.cosine_weight > 0
    if _divergence(cfg) is not None and signal is None:
        raise TailkdError(f"loss.name={cfg.name} needs a teacher signal")
    if want_cos and (signal is None or signal.hidden is None):  # the cosine term compares final hidden states
        raise TailkdError("loss.cosine_weight > 0 needs the teacher's hidden states: use the online teacher or a "
                          "cache written with --hidden-states")
    logits = hidden = sparse = t_hidden = head = None
    if signal is not None:
        logits, hidden, sparse, head = signal.logits, signal.hidden, signal.sparse, signal.head
    plan_from = host_batch if host_batch is not None else batch
    coef = router_weight(student)
    mask = {**_padding_mask(coef, batch, plan_from), **model_inputs(batch)}  # + position ids of packed documents
    with torch.autocast(input_ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if fused_path:
            h_s, out = forward_hidden(student, input_ids, **mask)  # (B, T, d_S)
        else:
            out = student(input_ids=input_ids, output_hidden_states=want_cos, use_cache=False, **mask)
            s_logits = out.logits[..., :vocab_size]  # (B, T, V) <- the big tensor
            h_s = out.hidden_states[-1] if want_cos else None
    router_aux = _router_aux(student, out, plan_from["labels"], coef)
    if fused_path:
        return chunked_objective(h_s, student_head or model_head(student, vocab_size), plan_from["labels"],
                                 num_valid_tokens, cfg=cfg, teacher_hidden=hidden, teacher_head=head,
                                 sparse_teacher=sparse, segment_ids=plan_from.get("segment_ids"),
                                 chunk_size=chunk_size, matmul_dtype=autocast_dtype, kernels=kernels,
                                 loss_scale=loss_scale, router_aux=router_aux)
    if logits is None and hidden is not None:
        logits = apply_head(hidden, head).float()  # cached hidden states: (B, T, V)
    t_hidden = hidden if want_cos else None
    return objective(s_logits, labels, num_valid_tokens, cfg=cfg, teacher_logits=logits, sparse_teacher=sparse,
                     segment_ids=segment_ids, student_hidden=h_s, teacher_hidden=t_hidden, router_aux=router_aux)


def distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | Head,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | Head,
    labels: torch.Tensor,
    *,
    loss: str = "tad",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    num_valid_tokens: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    segment_ids: torch.Tensor | None = None,
    **knobs,
) -> ObjectiveTerms:
    """Distillation loss from final hidden states and LM-head weights, in chunks: for your own training loop.

    The calling convention of Liger's chunked distillation losses, by rows (not flattened: TAD's β(X) averages over
    each row): ``student_hidden`` [B, T, d_S] (after the final norm) with ``student_weight`` [V, d_S],
    ``teacher_hidden`` [B, T, d_T] with ``teacher_weight`` [V, d_T] (same vocabulary; slice padded heads),
    ``labels`` [B, T] already shifted (-100 = ignore). A weight may instead be a model's `tailkd.head.Head`
    (`tailkd.head.model_head(model, V)`: its bias, the shared vocabulary V of a padded head, and the model's logit
    soft-capping or scaling (Gemma-2, Cohere, Granite), which a bare weight does not carry). ``loss`` names a row
    of `tailkd.registry.LOSSES`; ``knobs`` are its `LossConfig` fields (``k``,
    ``beta``, ``temperature``, ``jsd_beta``, ``clm_weight`` (default 1: the paper's CLM + L_DIV; 0 for the
    divergence alone), ``div_weight``, ``options`` (the knobs of a loss of your own, `LossSpec.options`), ...;
    ValueError for an unknown knob or option, or a value out of its range).
    Returns `ObjectiveTerms` (``loss`` to backpropagate, ``clm``, ``div``), divided by ``num_valid_tokens`` — by
    default the valid tokens of this batch; pass the global count of the optimizer step under gradient
    accumulation or data parallelism. TAD's β(X) averages the teacher's tail mass over each row's valid tokens (over
    each document of ``segment_ids`` [B, T] with ``per_document=True``; ``segment_ids`` is unused otherwise): pass
    whole rows in one call, not a row split across calls.
    """
    from tailkd.config import LossConfig
    from tailkd.head import HeadSpec

    fields = [f.name for f in dataclasses.fields(LossConfig) if f.name != "name"]  # the loss is named by ``loss``
    unknown = sorted(set(knobs) - set(fields))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a knob of distill_loss; the knobs are LossConfig's fields: "
                         f"{', '.join(fields)}")
    cfg = LossConfig(name=loss, **knobs)

    def as_head(role: str, weight, bias) -> Head:  # its shape and vocabulary: `fused`'s checks, as for any caller
        if not isinstance(weight, Head):
            return Head(weight, bias, HeadSpec(weight.shape[0]))
        if bias is not None:
            raise ValueError(f"{role}_weight is a Head, which carries its own bias: drop {role}_bias")
        return weight

    s_head, t_head = as_head("student", student_weight, student_bias), as_head("teacher", teacher_weight, teacher_bias)
    n = count_valid_tokens(labels) if num_valid_tokens is None else num_valid_tokens
    return chunked_objective(student_hidden, s_head, labels, n, cfg=cfg, teacher_hidden=teacher_hidden,
                             teacher_head=t_head, segment_ids=segment_ids, chunk_size=chunk_size)
