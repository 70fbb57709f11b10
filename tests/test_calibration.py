"""A student built from calibration rows (`tailkd.calibration`). Layers by influence (``build_student(layer_choice=
"influence")``): the Block Influence is 1 - cos of a layer's input and output hidden states (an independent float64
computation from the hidden states the model returns), the choice the most influential, and a student that drops
exactly the layers that do nothing computes the teacher's function. Experts by use (``experts="used"``): the counts
are the teacher's routing (an independent top-k of its router logits), the choice the most used per layer (per
group), and a student that keeps exactly the experts its teacher routes to computes the teacher's function. MLP units
and hidden channels by activity (``mlp_units="active"``, ``hidden_channels="active"``): the activity is the mean
absolute input of the down projection / output of the norms (recomputed in float64), the choice the most active; a
student keeping exactly the active units computes the teacher's function, one keeping the active channels drops the
dead ones (every tensor's slices at the chosen channels: tests/test_student_families.py)."""

import dataclasses
import re

import pytest
import torch
import transformers
from conftest import TINY_VOCAB
from test_student_families import _COMMON, CLASSES, CONFIGS, N_LAYERS, SUBSET, _ids, _logits, make_teacher

from tailkd.calibrated import calibrated_heads, calibrated_layers, kept_heads, largest
from tailkd.calibration import (
    _layer_modules,
    block_influence,
    channel_activity,
    experts_module,
    head_importance,
    norm_modules,
    routed_counts,
    ssm_head_importance,
    unit_activity,
)
from tailkd.errors import TailkdError
from tailkd.families import family_for_class
from tailkd.sizing import config_family, family_spec
from tailkd.slicing import Dims
from tailkd.student import build_student, calibrate

MIXTURES = [name for name, (_, extra) in CONFIGS.items() if any(  # DBRX: its sizes in ffn_config
    key in extra for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "ffn_config"))]


def _computes_the_teacher(student, teacher, first):
    """``student`` computes ``teacher``'s logits (atol 1e-5 of the largest: the same operations on the same weights up
    to the order of a few terms, some exact zeros, in float32 sums of ≤ 128 terms — Jamba's mixers' channels —, each
    reordering within 127 roundings of 2^-24 of its terms' magnitude, 7.6e-6), the student of the first ones
    (``first``) does not (by more than 1e-2 of the largest)."""
    ids = _ids(8, (2, 13))
    scale = _logits(teacher, ids).abs().max()
    torch.testing.assert_close(_logits(student, ids), _logits(teacher, ids), rtol=0, atol=1e-5 * scale)
    assert (_logits(first, ids) - _logits(teacher, ids)).abs().max() > 1e-2 * scale


def _experts(model, i):
    fam = config_family(model.config, family_spec(model))
    return model.get_submodule(f"{fam.layer_prefix}{i}.{experts_module(fam)}")


def test_kept_experts_are_the_most_used_ties_to_the_lower_index():
    counts = torch.tensor([5, 9, 9, 1, 0, 7, 3, 3])
    assert largest(counts, 4).tolist() == [0, 1, 2, 5]  # 9, 9, 7, 5
    assert largest(counts, 3).tolist() == [1, 2, 5]
    assert largest(counts, 8).tolist() == list(range(8))
    # two groups of four: [5, 9, 9, 1] keeps 1, 2; [0, 7, 3, 3] keeps 5 and, of the tie 6/7, 6
    assert largest(counts, 4, groups=2).tolist() == [1, 2, 5, 6]
    assert largest(torch.zeros(6, dtype=torch.long), 2, groups=2).tolist() == [0, 3]  # no use: the first


@pytest.mark.parametrize("family", ["mixtral", "llama4", "dbrx"])
def test_counts_are_the_top_k_of_the_router_logits_over_real_tokens(family):
    """Mixtral, Llama 4 (whose experts take every token pre-scaled by its score: counted at its router), DBRX (its
    flattened experts): their routing is the top 2 of the router logits per token; the counts over a batch equal those
    of the logits the forward returns (output_router_logits; Llama 4's routed layers 1, 3, 4 only; transformers 5.17's
    Llama 4 and DBRX return none: their routers' own outputs), ranked here in float64, over the tokens the attention
    mask keeps (right padding left out)."""
    teacher = make_teacher(family)
    ids = _ids(5, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    counts, tokens = routed_counts(teacher, config_family(teacher.config, family_spec(teacher)),
                                   [{"input_ids": ids, "attention_mask": mask}], range(N_LAYERS))
    assert tokens == int(mask.sum()) == 13 + 9 + 4
    routed = [i for i in range(N_LAYERS) if _has_experts(teacher, i)]
    seen = []  # the routers' own logits, where the forward returns none
    routers = {"llama4": lambda i: (teacher.model.layers[i].feed_forward.router, 1),  # (scores, logits)
               "dbrx": lambda i: (teacher.transformer.blocks[i].ffn.router, None)}  # logits
    hooks = []
    for router, item in (routers[family](i) for i in routed) if family in routers else ():
        hooks.append(router.register_forward_hook(lambda m, a, out, item=item: seen.append(
            out if item is None else out[item])))
    with torch.no_grad():
        router_logits = getattr(teacher(ids, output_router_logits=True, use_cache=False), "router_logits", None)
    for hook in hooks:
        hook.remove()
    router_logits = router_logits or seen
    assert sorted(counts) == routed and len(router_logits) == len(routed) >= 3
    real = mask.reshape(-1).bool()
    for i, logits in zip(routed, router_logits):  # [tokens, E]
        top = logits.double()[real].argsort(dim=-1, descending=True)[:, :2]
        expected = torch.tensor([int((top == e).sum()) for e in range(4)])
        assert torch.equal(counts[i], expected), i
        assert int(counts[i].sum()) == 2 * tokens


@pytest.mark.parametrize("family", MIXTURES)
def test_every_mixture_hands_its_routing_to_the_count(family):
    """Each mixture of the family tables: every routed layer is counted (its dense layers are not), and each real
    token is routed to its experts per token, once each."""
    teacher = make_teacher(family)
    fam = config_family(teacher.config, family_spec(teacher))
    routed = [i for i in range(N_LAYERS) if _has_experts(teacher, i)]
    counts, tokens = routed_counts(teacher, fam, [{"input_ids": _ids(2, (2, 13))}], range(N_LAYERS))
    assert sorted(counts) == routed and routed
    c = teacher.config
    per_token = next(k for k in (getattr(c, "num_experts_per_tok", None), getattr(c, "moe_k", None),
                                 getattr(getattr(c, "ffn_config", None), "moe_top_k", None),
                                 getattr(c, "top_k_experts", None)) if k is not None)  # DBRX's, Gemma 4's
    for i in routed:
        assert int(counts[i].sum()) == per_token * tokens == per_token * 26, i


def _has_experts(model, i):
    try:
        _experts(model, i)
    except AttributeError:
        return False
    return True


def _never_routed(teacher, dropped: dict):
    """Make teacher layer i route no token to the experts ``dropped[i]``: their router bias (score-correction bias)
    -1e4, far below any score of these weights (|logit| < 10)."""
    with torch.no_grad():
        for i, experts in dropped.items():
            mlp = teacher.model.layers[i].mlp
            bias = mlp.router.bias if hasattr(mlp, "router") else mlp.gate.e_score_correction_bias
            bias[experts] = -1e4


def test_a_student_keeping_the_routed_experts_is_its_teacher():
    """GPT-OSS (top-2 of the router logits, softmax over those two): where teacher layer i never routes to two of its
    four experts (a different pair per layer), a student of every layer and 2 experts by use keeps, per layer, the
    other two, and computes the teacher's logits on any input (float32: the same operations on the same weights up
    to the order of 2 experts' sums); by the first experts it does not."""
    teacher = make_teacher("gpt_oss")
    dropped = {i: [i % 4, (i + 1) % 4] for i in range(N_LAYERS)}
    _never_routed(teacher, dropped)
    calls = []

    def calibration():
        calls.append(1)
        return [{"input_ids": _ids(7, (4, 13))}]

    student, table = build_student(teacher, num_layers=N_LAYERS, num_experts=2, mlp_init="copy", experts="used",
                                   calibration=calibration)
    assert len(calls) == 1
    rows = {row["name"]: row for row in table}
    for i in range(N_LAYERS):
        kept = sorted(set(range(4)) - set(dropped[i]))
        for name in ("mlp.router.weight", "mlp.router.bias", "mlp.experts.gate_up_proj", "mlp.experts.down_proj_bias"):
            row = rows[f"model.layers.{i}.{name}"]
            assert (row["experts"], row["routed_share"]) == (kept, 1.0), (i, name)
        assert torch.equal(student.model.layers[i].mlp.experts.gate_up_proj,
                           teacher.model.layers[i].mlp.experts.gate_up_proj[kept])
    _computes_the_teacher(student, teacher, build_student(teacher, num_layers=N_LAYERS, num_experts=2,
                                                          mlp_init="copy")[0])


def test_dbrx_keeps_the_most_used_of_its_flattened_experts():
    """DBRX's experts are [E x units, d] tensors (w1, v1, w2): a student of 2 experts by use keeps, per layer, the rows
    of the 2 its teacher routes the most tokens to (`routed_counts`, tested above), their first 24 units each, and
    their router rows, in increasing order; the table names them. Not the first two experts in some layer."""
    teacher = make_teacher("dbrx")
    batches = [{"input_ids": _ids(7, (4, 13))}]
    counts, _ = routed_counts(teacher, config_family(teacher.config, family_spec(teacher)), batches, SUBSET)
    student, table = build_student(teacher, layers=SUBSET, num_experts=2, intermediate_size=24, mlp_init="copy",
                                   experts="used", calibration=lambda: batches)
    rows = {row["name"]: row for row in table}
    chosen = []
    for j, i in enumerate(SUBSET):
        kept = largest(counts[i], 2)
        chosen.append(kept.tolist())
        mine, theirs = student.transformer.blocks[j].ffn, teacher.transformer.blocks[i].ffn
        assert torch.equal(mine.router.layer.weight, theirs.router.layer.weight[kept])
        for w in ("w1", "v1", "w2"):
            assert torch.equal(getattr(mine.experts.mlp, w),
                               getattr(theirs.experts.mlp, w).reshape(4, 40, 64)[kept, :24].reshape(48, 64)), (i, w)
            assert rows[f"transformer.blocks.{j}.ffn.experts.mlp.{w}"]["experts"] == kept.tolist()
    assert any(kept != [0, 1] for kept in chosen), chosen


def test_group_limited_routing_keeps_the_most_used_of_each_group_in_layer_subsets():
    """DeepSeek-V3 (8 experts in 2 groups, sigmoid scores plus a correction bias, 1 group per token; layer 0 dense):
    where teacher layer 2 never routes to experts 0, 3 (group 0) and 4, 5 (group 1) and layer 4 to 1, 2 and 6, 7,
    a student of layers 2, 4 with 4 experts keeps 1, 2, 6, 7 and 0, 3, 4, 5 — their biases and router rows — and
    one of every layer by use computes the teacher's logits."""
    teacher = make_teacher("deepseek_v3")
    dropped = {1: [0, 1, 4, 5], 2: [0, 3, 4, 5], 3: [0, 1, 6, 7], 4: [1, 2, 6, 7]}
    _never_routed(teacher, dropped)
    batches = [{"input_ids": _ids(7, (4, 13))}]
    student, table = build_student(teacher, layers=[2, 4], num_experts=4, mlp_init="copy", experts="used",
                                   calibration=lambda: batches)
    for j, (i, kept) in enumerate([(2, [1, 2, 6, 7]), (4, [0, 3, 4, 5])]):
        gate_s, gate_t = student.model.layers[j].mlp.gate, teacher.model.layers[i].mlp.gate
        assert torch.equal(gate_s.e_score_correction_bias, gate_t.e_score_correction_bias[kept])
        assert torch.equal(gate_s.weight, gate_t.weight[kept])
        assert next(r for r in table if r["name"] == f"model.layers.{j}.mlp.gate.weight")["experts"] == kept
    whole, _ = build_student(teacher, num_layers=N_LAYERS, num_experts=4, mlp_init="copy", experts="used",
                             calibration=lambda: batches)
    ids = _ids(8, (2, 13))
    scale = _logits(teacher, ids).abs().max()
    torch.testing.assert_close(_logits(whole, ids), _logits(teacher, ids), rtol=0, atol=1e-5 * scale)


def test_each_group_keeps_its_own_most_used():
    """DeepSeek-V3, 1 of 2 groups per token: where layer 2 routes no token to experts 0, 4, 5, 6 (so no token picks
    group 1, whose best two score -1e4), a student of 4 experts keeps 2 of 1, 2, 3 in group 0 and, of unused group 1,
    its first two: each group fills its share, as the student's routing needs (4 most used overall: 0, 1, 2, 3)."""
    teacher = make_teacher("deepseek_v3")
    _never_routed(teacher, {2: [0, 4, 5, 6]})
    _, table = build_student(teacher, layers=[2], num_experts=4, mlp_init="copy", experts="used",
                             calibration=lambda: [{"input_ids": _ids(7, (4, 13))}])
    kept = next(r for r in table if r["name"] == "model.layers.0.mlp.gate.weight")["experts"]
    assert set(kept[:2]) < {1, 2, 3} and kept[2:] == [4, 5]


@pytest.mark.parametrize("kwargs, message", [
    ({"experts": "most"}, r"^experts='most': use one of first, used$"),
    ({"experts": "used", "num_experts": 2, "mlp_init": "copy"}, r"^experts=used needs calibration rows"),
    ({"experts": "used", "num_experts": 2}, r"^experts=used keeps the experts the teacher uses, but mlp_init=random "
                                            r"draws the student's experts afresh: use mlp_init copy$"),
])
def test_bad_expert_choices_are_refused(kwargs, message):
    with pytest.raises(TailkdError, match=message):
        build_student(make_teacher("mixtral"), layers=SUBSET, **kwargs)


def test_a_dense_teacher_refuses_experts_used():
    teacher = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4))
    with pytest.raises(TailkdError, match=r"^experts=used chooses among a mixture's routed experts, but Llama is not "
                                          r"a mixture of experts: drop it$"):
        build_student(teacher, num_layers=1, mlp_init="copy", experts="used", calibration=lambda: [])


