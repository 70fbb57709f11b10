"""Build a student from its teacher, DistilBERT-style (TAD paper §3.2, §3.2.2).

The student is a regular Hugging Face model of the teacher's class (`from_config`), so it saves and
loads like any other. What is copied, and how:

Layers   `layers` (teacher indices, increasing) or `num_layers` evenly spaced with the first and the last
         included: ``layers[j] = floor(j * (L - 1) / (n - 1) + 1/2)`` (rounded linspace; n = 1 → [0]).
Widths   Student `hidden_size`, `num_heads`, `num_kv_heads`, `intermediate_size` default to the teacher's
         and may only shrink. Residual-stream tensors keep their first `hidden_size` columns/entries
         (embeddings, norms, every projection's input side).
Heads    head_dim: the teacher's while the hidden size is unchanged (Llama family), else
         hidden_size // num_heads (GPT-2 always), never more than the teacher's. Each student head is a
         teacher head truncated to head_dim:
           - KV heads: the teacher's first `num_kv_heads`.
           - Query heads: grouped so that every query head keeps the KV head it was trained with: for
             KV head k the teacher's query heads k*g_t + m, m < g_s (g = heads per KV head). With
             unchanged grouping (g_s == g_t) these are simply the first `num_heads` heads.
           - Rows kept inside a head: v (and o_proj's matching columns) the first head_dim rows. q and
             k in the Llama family use rotate-half RoPE, which pairs row i with row i + head_dim/2; we
             keep whole pairs, teacher pair floor(j * hd_t/hd_s + 1/2) for student pair j, which is the
             teacher pair rotating at exactly the student's frequency when hd_t/hd_s is an integer
             (a plain "first rows" cut would split every pair and re-time every frequency).
             GPT-2 (absolute positions) keeps the first head_dim rows of q, k and v.
MLP      "random" (the paper): the student config's own initialisation, seeded by `seed`. "copy": the
         first `intermediate_size` units (gate/up rows, down columns), input side truncated to hidden.
Embeds   Copied (all vocabulary rows, first hidden_size columns), untied LM head likewise, final norm
         copied. ``freeze_embeddings=True`` freezes the input embeddings (GPT-2: token and position
         embeddings) and with them a tied LM head; an untied LM head stays trainable.

Values are exact copies/slices of the teacher's (computed in its dtype, stored in float32: the
student is always built in float32, its master weights). Supported: Llama, Qwen2, Mistral, GPT-2.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch

from tailkd.errors import TailkdError

LLAMA_FAMILY = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
GPT2_FAMILY = ("GPT2LMHeadModel",)
SUPPORTED = LLAMA_FAMILY + GPT2_FAMILY
MLP_INITS = ("random", "copy")
_EMBEDDINGS = {"llama": ("model.embed_tokens.weight",), "gpt2": ("transformer.wte.weight", "transformer.wpe.weight")}


@dataclass(frozen=True)
class Dims:
    """The sizes a student differs in from its teacher."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


# --------------------------------------------------------------------------- choosing the student's shape

def family_of(model) -> str:
    """"llama" or "gpt2" for a supported model class, else a TailkdError listing the supported ones."""
    name = type(model).__name__
    if name in LLAMA_FAMILY:
        return "llama"
    if name in GPT2_FAMILY:
        return "gpt2"
    raise TailkdError(f"cannot build a student from a {name}: supported teachers are {', '.join(SUPPORTED)}")


def teacher_dims(config, family: str) -> Dims:
    if family == "gpt2":
        return Dims(config.n_layer, config.n_embd, config.n_head, config.n_head, config.n_embd // config.n_head,
                    config.n_inner or 4 * config.n_embd)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Dims(config.num_hidden_layers, config.hidden_size, heads, config.num_key_value_heads or heads, head_dim,
                config.intermediate_size)


