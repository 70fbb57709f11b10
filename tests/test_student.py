"""tailkd.student: layer choice, per-head truncation, MLP init, frozen embeddings, the table."""

import bounds as B
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_tokenizer, make_tiny_lm, rotated_qk

from tailkd.errors import TailkdError
from tailkd.slicing import rope_pair_rows
from tailkd.student import build_student, format_table, student_config

FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]


def _params(model):
    return dict(model.named_parameters())


def _ids(seed=0, shape=(2, 13)):
    return torch.randint(0, TINY_VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- exact copies


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_full_copy_reproduces_teacher_logits(family, tied):
    teacher = make_tiny_lm(family, tie_word_embeddings=tied)
    student, table = build_student(teacher, mlp_init="copy")
    assert {row["action"] for row in table} == {"copied"}
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(student.eval()(ids).logits, teacher(ids).logits)


def test_layer_subset_copies_chosen_layers_exactly():
    teacher = make_tiny_lm("qwen2")
    student, table = build_student(teacher, layers=[1, 3], mlp_init="copy")
    t, s = _params(teacher), _params(student)
    for j, i in enumerate([1, 3]):
        for part in ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
                     "self_attn.o_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight"):
            assert torch.equal(s[f"model.layers.{j}.{part}"], t[f"model.layers.{i}.{part}"])
    sources = {row["name"]: row["source"] for row in table}
    assert sources["model.layers.1.mlp.up_proj.weight"] == "model.layers.3.mlp.up_proj.weight"
    assert student.config.num_hidden_layers == 2 and student.config.layer_types == ["full_attention"] * 2
    again, _ = build_student(teacher, layers=torch.tensor([1, 3]), mlp_init="copy")  # any sequence of whole numbers
    assert all(torch.equal(param, s[name]) for name, param in again.named_parameters())