# --------------------------------------------------------------------------- layers by influence


def test_block_influence_is_one_minus_the_cosine_of_a_layers_input_and_output():
    """Helium (Llama's layout): the hidden states its forward returns are each layer's input (and the last one's output
    after the final norm): the influence of layers 0..L-2 equals 1 - cos of consecutive ones, averaged over the real
    tokens in float64 (float32 hidden states; rtol 1e-6: a few ulps of the cosines' float64 mean), and of the last layer
    the same with its output taken by a hook before the norm."""
    teacher = make_teacher("helium")
    ids = _ids(5, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    fam = config_family(teacher.config, family_spec(teacher))
    influence, tokens = block_influence(teacher, fam, [{"input_ids": ids, "attention_mask": mask}])
    assert tokens == 13 + 7 + 13 and influence.dtype == torch.float64 and influence.shape == (N_LAYERS,)
    last = {}
    handle = teacher.model.layers[-1].register_forward_hook(lambda m, a, out: last.update(out=out))
    with torch.no_grad():
        states = list(teacher(ids, output_hidden_states=True, use_cache=False).hidden_states[:-1])
    handle.remove()
    states.append(last["out"][0] if isinstance(last["out"], tuple) else last["out"])
    real = mask.bool()
    for i in range(N_LAYERS):
        x, y = states[i][real].double(), states[i + 1][real].double()
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        assert float(influence[i]) == pytest.approx(1 - float(cos.mean()), rel=1e-6, abs=1e-12), i


def test_a_gemma4_teachers_kv_shared_layers_are_measured_at_every_position():
    """Gemma 4 runs its KV-shared layers (3 and 4 here) over the positions whose logits it keeps alone where
    logits_to_keep is a number; the calibration pass names its last position by index, so every layer's influence is
    1 - cos of its input and output over every real token, recomputed in float64 from a plain forward's hooks (rtol
    1e-6, as Helium's), the shared layers' too, and their MLP units' activity is the mean over every real token of the
    down projection's input (rtol 1e-6: float32 inputs, a float64 mean of 31). Before, those layers were measured at
    the last position of each row."""
    teacher = make_teacher("gemma4")
    ids = _ids(5, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    fam = config_family(teacher.config, family_spec(teacher))
    influence, tokens = block_influence(teacher, fam, batches)
    activity, _ = unit_activity(teacher, fam, batches, range(N_LAYERS))
    assert tokens == 13 + 9 + 13
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, i=i: seen.update({i: (args[0], out)}))
             for i, layer in enumerate(teacher.model.layers)]
    hooks += [layer.mlp.down_proj.register_forward_pre_hook(lambda m, args, i=i: seen.update({f"mlp{i}": args[0]}))
              for i, layer in enumerate(teacher.model.layers)]
    with torch.no_grad():
        teacher(ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    real = mask.bool()
    for i in range(N_LAYERS):
        x, y = (h[real].double() for h in seen[i])
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        assert float(influence[i]) == pytest.approx(1 - float(cos.mean()), rel=1e-6, abs=1e-12), i
        units = seen[f"mlp{i}"][real].double().abs().mean(0)
        assert units.shape == (192 if i >= 3 else 96,)
        torch.testing.assert_close(activity[i], units, rtol=1e-6, atol=0)


def test_most_influential_ties_to_the_lower_index():
    influence = torch.tensor([0.3, 0.1, 0.5, 0.1, 0.3], dtype=torch.float64)
    assert largest(influence, 2).tolist() == [0, 2]
    assert largest(influence, 3).tolist() == [0, 2, 4]
    assert largest(influence, 4).tolist() == [0, 1, 2, 4]


def _do_nothing(teacher, layers):
    """Make ``layers`` of a Helium teacher (Llama's layout) leave the residual stream as they found it: their o_proj and
    down_proj weights zero (attention and MLP add exact zeros)."""
    with torch.no_grad():
        for i in layers:
            teacher.model.layers[i].self_attn.o_proj.weight.zero_()
            teacher.model.layers[i].mlp.down_proj.weight.zero_()


def test_a_student_dropping_the_layers_that_do_nothing_is_its_teacher():
    """Where Helium layers 2 and 4 add nothing (Block Influence 0), a student of 3 layers by influence keeps 0, 1, 3
    and computes the teacher's logits (the same operations on the same weights, bit for bit); evenly spaced (0, 2, 4)
    it does not. The table gives each layer's influence."""
    teacher = make_teacher("helium")
    _do_nothing(teacher, [2, 4])
    calls = []

    def calibration():
        calls.append(1)
        return [{"input_ids": _ids(7, (2, 13))}]

    student, table = build_student(teacher, num_layers=3, layer_choice="influence", calibration=calibration,
                                   mlp_init="copy")
    assert len(calls) == 1
    rows = {row["name"]: row for row in table}
    assert [rows[f"model.layers.{j}.self_attn.q_proj.weight"]["source"] for j in range(3)] == [
        f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1, 3)]
    assert rows["model.layers.2.mlp.down_proj.weight"]["block_influence"] > 0
    assert "block_influence" not in rows["model.embed_tokens.weight"]
    ids = _ids(8, (2, 13))
    assert torch.equal(_logits(student, ids), _logits(teacher, ids))
    spaced, _ = build_student(teacher, num_layers=3, mlp_init="copy")
    assert not torch.allclose(_logits(spaced, ids), _logits(teacher, ids), atol=1e-3)


