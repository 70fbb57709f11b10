"""Which rows of each teacher tensor a student keeps, and the cut itself (`tailkd.student` builds with them).

`Dims` holds the sizes a student differs in from its teacher; `axis_indices` turns two of them into what each axis
kind of `tailkd.families.AXES` keeps — None (all), n (the first n) or teacher indices — with q and k cut by RoPE pairs
(`rope_pair_rows`: a student pair keeps the teacher pair rotating at its frequency), query heads grouped on their KV
heads (`query_heads`), fused projections by their blocks; `take` cuts a tensor by one such entry per dimension, and
`each_experts_units` gives each routed expert its own units. The rules these follow, family by family, are in
`tailkd.student`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["HEAD_AXES", "SSM_AXES", "Dims", "axis_indices", "each_experts_units", "expert_unit_rows", "mlp_units",
           "qk_head_rows", "query_heads", "rope_pair_rows", "ssm_axes", "ssm_heads", "take"]


@dataclass(frozen=True)
class Dims:
    """The sizes a student differs in from its teacher."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # a mixture's: each routed expert's width
    experts: int = 0  # routed experts per layer; 0 for a dense model
    experts_per_token: int = 0  # experts each token is routed to (num_experts_per_tok); 0 for a dense model
    expert_groups: int = 1  # group-limited routing's groups (n_group: GLM-4.5, dots.llm1), the teacher's
    shared_experts: int = 0  # the shared MLP's width in routed widths (n_shared_experts), the teacher's
    v_head_dim: int = 0  # value heads of their own size (`Family.value_head_dim`: MiMo-V2-Flash's); 0: head_dim
    ssm_heads: int = 0  # a Mamba-2 mixer's heads (`Family.ssm`); 0: none
    ssm_head_dim: int = 0  # their size, the teacher's
    ssm_groups: int = 1  # the groups sharing B and C (n_groups), the teacher's
    experts_per_layer: tuple[int, ...] = ()  # each layer's experts per token where the config lists them per layer
    #                                          (HunYuan-MoE's moe_topk; experts_per_token is then their largest)


