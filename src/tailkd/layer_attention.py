"""Attention that differs by layer, for a student cut from such a teacher: transformers 5's ``per_layer_config``
overrides of ``head_dim`` and ``num_key_value_heads`` (Gemma 4's full attention layers: heads of global_head_dim and,
with attention_k_eq_v, KV heads of their own, keys used as values), a list of each layer's query heads
(`Family.layer_heads`: Laguna's num_attention_heads_per_layer), RoPE rotating a share of a head of each layer
kind's own (`layer_fractions`: Laguna's partial_rotary_factor per kind), KV heads a layer kind has a multiple of
(`Family.kind_kv_multiple`: MiMo-V2-Flash's sliding layers, twice), a layer kind with heads of its own, kept whole
(`Family.kind_heads`: Kimi Linear's delta attention layers beside its latent attention ones), and layers that reuse an
earlier layer's keys and values (Gemma 4's last num_kv_shared_layers, Kolibri 1.1's kv_source_layers).

A student layer keeps its teacher layer's own value scaled as the config's is — head_dim h_i x h_s / h_t, KV heads
k_i x k_s / k_t, query heads q_i x q_s / q_t — so a layer that differs in the teacher differs alike in the student
(narrowing nothing keeps every value); a scale that is not a whole number, or heads that do not group, are refused in
one line; a layer kind with heads of its own keeps them all.
`layer_dims` gives each such layer's teacher and student `tailkd.slicing.Dims` (`tailkd.slicing.axis_indices` cuts its
tensors by them), `student_overrides` the student config's ``per_layer_config`` (and its list of query heads),
`layer_query_heads` the teacher's query heads layer by layer (`tailkd.calibration` measures each head),
`keys_as_values` the layers whose values are their keys (`Family.keys_as_values`: their output projection reads the
kept keys' rows), `kv_sharing` (Gemma 4's last layers) and `kv_reads` (a per-layer list: Kolibri 1.1's) the
teacher's layers that reuse keys and values and what they read (`tailkd.layer_choice` keeps what they need),
`kv_sources` what a student's read, `reused_results` the layers that reuse another result of an earlier layer (GLM-5's
DSA top-k, Kolibri 1.1's key pools).
"""

from __future__ import annotations

import dataclasses
import math

from tailkd.errors import TailkdError
from tailkd.families import Family
from tailkd.slicing import Dims

__all__ = ["keys_as_values", "kv_reads", "kv_sharing", "kv_sources", "layer_dims", "layer_fractions",
           "layer_query_heads", "overrides", "result_layers", "reused_results", "student_overrides"]

# the per-layer keys a student scales, and the `Dims` field each is
SCALED = {"head_dim": "head_dim", "num_key_value_heads": "kv_heads"}


def overrides(config) -> dict[int, dict] | None:
    """``{teacher layer: {key: value}}``: the config's per-layer overrides (transformers 5's ``per_layer_config``,
    sparse: only the layers that differ), None without."""
    data = config.to_dict().get("per_layer_config")
    return {int(i): dict(v) for i, v in data.items()} if isinstance(data, dict) else None


def _scaled(source: str, flag: str, value: int, own_t: int, own_s: int, fam: Family, i: int) -> int:
    """``value`` (layer i's own, read from ``source``) x own_s / own_t, refused in one line where it is not whole."""
    if value * own_s % own_t:
        step = own_t // math.gcd(own_t, value)
        raise TailkdError(f"{flag}={own_s}, but teacher layer {i} ({fam.label}) has {value} ({source}) where its "
                          f"config has {own_t}, which a student scales alike ({own_t} -> {own_s}): pick a {flag} "
                          f"that is a multiple of {step}")
    return value * own_s // own_t


def _share(config, i: int, fraction: float) -> float:
    """The share of a head RoPE rotates in layer i: its kind's (per-kind ``rope_parameters``: Laguna's
    partial_rotary_factor, 0.5 in its full layers and 1 in its sliding ones; proportional RoPE pairs over the whole
    head: 1), else ``fraction`` (the config's: `tailkd.sizing.rotary_fraction`)."""
    kinds = getattr(config, "layer_types", None) or ()
    group = (getattr(config, "rope_parameters", None) or {}).get(kinds[i]) if i < len(kinds) else None
    if not isinstance(group, dict):
        return fraction
    return 1.0 if group.get("rope_type") == "proportional" else float(group.get("partial_rotary_factor") or 1.0)