def test_influence_keeps_the_per_layer_settings_of_the_layers_it_chooses():
    """Gemma3's sliding / full layers follow the layers influence keeps (as they follow a list of layers)."""
    teacher = make_teacher("gemma3")
    kinds = teacher.config.layer_types
    fam = config_family(teacher.config, family_spec(teacher))
    batches = [{"input_ids": _ids(7, (2, 13))}]
    expected = largest(block_influence(teacher, fam, batches)[0], 3).tolist()
    student, _ = build_student(teacher, num_layers=3, layer_choice="influence", calibration=lambda: batches)
    assert student.config.layer_types == [kinds[i] for i in expected]


@pytest.mark.parametrize("kwargs, message", [
    ({"layer_choice": "best"}, r"^layer_choice='best': use one of spaced, influence$"),
    ({"layer_choice": "influence", "num_layers": 3}, r"^layer_choice=influence needs calibration rows"),
    ({"layer_choice": "influence", "layers": [0, 1]}, r"^layer_choice=influence chooses the student's layers, and "
                                                      r"layers lists them: drop one of the two$"),
])
def test_bad_layer_choices_are_refused(kwargs, message):
    with pytest.raises(TailkdError, match=message):
        build_student(make_teacher("helium"), **kwargs)


# --------------------------------------------------------------------------- MLP units by activity


def test_unit_activity_is_the_mean_absolute_input_of_the_down_projection():
    """Helium (Llama's gated MLP): each unit's activity equals mean |silu(x W_gate^T) * (x W_up^T)| over the real
    tokens, x the MLP's input (its norm's output, taken by a hook), recomputed in float64 (rtol 1e-5: the model's
    float32 products of 64-term dot products, ~64 u relative, and the mean of such terms)."""
    teacher = make_teacher("helium")
    ids = _ids(5, (3, 13))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    fam = config_family(teacher.config, family_spec(teacher))
    activity, tokens = unit_activity(teacher, fam, [{"input_ids": ids, "attention_mask": mask}], [1, 3])
    assert sorted(activity) == [1, 3] and tokens == 13 + 13 + 5
    for i in (1, 3):
        layer = teacher.model.layers[i]
        want = _gated_mlp_activity(teacher, layer.post_attention_layernorm, layer.mlp, ids, mask)
        torch.testing.assert_close(activity[i], want, rtol=1e-5, atol=0)


def _gated_mlp_activity(teacher, norm, mlp, ids, mask):
    """Mean |silu(x W_gate^T) * (x W_up^T)| over the real tokens (``mask``), x the MLP's input (``norm``'s output,
    taken by a hook), in float64."""
    mlp_in = {}
    handle = norm.register_forward_hook(lambda m, a, out: mlp_in.update(x=out))
    with torch.no_grad():
        teacher(ids, use_cache=False)
    handle.remove()
    x = mlp_in["x"][mask.bool()].double()
    gate, up = x @ mlp.gate_proj.weight.double().T, x @ mlp.up_proj.weight.double().T
    return (torch.nn.functional.silu(gate) * up).abs().mean(0)


def test_a_mixtures_narrowed_dense_mlps_are_measured_beside_its_experts():
    """Jamba's dense MLPs and its experts are one intermediate_size wide: a student narrows both, so in its dense
    layers (0, 2, 4) the units are measured as Helium's (mean |silu(x W_gate^T) * (x W_up^T)| over the real tokens,
    recomputed in float64 from the layer's own MLP input; rtol 1e-5 as above) and in its routed ones each expert's;
    a student keeps those units of its dense layers, and the table names them (they were the first units before)."""
    teacher = make_teacher("jamba")
    ids = _ids(5, (3, 13))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    fam = config_family(teacher.config, family_spec(teacher))
    activity, tokens = unit_activity(teacher, fam, [{"input_ids": ids, "attention_mask": mask}], range(N_LAYERS))
    assert tokens == 13 + 13 + 5
    assert {i: a.dim() for i, a in activity.items()} == {0: 2, 1: 1, 2: 2, 3: 1, 4: 2}  # experts at even layers here
    for i in (1, 3):
        layer = teacher.model.layers[i]
        want = _gated_mlp_activity(teacher, layer.pre_ff_layernorm, layer.feed_forward, ids, mask)
        torch.testing.assert_close(activity[i], want, rtol=1e-5, atol=0)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    student, table = build_student(teacher, layers=[0, 1, 2, 3], intermediate_size=48, mlp_init="copy",
                                   mlp_units="active", calibration=lambda: batches)
    rows = {row["name"]: row for row in table}
    for j in (1, 3):
        kept = largest(activity[j], 48)
        assert not torch.equal(kept, torch.arange(48))
        mine, theirs = student.model.layers[j].feed_forward, teacher.model.layers[j].feed_forward
        assert torch.equal(mine.up_proj.weight, theirs.up_proj.weight[kept])
        assert torch.equal(mine.down_proj.weight, theirs.down_proj.weight[:, kept])
        assert rows[f"model.layers.{j}.feed_forward.down_proj.weight"]["units"].startswith("48 of 96, sha1 ")


def test_layers_by_influence_keep_what_gemma4_layers_need():
    """Gemma 4's student ends with a full attention layer and its KV-shared layers read an earlier layer of their
    kind: by influence it keeps the teacher's last layer first, then layers by influence each with the layer it reads
    where both fit. Teacher layers [S, S, F, S, S, F], the last two shared (layer 4 reads 3, layer 5 reads 2)."""
    from tailkd.families import FAMILIES
    from tailkd.layer_choice import layer_needs

    sliding, full = "sliding_attention", "full_attention"
    config = transformers.Gemma4TextConfig(num_hidden_layers=6, num_kv_shared_layers=2,
                                           layer_types=[sliding, sliding, full, sliding, sliding, full])
    needs = layer_needs(config, FAMILIES["gemma4"])
    assert needs == ([5], {4: (3,), 5: (2,)}, None)
    influence = {"layer_choice=influence": torch.tensor([0.9, 0.1, 0.2, 0.3, 0.8, 0.05], dtype=torch.float64)}
    # 5 and 2 first, then 0; 4 with 3 does not fit in 4 layers, 3 alone does; in 5 layers 4 and 3 fit
    assert calibrated_layers(influence, 4, None, 1, needs) == (None, [0, 2, 3, 5])
    assert calibrated_layers(influence, 5, None, 1, needs) == (None, [0, 2, 3, 4, 5])
    assert calibrated_layers(influence, 2, None, 1, needs) == (None, [2, 5])
    assert calibrated_layers(influence, 4, None) == (None, [0, 2, 3, 4])  # without needs: the 4 most influential
    assert layer_needs(transformers.Gemma4TextConfig(num_hidden_layers=3, layer_types=[sliding, sliding, full]),
                       FAMILIES["gemma4"]) == ([2], {}, None)  # nothing shared: the last layer only
    assert layer_needs(transformers.LlamaConfig(), FAMILIES["llama"]) == ([], {}, None)


def test_layers_by_influence_keep_a_layer_of_each_kind_olmo_hybrid_needs():
    """OLMo-Hybrid's config needs a layer of each kind (`tailkd.layer_choice.required_kinds`): by influence each kind's
    most influential layer comes first (ties: the lower index), then the others by influence; without the need, the
    most influential alone."""
    from tailkd.families import FAMILIES
    from tailkd.layer_choice import layer_needs

    full, linear = "full_attention", "linear_attention"
    kinds = [linear, linear, full, linear, full]
    needs = layer_needs(transformers.OlmoHybridConfig(num_hidden_layers=5, layer_types=kinds), FAMILIES["olmo_hybrid"])
    assert needs == ([], {}, kinds)
    influence = {"layer_choice=influence": torch.tensor([0.9, 0.8, 0.1, 0.7, 0.2], dtype=torch.float64)}
    assert calibrated_layers(influence, 2, None) == (None, [0, 1])  # two linear layers: a config OLMo-Hybrid refuses
    assert calibrated_layers(influence, 2, None, 1, needs) == (None, [0, 4])
    assert calibrated_layers(influence, 3, None, 1, needs) == (None, [0, 1, 4])
    assert calibrated_layers(influence, 4, None, 1, needs) == (None, [0, 1, 3, 4])
    tied = {"layer_choice=influence": torch.tensor([0.5, 0.5, 0.3, 0.5, 0.3], dtype=torch.float64)}
    assert calibrated_layers(tied, 2, None, 1, needs) == (None, [0, 2])


