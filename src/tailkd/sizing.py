"""The student's shape: its widths and the teacher layers it keeps (`tailkd.layer_choice` chooses them,
`tailkd.student_config` writes its config, `tailkd.student` copies the weights).

`student_plan` turns `tailkd.student.build_student`'s options into the family's table entry as it applies to the
teacher's config (`config_family`), the teacher's and the student's sizes (`teacher_dims`, `student_dims`), the share of
a head that RoPE rotates (`rotary_fraction`), the chosen layers (`tailkd.layer_choice.student_layers`) and the
student's config (`tailkd.student_config`), after every refusal of a shape the family cannot take, each one line saying
what to pick instead. The rules themselves (which layers, head_dim per family, KV grouping, experts and their groups,
RoPE) are written out in `tailkd.student`'s docstring; the per-family tables are in `tailkd.families`.
"""

from __future__ import annotations

import dataclasses
import math

from tailkd.errors import TailkdError
from tailkd.families import FAMILIES, SUPPORTED, Family, family_for_class, setting
from tailkd.head import model_class_name
from tailkd.layer_attention import layer_dims, layer_fractions
from tailkd.layer_choice import check_layers, student_layers
from tailkd.slicing import Dims
from tailkd.student_config import mixer_width, not_divisible, student_config

__all__ = ["config_family", "family_of", "family_spec", "rotary_fraction", "student_dims", "student_plan",
           "student_widths", "teacher_dims"]


def family_spec(model) -> Family:
    """The `Family` table entry of a supported model, else a one-line TailkdError listing the supported classes."""
    name = model_class_name(model)  # a teacher sharded with FSDP2: its own class
    family = family_for_class(name)
    if family is None:
        raise TailkdError(f"cannot build a student from a {name}: supported teachers are {', '.join(SUPPORTED)}; "
                          "any causal LM teaches a student given as a folder (--student DIR)")
    return family


def family_of(model) -> str:
    """The family name ("llama", "gpt2", "phi", "phi3", "gemma", ...) of a supported model (see `family_spec`)."""
    return family_spec(model).name


def _spec(family: str | Family) -> Family:
    return family if isinstance(family, Family) else FAMILIES[family]


def config_family(config, family: str | Family) -> Family:
    """The family's entry as it applies to `config`: a "derived" family whose models read ``config.head_dim`` first
    (Phi, Phi-3, OLMo-2), for a config that carries one, has Llama's "follows_hidden" head_dim rule; a mixture whose
    config has no routed experts, its ``without_experts`` keys and axes (Granite 4.0-H's dense variants)."""
    fam = _spec(family)
    for flag, fields in fam.layouts:  # GPT-BigCode's, Falcon's attention layouts: the first set flag's
        if getattr(config, flag, False):
            fam = dataclasses.replace(fam, **{**fields, "layer_params": {**fam.layer_params, **fields.get(
                "layer_params", {})}, "keys": {**fam.keys, **fields.get("keys", {})}}, layouts=())
            break
    if fam.alibi_flag and getattr(config, fam.alibi_flag, False):  # Falcon-RW: ALiBi in place of RoPE
        fam = dataclasses.replace(fam, alibi=True, rope=False, alibi_flag="")
    if fam.head_dim == "derived" and fam.reads_head_dim and getattr(config, "head_dim", None) is not None:
        fam = dataclasses.replace(fam, head_dim="follows_hidden")
    if fam.group_routing and getattr(config, fam.group_routing[0], None) != fam.group_routing[1]:
        fam = dataclasses.replace(fam, keys={**fam.keys, "expert_groups": None}, group_routing=())  # V2's greedy
    if fam.without_experts and not _routed_experts(config, fam):  # Granite 4.0-H's, Nemotron-H's dense models
        fam = dataclasses.replace(fam, keys={**fam.keys, **fam.without_experts["keys"]},
                                  layer_params={**fam.layer_params, **fam.without_experts["layer_params"]},
                                  without_experts={})
    return fam


def _routed_experts(config, fam: Family) -> int:
    """A mixture's routed experts per layer (0: none, also where no layer holds them: `Family.expert_layer_kind`)."""
    if fam.expert_layer_kind and fam.expert_layer_kind not in (getattr(config, fam.layer_lists[0], None) or ()):
        return 0
    return (setting(config, fam.keys["experts"], 0) or 0) if fam.keys.get("experts") else 0