def layer_fractions(config, fam: Family, t: Dims, s: Dims, layers, fraction: float) -> dict[int, float]:
    """``{teacher layer: the share of a head RoPE rotates there}`` for each of ``layers`` whose kind rotates another
    share than the config's ``fraction`` (`tailkd.slicing.axis_indices` picks that layer's RoPE pairs by it). Refused
    in one line: a student head that would rotate an odd number of rows there, or none where the teacher's rotates."""
    found = {}
    for i in sorted(set(layers)) if fam.rope else ():
        if (share := _share(config, i, fraction)) == fraction:
            continue
        rot, rot_t = int(s.head_dim * share), int(t.head_dim * share)
        if rot % 2 or (rot == 0 and rot_t > 0):
            raise TailkdError(f"head_dim={s.head_dim}: teacher layer {i}'s kind rotates {share:g} of a head "
                              f"(partial_rotary_factor), {rot} rows of the student's, but RoPE rotates pairs of rows: "
                              f"pick a head_dim whose {share:g} share is an even number of rows (at least 2)")
        found[i] = share
    return found


def _kind_heads(config, fam: Family, i: int) -> tuple[int, int] | None:
    """``(heads, head size)`` of layer i where its kind has heads of its own (`Family.kind_heads`: Kimi Linear's delta
    attention layers), None elsewhere."""
    kinds = getattr(config, "layer_types", None) or ()
    if not fam.kind_heads or i >= len(kinds) or kinds[i] != fam.kind_heads[0]:
        return None
    return int(getattr(config, fam.kind_heads[1])), int(getattr(config, fam.kind_heads[2]))


def layer_query_heads(config, fam: Family, t: Dims) -> list[int]:
    """The teacher's query heads, layer by layer: its list of them (`Family.layer_heads`), else ``t.heads`` each, a
    layer kind's own where it has them (`Family.kind_heads`)."""
    listed = getattr(config, fam.layer_heads, None) if fam.layer_heads else None
    heads = [int(h) for h in listed] if listed else [t.heads] * t.layers
    return [own[0] if (own := _kind_heads(config, fam, i)) else h for i, h in enumerate(heads)]


def layer_dims(config, fam: Family, t: Dims, s: Dims, layers, fraction: float = 1.0) -> dict[int, tuple[Dims, Dims]]:
    """``{teacher layer: (its Dims, the student layer's Dims)}`` for each of ``layers`` whose attention sizes differ
    from the config's own (see the module docstring); ``fraction`` the share of a head RoPE rotates. Refused in one
    line: a scaled size that is not whole, query heads that are not a multiple of a layer's KV heads, a head that
    would rotate an odd number of rows."""
    found, heads, listed = {}, layer_query_heads(config, fam, t), overrides(config) or {}
    kinds = getattr(config, "layer_types", None) or ()
    for i in sorted(set(layers)):
        if own := _kind_heads(config, fam, i):  # heads of the kind's own, kept whole
            found[i] = tuple(dataclasses.replace(d, heads=own[0], kv_heads=own[0], head_dim=own[1], v_head_dim=0)
                             for d in (t, s))
            continue
        over = listed.get(i, {})
        kind = kinds[i] if i < len(kinds) else None
        multiple = fam.kind_kv_multiple[1] if fam.kind_kv_multiple and kind == fam.kind_kv_multiple[0] else 1
        if not over and heads[i] == t.heads and multiple == 1:
            continue
        hd_t, kv_t = over.get("head_dim", t.head_dim), over.get("num_key_value_heads", t.kv_heads * multiple)
        hd_s = _scaled("head_dim in per_layer_config", "head_dim", hd_t, t.head_dim, s.head_dim, fam, i)
        kv_s = _scaled("num_key_value_heads in per_layer_config", "num_kv_heads", kv_t, t.kv_heads, s.kv_heads, fam,
                       i)
        q_s = _scaled(fam.layer_heads, "num_heads", heads[i], t.heads, s.heads, fam, i) if fam.layer_heads else s.heads
        if q_s % kv_s:
            raise TailkdError(f"num_heads={s.heads}, num_kv_heads={s.kv_heads}: the student's layer from teacher "
                              f"layer {i} would have {q_s} query heads on {kv_s} KV heads (the teacher's {heads[i]} on "
                              f"{kv_t}, scaled as num_heads {t.heads} -> {s.heads}, num_kv_heads {t.kv_heads} -> "
                              f"{s.kv_heads}), which do not group: pick num_heads and num_kv_heads that give every "
                              "layer a multiple of its KV heads")
        if fam.rope and int(hd_s * _share(config, i, fraction)) % 2:
            raise TailkdError(f"head_dim={s.head_dim} gives the student's layer from teacher layer {i} heads of "
                              f"{hd_s} rows ({hd_t} there, scaled as head_dim {t.head_dim} -> {s.head_dim}), which "
                              "RoPE cannot rotate in pairs: pick an even head_dim")
        found[i] = (dataclasses.replace(t, heads=heads[i], head_dim=hd_t, kv_heads=kv_t),
                    dataclasses.replace(s, heads=q_s, head_dim=hd_s, kv_heads=kv_s))
    return found