def test_an_olmo_hybrid_student_by_influence_has_both_kinds():
    """The tiny OLMo-Hybrid teacher ([L, L, F, L, F]) by influence where its linear layers are the most influential:
    the student keeps the most influential of each kind (its config refuses linear layers alone, as listing them shows),
    and computes as a student of those layers listed."""
    from tailkd.student import student_config

    teacher = make_teacher("olmo_hybrid")
    batches = [{"input_ids": _ids(7, (2, 13))}]
    measured = calibrate(teacher, lambda: batches, num_layers=2, layer_choice="influence")
    measured["layer_choice=influence"] = torch.tensor([0.9, 0.8, 0.1, 0.7, 0.2], dtype=torch.float64)
    student, table = build_student(teacher, num_layers=2, layer_choice="influence", measured=measured,
                                   mlp_init="copy")
    assert student.config.layer_types == ["linear_attention", "full_attention"]
    listed, _ = build_student(teacher, layers=[0, 4], mlp_init="copy")
    ids = _ids(3, (2, 9))
    assert torch.equal(_logits(student, ids), _logits(listed, ids))
    with pytest.raises(TailkdError, match=r"^the student keeps no full_attention layer \(teacher layers 0 1\), but "):
        student_config(teacher, layers=[0, 1])
    with pytest.raises(TailkdError, match=r"^num_layers=1, but OLMo-Hybrid's config needs a layer of each kind"):
        calibrate(teacher, lambda: pytest.fail("measured before the refusal"), num_layers=1, layer_choice="influence")


def test_layers_by_influence_keep_the_layer_whose_dsa_top_k_a_shared_layer_reuses():
    """GLM-5's "shared" layers (indexer_types) reuse the DSA top-k of the last earlier "full" layer: [F, S, S, F, S,
    F] gives layers 1 and 2 layer 0's, layer 4 layer 3's; by influence a shared layer comes with the layer it reads
    where both fit."""
    from tailkd.families import FAMILIES
    from tailkd.layer_choice import layer_needs

    full, shared = "full", "shared"
    config = transformers.GlmMoeDsaConfig(num_hidden_layers=6, indexer_types=[full, shared, shared, full, shared, full])
    needs = layer_needs(config, FAMILIES["glm_moe_dsa"])
    assert needs == ([], {1: (0,), 2: (0,), 4: (3,)}, None)
    influence = {"layer_choice=influence": torch.tensor([0.1, 0.9, 0.2, 0.3, 0.8, 0.05], dtype=torch.float64)}
    # 1 with 0, then 4 with 3 does not fit in 3 layers, 3 alone does; in 4 layers 4 and 3 fit
    assert calibrated_layers(influence, 3, None, 1, needs) == (None, [0, 1, 3])
    assert calibrated_layers(influence, 4, None, 1, needs) == (None, [0, 1, 3, 4])
    assert calibrated_layers(influence, 1, None, 1, needs) == (None, [3])  # 1 and 4 need a second layer


def test_a_gemma4_student_by_influence_is_one_its_config_can_give():
    """A student of 3 of the tiny Gemma 4 teacher's layers ([S, F, S, F, F], layers 3 and 4 reading layer 1) by
    influence: teacher layer 4 and the layer it reads (1), then the most influential other layer, measured by
    `block_influence` (the 3 most influential alone need not be a student its config can give)."""
    teacher = make_teacher("gemma4")
    batches = [{"input_ids": _ids(7, (2, 13))}]
    influence, _ = block_influence(teacher, config_family(teacher.config, family_spec(teacher)), batches)
    best = max((0, 2, 3), key=lambda i: (float(influence[i]), -i))
    want = sorted({1, 4, best})
    student, table = build_student(teacher, num_layers=3, layer_choice="influence", calibration=lambda: batches,
                                   mlp_init="copy")
    rows = {row["name"]: row for row in table}
    assert [rows[f"model.layers.{j}.input_layernorm.weight"]["source"] for j in range(3)] == [
        f"model.layers.{i}.input_layernorm.weight" for i in want]
    assert student.config.layer_types[-1] == "full_attention"


def test_layers_by_influence_are_whole_periods_where_the_kinds_repeat():
    """With a period (Jamba's), the whole periods of largest summed influence, in order; a trailing partial period is
    not a candidate; without one, the layers of largest influence."""
    influence = torch.tensor([0.1, 0.1, 0.05, 0.3, 0.2, 0.2, 0.9], dtype=torch.float64)  # periods 0.2, 0.35, 0.4 | 0.9
    assert calibrated_layers({"layer_choice=influence": influence}, 4, None, period=2) == (None, [2, 3, 4, 5])
    assert calibrated_layers({"layer_choice=influence": influence}, 2, None) == (None, [3, 6])
    assert calibrated_layers({}, 4, None, period=2) == (4, None)


def test_most_active_units_ties_to_the_lower_index():
    activity = torch.tensor([0.2, 0.5, 0.2, 0.0, 0.5], dtype=torch.float64)
    assert largest(activity, 2).tolist() == [1, 4]
    assert largest(activity, 3).tolist() == [0, 1, 4]


def _moe_input(teacher, i, ids):
    """The input of layer i's mixture block (its norm's output) over ``ids``: [tokens, hidden]."""
    taken = {}
    handle = teacher.model.layers[i].post_attention_layernorm.register_forward_hook(
        lambda m, a, out: taken.update(x=out))
    with torch.no_grad():
        teacher(ids, use_cache=False)
    handle.remove()
    return taken["x"].reshape(-1, taken["x"].shape[-1])


def test_expert_unit_activity_is_the_mean_absolute_input_of_each_experts_down_projection():
    """Mixtral (softmax top-2 routing of 4 experts): each routed expert's unit activity equals mean |silu(x G_e^T) *
    (x U_e^T)| over the real tokens the router sends to it, G_e and U_e the gate and up halves of its gate_up_proj,
    the routing recomputed from the router's weights and everything in float64 (rtol 1e-5: the model's float32 64-term
    dot products, ~64 u relative, as the dense units'); every expert is reached by some token here."""
    teacher = make_teacher("mixtral")
    ids = _ids(5, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, 9:], mask[2, 5:] = 0, 0  # padding inside the batch's token rows, not only at their end
    fam = config_family(teacher.config, family_spec(teacher))
    activity, tokens = unit_activity(teacher, fam, [{"input_ids": ids, "attention_mask": mask}], [1, 3])
    assert sorted(activity) == [1, 3] and tokens == 9 + 13 + 5
    for i in (1, 3):
        x = _moe_input(teacher, i, ids)[mask.reshape(-1).bool()].double()
        mlp = teacher.model.layers[i].mlp
        routed = (x @ mlp.gate.weight.double().T).topk(2, dim=-1).indices  # softmax keeps the order of the logits
        w = mlp.experts.gate_up_proj.double()
        assert activity[i].shape == (4, 96)
        for e in range(4):
            xe = x[(routed == e).any(-1)]
            assert len(xe) > 0
            a = torch.nn.functional.silu(xe @ w[e, :96].T) * (xe @ w[e, 96:].T)
            torch.testing.assert_close(activity[i][e], a.abs().mean(0), rtol=1e-5, atol=0)


def _standard_experts(family) -> bool:
    """Whether a family's table stores its experts as tailkd measures their units (from its config alone)."""
    name, extra = CONFIGS[family]
    if not hasattr(transformers, name):  # a family of a later transformers: its tests skip
        return True
    fam = config_family(getattr(transformers, name)(**{**_COMMON, **extra}), family_for_class(CLASSES[family]))
    if not any("expert" in axes for axes in fam.layer_params.values()):
        return False
    path = experts_module(fam)
    return (fam.layer_params.get(f"{path}.gate_up_proj") == ("expert", "gate_up", "d")
            and fam.layer_params.get(f"{path}.down_proj") == ("expert", "d", "ff"))