def choose_layers(n_teacher: int, num_layers: int | None = None, layers=None) -> list[int]:
    """The teacher layers the student keeps (see the module docstring); all of them by default."""
    if layers is not None and num_layers is not None and len(layers) != num_layers:
        raise TailkdError(f"layers lists {len(layers)} layers but num_layers={num_layers}: pass only one of them")
    if layers is not None:
        layers = [int(i) for i in layers]
        bad = [i for i in layers if not 0 <= i < n_teacher]
        if bad or not layers:
            raise TailkdError(f"layer indices {bad or layers} out of range: the teacher has layers 0..{n_teacher - 1}")
        if any(a >= b for a, b in itertools.pairwise(layers)):
            raise TailkdError(f"layers {layers} must be increasing without repeats: pass e.g. {sorted(set(layers))}")
        return layers
    if num_layers is None:
        return list(range(n_teacher))
    if not 1 <= num_layers <= n_teacher:
        raise TailkdError(f"num_layers={num_layers} but the teacher has {n_teacher} layers: pick 1..{n_teacher}")
    if num_layers == 1:
        return [0]
    return [(2 * j * (n_teacher - 1) + (num_layers - 1)) // (2 * (num_layers - 1)) for j in range(num_layers)]


def student_dims(t: Dims, family: str, n_layers: int, hidden_size=None, num_heads=None, num_kv_heads=None,
                 intermediate_size=None) -> Dims:
    """Validate the requested widths against the teacher `t` and derive head_dim."""
    hidden = t.hidden if hidden_size is None else int(hidden_size)
    heads = t.heads if num_heads is None else int(num_heads)
    inter = t.intermediate if intermediate_size is None else int(intermediate_size)
    for name, value, limit in (("hidden_size", hidden, t.hidden), ("num_heads", heads, t.heads),
                               ("intermediate_size", inter, t.intermediate)):
        if not 1 <= value <= limit:
            raise TailkdError(f"{name}={value} but the teacher's is {limit}: a student can only be narrower, "
                              f"pick 1..{limit}")
    if family == "gpt2":
        if num_kv_heads is not None and int(num_kv_heads) != heads:
            raise TailkdError(f"GPT-2 has no grouped KV heads: drop num_kv_heads (or set it to num_heads={heads})")
        kv_heads = heads
    else:
        kv_heads = t.kv_heads if num_kv_heads is None else int(num_kv_heads)
        if not 1 <= kv_heads <= t.kv_heads:
            raise TailkdError(f"num_kv_heads={kv_heads} but the teacher has {t.kv_heads}: pick 1..{t.kv_heads}")
        if heads % kv_heads:
            raise TailkdError(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}: "
                              f"pick num_kv_heads dividing {heads}")
        if heads // kv_heads > t.heads // t.kv_heads:
            need = -(-heads * t.kv_heads // t.heads)
            raise TailkdError(
                f"{heads} query heads on {kv_heads} KV heads would share a KV head among more query heads than the "
                f"teacher's {t.heads // t.kv_heads}: raise num_kv_heads to at least {need} (a divisor of {heads})"
            )
    if family == "llama" and hidden == t.hidden:
        head_dim = t.head_dim
    else:
        if hidden % heads:
            raise TailkdError(f"hidden_size={hidden} is not divisible by num_heads={heads}: "
                              f"pick a hidden_size that is a multiple of {heads} or another num_heads")
        head_dim = hidden // heads
        if head_dim > t.head_dim:
            raise TailkdError(
                f"hidden_size={hidden} with num_heads={heads} gives head_dim {head_dim}, wider than the teacher's "
                f"{t.head_dim}: use at least {-(-hidden // t.head_dim)} heads or a smaller hidden_size"
            )
    if family == "llama" and head_dim % 2:
        raise TailkdError(f"head_dim {head_dim} (hidden_size/num_heads) is odd but RoPE needs it even: "
                          f"pick a hidden_size that is an even multiple of num_heads")
    return Dims(n_layers, hidden, heads, kv_heads, head_dim, inter)


def _student_config(teacher_config, family: str, s: Dims, layers: list[int]):
    data = teacher_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "name_or_path"):
        data.pop(key, None)
    data["dtype"] = "float32"  # the student's master weights, whatever the teacher was loaded in
    if family == "gpt2":
        data.update(n_layer=s.layers, n_embd=s.hidden, n_head=s.heads, n_inner=s.intermediate)
    else:
        data.update(num_hidden_layers=s.layers, hidden_size=s.hidden, num_attention_heads=s.heads,
                    num_key_value_heads=s.kv_heads, head_dim=s.head_dim, intermediate_size=s.intermediate)
        if isinstance(data.get("layer_types"), list):  # per-layer attention kinds (Qwen2): follow the layers
            data["layer_types"] = [data["layer_types"][i] for i in layers]
    return type(teacher_config).from_dict(data)


# --------------------------------------------------------------------------- index helpers