def student_overrides(config, fam: Family, s: Dims, own: dict[int, tuple[Dims, Dims]], layers) -> dict:
    """The student config's keys that differ by layer: its ``per_layer_config`` — the overrides of its teacher
    ``layers``, renumbered, the scaled keys (`SCALED`) the student layer's (``own``: `layer_dims`' for these layers),
    other keys as the teacher's — where the teacher's config has one, and its list of query heads
    (`Family.layer_heads`)."""
    data = {}
    if (found := overrides(config)) is not None:
        data["per_layer_config"] = {str(j): {key: getattr(own[i][1], SCALED[key]) if key in SCALED else value
                                             for key, value in found[i].items()} for j, i in enumerate(layers)
                                    if i in found}
    if fam.layer_heads and getattr(config, fam.layer_heads, None):
        data[fam.layer_heads] = [own[i][1].heads if i in own else s.heads for i in layers]
    return data


def keys_as_values(config, fam: Family) -> set[int]:
    """The teacher layers whose attention uses its keys as values (`Family.keys_as_values`: (a config flag, the layer
    kind it applies to), Gemma 4's attention_k_eq_v in full attention layers)."""
    if not fam.keys_as_values or not getattr(config, fam.keys_as_values[0], False):
        return set()
    kinds = getattr(config, "layer_types", None) or ()
    return {i for i, kind in enumerate(kinds) if kind == fam.keys_as_values[1]}


def kv_sharing(config, fam: Family) -> tuple[int, list | None, dict]:
    """``(first, kinds, read)`` of a family whose last layers reuse earlier layers' keys and values
    (`Family.kv_shared_layers`: Gemma 4): the first such layer, the layers' kinds (``layer_types``) and, per kind, the
    last layer before the sharing ones (whose keys and values the teacher's sharing layers of that kind read);
    ``(0, None, {})`` where none shares."""
    kinds = getattr(config, "layer_types", None)
    shared = (getattr(config, fam.kv_shared_layers, 0) or 0) if fam.kv_shared_layers and kinds else 0
    if not shared:
        return 0, None, {}
    first = len(kinds) - shared
    return first, kinds, {kinds[i]: i for i in range(first)}


def result_layers(config, fam: Family) -> list[int]:
    """The teacher layers that compute or reuse a result some reuse (`reused_results`): every layer of GLM-5's
    indexer_types, Kolibri 1.1's indexed-attention layers (`Family.reindexes`); [] elsewhere."""
    if fam.reuses_earlier:
        return list(range(len(getattr(config, fam.reuses_earlier[0], None) or ())))
    if fam.reindexes:
        return [i for i, kind in enumerate(getattr(config, "layer_types", None) or ()) if kind == fam.reindexes[1]]
    return []


def reused_results(config, fam: Family) -> dict[int, int]:
    """``{teacher layer: the teacher layer whose result it reuses}`` of a family whose layers of one kind reuse what
    the last earlier layer of another kind computed (`Family.reuses_earlier`: GLM-5's shared DSA layers, the top-k of
    the last full indexer layer; `Family.reindexes`: Kolibri 1.1's indexed-attention layers its index_layers does not
    list, the pool of the closest preceding one it lists); {} elsewhere. A student's such layer reuses its last
    earlier chosen layer's."""
    among = result_layers(config, fam)
    if fam.reuses_earlier:
        kinds = getattr(config, fam.reuses_earlier[0], None) or ()
        computes = [kind != fam.reuses_earlier[1] for kind in kinds]
    elif fam.reindexes:
        listed = set(getattr(config, fam.reindexes[0], None) or ())
        computes = [i in listed for i in among]
    else:
        return {}
    found, last = {}, None
    for i, own in zip(among, computes):
        if own:
            last = i
        elif last is not None:
            found[i] = last
    return found


def kv_reads(config, fam: Family) -> dict[int, int]:
    """``{teacher layer: the layer whose keys and values it reads}`` of a family listing each layer's
    (`Family.kv_sources`: Kolibri 1.1's kv_source_layers), the layers reading another's; {} elsewhere."""
    sources = getattr(config, fam.kv_sources, None) if fam.kv_sources else None
    return {i: int(j) for i, j in enumerate(sources or ()) if j != i}


def kv_sources(config, fam: Family, chosen: list[int]) -> dict[int, int]:
    """``{teacher layer: teacher layer}``: of the ``chosen`` layers that reuse keys and values (`kv_sharing`), the
    chosen layer each reads them from in the student (the last chosen one of its kind before the sharing layers, as
    the model's own rule gives; where the config lists each layer's, `kv_reads`, the teacher's: kept); {} where none
    shares."""
    if fam.kv_sources:
        return {i: j for i, j in kv_reads(config, fam).items() if i in chosen and j in chosen}
    first, kinds, _ = kv_sharing(config, fam)
    own = [j for j in chosen if j < first]
    return {i: max(j for j in own if kinds[j] == kinds[i]) for i in chosen
            if kinds is not None and i >= first and any(kinds[j] == kinds[i] for j in own)}
