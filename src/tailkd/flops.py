"""FLOPs accounting for distillation runs and for the methods of the paper's Table 3 (``tailkd flops``).

Counting rules (Kaplan et al. 2020, "Scaling laws", Table 1; one multiply-add = 2 FLOPs), per token:

- forward of a model   F = 2·N + 2·d·V + 2·n_layer·s·d_attn
  * N: non-embedding parameters (every weight matrix except the embedding tables, token and learned positions
    (GPT-2), and the LM head; norms and biases included). A matrix-vector product with a weight of P entries
    costs 2·P FLOPs.
    A mixture of experts counts the parameters a token passes through: of the weights under a module named
    ``experts`` (Mixtral, Qwen-MoE, DeepSeek, OLMoE, Granite-MoE, DBRX), the fraction k/E (``num_experts_per_tok`` of
    ``num_local_experts`` / ``num_experts`` / ``n_routed_experts``; DBRX's ffn_config: ``moe_top_k`` of
    ``moe_num_experts``; a k listed per layer, HunYuan-MoE's moe_topk, layer by layer: k its mean); shared experts and
    routers fully.
  * 2·d·V: the LM head (hidden d → vocabulary V), counted once even when tied to the embedding; the
    embedding lookup itself costs nothing.
  * 2·n_layer·s·d_attn: attention scores QKᵀ and the weighted sum AV. For a token at position t each
    costs 2·t·d_attn per layer; averaged over a causal row of s tokens t ≈ s/2, so together
    2·(2·(s/2)·d_attn) = 2·s·d_attn per layer (d_attn = heads × head_dim). This is Kaplan's term. Under
    multi-head latent attention (DeepSeek-V2/V3) QKᵀ spans qk_nope_head_dim + qk_rope_head_dim per head and AV
    v_head_dim: d_attn = heads × (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) / 2; value heads of their own
    size beside head_dim (MiMo-V2-Flash's v_head_dim) likewise, d_attn = heads × (head_dim + v_head_dim) / 2.
    A sliding-window layer (window w: ``sliding_window`` on the layers ``layer_types`` marks
    ``sliding_attention`` or ``hybrid_sliding``, on every layer without ``layer_types``, as Mistral; GPT-Neo's
    ``window_size`` on the layers its ``attention_layers`` marks ``local``) attends
    min(t, w) keys: averaged over the row, w − w²/(2s) in place of s/2 when w < s. A layer without attention over
    the sequence (``layer_types``' ``linear_attention`` — Mamba, Gated DeltaNet, lightning attention —, ``conv``,
    ``moe`` and ``mlp``: Qwen3-Next, Qwen3.5, Jamba, LFM2, Nemotron-H; every layer of the recurrent models whose
    configs list no layer kinds, RWKV and xLSTM, the latter's layers its num_blocks) has no such term: its recurrent
    state update (a few FLOPs per state entry) is left out, as the other element-wise work is. Every other layer type
    counts as full attention: exact for ``full_attention`` and ``hybrid`` (Falcon-H1, Zamba2), an upper bound for
    ``chunked_attention`` rows longer than the chunk (Llama 4: 8192) and for ``indexed_attention``'s selected keys.
    Where layers differ (transformers 5's ``per_layer_config``: Gemma 4's full attention layers, heads of
    ``global_head_dim``; Laguna's ``num_attention_heads_per_layer``), each layer counts with its own d_attn and
    window; its parameters are counted as built
    (KV-shared layers without their k/v projections, double-wide MLPs).
- backward = 2 × forward (gradients wrt activations and wrt weights), so training = 3·F ≈ 6·N per
  token. With frozen embeddings (paper §3.2.2) a head tied to them is frozen too and its weight gradient
  (2·d·V) is skipped; an untied head (Phi-2, Qwen1.5) still trains and is counted.
- the loss layer: a few element-wise passes over the V logits per token: each loss's ``flops_per_vocab`` in the
  registry (`tailkd.registry.LOSSES`, justified there) plus the CLM term's ``CLM_FLOPS_PER_VOCAB``. Negligible next to
  2·d·V for d ≳ 256, but counted.

Distillation per token: teacher forward F_T (no backward) + student 3·F_S + loss layer.
Units: FLOPs; ``pflops_per_1m_tokens`` = FLOPs per 10⁶ tokens / 10¹⁵, the unit of the paper's Table 3.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tailkd import jsonfile
from tailkd.errors import TailkdError

# Scoring a token with a model for its log-probability (MiniPLM, teacher rewards): log-softmax 4 + gather.
SCORE_FLOPS_PER_VOCAB = 5
# Sampling the next token during generation: softmax over the logits 4 + sampling 1.
SAMPLE_FLOPS_PER_VOCAB = 5


# a config whose layers differ (per_layer_config) in what the count reads once for the whole model (hidden_size, the
# vocabulary, the experts), or that the installed transformers cannot build a model from (Llama's modeling code reads
# the attribute on the whole config); attention sizes and windows are read per layer (`_layer_configs`)
_PER_LAYER_FIX = "the FLOPs count needs one value for every layer; pass --*-params/--vocab/--hidden instead"


@dataclass
class ModelSize:
    """What the FLOPs count needs of a model: N (non-embedding parameters), d, V, layers, d_attn."""

    name: str
    params_nonembedding: float
    hidden: int
    vocab: int
    layers: int = 0  # 0: attention term unknown (left out)
    attn_dim: float = 0  # heads × head_dim (latent attention: see `_attn_dim`); 0: = hidden; with attn_dims their mean
    params_total: float = 0.0
    tied: bool = False  # the LM head is the input embedding (frozen with it by freeze_embeddings)
    # per layer: its sliding attention window, 0 = full causal, -1 = no attention over the sequence; () = all full
    windows: tuple[int, ...] = ()
    experts: tuple[float, int] = (0, 0)  # (k, E): each token passes through k of E experts (k listed per layer: their
    # mean); (0, 0) = no experts
    attn_dims: tuple[float, ...] = ()  # per layer its d_attn where layers differ (per_layer_config, Laguna's heads
    #                                    per layer); () = all attn_dim

    @classmethod
    def from_total(cls, name: str, params_total: float, *, vocab: int, hidden: int, layers: int = 0,
                   tied: bool = False) -> ModelSize:
        """From a total parameter count (as in model names): N = total − V·d (tied) or − 2·V·d (untied)."""
        emb = vocab * hidden * (1 if tied else 2)
        if params_total <= emb:
            raise TailkdError(f"{name}: {params_total:.3g} parameters cannot hold {'tied' if tied else 'untied'} "
                              f"embeddings of {vocab}×{hidden}; check --vocab/--hidden/--{name}-tied")
        return cls(name, params_total - emb, hidden, vocab, layers, hidden, params_total, tied)


def _count(model, name: str) -> ModelSize:
    from tailkd.models import per_layer_refusal

    with per_layer_refusal(name, _PER_LAYER_FIX):
        return _count_config(model, name)


def _count_config(model, name: str) -> ModelSize:
    import torch

    cfg = model.config
    seen, total, emb = set(), 0, 0
    embed_ids = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            embed_ids.add(id(module.weight))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and id(head.weight) in embed_ids
    if head is not None:
        embed_ids.add(id(head.weight))
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    k, n_experts = _experts(text_cfg)
    expert = 0.0  # parameters under a module named "experts"
    for qualified, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in embed_ids:
            emb += p.numel()
        elif "experts" in qualified.split(".")[:-1]:
            expert += p.numel()
    active = float(total - emb) - (expert * (1.0 - k / n_experts) if n_experts else 0.0)
    hidden = int(getattr(text_cfg, "hidden_size", 0) or getattr(text_cfg, "n_embd", 0))
    vocab = int(head.weight.shape[0]) if head is not None else int(text_cfg.vocab_size)
    layers = int(getattr(text_cfg, _RECURRENT_MODELS.get(getattr(text_cfg, "model_type", None), "num_hidden_layers"),
                         0) or getattr(text_cfg, "n_layer", 0) or 0)
    per_layer = _layer_configs(text_cfg, layers)
    dims = tuple(_attn_dim(c, hidden, _heads(c)) for c in per_layer) if per_layer else ()
    if listed := getattr(text_cfg, "num_attention_heads_per_layer", None):  # Laguna's query heads, layer by layer
        dims = tuple(_attn_dim(text_cfg, hidden, int(h)) for h in listed)
    if len(set(dims)) <= 1:  # every layer alike
        dims = ()
    one = per_layer[0] if per_layer else text_cfg
    attn_dim = sum(dims) / len(dims) if dims else _attn_dim(one, hidden, _heads(one))
    return ModelSize(name, active, hidden, vocab, layers, attn_dim, float(total), tied,
                     _windows(text_cfg, layers, per_layer), (k, n_experts) if n_experts else (0, 0), dims)


def _heads(cfg) -> int:
    return int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 0)


_ATTENTION_KEYS = ("num_attention_heads", "head_dim", "sliding_window", "num_key_value_heads", "global_head_dim")


def _layer_configs(cfg, layers: int) -> list | None:
    """Each layer's own config where ``per_layer_config`` makes layers differ only in attention sizes the count reads
    per layer (heads, head_dim, window; KV heads change only parameters, counted as built); None where no layer
    differs. Another attribute per layer (hidden_size, ...) is left to raise where the count reads it once."""
    varying = getattr(cfg, "per_layer_attributes", None)
    if not varying or not set(varying) <= set(_ATTENTION_KEYS):
        return None
    return [cfg.per_layer_config[i] for i in range(layers)]


def _attn_dim(cfg, hidden: int, heads: int):
    """d_attn: heads × head_dim; under multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash: its head_dim is the
    RoPE part alone) heads × (qk_head_dim + v_head_dim) / 2, QKᵀ over a head's qk_nope_head_dim + qk_rope_head_dim
    dims and AV over its v_head_dim; with value heads of their own size beside head_dim (MiMo-V2-Flash's v_head_dim)
    heads × (head_dim + v_head_dim) / 2 (int where exact)."""
    sizes = [getattr(cfg, key, None) for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")]
    head_dim = int(getattr(cfg, "head_dim", 0) or (hidden // heads if heads else 0))
    if getattr(cfg, "kv_lora_rank", None) and all(isinstance(x, int) for x in sizes):
        twice = heads * sum(sizes)
    elif isinstance(sizes[2], int) and sizes[2] > 0 and heads * head_dim:
        twice = heads * (head_dim + sizes[2])  # QKᵀ over head_dim, AV over v_head_dim
    else:
        return heads * head_dim or hidden
    return twice // 2 if twice % 2 == 0 else twice / 2


def _experts(cfg) -> tuple[float, int]:
    """(k, E) of a mixture-of-experts config: experts per token and routed experts; (0, 0) for a dense model. A k
    listed per layer (HunYuan-MoE's moe_topk: its layer i routes each token to entry i, its layers' experts alike)
    gives their mean: the experts' weights count k_i/E layer by layer, in sum the mean's share of them all."""
    k = getattr(cfg, "num_experts_per_tok", None)
    if isinstance(k, (list, tuple)) and k and all(isinstance(v, int) for v in k):
        k = sum(k) / len(k)
    n = next((v for v in (getattr(cfg, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts"))
              if isinstance(v, int) and v > 0), None)
    ffn = getattr(cfg, "ffn_config", None)  # DBRX: its sizes in a sub-config
    if k is None and getattr(ffn, "moe_top_k", None) is not None:
        k, n = ffn.moe_top_k, ffn.moe_num_experts
    if not isinstance(k, (int, float)) or not n or not 0 < k <= n:
        return 0, 0
    return k, n


_SLIDING_LAYERS = ("sliding_attention", "hybrid_sliding", "local")  # + GPT-Neo's local layers
_NO_ATTENTION_LAYERS = ("linear_attention", "conv", "moe", "mlp")  # recurrent, convolution or MLP-only layers
# recurrent models whose configs list no layer kinds: {model_type: the config key of their layer count}
_RECURRENT_MODELS = {"rwkv": "num_hidden_layers", "xlstm": "num_blocks"}


def _windows(cfg, layers: int, per_layer: list | None = None) -> tuple[int, ...]:
    """Each layer's sliding attention window (0: full causal attention, -1: no attention over the sequence, as the
    module docstring's rules), () when every layer is full; ``per_layer``: each layer's config (`_layer_configs`),
    whose window is its own."""
    if getattr(cfg, "model_type", None) in _RECURRENT_MODELS:  # RWKV, xLSTM: no attention over the sequence
        return (-1,) * layers
    configs = per_layer or [cfg] * layers
    w, types = [getattr(c, "sliding_window", None) for c in configs], getattr(cfg, "layer_types", None)
    if types is None and isinstance(getattr(cfg, "attention_layers", None), list):  # GPT-Neo: global / local layers
        w, types = [getattr(cfg, "window_size", None)] * layers, cfg.attention_layers
    w = [x if isinstance(x, int) and x > 0 else 0 for x in w]
    if types is None:  # Mistral: the window applies to every layer
        return tuple(w) if any(w) else ()
    out = tuple(w[i] if kind in _SLIDING_LAYERS else -1 if kind in _NO_ATTENTION_LAYERS else 0
                for i, kind in enumerate(types[:layers]))
    return out + (0,) * (layers - len(out)) if any(out) else ()


def _row_keys(window: int, seq_len: int) -> float:
    """The keys one layer of ``window`` attends, averaged over a causal row of ``seq_len`` (Kaplan's continuous
    t ≈ s/2; a window w < s: (1/s)∫₀ˢ min(t, w) dt = w − w²/(2s); none for a layer without attention, w = -1)."""
    return 0.0 if window < 0 else window - window * window / (2.0 * seq_len) if 0 < window < seq_len else seq_len / 2.0


def _attention(m: dict, keys) -> float:
    """4 · Σ over layers of d_attn × ``keys(window)`` (QKᵀ and AV, 2 FLOPs per key and d_attn entry each): with one
    d_attn for every layer, 4 · d_attn · Σ keys; where layers differ (``attn_dims``), each layer's own."""
    windows, layers = tuple(m["windows"]), m["layers"]
    if not m.get("attn_dims"):
        return 4.0 * m["attn_dim"] * (sum(keys(w) for w in windows) if windows else layers * keys(0))
    return 4.0 * sum(d * keys(w) for d, w in zip(m["attn_dims"], windows or (0,) * layers))


def model_size(model_or_config, name: str | None = None) -> ModelSize:
    """``ModelSize`` of a model (exact parameter count), an HF config / config dict (the architecture is
    built on the ``meta`` device, no memory, then counted), or a ``ModelSize`` (returned as is)."""
    if isinstance(model_or_config, ModelSize):
        return model_or_config
    import torch

    if isinstance(model_or_config, torch.nn.Module):
        return _count(model_or_config, name or type(model_or_config).__name__)
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    from tailkd.models import brief_error, config_errors, per_layer_refusal
    from tailkd.multimodal import text_part

    cfg = model_or_config
    if isinstance(cfg, dict):
        d = dict(cfg)
        if "model_type" not in d:
            raise TailkdError(f"config {name or ''} has no model_type; pass a transformers config.json")
        try:
            cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        except config_errors() as exc:
            raise TailkdError(f"config {name or ''}: {brief_error(exc)}; pass a transformers config.json") from None
    if not isinstance(cfg, PretrainedConfig):
        raise TypeError(f"expected a model, a transformers config, a config dict or a ModelSize, got {type(cfg)}")
    label = name or getattr(cfg, "_name_or_path", "") or cfg.model_type
    cfg = text_part(cfg) or cfg  # a multimodal checkpoint whose text model tailkd loads (Apertus 1.5's)
    try:
        with torch.device("meta"), per_layer_refusal(label, _PER_LAYER_FIX):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError) as exc:
        raise TailkdError(f"cannot build a causal LM from config {name or cfg.model_type}: "
                          f"{str(exc).splitlines()[0]}; pass --*-params/--vocab/--hidden instead") from exc
    return _count(model, label)


