"""Fused, chunked LM head + loss: from final hidden states to the objective, never [N, V] logits at once.

At the paper's scale (V = 152k, T = 2048, batch 128) one float32 [B, T, V] logits tensor is ~159 GB. This module
computes the student's and the teacher's LM heads chunk by chunk (``chunk_size`` tokens at a time) and, per chunk,
the per-token loss values AND their closed-form logit gradients G (Liger-style), accumulating

    grad_hidden[chunk] = G · W        grad_W += Gᵀ · h        (grad_bias += Σ_rows G)

so neither forward nor backward stores anything of size N·V. Closed-form gradients wrt the (temperature-scaled)
student logits s, with p = teacher, q = student distribution (formulas.md):

- CLM (cross-entropy, unscaled logits z):  softmax(z) − onehot(y)
- forward KL KL(p‖q):                       q − p
- TAD (Eq. 5/6/12):                         q_k − p_k on 𝒦;  q_i (1 + (β(X) − 1) α^T/α^S) − β(X) p_i on the tail
- reverse KL KL(q‖p):                       q (log(q/p) − KL(q‖p))
- JSD_β, m = βp + (1 − β)q:                  (1 − β) q (log(q/m) − KL(q‖m))   (β = 0 / 1: forward / reverse KL)
- sparse teacher (a top-K cache, `SparseTeacher`): D_KL1 gives q_k − p_k on 𝒦 and q_i (1 − α^T/α^S) on the tail;
  the sampled-tail estimate of α^T·D_KL2 adds w (q_i α^T/α^S − α^T c_i/M), c_i = how often i was sampled.

The divergence gradient is divided by τ (s = z/τ), then the chain rule goes through the model's own logit
transforms (`HeadSpec`: scale, then Gemma-2 style soft-capping cap·tanh(x/cap)) back to the head's matmul.

TAD's β(X) = β / ᾱ(X) needs the teacher tail mass of every valid token of a sequence (a row, or a document of a
packed row). Chunks are cut at sequence boundaries where possible; a chunk then holds whole sequences and ᾱ is
computed inside it for free. Sequences longer than a chunk get ᾱ from a cheap teacher-statistics pass first
(teacher head + top-K + log-sum-exp over their tokens, chunk by chunk: one extra teacher-head matmul for those
tokens only). Chunk sizes therefore do not change the loss or the gradients (tests/test_fused.py).

`fused_objective` returns the same `ObjectiveTerms` as `tailkd.objective.objective` (CLM + weighted divergence
[+ hidden cosine] summed over valid tokens / the global valid-token count), so the trainer can swap paths;
`fused_per_token` returns differentiable per-token values (its backward recomputes the chunks).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tailkd.errors import TailkdError
from tailkd.losses import _teacher_top_ids  # 𝒦 must be the dense path's selection (a private helper: make it public)

__all__ = [
    "FUSED_LOSSES",
    "HeadSpec",
    "Head",
    "SparseTeacher",
    "head_spec",
    "model_head",
    "apply_head",
    "final_hidden",
    "verify_head",
    "fused_objective",
    "fused_per_token",
    "teacher_tail_mass",
    "default_chunk_size",
    "use_fused",
]

IGNORE_INDEX = -100
FUSED_LOSSES = ("clm", "kd", "tad", "rkl", "jsd")  # objective loss names with a fused path
AUTO_BYTES = 1 << 30  # fused_loss=auto: fuse when one side's float32 logits [N, V] would exceed 1 GiB
_CHUNK_ELEMENTS = 1 << 24  # default chunk: ~64 MiB per float32 [chunk, V] buffer (a chunk uses ~5 of them)
_TAD_CHUNK_ELEMENTS = 1 << 28  # TAD default: grow chunks to whole sequences, up to 1 GiB per buffer
_INF = float("inf")


# --------------------------------------------------------------------------- the LM head and its transforms


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

    Known: final-logit soft-capping (any config with ``final_logit_softcapping``: Gemma-2/3/4, nanochat, ...),
    Cohere ``logit_scale`` (multiplies), Granite / MiniCPM3 ``logits_scaling`` (divides), HyperCLOVA X
    ``logits_scaling`` (multiplies), Falcon-H1 ``lm_head_multiplier``. A config with a scaling attribute of an
    unknown model type is refused (TailkdError) rather than guessed; `verify_head` checks the result against the
    model's own logits.
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = str(getattr(config, "model_type", "") or "")
    vocab = int(vocab_size if vocab_size is not None else getattr(text, "vocab_size"))
    softcap = getattr(text, "final_logit_softcapping", None)
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
                f"{model_type or type(model).__name__} has {found[0]}={getattr(text, found[0])!r} in its config and "
                "tailkd does not know how its forward applies it to the logits; set train.fused_loss=off"
            )
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TailkdError(f"{type(model).__name__} has no LM head (get_output_embeddings); set train.fused_loss=off")
    if head.weight.shape[0] < vocab:
        raise TailkdError(f"the LM head has {head.weight.shape[0]} rows, fewer than the vocabulary ({vocab})")
    return HeadSpec(vocab_size=vocab, scale=scale, softcap=float(softcap) if softcap is not None else None)


def model_head(model, vocab_size: int | None = None) -> Head:
    """`Head` (weight, bias, spec) of a causal LM; the tensors are the model's own parameters (gradients flow)."""
    model = getattr(model, "module", model)  # DDP wrapper -> the model
    spec = head_spec(model, vocab_size)
    lin = model.get_output_embeddings()
    return Head(lin.weight, getattr(lin, "bias", None), spec)


def _transform(u: torch.Tensor, spec: HeadSpec) -> torch.Tensor:
    """Raw head output u -> the model's logits (in place where possible)."""
    if spec.scale != 1.0:
        u = u.mul_(spec.scale)
    if spec.softcap is not None:
        u = u.div_(spec.softcap).tanh_().mul_(spec.softcap)
    return u


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