@pytest.mark.parametrize("family", [f for f in CONFIGS if f not in ("gpt_oss", "nemotron_h") and _standard_experts(f)])
def test_each_experts_unit_activity_is_what_its_down_projection_is_given(family, monkeypatch):
    """Every mixture whose experts tailkd measures (gate_up_proj [E, gate | up, d], down_proj [E, d, ff]): the probe's
    recomputed down-projection input is, expert by expert, the input the model's own experts forward (its eager
    per-expert loop) hands to F.linear(., down_proj[e]) (read by a spy on F.linear, matched by the weight's address),
    averaged over the tokens routed to the expert (rtol 1e-5: the same float32 products; the sums' order may
    differ)."""
    teacher = make_teacher(family)
    if hasattr(teacher, "set_experts_implementation"):  # transformers 5.25: the experts' own per-expert loop
        teacher.set_experts_implementation("eager")
    fam = config_family(teacher.config, family_spec(teacher))
    layers = sorted(_layer_modules(teacher, fam, range(N_LAYERS), experts_module(fam)))  # the routed layers
    where = {_experts(teacher, i).down_proj[e].data_ptr(): (i, e)
             for i in layers for e in range(_experts(teacher, i).down_proj.shape[0])}
    given, rows = {}, {}
    linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        key = where.get(weight.data_ptr()) if weight.dim() == 2 else None
        if key is not None:
            given[key] = given.get(key, 0) + x.reshape(-1, x.shape[-1]).abs().double().sum(0)
            rows[key] = rows.get(key, 0) + x.reshape(-1, x.shape[-1]).shape[0]
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    activity, _ = unit_activity(teacher, fam, [{"input_ids": _ids(5, (2, 13))}], layers)
    assert sorted(activity) == layers and given, "no down projection of an expert was seen"
    for (i, e), total in given.items():
        torch.testing.assert_close(activity[i][e], total / rows[(i, e)], rtol=1e-5, atol=0)
    for i in layers:  # an expert the spy never saw had no token: its activity is 0
        seen = {e for (j, e) in given if j == i}
        assert all(not activity[i][e].any() for e in range(len(activity[i])) if e not in seen)


