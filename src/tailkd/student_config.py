"""The student's config.json: the teacher's config with the student's sizes, the per-layer settings of the teacher
layers it keeps (layer kinds, thresholds, index lists, sparse layers, KV sharing, per-layer attention) and the scales
that follow its depth or width (`student_config`, which `tailkd.sizing.student_plan` calls once every refusal of the
shape is made; `tailkd.families` names each family's keys)."""

from __future__ import annotations

import math

from tailkd.errors import TailkdError
from tailkd.families import Family
from tailkd.layer_attention import layer_dims, student_overrides
from tailkd.slicing import Dims
from tailkd.vocab import head_ids

__all__ = ["mixer_width", "not_divisible", "student_config"]


def student_config(teacher_config, fam: Family, t: Dims, s: Dims, fraction: float, layers: list[int],
                    tie: bool | None = None):
    """The student's config: the teacher's (``teacher_config``, of family ``fam``) with the student's sizes ``s`` (the
    teacher's ``t``; ``fraction`` the share of a head RoPE rotates) and the per-layer settings of the chosen teacher
    ``layers``, tied as ``tie`` says (None: the teacher's); the config class's own refusal of it in one line."""
    data = teacher_config.to_dict()
    for key in getattr(teacher_config, "sub_configs", None) or {}:  # nested configs (MPT's attn_config, DBRX's) as
        #  save_pretrained writes them: DBRX's (transformers 5.17) refuse to_dict's generic keys (_name_or_path, ...)
        if hasattr(getattr(teacher_config, key, None), "to_diff_dict"):
            data[key] = getattr(teacher_config, key).to_diff_dict()
    if tie and (pruned := head_ids(teacher_config)) is not None:
        raise TailkdError(f"student.tie_embeddings true, but the teacher's LM head scores its first {pruned} ids only "
                          f"(output_vocab_size; its embeddings read "
                          f"{teacher_config.get_text_config().vocab_size}): tied to them, the student's head would "
                          "score every id; keep it untied (--student.tie_embeddings false)")
    if tie is not None:
        data["tie_word_embeddings"] = bool(tie)
    for key in ("quantization_config", "_name_or_path", "name_or_path"):
        data.pop(key, None)
    data["dtype"] = "float32"  # the student's master weights, whatever the teacher was loaded in
    per_token = [s.experts_per_layer[i] for i in layers] if s.experts_per_layer else s.experts_per_token  # per layer
    sizes = {"layers": s.layers, "hidden": s.hidden, "heads": s.heads, "kv_heads": s.kv_heads,
             "intermediate": s.intermediate, "experts": s.experts, "experts_per_token": per_token}
    aliases = getattr(type(teacher_config), "attribute_map", {})  # e.g. num_experts -> Mixtral's num_local_experts
    for role, value in sizes.items():
        if fam.keys.get(role):
            _set(data, aliases.get(fam.keys[role], fam.keys[role]), value)
    if "heads" in fam.ssm:  # Mamba-2 mixers: their heads
        _set(data, fam.ssm["heads"], s.ssm_heads)
    width, key = mixer_width(teacher_config, fam, s)
    if key:  # the key that sets the width: itself, or expand over hidden_size (whole: `tailkd.sizing.student_widths`)
        data[key] = width if key == fam.ssm.get("width") else width // s.hidden
    data.update({key: s.hidden for key in fam.hidden_keys if key in data})  # equal to the teacher's: `student_widths`
    data.update({key: s.heads for key in fam.heads_keys if key in data})  # Falcon's num_kv_heads without groups
    implied = data.get("head_dim") is None and s.hidden == s.heads * s.head_dim  # Mistral/Mixtral leave it unset
    if fam.head_dim != "derived" and not implied:
        data["head_dim"] = s.head_dim
    if fam.value_head_dim:
        data[fam.value_head_dim] = s.v_head_dim
    _layer_settings(data, teacher_config, fam, t, layers)
    own = layer_dims(teacher_config, fam, t, s, layers, fraction)
    data.update(student_overrides(teacher_config, fam, s, own, layers))  # per_layer_config, query heads per layer
    for key in fam.depth_scales:  # key / sqrt(layers) scales each residual branch: the teacher's per layer
        if s.layers != t.layers and isinstance(data.get(key), (int, float)):
            # r * sqrt(L_s), r = the teacher's key / sqrt(L_t): the model's key / sqrt(L_s) gives back r to within a
            # double's ulp, the same float32 (what multiplies the activations), for every pair of depths below 120
            data[key] = data[key] / math.sqrt(t.layers) * math.sqrt(s.layers)
    for key in fam.hidden_ratios:  # hidden_size / key: the teacher's (`student_widths` refused a ratio it cannot keep)
        if s.hidden != t.hidden and isinstance(data.get(key), int):
            data[key] = data[key] * s.hidden // t.hidden
    for key in fam.head_dim_scaled:  # proportional to head_dim: an attention scale 1/sqrt(key), MiniMax-M2's RoPE rows
        if s.head_dim != t.head_dim and isinstance(data.get(key), (int, float)):
            data[key] = max(1, round(data[key] * s.head_dim / t.head_dim))
    if fam.rotary_dim_key and data.get(fam.rotary_dim_key):  # GPT-J: the rotated rows of a student head
        data[fam.rotary_dim_key] = int(s.head_dim * fraction)
    for key in fam.attention_scales:  # the scale itself: as 1/sqrt(head_dim) changes; "a.b": key b of dict a (MPT)
        *outer, name = key.split(".")
        group = data.get(outer[0]) if outer else data
        if s.head_dim != t.head_dim and isinstance(group, dict) and isinstance(group.get(name), (int, float)):
            group[name] = group[name] * (t.head_dim / s.head_dim) ** 0.5
    try:
        return type(teacher_config).from_dict(data)
    except Exception as err:  # config classes validate: hidden % heads (transformers 5: Llama, Gemma2, Gemma3), DBRX
        #                       refuses a tied head
        if s.heads and s.hidden % s.heads:
            raise not_divisible(s.hidden, s.heads, f", which {type(teacher_config).__name__} requires") from err
        why = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise TailkdError(f"{type(teacher_config).__name__} refuses the student's config: "
                          f"{why[-1] if why else type(err).__name__}") from err


