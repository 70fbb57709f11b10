"""A causal LM's output head as data: the weight, bias and logit transforms between its final hidden state and its
logits, so that the chunked loss layer (`tailkd.fused`) and the teacher cache can apply it themselves.

logits = softcap(scale · (h W[:V]ᵀ + b[:V])), softcap(x) = cap · tanh(x / cap), sliced to the shared vocabulary V.
`head_spec` reads the transforms from a Hugging Face config (a transform it does not know is refused, never
guessed); `verify_head` checks once per model that `final_hidden` + `apply_head` reproduce the model's own logits
(TRL #6629: a fused path that skips Gemma-2 soft-capping).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tailkd.errors import TailkdError
from tailkd.vocab import head_ids

__all__ = ["Head", "HeadSpec", "apply_head", "decoder_forward", "final_hidden", "forward_hidden", "head_spec",
           "model_class_name", "model_head", "transform", "transform_backward", "verify_head"]


@dataclass(frozen=True)
class HeadSpec:
    """What a model does between its final hidden state and its logits, besides ``h Wᵀ + b``.

    logits = softcap(scale · (h W[:V]ᵀ + b[:V]))  with  softcap(x) = cap · tanh(x / cap), then sliced to
    ``vocab_size`` (the shared vocabulary; heads may be padded, e.g. 151936 vs 152064 rows).
    """

    vocab_size: int
    scale: float = 1.0  # Cohere logit_scale, Falcon-H1 lm_head_multiplier, HyperCLOVA X; Granite: 1/logits_scaling
    softcap: float | None = None  # Gemma-2/3 final_logit_softcapping

    def describe(self) -> str:
        parts = [f"V={self.vocab_size}"]
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        return ", ".join(parts)


class Head(NamedTuple):
    """An LM head: weight [rows, d] (rows >= spec.vocab_size), optional bias [rows], and its `HeadSpec`."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    spec: HeadSpec


# model_type prefix -> (config attribute, multiply (True) or divide (False)); the models' own forward, transformers 5
_SCALE_RULES = (
    ("cohere", "logit_scale", True),  # cohere, cohere2, cohere2_moe, cohere_compass: logits * logit_scale
    ("granite", "logits_scaling", False),  # granite*, incl. moe/hybrid/vision: logits / logits_scaling
    ("minicpm3", "logits_scaling", False),  # hidden / logits_scaling before the (bias-free) head: the same
    ("hyperclovax", "logits_scaling", True),  # MuP: logits * logits_scaling
    ("falcon_h1", "lm_head_multiplier", True),  # logits * lm_head_multiplier
)
_SCALE_ATTRS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier", "logits_multiplier")


def head_spec(model, vocab_size: int | None = None) -> HeadSpec:
    """The logit transforms of a Hugging Face causal LM, read from its config (see `HeadSpec`).

    Known: final-logit soft-capping (any config with ``final_logit_softcapping``: Gemma-2/3/4, nanochat, ...;
    RecurrentGemma's ``logits_soft_cap``),
    Cohere ``logit_scale`` (multiplies), Granite / MiniCPM3 ``logits_scaling`` (divides), HyperCLOVA X
    ``logits_scaling`` (multiplies), Falcon-H1 ``lm_head_multiplier``; a known model type whose config lacks its
    attribute takes the base model's (``model.model``) attribute of that name. A config with a scaling attribute of an
    unknown model type is refused (TailkdError) rather than guessed; `verify_head` checks the result against the
    model's own logits. ``vocab_size`` None: the config's vocabulary, or the ids a pruned head scores
    (`tailkd.vocab.head_ids`).
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = str(getattr(config, "model_type", "") or "")
    vocab = int(vocab_size if vocab_size is not None else head_ids(config) or getattr(text, "vocab_size"))
    softcap = getattr(text, "final_logit_softcapping", None)
    if model_type == "recurrent_gemma":  # RecurrentGemma (Griffin) caps every logit at its logits_soft_cap
        softcap = text.logits_soft_cap
    scale = 1.0
    for prefix, attr, multiply in _SCALE_RULES:
        if model_type.startswith(prefix):
            value = getattr(text, attr, None)
            if value is None and hasattr(getattr(model, "model", None), attr):
                value = getattr(model.model, attr)
            if value is not None:
                scale = float(value) if multiply else 1.0 / float(value)
            break
    else:
        found = [a for a in _SCALE_ATTRS if getattr(text, a, None) not in (None, 1, 1.0)]
        if found:
            raise TailkdError(
                f"{model_type or model_class_name(model)} has {found[0]}={getattr(text, found[0])!r} in its config and "
                "tailkd does not know how its forward applies it to the logits; set train.fused_loss=off"
            )
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TailkdError(f"{model_class_name(model)} has no LM head (get_output_embeddings); set train.fused_loss=off")
    if head.weight.shape[0] < vocab:
        raise TailkdError(f"the LM head has {head.weight.shape[0]} rows, fewer than the vocabulary ({vocab})")
    return HeadSpec(vocab_size=vocab, scale=scale, softcap=float(softcap) if softcap is not None else None)


def model_head(model, vocab_size: int | None = None) -> Head:
    """`Head` (weight, bias, spec) of a causal LM; the tensors are the model's own parameters (gradients flow)."""
    model = getattr(model, "module", model)  # DDP wrapper -> the model
    spec = head_spec(model, vocab_size)
    lin = model.get_output_embeddings()
    return Head(lin.weight, getattr(lin, "bias", None), spec)