def _silence_experts(teacher, dead):
    """Make units ``dead[i][e]`` of layer i's expert e produce exactly 0 at its down projection's input: their gate and
    up rows zero (silu(0) * 0 = 0). The routers' weights x 100: router logits then differ by far more than a float32
    sum's rounding, so a student's routing is its teacher's (a near tie would flip on a difference of 1e-7)."""
    with torch.no_grad():
        for i, per_expert in dead.items():
            mlp = teacher.model.layers[i].mlp
            (mlp.gate if hasattr(mlp, "gate") else mlp.router).weight.mul_(100)
            w = teacher.model.layers[i].mlp.experts.gate_up_proj
            for e, units in per_expert.items():
                w[e, units] = 0
                w[e, [96 + u for u in units]] = 0


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "phimoe"])  # softmax top-2, OLMoE's, Phi-MoE's sparsemixer
def test_a_student_keeping_each_experts_active_units_is_its_teacher(family):
    """Where half of each routed expert's 96 units (a different half per expert and layer) output exactly 0, a student
    of every layer and expert with intermediate_size 48 by activity keeps, per expert, the other half and computes the
    teacher's logits (`_computes_the_teacher`); by the first units it does not. With 2 of the 4 experts kept by use as
    well, each kept expert's tensors are its own live rows and columns of the teacher's, in the student's expert
    order."""
    teacher = make_teacher(family)
    dead = {i: {e: [u for u in range(96) if (u // 3 + i + e) % 2 == 0] for e in range(4)} for i in range(N_LAYERS)}
    _silence_experts(teacher, dead)
    calibration = [{"input_ids": _ids(7, (2, 13))}]
    student, table = build_student(teacher, num_layers=N_LAYERS, intermediate_size=48, mlp_init="copy",
                                   mlp_units="active", calibration=lambda: calibration)
    rows = [row for row in table if "units" in row]
    assert {row["name"].split(".", 3)[3] for row in rows} == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert all(row["active_share"] == 1.0 and row["units"].startswith("48 of 96 in each of 4 experts, sha1 ")
               for row in rows) and len(rows) == 2 * N_LAYERS
    _computes_the_teacher(student, teacher, build_student(teacher, num_layers=N_LAYERS, intermediate_size=48,
                                                          mlp_init="copy")[0])
    both, table = build_student(teacher, num_layers=N_LAYERS, intermediate_size=48, num_experts=2, experts="used",
                                mlp_init="copy", mlp_units="active", calibration=lambda: calibration)
    for i in range(N_LAYERS):
        kept = next(row["experts"] for row in table if row["name"] == f"model.layers.{i}.mlp.experts.down_proj")
        t, s = teacher.model.layers[i].mlp.experts, both.model.layers[i].mlp.experts
        for j, e in enumerate(kept):
            live = [u for u in range(96) if u not in dead[i][e]]
            assert torch.equal(s.gate_up_proj[j], t.gate_up_proj[e, live + [96 + u for u in live]])
            assert torch.equal(s.down_proj[j], t.down_proj[e][:, live])


def _gpt2():
    config = transformers.GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=N_LAYERS, n_head=4, n_inner=96,
                                     n_positions=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _silence(teacher, family, dead):
    """Make the units ``dead[i]`` of layer i's MLP produce exactly 0 at the down projection's input: the up side's
    rows (columns of GPT-2's Conv1D) and biases zero, act(0) = 0."""
    with torch.no_grad():
        for i, units in dead.items():
            if family == "gpt2":
                mlp = teacher.transformer.h[i].mlp
                mlp.c_fc.weight[:, units] = 0
                mlp.c_fc.bias[units] = 0
            elif family == "falcon":
                teacher.transformer.h[i].mlp.dense_h_to_4h.weight[units] = 0
            elif family == "phi3":
                w = teacher.model.layers[i].mlp.gate_up_proj.weight
                w[units] = 0
                w[[96 + u for u in units]] = 0
            else:
                mlp = teacher.model.layers[i].mlp
                mlp.gate_proj.weight[units] = 0
                mlp.up_proj.weight[units] = 0


@pytest.mark.parametrize("family", ["helium", "phi3", "falcon", "gpt2", "gemma4"])
def test_a_student_keeping_the_active_mlp_units_is_its_teacher(family):
    """Where half of every layer's 96 MLP units (a different half per layer) output exactly 0, a student of every
    layer with intermediate_size 48 by activity keeps, per layer, the other half and computes the teacher's logits
    (the same operations on the same weights up to the order of 48 zero terms in each sum); by the first units it
    does not. Gated (Helium), fused gate/up (Phi-3), ungated parallel (Falcon) and Conv1D (GPT-2) MLPs; Gemma 4's
    KV-shared layers (3, 4), twice as wide, keep 96 of their 192."""
    teacher = _gpt2() if family == "gpt2" else make_teacher(family)
    width = {i: 192 if family == "gemma4" and i >= 3 else 96 for i in range(N_LAYERS)}
    dead = {i: [u for u in range(width[i]) if (u // 3 + i) % 2 == 0] for i in range(N_LAYERS)}
    _silence(teacher, family, dead)
    student, table = build_student(teacher, num_layers=N_LAYERS, intermediate_size=48, mlp_init="copy",
                                   mlp_units="active", calibration=lambda: [{"input_ids": _ids(7, (2, 13))}])
    rows = [row for row in table if "units" in row]
    assert len(rows) >= 2 * N_LAYERS and all(row["active_share"] == 1.0 for row in rows)
    layer = [int(re.search(r"\.(?:h|layers)\.(\d+)\.", row["name"]).group(1)) for row in rows]
    assert all(row["units"].startswith(f"{width[i] // 2} of {width[i]}, sha1 ") for row, i in zip(rows, layer))
    _computes_the_teacher(student, teacher, build_student(teacher, num_layers=N_LAYERS, intermediate_size=48,
                                                          mlp_init="copy")[0])


@pytest.mark.parametrize("family, kwargs, message", [
    ("helium", {"mlp_units": "most"}, r"^mlp_units='most': use one of first, active$"),
    ("helium", {"mlp_units": "active", "intermediate_size": 40}, r"^mlp_units=active keeps the MLP units the teacher "
                                                                 r"uses most, but mlp_init=random draws the student's "
                                                                 r"MLP afresh: use mlp_init copy$"),
    ("helium", {"mlp_units": "active", "intermediate_size": 40, "mlp_init": "copy"},
     r"^mlp_units=active needs calibration rows"),
    *[(family, {"mlp_units": "active", "mlp_init": "copy", "intermediate_size": 16},
       rf"^mlp_units=active measures a mixture's experts stored as gate_up_proj \[experts, gate \| up, hidden\] and "
       rf"down_proj \[experts, hidden, units\], which {label}'s are not: drop it$")
      for family, label in (("gpt_oss", "GPT-OSS"), ("nemotron_h", "Nemotron-H"),  # interleaved pairs; ungated
                            ("llama4", "Llama 4"))],  # [E, hidden, gate | up], in before out
    ("bloom", {"mlp_units": "active", "mlp_init": "copy"}, r"^mlp_units=active chooses the units of a dense MLP cut "
                                                           r"by intermediate_size, which Bloom's MLP is not: drop it$"),
])
def test_bad_mlp_unit_choices_are_refused(family, kwargs, message):
    with pytest.raises(TailkdError, match=message):
        build_student(make_teacher(family), layers=SUBSET, **kwargs)


# --------------------------------------------------------------------------- hidden channels by activity


def _identity_layers(teacher, family):
    """Zero every layer's writes to the residual stream (attention and MLP output projections, their biases): each
    layer then hands on its input, and every norm reads the embeddings."""
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if family == "gpt2" and (".attn.c_proj." in name or ".mlp.c_proj." in name):
                param.zero_()
            if family == "helium" and (".self_attn.o_proj." in name or ".mlp.down_proj." in name):
                param.zero_()


@pytest.mark.parametrize("family", ["helium", "gpt2"])
def test_channel_activity_is_the_mean_absolute_output_of_the_norms(family):
    """Where every layer hands on its input, each norm reads the embeddings (GPT-2: token + position), so each
    channel's activity is, recomputed in float64 from the weights alone, the sum over the norms of the kept layers
    (1 and 3: two each) and the final norm of mean |norm(e)| over the real tokens — RMSNorm w * e / rms(e) (Helium),
    LayerNorm w * (e - mean) / std + b (GPT-2). rtol 1e-5: the model's float32 norm of 64 entries (a 64-term mean of
    squares, ~64 u relative) and a mean of 31 such terms."""
    teacher = _gpt2() if family == "gpt2" else make_teacher("helium")
    _identity_layers(teacher, family)
    ids = _ids(5, (3, 13))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    fam = config_family(teacher.config, family_spec(teacher))
    activity, tokens = channel_activity(teacher, fam, [{"input_ids": ids, "attention_mask": mask}], [1, 3])
    assert tokens == 13 + 13 + 5 and activity.dtype == torch.float64 and activity.shape == (64,)
    params = {name: p.detach().double() for name, p in teacher.named_parameters()}
    if family == "gpt2":
        e = params["transformer.wte.weight"][ids] + params["transformer.wpe.weight"][:13]
        centred = e - e.mean(-1, keepdim=True)
        normed = centred / (centred.pow(2).mean(-1, keepdim=True) + teacher.config.layer_norm_epsilon).sqrt()
        norms = ["transformer.ln_f"] + [f"transformer.h.{i}.{n}" for i in (1, 3) for n in ("ln_1", "ln_2")]
    else:
        e = params["model.embed_tokens.weight"][ids]
        normed = e / (e.pow(2).mean(-1, keepdim=True) + teacher.config.rms_norm_eps).sqrt()
        norms = ["model.norm"] + [f"model.layers.{i}.{n}" for i in (1, 3)
                                  for n in ("input_layernorm", "post_attention_layernorm")]
    expected = torch.zeros(64, dtype=torch.float64)
    for norm in norms:
        out = normed * params[f"{norm}.weight"] + params.get(f"{norm}.bias", 0)
        expected += out[mask.bool()].abs().mean(0)
    torch.testing.assert_close(activity, expected, rtol=1e-5, atol=0)
    assert sorted(norm_modules(fam, [1, 3])) == sorted(norms)


def test_a_student_keeping_the_active_channels_drops_the_dead_ones():
    """Where half of the residual stream's 64 channels are dead (the embeddings and every write to the stream zero
    there), they have activity exactly 0: a student of hidden_size 32 by activity keeps the live half (all of the
    norms' activity, the table says so on the embeddings' row), the first channels' student keeps half of them; its
    embeddings are the teacher's live columns."""
    teacher = make_teacher("helium")
    dead = [c for c in range(64) if (c // 4) % 2 == 0]
    live = [c for c in range(64) if c not in dead]
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, dead] = 0
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    student, table = build_student(teacher, layers=SUBSET, hidden_size=32, mlp_init="copy", hidden_channels="active",
                                   calibration=lambda: [{"input_ids": _ids(7, (2, 13))}])
    row = next(row for row in table if row["name"] == "model.embed_tokens.weight")
    assert row["channel_share"] == 1.0 and row["channels"].startswith("32 of 64, sha1 ")
    assert [r["name"] for r in table if "channels" in r] == ["model.embed_tokens.weight"]
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, live])
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight[live])
    first = build_student(teacher, layers=SUBSET, hidden_size=32, mlp_init="copy")[0]
    assert (first.model.embed_tokens.weight == 0).all(0).sum() == 16


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_channels": "most"}, r"^hidden_channels='most': use one of first, active$"),
    ({"hidden_channels": "active", "hidden_size": 32}, r"^hidden_channels=active needs calibration rows"),
])
def test_bad_hidden_channel_choices_are_refused(kwargs, message):
    with pytest.raises(TailkdError, match=message):
        build_student(make_teacher("helium"), layers=SUBSET, **kwargs)


# --------------------------------------------------------------------------- attention heads by importance


def test_head_importance_is_the_mean_norm_of_each_heads_attention_output():
    """GPT-2 (4 heads of 16, no RoPE): each head's importance equals mean ||softmax(q k^T / 4 + causal) v||_2 over the
    real tokens, recomputed in float64 from the layer's input hidden states (those the model returns) through ln_1 and
    c_attn. rtol 1e-5: the model's float32 attention (64-term dot products, a 13-term softmax, ~100 u) and a mean of
    31 such norms."""
    teacher = _gpt2()
    ids = _ids(5, (3, 13))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    fam = config_family(teacher.config, family_spec(teacher))
    importance, tokens = head_importance(teacher, fam, [{"input_ids": ids, "attention_mask": mask}], [1, 3], 4)
    assert sorted(importance) == [1, 3] and tokens == 31
    with torch.no_grad():
        hidden = teacher(ids, output_hidden_states=True).hidden_states
    causal = torch.full((13, 13), float("-inf"), dtype=torch.float64).triu(1)
    for i in (1, 3):
        block = teacher.transformer.h[i]
        x = torch.nn.functional.layer_norm(hidden[i].double(), (64,), block.ln_1.weight.double(),
                                           block.ln_1.bias.double(), teacher.config.layer_norm_epsilon)
        q, k, v = (x @ block.attn.c_attn.weight.double() + block.attn.c_attn.bias.double()).split(64, dim=-1)
        q, k, v = (z.reshape(3, 13, 4, 16).transpose(1, 2) for z in (q, k, v))
        out = torch.softmax(q @ k.transpose(-1, -2) / 4 + causal, dim=-1) @ v  # [3, heads, 13, 16]
        norms = out.norm(dim=-1).transpose(1, 2)[mask.bool()]  # [real tokens, heads]
        torch.testing.assert_close(importance[i], norms.mean(0), rtol=1e-5, atol=0)


def test_each_attention_kind_is_measured_at_its_own_output_projection():
    """MiniMax's lightning layers (0, 2, 3) have their own output projection (out_proj, after an output gate cut along
    the heads too) beside the full layers' o_proj: a head's importance in each layer is the mean L2 norm of its block
    of that projection's input over the real tokens (read here by hooks on the modules named; the same float32
    inputs, their norms summed in float64 in another order: rtol 1e-12)."""
    teacher = make_teacher("minimax")
    ids = _ids(5, (3, 13))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    fam = config_family(teacher.config, family_spec(teacher))
    importance, tokens = head_importance(teacher, fam, [{"input_ids": ids, "attention_mask": mask}], range(N_LAYERS), 4)
    assert sorted(importance) == list(range(N_LAYERS)) and tokens == 31
    inputs, handles = {}, []
    for i, layer in enumerate(teacher.model.layers):
        module = layer.self_attn.o_proj if i in (1, 4) else layer.self_attn.out_proj
        handles.append(module.register_forward_pre_hook(lambda m, args, i=i: inputs.update({i: args[0]})))
    with torch.no_grad():
        teacher(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    for i, x in inputs.items():
        norms = x[mask.bool()].reshape(-1, 4, 16).double().norm(dim=-1)  # [real tokens, heads]
        torch.testing.assert_close(importance[i], norms.mean(0), rtol=1e-12, atol=0)


def test_kept_heads_keep_each_kv_heads_best_queries_and_the_best_kv_heads():
    importance = torch.tensor([1.0, 5.0, 3.0, 0.0, 2.0, 2.0, 9.0, 0.0], dtype=torch.float64)  # 2 KV heads of 4
    assert kept_heads(importance, 2, 1, 2).tolist() == [4, 6]  # KV head 1's best pair (2 + 9) over KV head 0's (5 + 3)
    assert kept_heads(importance, 2, 2, 2).tolist() == [1, 2, 4, 6]
    assert kept_heads(importance, 2, 2, 1).tolist() == [1, 6]
    assert kept_heads(importance, 2, 1, 4).tolist() == [4, 5, 6, 7]  # 13 over 9
    pair_sums = torch.tensor([6.0, 6.0, 0.0, 0.0, 10.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert kept_heads(pair_sums, 2, 1, 2).tolist() == [0, 1]  # 12 over 11: the sum, not the largest head
    assert kept_heads(importance, 8, 3, 1).tolist() == [1, 2, 6]  # one KV head per query head: the 3 largest
    assert kept_heads(torch.zeros(4, dtype=torch.float64), 2, 1, 1).tolist() == [0]  # ties to the lower index
    # KV heads given (a layer reading another's keys and values): their groups' best queries, whatever the sums say
    assert kept_heads(importance, 2, 1, 2, [0]).tolist() == [1, 2]
    assert kept_heads(importance, 2, 2, 1, [0, 1]).tolist() == [1, 6]


def test_a_layer_keeping_every_head_has_no_choice_of_heads():
    """`calibrated_heads`: a layer whose own sizes keep every head (a layer kind's own heads, Kimi Linear's delta
    attention: `tailkd.layer_attention.layer_dims`) gets no entry — no choice, no share in the run log's span —
    while the others keep their best heads (one KV head per query head: the 2 largest) and that share of the sum."""
    t = Dims(3, 32, 4, 4, 8, 64)
    s = dataclasses.replace(t, heads=2, kv_heads=2)
    whole = dataclasses.replace(t, heads=2, kv_heads=2, head_dim=16)  # the kind's 2 heads of 16, teacher and student
    importance = {0: torch.tensor([1.0, 4.0, 2.0, 3.0], dtype=torch.float64),
                  1: torch.tensor([5.0, 1.0], dtype=torch.float64),
                  2: torch.tensor([0.0, 1.0, 6.0, 1.0], dtype=torch.float64)}
    heads, share = calibrated_heads(t, s, [0, 1, 2], importance, own={1: (whole, whole)})
    assert {i: h.tolist() for i, h in heads.items()} == {0: [1, 3], 2: [1, 2]}
    assert share == {0: 0.7, 2: 0.875}


def _silence_heads(teacher, family, dead):
    """Make the query heads ``dead[i]`` of layer i output exactly 0: the value rows they read zero (Ministral: their KV
    head's v_proj rows, so whole KV groups; DeepSeek-V3: each head's value rows of kv_b_proj, [k_nope 8 | v 12])."""
    with torch.no_grad():
        for i, heads in dead.items():
            attention = teacher.model.layers[i].self_attn
            for h in heads:
                if family == "deepseek_v3":
                    attention.kv_b_proj.weight[h * 20 + 8:(h + 1) * 20] = 0
                else:
                    group = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
                    attention.v_proj.weight[h // group * 16:(h // group + 1) * 16] = 0


@pytest.mark.parametrize("family, kv_heads, student", [
    ("ministral", 2, {"num_heads": 2, "num_kv_heads": 1}),  # grouped: a dead KV head and its two query heads
    ("ministral", 4, {"num_heads": 2, "num_kv_heads": 2}),  # one KV head per query head
    ("deepseek_v3", 4, {"num_heads": 2}),  # latent attention: whole heads
])
def test_a_student_keeping_the_important_heads_is_its_teacher(family, kv_heads, student):
    """Where half of every layer's 4 query heads output exactly 0 (a different half per layer), a student of every
    layer with 2 heads by importance keeps, per layer, the other half and computes the teacher's logits (the dead
    heads add exactly 0 through the output projection); the first heads' student does not. The table names each
    layer's heads, all of the importance kept."""
    teacher = make_teacher(family, num_key_value_heads=kv_heads)
    dead = {i: [0, 1] if i % 2 else [2, 3] for i in range(N_LAYERS)}
    _silence_heads(teacher, family, dead)
    built, table = build_student(teacher, num_layers=N_LAYERS, mlp_init="copy", attention_heads="active",
                                 calibration=lambda: [{"input_ids": _ids(7, (2, 13))}], **student)
    named = {row["name"]: row for row in table if "heads" in row}
    for i in range(N_LAYERS):
        row = named[f"model.layers.{i}.self_attn.o_proj.weight"]
        assert row["heads"] == [h for h in range(4) if h not in dead[i]] and row["head_share"] == 1.0
    assert not any(".mlp." in name or "layernorm" in name for name in named)
    _computes_the_teacher(built, teacher, build_student(teacher, num_layers=N_LAYERS, mlp_init="copy", **student)[0])


def test_ssm_head_importance_is_the_mean_norm_of_each_heads_output():
    """Mamba-2 (8 heads of 8 in 2 groups): a head's importance in each layer is the mean L2 norm of its block of the
    mixer's out_proj input over the real tokens (read here by hooks on the modules; the same float32 inputs, their
    norms summed in float64 in another order: rtol 1e-12)."""
    teacher = make_teacher("mamba2")
    ids = _ids(5, (3, 13))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    fam = config_family(teacher.config, family_spec(teacher))
    importance, tokens = ssm_head_importance(teacher, fam, [{"input_ids": ids, "attention_mask": mask}], [0, 2, 3])
    assert sorted(importance) == [0, 2, 3] and tokens == 31
    inputs, handles = {}, []
    for i, layer in enumerate(teacher.backbone.layers):
        handles.append(layer.mixer.out_proj.register_forward_pre_hook(lambda m, args, i=i: inputs.update({i: args[0]})))
    with torch.no_grad():
        teacher(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    for i in (0, 2, 3):
        norms = inputs[i][mask.bool()].reshape(-1, 8, 8).double().norm(dim=-1)  # [real tokens, heads]
        torch.testing.assert_close(importance[i], norms.mean(0), rtol=1e-12, atol=0)


def test_a_student_keeping_the_important_ssm_heads_is_its_teacher():
    """Falcon-H1 without the gated norm, 6 Mamba-2 heads in 2 groups, where one head of each group outputs exactly 0
    (its x channels zeroed in in_proj, the convolution and D: a different one per layer): a student of every layer with
    4 heads by importance keeps, per layer and group, the other two and computes the teacher's logits (the dead heads
    add exactly 0 through out_proj); the first heads' student does not. The table names each layer's heads, all of the
    importance kept."""
    # (the mixers' output scaled up, ssm_out_multiplier 4: the first heads' student then differs visibly)
    teacher = make_teacher("falcon_h1", mamba_rms_norm=False, mamba_n_groups=2, ssm_out_multiplier=4.0)
    dead = {i: [i % 2, 3 + (i + 1) % 2] for i in range(N_LAYERS)}  # heads the first heads' student keeps
    with torch.no_grad():
        for i, heads in dead.items():
            mamba = teacher.model.layers[i].mamba
            for h in heads:
                channels = slice(h * 8, (h + 1) * 8)  # x: in_proj's rows after z's 48, the convolution's first 48
                mamba.in_proj.weight[48:][channels] = 0
                mamba.in_proj.bias[48:][channels] = 0
                mamba.conv1d.weight[channels] = 0
                mamba.conv1d.bias[channels] = 0
                mamba.D[h] = 0
    built, table = build_student(teacher, num_layers=N_LAYERS, mlp_init="copy", ssm_heads=4, ssm_head_choice="active",
                                 calibration=lambda: [{"input_ids": _ids(7, (2, 13))}])
    named = {row["name"]: row for row in table if "ssm_heads" in row}
    for i in range(N_LAYERS):
        for part in ("in_proj.weight", "conv1d.weight", "A_log", "norm.weight", "out_proj.weight"):
            row = named.get(f"model.layers.{i}.mamba.{part}")
            assert row is None if part == "norm.weight" else (  # no norm without mamba_rms_norm
                row["ssm_heads"] == [h for h in range(6) if h not in dead[i]] and row["ssm_head_share"] == 1.0)
    assert all(".mamba." in name for name in named)
    _computes_the_teacher(built, teacher, build_student(teacher, num_layers=N_LAYERS, mlp_init="copy", ssm_heads=4)[0])


def test_a_jamba_student_keeping_the_active_mamba_channels_is_its_teacher():
    """Jamba's Mamba-1 mixers narrow by channels (heads of one: ssm_heads), by importance the mean |value| of each at
    out_proj's input. Half of each layer's 128 channels are dead — z's rows of in_proj (weight and bias) zeroed, so
    their gated output is exactly 0, and x_proj's columns, so they do not reach dt, B and C — a different half per layer
    (even channels in one, odd in the next): a student of every layer keeping 64 by importance keeps the live ones and
    computes the teacher's logits (the dead channels add exact zeros to sums of 128 terms); the first 64's student
    does not. The table names each layer's channels, all of the importance kept."""
    teacher = make_teacher("jamba", mamba_proj_bias=True)
    mixers = {i: layer.mamba for i, layer in enumerate(teacher.model.layers) if hasattr(layer, "mamba")}
    dead = {i: list(range(j % 2, 128, 2)) for j, i in enumerate(mixers)}  # layers 0, 2, 4: even, odd, even
    with torch.no_grad():
        for i, mamba in mixers.items():
            mamba.in_proj.weight[128:][dead[i]] = 0  # z: in_proj's rows after x's 128
            mamba.in_proj.bias[128:][dead[i]] = 0
            mamba.x_proj.weight[:, dead[i]] = 0
    built, table = build_student(teacher, mlp_init="copy", ssm_heads=64, ssm_head_choice="active",
                                 calibration=lambda: [{"input_ids": _ids(7, (2, 13))}])
    assert built.config.mamba_expand == 1
    named = {row["name"]: row for row in table if "ssm_heads" in row}
    for i in mixers:
        for part in ("in_proj.weight", "in_proj.bias", "conv1d.weight", "x_proj.weight", "dt_proj.bias", "A_log",
                     "out_proj.weight"):
            row = named[f"model.layers.{i}.mamba.{part}"]
            assert row["ssm_heads"] == [c for c in range(128) if c not in dead[i]] and row["ssm_head_share"] == 1.0
    assert all(".mamba." in name for name in named) and "model.layers.1.mamba.out_proj.bias" not in named
    _computes_the_teacher(built, teacher, build_student(teacher, mlp_init="copy", ssm_heads=64)[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"ssm_head_choice": "most"}, r"^ssm_head_choice='most': use one of first, active$"),
    ({"ssm_head_choice": "active"}, r"^ssm_head_choice=active chooses Mamba heads, but Llama has none: drop "
                                    r"it$"),
    ({"attention_heads": "most"}, r"^attention_heads='most': use one of first, active$"),
    ({"attention_heads": "active", "num_heads": 2}, r"^attention_heads=active needs calibration rows"),
])
def test_bad_head_choices_are_refused(kwargs, message):
    with pytest.raises(TailkdError, match=message):
        build_student(make_teacher("ministral"), layers=SUBSET, **kwargs)


# --------------------------------------------------------------------------- one teacher pass for every choice


def _no_calibration():
    raise AssertionError("no calibration forward where nothing is chosen")


@pytest.mark.parametrize("family, kwargs", [
    # every layer kept, or the spaced ones
    ("helium", {"layer_choice": "influence"}), ("helium", {"layer_choice": "influence", "num_layers": N_LAYERS}),
    ("helium", {"num_layers": 3}),
    # the teacher's hidden_size, or the first channels
    ("helium", {"layers": SUBSET, "hidden_channels": "active"}), ("helium", {"layers": SUBSET, "hidden_size": 32}),
    # every head kept, or the first ones
    ("ministral", {"layers": SUBSET, "attention_heads": "active"}),
    ("ministral", {"layers": SUBSET, "num_heads": 2, "num_kv_heads": 1}),
    # the teacher's width, or the first units
    ("helium", {"layers": SUBSET, "mlp_init": "copy", "mlp_units": "active"}),
    ("helium", {"layers": SUBSET, "intermediate_size": 40, "mlp_init": "copy"}),
    # every expert kept, or the first ones
    ("mixtral", {"layers": SUBSET, "mlp_init": "copy", "experts": "used"}),
    ("mixtral", {"layers": SUBSET, "mlp_init": "copy", "experts": "used", "num_experts": 4}),
    ("mixtral", {"layers": SUBSET, "mlp_init": "copy", "num_experts": 2}),
])
def test_nothing_to_choose_needs_no_calibration(family, kwargs):
    """A calibrated choice with nothing to choose (every layer, channel, head, unit or expert kept), or the first ones
    asked for, reads no calibration row."""
    build_student(make_teacher(family), calibration=_no_calibration, **kwargs)


def test_every_calibrated_choice_reads_one_teacher_pass():
    """Layers, channels, heads and units chosen together: one forward of the teacher's decoder per calibration batch
    (two batches: two forwards), and the same student as the choices' own measures give (the slices of the composed
    student: tests/test_student_families.py)."""
    teacher = make_teacher("ministral")
    batches = [{"input_ids": _ids(seed, (2, 13))} for seed in (7, 8)]
    calls = []
    handle = teacher.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    kwargs = dict(num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=48, mlp_init="copy",
                  layer_choice="influence", hidden_channels="active", attention_heads="active", mlp_units="active")
    student, table = build_student(teacher, calibration=lambda: iter(batches), **kwargs)
    handle.remove()
    assert len(calls) == 2
    fam = config_family(teacher.config, family_spec(teacher))
    chosen = largest(block_influence(teacher, fam, batches)[0], 3).tolist()
    units = unit_activity(teacher, fam, batches, chosen)[0]
    for j, i in enumerate(chosen):
        row = next(r for r in table if r["name"] == f"model.layers.{j}.mlp.down_proj.weight")
        assert row["source"] == f"model.layers.{i}.mlp.down_proj.weight"
        kept = largest(units[i], 48)
        assert torch.equal(student.model.layers[j].mlp.down_proj.weight,
                           teacher.model.layers[i].mlp.down_proj.weight[:, kept][
                               largest(channel_activity(teacher, fam, batches, chosen)[0], 32)])


def test_a_student_built_from_measures_made_before_is_the_one_its_own_pass_builds():
    """`calibrate` then ``build_student(measured=...)`` (what a sharded teacher's run does: measured on the sharded
    teacher, built from a skeleton) gives the student and table of ``build_student(calibration=...)`` without a
    forward of its own; measures of other settings are a caller's bug (RuntimeError), not used."""
    teacher = make_teacher("ministral")
    batches = [{"input_ids": _ids(seed, (2, 13))} for seed in (7, 8)]
    kwargs = dict(num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=48,
                  layer_choice="influence", hidden_channels="active", attention_heads="active", mlp_units="active")
    measured = calibrate(teacher, lambda: iter(batches), **kwargs)
    assert sorted(measured) == ["attention_heads=active", "hidden_channels=active", "layer_choice=influence",
                                "mlp_units=active"]
    want, want_table = build_student(teacher, calibration=lambda: iter(batches), mlp_init="copy", **kwargs)
    calls = []
    handle = teacher.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    got, table = build_student(teacher, measured=measured, mlp_init="copy", **kwargs)
    handle.remove()
    assert not calls and table == want_table
    assert all(torch.equal(p, q) for p, q in zip(got.state_dict().values(), want.state_dict().values(), strict=True))
    assert calibrated_layers(measured, 3, None)[1] == [int(r["source"].split(".")[2]) for r in table
                                                       if r["name"].endswith("input_layernorm.weight")]
    with pytest.raises(RuntimeError, match=r"^measured holds \['attention_heads=active', 'hidden_channels=active', "
                                           r"'layer_choice=influence', 'mlp_units=active'\], these settings need "
                                           r"\['attention_heads=active', 'hidden_channels=active', "
                                           r"'layer_choice=influence'\]$"):
        build_student(teacher, measured=measured, mlp_init="copy", **{**kwargs, "intermediate_size": None})


def test_calibration_rows_without_a_real_token_are_refused_before_the_build():
    teacher = make_teacher("ministral")
    rows = [{"input_ids": _ids(7, (2, 13)), "attention_mask": torch.zeros(2, 13, dtype=torch.long)}]
    with pytest.raises(TailkdError, match=r"^the calibration rows hold no real token: nothing to measure for "
                                          r"hidden_channels=active and attention_heads=active$"):
        build_student(teacher, layers=SUBSET, hidden_size=32, num_heads=2, num_kv_heads=1, hidden_channels="active",
                      attention_heads="active", calibration=lambda: rows)


def test_experts_used_on_dense_layers_only_is_refused():
    """DeepSeek-V3's first layer is dense (first_k_dense_replace 1): a student of that layer alone has no routing to
    count."""
    with pytest.raises(TailkdError, match=r"^none of the student's teacher layers \(0\) routes to experts: "
                                          r"experts=used has nothing to count; drop it$"):
        build_student(make_teacher("deepseek_v3"), layers=[0], num_experts=4, mlp_init="copy", experts="used",
                      calibration=lambda: [{"input_ids": _ids(7, (2, 13))}])


@pytest.mark.parametrize("family, kwargs, message", [
    ("bamba", {"hidden_size": 48, "hidden_channels": "active"}, r"^hidden_size=48, but the teacher's Mamba-2 "
                                                                r"mixers are mamba_expand x hidden_size wide"),
    ("ministral", {"num_heads": 3, "attention_heads": "active"}, r"^num_heads=3 is not a multiple of num_kv_heads=2"),
    ("ministral", {"num_layers": 9, "layer_choice": "influence"}, r"^num_layers=9 but the teacher has 5 layers"),
])
def test_a_student_refused_anyway_costs_no_calibration_pass(family, kwargs, message):
    """Widths or a depth the teacher cannot give are refused before the calibration rows are read."""
    def calibration():
        raise AssertionError("no calibration forward for a refused student")

    with pytest.raises(TailkdError, match=message):
        build_student(make_teacher(family), calibration=calibration, **kwargs)


def test_every_key_of_student_init_json_is_documented():
    """docs/outputs.md names every key a built student's table (student_init.json) can hold: those of all six
    calibrated choices (a dense, a mixture-of-experts and a Mamba-2 teacher)."""
    from pathlib import Path

    batches = [{"input_ids": _ids(7, (2, 13))}]
    _, dense = build_student(make_teacher("ministral"), num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=1,
                             intermediate_size=48, mlp_init="copy", layer_choice="influence",
                             hidden_channels="active", attention_heads="active", mlp_units="active",
                             calibration=lambda: batches)
    _, moe = build_student(make_teacher("mixtral"), layers=SUBSET, num_experts=2, mlp_init="copy", experts="used",
                           calibration=lambda: batches)
    _, ssm = build_student(make_teacher("mamba2"), layers=SUBSET, ssm_heads=4, ssm_head_choice="active",
                           calibration=lambda: batches)
    keys = {key for row in dense + moe + ssm for key in row}
    assert {"block_influence", "channels", "heads", "units", "experts", "ssm_heads", "ssm_head_share"} <= keys
    documented = (Path(__file__).parents[1] / "docs" / "outputs.md").read_text(encoding="utf-8")
    section = documented[documented.index("## `RUN/student_init.json`"):]
    named = {key for line in section.splitlines() if line.startswith("| `")  # the table's first column
             for key in re.findall(r"`(\w+)`", line.split("|")[1])}
    assert keys <= named