def final_hidden(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The final hidden states [B, T, d] that the LM head reads (post final norm), without [B, T, V] logits.

    Runs the model's own forward with ``output_hidden_states=True, logits_to_keep=1`` (logits of one position
    only), so that DDP / FSDP wrappers see a normal forward; models without ``logits_to_keep`` fall back to the
    base model. `verify_head` checks that these states reproduce the model's logits.
    """
    try:
        out = model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1, use_cache=False, **kwargs)
    except TypeError:  # no logits_to_keep: the decoder alone
        inner = getattr(model, "module", model)
        out = inner.base_model(input_ids=input_ids, use_cache=False, **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return out.hidden_states[-1]


@torch.no_grad()
def verify_head(model, input_ids: torch.Tensor, head: Head | None = None, *, vocab_size: int | None = None) -> float:
    """Check that `final_hidden` + `apply_head` reproduce ``model(input_ids).logits[..., :V]``; returns max |diff|.

    Catches transforms the `HeadSpec` rules do not know (TRL #6629: a fused path that skips Gemma-2 soft-capping).
    Tolerance: 1e-3 (float32/64) or 3e-2 (bf16/fp16) times max(1, max |logit|). Run it once per model at start-up.
    """
    head = head or model_head(model, vocab_size)
    was_training = model.training
    model.eval()
    try:
        ref = model(input_ids=input_ids, use_cache=False).logits[..., : head.spec.vocab_size].double()
        ours = apply_head(final_hidden(model, input_ids), head).double()
    finally:
        model.train(was_training)
    err = float((ref - ours).abs().max()) if ref.numel() else 0.0
    low = head.weight.dtype in (torch.bfloat16, torch.float16)
    tol = (3e-2 if low else 1e-3) * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
    if not err <= tol:
        raise TailkdError(
            f"the fused loss layer does not reproduce {type(model).__name__}'s logits ({head.spec.describe()}; max "
            f"|diff| {err:.3g} > {tol:.3g}): its forward transforms the logits in a way tailkd does not model; set "
            "train.fused_loss=off"
        )
    return err


def default_chunk_size(vocab: int) -> int:
    """Tokens per chunk: ~2^24 logits per [chunk, V] buffer, at least 16 and at most 4096 tokens."""
    return int(min(4096, max(16, _CHUNK_ELEMENTS // max(1, vocab))))


def use_fused(mode: str, num_tokens: int, vocab: int, loss_name: str = "kd") -> bool:
    """The ``train.fused_loss`` decision: "on", "off", or "auto" (N·V·4 bytes > 1 GiB and the loss has a path)."""
    if mode not in ("auto", "on", "off"):
        raise TailkdError(f"train.fused_loss={mode!r} is not one of auto, on, off")
    if mode == "on" and loss_name not in FUSED_LOSSES:
        raise TailkdError(f"loss.name={loss_name} has no fused path (fused: {', '.join(FUSED_LOSSES)}); set "
                          "train.fused_loss=off or auto")
    if mode == "auto":
        return loss_name in FUSED_LOSSES and num_tokens * vocab * 4 > AUTO_BYTES
    return mode == "on"


# --------------------------------------------------------------------------- the teacher of a fused call


class SparseTeacher(NamedTuple):
    """A teacher known only through a top-K cache (`tailkd.cache`), per token [B, T, ...].

    ``topk_ids`` [B, T, K] int (𝒦: the K largest teacher probabilities), ``topk_logprobs`` [B, T, K] (TRUE
    log-probs under the full teacher softmax at τ = 1, not renormalised over K), ``log_tail_mass`` [B, T] = log α^T.
    Optional tail support points ``tail_ids`` / ``tail_logprobs`` / ``tail_weights`` [B, T, J], ids outside 𝒦 with
    their true log p and weights w_j, Σ_j w_j = α^T, such that Σ_j w_j f(id_j) estimates Σ_{i∉𝒦} p_i f(i) without
    bias: M ids drawn with replacement from the renormalised tail p̃ = p/α^T get w = α^T/M each (sparse logit
    sampling, Anshumann et al. 2025); ids known exactly (cache ranks K_run..K_cache−1) get w = p_i.
    Without tail points the divergence is D_KL1 (the K+1 bucket loss); with them it is
    D_KL1 + w_X · (Σ_j w_j log(p_j/q_j) − α^T log(α^T/α^S)), an unbiased estimate of D_KL1 + w_X · α^T·D_KL2
    (w_X = β(X) for TAD, 1 for KD, whose expectation is then KL(p‖q)).
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    log_tail_mass: torch.Tensor
    tail_ids: torch.Tensor | None = None
    tail_logprobs: torch.Tensor | None = None
    tail_weights: torch.Tensor | None = None


@dataclass
class _Run:
    """Everything a pass over the chunks needs besides the differentiable student inputs (tokens = valid ones)."""

    loss: str  # clm | kd | tad | rkl | jsd
    spec: HeadSpec
    labels: torch.Tensor  # [M]
    chunks: list[tuple[int, int]]
    cdtype: torch.dtype
    mm_dtype: torch.dtype
    temperature: float = 1.0
    k: int = 10
    beta: float = 2.0
    jsd_beta: float = 0.5
    teacher_hidden: torch.Tensor | None = None  # [M, d_T]
    teacher_head: Head | None = None
    sparse: SparseTeacher | None = None  # fields [M, ...]
    abar: torch.Tensor | None = None  # [M] ᾱ of the token's sequence; NaN = compute inside the chunk
    seq: torch.Tensor | None = None  # [M] sequence id (TAD, chunk-local ᾱ)


# --------------------------------------------------------------------------- per-chunk kernels


def _lse(x: torch.Tensor) -> torch.Tensor:
    """log Σ exp over the last dim; −inf (not NaN) for an all −inf row."""
    m = x.amax(-1, keepdim=True)  # [n, 1]
    m = torch.where(torch.isfinite(m), m, 0.0)
    return (x - m).exp_().sum(-1).log_().add_(m.squeeze(-1))  # [n]


def _teacher_logits(run: _Run, a: int, b: int) -> torch.Tensor:
    """Teacher logits of tokens [a, b), scaled by 1/τ, in the compute dtype: [n, V]."""
    head = run.teacher_head
    w = head.weight[: head.spec.vocab_size]
    mm = torch.promote_types(run.teacher_hidden.dtype, w.dtype)
    t = (run.teacher_hidden[a:b].to(mm) @ w.to(mm).T).to(run.cdtype)  # [n, V] <- chunk-sized
    if head.bias is not None:
        t += head.bias[: head.spec.vocab_size].to(run.cdtype)
    t = _transform(t, head.spec)
    return t.div_(run.temperature) if run.temperature != 1.0 else t


def _tiny(dtype: torch.dtype) -> float:
    """Below this a tail mass summed in linear space has lost its precision (subnormal summands): redo in log space."""
    return 1e-30 if dtype != torch.float64 else 1e-290


def _teacher_tad(t: torch.Tensor, k: int):
    """Teacher side of TAD from logits t [n, V] (consumed: p is written into its buffer): (ids, logp, p on the tail
    only, p_top, logp_top, α^T).

    𝒦 = `losses._teacher_top_ids` (two-stage blocked top-K; ties resolved exactly as `losses.tad`); α^T = Σ_{i∉𝒦} p_i summed over the tail
    itself (never 1 − Σ top-K, which cancels when the top-K holds almost all the mass).
    """
    ids = _teacher_top_ids(t, k)  # [n, K] the same selection as the dense `losses.tad` (ties included)
    logp = torch.log_softmax(t, dim=-1)  # [n, V]
    p = torch.exp(logp, out=t)  # [n, V] into t's buffer: no fresh [n, V] allocation (page faults), t not kept alive
    p_top, logp_top = p.gather(-1, ids), logp.gather(-1, ids)  # [n, K]
    p.scatter_(-1, ids, 0.0)  # [n, V] the teacher tail
    return ids, logp, p, p_top, logp_top, p.sum(-1)


def _kl_sum(w: torch.Tensor, log_w: torch.Tensor, log_v: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i (log w_i − log v_i) per row, CONSUMING log_w. 0·log 0 = 0: finite logits never give NaN here; rows
    that do (−inf logits) are redone with explicit masking."""
    out = log_w.sub_(log_v).mul_(w).sum(-1)  # [n] (no [n, V] allocation)
    bad = torch.isnan(out)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        d = log_w[rows]  # (log w − log v)·w, NaN where w = 0
        out[rows] = torch.where(w[rows] > 0, d, 0.0).nan_to_num(nan=0.0).sum(-1)
    return out


def _div_dense(run: _Run, s, logq, t, a: int, b: int, beta_x, cd, cq, want_grad: bool):
    """(D [n], G [n, V]) with G = cd·∂D/∂s + cq·q for scaled student logits s, logq = log_softmax(s) (consumed)
    and dense teacher logits t (consumed: its buffer becomes p). cd, cq: [n] row coefficients."""
    loss = run.loss
    if loss == "jsd" and run.jsd_beta in (0.0, 1.0):
        loss = "kd" if run.jsd_beta == 0.0 else "rkl"
    if loss == "tad":
        return _tad_dense(run, s, logq, t, a, b, beta_x, cd, cq, want_grad)
    logp = torch.log_softmax(t, dim=-1)  # [n, V]
    p = torch.exp(logp, out=t)  # [n, V] into t's buffer (t consumed): one [n, V] allocation fewer per chunk
    del t
    if loss == "kd":
        value = _kl_sum(p, logp, logq)
        if not want_grad:
            return value, None
        g = logq.exp_().mul_((cd + cq)[:, None]).sub_(p.mul_(cd[:, None]))  # cd (q − p) + cq q
        return value, g
    q = logq.exp()  # [n, V]
    if loss == "rkl":
        fq = logq.sub_(logp).mul_(q)  # [n, V] q log(q/p)
        value = fq.sum(-1)
        if bool(torch.isnan(value).any()):
            rows = torch.isnan(value).nonzero().squeeze(1)
            fq[rows] = torch.where(q[rows] > 0, fq[rows], 0.0)
            value[rows] = fq[rows].sum(-1)
        if not want_grad:
            return value, None
        return value, fq.mul_(cd[:, None]).add_(q.mul_((cq - cd * value)[:, None]))  # cd q (f − D) + cq q
    bj = run.jsd_beta  # 0 < β < 1: m = βp + (1 − β)q
    log_m = torch.add(p, q, alpha=(1 - bj) / bj).mul_(bj).log_()  # [n, V]
    value = bj * _kl_sum(p, logp, log_m)
    f = logq.sub_(log_m)  # [n, V] log(q/m)
    del log_m
    fq = f.mul_(q)
    fq = torch.where(q > 0, fq, 0.0) if bool(torch.isnan(fq).any()) else fq
    kl_qm = fq.sum(-1)
    value = value + (1 - bj) * kl_qm
    if not want_grad:
        return value, None
    c = cd * (1 - bj)  # (1−β) q (log(q/m) − KL(q‖m))
    return value, fq.mul_(c[:, None]).add_(q.mul_((cq - c * kl_qm)[:, None]))


def _chunk_abar(run: _Run, a: int, b: int, alpha_t: torch.Tensor) -> torch.Tensor:
    """ᾱ per token of chunk [a, b): precomputed where known, else the mean α^T of its (chunk-closed) sequence."""
    abar = run.abar[a:b]
    todo = torch.isnan(abar)
    if bool(todo.any()):
        local = torch.unique(run.seq[a:b], return_inverse=True)[1]  # [n]
        n_seq = int(local.max()) + 1
        total = alpha_t.new_zeros(n_seq).index_add_(0, local, alpha_t)
        count = alpha_t.new_zeros(n_seq).index_add_(0, local, torch.ones_like(alpha_t))
        abar = torch.where(todo, (total / count)[local], abar)
    return abar


def _beta_x(run: _Run, abar: torch.Tensor) -> torch.Tensor:
    return torch.where(abar > 0, run.beta / torch.where(abar > 0, abar, 1.0), 0.0)  # [n] β(X); ᾱ = 0: no tail term


def _student_tail(s, logq, ids):
    """From logq (consumed into q on the tail): (q tail-only [n, V], q_top [n, K], logq_top, log α^S [n]).

    α^S = Σ_{i∉𝒦} q_i summed over the tail; rows where it is tiny (< 1e-30 in float32) redo log α^S in log space.
    """
    logq_top = logq.gather(-1, ids)  # [n, K]
    q = logq.exp_()  # [n, V]
    q_top = q.gather(-1, ids)
    q.scatter_(-1, ids, 0.0)  # [n, V] student tail
    alpha_s = q.sum(-1)  # [n]
    log_as = alpha_s.log()
    small = alpha_s < _tiny(s.dtype)
    if bool(small.any()):
        rows = small.nonzero().squeeze(1)
        log_as[rows] = _lse(s[rows].scatter(-1, ids[rows], -_INF)) - _lse(s[rows])
    return q, q_top, logq_top, log_as


def _tad_dense(run: _Run, s, logq, t, a: int, b: int, beta_x, cd, cq, want_grad):
    """TAD L_DIV = D_KL1 + β(X)·α^T·D_KL2 per row (α^T·D_KL2 summed over the tail itself) and Eq. 6's gradient:
    q_k − p_k on 𝒦, q_i (1 + (β(X) − 1) α^T/α^S) − β(X) p_i on the tail."""
    ids, logp, p, p_top, logp_top, alpha_t = _teacher_tad(t, run.k)
    del t
    if beta_x is None:
        beta_x = _beta_x(run, _chunk_abar(run, a, b, alpha_t))
    tail_kl = _kl_sum(p, logp, logq)  # [n] Σ_{i∉𝒦} p_i log(p_i/q_i) (p is 0 on 𝒦); logp consumed
    del logp
    q, q_top, logq_top, log_as = _student_tail(s, logq, ids)
    top = torch.where(p_top > 0, p_top * (logp_top - logq_top), 0.0).sum(-1)  # [n] Σ_{k∈𝒦} p_k log(p_k/q_k)
    pos = alpha_t > 0
    log_at = torch.log(torch.where(pos, alpha_t, 1.0))
    bucket = torch.where(pos, alpha_t * (log_at - log_as), 0.0)  # [n] α^T log(α^T/α^S)
    tail = torch.where(torch.isfinite(bucket), tail_kl - bucket, 0.0)  # [n] α^T·D_KL2
    value = top + bucket + beta_x * tail
    if not want_grad:
        return value, None
    ratio = torch.where(pos, (log_at - log_as).exp(), 0.0)  # [n] α^T/α^S
    bad = (~torch.isfinite(ratio)) | (ratio > 1e30)  # α^S underflowed: q_i/α^S = exp(s_i − lse_tail_s) instead
    fix = None
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        s_rows = s[rows]
        lse_rows = _lse(s_rows)
        q_tilde = (s_rows.scatter(-1, ids[rows], -_INF) - (log_as[rows] + lse_rows)[:, None]).exp()  # [r, V]
        c_r, b_r = cd[rows], beta_x[rows]
        fix = (rows, q[rows] * (c_r + cq[rows])[:, None] + q_tilde * (c_r * (b_r - 1) * alpha_t[rows])[:, None]
               - p[rows] * (c_r * b_r)[:, None])
    g = q.mul_((cd * (1 + (beta_x - 1) * torch.where(bad, 0.0, ratio)) + cq)[:, None])
    g.sub_(p.mul_((cd * beta_x)[:, None]))  # [n, V] the tail rule (Eq. 6), times cd, + cq q
    if fix is not None:
        g[fix[0]] = fix[1]
    g.scatter_(-1, ids, cd[:, None] * (q_top - p_top) + cq[:, None] * q_top)  # q_k − p_k on 𝒦 (Eq. 5)
    return value, g


def _div_sparse(run: _Run, s, logq, a: int, b: int, beta_x, cd, cq, want_grad: bool):
    """D_KL1 (+ w_X · tail estimate) from a top-K cache per row; G = cd·∂D/∂s + cq·q (see SparseTeacher)."""
    sp = run.sparse
    ids = sp.topk_ids[a:b].long()  # [n, K]
    logp_top = sp.topk_logprobs[a:b].to(run.cdtype)  # [n, K]
    log_at = sp.log_tail_mass[a:b].to(run.cdtype)  # [n]
    alpha_t = log_at.exp()
    p_top = logp_top.exp()
    wx, tids, tw, logq_t = None, None, None, None
    if sp.tail_ids is not None:
        wx = beta_x if run.loss == "tad" else torch.ones_like(alpha_t)  # [n]
        tids = sp.tail_ids[a:b].long()  # [n, J]
        tw = sp.tail_weights[a:b].to(run.cdtype)  # [n, J]
        logq_t = logq.gather(-1, tids)  # [n, J]
    q, q_top, logq_top, log_as = _student_tail(s, logq, ids)  # logq consumed
    pos = alpha_t > 0
    bucket = torch.where(pos, alpha_t * (log_at - log_as), 0.0)  # [n] α^T log(α^T/α^S)
    value = torch.where(p_top > 0, p_top * (logp_top - logq_top), 0.0).sum(-1) + bucket  # [n] D_KL1
    if wx is not None:
        tail_kl = torch.where(tw > 0, tw * (sp.tail_logprobs[a:b].to(run.cdtype) - logq_t), 0.0).sum(-1)  # [n]
        value = value + wx * torch.where(torch.isfinite(bucket), tail_kl - bucket, 0.0)
    if not want_grad:
        return value, None
    # q̃ = q_i/α^S on the tail, from the tail logits themselves (exact also when α^S underflows)
    lse_tail = log_as + _lse(s)  # [n]
    q_tilde = s.scatter(-1, ids, -_INF).sub_(lse_tail[:, None]).exp_()  # [n, V]
    c = p_top.sum(-1) + alpha_t  # [n] Σ_𝒦 p + α^T (= 1 up to the cache's rounding; kept for an exact gradient)
    w_tail = -alpha_t if wx is None else (wx - 1) * alpha_t  # [n] coefficient of q̃
    if wx is not None:
        c = c + wx * (tw.sum(-1) - alpha_t)  # (Σ_j w_j = α^T up to rounding)
    g = q.mul_((cd * c + cq)[:, None]).add_(q_tilde.mul_((cd * w_tail)[:, None]))
    if wx is not None:
        g.scatter_add_(-1, tids, -((cd * wx)[:, None] * tw))  # − w_X Σ_j w_j e_{id_j}
    g.scatter_(-1, ids, (cd * c + cq)[:, None] * q_top - cd[:, None] * p_top)
    return value, g


def _chunk(run: _Run, a: int, b: int, h, w_mm, bias, coef_clm, coef_div, want_grad: bool):
    """Values (clm [n], div [n]) of tokens [a, b) and G [n, V] = ∂(coef_clm·clm + coef_div·div)/∂(raw head out)."""
    spec = run.spec
    u = (h[a:b].to(run.mm_dtype) @ w_mm.T).to(run.cdtype)  # [n, V] <- chunk-sized logits
    if bias is not None:
        u += bias
    z = _transform(u, spec)  # [n, V] model logits (u consumed)
    y = run.labels[a:b][:, None]  # [n, 1]
    n = z.shape[0]
    vec = lambda c: c[a:b] if isinstance(c, torch.Tensor) else z.new_full((n,), float(c))  # noqa: E731
    c_clm = vec(coef_clm)
    tau = run.temperature
    logz = None
    if run.loss == "clm" or tau != 1.0:
        logz = torch.log_softmax(z, dim=-1)  # [n, V]
    if run.loss == "clm":
        clm = -logz.gather(-1, y).squeeze(-1)
        g = logz.exp_().mul_(c_clm[:, None]) if want_grad else None  # softmax(z) − onehot, below
        div = torch.zeros_like(clm)
    else:
        s = z / tau if tau != 1.0 else z  # [n, V]
        logq = torch.log_softmax(s, dim=-1)  # [n, V]
        clm = -(logz if logz is not None else logq).gather(-1, y).squeeze(-1)  # [n] cross-entropy of z
        beta_x = None
        if run.loss == "tad" and not bool(torch.isnan(run.abar[a:b]).any()):
            beta_x = _beta_x(run, run.abar[a:b])
        cd = vec(coef_div) / tau
        cq = c_clm if tau == 1.0 else torch.zeros_like(c_clm)  # τ = 1: the CLM softmax is q, folded into G
        if run.sparse is not None:
            div, g = _div_sparse(run, s, logq, a, b, beta_x, cd, cq, want_grad)
        else:
            div, g = _div_dense(run, s, logq, _teacher_logits(run, a, b), a, b, beta_x, cd, cq, want_grad)
        if want_grad and logz is not None:
            g.add_(logz.exp_().mul_(c_clm[:, None]))  # coef · softmax(z)
    if not want_grad:
        return clm, div, None
    g.scatter_add_(-1, y, -c_clm[:, None])  # − coef · onehot(y)
    if spec.softcap is not None:
        g.mul_(1 - (z / spec.softcap).square_())  # d cap·tanh(x/cap)/dx = 1 − tanh²
    if spec.scale != 1.0:
        g.mul_(spec.scale)
    return clm, div, g


def _run_chunks(run: _Run, h, w, bias, coef_clm, coef_div, need_h: bool, need_w: bool, need_b: bool):
    """One pass over the chunks: per-token values [M] and (if asked) the gradients of h [M, d], W, bias."""
    vocab = run.spec.vocab_size
    w_v = w[:vocab]
    w_mm = w_v.detach().to(run.mm_dtype)  # [V, d] cast once per pass
    b_c = bias[:vocab].detach().to(run.cdtype) if bias is not None else None
    want_grad = need_h or need_w or need_b
    n_tok = h.shape[0]
    clm_all = torch.zeros(n_tok, dtype=run.cdtype, device=h.device)
    div_all = torch.zeros_like(clm_all)
    grad_h = torch.zeros(h.shape, dtype=run.cdtype, device=h.device) if need_h else None
    acc = torch.promote_types(run.cdtype, w.dtype)
    grad_w = torch.zeros(w_v.shape, dtype=acc, device=w.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=w.device) if need_b else None
    h = h.detach()
    for a, b in run.chunks:
        clm, div, g = _chunk(run, a, b, h, w_mm, b_c, coef_clm, coef_div, want_grad)
        clm_all[a:b], div_all[a:b] = clm, div
        if g is None:
            continue
        g_mm = g.to(run.mm_dtype)  # [n, V]
        if need_h:
            if grad_h.dtype == run.mm_dtype:
                torch.mm(g_mm, w_mm, out=grad_h[a:b])  # [n, d] written in place
            else:
                grad_h[a:b] = (g_mm @ w_mm).to(run.cdtype)
        if need_w:
            if grad_w.dtype == run.mm_dtype and h.dtype == run.mm_dtype:
                grad_w.addmm_(g_mm.T, h[a:b])  # [V, d] += Gᵀ h, no [V, d] temporary
            else:
                grad_w += (g_mm.T @ h[a:b].to(run.mm_dtype)).to(acc)
        if need_b:
            grad_b += g.sum(0).to(acc)
        del g, g_mm  # before the next chunk allocates its buffers: one chunk's [n, V] buffers alive at a time
    if grad_w is not None and w.shape[0] > vocab:  # padded head rows get no gradient
        grad_w = torch.cat([grad_w, grad_w.new_zeros(w.shape[0] - vocab, w.shape[1])])
    if grad_b is not None and bias.shape[0] > vocab:
        grad_b = torch.cat([grad_b, grad_b.new_zeros(bias.shape[0] - vocab)])
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return clm_all, div_all, cast(grad_h, h), cast(grad_w, w), cast(grad_b, bias) if bias is not None else None


class _FusedSum(torch.autograd.Function):
    """Scalar Σ_t (coef_clm·CLM(t) + coef_div·D(t)); gradients computed in forward, chunk by chunk (Liger-style)."""

    @staticmethod
    def forward(ctx, h, w, bias, run: _Run, coef_clm: float, coef_div: float, need: tuple):
        with torch.autocast(h.device.type, enabled=False):
            clm, div, gh, gw, gb = _run_chunks(run, h, w, bias, coef_clm, coef_div, *need)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (gh, gw, gb)))
        ctx.present = tuple(g is not None for g in (gh, gw, gb))
        total = coef_clm * clm.sum() + coef_div * div.sum()
        ctx.mark_non_differentiable(clm, div)
        return total, clm, div

    @staticmethod
    def backward(ctx, g_total, _g_clm, _g_div):
        grads = [g * g_total.to(g.dtype) if present else None for g, present in zip(ctx.saved_tensors, ctx.present)]
        return (*grads, None, None, None, None)


class _FusedPerToken(torch.autograd.Function):
    """Per-token (CLM [M], D [M]); backward recomputes the chunks with the incoming per-token gradients."""

    @staticmethod
    def forward(ctx, h, w, bias, run: _Run):
        with torch.autocast(h.device.type, enabled=False):
            clm, div, *_ = _run_chunks(run, h, w, bias, 0.0, 0.0, False, False, False)
        ctx.run = run
        ctx.save_for_backward(h, w, bias if bias is not None else torch.empty(0))
        ctx.has_bias = bias is not None
        return clm, div

    @staticmethod
    def backward(ctx, g_clm, g_div):
        h, w, bias = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        run = ctx.run
        zeros = torch.zeros(h.shape[0], dtype=run.cdtype, device=h.device)
        g_clm = zeros if g_clm is None else g_clm.to(run.cdtype)
        g_div = zeros if g_div is None else g_div.to(run.cdtype)
        need = ctx.needs_input_grad
        with torch.autocast(h.device.type, enabled=False):
            _, _, gh, gw, gb = _run_chunks(run, h, w, bias, g_clm, g_div, need[0], need[1], ctx.has_bias and need[2])
        return gh, gw, gb, None


# --------------------------------------------------------------------------- planning: valid tokens, chunks, ᾱ


def _sequence_ids(mask: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, T] id of each position's sequence: its row, or (row, segment) with packed documents."""
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    if segment_ids is None:
        return rows.clone()
    pairs = torch.stack([rows, segment_ids.to(rows.dtype)], dim=-1).reshape(-1, 2)
    return torch.unique(pairs, dim=0, return_inverse=True)[1].view_as(mask)


def _plan_chunks(seq: torch.Tensor | None, n_tok: int, chunk: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Chunks over M tokens, cut at sequence boundaries when possible; returns (chunks, split-sequence mask [S])."""
    if seq is None or n_tok == 0:
        return [(a, min(a + chunk, n_tok)) for a in range(0, n_tok, chunk)], torch.zeros(0, dtype=torch.bool)
    n_seq = int(seq.max()) + 1
    pos = torch.arange(n_tok, device=seq.device)
    first = torch.full((n_seq,), n_tok, dtype=torch.long, device=seq.device).scatter_reduce_(0, seq, pos, "amin")
    last = torch.full((n_seq,), -1, dtype=torch.long, device=seq.device).scatter_reduce_(0, seq, pos, "amax")
    present = last >= 0
    delta = torch.zeros(n_tok + 1, dtype=torch.long, device=seq.device)
    delta.index_add_(0, first[present] + 1, torch.ones_like(first[present]))
    delta.index_add_(0, last[present] + 1, -torch.ones_like(last[present]))
    cover = delta.cumsum(0)  # cover[c] = number of sequences split by a cut before token c
    cands = ((cover[1:n_tok] == 0).nonzero().squeeze(1) + 1).tolist()
    chunks, start = [], 0
    while start < n_tok:
        limit = start + chunk
        if limit >= n_tok:
            end = n_tok
        else:
            j = bisect.bisect_right(cands, limit) - 1
            end = cands[j] if j >= 0 and cands[j] > start else limit
        chunks.append((start, end))
        start = end
    cuts = torch.tensor([a for a, _ in chunks[1:]], dtype=torch.long, device=seq.device)
    split = (torch.searchsorted(cuts, last, right=True) - torch.searchsorted(cuts, first, right=True)) > 0
    return chunks, split & present


@torch.no_grad()
def teacher_tail_mass(teacher_hidden: torch.Tensor, teacher_head: Head, *, k: int, temperature: float = 1.0,
                      chunk_size: int | None = None) -> torch.Tensor:
    """α^T per token [...] = the teacher's probability outside its top-K, chunk by chunk (TAD statistics pass).

    ``teacher_hidden`` [..., d_T]; log α^T = logsumexp(tail logits) − logsumexp(logits) (no 1 − Σ top-K cancellation).
    """
    lead = teacher_hidden.shape[:-1]
    h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    cdtype = torch.float64 if torch.float64 in (h.dtype, teacher_head.weight.dtype) else torch.float32
    chunk = chunk_size or default_chunk_size(teacher_head.spec.vocab_size)
    run = _Run(loss="tad", spec=teacher_head.spec, labels=torch.empty(0), chunks=[], cdtype=cdtype, mm_dtype=cdtype,
               temperature=temperature, k=k, teacher_hidden=h, teacher_head=teacher_head)
    out = torch.empty(h.shape[0], dtype=cdtype, device=h.device)
    for a in range(0, h.shape[0], chunk):
        b = min(a + chunk, h.shape[0])
        out[a:b] = _teacher_tad(_teacher_logits(run, a, b), k)[5]
    return out.view(lead)


# --------------------------------------------------------------------------- public entry points


def _check_head(name: str, head: Head, hidden: torch.Tensor) -> None:
    if not isinstance(head, Head):
        raise TypeError(f"{name} must be a tailkd.fused.Head (weight, bias, spec); use fused.model_head(model, V)")
    if head.weight.dim() != 2 or head.weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}.weight {tuple(head.weight.shape)} does not match hidden width {hidden.shape[-1]}")
    if head.weight.shape[0] < head.spec.vocab_size:
        raise ValueError(f"{name}.weight has {head.weight.shape[0]} rows < vocab_size {head.spec.vocab_size}")


def _prepare(student_hidden, student_head, labels, cfg, teacher_hidden, teacher_head, sparse_teacher, segment_ids,
             seq_alpha_mean, chunk_size, matmul_dtype):
    """Validate, keep the valid tokens, plan the chunks and TAD's ᾱ. Returns (h_valid [M, d], run, index [M])."""
    from tailkd.config import LossConfig

    cfg = cfg or LossConfig()
    if cfg.name not in FUSED_LOSSES:
        raise TailkdError(f"loss.name={cfg.name} has no fused path (fused: {', '.join(FUSED_LOSSES)}); set "
                          "train.fused_loss=off")
    if student_hidden.dim() != 3 or labels.shape != student_hidden.shape[:-1]:
        raise ValueError(f"student_hidden must be [B, T, d] and labels [B, T]; got {tuple(student_hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    _check_head("student_head", student_head, student_hidden)
    vocab = student_head.spec.vocab_size
    dense_teacher = teacher_hidden is not None
    if cfg.name != "clm":
        if dense_teacher == (sparse_teacher is not None):
            raise ValueError(f"loss {cfg.name!r} needs exactly one teacher: teacher_hidden + teacher_head, or "
                             "sparse_teacher (a top-K cache)")
        if dense_teacher:
            _check_head("teacher_head", teacher_head, teacher_hidden)
            if teacher_hidden.shape[:-1] != labels.shape:
                raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} does not match labels {tuple(labels.shape)}")
            if teacher_head.spec.vocab_size != vocab:
                raise ValueError(f"vocabulary mismatch: student head V={vocab}, teacher head "
                                 f"V={teacher_head.spec.vocab_size}; pass both heads with the shared vocabulary")
        elif sparse_teacher is not None:
            if cfg.name not in ("kd", "tad"):
                raise TailkdError(f"loss.name={cfg.name} cannot be computed from a top-K teacher cache (only kd, tad); "
                                  "cache the teacher's hidden states (--hidden-states) or use the online teacher")
            if cfg.temperature != 1.0:
                raise TailkdError("a top-K teacher cache holds log-probs at temperature 1; loss.temperature must be 1 "
                                  "(or cache hidden states)")
    if cfg.name == "tad" and not 1 <= cfg.k < vocab:
        raise ValueError(f"k must satisfy 1 <= k < V={vocab}; got {cfg.k}")
    mask = labels != IGNORE_INDEX  # [B, T]
    flat_mask = mask.reshape(-1)
    idx = flat_mask.nonzero().squeeze(1)  # [M] valid positions, row-major
    y = labels.reshape(-1)[idx]
    if bool(((y < 0) | (y >= vocab)).any()):
        raise ValueError(f"labels must be token ids in [0, {vocab}) or -100")
    h = student_hidden.reshape(-1, student_hidden.shape[-1])[idx]  # [M, d_S] (autograd scatters grads back)
    floats = [student_hidden.dtype, student_head.weight.dtype]
    if dense_teacher:
        floats += [teacher_hidden.dtype, teacher_head.weight.dtype]
    cdtype = torch.float64 if torch.float64 in floats else torch.float32
    mm = matmul_dtype or torch.promote_types(student_hidden.dtype, student_head.weight.dtype)
    chunk = int(chunk_size or default_chunk_size(vocab))
    if chunk_size is None and cfg.name == "tad" and seq_alpha_mean is None and sparse_teacher is None:
        # whole sequences per chunk avoid TAD's statistics pass (an extra teacher-head matmul), up to 1 GiB/buffer
        longest = int(mask.sum(1).max()) if cfg.per_document is False or segment_ids is None else labels.shape[1]
        chunk = max(chunk, min(longest, _TAD_CHUNK_ELEMENTS // vocab))
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    run = _Run(loss=cfg.name, spec=student_head.spec, labels=y, chunks=[], cdtype=cdtype, mm_dtype=mm,
               temperature=float(cfg.temperature), k=int(cfg.k), beta=float(cfg.beta), jsd_beta=float(cfg.jsd_beta))
    if dense_teacher and cfg.name != "clm":
        run.teacher_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[idx]
        run.teacher_head = Head(teacher_head.weight.detach(),
                                teacher_head.bias.detach() if teacher_head.bias is not None else None, teacher_head.spec)
    if sparse_teacher is not None and cfg.name != "clm":
        run.sparse = SparseTeacher(*(None if x is None else x.detach().reshape(-1, *x.shape[2:])[idx]
                                     for x in sparse_teacher))
        if bool((run.sparse.topk_ids.long() >= vocab).any()):
            raise ValueError(f"the cached teacher ids exceed the vocabulary V={vocab}")
        if cfg.name == "tad" and sparse_teacher.topk_ids.shape[-1] != cfg.k:
            raise ValueError(f"sparse_teacher has K={sparse_teacher.topk_ids.shape[-1]} ids but loss.k={cfg.k}; "
                             "truncate it first (tailkd.cache.CacheReader does)")
    seq = None
    if cfg.name == "tad":
        seg = segment_ids if cfg.per_document else None
        if seq_alpha_mean is not None:
            run.abar = seq_alpha_mean.detach().reshape(-1)[idx].to(cdtype)
        elif run.sparse is not None:  # α^T is in the cache: ᾱ exactly, before any pass
            from tailkd.losses import sequence_alpha_mean

            alpha = sparse_teacher.log_tail_mass.detach().to(cdtype).exp()
            run.abar = sequence_alpha_mean(torch.where(mask, alpha, 0.0), mask, seg).reshape(-1)[idx]
        else:
            seq = _sequence_ids(mask, seg).reshape(-1)[idx]
            seq = torch.unique(seq, return_inverse=True)[1]  # dense 0..S-1
            run.seq = seq
    chunks, split = _plan_chunks(seq, idx.numel(), chunk)
    run.chunks = chunks
    if cfg.name == "tad" and run.abar is None:
        run.abar = torch.full((idx.numel(),), math.nan, dtype=cdtype, device=h.device)
        if bool(split.any()):  # statistics pass over the tokens of sequences that span chunks
            tok = split[seq].nonzero().squeeze(1)
            alpha = teacher_tail_mass(run.teacher_hidden[tok], run.teacher_head, k=run.k,
                                      temperature=run.temperature, chunk_size=chunk).to(cdtype)
            n_seq = split.shape[0]
            total = alpha.new_zeros(n_seq).index_add_(0, seq[tok], alpha)
            count = alpha.new_zeros(n_seq).index_add_(0, seq[tok], torch.ones_like(alpha))
            run.abar[tok] = (total / count.clamp_min(1))[seq[tok]]
    return h, run, idx


def fused_objective(
    student_hidden: torch.Tensor,  # (B, T, d_S) final hidden states (post final norm)
    student_head: Head,
    labels: torch.Tensor,  # (B, T), -100 = ignore
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
):
    """`tailkd.objective.objective` from hidden states: Σ_valid (clm_w·CLM + div_w·D [+ cos_w·(1 − cos)]) / count.

    Same contract and `ObjectiveTerms` as the dense path for losses clm, kd, tad, rkl, jsd; the teacher is either
    its final hidden states + LM head (exact) or a `SparseTeacher` from a top-K cache (kd/tad: D_KL1 [+ sampled tail
    estimate]). Gradients flow to ``student_hidden`` and ``student_head.weight`` / ``.bias`` (unless they do not
    require grad: a frozen head costs no weight-gradient matmul). ``matmul_dtype`` (e.g. torch.bfloat16 on GPU)
    sets the head matmuls' dtype; softmax math is float32 (float64 for float64 inputs).
    """
    from tailkd.config import LossConfig
    from tailkd.objective import ObjectiveTerms

    cfg = cfg or LossConfig()
    h, run, _ = _prepare(student_hidden, student_head, labels, cfg, teacher_hidden, teacher_head, sparse_teacher,
                         segment_ids, seq_alpha_mean, chunk_size, matmul_dtype)
    denom = torch.as_tensor(num_valid_tokens, dtype=run.cdtype, device=h.device).clamp_min(1.0)
    inv = 1.0 / float(denom)
    w, bias = student_head.weight, student_head.bias
    grad_on = torch.is_grad_enabled()
    need = (grad_on and h.requires_grad, grad_on and w.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    div_w = cfg.div_weight if cfg.name != "clm" else 0.0
    total, clm, div = _FusedSum.apply(h, w, bias, run, cfg.clm_weight * inv, div_w * inv, need)
    clm_sum, div_sum = clm.sum(), div.sum()
    zero = total.new_zeros(())
    cos_sum = zero
    if cfg.cosine_weight > 0:
        if teacher_hidden is None:
            raise ValueError("cosine_weight > 0 needs teacher_hidden")
        from tailkd.losses import hidden_cosine

        mask = labels != IGNORE_INDEX
        cos_sum = hidden_cosine(student_hidden, teacher_hidden, mask).sum().to(run.cdtype)
        total = total + cfg.cosine_weight * cos_sum / denom
    return ObjectiveTerms(loss=total, clm=(clm_sum / denom).detach(), div=(div_sum / denom).detach() if
                          cfg.name != "clm" else zero.detach(), cos=(cos_sum / denom).detach())


def fused_per_token(
    student_hidden: torch.Tensor,
    student_head: Head,
    labels: torch.Tensor,
    *,
    cfg=None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: Head | None = None,
    sparse_teacher: SparseTeacher | None = None,
    segment_ids: torch.Tensor | None = None,
    seq_alpha_mean: torch.Tensor | None = None,
    chunk_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-token (CLM [B, T], D [B, T]), 0 at masked positions; backward recomputes the chunks.

    Costs one more pass over the heads than `fused_objective` (which computes gradients in its forward), in
    exchange for arbitrary per-token weights downstream. D is the divergence of ``cfg.name`` (0 for clm).
    """
    h, run, idx = _prepare(student_hidden, student_head, labels, cfg, teacher_hidden, teacher_head, sparse_teacher,
                           segment_ids, seq_alpha_mean, chunk_size, matmul_dtype)
    clm, div = _FusedPerToken.apply(h, student_head.weight, student_head.bias, run)
    n = labels.numel()
    out_clm = clm.new_zeros(n).index_put((idx,), clm).view(labels.shape)
    out_div = div.new_zeros(n).index_put((idx,), div).view(labels.shape)
    return out_clm, out_div