def test_llama_per_head_truncation_index_by_index():
    # teacher: hidden 64, 4 heads of 16, 2 KV heads; student: hidden 32, 4 heads of 8, 2 KV heads.
    teacher = make_tiny_lm("llama")
    student, _ = build_student(teacher, hidden_size=32, intermediate_size=48, mlp_init="copy")
    config = student.config
    assert (config.head_dim, config.num_attention_heads, config.num_key_value_heads) == (8, 4, 2)
    t, s = _params(teacher)["model.layers.2.self_attn.q_proj.weight"], _params(student)
    # RoPE pairs (i, i+8) of a 16-row head; the student keeps teacher pairs 0, 2, 4, 6 as its pairs 0..3.
    rope_rows = [0, 2, 4, 6, 8, 10, 12, 14]
    for proj, n_heads in (("q_proj", 4), ("k_proj", 2)):
        t = _params(teacher)[f"model.layers.2.self_attn.{proj}.weight"]
        w = s[f"model.layers.2.self_attn.{proj}.weight"]
        assert w.shape == (n_heads * 8, 32)
        for h in range(n_heads):
            for r, teacher_row in enumerate(rope_rows):
                for c in range(32):
                    assert w[h * 8 + r, c] == t[h * 16 + teacher_row, c]
    v, tv = s["model.layers.2.self_attn.v_proj.weight"], _params(teacher)["model.layers.2.self_attn.v_proj.weight"]
    for h in range(2):
        for r in range(8):  # v: the first 8 rows of each head
            assert torch.equal(v[h * 8 + r], tv[h * 16 + r, :32])
    o, to = s["model.layers.2.self_attn.o_proj.weight"], _params(teacher)["model.layers.2.self_attn.o_proj.weight"]
    assert o.shape == (32, 32)
    for h in range(4):
        for r in range(8):  # o: the columns of v's kept rows, first 32 output rows
            assert torch.equal(o[:, h * 8 + r], to[:32, h * 16 + r])
    gate, tgate = s["model.layers.2.mlp.gate_proj.weight"], _params(teacher)["model.layers.2.mlp.gate_proj.weight"]
    down, tdown = s["model.layers.2.mlp.down_proj.weight"], _params(teacher)["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(gate, tgate[:48, :32]) and torch.equal(down, tdown[:32, :48])
    emb = s["model.embed_tokens.weight"]
    assert emb.shape == (TINY_VOCAB, 32) and torch.equal(emb, _params(teacher)["model.embed_tokens.weight"][:, :32])
    assert torch.equal(s["model.norm.weight"], _params(teacher)["model.norm.weight"][:32])


def test_query_heads_keep_their_kv_head():
    # teacher: 4 query heads on 2 KV heads (heads 0,1 -> KV 0; heads 2,3 -> KV 1).
    teacher = make_tiny_lm("qwen2")
    t = _params(teacher)
    student, _ = build_student(teacher, hidden_size=32, num_heads=2, num_kv_heads=2)  # head_dim 32/2 = 16
    s = _params(student)
    q, tq = s["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight"]
    qb, tqb = s["model.layers.0.self_attn.q_proj.bias"], t["model.layers.0.self_attn.q_proj.bias"]
    kept_rows = list(range(16)) + list(range(32, 48))  # teacher heads 0 and 2: one per KV head
    assert torch.equal(q, tq[kept_rows, :32]) and torch.equal(qb, tqb[kept_rows])
    assert torch.equal(s["model.layers.0.self_attn.k_proj.weight"], t["model.layers.0.self_attn.k_proj.weight"][:, :32])
    o, to = s["model.layers.0.self_attn.o_proj.weight"], t["model.layers.0.self_attn.o_proj.weight"]
    assert torch.equal(o, to[:32][:, kept_rows])

    student, _ = build_student(teacher, num_heads=2, num_kv_heads=1)  # hidden kept: head_dim stays 16
    q = _params(student)["model.layers.0.self_attn.q_proj.weight"]
    assert student.config.head_dim == 16 and torch.equal(q, tq[:32])  # heads 0, 1 share KV head 0


def test_explicit_head_dim_may_be_the_teachers():
    """An explicit head_dim is anything from 1 to the teacher's, the teacher's included: a Llama student of hidden 32
    with head_dim 16 keeps the teacher's four heads whole (every q/k/v row, the first 32 input columns)."""
    teacher = make_tiny_lm("llama")
    student, _ = build_student(teacher, hidden_size=32, head_dim=16)
    assert student.config.head_dim == 16 and student.model.layers[0].self_attn.head_dim == 16
    t, s = _params(teacher), _params(student)
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.1.self_attn.{proj}.weight"
        assert torch.equal(s[name], t[name][:, :32])
    assert torch.equal(s["model.layers.1.self_attn.o_proj.weight"], t["model.layers.1.self_attn.o_proj.weight"][:32])


def test_rope_aware_truncation_keeps_rotated_queries():
    """Student q/k after RoPE equal the teacher's on the kept rows (the reason for the pair choice)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    teacher = make_tiny_lm("llama")
    student, _ = build_student(teacher, hidden_size=32)  # head_dim 16 -> 8
    hidden = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(3))
    padded = torch.cat([hidden, torch.zeros(1, 7, 32)], dim=-1)  # teacher input with the dropped dims zero
    with torch.no_grad():
        tq, tk = rotated_qk(teacher, padded, 16, apply_rotary_pos_emb)
        sq, sk = rotated_qk(student, hidden, 8, apply_rotary_pos_emb)
    rows = rope_pair_rows(16, 8)
    assert rows == [0, 2, 4, 6, 8, 10, 12, 14]
    # the same 32 products per output (the teacher's 32 extra inputs are exact zeros) summed in two blockings: each
    # within γ_32 |x||W| (bounds.f32_dot_atol); RoPE mixes each rotation pair with |cos| + |sin| <= √2 and rounds 3
    # times (u|q cos| + u|q' sin| + u|sum|)
    for got, want, proj in ((sq, tq[..., rows], "q_proj"), (sk, tk[..., rows], "k_proj")):
        weight = getattr(student.model.layers[1].self_attn, proj).weight.double()
        mag = (hidden.double().abs() @ weight.abs().T).view(1, 7, -1, 8).transpose(1, 2)
        pair = torch.maximum(mag, torch.cat([mag[..., 4:], mag[..., :4]], -1))
        bound = B.rope_rows_atol(32, pair)
        B.assert_within(got, want, bound, msg=proj)
    # a plain "first 8 rows" cut would not commute with RoPE:
    assert not torch.allclose(sq, tq[..., :8], atol=1e-3)


def test_rope_scaling_is_the_teachers_setting_over_the_students_rotary_rows():
    """A rope_type is computed by transformers over the student's rotary rows r_s. YaRN: the kept teacher pairs'
    frequencies where both ramps are 0 or 1; inside the ramp, whose bounds it rounds over r_s/2 pairs, a frequency
    between the interpolated (θ_j / factor) and the extrapolated θ_j. Dynamic NTK raises its base to r/(r - 2): 2
    rotated rows are refused in one line (transformers divided by zero building the student)."""
    factor, original = 4.0, 64
    yarn = {"rope_type": "yarn", "factor": factor, "rope_theta": 10000.0, "original_max_position_embeddings": original}
    teacher = make_tiny_lm("llama", rope_parameters=yarn, max_position_embeddings=int(original * factor))
    student, _ = build_student(teacher, hidden_size=32)  # head_dim 16 -> 8: teacher pair 2j for student pair j
    ft, fs = teacher.model.rotary_emb.inv_freq, student.model.rotary_emb.inv_freq
    kept = ft[rope_pair_rows(16, 8)[:4]]
    theta = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # the unscaled frequencies θ_j
    extrapolated, interpolated = kept.double() == theta.float().double(), kept.double() == (theta / factor).float()
    edge = ~(extrapolated | interpolated)  # the teacher's ramp
    assert extrapolated[0] and interpolated[-1]
    same = fs == kept
    assert same[~edge].all() and not same.all()  # this setting's rounding differs at one ramp pair
    inside = ~same
    assert ((fs[inside].double() <= theta[inside] * (1 + 1e-6))
            & (fs[inside].double() >= theta[inside] / factor * (1 - 1e-6))).all()
    assert student.model.rotary_emb.attention_scaling == teacher.model.rotary_emb.attention_scaling
    dynamic = make_tiny_lm("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(TailkdError, match=r"^the teacher's dynamic \(NTK\) RoPE scaling raises its base to r/\(r - 2\) "
                                          r"over the r = head_dim rotated rows, but a head_dim 2 student rotates 2: "
                                          r"pick a head_dim that rotates at least 4 \(the teacher's is 16\)$"):
        build_student(dynamic, hidden_size=8)
    assert build_student(dynamic, hidden_size=16)[0].config.head_dim == 4  # 4 rotated rows: built


def test_dynamic_rope_counts_the_rotated_rows_of_a_partial_rotary_head():
    """Under Phi's partial rotary factor a dynamic (NTK) scaling sees the rotated rows only: a head_dim 4 student of a
    teacher rotating half its rows rotates 2 and is refused as head_dim 2 is at a full factor; head_dim 8 is built."""
    import transformers

    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    teacher = transformers.AutoModelForCausalLM.from_config(transformers.PhiConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
        rope_parameters=rope))
    with pytest.raises(TailkdError, match=r"^the teacher's dynamic \(NTK\) RoPE scaling raises its base to r/\(r - 2\) "
                                          r"over the r = head_dim \* partial_rotary_factor \(0\.5\) rotated rows, but "
                                          r"a head_dim 4 student rotates 2: pick a head_dim that rotates at least 4 "
                                          r"\(the teacher's is 16\)$"):
        build_student(teacher, hidden_size=16)
    assert build_student(teacher, hidden_size=32)[0].model.layers[0].self_attn.rotary_ndims == 4


def test_gemma2_attention_scale_follows_head_dim_rounded_and_positive():
    """Gemma2's attention scale 1/sqrt(query_pre_attn_scalar) follows head_dim: the scalar is multiplied by
    head_dim_s/head_dim_t and rounded (23 * 8/16 = 11.5 -> 12, not 11), and stays a positive whole number (1 * 4/16
    rounds to 0, whose scale 0 ** -0.5 is a division by zero)."""
    import transformers

    for scalar, head_dim, want in ((23, 8, 12), (1, 4, 1)):
        teacher = transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(
            vocab_size=TINY_VOCAB, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_hidden_layers=2, intermediate_size=64, query_pre_attn_scalar=scalar))
        student, _ = build_student(teacher, head_dim=head_dim)
        assert student.config.query_pre_attn_scalar == want
        assert student.model.layers[0].self_attn.scaling == want ** -0.5


def test_qwen2_window_threshold_follows_the_layers():
    """Qwen2 (the Llama family) slides from layer max_window_layers on: of teacher layers 0, 2, 3 with the threshold
    at 2, one comes before it, so the student's threshold is 1 and agrees with its layer_types [F, S, S]."""
    teacher = make_tiny_lm("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    full, slide = "full_attention", "sliding_attention"
    assert teacher.config.layer_types == [full, full, slide, slide]
    student, _ = build_student(teacher, layers=[0, 2, 3])
    assert student.config.layer_types == [full, slide, slide] and student.config.max_window_layers == 1


def test_gpt2_ignores_a_head_dim_in_its_config():
    """GPT-2 computes head_dim = n_embd // n_head whatever its config holds (the family does not read head_dim): a
    stray head_dim 8 (not 64 // 4 = 16) changes neither the teacher's heads nor its full copy."""
    teacher = make_tiny_lm("gpt2", head_dim=8)
    assert teacher.transformer.h[0].attn.head_dim == 16
    student, table = build_student(teacher, mlp_init="copy")
    assert {row["action"] for row in table} == {"copied"}
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(student.eval()(ids).logits, teacher(ids).logits)


def test_gpt2_fused_qkv_truncation_index_by_index():
    # teacher: n_embd 64, 4 heads of 16; student: n_embd 32, 4 heads of 8, n_inner 100.
    teacher = make_tiny_lm("gpt2", n_inner=128)
    student, _ = build_student(teacher, hidden_size=32, intermediate_size=100, mlp_init="copy")
    t, s = _params(teacher), _params(student)
    head_cols = [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23,
                 32, 33, 34, 35, 36, 37, 38, 39, 48, 49, 50, 51, 52, 53, 54, 55]
    w, tw = s["transformer.h.1.attn.c_attn.weight"], t["transformer.h.1.attn.c_attn.weight"]  # Conv1D: [in, out]
    b, tb = s["transformer.h.1.attn.c_attn.bias"], t["transformer.h.1.attn.c_attn.bias"]
    assert w.shape == (32, 96)
    for block in range(3):  # q, k, v
        for j, col in enumerate(head_cols):
            assert torch.equal(w[:, block * 32 + j], tw[:32, block * 64 + col])
            assert b[block * 32 + j] == tb[block * 64 + col]
    proj, tproj = s["transformer.h.1.attn.c_proj.weight"], t["transformer.h.1.attn.c_proj.weight"]
    assert torch.equal(proj, tproj[head_cols, :32])
    assert torch.equal(s["transformer.h.1.attn.c_proj.bias"], t["transformer.h.1.attn.c_proj.bias"][:32])
    assert torch.equal(s["transformer.h.1.mlp.c_fc.weight"], t["transformer.h.1.mlp.c_fc.weight"][:32, :100])
    assert torch.equal(s["transformer.h.1.mlp.c_fc.bias"], t["transformer.h.1.mlp.c_fc.bias"][:100])
    assert torch.equal(s["transformer.h.1.mlp.c_proj.weight"], t["transformer.h.1.mlp.c_proj.weight"][:100, :32])
    assert torch.equal(s["transformer.wpe.weight"], t["transformer.wpe.weight"][:, :32])
    assert torch.equal(s["transformer.ln_f.bias"], t["transformer.ln_f.bias"][:32])
    assert student.config.n_inner == 100 and student.config.n_embd == 32


def test_gpt2_heads_have_no_rope_constraints():
    """GPT-2 has absolute positions: an odd head_dim (n_embd 28 over 4 heads: 7) is built, keeping the first 7 rows of
    each q, k and v head; num_kv_heads may be given as num_heads (its heads are MHA), only another value is refused."""
    teacher = make_tiny_lm("gpt2")
    student, _ = build_student(teacher, hidden_size=28, num_kv_heads=4)
    cols = torch.tensor([h * 16 + r for h in range(4) for r in range(7)])
    tw = _params(teacher)["transformer.h.1.attn.c_attn.weight"]  # Conv1D: [in, out], out = [q | k | v]
    expected = torch.cat([tw[:28, block * 64 + cols] for block in range(3)], dim=1)
    assert torch.equal(_params(student)["transformer.h.1.attn.c_attn.weight"], expected)
    with torch.no_grad():
        assert torch.isfinite(student.eval()(_ids()).logits).all()


def test_student_from_bf16_teacher_is_float32_and_exact():
    teacher = make_tiny_lm("llama").to(torch.bfloat16)
    teacher.config.dtype = torch.bfloat16  # as a teacher loaded in bf16 says (from_pretrained(dtype=torch.bfloat16))
    student, _ = build_student(teacher, num_layers=2, mlp_init="copy")
    assert student.dtype == torch.float32 and student.config.dtype == torch.float32
    assert student_config(teacher, num_layers=2).dtype == torch.float32  # the config build_student makes
    assert torch.equal(_params(student)["model.layers.1.self_attn.k_proj.weight"],
                       _params(teacher)["model.layers.3.self_attn.k_proj.weight"].float())


# --------------------------------------------------------------------------- MLP init and freezing


def test_random_mlp_is_seeded_and_not_copied():
    teacher = make_tiny_lm("llama")
    rng_before = torch.get_rng_state()
    a, _ = build_student(teacher, num_layers=2, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    b, _ = build_student(teacher, num_layers=2, seed=5)
    c, _ = build_student(teacher, num_layers=2, seed=6)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(_params(a)[name], _params(b)[name])
    assert not torch.equal(_params(a)[name], _params(c)[name])
    assert not torch.equal(_params(a)[name], _params(teacher)["model.layers.3.mlp.up_proj.weight"])
    std = _params(a)[name].std().item()  # the config's own init (initializer_range 0.02), not the teacher's 0.1
    assert 0.015 < std < 0.025


@pytest.mark.parametrize("family, tied", [("llama", True), ("llama", False), ("gpt2", True)])
def test_frozen_embeddings_survive_training(family, tied):
    teacher = make_tiny_lm(family, tie_word_embeddings=tied)
    student, table = build_student(teacher, num_layers=2, freeze_embeddings=True)
    frozen = {row["name"] for row in table if row["frozen"]}
    expected = {"model.embed_tokens.weight"} if family == "llama" else {"transformer.wte.weight",
                                                                        "transformer.wpe.weight"}
    assert frozen == expected
    assert {n for n, p in student.named_parameters() if not p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        logits = student(_ids(step)).logits
        logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in student.named_parameters():
        assert torch.equal(param, before[name]) == (name in expected), name
    if tied:
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    else:
        assert student.lm_head.weight.requires_grad


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("family", FAMILIES)
def test_table_lists_every_parameter_once_with_its_action(family):
    teacher = make_tiny_lm(family)
    student, table = build_student(teacher, num_layers=3, hidden_size=32)
    names = [name for name, _ in student.named_parameters()]
    assert [row["name"] for row in table] == names
    params = _params(student)
    for row in table:
        assert row["shape"] == list(params[row["name"]].shape)
        is_mlp = ".mlp." in row["name"]
        assert row["action"] == ("random" if is_mlp else "truncated"), row
        assert (row["source"] is None) == is_mlp
        assert row["frozen"] is False and params[row["name"]].requires_grad  # freeze_embeddings is off by default
    sources = {row["name"]: row["source"] for row in table}  # layers [0, 2, 3]: student 1 <- teacher 2
    if family == "gpt2":
        assert sources["transformer.h.1.ln_1.weight"] == "transformer.h.2.ln_1.weight"
    else:
        assert sources["model.layers.1.input_layernorm.weight"] == "model.layers.2.input_layernorm.weight"
    text = format_table(table)
    assert text.splitlines()[0].split() == ["name", "shape", "action", "frozen", "source"]
    assert len(text.splitlines()) == len(table) + 2
    total = sum(p.numel() for p in student.parameters())
    assert f"{len(table)} tensors, {total:,} parameters" in text.splitlines()[-1]


def test_table_copied_vs_truncated_and_json_ready():
    import json

    teacher = make_tiny_lm("mistral")
    _, table = build_student(teacher, num_layers=2, intermediate_size=64, mlp_init="copy")
    actions = {row["name"]: row["action"] for row in table}
    assert actions["model.layers.0.self_attn.q_proj.weight"] == "copied"
    assert actions["model.layers.0.mlp.up_proj.weight"] == "truncated"
    assert actions["lm_head.weight"] == "copied"
    assert json.loads(json.dumps(table)) == table


def test_format_table_columns_and_counts():
    """One aligned line per tensor: name, shape, action, "yes" where frozen, source ("-" for a random one); then the
    parameters per action and, among them, the frozen ones (not counted twice in the total)."""
    table = [{"name": "emb", "shape": [10, 4], "source": "t.emb", "action": "copied", "frozen": True},
             {"name": "layers.0.attn", "shape": [3, 4], "source": "t.layers.2.attn", "action": "truncated",
              "frozen": False},
             {"name": "layers.0.mlp", "shape": [5], "source": None, "action": "random", "frozen": False}]
    lines = format_table(table).splitlines()
    assert [line.split() for line in lines[:-1]] == [
        ["name", "shape", "action", "frozen", "source"], ["emb", "10x4", "copied", "yes", "t.emb"],
        ["layers.0.attn", "3x4", "truncated", "t.layers.2.attn"], ["layers.0.mlp", "5", "random", "-"]]
    starts = [lines[0].index(column) for column in ("shape", "action", "frozen", "source")]
    assert [lines[1].index(cell) for cell in ("10x4", "copied", "yes", "t.emb")] == starts
    assert lines[3].index("-") == starts[3]
    assert lines[-1] == "3 tensors, 57 parameters: 40 copied, 12 truncated, 5 random, 40 frozen"


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("family", FAMILIES)
def test_student_saves_and_loads_as_plain_hf_model(tmp_path, family):
    from transformers import AutoModelForCausalLM

    teacher = make_tiny_lm(family)
    student, _ = build_student(teacher, num_layers=2, hidden_size=32, intermediate_size=40)
    student.save_pretrained(tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert type(loaded) is type(teacher) and loaded.dtype == torch.float32
    sizes = (loaded.config.num_hidden_layers, loaded.config.hidden_size, loaded.config.intermediate_size
             if family != "gpt2" else loaded.config.n_inner)
    assert sizes == (2, 32, 40)
    ids = _ids(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student.eval()(ids).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, message", [
    ({"mlp_init": "zeros"}, r"mlp_init='zeros': use one of random, copy"),
    ({"num_layers": 5}, r"num_layers=5 but the teacher has 4 layers"),  # tailkd.sizing's refusals reach the builder
    ({"hidden_size": 30}, r"hidden_size=30 is not divisible by num_heads=4"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(TailkdError, match=message):
        build_student(make_tiny_lm("llama"), **kwargs)


def test_gpt2_attention_scaled_by_layer_index_keeps_the_first_layers_only():
    """GPT-2's scale_attn_by_inverse_layer_idx divides layer i's attention scores by i + 1 (Stanford CRFM's GPT-2s):
    a student's layer j would divide teacher layer layers[j]'s by j + 1 instead, a silently different layer, so any
    choice but the first n layers is refused with one line; the first n layers are the teacher's own (bit for bit
    the logits of transformers' GPT-2 with those layers)."""
    from transformers import GPT2LMHeadModel

    teacher = make_tiny_lm("gpt2", scale_attn_by_inverse_layer_idx=True)
    for kwargs in ({"layers": [1, 2, 3]}, {"num_layers": 2}):
        with pytest.raises(TailkdError, match=r"^the teacher divides layer i's attention scores by i \+ 1 "
                                              r"\(scale_attn_by_inverse_layer_idx\).*--student\.layers 0 1") as err:
            build_student(teacher, **kwargs)
        assert "\n" not in str(err.value)
    student, _ = build_student(teacher, layers=[0, 1], mlp_init="copy")
    config = teacher.config.to_dict() | {"n_layer": 2}
    reference = GPT2LMHeadModel(type(teacher.config).from_dict(config)).eval()
    reference.load_state_dict(teacher.state_dict(), strict=False)  # layers 2, 3 of the teacher: unexpected keys
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(student.eval()(ids).logits, reference(ids).logits)


def test_unsupported_architecture():
    from transformers import AutoModelForCausalLM, XGLMConfig

    model = AutoModelForCausalLM.from_config(XGLMConfig(d_model=32, num_layers=1, attention_heads=2, ffn_dim=64,
                                                        max_position_embeddings=64, vocab_size=64))
    with pytest.raises(TailkdError,
                       match=r"XGLMForCausalLM: supported teachers are LlamaForCausalLM.*GPT2LMHeadModel"):
        build_student(model)


def test_a_parameter_without_a_copy_rule_is_refused():
    """A student parameter its family's table does not name is refused in one line, never left at its random init:
    GPT-2 with cross-attention (a decoder of an encoder-decoder) has crossattention.* weights no table lists."""
    teacher = make_tiny_lm("gpt2", add_cross_attention=True)
    with pytest.raises(TailkdError, match=r"^student parameter transformer\.h\.0\.crossattention\.\S+ has no copy rule "
                                          r"\(an unsupported variant of a supported architecture\?\)"):
        build_student(teacher, num_layers=2)


def test_a_quantized_teacher_is_refused_and_its_setting_is_not_the_students():
    """build_student refuses a quantized teacher (a quantization_config, or transformers' hf_quantizer) in one line;
    the config student_config plans from it (no weights read) carries no quantization_config: the student's weights
    are plain float32."""
    quantized = make_tiny_lm("llama")
    quantized.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    with_quantizer = make_tiny_lm("llama")
    with_quantizer.hf_quantizer = object()
    for teacher in (quantized, with_quantizer):
        with pytest.raises(TailkdError, match=r"^the teacher is a quantized model: load it with "
                                              r"tailkd\.models\.load_teacher, which dequantizes GGUF files"):
            build_student(teacher, num_layers=2)
    assert getattr(student_config(quantized, num_layers=2), "quantization_config", None) is None


# --------------------------------------------------------------------------- the real built-in teacher


@pytest.mark.slow
def test_six_layer_student_from_smollm2(smollm2):
    from tailkd.vocab import check_vocab

    teacher, tok = smollm2
    student, table = build_student(teacher, num_layers=6, freeze_embeddings=True)
    assert [row["source"] for row in table if row["name"].endswith("q_proj.weight")] == [
        f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 6, 12, 17, 23, 29)]
    total = sum(p.numel() for p in student.parameters())
    assert 45e6 < total < 55e6  # ~50M, of which 28.3M tied embeddings (frozen)
    assert check_vocab(tok, tok, teacher, student) == 49152
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(student(ids).logits).all()

    full, _ = build_student(teacher, mlp_init="copy")  # all 30 layers, copied: the teacher itself
    with torch.no_grad():
        assert torch.equal(full.eval()(ids).logits, teacher(ids).logits)


# --------------------------------------------------------------------------- generation settings


def test_student_keeps_the_teachers_generation_config(tmp_path):
    """The student shares the teacher's tokenizer, so it stops and samples as the teacher does: it takes the teacher's
    generation_config (an instruct model's end-of-turn id among several eos ids, sampling defaults) rather than one
    derived from the config, which kept config.json's single eos id only (Gemma-2-it: 1, not [1, 107]), so that
    ``generate`` on the saved student ran past the end of a turn. Also for the skeleton an FSDP-sharded teacher builds
    the student from (`tailkd.sharded_teacher.student_source`), which is read from the folder."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tailkd.config import StudentConfig
    from tailkd.sharded_teacher import student_source

    teacher = make_tiny_lm("llama")
    teacher.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=[0, 7], do_sample=True,
                                                 temperature=0.7, top_p=0.8)
    teacher.save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    skeleton, _ = student_source(tmp_path / "teacher", StudentConfig(num_layers=2))
    for source in (teacher, skeleton):
        student, _ = build_student(source, num_layers=2)
        student.save_pretrained(tmp_path / "student")
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "student").generation_config
        for config in (student.generation_config, saved):
            got = (config.eos_token_id, config.do_sample, config.temperature, config.top_p)
            assert got == ([0, 7], True, 0.7, 0.8)
        assert student.generation_config is not source.generation_config  # a copy: the student's own


def test_freeze_embeddings_of_a_loaded_student_of_any_causal_lm():
    """``--student DIR --student.freeze_embeddings true`` freezes the input embeddings of any causal LM (continued
    pretraining takes any student), not only of the families a student can be built from: a GPT-NeoX student was
    refused with 'cannot build a student from a GPTNeoXForCausalLM: supported teachers are ...', though nothing is
    built. The family tables still name the embeddings where they know more (GPT-2: token and position)."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from tailkd.student import freeze_student_embeddings

    for tied in (False, True):
        model = AutoModelForCausalLM.from_config(GPTNeoXConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=TINY_VOCAB,
            tie_word_embeddings=tied))
        assert freeze_student_embeddings(model) == ["gpt_neox.embed_in.weight"]
        frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        assert frozen == {"gpt_neox.embed_in.weight"} | ({"lm_head.weight"} if tied else set())
    gpt2 = make_tiny_lm("gpt2")
    assert freeze_student_embeddings(gpt2) == ["transformer.wte.weight", "transformer.wpe.weight"]