def rope_pair_rows(hd_t: int, hd_s: int) -> list[int]:
    """Rows of a teacher q/k head (rotate-half RoPE) kept for a student head, in student order."""
    half_t, half_s = hd_t // 2, hd_s // 2
    pairs = [(2 * j * half_t + half_s) // (2 * half_s) for j in range(half_s)]  # floor(j*half_t/half_s + 1/2)
    return pairs + [half_t + i for i in pairs]


def _rows(heads: list[int], hd_t: int, rows_in_head: list[int]) -> torch.Tensor:
    """Flat indices into a [n_heads * hd_t] axis: each of `heads`, its `rows_in_head`."""
    return torch.tensor([h * hd_t + r for h in heads for r in rows_in_head], dtype=torch.long)


def _take(tensor: torch.Tensor, *index) -> torch.Tensor:
    """Slice each leading dim: an int n keeps the first n, a LongTensor picks those indices."""
    for dim, idx in enumerate(index):
        if isinstance(idx, int):
            tensor = tensor.narrow(dim, 0, idx)
        else:
            tensor = tensor.index_select(dim, idx.to(tensor.device))
    return tensor


def _query_heads(t: Dims, s: Dims) -> list[int]:
    """Teacher query heads kept, grouped so each keeps its KV head (first heads when g_s == g_t)."""
    g_t, g_s = t.heads // t.kv_heads, s.heads // s.kv_heads
    return [k * g_t + m for k in range(s.kv_heads) for m in range(g_s)]


# --------------------------------------------------------------------------- copy plans

def _llama_rule(name: str, t: Dims, s: Dims, mlp_init: str):
    """(teacher name, slicer) for a Llama-family student parameter; (None, None) = random init."""
    d = s.hidden
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return name, lambda w: _take(w, w.shape[0], d)
    if name == "model.norm.weight":
        return name, lambda w: _take(w, d)
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m is None:
        return _unknown(name)
    layer, rest = int(m.group(1)), m.group(2)
    q_heads = _query_heads(t, s)
    kv_heads = list(range(s.kv_heads))
    rope_rows = rope_pair_rows(t.head_dim, s.head_dim)
    first_rows = list(range(s.head_dim))
    out_index = {
        "self_attn.q_proj": _rows(q_heads, t.head_dim, rope_rows),
        "self_attn.k_proj": _rows(kv_heads, t.head_dim, rope_rows),
        "self_attn.v_proj": _rows(kv_heads, t.head_dim, first_rows),
        "self_attn.o_proj": d,
        "mlp.gate_proj": s.intermediate,
        "mlp.up_proj": s.intermediate,
        "mlp.down_proj": d,
    }
    in_index = {"self_attn.o_proj": _rows(q_heads, t.head_dim, first_rows), "mlp.down_proj": s.intermediate}
    module, _, kind = rest.rpartition(".")
    if module in ("input_layernorm", "post_attention_layernorm") and kind == "weight":
        def slicer(w: torch.Tensor) -> torch.Tensor:  # a norm weight [d_t] -> its first d entries
            return _take(w, d)
    elif module in out_index and kind in ("weight", "bias"):
        if module.startswith("mlp.") and mlp_init == "random":
            return None, None
        rows, cols = out_index[module], in_index.get(module, d)
        slicer = (lambda w: _take(w, rows, cols)) if kind == "weight" else (lambda b: _take(b, rows))
    else:
        return _unknown(name)
    return ("model.layers.{}." + rest, layer), slicer


def _gpt2_rule(name: str, t: Dims, s: Dims, mlp_init: str):
    d = s.hidden
    if name in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"):
        return name, lambda w: _take(w, w.shape[0], d)
    if name in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        return name, lambda w: _take(w, d)
    m = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
    if m is None:
        return _unknown(name)
    layer, rest = int(m.group(1)), m.group(2)
    heads = list(range(s.heads))
    per_head = _rows(heads, t.head_dim, list(range(s.head_dim)))  # (H_s*hd_s,) into a [H_t*hd_t] axis
    qkv = torch.cat([per_head + block * t.hidden for block in range(3)])  # fused [q | k | v] output columns
    # Conv1D stores weight as [in, out] (transposed vs nn.Linear); bias is [out].
    index = {  # module: (in index, out index)
        "attn.c_attn": (d, qkv),
        "attn.c_proj": (per_head, d),
        "mlp.c_fc": (d, s.intermediate),
        "mlp.c_proj": (s.intermediate, d),
    }
    module, _, kind = rest.rpartition(".")
    if module in ("ln_1", "ln_2") and kind in ("weight", "bias"):
        def slicer(w: torch.Tensor) -> torch.Tensor:  # a LayerNorm weight or bias [d_t] -> its first d entries
            return _take(w, d)
    elif module in index and kind in ("weight", "bias"):
        if module.startswith("mlp.") and mlp_init == "random":
            return None, None
        cols_in, cols_out = index[module]
        slicer = (lambda w: _take(w, cols_in, cols_out)) if kind == "weight" else (lambda b: _take(b, cols_out))
    else:
        return _unknown(name)
    return ("transformer.h.{}." + rest, layer), slicer


def _unknown(name: str):
    raise TailkdError(f"student parameter {name} has no copy rule (an unsupported variant of a supported "
                      f"architecture?): supported teachers are {', '.join(SUPPORTED)} in their standard layout")


# --------------------------------------------------------------------------- the builder

def build_student(teacher, *, num_layers: int | None = None, layers=None, hidden_size: int | None = None,
                  num_heads: int | None = None, num_kv_heads: int | None = None,
                  intermediate_size: int | None = None, mlp_init: str = "random", freeze_embeddings: bool = False,
                  seed: int = 0):
    """A student initialised from `teacher` (see the module docstring) and its provenance table.

    Returns ``(student, table)``: a float32 CPU model of the teacher's class in train mode, and one dict
    per student parameter ``{"name", "shape", "source", "action", "frozen"}`` where action is
    "copied" (same shape), "truncated" (a slice of `source`) or "random" (source None).
    """
    if mlp_init not in MLP_INITS:
        raise TailkdError(f"mlp_init={mlp_init!r}: use one of {', '.join(MLP_INITS)}")
    family = family_of(teacher)
    if getattr(teacher, "hf_quantizer", None) is not None or getattr(teacher.config, "quantization_config", None):
        raise TailkdError("the teacher is a quantized model: load it with tailkd.models.load_teacher, "
                          "which dequantizes GGUF files into a plain model")
    t = teacher_dims(teacher.config, family)
    chosen = choose_layers(t.layers, num_layers, layers)
    s = student_dims(t, family, len(chosen), hidden_size, num_heads, num_kv_heads, intermediate_size)
    config = _student_config(teacher.config, family, s, chosen)

    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    rule = _gpt2_rule if family == "gpt2" else _llama_rule
    teacher_params = dict(teacher.named_parameters())
    table = []
    with torch.no_grad():
        for name, param in student.named_parameters():
            source, slicer = rule(name, t, s, mlp_init)
            if source is None:
                table.append({"name": name, "shape": list(param.shape), "source": None, "action": "random"})
                continue
            if isinstance(source, tuple):  # (pattern, student layer)
                source = source[0].format(chosen[source[1]])
            value = slicer(teacher_params[source].detach())
            if tuple(value.shape) != tuple(param.shape):  # a bug in a rule, not a user error
                raise RuntimeError(f"{name}: sliced {source} to {tuple(value.shape)}, expected {tuple(param.shape)}")
            param.copy_(value.to(device=param.device, dtype=param.dtype))
            same = tuple(param.shape) == tuple(teacher_params[source].shape)
            table.append({"name": name, "shape": list(param.shape), "source": source,
                          "action": "copied" if same else "truncated"})
    frozen = freeze_student_embeddings(student) if freeze_embeddings else []
    for row in table:
        row["frozen"] = row["name"] in frozen
    student.train()
    return student, table


def freeze_student_embeddings(student) -> list[str]:
    """Freeze the input embeddings (GPT-2: token and position) and so a tied head; return their names.

    requires_grad is not saved with a model: call this again after reloading a student to resume.
    """
    names = _EMBEDDINGS[family_of(student)]
    params = dict(student.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return list(names)


def format_table(table) -> str:
    """The table as aligned text, one line per parameter, and a parameter-count summary."""
    header = ("name", "shape", "action", "frozen", "source")
    rows = [(r["name"], "x".join(map(str, r["shape"])), r["action"], "yes" if r.get("frozen") else "",
             r["source"] or "-") for r in table]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    counts = {}
    for r in table:
        n = 1
        for size in r["shape"]:
            n *= size
        counts[r["action"]] = counts.get(r["action"], 0) + n
        if r.get("frozen"):
            counts["frozen"] = counts.get("frozen", 0) + n
    total = sum(v for k, v in counts.items() if k != "frozen")
    parts = ", ".join(f"{counts[k]:,} {k}" for k in ("copied", "truncated", "random", "frozen") if k in counts)
    lines.append(f"{len(table)} tensors, {total:,} parameters: {parts}")
    return "\n".join(lines)