def transform(u: torch.Tensor, spec: HeadSpec) -> torch.Tensor:
    """Raw head output u -> the model's logits (in place where possible)."""
    if spec.scale != 1.0:
        u = u.mul_(spec.scale)
    if spec.softcap is not None:
        u = u.div_(spec.softcap).tanh_().mul_(spec.softcap)
    return u


def transform_backward(g: torch.Tensor, z: torch.Tensor, spec: HeadSpec) -> torch.Tensor:
    """The chain rule of `transform`, in place on g [n, V] = ∂L/∂logits: ∂L/∂u, given the logits z it produced."""
    if spec.softcap is not None:
        g.mul_(1 - (z / spec.softcap).square_())  # d cap·tanh(x/cap)/dx = 1 − tanh²
    if spec.scale != 1.0:
        g.mul_(spec.scale)
    return g


def apply_head(hidden: torch.Tensor, head: Head, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense logits [..., V] = the model's forward from its final hidden states (reference / small inputs)."""
    w = head.weight[: head.spec.vocab_size]
    mm = dtype or torch.promote_types(hidden.dtype, w.dtype)
    u = hidden.to(mm) @ w.to(mm).T  # [..., V]
    if head.bias is not None:
        u = u + head.bias[: head.spec.vocab_size].to(mm)
    if head.spec.scale != 1.0:
        u = u * head.spec.scale
    if head.spec.softcap is not None:
        u = torch.tanh(u / head.spec.softcap) * head.spec.softcap
    return u


def _takes_logits_to_keep(model) -> bool:
    """Whether the model's forward accepts ``logits_to_keep`` (by name or through ``**kwargs``)."""
    params = inspect.signature(getattr(model, "module", model).forward).parameters
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _distributed_wrapper(model) -> bool:
    """A DDP wrapper (``.module``) or an FSDP2-sharded model: its own forward must run (gradient sync, unsharding)."""
    from torch.distributed.fsdp import FSDPModule

    return hasattr(model, "module") or isinstance(model, FSDPModule)


def model_class_name(model) -> str:
    """The class name a user knows: a DDP wrapper's module's, and for an FSDP2-sharded model the class that
    ``fully_shard`` swapped for its subclass ``FSDP<name>``."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(getattr(model, "module", model))
    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule)).__name__


def final_hidden(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The final hidden states [B, T, d] that the LM head reads (post final norm), without [B, T, V] logits.

    Runs the model's own forward with ``output_hidden_states=True, logits_to_keep=1`` (logits of one position
    only), so that DDP / FSDP wrappers see a normal forward. A model whose forward takes no ``logits_to_keep`` runs
    its base model instead — refused (``TailkdError``) when wrapped by DDP or sharded by FSDP, whose own forward
    that would skip. `verify_head` checks that these states reproduce the model's logits.
    """
    return forward_hidden(model, input_ids, **kwargs)[0]


def forward_hidden(model, input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, object]:
    """`final_hidden` and the output of the forward that computed them (e.g. its ``aux_loss``: a mixture of experts'
    router load-balancing loss, where the model's config sets ``output_router_logits``)."""
    box = _decoder_output(model)
    out = decoder_forward(model, input_ids, hidden_states=box is None, **kwargs)
    if box is not None:  # the decoder's own output (`DECODER_OUTPUT_MODELS`)
        return box.pop("last"), out
    if getattr(out, "hidden_states", None) is not None:  # the model's own forward
        return out.hidden_states[-1], out
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]), out


# models whose hidden states (``output_hidden_states``) are not what their LM head reads, by class name: Gemma 3n's
# stack its AltUp streams ([streams, B, T, d]), which its decoder mixes and normalizes only after its last layer;
# `forward_hidden` takes their decoder's output (``get_decoder()``'s last_hidden_state) instead. (Its multimodal
# Gemma3nForConditionalGeneration, untested here — its vision tower needs timm —, is refused by `verify_head`.)
DECODER_OUTPUT_MODELS = ("Gemma3nForCausalLM",)


