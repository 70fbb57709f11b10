"""What a teacher's forward over calibration rows says about its layers, channels, heads, units and experts, and the
rule by which a student built from it keeps them (`tailkd.calibrated` applies it).

Six choices of `tailkd.student.build_student` read it (`tailkd.calibrated.wanted_measures`: what its settings need
measured, `measure`: one forward for all of it, ``tailkd.calibrated.calibrated_*``: the indices kept); each is off by
default (the TAD paper's DistilBERT-style
student: evenly spaced layers, the first hidden channels, the first heads of the first KV heads, the first MLP units,
the first experts, each group's first Mamba-2 heads):

Layers (``layer_choice="influence"``): the ``num_layers`` teacher layers of largest Block Influence — ShortGPT's
importance (Men et al., 2024), the depth-pruning signal of Minitron (Muralidharan et al., 2024) — kept in order:

    BI[i] = 1 - mean over real tokens t of cos(x_i[t], y_i[t])     x_i, y_i: layer i's input and output hidden states

A layer that leaves the residual stream as it found it (BI 0) is the first a student drops. Where layers need others
(Gemma 4: its last layer, a full attention one in any student; a KV-shared layer, the earlier layer it reads keys and
values from: `tailkd.layer_choice.layer_needs`; OLMo-Hybrid, whose config needs a layer of each kind: each kind's most
influential layer), those come first and, in order of influence, each layer with the ones it needs where they all fit.

Experts (``experts="used"``): per layer the ``num_experts`` experts the teacher routes the most tokens to — the
expert-pruning-by-frequency choice of the MoE compression literature (e.g. "Not All Experts are Equal", Lu et al.,
2024, as its frequency baseline):

    count[i, e] = #{(real token t, slot j < k): the teacher's layer i routes t to expert e in slot j}
    kept[i]     = the n experts of largest count[i, :], ties to the lower index, listed in increasing order

Under group-limited routing (``n_group`` groups: DeepSeek-V3, GLM-4.5) each group keeps its own n / n_group most used,
so the student's experts fill its groups as the teacher's do (`tailkd.student` checks the sizes). The counts are the
routing decisions themselves, whatever the router's rule (softmax top-k, sigmoid scores with a correction bias, group
limits, a sparsemixer): transformers 5 hands every mixture's experts module the chosen indices
(``experts(hidden_states, top_k_index, top_k_weights)``; GPT-OSS's ``router_indices``), read here by a forward pre-hook.

MLP units (``mlp_units="active"``, with a copied MLP): per layer the ``intermediate_size`` units of largest mean
absolute activation at the input of the MLP's down projection — Minitron's activation-based neuron importance:

    A[i, u] = mean over real tokens t of |a_i[t, u]|     a_i: the input of layer i's down projection (act(gate) * up)

A mixture's routed experts (``mlp_units="active"`` with a narrower ``intermediate_size``: each expert's width) are
measured expert by expert over the tokens routed to it, from the experts module's own [E, gate | up, d] weights and
activation (the fused module has no hook between its up and down projections, so a forward pre-hook recomputes the
down projection's input, as transformers 5's experts compute it):

    A[i, e, u] = mean over the real tokens t routed to expert e of |act(x_t G_e^T) * (x_t U_e^T)|[u]

and each expert the student keeps keeps its own units (0 for an expert no calibration token reached: its first ones).

Hidden channels (``hidden_channels="active"``, a narrower ``hidden_size``): the ``hidden_size`` residual-stream
channels of largest activity at the teacher's norms — Minitron's embedding-channel importance, read at its LayerNorm
outputs; the norms are those of the layers the student keeps and the model's own (the final norm; Bloom's embedding
norm), every module whose weight the family table slices along ``d`` alone:

    A[c] = sum over those norms n of mean over real tokens t of |LN_n(x)[t, c]|

The channel choice is one for the whole model (the residual stream is one): embeddings, every projection's residual
side and every norm keep the same channels.

Attention heads (``attention_heads="active"``, fewer ``num_heads`` / ``num_kv_heads``): per layer the heads of largest
mean L2 norm of their output (the attention's output projection's input, one block per query head) — Minitron's head
importance:

    I[i, h] = mean over real tokens t of ||o_i[t, h, :]||_2     o_i: the input of layer i's attention output projection

A student's query heads share KV heads as the teacher's do (each keeps the KV head it was trained with): per teacher
KV head its ``g_s`` (the student's query heads per KV head) most important query heads, and of the KV heads the
``num_kv_heads`` whose kept query heads have the largest summed importance (`tailkd.calibrated.kept_heads`); with one
KV head per query head (multi-head attention, latent attention) simply the ``num_heads`` most important heads.

Mamba-2 heads (``ssm_head_choice="active"``, fewer ``ssm_heads``): per layer and per group of heads (n_groups: the
heads reading one B and C) its ``ssm_heads / n_groups`` heads of largest mean L2 norm of their output, the input of
the mixer's out_proj (head_dim channels per head, after the gated norm) — Minitron's head importance on Mamba heads,
group-aware as Minitron-SSM (Taghibakhshi et al., 2025) keeps them:

    I[i, h] = mean over real tokens t of ||y_i[t, h, :]||_2     y_i: the input of layer i's mixer out_proj

Jamba's Mamba-1 mixers likewise, each channel a head of one (one group): its mean |y_i[t, c]|.

All six count real tokens only: a batch's ``attention_mask`` (right padding of SFT rows) leaves its zeros out. They
share one forward of the teacher per batch (`measure`: each choice's hooks, over every layer where the layers are yet
to be chosen; its decoder and the logits of one position, `tailkd.head.decoder_forward`), on the teacher's device, in
its dtype, under no_grad. A teacher sharded with FSDP2 (``teacher.parallel fsdp``) is measured the same way: its
forward is collective, so every rank passes the same batches (`tailkd.prepare.calibrate_sharded_teacher`).
"""

