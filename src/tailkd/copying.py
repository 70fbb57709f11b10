"""The copy of `tailkd.student.build_student`: which slice of which teacher tensor each student tensor takes, and the
provenance row it leaves in the student's table.

A family's copy rules (`tailkd.families.Family`: ``params`` by name, ``layer_params`` per layer, each with the kinds
of its axes) name a student tensor's teacher tensor; `Choices` holds what cuts it, for one student: the layers kept,
every axis's rows (`tailkd.slicing.axis_indices`, a layer's own where its heads, sizes or RoPE share differ), and the
calibrated choices (`tailkd.calibrated`: channels, heads, Mamba-2 heads, routed experts and MLP units by the teacher's
use). `copy_into` copies the slice; `provenance` names the choices behind it for the table.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

from tailkd.calibrated import (
    calibrated_channels,
    calibrated_experts,
    calibrated_heads,
    calibrated_ssm_heads,
    calibrated_units,
)
from tailkd.errors import TailkdError
from tailkd.families import SUPPORTED, Family
from tailkd.layer_attention import keys_as_values, kv_sources, layer_dims, layer_fractions
from tailkd.slicing import (
    HEAD_AXES,
    SSM_AXES,
    Dims,
    axis_indices,
    each_experts_units,
    expert_unit_rows,
    ssm_axes,
    take,
)

__all__ = ["Choices", "copy_into", "copy_rule", "head_member", "in_layer", "provenance"]


def copy_rule(name: str, fam: Family, mlp_init: str, buffer: bool = False):
    """(teacher name or (pattern, student layer[, (head kind, student head)]), axis kinds) for a student parameter (or
    persistent ``buffer``); (None, None) = random (a buffer the table does not name: its own init). A member of a
    per-head module list (`Family.head_module_lists`) names its list's entry "<list>.*.<parameter>", its pattern the
    teacher head's index to fill."""
    if name in fam.params:
        return name, fam.params[name]
    layer, rest = in_layer(name, fam)
    if member := head_member(rest, fam):
        path, kind, head, tail = member
        axes = fam.layer_params[f"{path}.*.{tail}"]
        return (fam.layer_prefix + "{}." + path + ".{}." + tail, layer, (kind, head)), axes
    if rest not in fam.layer_params:
        if buffer:
            return None, None
        raise TailkdError(f"student parameter {name} has no copy rule (an unsupported variant of a supported "
                          f"architecture?): supported teachers are {', '.join(SUPPORTED)} in their standard layout")
    if rest.startswith(fam.mlp_prefix) and mlp_init == "random":
        return None, None
    return (fam.layer_prefix + "{}." + rest, layer), fam.layer_params[rest]


def head_member(rest: str | None, fam: Family) -> tuple[str, str, int, str] | None:
    """``(list path, head kind, head, parameter)`` of a per-layer name inside a per-head module list
    (`Family.head_module_lists`) whose "<list>.*.<parameter>" the table names; None otherwise."""
    for path, kind in fam.head_module_lists:
        m = re.fullmatch(re.escape(path) + r"\.(\d+)\.(.+)", rest or "")
        if m and f"{path}.*.{m[2]}" in fam.layer_params:
            return path, kind, int(m[1]), m[2]
    return None


def in_layer(name: str, fam: Family) -> tuple[int | None, str | None]:
    """(layer index, the name after ``<layer_prefix><i>.``) of a per-layer tensor name; (None, None) otherwise."""
    m = re.fullmatch(re.escape(fam.layer_prefix) + r"(\d+)\.(.+)", name)
    return (int(m.group(1)), m.group(2)) if m else (None, None)