def _layer_settings(data: dict, teacher_config, fam: Family, t: Dims, layers: list[int]) -> None:
    """The settings of ``data`` (a config's dict) that name or list layers, for the chosen teacher ``layers``: layer
    kinds, thresholds, index lists, KV sources and sharing, routed or dense MLPs."""
    for key in fam.layer_lists:  # per-layer settings (layer_types: sliding/full attention) follow the layers
        if isinstance(data.get(key), list) and len(data[key]) == t.layers:
            data[key] = [data[key][i] for i in layers]
    for key in fam.run_length_layer_lists:  # [[kinds, repeat], ...]: one [[kind], 1] per chosen layer
        if isinstance(data.get(key), list) and layers != list(range(t.layers)):
            spelled = [kind for kinds, repeat in data[key] for _ in range(repeat) for kind in kinds]
            data[key] = [[[spelled[i]], 1] for i in layers]
    for key in fam.layer_thresholds:  # "layer N and later": the number of chosen layers before N
        if isinstance(data.get(key), int):
            data[key] = sum(i < data[key] for i in layers)
    for key in fam.layer_last_indices:  # "up to layer N": the student's index of the last chosen layer up to N
        if isinstance(data.get(key), int):
            data[key] = sum(i <= data[key] for i in layers) - 1
    for key in fam.layer_index_lists:  # lists of layer indices: the student's indices of the chosen layers listed
        if isinstance(data.get(key), list):
            data[key] = [j for j, i in enumerate(layers) if i in data[key]]
    if fam.kv_sources and isinstance(data.get(fam.kv_sources), list):  # the student's index of each chosen source
        data[fam.kv_sources] = [layers.index(data[fam.kv_sources][i]) for i in layers]  # (kept: `tailkd.layer_choice`)
    if fam.kv_shared_layers and isinstance(data.get(fam.kv_shared_layers), int):  # the last N: the chosen ones
        data[fam.kv_shared_layers] = sum(i >= t.layers - data[fam.kv_shared_layers] for i in layers)
    if fam.sparse_by_index:  # routed or dense MLPs follow the chosen layers, not the student's own indices
        sparse = [_sparse_layer(teacher_config, i) for i in layers]
        if sparse != [_sparse_layer(teacher_config, j) for j in range(len(layers))]:  # the teacher's rule differs
            data["mlp_only_layers"] = [j for j, is_sparse in enumerate(sparse) if not is_sparse]
            data["decoder_sparse_step"] = 1


def mixer_width(teacher_config, fam: Family, s: Dims) -> tuple[int, str | None]:
    """``(width, key)``: a student's Mamba mixer width (`Family.ssm`: its heads x head_dim; Jamba's Mamba-1 mixers
    their channels, heads of one) and the config key that sets it — the width key where the teacher's config sets it
    (Falcon-H1's mamba_d_ssm), else the expand key (the width over hidden_size) —; ``(0, None)`` without Mamba mixers,
    None for a width no key sets (Nemotron-H's heads x head_dim)."""
    if not fam.ssm:
        return 0, None
    expand, width_key = fam.ssm.get("expand"), fam.ssm.get("width")
    width = s.ssm_heads * s.ssm_head_dim
    if width_key and getattr(teacher_config, width_key, None) is not None:
        return width, width_key
    return width, expand


def _sparse_layer(config, i: int) -> bool:
    """Whether Qwen-MoE's layer i routes to experts (their modeling code's rule), else a dense MLP."""
    only = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", None) or 1
    return i not in only and getattr(config, "num_experts", 0) > 0 and (i + 1) % step == 0


def _set(data: dict, key: str, value) -> None:
    """Set ``key`` of a config's dict (`tailkd.families.setting`'s "a.b": key b of its dict a)."""
    *outer, name = key.split(".")
    for part in outer:
        data = data[part]
    data[name] = value


def not_divisible(hidden: int, heads: int, why: str = "") -> TailkdError:
    return TailkdError(f"hidden_size={hidden} is not divisible by num_heads={heads}{why}: "
                       f"pick a hidden_size that is a multiple of {heads} or another num_heads")