from __future__ import annotations

import torch

from tailkd.data import model_inputs
from tailkd.errors import TailkdError
from tailkd.families import Family
from tailkd.head import decoder_forward

__all__ = ["PROBES", "attention_outputs", "block_influence", "channel_activity", "experts_module", "head_importance",
           "measure", "norm_modules", "routed_counts", "ssm_head_importance", "unit_activity"]


def experts_module(fam: Family) -> str:
    """The path, inside one of `fam`'s layers, of the module holding its routed experts (``mlp.experts``)."""
    names = [name for name, axes in fam.layer_params.items()
             if {"expert", "expert_ff"} & set(axes) and ".experts." in f".{name}"]
    if not names:  # a bug in a table, not a user error
        raise RuntimeError(f"{fam.label} has no experts module in its table")
    return names[0][: names[0].index("experts.")] + "experts"


def _routed(args, kwargs, real: dict) -> torch.Tensor:
    """The routed experts' indices an experts module is called with, of the batch's real tokens (``real["mask"]``):
    ``[tokens, k]`` integers."""
    if len(args) > 1:
        chosen = args[1]
    else:
        chosen = next((kwargs[key] for key in ("top_k_index", "router_indices") if kwargs.get(key) is not None), None)
    if chosen is None:
        raise RuntimeError("an experts module was called without its routed indices (a transformers release whose "
                           "mixtures call their experts otherwise: `tailkd.calibration` needs updating)")
    return _real_rows(chosen, real, chosen.shape[-1] if chosen.dim() > 1 else 1)


def _forward(teacher, batches, real: dict, handles: list, measure: str = "") -> int:
    """Run the teacher's decoder over ``batches`` (`tailkd.head.decoder_forward`: its own forward, the logits of one
    position, so that a teacher sharded with FSDP2 gathers its weights as in training), ``real["mask"]`` each batch's
    flattened real-token mask (None without padding) and ``real["rows"]`` its tokens while its forward runs (a hooked
    tensor of other rows is refused: every layer runs over every position); the real tokens seen (none: a TailkdError
    where ``measure`` names what needs them). Eval mode for the pass, restored after; the hooks ``handles`` removed
    after."""
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    tokens = 0
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            real["mask"] = None if mask is None else mask.reshape(-1).bool().to(device)
            real["rows"] = batch["input_ids"].numel()
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            decoder_forward(teacher, batch["input_ids"].to(device), needs="a calibration pass over a teacher "
                            "sharded with FSDP2 needs: use --teacher.parallel replicate", **model_inputs(batch, device))
    finally:
        for handle in handles:
            handle.remove()
        teacher.train(was_training)
    if measure and not tokens:
        raise TailkdError(f"the calibration rows hold no real token: nothing to measure for {measure}")
    return tokens


