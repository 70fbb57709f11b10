"""Which layers, channels, heads, units and experts a student keeps, from what the teacher's forward over calibration
rows measured (`tailkd.calibration`, whose docstring defines each measure and the rule that keeps by it):
`wanted_measures` says what a student's settings need measured, the ``calibrated_*`` functions turn the measures into
the indices kept, `largest` is the one rule they share (`kept_heads` its form for query heads on their KV heads).
"""

from __future__ import annotations

import re

import torch

from tailkd.calibration import experts_module, norm_modules
from tailkd.errors import TailkdError
from tailkd.families import Family
from tailkd.slicing import Dims, mlp_units

__all__ = ["calibrated_channels", "calibrated_experts", "calibrated_heads", "calibrated_layers", "calibrated_ssm_heads",
           "calibrated_units", "kept_heads", "largest", "wanted_measures"]


def largest(values: torch.Tensor, n: int, groups: int = 1) -> torch.Tensor:
    """The indices of the ``n`` largest of ``values`` [N] (ties to the lower index), in increasing order; with
    ``groups`` equal groups of consecutive entries, each group's n / groups largest: the one rule that picks the
    layers (Block Influence), the hidden channels and MLP units (activity), the heads (importance, per KV head; see
    `kept_heads`) and the experts (use, per group) a student keeps."""
    size, per = values.numel() // groups, n // groups
    kept = []
    for g in range(groups):
        order = torch.sort(-values[g * size:(g + 1) * size], stable=True).indices[:per]
        kept.append(g * size + order.sort().values)
    return torch.cat(kept)


def kept_heads(importance: torch.Tensor, kv_heads: int, student_kv_heads: int, per_kv_head: int,
               groups: list[int] | None = None) -> torch.Tensor:
    """The teacher query heads a student keeps by ``importance`` [heads] (``kv_heads`` teacher KV heads over equal
    consecutive groups of query heads): per KV head its ``per_kv_head`` most important query heads, and of the KV heads
    the ``student_kv_heads`` whose kept query heads sum to the most (`largest`'s ties) — or ``groups``, KV heads given
    (a layer reading another's keys and values keeps that layer's); listed KV head by KV head in increasing order, so
    that student query head j keeps the teacher KV head of entry j // per_kv_head."""
    size = importance.numel() // kv_heads
    best = [k * size + largest(importance[k * size:(k + 1) * size], per_kv_head) for k in range(kv_heads)]
    if groups is None:
        groups = largest(torch.stack([importance[b].sum() for b in best]), student_kv_heads).tolist()
    return torch.cat([best[k] for k in groups])


# From the measures to the indices a student keeps; ``t``, ``s``: the teacher's and the student's sizes, ``chosen``: the
# teacher layers the student keeps.