def size_from_spec(spec: str, otherwise: str = "") -> ModelSize:
    """``ModelSize`` from a config.json path, an HF model folder, a .gguf file or ``smollm2`` (no weights read);
    ``otherwise`` ends the refusal of a spec that is none of them (the caller's other way to give a size)."""
    from transformers import AutoConfig

    from tailkd.models import brief_error, config_errors

    p = Path(spec)
    try:
        if p.suffix == ".json" and p.is_file():
            try:
                d = json.loads(p.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise TailkdError(f"cannot read a model config from {spec}: {p} is not UTF-8 text ({exc.reason})") \
                    from None
            if not isinstance(d, dict):
                raise TailkdError(f"cannot read a model config from {spec}: {p} is not a JSON object (it holds "
                                  f"{jsonfile.kind(d)})")
            return model_size(d, name=str(p))
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise TailkdError(f"{p} has no config.json; pass an HF model folder or a config.json")
            return model_size(AutoConfig.from_pretrained(p), name=str(p))
        if p.suffix == ".gguf" and p.is_file():
            return model_size(AutoConfig.from_pretrained(p.parent, gguf_file=p.name), name=str(p))
        if spec == "smollm2":  # the config of its safetensors copy (converted once at install)
            from tailkd import models

            return model_size(AutoConfig.from_pretrained(models.model_dir(spec)), name=spec)
    except config_errors() as exc:  # json.JSONDecodeError is a ValueError
        raise TailkdError(f"cannot read a model config from {spec}: {brief_error(exc)}") from None
    except RecursionError:  # json nested past Python's stack
        raise TailkdError(f"cannot read a model config from {spec}: not valid JSON (nested too deeply to read)") \
            from None
    raise TailkdError(f"{spec} is not a config.json, a model folder, a .gguf file or 'smollm2'{otherwise}")


def model_flops_per_token(model_or_config, *, seq_len: int = 0) -> dict:
    """Forward FLOPs per token of one model, and the sizes they come from.

    Returns ``params_nonembedding`` (N: active ones for a mixture of experts), ``params_total``, ``hidden`` (d),
    ``vocab`` (V), ``layers``, ``attn_dim``, ``windows`` (per layer its sliding window, 0 = full, -1 = no attention
    over the sequence; [] = all full), ``attn_dims`` (per layer its d_attn where layers differ: Gemma 4; [] = all
    ``attn_dim``, which is then their mean),
    ``experts`` ([k, E]; [0, 0] for a dense model), ``head_params`` (d·V), ``tied`` (the head is the input
    embedding), ``seq_len`` and the forward FLOPs per token ``matmul`` (2·N), ``head`` (2·d·V), ``attention``
    (2·n_layer·seq_len·d_attn with full attention, sliding windows as in the module docstring; 0 when seq_len or
    layers is 0) and ``forward`` (their sum).
    """
    s = model_size(model_or_config)
    out = {"name": s.name, "params_nonembedding": s.params_nonembedding, "params_total": s.params_total,
           "hidden": s.hidden, "vocab": s.vocab, "layers": s.layers, "attn_dim": s.attn_dim or s.hidden,
           "windows": list(s.windows), "attn_dims": list(s.attn_dims), "experts": list(s.experts),
           "head_params": float(s.hidden * s.vocab), "tied": s.tied, "seq_len": seq_len,
           "matmul": 2.0 * s.params_nonembedding, "head": 2.0 * s.hidden * s.vocab}
    out["attention"] = _attention(out, lambda w: _row_keys(w, seq_len)) if seq_len else 0.0
    out["forward"] = out["matmul"] + out["head"] + out["attention"]
    return out


def loss_flops_per_token(loss: str, vocab: int) -> float:
    """Loss-layer FLOPs per token: (c_loss + c_clm)·V for a distillation loss (the objective adds CLM), c_clm·V
    for clm."""
    from tailkd.registry import CLM_FLOPS_PER_VOCAB, LOSSES

    if loss not in LOSSES:
        raise TailkdError(f"loss {loss!r} is not a loss; choose one of {', '.join(LOSSES)}")
    return float((LOSSES[loss].flops_per_vocab + CLM_FLOPS_PER_VOCAB) * vocab)


def _train_per_token(student: dict, freeze_embeddings: bool) -> float:
    """Student forward + backward per token: 3·F, minus the head's weight gradient when it is frozen: tied to the
    frozen input embedding (`tailkd.student.freeze_student_embeddings` freezes the input embeddings only)."""
    return 3.0 * student["forward"] - (student["head"] if freeze_embeddings and student["tied"] else 0.0)


def distill_flops(teacher_cfg, student_cfg, tokens: float, *, seq_len: int, loss: str,
                  freeze_embeddings: bool = False) -> dict:
    """FLOPs of distilling on ``tokens`` training tokens of rows of ``seq_len`` (the trainer's summary ``flops``).

    ``teacher_cfg`` / ``student_cfg``: a model, an HF config, a config dict or a ``ModelSize``
    (``teacher_cfg`` may be None for ``loss="clm"``). Returned keys (FLOPs unless stated):

    - ``teacher_forward``: tokens · F_T (F = 2·N + 2·d·V + 2·n_layer·seq_len·d_attn; no backward)
    - ``student_forward_backward``: tokens · 3·F_S (less tokens · 2·d·V with ``freeze_embeddings`` and a tied head)
    - ``loss_layer``: tokens · (c_loss + c_clm)·V (`loss_flops_per_token`)
    - ``total``: their sum; ``per_token``: total / tokens; ``pflops_per_1m_tokens``: per_token · 10⁶ / 10¹⁵
    - ``tokens``, ``seq_len``, ``loss``, ``freeze_embeddings``, and ``teacher`` / ``student``: the
      ``model_flops_per_token`` dicts the numbers come from (``teacher`` is None without a teacher).
    """
    if tokens < 0:
        raise ValueError(f"tokens={tokens} must be >= 0")
    student = model_flops_per_token(student_cfg, seq_len=seq_len)
    from tailkd.registry import LOSSES

    teacher = None
    if loss in LOSSES and LOSSES[loss].needs_teacher:
        if teacher_cfg is None:
            raise ValueError(f"loss {loss!r} needs a teacher")
        teacher = model_flops_per_token(teacher_cfg, seq_len=seq_len)
    t_fwd = float(tokens) * (teacher["forward"] if teacher else 0.0)
    s_fb = float(tokens) * _train_per_token(student, freeze_embeddings)
    loss_fl = float(tokens) * loss_flops_per_token(loss, student["vocab"])
    total = t_fwd + s_fb + loss_fl
    per_token = total / tokens if tokens else 0.0
    return {"tokens": float(tokens), "seq_len": seq_len, "loss": loss, "freeze_embeddings": freeze_embeddings,
            "teacher_forward": t_fwd, "student_forward_backward": s_fb, "loss_layer": loss_fl, "total": total,
            "per_token": per_token, "pflops_per_1m_tokens": per_token * 1e6 / 1e15,
            "teacher": teacher, "student": student}


# --------------------------------------------------------------------------- methods of the paper's Table 3


def _generation_per_sequence(m: dict, prompt_len: int, gen_len: int) -> float:
    """FLOPs to generate ``gen_len`` tokens after ``prompt_len`` with a KV cache.

    Prefill: ``prompt_len`` tokens at 2·N + 2·d·V + attention of a causal row (Kaplan's average).
    Decode step g (0-based) costs 2·N + 2·d·V + sampling 5·V + attention of ONE new query against the
    prompt_len + g cached keys: QKᵀ and AV are 2·(P+g)·d_attn each, i.e. 4·n_layer·(P+g)·d_attn (a sliding
    layer of window w: min(P+g, w) keys; a layer without attention: none).
    """
    prefill = prompt_len * (m["matmul"] + m["head"]
                            + (_attention(m, lambda w: _row_keys(w, prompt_len)) if prompt_len else 0.0))
    decode = gen_len * (m["matmul"] + m["head"] + SAMPLE_FLOPS_PER_VOCAB * m["vocab"]) \
        + _attention(m, lambda w: _decode_keys(w, prompt_len, gen_len))  # Σ_layers Σ_g keys attended
    return prefill + decode


def _decode_keys(window: int, prompt_len: int, gen_len: int) -> float:
    """Σ_g min(P + g, w) over decode steps g = 0..G−1 (Σ_g (P + g) for full attention, w = 0; 0 for a layer without
    attention, w = -1)."""
    if window < 0:
        return 0.0
    n = gen_len if not window else min(max(window - prompt_len, 0), gen_len)  # steps with P + g < w
    return n * prompt_len + n * (n - 1) / 2.0 + (gen_len - n) * window


def method_table(teacher_cfg, student_cfg, *, seq_len: int = 2048, tokens: float = 1e6, k_loss: str = "tad",
                 delta: float = 0.5, reference_cfg=None, reference_params: float | None = None,
                 prompt_len: int = 128, gen_len: int = 256, ppo_epochs: int = 4,
                 freeze_embeddings: bool = False) -> list[dict]:
    """FLOPs of the paper's Table 3 methods per ``tokens`` student-training tokens (rows of dicts).

    Every row: ``method``, ``teacher``, ``student``, ``other``, ``loss`` and ``total`` FLOPs,
    ``pflops`` (total / 10¹⁵), ``vs_kd`` (total / vanilla KD's total) and ``assumption`` (one line).

    - CLM: the student alone, 3·F_S + CLM loss.
    - Vanilla KD / TAD: ``distill_flops`` (same passes; TAD adds a top-K and two tail log-sum-exps).
    - MiniPLM (difference sampling, ratio δ): the teacher and a reference model score 1/δ tokens per kept
      token (forward + log-softmax each), then the student trains on the kept tokens with CLM.
    - SeqKD: per sequence the teacher generates ``gen_len`` tokens after a ``prompt_len`` prompt with a KV
      cache; the student trains (CLM) on the prompt + generation. Normalised per trained token.
    - MiniLLM: the student generates (KV cache), the teacher scores the P+G tokens, one student forward
      for the old-policy log-probs, ``ppo_epochs`` student forward+backward passes of the policy loss,
      plus the pretraining-LM term (one more student forward+backward on as many corpus tokens).
    Generation FLOPs understate generation's wall-clock cost: decoding is sequential and memory-bound.
    """
    if not 0 < delta <= 1:
        raise TailkdError(f"--delta {delta} must lie in (0, 1]; MiniPLM uses 0.5")
    if gen_len < 1 or prompt_len < 0 or ppo_epochs < 0:
        raise TailkdError("--gen-len must be >= 1, --prompt-len >= 0 and --ppo-epochs >= 0")
    teacher_cfg, student_cfg = model_size(teacher_cfg), model_size(student_cfg)  # build/count each once
    t = model_flops_per_token(teacher_cfg, seq_len=seq_len)
    s = model_flops_per_token(student_cfg, seq_len=seq_len)
    V = s["vocab"]
    s_train = _train_per_token(s, freeze_embeddings)
    clm = loss_flops_per_token("clm", V)
    rows = []

    def row(method, teacher, student, other, loss, assumption):
        total = teacher + student + other + loss
        rows.append({"method": method, "teacher": teacher * tokens, "student": student * tokens,
                     "other": other * tokens, "loss": loss * tokens, "total": total * tokens,
                     "pflops": total * tokens / 1e15, "assumption": assumption})

    row("CLM (no teacher)", 0.0, s_train, 0.0, clm, "student forward+backward + CE")
    for name, loss in (("Vanilla KD", "kd"), ("TAD", k_loss)):  # the paper's Table 3 rows
        d = distill_flops(teacher_cfg, student_cfg, tokens, seq_len=seq_len, loss=loss,
                          freeze_embeddings=freeze_embeddings)
        row(name, t["forward"], s_train, 0.0, d["loss_layer"] / tokens,
            f"teacher forward + student forward+backward + {loss} loss layer + CE")
    # MiniPLM: the reference model forward ≈ 2·P_ref per token when given as a total count (embeddings + tied head),
    # or its full forward when given as a model/config; its log-softmax over its own vocabulary (the teacher's
    # without a config). A reference with another tokenizer scores its own tokens (select-data's per-byte score):
    # counted here per teacher token; `tailkd select-data` writes the FLOPs of each model's own token count.
    if reference_cfg is not None:
        r = model_flops_per_token(reference_cfg, seq_len=seq_len)
        ref, ref_vocab, ref_name = r["forward"], r["vocab"], "reference model"
    else:
        p_ref = 125e6 if reference_params is None else reference_params
        ref, ref_vocab, ref_name = 2.0 * p_ref, t["vocab"], f"reference 2·{p_ref:.3g}"
    score = SCORE_FLOPS_PER_VOCAB * (t["vocab"] + ref_vocab)
    row(f"MiniPLM (δ={delta:g})", t["forward"] / delta, s_train, ref / delta, score / delta + clm,
        f"teacher + {ref_name} score 1/δ tokens per trained token; student CLM on the kept ones")
    # Generation-based: per sequence of prompt_len + gen_len trained tokens.
    seq = prompt_len + gen_len
    s_seq = model_flops_per_token(student_cfg, seq_len=seq)
    t_seq = model_flops_per_token(teacher_cfg, seq_len=seq)
    t_gen = _generation_per_sequence(t_seq, prompt_len, gen_len) / seq
    s_train_seq = _train_per_token(s_seq, freeze_embeddings)
    row(f"SeqKD (gen {gen_len})", t_gen, s_train_seq, 0.0, clm,
        f"teacher generates {gen_len} tokens after {prompt_len} (KV cache); student CLM on prompt+generation")
    s_gen = _generation_per_sequence(s_seq, prompt_len, gen_len) / seq
    t_score = t_seq["forward"] + SCORE_FLOPS_PER_VOCAB * t["vocab"]  # its own log-probs: no reference model here
    s_policy = s_seq["forward"] + ppo_epochs * s_train_seq + s_train_seq  # old log-probs + PPO epochs + LM term
    row(f"MiniLLM (gen {gen_len})", t_score, s_policy, s_gen, (ppo_epochs + 1) * loss_flops_per_token("rkl", V),
        f"student generates {gen_len}; teacher scores; {ppo_epochs} PPO epochs + pretraining-LM term")
    kd_total = rows[1]["total"]
    for r in rows:
        r["vs_kd"] = r["total"] / kd_total if kd_total else float("nan")
    return rows


def format_method_table(rows: list[dict], teacher: dict, student: dict, *, tokens: float, seq_len: int) -> str:
    """The printed table of ``tailkd flops``: PetaFLOPs per ``tokens`` training tokens."""
    def pf(x):
        return f"{x / 1e15:.3g}"

    def describe(role, m):
        k, n = m["experts"]
        moe = f" (active: {k} of {n} experts)" if n else ""
        sliding = sum(1 for w in m["windows"] if w > 0)
        linear = sum(1 for w in m["windows"] if w < 0)
        kinds = ([f"{sliding} with a sliding window of {max(m['windows'])}"] if sliding else []) \
            + ([f"{linear} without attention over the sequence"] if linear else [])
        window = f" ({', '.join(kinds)})" if kinds else ""
        return (f"{role} {m['name']}: N={m['params_nonembedding'] / 1e6:.1f}M non-embedding{moe}, d={m['hidden']}, "
                f"V={m['vocab']}, {m['layers']} layers{window}\n")

    head = (describe("teacher", teacher) + describe("student", student)
            + f"PetaFLOPs per {tokens:.3g} training tokens (rows of {seq_len} tokens)\n")
    cols = f"{'method':<22} {'teacher':>9} {'student':>9} {'other':>9} {'loss':>9} {'total':>9} {'vs KD':>7}"
    lines = [cols + "  assumption",
             "-" * 100]
    for r in rows:
        lines.append(f"{r['method']:<22} {pf(r['teacher']):>9} {pf(r['student']):>9} {pf(r['other']):>9} "
                     f"{pf(r['loss']):>9} {pf(r['total']):>9} {r['vs_kd']:>7.2f}  {r['assumption']}")
    return head + "\n".join(lines)


def size_to_dict(s: ModelSize) -> dict:
    return asdict(s)