# --------------------------------------------------------------------------- probes: hooks and what they sum up
# A probe registers its hooks on the teacher for ``layers`` (reading ``real["mask"]``, the batch's real tokens, which
# `_forward` sets) and returns ``(handles, finish)``: ``finish(tokens)`` gives the measure once the pass is over.


def _real_rows(x: torch.Tensor, real: dict, *row: int) -> torch.Tensor:
    """``x`` as one row per token of the batch (a row's shape ``row``; by default x's last dim), the real tokens' rows
    only (``real["mask"]``)."""
    rows = x.reshape(-1, *(row or x.shape[-1:]))
    if rows.shape[0] != real["rows"]:  # a bug, not a user error (a layer run over some positions only)
        raise RuntimeError(f"a hooked tensor has {rows.shape[0]} token rows, the batch {real['rows']}")
    return rows if real["mask"] is None else rows[real["mask"]]


def _influence_probe(teacher, fam: Family, real: dict, layers, heads: int):
    """Block Influence of every layer (float64 [L]; ``layers`` unused): hooks on the layer modules, their input and
    output hidden states, cosine in float64."""
    modules = teacher.get_submodule(fam.layer_prefix.rstrip("."))  # the ModuleList
    total, inputs = torch.zeros(len(modules), dtype=torch.float64), {}

    def take_input(i):
        def hook(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def take_output(i):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            x, y = _real_rows(inputs.pop(i), real, out.shape[-1]), _real_rows(out, real)
            total[i] += torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).sum().cpu()
        return hook

    handles = [h for i, layer in enumerate(modules) for h in (
        layer.register_forward_pre_hook(take_input(i), with_kwargs=True),
        layer.register_forward_hook(take_output(i), with_kwargs=True))]
    return handles, lambda tokens: 1.0 - total / tokens


def _heads_probe(teacher, fam: Family, real: dict, layers, heads):
    """Mean L2 norm of each query head's output ({layer: float64 [heads]}) of the attention layers among ``layers``
    (a hybrid's other mixers have no attention output projection): the input of its `attention_outputs`, ``heads``
    equal blocks (a number, or one per teacher layer: Laguna's)."""
    paths = attention_outputs(fam)
    modules = {i: m for path in paths for i, m in _layer_modules(teacher, fam, layers, path).items()}
    if not modules:  # a bug in a table, not a user error (a student of attention heads has attention layers)
        raise RuntimeError(f"none of teacher layers {layers} has {' or '.join(paths)}")
    return _block_norms(modules, {i: heads[i] if isinstance(heads, (list, tuple)) else heads for i in modules}, real)