@dataclass
class Choices:
    """What cuts a student's tensors from its teacher's. Dicts are keyed by teacher layer (of ``chosen``); a layer a
    dict lacks takes the default (``index``, the first experts and units)."""

    fam: Family
    t: Dims  # the teacher's and the student's widths
    s: Dims
    chosen: list[int]  # student layer j is teacher layer chosen[j]
    index: dict  # every axis's rows (`tailkd.slicing.axis_indices`)
    per_layer: dict  # a layer's own rows: its heads by importance, its own sizes, its kind's RoPE share
    influence: object  # Block Influence of every teacher layer ("layer_choice=influence"), or None
    channels: object  # the residual-stream channels kept by activity, or None (the first ones)
    channel_share: object
    heads: dict  # the teacher's query heads kept, and their share of the layer's head importance
    head_share: dict
    ssm_kept: dict  # Mamba-2 heads kept, their share, and the axes they cut
    ssm_share: dict
    ssm_index: dict
    kept: dict  # routed experts kept, and their share of the layer's routings
    share: dict
    units: dict  # MLP units kept by activity (2-D: each routed expert's own), their share, the activity measured
    active: dict
    activity: object

    @classmethod
    def of(cls, config, fam: Family, t: Dims, s: Dims, fraction: float, chosen: list[int], measured: dict) -> Choices:
        """The choices of a student of ``chosen`` teacher layers and widths ``s`` (`tailkd.sizing.student_plan`), from
        the teacher's ``config`` and `tailkd.student.calibrate`'s ``measured``."""
        channels, channel_share = calibrated_channels(fam, s, chosen, measured.get("hidden_channels=active"))
        index = axis_indices(t, s, fam.rope, fraction, channels, blocks=fam.head_blocks, layers=chosen)
        own, as_values = layer_dims(config, fam, t, s, chosen, fraction), keys_as_values(config, fam)
        shares = layer_fractions(config, fam, t, s, chosen, fraction)  # a layer kind's own RoPE share
        heads, head_share = calibrated_heads(t, s, chosen, measured.get("attention_heads=active"), fam.head_blocks,
                                             own, kv_sources(config, fam, chosen))
        per_layer = {i: axis_indices(*own.get(i, (t, s)), fam.rope, shares.get(i, fraction), channels, heads.get(i),
                                     fam.head_blocks, chosen, i in as_values)
                     for i in set(chosen) & ({*heads, *own, *shares} | as_values)}
        ssm_kept, ssm_share = calibrated_ssm_heads(t, s, chosen, measured.get("ssm_head_choice=active"))
        kept, share = calibrated_experts(t, s, chosen, measured.get("experts=used"))
        activity = measured.get("mlp_units=active")
        units, active = calibrated_units(s, chosen, activity, lambda i: kept.get(i, index["expert"]), t.intermediate)
        return cls(fam, t, s, chosen, index, per_layer, measured.get("layer_choice=influence"), channels,
                   channel_share, heads, head_share, ssm_kept, ssm_share,
                   {i: ssm_axes(t, s, h) for i, h in ssm_kept.items()}, kept, share, units, active, activity)

    def rows(self, layer: int | None, axes, dim: int, axis: str, tensor: torch.Tensor):
        """The teacher rows that axis ``dim`` (of kind ``axis``) of student ``tensor`` of teacher ``layer`` (None:
        outside the layers) keeps; None where `each_experts_units` cuts it afterwards."""
        if axis == "ff_model":  # the student's size (a table's axes may outnumber a scalar's: never read then)
            return tensor.shape[dim]
        if axis == "expert" and layer in self.kept:
            return self.kept[layer]
        if axis == "expert_ff" and layer in self.kept:  # flattened experts: the kept ones' first units
            return expert_unit_rows(self.kept[layer], self.s.intermediate, self.t.intermediate)
        units = self.units.get(layer)
        if axis in ("ff", "gate_up") and units is not None and units.dim() == 2 and "expert" in axes:
            return None  # each routed expert's own units by activity
        if axis in ("ff", "gate_up") and units is not None and units.dim() == 1:  # a dense MLP's by activity
            return units if axis == "ff" else torch.cat([units, self.t.intermediate + units])
        if axis in SSM_AXES and layer in self.ssm_index:
            return self.ssm_index[layer][axis]
        return self.per_layer.get(layer, self.index)[axis]


def copy_into(name: str, tensor: torch.Tensor, choices: Choices, teacher_tensors: dict, mlp_init: str,
              buffer: bool = False) -> str | None:
    """Copy the teacher's slice for student tensor ``name`` into ``tensor`` (no grad); its source name, None where the
    rule is random. ``teacher_tensors``: the teacher's parameters (a tied head under its own name too) and persistent
    buffers by name."""
    source, axes = copy_rule(name, choices.fam, mlp_init, buffer)
    if source is None:
        return None
    layer = None
    if isinstance(source, tuple):  # (pattern, student layer[, (head kind, student head)])
        layer = choices.chosen[source[1]]
        heads_of = choices.per_layer.get(layer, choices.index)  # a head list's member: the student head's teacher head
        source = source[0].format(layer, *(int(heads_of[f"{h[0]}_head"][h[1]]) for h in source[2:]))
    value = take(teacher_tensors[source].detach(),
                 *(choices.rows(layer, axes, dim, axis, tensor) for dim, axis in enumerate(axes)))
    units = choices.units.get(layer)
    if units is not None and units.dim() == 2 and "expert" in axes and {"ff", "gate_up"} & set(axes):
        value = each_experts_units(value, axes, units, choices.t.intermediate)
    if tuple(value.shape) != tuple(tensor.shape):  # a bug in a table, not a user error
        raise RuntimeError(f"{name}: sliced {source} to {tuple(value.shape)}, expected {tuple(tensor.shape)}")
    tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
    return source


def provenance(name: str, choices: Choices) -> dict:
    """The calibrated choices behind student parameter ``name``, as its table row's extra keys (`build_student`'s
    docstring lists them): {} where it has none."""
    c, row = choices, {}
    layer = in_layer(name, c.fam)[0]
    if layer is not None:
        i, axes = c.chosen[layer], copy_rule(name, c.fam, "copy")[1] or ()
        if c.influence is not None:
            row["block_influence"] = round(float(c.influence[i]), 6)
        if i in c.kept and {"expert", "expert_ff"} & set(axes):
            row.update(experts=c.kept[i].tolist(), routed_share=c.share[i])
        if i in c.units and {"ff", "gate_up"} & set(axes) and ("expert" in axes) == (c.units[i].dim() == 2):
            # of the layer's own width (Gemma 4's double-wide MLPs: twice)
            row.update(units=_digest(c.units[i], c.activity[i].shape[-1]), active_share=c.active[i])
        if i in c.heads and set(axes) & HEAD_AXES:
            row.update(heads=c.heads[i].tolist(), head_share=c.head_share[i])
        if i in c.ssm_kept and set(axes) & set(SSM_AXES):
            row.update(ssm_heads=c.ssm_kept[i].tolist(), ssm_head_share=c.ssm_share[i])
    if c.channels is not None and name in c.fam.embeddings:
        row.update(channels=_digest(c.channels, c.t.hidden), channel_share=c.channel_share)
    return row


def _digest(ids: torch.Tensor, total: int) -> str:
    """"n of total, sha1 <16 hex digits>": how many of ``total`` indices ``ids`` keeps, and which; for one row of
    indices per routed expert, "n of total in each of E experts, sha1 ..."."""
    each = f" in each of {ids.shape[0]} experts" if ids.dim() == 2 else ""
    return (f"{ids.shape[-1]} of {total}{each}, sha1 "
            f"{hashlib.sha1(ids.numpy().astype('<i8').tobytes()).hexdigest()[:16]}")