def wanted_measures(fam: Family, t: Dims, s: Dims, *, layers, layer_choice: str, hidden_channels: str,
                    attention_heads: str, mlp_units: str, experts: str, ssm_head_choice: str = "first") -> dict:
    """``{tailkd.calibration.PROBES key: teacher layers}``: what `tailkd.calibration.measure` reads for a student of
    sizes ``s`` from a teacher of sizes ``t`` (the teacher's family ``fam``) under these choices of
    `tailkd.student.build_student` (``layers``: the teacher layers it lists, None to choose them): every teacher layer
    (the layers may be yet to be chosen) for each choice that has something to choose; {} where every layer, channel,
    head, unit or expert is kept, or the first ones are asked for. A choice ``fam`` cannot make is refused in one
    line."""
    every = list(range(t.layers))
    found = {}
    if layer_choice == "influence" and layers is None and s.layers < t.layers:
        found["layer_choice=influence"] = every
    if hidden_channels == "active" and s.hidden != t.hidden:
        found["hidden_channels=active"] = every
    if attention_heads == "active" and not t.heads:
        raise TailkdError(f"attention_heads=active chooses attention heads, but {fam.label} has none: drop it")
    if attention_heads == "active" and (s.heads, s.kv_heads) != (t.heads, t.kv_heads):
        found["attention_heads=active"] = every
    if ssm_head_choice == "active" and not t.ssm_heads:
        raise TailkdError(f"ssm_head_choice=active chooses Mamba heads, but {fam.label} has none: drop it")
    if ssm_head_choice == "active" and s.ssm_heads != t.ssm_heads:
        found["ssm_head_choice=active"] = every
    if mlp_units == "active":
        path = experts_module(fam) if t.experts else ""
        standard = {f"{path}.gate_up_proj": ("expert", "gate_up", "d"), f"{path}.down_proj": ("expert", "d", "ff")}
        if t.experts and any(fam.layer_params.get(name) != axes for name, axes in standard.items()):
            raise TailkdError(f"mlp_units=active measures a mixture's experts stored as gate_up_proj [experts, gate | "
                              f"up, hidden] and down_proj [experts, hidden, units], which {fam.label}'s are not: drop "
                              "it")
        if not t.experts and not any("ff" in axes for axes in fam.layer_params.values()):
            raise TailkdError(f"mlp_units=active chooses the units of a dense MLP cut by intermediate_size, which "
                              f"{fam.label}'s MLP is not: drop it")
        if s.intermediate != t.intermediate:
            found["mlp_units=active"] = every
    if experts == "used":
        if not t.experts:
            raise TailkdError(f"experts=used chooses among a mixture's routed experts, but {fam.label} is not a "
                              "mixture of experts: drop it")
        if s.experts != t.experts:
            found["experts=used"] = every
    return found