def _ssm_heads_probe(teacher, fam: Family, real: dict, layers, heads):
    """Mean L2 norm of each Mamba-2 head's output ({layer: float64 [ssm heads]}) of the Mamba-2 layers among
    ``layers``: the input of the mixer's out_proj (the module the table cuts ``d`` by ``ssm_channels``), one block of
    head_dim channels per head (a Mamba-1 mixer's, Jamba's: one channel, its mean |value|)."""
    path = next(name.removesuffix(".weight") for name, axes in fam.layer_params.items()
                if name.endswith(".weight") and tuple(axes) == ("d", "ssm_channels"))
    modules = _layer_modules(teacher, fam, layers, path)
    head_dim = getattr(teacher.config, fam.ssm["head_dim"]) if "head_dim" in fam.ssm else 1
    return _block_norms(modules, {i: m.in_features // head_dim for i, m in modules.items()}, real)


def _block_norms(modules: dict, n: dict, real: dict):
    """The heads probes' hooks: per layer i, the mean L2 norm over the real tokens of each of the ``n[i]`` equal blocks
    of ``modules[i]``'s input ({layer: float64 [n[i]]})."""
    total = {i: torch.zeros(n[i], dtype=torch.float64) for i in modules}

    def count(i):
        def hook(module, args):
            out = _real_rows(args[0], real, n[i], args[0].shape[-1] // n[i])
            total[i] += torch.linalg.vector_norm(out.double(), dim=-1).sum(0).cpu()
        return hook

    handles = [m.register_forward_pre_hook(count(i)) for i, m in modules.items()]
    return handles, lambda tokens: {i: t / tokens for i, t in total.items()}


def _channels_probe(teacher, fam: Family, real: dict, layers, heads: int):
    """Mean |output| of each residual channel at each norm of `norm_modules` ({norm: float64 [hidden]})."""
    hidden = teacher.config.hidden_size
    modules = {name: m for name in norm_modules(fam, layers) if (m := _submodule(teacher, name)) is not None}
    if not modules:  # a bug in a table, not a user error
        raise RuntimeError(f"{fam.label} has no norm in its table")
    total = {name: torch.zeros(hidden, dtype=torch.float64) for name in modules}

    def count(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if out.shape[-1] != hidden:  # a bug in a table, not a user error
                raise RuntimeError(f"{name} outputs {out.shape[-1]} channels, the residual stream has {hidden}")
            total[name].add_(_real_rows(out, real).abs().double().sum(0).cpu())
        return hook

    handles = [m.register_forward_hook(count(name)) for name, m in modules.items()]
    return handles, lambda tokens: {name: t / tokens for name, t in total.items()}


def _units_probe(teacher, fam: Family, real: dict, layers, heads: int):
    """Mean |activation| of each dense MLP unit ({layer: float64 [ff]}): the input of the layer's down projection,
    the last of its MLP modules (those whose weights the table cuts along ``ff`` / ``gate_up``) to run; of a mixture,
    its routed experts' units in its routed layers (`_expert_units_probe`), its dense MLPs' in the others where they
    narrow (Jamba's; other mixtures keep their dense MLPs whole)."""
    mixture = any("expert" in axes for axes in fam.layer_params.values())
    handles, experts = _expert_units_probe(teacher, fam, real, layers, heads) if mixture else ([], lambda tokens: {})
    names = sorted({name.rpartition(".")[0] for name, axes in fam.layer_params.items()
                    if set(axes) & {"ff", "gate_up"} and name.endswith("weight")})
    if not names and not mixture:  # a bug in a table, not a user error (`tailkd.student` refuses such families first)
        raise RuntimeError(f"{fam.label} has no MLP cut by units in its table")
    last, total = {}, {}

    def take_input(i):
        def hook(module, args):
            last[i] = args[0]
        return hook

    def count(i):
        def hook(module, args, output):
            summed = _real_rows(last.pop(i), real).abs().double().sum(0).cpu()
            total[i] = summed if i not in total else total[i] + summed
        return hook

    for i in layers:
        layer = teacher.get_submodule(f"{fam.layer_prefix}{i}")
        modules = [m for name in names if (m := _submodule(layer, name)) is not None]
        if not modules or (mixture and _submodule(layer, experts_module(fam)) is not None):  # its experts' instead
            continue
        handles.append(layer.register_forward_hook(count(i)))
        handles += [m.register_forward_pre_hook(take_input(i)) for m in modules]
    return handles, lambda tokens: {**experts(tokens), **{i: t / tokens for i, t in total.items()}}


def _expert_units_probe(teacher, fam: Family, real: dict, layers, heads: int):
    """Mean |activation| of each routed expert's units over the real tokens routed to it ({layer: float64 [E, ff]};
    zeros for an expert no token reached) of the routed layers among ``layers``: a forward pre-hook on each experts
    module recomputes, expert by expert for the tokens it is called with, the down projection's input from its
    gate_up_proj [E, gate | up, d] (and gate_up_proj_bias where the module has biases) through the module's own gate,
    ``_apply_gate`` (transformers 5's experts: act(gate) * up by default, a family's own where it has one; without
    it act_fn(gate) * up)."""
    modules = _layer_modules(teacher, fam, layers, experts_module(fam))
    for m in modules.values():
        if getattr(m, "is_transposed", False) or not getattr(m, "has_gate", True):  # a bug in a table
            raise RuntimeError(f"{type(m).__name__} is not [E, gate | up, d] as {fam.label}'s table says")
    total = {i: torch.zeros(m.gate_up_proj.shape[0], m.gate_up_proj.shape[1] // 2, dtype=torch.float64)
             for i, m in modules.items()}
    count = {i: torch.zeros(len(t), dtype=torch.float64) for i, t in total.items()}

    def hook(i):
        def measure_units(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            chosen = _routed(args, kwargs, real)
            x = _real_rows(x, real)
            bias = module.gate_up_proj_bias if getattr(module, "has_bias", False) else None
            for e in chosen.unique().tolist():
                rows = (chosen == e).any(-1)
                out = torch.nn.functional.linear(x[rows], module.gate_up_proj[e], None if bias is None else bias[e])
                if hasattr(module, "_apply_gate"):
                    act = module._apply_gate(out)
                else:
                    gate, up = out.chunk(2, dim=-1)
                    act = module.act_fn(gate) * up
                total[i][e] += act.abs().double().sum(0).cpu()
                count[i][e] += int(rows.sum())
        return measure_units

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in modules.items()]
    return handles, lambda tokens: {i: t / count[i].clamp_min(1)[:, None] for i, t in total.items()}


def _experts_probe(teacher, fam: Family, real: dict, layers, heads: int):
    """Tokens routed to each expert ({layer: int64 [E]}) of the routed layers among ``layers``: a forward pre-hook on
    each experts module reads the routed indices it is called with; where the family's experts are called without
    them (`Family.router`: Llama 4), a forward hook on the router takes the top ``top_k`` of the logits it returns, as
    the router itself does."""
    # the routed layers: a mixture's dense ones (DeepSeek's first layers, Qwen-MoE's mlp_only_layers) have no experts
    modules = _layer_modules(teacher, fam, layers, experts_module(fam))
    # [E, ...] tensors; DBRX's flattened [E x units, ...]: the module's num_experts
    experts = {i: getattr(m, "num_experts", None) or next(iter(m.parameters())).shape[0] for i, m in modules.items()}
    counts = {i: torch.zeros(e, dtype=torch.int64) for i, e in experts.items()}

    def add(i, chosen):  # [tokens, k]
        counts[i] += torch.bincount(chosen.reshape(-1).long(), minlength=experts[i]).cpu()

    def hook(i):
        def count(module, args, kwargs):
            add(i, _routed(args, kwargs, real))
        return count

    def router_hook(i):
        def count(module, args, output):  # output: (scores, logits [tokens, E])
            logits = output[1]
            add(i, _real_rows(torch.topk(logits, module.top_k, dim=-1).indices, real, module.top_k))
        return count

    if fam.router:
        routers = _layer_modules(teacher, fam, modules, fam.router)
        return [m.register_forward_hook(router_hook(i)) for i, m in routers.items()], lambda tokens: counts
    return [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in modules.items()], lambda tokens: counts


# the measures, by the student setting that reads them
PROBES = {"layer_choice=influence": _influence_probe, "hidden_channels=active": _channels_probe,
          "attention_heads=active": _heads_probe, "mlp_units=active": _units_probe, "experts=used": _experts_probe,
          "ssm_head_choice=active": _ssm_heads_probe}


@torch.no_grad()
def measure(teacher, fam: Family, batches, wanted: dict, heads=0) -> tuple[dict, int]:
    """``({setting: its measure}, real tokens)``: one forward of the teacher's decoder over ``batches`` (dicts of
    ``input_ids [B, T]`` and optionally ``attention_mask [B, T]``) with the hooks of every measure ``wanted`` names
    (``{PROBES key: teacher layers}``; ``heads``: the teacher's query heads, for attention_heads: a number, or one per
    layer, `tailkd.layer_attention.layer_query_heads`), each as the
    function of its name below gives it (channel activity per norm). Rows without a real token are a TailkdError
    naming the settings."""
    real, handles, finish = {"mask": None}, [], {}
    try:
        for key, layers in wanted.items():
            hooks, finish[key] = PROBES[key](teacher, fam, real, layers, heads)
            handles += hooks
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    tokens = _forward(teacher, batches, real, handles, " and ".join(wanted))
    return {key: done(tokens) for key, done in finish.items()}, tokens


def block_influence(teacher, fam: Family, batches) -> tuple[torch.Tensor, int]:
    """``(BI float64 [L], real tokens)``: each teacher layer's Block Influence over ``batches`` (see the module
    docstring), read by hooks on the layer modules (their input and output hidden states, cosine in float64)."""
    found, tokens = measure(teacher, fam, batches, {"layer_choice=influence": None})
    return found["layer_choice=influence"], tokens


def channel_activity(teacher, fam: Family, batches, layers) -> tuple[torch.Tensor, int]:
    """``(float64 [hidden] activity of each residual channel, real tokens)`` over ``batches``: the sum over the norms
    of `norm_modules` (those of ``layers`` and the model's own) of each channel's mean |output| (see the module
    docstring)."""
    found, tokens = measure(teacher, fam, batches, {"hidden_channels=active": layers})
    return sum(found["hidden_channels=active"].values()), tokens


def head_importance(teacher, fam: Family, batches, layers, heads) -> tuple[dict[int, torch.Tensor], int]:
    """``({teacher layer i: float64 [heads] mean L2 norm of each query head's output}, real tokens)`` over ``batches``
    for the attention layers among ``layers`` (a hybrid's other mixers have no attention output projection): the
    input of `attention_outputs`, ``heads`` equal blocks (a number, or one per teacher layer; see the module
    docstring)."""
    found, tokens = measure(teacher, fam, batches, {"attention_heads=active": layers}, heads)
    return found["attention_heads=active"], tokens


def ssm_head_importance(teacher, fam: Family, batches, layers) -> tuple[dict[int, torch.Tensor], int]:
    """``({teacher layer i: float64 [ssm heads] mean L2 norm of each Mamba-2 head's output}, real tokens)`` over
    ``batches`` for the Mamba-2 layers among ``layers`` (Jamba's Mamba-1 layers: each channel's mean |value|): the
    input of the mixer's out_proj (see the module docstring)."""
    found, tokens = measure(teacher, fam, batches, {"ssm_head_choice=active": layers})
    return found["ssm_head_choice=active"], tokens


def unit_activity(teacher, fam: Family, batches, layers) -> tuple[dict[int, torch.Tensor], int]:
    """``({teacher layer i: float64 [ff] mean |activation| of each MLP unit}, real tokens)`` over ``batches`` for
    ``layers``: the input of the layer's down projection, which is the last of its MLP modules (those whose weights
    the table cuts along ``ff`` / ``gate_up``) to run in the layer's forward; of a mixture, per routed layer float64
    [E, ff], each expert's over the tokens routed to it (`_expert_units_probe`)."""
    found, tokens = measure(teacher, fam, batches, {"mlp_units=active": layers})
    return found["mlp_units=active"], tokens


def routed_counts(teacher, fam: Family, batches, layers) -> tuple[dict[int, torch.Tensor], int]:
    """``({teacher layer i: int64 [E] tokens routed to each expert}, real tokens)`` over ``batches`` (dicts of
    ``input_ids [B, T]`` and optionally ``attention_mask [B, T]``), for the routed layers among ``layers`` (none
    where they are all dense: `tailkd.student` refuses such a student)."""
    found, tokens = measure(teacher, fam, batches, {"experts=used": layers})
    return found["experts=used"], tokens


def norm_modules(fam: Family, layers) -> list[str]:
    """The norms `channel_activity` reads: the modules whose weight `fam`'s table slices along ``d`` alone (RMSNorm,
    LayerNorm), the model's own (the final norm; Bloom's embedding norm) and those of teacher ``layers``."""
    def modules(table):
        return [name.removesuffix(".weight") for name, axes in table.items()
                if name.endswith(".weight") and tuple(axes) == ("d",)]
    return modules(fam.params) + [f"{fam.layer_prefix}{i}.{name}" for i in layers for name in modules(fam.layer_params)]


def attention_outputs(fam: Family) -> list[str]:
    """The paths, inside `fam`'s layers, of its attention's output projection: the module whose 2-D weight the table
    cuts along ``o`` (the kept query heads' blocks of its input; BitNet's norm before it is cut along ``o`` too, but is
    1-D; GPT-2's Conv1D c_proj is [in, out]), or latent attention's o_proj (``d`` by ``head``); where several are, one
    per attention kind, those cut ``d`` by ``o`` (MiniMax's o_proj and its lightning layers' out_proj, not their output
    gate, cut ``o`` by ``d``)."""
    names = {name.removesuffix(".weight"): tuple(axes) for name, axes in fam.layer_params.items()
             if name.endswith(".weight") and len(axes) == 2 and ("o" in axes or tuple(axes) == ("d", "head"))}
    if len(names) > 1:
        names = {name: axes for name, axes in names.items() if axes == ("d", "o")}
    if not names:  # a bug in a table, not a user error
        raise RuntimeError(f"{fam.label}'s table names no attention output projection")
    return list(names)


def _layer_modules(teacher, fam: Family, layers, path: str) -> dict:
    """``{teacher layer i: its module at path}`` of the ``layers`` that have one (a mixture's dense layers have no
    experts, a hybrid's other mixers no attention output projection)."""
    return {i: m for i in layers if (m := _submodule(teacher, f"{fam.layer_prefix}{i}.{path}")) is not None}


def _submodule(root, name: str):
    """``root``'s submodule ``name``, None where it has none (a dense layer of a mixture, a layer without that MLP
    module)."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None