def rope_pair_rows(hd_t: int, hd_s: int, interleaved: bool = False) -> list[int]:
    """Rows of a teacher q/k head kept for a student head, in student order: the teacher's RoPE pair
    floor(j * half_t/half_s + 1/2) for student pair j; pair p is rows (p, p + half) under rotate-half RoPE, rows
    (2p, 2p + 1) under interleaved RoPE (GLM), both rotating at frequency index p."""
    half_t, half_s = hd_t // 2, hd_s // 2
    pairs = [(2 * j * half_t + half_s) // (2 * half_s) for j in range(half_s)]  # floor(j*half_t/half_s + 1/2)
    if interleaved:
        return [row for p in pairs for row in (2 * p, 2 * p + 1)]
    return pairs + [half_t + i for i in pairs]


def qk_head_rows(hd_t: int, hd_s: int, rope: bool | str = True, fraction: float = 1.0) -> list[int]:
    """Rows of a teacher q/k head kept for a student head: RoPE pairs of the rotated part, then the first
    non-rotated rows (partial rotary); the first hd_s rows without RoPE. ``rope``: a `Family`'s (True: rotate-half,
    "interleaved", False: none)."""
    if not rope:
        return list(range(hd_s))
    rot_t, rot_s = int(hd_t * fraction), int(hd_s * fraction)
    pairs = rope_pair_rows(rot_t, rot_s, rope == "interleaved") if rot_s else []
    return pairs + [rot_t + i for i in range(hd_s - rot_s)]


def _rows(heads: list[int], hd_t: int, rows_in_head: list[int]) -> torch.Tensor:
    """Flat indices into a [n_heads * hd_t] axis: each of `heads`, its `rows_in_head`."""
    return torch.tensor([h * hd_t + r for h in heads for r in rows_in_head], dtype=torch.long)


def take(tensor: torch.Tensor, *index) -> torch.Tensor:
    """Slice each leading dim: None keeps it, an int n keeps the first n, a LongTensor picks those indices, a function
    of the dim's size gives one of these."""
    for dim, idx in enumerate(index):
        if callable(idx):
            idx = idx(tensor.shape[dim])
        if idx is None:
            continue
        if isinstance(idx, int):
            tensor = tensor.narrow(dim, 0, idx)
        else:
            tensor = tensor.index_select(dim, idx.to(tensor.device))
    return tensor


def _per_head(n: int, heads: int) -> int:
    """The rows per head of an axis of ``n`` rows over ``heads`` heads."""
    if n % heads:  # a bug in a table, not a user error
        raise RuntimeError(f"an axis of {n} rows is not {heads} heads' blocks")
    return n // heads


def query_heads(t: Dims, s: Dims) -> list[int]:
    """Teacher query heads kept, grouped so each keeps its KV head (first heads when g_s == g_t)."""
    g_t, g_s = t.heads // t.kv_heads, s.heads // s.kv_heads
    return [k * g_t + m for k in range(s.kv_heads) for m in range(g_s)]


def ssm_heads(t: Dims, s: Dims) -> list[int]:
    """Teacher Mamba-2 heads kept: each group's first ``s.ssm_heads / groups`` (a head reads its group's B and C)."""
    per_t, per_s = t.ssm_heads // t.ssm_groups, s.ssm_heads // t.ssm_groups
    return [g * per_t + j for g in range(t.ssm_groups) for j in range(per_s)]


# the axis kinds of a Mamba mixer, which follow its kept heads (a Mamba-1 mixer's: its channels, heads of one)
SSM_AXES = ("ssm_in", "ssm_conv", "ssm_head", "ssm_channels", "ssm_xz")


def ssm_axes(t: Dims, s: Dims, heads=None) -> dict:
    """What the Mamba-2 mixer's axis kinds keep (in_proj = [z | x | B | C | dt], the convolution over [x | B | C]):
    the kept heads' channels of z and x, their dt, B and C whole; a Mamba-1 mixer's (heads of one channel; in_proj =
    [x | z]) the kept channels of x and z; None (all) where every head is kept. ``heads``: the teacher heads kept,
    group by group (`tailkd.calibrated.calibrated_ssm_heads`; None: `ssm_heads`)."""
    if heads is None and s.ssm_heads == t.ssm_heads:
        return dict.fromkeys(SSM_AXES)
    heads = ssm_heads(t, s) if heads is None else [int(h) for h in heads]
    width, channels = t.ssm_heads * t.ssm_head_dim, _rows(heads, t.ssm_head_dim, list(range(t.ssm_head_dim)))
    head_index = torch.tensor(heads, dtype=torch.long)
    return {"ssm_in": lambda n: torch.cat([channels, width + channels, torch.arange(2 * width, n - t.ssm_heads),
                                           n - t.ssm_heads + head_index]),
            "ssm_conv": lambda n: torch.cat([channels, torch.arange(width, n)]),
            "ssm_head": head_index, "ssm_channels": channels, "ssm_xz": torch.cat([channels, width + channels])}


# the axis kinds that follow the kept heads (a layer's attention tensors, whose table rows name them by importance)
HEAD_AXES = {"q", "k", "v", "o", "qkv", "qkv_heads", "qkv_groups", "head", "kv_head", "q_gated", "qkv_mp", "gate"}


def axis_indices(t: Dims, s: Dims, rope: bool | str = True, fraction: float = 1.0, channels=None,
                 q_heads=None, blocks: int = 0, layers=None, keys_as_values: bool = False) -> dict:
    """What each axis kind of `tailkd.families.AXES` keeps: None (all), n (the first n) or teacher indices;
    ``channels`` the residual-stream channels kept (LongTensor, increasing; None: the first ``s.hidden``), ``q_heads``
    the teacher query heads kept, KV head by KV head (`tailkd.calibrated.kept_heads`; None: `query_heads`);
    ``blocks`` a family's head blocks (`Family.head_blocks`: its first heads are then each block's first ones);
    ``layers`` the teacher layers the student keeps (None: its first ``s.layers``), whose blocks ``layer_blocks``
    keeps; ``keys_as_values``: the layer's values are its keys (Gemma 4's attention_k_eq_v), so ``o`` reads the kept
    heads' key rows (RoPE pairs), not their first rows; value heads of their own size (``v_head_dim``) keep their
    first ``s.v_head_dim`` rows in v and o."""
    # query heads per KV head (an attention-free model, Mamba's, has no heads)
    g_t, g_s = (t.heads // t.kv_heads, s.heads // s.kv_heads) if t.heads else (1, 1)
    if q_heads is None and blocks:  # each block's first heads
        q_heads = [b * (t.heads // blocks) + m for b in range(blocks) for m in range(s.heads // blocks)]
    q_heads = (query_heads(t, s) if t.heads else []) if q_heads is None else [int(h) for h in q_heads]
    kv_heads = [q_heads[j * g_s] // g_t for j in range(s.kv_heads)]  # student KV head j's teacher KV head
    qk_rows, first = qk_head_rows(t.head_dim, s.head_dim, rope, fraction), list(range(s.head_dim))
    q, k = _rows(q_heads, t.head_dim, qk_rows), _rows(kv_heads, t.head_dim, qk_rows)
    v_t, v_rows = t.v_head_dim or t.head_dim, list(range(s.v_head_dim or s.head_dim))  # value heads' own size
    v = _rows(kv_heads, v_t, v_rows)
    o = _rows(q_heads, t.head_dim, qk_rows) if keys_as_values else _rows(q_heads, v_t, v_rows)  # keys as values: theirs
    q_width, kv_width, ff = t.heads * t.head_dim, t.kv_heads * t.head_dim, torch.arange(s.intermediate)
    experts = s.experts  # the first ones; under group-limited routing the first of each group
    if t.expert_groups > 1 and s.experts != t.experts:
        per_t, per_s = t.experts // t.expert_groups, s.experts // t.expert_groups
        experts = torch.tensor([g * per_t + i for g in range(t.expert_groups) for i in range(per_s)])
    d = s.hidden if channels is None else channels
    d_range = torch.arange(s.hidden) if channels is None else channels
    layers = list(range(s.layers)) if layers is None else layers
    return {"all": None, "d": d, "ff": lambda n: mlp_units(n, s.intermediate, t.intermediate), "q": q, "k": k, "v": v,
            "o": o,
            "head_qk": torch.tensor(qk_rows, dtype=torch.long),
            "qkv": torch.cat([q, q_width + k, q_width + kv_width + v]),
            "qkv_heads": _rows(q_heads, 3 * t.head_dim, qk_rows + [t.head_dim + r for r in qk_rows]
                               + [2 * t.head_dim + r for r in first]),
            "qkv_groups": torch.tensor([  # per kept KV head k: its kept queries' rows, then its k and v rows
                (k * (g_t + 2) + part) * t.head_dim + r for j, k in enumerate(kv_heads)
                for part, rows in [*((h % g_t, qk_rows) for h in q_heads[j * g_s:(j + 1) * g_s]),
                                   (g_t, qk_rows), (g_t + 1, first)] for r in rows], dtype=torch.long),
            "gate_up": torch.cat([ff, t.intermediate + ff]),
            "gate_up_pairs": torch.stack([2 * ff, 2 * ff + 1], dim=1).flatten(), "expert": experts,
            "expert_ff": lambda n: expert_unit_rows(experts, s.intermediate, t.intermediate),  # DBRX's only: lazily
            "ff_shared": s.intermediate * s.shared_experts,
            "kv_head": torch.tensor(kv_heads, dtype=torch.long), "q_head": torch.tensor(q_heads, dtype=torch.long),
            "d_blocks": lambda n: torch.cat([b * t.hidden + d_range for b in range(n // t.hidden)]),
            "ff_model": None,  # the student tensor's own size on that dim (`build_student`)
            "head": lambda n: _rows(q_heads, _per_head(n, t.heads), list(range(_per_head(n, t.heads)))),
            "q_gated": _rows(q_heads, 2 * t.head_dim, qk_rows + [t.head_dim + r for r in first]),
            "qkv_mp": lambda n: _mp_rows(q_heads, t, qk_rows, first, blocks),
            "layer_blocks": lambda n: _rows(layers, _per_head(n, t.layers), list(range(_per_head(n, t.layers)))),
            "gate": lambda n: torch.tensor(q_heads) if n == t.heads else _rows(q_heads, t.head_dim, first),
            **ssm_axes(t, s)}


def mlp_units(n: int, units: int, width: int) -> int:
    """How many (first) units of an MLP axis of ``n`` a student keeps, ``units`` of the teacher's ``width``: as many
    times ``units`` as ``n`` is times ``width`` (Gemma 4's KV-shared layers: MLPs twice as wide), else ``units``."""
    return n // width * units if width and n % width == 0 else units


def _mp_rows(q_heads: list[int], t: Dims, qk_rows: list[int], v_rows: list[int], blocks: int) -> torch.Tensor:
    """CodeGen's qkv_proj rows kept (axis ``qkv_mp``): ``blocks`` blocks of [q | v | k], each over 1 / blocks of the
    teacher's heads in turn; per block the kept heads of that block (as many in each: the student's block b holds
    them), their q, v and k rows in the block's order."""
    per = t.heads // blocks
    local = per * t.head_dim
    return torch.tensor([b * 3 * local + part * local + (h - b * per) * t.head_dim + r for b in range(blocks)
                         for part, rows in ((0, qk_rows), (1, v_rows), (2, qk_rows))
                         for h in q_heads if h // per == b for r in rows], dtype=torch.long)


def expert_unit_rows(experts, units: int, width: int) -> torch.Tensor:
    """Rows of an [experts x ``width``, ...] axis (DBRX's flattened experts, axis ``expert_ff``) kept: of each of
    ``experts`` (n: the first n; or teacher indices, in the student's order) its first ``units`` rows."""
    experts = torch.arange(experts) if isinstance(experts, int) else experts
    return (experts.view(-1, 1) * width + torch.arange(units)).flatten()


def each_experts_units(value: torch.Tensor, axes, units: torch.Tensor, width: int) -> torch.Tensor:
    """``value`` (a mixture's experts tensor, its kept experts along axis 0, their units whole) with each expert's own
    ``units`` (a row per expert) along its ``ff`` or ``gate_up`` axis (gate_up: [gate | up] of ``width`` each)."""
    dim = next(d for d, axis in enumerate(axes) if axis in ("ff", "gate_up"))
    index = units if axes[dim] == "ff" else torch.cat([units, width + units], dim=1)
    view = [index.shape[0]] + [index.shape[1] if d == dim else 1 for d in range(1, value.dim())]
    size = [index.shape[1] if d == dim else n for d, n in enumerate(value.shape)]
    return value.gather(dim, index.view(view).expand(size).to(value.device))