def calibrated_layers(measured: dict, num_layers: int | None, layers, period: int = 1,
                      needs: tuple = ((), {}, None)) -> tuple[int | None, list | None]:
    """``(num_layers, layers)`` of a student after its calibration (`tailkd.student.calibrate`'s ``measured``): the
    ``num_layers`` teacher layers of largest Block Influence, in order, where it was measured; else as given. Where
    the layers' kinds repeat every ``period`` layers (`tailkd.layer_choice.layer_period`: Jamba's), the whole periods
    of largest summed influence. Where layers need others (``needs``, `tailkd.layer_choice.layer_needs`: Gemma 4's),
    the layers it names first — and where the config needs a layer of each kind (OLMo-Hybrid's), each kind's most
    influential layer —, then by influence (ties to the lower index) each layer with the ones it needs where they all
    fit."""
    influence = measured.get("layer_choice=influence")
    if influence is None:
        return num_layers, layers
    if period > 1:
        by_period = influence[: len(influence) // period * period].reshape(-1, period).sum(1)
        return None, [p * period + r for p in largest(by_period, num_layers // period).tolist() for r in range(period)]
    first, needed, kinds = needs
    order = sorted(range(len(influence)), key=lambda i: (-float(influence[i]), i))  # by influence, ties to the lower
    best = {}
    for i in order if kinds else ():
        best.setdefault(kinds[i], i)
    first = [*first, *best.values()]
    if not first and not needed:
        return None, largest(influence, num_layers).tolist()
    chosen = set()
    for i in [*first, *order]:
        add = {i, *needed.get(i, ())} - chosen
        if len(chosen) + len(add) <= num_layers:
            chosen |= add
    return None, sorted(chosen)


def _fraction(part: torch.Tensor, whole: torch.Tensor) -> float:
    """``part / whole`` (a share of a sum), rounded to 6 digits; 0 where the whole is 0."""
    return round(float(part / whole.clamp_min(1e-300)), 6)


def _share(values: torch.Tensor, kept: torch.Tensor) -> float:
    """The share of ``values``' sum the entries ``kept`` have (rounded to 6 digits)."""
    return _fraction(values[kept].sum(), values.sum())


def calibrated_channels(fam: Family, s: Dims, chosen: list[int], per_norm: dict | None):
    """``(channels, share)``: the residual-stream channels a student keeps by activity (LongTensor, increasing) —
    summed over the norms of its ``chosen`` teacher layers and the model's own, of ``per_norm`` (the teacher's
    measure) — and the share of that activity they had; ``(None, None)`` without a measure."""
    if per_norm is None:
        return None, None
    activity = sum(per_norm[name] for name in norm_modules(fam, sorted(set(chosen))) if name in per_norm)
    channels = largest(activity, s.hidden)
    return channels, _share(activity, channels)


def calibrated_heads(t: Dims, s: Dims, chosen: list[int], importance: dict | None, blocks: int = 0,
                     own: dict | None = None, sources: dict | None = None):
    """``(heads, share)``: per attention layer among the teacher's ``chosen``, the query heads a student keeps by
    ``importance`` (the teacher's measure; LongTensor, KV head by KV head: `kept_heads`; in a family's head ``blocks``,
    block by block, every block kept) and the share of the layer's head importance they had; empty without a
    measure. ``own``: layers with heads of their own (`tailkd.layer_attention.layer_dims`: {layer: (teacher Dims,
    student Dims)}); ``sources``: layers that read another's keys and values ({layer: that layer},
    `tailkd.layer_attention.kv_sources`), which keep its KV heads and choose their query heads among theirs. A layer
    that keeps every head (a layer kind's own heads: Kimi Linear's delta attention) has no choice and no entry."""
    if importance is None:
        return {}, {}
    own, sources, heads = own or {}, sources or {}, {}
    for i in sorted(set(chosen) & set(importance), key=lambda i: i in sources):  # sources before their readers
        t_i, s_i = own.get(i, (t, s))
        if (t_i.heads, t_i.kv_heads) == (s_i.heads, s_i.kv_heads):
            continue
        groups = (blocks, blocks, s.heads // blocks) if blocks else (t_i.kv_heads, s_i.kv_heads,
                                                                      s_i.heads // s_i.kv_heads)
        given = None
        if i in sources and sources[i] in heads:  # the KV heads of the layer it reads
            given = [int(h) // (t_i.heads // t_i.kv_heads) for h in heads[sources[i]][::groups[2]]]
        heads[i] = kept_heads(importance[i], *groups, given)
    return heads, {i: _share(importance[i], h) for i, h in heads.items()}


def calibrated_ssm_heads(t: Dims, s: Dims, chosen: list[int], importance: dict | None):
    """``(heads, share)``: per Mamba-2 layer among the teacher's ``chosen``, the heads a student keeps by
    ``importance`` (the teacher's measure; LongTensor, group by group: each group's ``s.ssm_heads / groups`` largest,
    increasing) and the share of the layer's head importance they had; empty without a measure."""
    if importance is None:
        return {}, {}
    heads = {i: largest(importance[i], s.ssm_heads, t.ssm_groups) for i in sorted(set(chosen) & set(importance))}
    return heads, {i: _share(importance[i], h) for i, h in heads.items()}


def calibrated_units(s: Dims, chosen: list[int], activity: dict | None, experts_kept=None, width: int = 0):
    """``(units, share)``: per teacher layer among ``chosen``, the MLP units a student keeps by ``activity`` (the
    teacher's measure) and the share of the layer's activity they had; empty without a measure. A dense MLP's: a
    LongTensor (increasing), as many as `tailkd.slicing.mlp_units` keeps of its width (``width``: the teacher's
    intermediate_size; a layer's MLP twice as wide keeps twice ``s.intermediate``); a mixture's routed experts' ([E,
    ff] measures): one row per expert the student keeps (``experts_kept(layer)``: the teacher's indices, or how many
    first ones), its units, the share over those experts."""
    if activity is None:
        return {}, {}
    units, share = {}, {}
    for i in sorted(set(chosen) & set(activity)):  # a mixture's dense layers kept whole have no measure
        a = activity[i]
        if a.dim() == 1:
            units[i] = largest(a, mlp_units(len(a), s.intermediate, width or len(a)))
            share[i] = _share(a, units[i])
            continue
        experts = experts_kept(i)
        experts = torch.arange(experts) if isinstance(experts, int) else experts
        units[i] = torch.stack([largest(a[e], s.intermediate) for e in experts.tolist()])
        share[i] = _fraction(a[experts].gather(1, units[i]).sum(), a[experts].sum())
    return units, share


def calibrated_experts(t: Dims, s: Dims, chosen: list[int], counts: dict | None):
    """``(kept, share)``: per routed teacher layer among ``chosen``, the experts a student keeps by use (the teacher's
    routing ``counts``; LongTensor, increasing, per group under group-limited routing) and the share of the layer's
    calibration routings they had; empty without a measure."""
    if counts is None:
        return {}, {}
    routed = sorted(i for i in set(chosen) if i in counts)
    if not routed:  # a mixture's dense layers only (DeepSeek's first layers, Qwen-MoE's mlp_only_layers)
        raise TailkdError(f"none of the student's teacher layers ({' '.join(map(str, chosen))}) routes to experts: "
                          "experts=used has nothing to count; drop it")
    kept = {i: largest(counts[i], s.experts, t.expert_groups) for i in routed}
    return kept, {i: round(float(counts[i][k].sum()) / max(1, int(counts[i].sum())), 6) for i, k in kept.items()}


def calibrated_choice_lines(table: list[dict], rows: int) -> list[str]:
    """The run log's line for each calibrated choice a student built from the teacher was made with, read from its
    table (`tailkd.student.build_student`: the keys it adds per tensor)."""
    lines = []

    def per_layer(key: str, by: str = "name") -> dict:  # {layer index in row[by]: row[key]} of the rows holding key
        return {int(re.search(r"\.(\d+)\.", row[by]).group(1)): row[key] for row in table if key in row and row[by]}

    def span(shares: dict) -> str:
        return f"{100 * min(shares.values()):.1f}%-{100 * max(shares.values()):.1f}%"

    if influence := per_layer("block_influence", by="source"):  # per teacher layer
        lines.append(f"layers kept by influence (student.layer_choice influence, student.calibration_rows {rows}): "
                     f"teacher layers {' '.join(map(str, sorted(influence)))}, their Block Influence "
                     f"{min(influence.values()):.4f}-{max(influence.values()):.4f}")
    if channels := next((row for row in table if "channel_share" in row), None):
        lines.append(f"hidden channels kept by activity (student.hidden_channels active, student.calibration_rows "
                     f"{rows}): {channels['channels'].split(',')[0]}, {100 * channels['channel_share']:.1f}% of the "
                     "mean |output| of the teacher's norms")
    if heads := per_layer("head_share"):  # per student layer
        lines.append(f"attention heads kept by importance (student.attention_heads active, student.calibration_rows "
                     f"{rows}): {span(heads)} of the teacher's head output norm in each of the {len(heads)} attention "
                     "layers")
    if ssm := per_layer("ssm_head_share"):
        mamba1 = any(".x_proj." in row["name"] for row in table if "ssm_heads" in row)  # Jamba's: channels
        what = ("Mamba-1 channels", "channel output |value|", "Mamba-1") if mamba1 else (
            "Mamba-2 heads", "head output norm", "Mamba-2")
        lines.append(f"{what[0]} kept by importance (student.ssm_head_choice active, student.calibration_rows {rows}): "
                     f"{span(ssm)} of the teacher's {what[1]} in each of the {len(ssm)} {what[2]} layers")
    if active := per_layer("active_share"):
        lines.append(f"MLP units kept by activity (student.mlp_units active, student.calibration_rows {rows}): "
                     f"{span(active)} of the teacher's mean |activation| in each of the {len(active)} layers")
    if shares := per_layer("routed_share"):
        lines.append(f"experts kept by use (student.experts used, student.calibration_rows {rows}): {span(shares)} "
                     f"of the teacher's routings in each of the {len(shares)} routed layers went to them "
                     "(student_init.json lists them)")
    return lines
