"""Experts kept by use (`tailkd.expert_use`, ``build_student(experts="used")``): the counts are the teacher's routing
(an independent top-k of its router logits), the choice is the most used per layer (per group), and a student that
keeps exactly the experts its teacher routes to computes the teacher's function."""

import pytest
import torch
import transformers
from test_student_families import CONFIGS, N_LAYERS, SUBSET, _ids, _logits, make_teacher

from tailkd.errors import TailkdError
from tailkd.expert_use import experts_module, kept_experts, routed_counts
from tailkd.student import build_student, config_family, family_spec

MIXTURES = [name for name, (_, extra) in CONFIGS.items() if any(
    key in extra for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"))]


def _experts(model, i):
    fam = config_family(model.config, family_spec(model))
    return model.get_submodule(f"{fam.layer_prefix}{i}.{experts_module(fam)}")


def test_kept_experts_are_the_most_used_ties_to_the_lower_index():
    counts = torch.tensor([5, 9, 9, 1, 0, 7, 3, 3])
    assert kept_experts(counts, 4).tolist() == [0, 1, 2, 5]  # 9, 9, 7, 5
    assert kept_experts(counts, 3).tolist() == [1, 2, 5]
    assert kept_experts(counts, 8).tolist() == list(range(8))
    # two groups of four: [5, 9, 9, 1] keeps 1, 2; [0, 7, 3, 3] keeps 5 and, of the tie 6/7, 6
    assert kept_experts(counts, 4, groups=2).tolist() == [1, 2, 5, 6]
    assert kept_experts(torch.zeros(6, dtype=torch.long), 2, groups=2).tolist() == [0, 3]  # no use: the first


def test_counts_are_the_top_k_of_the_router_logits_over_real_tokens():
    """Mixtral: its routing is the top 2 of its router logits per token; the counts over a batch equal those of the
    logits its forward returns (output_router_logits), ranked here in float64, over the tokens its attention mask
    keeps (right padding left out)."""
    teacher = make_teacher("mixtral")
    ids = _ids(5, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    counts, tokens = routed_counts(teacher, config_family(teacher.config, family_spec(teacher)),
                                   [{"input_ids": ids, "attention_mask": mask}], range(N_LAYERS))
    assert tokens == int(mask.sum()) == 13 + 9 + 4
    with torch.no_grad():
        router_logits = teacher(ids, output_router_logits=True, use_cache=False).router_logits
    assert sorted(counts) == list(range(N_LAYERS)) and len(router_logits) == N_LAYERS
    real = mask.reshape(-1).bool()
    for i, logits in enumerate(router_logits):  # [tokens, E]
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
    per_token = teacher.config.num_experts_per_tok if hasattr(teacher.config, "num_experts_per_tok") \
        else teacher.config.moe_k
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
    ids = _ids(8, (2, 13))
    scale = _logits(teacher, ids).abs().max()
    torch.testing.assert_close(_logits(student, ids), _logits(teacher, ids), rtol=0, atol=1e-5 * scale)
    first, _ = build_student(teacher, num_layers=N_LAYERS, num_experts=2, mlp_init="copy")
    assert (_logits(first, ids) - _logits(teacher, ids)).abs().max() > 1e-2 * scale


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


def test_every_expert_kept_or_the_first_needs_no_calibration():
    teacher = make_teacher("mixtral")

    def calibration():
        raise AssertionError("no calibration forward where nothing is chosen")

    for kwargs in ({"experts": "used"}, {"experts": "used", "num_experts": 4}, {"num_experts": 2}):
        build_student(teacher, layers=SUBSET, mlp_init="copy", calibration=calibration, **kwargs)


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