def teacher_dims(config, family: str | Family) -> Dims:
    fam = config_family(config, family)
    keys = fam.keys
    hidden, heads = setting(config, keys["hidden"]), setting(config, keys["heads"]) if keys["heads"] else 0
    kv_heads = (setting(config, keys["kv_heads"]) if keys["kv_heads"] else None) or heads  # 0: attention-free (Mamba)
    kv_heads = 1 if fam.multi_query else kv_heads  # GPT-BigCode's, Falcon-7B's multi-query attention
    head_dim = ((None if fam.head_dim == "derived" else setting(config, "head_dim")) or hidden // heads) if heads else 0
    experts = _routed_experts(config, fam)
    per_token = setting(config, keys["experts_per_token"]) if experts else 0
    # k listed per layer (HunYuan-MoE's moe_topk; its config class types its widths as one number each)
    per_layer = tuple(int(k) for k in per_token) if isinstance(per_token, (list, tuple)) else ()
    groups, shared = (setting(config, keys[role]) if keys.get(role) else None
                      for role in ("expert_groups", "shared_experts"))
    inter = setting(config, keys["intermediate"]) if keys["intermediate"] else None  # Bloom: always 4 x hidden
    v_head_dim = (setting(config, fam.value_head_dim) or 0) if fam.value_head_dim else 0  # MiMo-V2-Flash's
    ssm = {role: setting(config, key) for role, key in fam.ssm.items() if role in ("heads", "head_dim", "groups")}
    if fam.ssm and "heads" not in fam.ssm:  # Mamba-1 mixers (Jamba's): each channel a head of one, in one group
        ssm = dict(heads=setting(config, fam.ssm["expand"]) * hidden, head_dim=1, groups=1)
    return Dims(setting(config, keys["layers"]), hidden, heads, kv_heads, head_dim, inter or 4 * hidden, experts,
                max(per_layer, default=per_token), groups or 1, shared or 0, v_head_dim, ssm.get("heads", 0),
                ssm.get("head_dim", 0), ssm.get("groups", 1), per_layer)


def rotary_fraction(config, fam: Family | None = None) -> float:
    """The share of a head's rows that RoPE rotates (``partial_rotary_factor``; 1 unless Phi-style partial; a family's
    `rotary_dim_key` over head_dim: GPT-J). Proportional RoPE (LFM3's full attention layers) pairs rows over the whole
    head, rotate-half, at frequencies base^(-2i / head_dim) of which the last pairs' are 0: a student head keeps the
    pairs of the whole head (1), which keeps each rotating pair's frequency and the rest still."""
    if fam is not None and fam.rotary_dim_key and getattr(config, fam.rotary_dim_key, None):
        return getattr(config, fam.rotary_dim_key) / teacher_dims(config, fam).head_dim
    params = getattr(config, "rope_parameters", None) or {}
    for group in (params, *(v for v in params.values() if isinstance(v, dict))):
        if group.get("partial_rotary_factor") is not None and group.get("rope_type") != "proportional":
            return float(group["partial_rotary_factor"])
    return float(getattr(config, "partial_rotary_factor", None) or 1.0)


def student_dims(t: Dims, family: str | Family, n_layers: int, hidden_size=None, num_heads=None, num_kv_heads=None,
                 intermediate_size=None, head_dim=None, rotary_fraction: float = 1.0, num_experts=None,
                 num_experts_per_tok=None, ssm_heads=None) -> Dims:
    """Validate the requested widths against the teacher `t` and derive head_dim (see the module docstring)."""
    fam = _spec(family)
    hidden = t.hidden if hidden_size is None else int(hidden_size)
    heads = t.heads if num_heads is None else int(num_heads)
    if fam.head_blocks and heads % fam.head_blocks:
        raise TailkdError(f"num_heads={heads}, but {fam.label}'s qkv_proj holds its heads in {fam.head_blocks} blocks "
                          f"(mp_num, fixed in its code), each keeping as many: pick a multiple of {fam.head_blocks}")
    if fam.alibi and heads != t.heads:
        raise TailkdError(f"num_heads={heads}, but {fam.label}'s ALiBi slopes are set by the number of heads: keep "
                          f"num_heads {t.heads} (a narrower hidden_size narrows each head)")
    if not t.heads and (num_heads, num_kv_heads, head_dim) != (None, None, None):
        raise TailkdError(f"{fam.label} has no attention heads: drop num_heads, num_kv_heads and head_dim")
    if intermediate_size is not None and not fam.keys["intermediate"]:
        mlp = "its MLP is 4 x hidden_size wide" if fam.mlp_prefix else "no MLP"  # (nothing for mlp_init: Mamba's)
        raise TailkdError(f"{fam.label} has no intermediate_size setting ({mlp}): drop intermediate_size and choose "
                          "hidden_size")
    inter = t.intermediate if intermediate_size is None else int(intermediate_size)
    for name, value, limit in (("hidden_size", hidden, t.hidden), ("num_heads", heads, t.heads),
                               ("intermediate_size", inter, t.intermediate)):
        if not 1 <= value <= limit and limit:  # (no heads: attention-free)
            raise TailkdError(f"{name}={value} but the teacher's is {limit}: a student can only be narrower, "
                              f"pick 1..{limit}")
    kv_heads = _kv_heads(t, fam, heads, num_kv_heads)
    experts, per_token = _experts(t, fam, num_experts, num_experts_per_tok)
    hd = _head_dim(t, fam, hidden, heads, head_dim) if heads else 0
    if fam.square_attention_output and heads * hd != hidden:
        raise TailkdError(f"{fam.label}'s attention output projection is hidden_size x hidden_size, so num_heads x "
                          f"head_dim ({heads} x {hd}) must equal hidden_size ({hidden}): narrow hidden_size with "
                          f"num_heads (hidden_size {heads * hd})")
    if fam.rope:
        rot, rot_t = int(hd * rotary_fraction), int(t.head_dim * rotary_fraction)
        if rot % 2 or (rot == 0 and rot_t > 0):
            what = f"head_dim {hd}" + (" (hidden_size/num_heads)" if head_dim is None else "")
            if rotary_fraction == 1:
                fix = ("an even head_dim" if head_dim is not None
                       else "a hidden_size that is an even multiple of num_heads")
                raise TailkdError(f"{what} is odd but RoPE needs it even: pick {fix}")
            raise TailkdError(f"{what} rotates {rot} rows (partial_rotary_factor {rotary_fraction:g}), "
                              f"{'which is odd but' if rot % 2 else 'but'} RoPE rotates pairs of rows: "
                              f"{_rotating_head_dim(t, hd, heads, rotary_fraction, head_dim is not None)}")
    return Dims(n_layers, hidden, heads, kv_heads, hd, inter, experts, per_token, t.expert_groups, t.shared_experts,
                _value_head_dim(t, fam, hd) if heads else 0, _ssm_heads(t, fam, ssm_heads), t.ssm_head_dim,
                t.ssm_groups, t.experts_per_layer if num_experts_per_tok is None else ())


def _ssm_heads(t: Dims, fam: Family, requested) -> int:
    """A student's Mamba-2 heads (`Family.ssm`; Jamba's Mamba-1 channels, heads of one): the teacher's, or
    ``requested``, a multiple of its groups."""
    if requested is None:
        return t.ssm_heads
    if not t.ssm_heads:
        raise TailkdError(f"ssm_heads={requested}, but {fam.label} has no mixers ssm_heads narrows (Mamba-2's heads, "
                          "Jamba's Mamba-1 channels): drop ssm_heads")
    n = int(requested)
    if not 1 <= n <= t.ssm_heads:
        raise TailkdError(f"ssm_heads={n} but the teacher's is {t.ssm_heads}: a student can only be narrower, pick "
                          f"1..{t.ssm_heads}")
    if n % t.ssm_groups:
        raise TailkdError(f"ssm_heads={n}, but the teacher's Mamba-2 heads read B and C in {t.ssm_groups} groups "
                          f"({fam.ssm['groups']}), each keeping as many heads: pick a multiple of {t.ssm_groups}")
    return n


def _check_ssm_width(config, fam: Family, t: Dims, s: Dims) -> None:
    """A Mamba mixer set expand x hidden_size wide (no width key set: `Family.ssm`) has a student's width — its heads
    x head_dim (Mamba-1's, Jamba's: its channels) — with a whole expand over the student's hidden_size; refused in one
    line naming the ssm_heads (or hidden sizes) that give one."""
    width, key = mixer_width(config, fam, s)
    if key is None or key != fam.ssm.get("expand") or width % s.hidden == 0:
        return
    fits = [n for n in range(t.ssm_groups, t.ssm_heads + 1, t.ssm_groups) if n * s.ssm_head_dim % s.hidden == 0]
    fix = (f"pick ssm_heads {' or '.join(str(n) for n in fits[-3:])}" if fits
           else f"pick a hidden_size dividing {width}")
    what = (f"Mamba-2 mixers are {key} x hidden_size wide and the student's {s.ssm_heads} heads of "
            f"{s.ssm_head_dim} ({width} channels)" if "heads" in fam.ssm
            else f"Mamba-1 mixers are {key} x hidden_size wide and the student's {width} channels (ssm_heads)")
    raise TailkdError(f"hidden_size={s.hidden}, but the teacher's {what} are no whole {key} x {s.hidden}: {fix}")


def _value_head_dim(t: Dims, fam: Family, hd: int) -> int:
    """A student's value heads of their own size (`Family.value_head_dim`): the teacher's scaled as head_dim is,
    refused in one line where that is not whole; 0 without."""
    if t.v_head_dim * hd % t.head_dim:
        step = t.head_dim // math.gcd(t.head_dim, t.v_head_dim)
        raise TailkdError(f"head_dim={hd}, but {fam.label}'s value heads ({fam.value_head_dim} {t.v_head_dim}) scale "
                          f"as head_dim does ({t.head_dim} -> {hd}), to {t.v_head_dim * hd / t.head_dim:g} rows: pick "
                          f"a head_dim that is a multiple of {step}")
    return t.v_head_dim * hd // t.head_dim


def _rotating_head_dim(t: Dims, hd: int, heads: int, fraction: float, explicit: bool) -> str:
    """The fix for a head_dim ``hd`` whose partial rotary share ``int(hd * fraction)`` is odd or none: the head_dims up
    to the teacher's that rotate an even number of rows (at least 2), the one nearest ``hd`` as an example."""
    fit = [d for d in range(1, t.head_dim + 1) if int(d * fraction) >= 2 and int(d * fraction) % 2 == 0]
    if explicit:
        pick = "pick a head_dim that rotates an even number of rows"
    else:
        pick = "pick hidden_size and num_heads whose head_dim rotates an even number of rows"
    if not fit:
        return pick
    d = min(fit, key=lambda d: (abs(d - hd), -d))
    return f"{pick}, e.g. head_dim {d}" + ("" if explicit else f" (hidden_size {d * heads} with {heads} heads)")


def _kv_heads(t: Dims, fam: Family, heads: int, requested) -> int:
    if fam.multi_query:  # one KV head, kept (GPT-BigCode's, Falcon-7B's multi-query attention)
        if requested is not None and int(requested) != 1:
            raise TailkdError(f"{fam.label}'s multi-query attention has one KV head: drop num_kv_heads (or set it "
                              "to 1)")
        return 1
    if fam.keys["kv_heads"] is None or fam.latent_attention:
        if requested is not None and int(requested) != heads:
            raise TailkdError(f"{fam.label} has no grouped KV heads: drop num_kv_heads "
                              f"(or set it to num_heads={heads})")
        return heads
    if requested is not None:
        kv_heads = int(requested)
    else:  # the teacher's; an MHA teacher (one KV head per query head: Phi-2) gives an MHA student
        kv_heads = heads if t.kv_heads == t.heads else t.kv_heads
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
    return kv_heads


def _experts(t: Dims, fam: Family, requested, requested_per_token) -> tuple[int, int]:
    """The student's routed experts (the teacher's first `requested`; all by default) and experts per token (the
    teacher's by default: where its config lists them per layer, each kept layer's own, the largest at most as many as
    the student has; `requested_per_token` in every layer), at most as many as it has."""
    for name, value in (("num_experts", requested), ("num_experts_per_tok", requested_per_token)):
        if value is not None and not t.experts:
            raise TailkdError(f"{name}={value} but {fam.label} is not a mixture of experts: drop {name}")
    if not t.experts:
        return 0, 0
    n = t.experts if requested is None else int(requested)
    k = t.experts_per_token if requested_per_token is None else int(requested_per_token)
    fixed = fam.fixed_experts_per_token
    if not (fixed or 1) <= n <= t.experts:
        raise TailkdError(f"num_experts={n} but the teacher has {t.experts} experts"
                          + (f" and {fam.label}'s router sends each token to {fixed}" if fixed else "")
                          + f": pick {fixed or 1}..{t.experts}")
    if fixed and k != fixed:
        raise TailkdError(f"num_experts_per_tok={k} but {fam.label}'s router sends each token to {fixed} experts "
                          "whatever its config says: drop num_experts_per_tok")
    if not 1 <= k <= n:
        if requested_per_token is None:
            most = ", the most of any layer" if t.experts_per_layer else ""
            raise TailkdError(f"num_experts={n} but each token is routed to {k} (the teacher's num_experts_per_tok"
                              f"{most}): pick {k}..{t.experts}, or set num_experts_per_tok to at most {n}")
        raise TailkdError(f"num_experts_per_tok={k} but the student has {n} experts: pick 1..{n}")
    return n, k


def _check_expert_groups(config, fam: Family, s: Dims) -> None:
    """Group-limited routing (GLM-4.5, dots.llm1, DeepSeek-V3: a group's score is the sum of its top 2 experts;
    DeepSeek-V2: its best one; each token picks ``topk_group`` groups, then its experts among theirs): the student's
    experts fill its ``n_group`` groups evenly, as many each as score a group, and its experts per token fit in the
    groups a token picks."""
    if not fam.keys.get("expert_groups") or not s.experts:
        return
    groups, picked, top = s.expert_groups, getattr(config, "topk_group", None) or 1, fam.group_score_top
    n, k = s.experts, s.experts_per_token
    if n % groups:
        raise TailkdError(f"num_experts={n} but the teacher routes within n_group={groups} groups of experts: pick a "
                          f"multiple of {groups} (the student keeps the first num_experts/{groups} of each group)")
    if n // groups < top:
        raise TailkdError(f"num_experts={n} leaves {n // groups} expert per group, but the router scores each of the "
                          f"n_group={groups} groups by its top {top} experts: pick at least {top * groups}")
    if k > picked * (n // groups):
        raise TailkdError(f"num_experts_per_tok={k} but a token's experts come from topk_group={picked} of the "
                          f"student's groups of {n // groups}: pick at most {picked * (n // groups)}, or more experts")


def _head_dim(t: Dims, fam: Family, hidden: int, heads: int, requested) -> int:
    if requested is not None:
        hd = int(requested)
        if fam.latent_attention and hd != t.head_dim:
            raise TailkdError(f"head_dim={hd}, but {fam.label}'s latent attention keeps its head sizes "
                              "(qk_nope_head_dim, qk_rope_head_dim, v_head_dim): drop head_dim")
        if fam.head_dim == "derived" and (hidden % heads or hd != hidden // heads):
            raise TailkdError(f"{fam.label} has no head_dim setting (it is hidden_size/num_heads = {hidden}/{heads}): "
                              f"drop head_dim={hd} and choose hidden_size and num_heads instead")
        if not 1 <= hd <= t.head_dim:
            raise TailkdError(f"head_dim={hd} but the teacher's is {t.head_dim}: a student can only be narrower, "
                              f"pick 1..{t.head_dim}")
    elif fam.head_dim == "kept" or (fam.head_dim == "follows_hidden" and hidden == t.hidden):
        hd = t.head_dim
    else:  # head_dim is hidden_size // num_heads, which must then be exact
        if hidden % heads:
            raise not_divisible(hidden, heads)
        hd = hidden // heads
        if hd > t.head_dim:
            raise TailkdError(
                f"hidden_size={hidden} with num_heads={heads} gives head_dim {hd}, wider than the teacher's "
                f"{t.head_dim}: use at least {-(-hidden // t.head_dim)} heads or a smaller hidden_size"
            )
    return hd


def _check_rope(config, fam: Family, t: Dims, s: Dims, fraction: float) -> None:
    """Refuse a head_dim change under per-frequency RoPE factor lists (Phi-3 longrope): they would need re-fitting;
    and 2 rotated rows under dynamic NTK scaling (transformers raises its base to r/(r - 2))."""
    if s.head_dim == t.head_dim:
        return
    params = getattr(config, "rope_parameters", None) or {}
    groups = (params, *(v for v in params.values() if isinstance(v, dict)))
    rotated = int(s.head_dim * fraction)
    if rotated == 2 and any(group.get("rope_type") == "dynamic" for group in groups):
        what = "head_dim" if fraction == 1 else f"head_dim * partial_rotary_factor ({fraction:g})"
        raise TailkdError(f"the teacher's dynamic (NTK) RoPE scaling raises its base to r/(r - 2) over the r = "
                          f"{what} rotated rows, but a head_dim {s.head_dim} student rotates 2: pick a head_dim "
                          f"that rotates at least 4 (the teacher's is {t.head_dim})")
    lists = sorted({key for group in groups for key, value in group.items() if isinstance(value, (list, tuple))})
    if lists:
        how = ("keep hidden_size/num_heads" if fam.head_dim == "derived" else "keep head_dim") + f" = {t.head_dim}"
        raise TailkdError(f"the teacher's RoPE has per-frequency factors ({', '.join(lists)}) for head_dim "
                          f"{t.head_dim}, which a head_dim {s.head_dim} student cannot reuse: {how} "
                          f"(narrow hidden_size and num_heads together)")


def student_widths(teacher, num_layers, layers, hidden_size, num_heads, num_kv_heads, intermediate_size, head_dim,
                   num_experts=None, num_experts_per_tok=None, ssm_heads=None):
    """``(family, teacher dims, student dims, rotary fraction, layers)`` of a student of these layers (`choose_layers`)
    and widths, after every refusal that does not depend on which layers it keeps (`tailkd.student.calibrate` makes
    them before a calibration pass, `student_plan` before the layers' own)."""
    fam = config_family(teacher.config, family_spec(teacher))
    for key, why in fam.refused_settings:
        if getattr(teacher.config, key, None):
            raise TailkdError(f"the teacher sets {key} ({why}), which tailkd cannot cut into a student: give the "
                              "student as a folder (--student DIR)")
    for key in fam.hidden_keys:
        if getattr(teacher.config, key, None) not in (None, teacher.config.hidden_size):
            raise TailkdError(f"the teacher's {key} ({getattr(teacher.config, key)}) differs from its hidden_size "
                              f"({teacher.config.hidden_size}): its projections between the two widths are not cut "
                              "by tailkd; give the student as a folder (--student DIR)")
    t = teacher_dims(teacher.config, fam)
    fraction = rotary_fraction(teacher.config, fam) if fam.rope else 1.0
    chosen = student_layers(teacher.config, fam, num_layers, layers)
    s = student_dims(t, fam, len(chosen), hidden_size, num_heads, num_kv_heads, intermediate_size, head_dim,
                     fraction, num_experts, num_experts_per_tok, ssm_heads)
    _check_rope(teacher.config, fam, t, s, fraction)
    layer_fractions(teacher.config, fam, t, s, chosen, fraction)  # refuses heads a layer kind's RoPE cannot rotate
    layer_dims(teacher.config, fam, t, s, chosen, fraction)  # and layers' own sizes a student cannot scale
    _check_expert_groups(teacher.config, fam, s)
    for key in fam.hidden_ratios:
        value = getattr(teacher.config, key, None)
        if isinstance(value, int) and s.hidden * value % t.hidden:
            step = t.hidden // math.gcd(t.hidden, value)
            raise TailkdError(f"hidden_size={s.hidden}, but {fam.label}'s final hidden states divide by hidden_size / "
                              f"{key} ({t.hidden} / {value}), a ratio a student keeps with a whole {key}: pick a "
                              f"hidden_size that is a multiple of {step}")
    _check_ssm_width(teacher.config, fam, t, s)
    return fam, t, s, fraction, chosen


def student_plan(teacher, num_layers, layers, hidden_size, num_heads, num_kv_heads, intermediate_size, head_dim,
                 tie_embeddings=None, num_experts=None, num_experts_per_tok=None, ssm_heads=None):
    """`student_widths`' ``(family, teacher dims, student dims, rotary fraction, layers)`` and the student's config,
    after the refusals that depend on the chosen layers too (`tailkd.student.build_student`'s options; the teacher's
    weights are not read)."""
    fam, t, s, fraction, chosen = student_widths(teacher, num_layers, layers, hidden_size, num_heads, num_kv_heads,
                                                 intermediate_size, head_dim, num_experts, num_experts_per_tok,
                                                 ssm_heads)
    check_layers(teacher.config, fam, chosen)
    return fam, t, s, fraction, chosen, student_config(teacher.config, fam, t, s, fraction, chosen, tie_embeddings)