def _decoder_output(model) -> dict | None:
    """For a model of `DECODER_OUTPUT_MODELS`, the dict a forward hook on its decoder fills with the decoder's last
    hidden state (the hook registered on first use, once per model: a compiled forward sees it from the start); None
    for the others."""
    if model_class_name(model) not in DECODER_OUTPUT_MODELS:
        return None
    inner = getattr(model, "module", model)
    box = getattr(inner, "_tailkd_decoder_output", None)
    if box is None:
        box = {}

        def keep(module, args, output):
            box["last"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        inner.get_decoder().register_forward_hook(keep)
        inner._tailkd_decoder_output = box
    return box


def decoder_forward(model, input_ids: torch.Tensor, *, hidden_states: bool = False,
                    needs: str = "the chunked loss layer needs under DDP / FSDP; use --train.fused_loss off, or one "
                                  "process", **kwargs):
    """The output of the model's decoder over ``input_ids``, without [B, T, V] logits: the model's own forward with
    the logits of the last position only (every hidden state too where ``hidden_states``), so that DDP / FSDP wrappers
    see a normal forward (FSDP2 gathers the root's parameters in it); a model whose forward takes no
    ``logits_to_keep`` runs its base model (the last hidden state only), refused (``TailkdError``, its reason
    ``needs``) when wrapped by DDP or sharded by FSDP. Every layer runs over every position: Gemma 4 runs its
    KV-shared layers over the kept positions alone where ``logits_to_keep`` is a number and no hidden state is asked
    for (transformers 5.17 and 5.25; a calibration pass hooking those layers saw one position of each row), so
    without ``hidden_states`` the last position is named by index (a tensor)."""
    if _takes_logits_to_keep(model):
        last = 1 if hidden_states else torch.tensor([input_ids.shape[-1] - 1], device=input_ids.device)
        return model(input_ids=input_ids, output_hidden_states=hidden_states, logits_to_keep=last, use_cache=False,
                     **kwargs)
    if _distributed_wrapper(model):
        raise TailkdError(f"{model_class_name(model)}.forward takes no logits_to_keep, which {needs}")
    return getattr(model, "module", model).base_model(input_ids=input_ids, use_cache=False, **kwargs)


@torch.no_grad()
def verify_head(model, input_ids: torch.Tensor, head: Head | None = None, *, vocab_size: int | None = None) -> float:
    """Check that `final_hidden` + `apply_head` reproduce ``model(input_ids).logits[..., :V]``; returns max |diff|.

    Catches transforms the `HeadSpec` rules do not know (TRL #6629: a fused path that skips Gemma-2 soft-capping).
    Compared where the model's logits are finite (elsewhere ours must be the same NaN or infinity); a model without
    one finite logit there is refused as such (TailkdError), not blamed on the head. Tolerance: 1e-3 (float32/64) or
    3e-2 (bf16/fp16) times max(1, max |logit|). Run it once per model at start-up.
    """
    head = head or model_head(model, vocab_size)
    was_training = model.training
    model.eval()
    try:
        ref = model(input_ids=input_ids, use_cache=False).logits[..., : head.spec.vocab_size].double()
        hidden = final_hidden(model, input_ids)
        if tuple(hidden.shape[:-1]) != tuple(input_ids.shape):  # not one state per token (Gemma 3n's AltUp
            raise TailkdError(  # streams, read from its hidden states)
                f"the fused loss layer reads {model_class_name(model)}'s final hidden states as "
                f"{list(hidden.shape)}, not one row per token of {list(input_ids.shape)}: its forward does not return "
                "the states its LM head reads where tailkd looks for them; set train.fused_loss=off")
        ours = apply_head(hidden, head).double()
    finally:
        model.train(was_training)
    finite = torch.isfinite(ref)  # a broken model's own logits (a NaN in its weights) are no test of the head
    if ref.numel() and not bool(finite.any()):
        raise TailkdError(f"{model_class_name(model)}'s own logits are not finite (NaN or inf) on the first tokens of "
                          "the data: its weights or its forward produce them (e.g. a NaN in the checkpoint); check "
                          "the model")
    same = bool(((ours == ref) | (ours.isnan() & ref.isnan()))[~finite].all())  # non-finite where the model's are
    err = float((ref - ours)[finite].abs().max()) if bool(finite.any()) and same else 0.0 if same else math.inf
    low = head.weight.dtype in (torch.bfloat16, torch.float16)
    tol = (3e-2 if low else 1e-3) * max(1.0, float(ref[finite].abs().max()) if bool(finite.any()) else 1.0)
    if not err <= tol:
        raise TailkdError(
            f"the fused loss layer does not reproduce {model_class_name(model)}'s logits ({head.spec.describe()}; max "
            f"|diff| {err:.3g} > {tol:.3g}): its forward transforms the logits in a way tailkd does not model; set "
            "train.fused_loss=off"
        )
    return err

