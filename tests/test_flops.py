"""tailkd.flops and `tailkd flops`: parameter counts, the counting rules, the paper's Table 3 ballpark."""

import errno
import json
import re
from pathlib import Path

import pytest
from test_evaluate import one_line_error

from tailkd.cli import main
from tailkd.errors import TailkdError
from tailkd.flops import (
    SCORE_FLOPS_PER_VOCAB,
    ModelSize,
    distill_flops,
    format_method_table,
    method_table,
    model_flops_per_token,
    model_size,
)
from tailkd.registry import CLM_FLOPS_PER_VOCAB, LOSSES

# Qwen1.5-1.8B's config.json (the paper's Table 3 teacher), and a 1.2B-parameter student of the same width
# and vocabulary: 18 layers and a tied head give 1.22B parameters, 0.91B of them non-embedding (the paper:
# "1.2B ... approximately 1B active (non-embedding) parameters").
QWEN_1_8B = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
             "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
             "tie_word_embeddings": False, "max_position_embeddings": 32768}
QWEN_1_2B = {**QWEN_1_8B, "num_hidden_layers": 18, "tie_word_embeddings": True}


def llama_nonembedding(d, ffn, layers, heads, kv_heads):
    hd = d // heads
    per_layer = d * d + 2 * d * kv_heads * hd + d * d + 3 * d * ffn + 2 * d  # q, k+v, o, gated MLP, two norms
    return layers * per_layer + d  # + the final norm


def test_parameter_count_of_a_model_and_of_its_config(tiny_lm):
    model = tiny_lm()  # d 64, 4 layers, 4 heads / 2 KV heads, MLP 128, vocab 262, untied
    expected = llama_nonembedding(64, 128, 4, 4, 2)
    from_model = model_size(model)
    from_config = model_size(model.config.to_dict())
    assert from_model.params_nonembedding == from_config.params_nonembedding == expected
    assert from_model.params_total == expected + 2 * 262 * 64  # embedding + untied head
    tied = model_size(tiny_lm(tie_word_embeddings=True))
    assert tied.params_nonembedding == expected and tied.params_total == expected + 262 * 64


def test_forward_flops_per_token_follow_the_documented_rule(tiny_lm):
    f = model_flops_per_token(tiny_lm(), seq_len=32)
    n = llama_nonembedding(64, 128, 4, 4, 2)
    assert f["matmul"] == 2 * n and f["head"] == 2 * 64 * 262 and f["attention"] == 2 * 4 * 32 * 64
    assert f["forward"] == f["matmul"] + f["head"] + f["attention"]
    assert model_flops_per_token(tiny_lm())["attention"] == 0  # no seq_len: no attention term


def test_distill_flops_keys_and_arithmetic(tiny_lm):
    teacher, student = tiny_lm(), tiny_lm(num_hidden_layers=2)
    tokens, seq = 1000, 32
    t = model_flops_per_token(teacher, seq_len=seq)
    s = model_flops_per_token(student, seq_len=seq)
    d = distill_flops(teacher, student, tokens, seq_len=seq, loss="kd")
    assert d["teacher_forward"] == tokens * t["forward"]
    assert d["student_forward_backward"] == tokens * 3 * s["forward"]
    assert d["loss_layer"] == tokens * (LOSSES["kd"].flops_per_vocab + CLM_FLOPS_PER_VOCAB) * 262
    assert d["total"] == d["teacher_forward"] + d["student_forward_backward"] + d["loss_layer"]
    assert d["per_token"] == pytest.approx(d["total"] / tokens)
    assert d["pflops_per_1m_tokens"] == pytest.approx(d["per_token"] * 1e6 / 1e15)
    assert json.loads(json.dumps(d)) == d  # summary.json-ready
    tad = distill_flops(teacher, student, tokens, seq_len=seq, loss="tad")
    assert d["total"] < tad["total"] < 1.05 * d["total"]
    clm = distill_flops(None, student, tokens, seq_len=seq, loss="clm")
    assert clm["teacher_forward"] == 0 and clm["teacher"] is None
    # freeze_embeddings freezes the input embeddings: an untied head (this student's) still has its weight
    # gradient, a tied one is frozen with them and its 2·d·V per token is not spent
    assert not s["tied"]
    frozen = distill_flops(teacher, student, tokens, seq_len=seq, loss="kd", freeze_embeddings=True)
    assert frozen["total"] == d["total"]
    tied = tiny_lm(num_hidden_layers=2, tie_word_embeddings=True)
    assert model_flops_per_token(tied)["tied"]
    tied_d = distill_flops(teacher, tied, tokens, seq_len=seq, loss="kd")
    tied_frozen = distill_flops(teacher, tied, tokens, seq_len=seq, loss="kd", freeze_embeddings=True)
    assert tied_d["total"] - tied_frozen["total"] == tokens * s["head"]
    assert model_size(QWEN_1_2B).tied and not model_size(QWEN_1_8B).tied  # from configs, counted on meta


def test_kd_on_qwen_sizes_is_in_the_ballpark_of_table_3():
    kd = distill_flops(QWEN_1_8B, QWEN_1_2B, 1e6, seq_len=2048, loss="kd")
    assert kd["student"]["params_total"] == pytest.approx(1.2e9, rel=0.1)
    assert kd["student"]["params_nonembedding"] == pytest.approx(1.0e9, rel=0.1)
    # Table 3's cells are not in our copy of the paper (docs/evaluation.md): the ballpark is Kaplan et al.'s 6N per
    # trained token and 2N per forward token, N the weights a token multiplies (the input embedding is a lookup):
    # student 1.22e9 (tied: its embedding is the head), teacher 1.84e9 - 0.31e9 = 1.53e9 -> 10.4 PF per 1M tokens;
    # attention over 2048-token rows and the loss layer add a few percent, no more than 10
    rule = (6 * kd["student"]["params_total"] + 2 * (kd["teacher"]["params_total"] - 151936 * 2048)) / 1e9
    assert rule == pytest.approx(10.38, abs=0.01)
    assert rule < kd["pflops_per_1m_tokens"] < 1.1 * rule
    tad = distill_flops(QWEN_1_8B, QWEN_1_2B, 1e6, seq_len=2048, loss="tad")
    assert tad["pflops_per_1m_tokens"] / kd["pflops_per_1m_tokens"] < 1.01


def test_method_table_orders_the_methods_as_the_paper():
    rows = {r["method"].split(" (")[0]: r for r in method_table(QWEN_1_8B, QWEN_1_2B, seq_len=2048)}
    kd = rows["Vanilla KD"]["total"]
    assert rows["CLM"]["total"] < kd <= rows["TAD"]["total"] < 1.01 * kd
    assert 1.2 < rows["MiniPLM"]["vs_kd"] < 1.7  # paper: 33% to 50% more than vanilla KD
    assert rows["MiniLLM"]["total"] > 2 * kd
    # SeqKD: teacher generation with a KV cache costs about a forward per token, so in FLOPs it is close to KD
    assert 0.7 < rows["SeqKD"]["vs_kd"] < 1.3
    d_small = method_table(QWEN_1_8B, QWEN_1_2B, seq_len=2048, delta=0.25)
    assert d_small[3]["total"] > rows["MiniPLM"]["total"]
    # a reference of another vocabulary (the paper's OPT-125M: 50272 rows) pays its log-softmax over its own
    opt = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "vocab_size": 50272, "tie_word_embeddings": True}
    with_ref = {r["method"].split(" (")[0]: r for r in method_table(QWEN_1_8B, QWEN_1_2B, seq_len=2048,
                                                                    reference_cfg=opt, tokens=1.0)}
    clm = CLM_FLOPS_PER_VOCAB * 151936
    assert with_ref["MiniPLM"]["loss"] == pytest.approx(SCORE_FLOPS_PER_VOCAB * (151936 + 50272) / 0.5 + clm, rel=1e-12)
    assert with_ref["MiniPLM"]["other"] == pytest.approx(model_flops_per_token(opt, seq_len=2048)["forward"] / 0.5)


def test_minillm_teacher_scores_with_its_own_vocabulary_only():
    """MiniLLM has no reference model: per trained token its teacher runs a forward over the P + G tokens and a
    log-softmax + gather (SCORE_FLOPS_PER_VOCAB) over the teacher's V. The MiniPLM reference (its model, its size, its
    vocabulary) must not change the MiniLLM row; its scoring cost was added to MiniLLM's teacher column too.
    Sizes are integers and halves far below 2⁵³ (exact sums); the one division by P + G is within an ulp."""
    teacher = ModelSize("t", 1000.0, hidden=8, vocab=50, layers=3, attn_dim=6)
    student = ModelSize("s", 300.0, hidden=4, vocab=50, layers=2, attn_dim=4)
    opt = ModelSize("r", 500.0, hidden=4, vocab=70, layers=1)
    prompt, gen = 5, 7
    seq = prompt + gen
    forward = 2 * 1000 + 2 * 8 * 50 + 4 * 3 * 6 * seq / 2  # 2N + 2dV + Kaplan's attention over P + G
    rows = [{r["method"].split(" (")[0]: r for r in method_table(teacher, student, seq_len=16, tokens=1.0,
                                                                 prompt_len=prompt, gen_len=gen, **ref)}["MiniLLM"]
            for ref in ({}, {"reference_params": 3e6}, {"reference_cfg": opt})]
    assert rows[0]["teacher"] == pytest.approx(forward + SCORE_FLOPS_PER_VOCAB * 50, rel=1e-15)
    assert rows[1] == rows[0] and rows[2] == rows[0]


def test_generation_rows_and_vs_kd_equal_plain_sums_over_the_decode_steps():
    """SeqKD and MiniLLM per trained token, summed step by step from the documented rules (one forward of a token
    whose query attends c keys: 2N + 2dV + 4·n_layer·c·d_attn; a prefill of P tokens at Kaplan's c = P/2; decode step
    g at c = P + g plus sampling 5·V; training 3·F at Kaplan's c = (P + G)/2; the loss layer (c_loss + c_clm)·V),
    and vs_kd = total / vanilla KD's total. Integers and halves far below 2⁵³ add exactly; one division per row."""
    t = ModelSize("t", 1000.0, hidden=8, vocab=50, layers=3, attn_dim=6)
    s = ModelSize("s", 300.0, hidden=4, vocab=50, layers=2, attn_dim=4)
    prompt, gen, epochs, seq_len = 5, 7, 3, 16
    seq = prompt + gen

    def forward(m, keys):
        return 2 * m.params_nonembedding + 2 * m.hidden * m.vocab + 4 * m.layers * keys * m.attn_dim

    def generation(m):
        total = prompt * forward(m, prompt / 2)
        for g in range(gen):
            total += forward(m, prompt + g) + 5 * m.vocab
        return total

    def loss(name):
        return (LOSSES[name].flops_per_vocab + CLM_FLOPS_PER_VOCAB) * 50

    rows = {r["method"].split(" (")[0]: r for r in method_table(t, s, seq_len=seq_len, tokens=1.0, prompt_len=prompt,
                                                                gen_len=gen, ppo_epochs=epochs)}
    train = 3 * forward(s, seq / 2)
    want = {"SeqKD": (generation(t) / seq, train, 0.0, CLM_FLOPS_PER_VOCAB * 50),
            "MiniLLM": (forward(t, seq / 2) + 5 * 50, forward(s, seq / 2) + epochs * train + train,
                        generation(s) / seq, (epochs + 1) * loss("rkl"))}
    for method, (teacher, student, other, loss_layer) in want.items():
        got = rows[method]
        for key, value in zip(("teacher", "student", "other", "loss"), (teacher, student, other, loss_layer)):
            assert got[key] == pytest.approx(value, rel=1e-15), (method, key)
    kd = forward(t, seq_len / 2) + 3 * forward(s, seq_len / 2) + loss("kd")
    assert rows["Vanilla KD"]["total"] == kd and rows["Vanilla KD"]["vs_kd"] == 1.0
    for method, row in rows.items():
        assert row["vs_kd"] == pytest.approx(row["total"] / kd, rel=1e-15), method
    assert rows["TAD"]["vs_kd"] != 1.0  # the KD row, not TAD's, is the denominator (their loss layers differ)


def test_shared_experts_count_fully_and_only_modules_named_experts_are_routed():
    """The module docstring's rule: of the weights under a module named ``experts`` a token passes through k/E;
    shared experts (DeepSeek's ``shared_experts``) and the router count fully. A hand-built model: N by plain
    counting."""
    import torch

    d, vocab, e, k = 4, 10, 4, 1

    class Tiny(torch.nn.Module):
        config = type("Cfg", (), {"hidden_size": d, "num_attention_heads": 1, "num_hidden_layers": 1,
                                  "vocab_size": vocab, "num_experts_per_tok": k, "n_routed_experts": e})()

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, d)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(d, d, bias=False) for _ in range(e))
            self.shared_experts = torch.nn.Linear(d, d, bias=False)
            self.gate = torch.nn.Linear(d, e, bias=False)
            self.head = torch.nn.Linear(d, vocab, bias=False)

        def get_output_embeddings(self):
            return self.head

    size = model_size(Tiny())
    routed, shared, router = e * d * d, d * d, d * e
    assert size.params_nonembedding == routed * k / e + shared + router
    assert size.experts == (k, e) and size.params_total == routed + shared + router + 2 * vocab * d


# A mixture of experts: each token passes through k = 2 of E = 8 experts (gated MLPs of 3·d·ffn weights each)
MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "num_local_experts": 8,
           "num_experts_per_tok": 2, "tie_word_embeddings": False}


def test_a_mixture_of_experts_counts_the_experts_a_token_passes_through(tmp_path, capsys):
    d, ffn, layers, e, k = 64, 128, 2, 8, 2
    attention = d * d + 2 * d * 2 * 16 + d * d  # q, k+v (2 KV heads of 16), o; Mixtral has no biases
    dense = attention + 2 * d + e * d  # + two norms + the router
    size = model_size(MIXTRAL)
    assert size.experts == (k, e)
    assert size.params_nonembedding == layers * (dense + k * 3 * d * ffn) + d  # + the final norm
    assert size.params_total == layers * (dense + e * 3 * d * ffn) + d + 2 * 100 * d
    assert model_flops_per_token(MIXTRAL)["matmul"] == 2 * size.params_nonembedding
    # Qwen2-MoE: the routed experts count k/E, its shared expert (and its gate) in full
    qwen_moe = {"model_type": "qwen2_moe", "hidden_size": d, "intermediate_size": 96, "num_hidden_layers": layers,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "num_experts": e,
                "num_experts_per_tok": k, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                "decoder_sparse_step": 1, "mlp_only_layers": []}
    q = model_size(qwen_moe)
    assert q.experts == (k, e)
    assert q.params_total - 2 * 100 * d - q.params_nonembedding == layers * (e - k) * 3 * d * 32
    # a dense model is unchanged
    assert model_size(QWEN_1_2B).experts == (0, 0)
    (tmp_path / "t.json").write_text(json.dumps(MIXTRAL))
    (tmp_path / "s.json").write_text(json.dumps({**MIXTRAL, "num_hidden_layers": 1}))
    assert main(["flops", "--teacher", str(tmp_path / "t.json"), "--student", str(tmp_path / "s.json"),
                 "--seq-len", "32"]) == 0
    assert "(active: 2 of 8 experts)" in capsys.readouterr().out


def test_experts_per_token_listed_per_layer_count_each_layers_own():
    """HunYuan-MoE's moe_topk may list each layer's k (its layer i reads entry i): N counts k_i/E of layer i's experts,
    by plain counting over the built model, and the report gives k as their mean (it had counted a dense model)."""
    import torch
    import transformers

    d, layers, e, topk = 64, 5, 4, [2, 1, 2, 2, 1]
    cfg = {"hidden_size": d, "intermediate_size": 40, "num_hidden_layers": layers, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100, "num_experts": e, "moe_topk": topk,
           "tie_word_embeddings": False}
    size = model_size({"model_type": "hunyuan_v1_moe", **cfg})
    config = transformers.AutoConfig.for_model("hunyuan_v1_moe", **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    want = 0.0
    for name, p in model.named_parameters():
        parts = name.split(".")
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            want += p.numel() * (topk[int(parts[2])] / e if "experts" in parts[:-1] else 1)
    assert size.experts == (sum(topk) / layers, e)
    assert size.params_nonembedding == pytest.approx(want, rel=1e-12)  # float64 sums of ~1e5 of integers


def test_dbrx_reads_its_experts_from_its_ffn_config():
    """DBRX keeps k and E in its ffn_config (moe_top_k of moe_num_experts), its experts as three [E x ffn, d] tensors
    under ``ffn.experts``: N counts k/E of them, by plain counting."""
    d, ffn, layers, e, k, kv, vocab = 64, 40, 2, 4, 2, 2, 100
    dbrx = {"model_type": "dbrx", "d_model": d, "n_heads": 4, "n_layers": layers, "vocab_size": vocab,
            "attn_config": {"kv_n_heads": kv, "rope_theta": 1e4},
            "ffn_config": {"ffn_hidden_size": ffn, "moe_num_experts": e, "moe_top_k": k}}
    attention = d * (d + 2 * kv * 16) + d * d  # Wqkv (4 query heads of 16, 2 KV heads), out_proj; no biases
    dense = attention + 2 * d + e * d  # + two LayerNorms without biases + the router
    size = model_size(dbrx)
    assert size.experts == (k, e)
    assert size.params_nonembedding == layers * (dense + k * 3 * ffn * d) + d  # + the final norm
    assert size.params_total == layers * (dense + e * 3 * ffn * d) + d + 2 * vocab * d


def test_every_expert_active_is_still_a_mixture_of_experts():
    """k = E (each token passes through every expert): N counts all the experts' weights, as k/E = 1 says, and the
    model is reported as a mixture of E of E experts, not as a dense model ([0, 0])."""
    d, ffn, layers, e = 64, 128, 2, 8
    every = {**MIXTRAL, "num_experts_per_tok": e}
    f = model_flops_per_token(every)
    assert f["experts"] == [e, e]
    assert f["params_nonembedding"] == f["params_total"] - 2 * 100 * d  # untied: only the embedding and the head
    assert f["params_nonembedding"] == model_size(MIXTRAL).params_nonembedding + layers * (e - 2) * 3 * d * ffn


def test_attention_term_uses_heads_times_head_dim():
    """d_attn = heads × head_dim (module docstring), not the hidden size: a Qwen3 config with head_dim 32 and 4
    heads attends in 128 dimensions on a 64-wide residual stream: 2·n_layer·s·d_attn per token."""
    layers, heads, head_dim, s = 2, 4, 32, 16
    qwen3 = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
             "num_attention_heads": heads, "num_key_value_heads": 2, "head_dim": head_dim, "vocab_size": 100}
    f = model_flops_per_token(qwen3, seq_len=s)
    assert f["attn_dim"] == heads * head_dim
    assert f["attention"] == 2 * layers * s * heads * head_dim


def test_latent_attention_term_uses_its_query_and_value_head_sizes():
    """Multi-head latent attention (DeepSeek-V3): each head's QKᵀ spans qk_nope_head_dim + qk_rope_head_dim = 12
    dims and its AV v_head_dim = 20 (config.head_dim is the RoPE part alone, 4): 2·t·4·12 + 2·t·4·20 FLOPs per layer
    at position t, d_attn = 4 × (12 + 20) / 2 = 64; a head count giving an odd 4·(...) keeps the half."""
    layers, s = 2, 16
    dsv3 = {"model_type": "deepseek_v3", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "n_group": 1, "topk_group": 1, "q_lora_rank": 24, "kv_lora_rank": 16,
            "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 20, "vocab_size": 100}
    f = model_flops_per_token(dsv3, seq_len=s)
    assert f["attn_dim"] == 64
    assert f["attention"] == layers * (2 * (s / 2) * 4 * 12 + 2 * (s / 2) * 4 * 20)  # QKᵀ + AV over s/2 keys
    odd = model_flops_per_token({**dsv3, "num_attention_heads": 3, "num_key_value_heads": 3, "v_head_dim": 21},
                                seq_len=s)
    assert odd["attn_dim"] == 3 * 33 / 2


def test_value_heads_of_their_own_size_count_av_over_them():
    """MiMo-V2-Flash's heads: QKᵀ over head_dim = 12 dims, AV over v_head_dim = 8 (its v_proj and o_proj hold heads
    of 8): 2·t·4·12 + 2·t·4·8 FLOPs per layer at position t, d_attn = 4 × (12 + 8) / 2 = 40, not heads × head_dim
    = 48 (which it counted before); its sliding layers over their window as every family's."""
    from transformers import MiMoV2FlashConfig

    kinds, s, w = ["full_attention", "sliding_attention", "sliding_attention"], 32, 8
    cfg = MiMoV2FlashConfig(vocab_size=100, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=12, v_head_dim=8, n_routed_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=40, intermediate_size=64, sliding_window=w,
                            layer_types=kinds, mlp_layer_types=["dense", "sparse", "sparse"])
    m = model_flops_per_token(cfg, seq_len=s)
    keys = [s / 2 if kind == "full_attention" else w - w * w / (2 * s) for kind in kinds]
    assert m["attn_dim"] == 40
    assert m["attention"] == pytest.approx(sum(2 * k * 4 * 12 + 2 * k * 4 * 8 for k in keys), rel=1e-15)
    odd = model_flops_per_token({**cfg.to_dict(), "num_attention_heads": 3, "v_head_dim": 9}, seq_len=s)
    assert odd["attn_dim"] == 3 * 21 / 2


def test_method_table_default_reference_is_the_cli_default():
    """Without a reference, method_table's MiniPLM reference is the ``--reference-params`` default of ``tailkd flops``
    (command_config: 125e6 parameters, 2·P FLOPs per scored token, 1/δ scored tokens per trained token)."""
    from tailkd.command_config import FlopsOptions

    p_ref = FlopsOptions().reference_params
    rows = {r["method"].split(" (")[0]: r for r in method_table(QWEN_1_8B, QWEN_1_2B, seq_len=64, tokens=1.0)}
    assert rows["MiniPLM"]["other"] == pytest.approx(2 * p_ref / 0.5, rel=1e-12)


def test_sliding_window_layers_attend_at_most_their_window():
    from tailkd.flops import _decode_keys, _generation_per_sequence

    d_attn, w, s = 64, 8, 32
    mistral = {**MIXTRAL, "model_type": "mistral", "sliding_window": w}  # the window on every layer
    for key in ("num_local_experts", "num_experts_per_tok"):
        del mistral[key]
    full = {**mistral, "sliding_window": None}
    # (1/s)∫₀ˢ min(t, w) dt = w − w²/(2s) keys per layer in place of Kaplan's s/2
    assert model_flops_per_token(mistral, seq_len=s)["attention"] == 4 * d_attn * 2 * (w - w * w / (2 * s))
    assert model_flops_per_token(full, seq_len=s)["attention"] == 2 * 2 * s * d_attn
    assert model_flops_per_token(mistral, seq_len=w)["attention"] == model_flops_per_token(full, seq_len=w)[
        "attention"]  # rows no longer than the window: full attention
    # a window longer than the row (Mistral-7B v0.1: 4096 on rows of 2048) never binds: Kaplan's 2·n_layer·s·d_attn
    assert model_flops_per_token(mistral, seq_len=w // 2)["attention"] == 2 * 2 * (w // 2) * d_attn
    # layer_types marks which layers slide (Qwen2 here: the second of two)
    mixed = {**QWEN_1_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100, "use_sliding_window": True,
             "sliding_window": w, "layer_types": ["full_attention", "sliding_attention"]}
    m = model_flops_per_token(mixed, seq_len=s)
    assert m["windows"] == [0, w]
    assert m["attention"] == 4 * d_attn * (s / 2 + w - w * w / (2 * s))
    # decoding: Σ_g min(P + g, w) keys per sliding layer, as plain sums
    for window, prompt, gen in ((8, 3, 10), (8, 10, 4), (8, 0, 20), (0, 5, 7), (100, 5, 7)):
        cap = window or float("inf")
        assert _decode_keys(window, prompt, gen) == sum(min(prompt + g, cap) for g in range(gen))
    no_window = {**m, "windows": []}
    assert _generation_per_sequence(m, 4, 20) < _generation_per_sequence(no_window, 4, 20)
    # GPT-Neo: its attention_layers (from the run-length attention_types) mark the local layers, window_size keys each
    neo = {"model_type": "gpt_neo", "hidden_size": 64, "num_layers": 4, "num_heads": 4, "vocab_size": 100,
           "max_position_embeddings": 64, "window_size": w, "attention_types": [[["global", "local"], 1],
                                                                                [["local"], 2]]}
    m = model_flops_per_token(neo, seq_len=s)
    assert m["windows"] == [0, w, w, w]
    assert m["attention"] == 4 * d_attn * (s / 2 + 3 * (w - w * w / (2 * s)))


def test_the_printed_sizes_name_the_sliding_layers_and_their_window():
    """format_method_table's size line: of Qwen2's two layers the second slides (window 8): "1 with a sliding window
    of 8", not the count of all layers nor the full layer's 0."""
    mixed = {**QWEN_1_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100, "use_sliding_window": True,
             "sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}
    m = model_flops_per_token(mixed, seq_len=32)
    text = format_method_table(method_table(mixed, mixed, seq_len=32), m, m, tokens=1e6, seq_len=32)
    assert "V=100, 2 layers (1 with a sliding window of 8)" in text


QWEN3_NEXT = {"model_type": "qwen3_next", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100,
              "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
              "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
              "shared_expert_intermediate_size": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
              "linear_key_head_dim": 8, "linear_value_head_dim": 8}


def test_layers_without_attention_over_the_sequence_have_no_attention_term():
    """Qwen3-Next (three Gated DeltaNet layers of four, as its 36 of 48; no sliding_window in its config): only the
    full_attention layer attends, 4·d_attn·s/2 per token (it was 4 layers' worth: 4× too much); decoding likewise
    attends with that layer alone (Σ_g (P + g) keys, plain sums); the size line says so."""
    from tailkd.flops import _generation_per_sequence

    d_attn, s, prompt, gen = 4 * 16, 32, 5, 7
    m = model_flops_per_token(QWEN3_NEXT, seq_len=s)
    assert m["windows"] == [-1, -1, -1, 0]
    assert m["attention"] == 4 * d_attn * (s / 2)
    dense = {**m, "windows": []}  # the same sizes read as four full-attention layers
    keys_one_layer = sum(prompt + g for g in range(gen))
    assert _generation_per_sequence(dense, prompt, gen) - _generation_per_sequence(m, prompt, gen) == \
        pytest.approx(3 * (4 * d_attn * keys_one_layer + prompt * 4 * d_attn * prompt / 2), rel=1e-12)
    text = format_method_table(method_table(QWEN3_NEXT, QWEN3_NEXT, seq_len=s), m, m, tokens=1e6, seq_len=s)
    assert "V=100, 4 layers (3 without attention over the sequence)" in text


def test_recurrent_models_without_layer_kinds_have_no_attention_term():
    """RWKV's time mixing and xLSTM's mLSTM blocks are recurrent (no attention over the sequence) and their configs
    list no layer kinds: no attention term, the forward is 2·N + 2·d·V alone (it counted 2·n_layer·s·hidden before);
    xLSTM's layers are its num_blocks (its num_hidden_layers, 32 by default, is not what its model builds)."""
    from transformers import RwkvConfig, xLSTMConfig

    s = 32
    for cfg, layers in ((RwkvConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2), 2),
                        (xLSTMConfig(vocab_size=100, hidden_size=64, num_blocks=2, num_heads=4), 2)):
        m = model_flops_per_token(cfg, seq_len=s)
        assert m["layers"] == layers and m["windows"] == [-1] * layers
        assert m["attention"] == 0
        assert m["forward"] == 2 * m["params_nonembedding"] + 2 * m["hidden"] * m["vocab"]


def test_gpt2_sizes_come_from_its_own_config_names():
    """GPT-2's config calls d and the layers n_embd and n_layer. N by hand: per layer c_attn 3d²+3d, attn c_proj
    d²+d, c_fc 4d²+4d, mlp c_proj 4d²+d, two LayerNorms 4d; the final LayerNorm 2d (token and position embeddings
    are lookups); the head 2·d·V and attention 2·n_layer·s·d (d_attn = n_head × d/n_head = d)."""
    d, layers, vocab, s = 64, 3, 100, 16
    gpt2 = {"model_type": "gpt2", "n_embd": d, "n_layer": layers, "n_head": 4, "vocab_size": vocab, "n_positions": 32}
    f = model_flops_per_token(gpt2, seq_len=s)
    assert (f["hidden"], f["layers"], f["attn_dim"]) == (d, layers, d)
    assert f["params_nonembedding"] == layers * (12 * d * d + 13 * d) + 2 * d
    assert f["head"] == 2 * d * vocab and f["attention"] == 2 * layers * s * d


def test_clm_counts_no_teacher_even_when_one_is_given():
    """loss clm runs no teacher: a teacher passed anyway costs nothing (student 3·F_S + c_clm·V per token)."""
    t = ModelSize("t", 1000.0, hidden=8, vocab=50)
    s = ModelSize("s", 300.0, hidden=4, vocab=50)
    d = distill_flops(t, s, 10, seq_len=0, loss="clm")
    assert d["teacher"] is None and d["teacher_forward"] == 0
    assert d["total"] == 10 * (3 * (2 * 300 + 2 * 4 * 50) + CLM_FLOPS_PER_VOCAB * 50)


def test_a_tied_student_given_by_its_total_and_zero_tokens():
    """--student-params with --student-tied: N = total − V·d and the head is tied, so frozen embeddings skip its
    weight gradient 2·d·V; zero tokens are zero FLOPs (per_token 0, not an error)."""
    s = ModelSize.from_total("s", 1e6, vocab=100, hidden=10, tied=True)
    assert s.tied and s.params_nonembedding == 1e6 - 100 * 10
    plain = distill_flops(None, s, 1.0, seq_len=0, loss="clm")
    frozen = distill_flops(None, s, 1.0, seq_len=0, loss="clm", freeze_embeddings=True)
    assert plain["student_forward_backward"] - frozen["student_forward_backward"] == 2 * 10 * 100
    zero = distill_flops(None, s, 0, seq_len=0, loss="clm")
    assert zero["total"] == zero["per_token"] == 0


def test_model_size_from_total_parameters():
    s = ModelSize.from_total("t", 1.8e9, vocab=151936, hidden=2048)
    assert s.params_nonembedding == pytest.approx(1.8e9 - 2 * 151936 * 2048)
    assert ModelSize.from_total("t", 1e9, vocab=1000, hidden=100, tied=True).params_nonembedding == 1e9 - 1e5
    # a total that is all embeddings leaves no non-embedding weights (N = 0): refused, like one below them
    for total in (1e5, 1e5 - 1):
        with pytest.raises(TailkdError, match="cannot hold tied embeddings of 1000×100"):
            ModelSize.from_total("t", total, vocab=1000, hidden=100, tied=True)


def test_flops_cli_with_sizes_and_with_config_files(tmp_path, capsys):
    out = tmp_path / "flops.json"
    assert main(["flops", "--teacher-params", "1.8e9", "--student-params", "1.2e9", "--vocab", "151936",
                 "--hidden", "2048", "--teacher-layers", "24", "--student-layers", "18", "--student-tied",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("Vanilla KD", "TAD", "MiniPLM (δ=0.5)", "SeqKD (gen 256)", "MiniLLM (gen 256)"):
        assert name in printed
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["methods"]][:3] == ["CLM (no teacher)", "Vanilla KD", "TAD"]
    assert saved["teacher"]["params_nonembedding"] == 1.8e9 - 2 * 151936 * 2048  # untied
    assert saved["student"]["params_nonembedding"] == 1.2e9 - 151936 * 2048  # --student-tied
    assert 9.2 / 1.5 < saved["methods"][1]["pflops"] < 9.2 * 1.5
    (tmp_path / "t.json").write_text(json.dumps(QWEN_1_8B))
    (tmp_path / "s.json").write_text(json.dumps(QWEN_1_2B))
    out2 = tmp_path / "flops2.json"
    assert main(["flops", "--teacher", str(tmp_path / "t.json"), "--student", str(tmp_path / "s.json"),
                 "--gen-len", "64", "--delta", "0.25", "--out", str(out2)]) == 0
    rows = json.loads(out2.read_text())["methods"]
    assert rows[1]["total"] == pytest.approx(distill_flops(QWEN_1_8B, QWEN_1_2B, 1e6, seq_len=2048, loss="kd")["total"])
    assert "gen 64" in rows[4]["method"] and "δ=0.25" in rows[3]["method"]


def test_flops_cli_on_a_model_folder(tmp_path, tiny_lm, capsys):
    tiny_lm().save_pretrained(tmp_path / "m")
    assert main(["flops", "--teacher", str(tmp_path / "m"), "--student", str(tmp_path / "m"), "--seq-len", "64"]) == 0
    assert "N=0.1M non-embedding" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--student-params", "1e9", "--vocab", "1000", "--hidden", "64"], "--teacher"),
        (["--teacher-params", "1e9", "--student-params", "1e8"], "--vocab"),
        (["--teacher", "/nonexistent/config.json", "--student-params", "1e8", "--vocab", "9", "--hidden", "4"],
         "/nonexistent/config.json"),
        (["--teacher-params", "1e9", "--student-params", "1e8", "--vocab", "1000", "--hidden", "64", "--delta", "2"],
         "flops.delta=2.0 must be a finite number in (0, 1]"),
        (["--teacher-params", "1e5", "--student-params", "1e8", "--vocab", "1000", "--hidden", "64"], "embeddings"),
    ],
)
def test_flops_cli_errors_are_one_line(capsys, args, needle):
    assert main(["flops", *args]) == 2
    one_line_error(capsys.readouterr().err, needle)


def test_flops_of_a_config_nested_too_deeply_is_one_line(tmp_path, capsys):
    deep = tmp_path / "config.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # past Python's parser: a RecursionError
    assert main(["flops", "--teacher", str(deep), "--student-params", "1e8", "--vocab", "9", "--hidden", "4"]) == 2
    one_line_error(capsys.readouterr().err, f"cannot read a model config from {deep}: not valid JSON (nested too "
                                            "deeply to read)")


@pytest.mark.parametrize("content, needle", [
    (b'{"model_type": "llama", \xff}', "config.json is not UTF-8 text"),
    (b"[1]", "config.json is not a JSON object (it holds a list)"),
    (b'{"model_type": "llama", "hidden_size": "x"}', "Field 'hidden_size' expected int, got str"),
    (b'{"model_type": ["llama"]}', "unhashable type: 'list'"),  # a TypeError, exit 1
])
def test_flops_of_a_damaged_config_json_is_one_line(tmp_path, capsys, content, needle):
    """A config.json that is not UTF-8, not an object, or with a field of the wrong type (transformers 5 validates
    it: huggingface_hub's StrictDataclassFieldValidationError, whose first line does not say what is wrong) is one
    line naming the file; each was a bare exception line with exit 1."""
    bad = tmp_path / "config.json"
    bad.write_bytes(content)
    assert main(["flops", "--teacher", str(bad), "--student-params", "1e8", "--vocab", "9", "--hidden", "4"]) == 2
    err = capsys.readouterr().err
    one_line_error(err, needle)
    one_line_error(err, str(bad))


def test_flops_of_a_model_folder_with_a_field_of_the_wrong_type_is_one_line(tmp_path, tiny_lm, capsys):
    tiny_lm().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "hidden_size": "x"}))
    assert main(["flops", "--teacher", str(tmp_path / "m"), "--student", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    one_line_error(err, "Field 'hidden_size' expected int, got str")
    one_line_error(err, str(tmp_path / "m"))


def test_a_config_whose_layers_differ_is_one_line(tmp_path, tiny_lm, capsys):
    """transformers 5's per_layer_config (layers that differ): a config.json with it, which transformers cannot build
    a model from, and a model whose config gained one (read by the count as one value for every layer), are each
    one line naming the attribute and the sizes to give instead (they were transformers' RuntimeError, exit 1)."""
    from transformers import AutoConfig

    cfg = {**QWEN_1_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100,
           "per_layer_config": {"1": {"intermediate_size": 64}}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["flops", "--teacher", str(tmp_path / "config.json"), "--student-params", "1e8", "--vocab", "100",
                 "--hidden", "64"]) == 2
    one_line_error(capsys.readouterr().err, f"the config of {tmp_path / 'config.json'} sets intermediate_size per "
                                            "layer (per_layer_config): the FLOPs count needs one value for every "
                                            "layer; pass --*-params/--vocab/--hidden instead")
    model = tiny_lm()
    het = AutoConfig.for_model(**model.config.to_dict())
    het.per_layer_config = {1: {"hidden_size": 32}}  # the count reads one hidden_size (attention sizes: per layer)
    model.config = het
    with pytest.raises(TailkdError, match=r"^the config of m sets hidden_size per layer \(per_layer_config\)"):
        model_size(model, "m")


def test_layers_of_their_own_query_heads_count_each_its_own():
    """Laguna lists each layer's query heads (num_attention_heads_per_layer: 4, 2, 4, 4, 2 here, head_dim 16): its
    attention term is 4 Σ_l heads_l × head_dim × keys_l — before, every layer counted num_attention_heads (4)."""
    from transformers import LagunaConfig

    kinds, s, w = ["full_attention", "sliding_attention"] * 2 + ["full_attention"], 32, 8
    cfg = LagunaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=5, num_attention_heads=4,
                       num_attention_heads_per_layer=[4, 2, 4, 4, 2], num_key_value_heads=2, head_dim=16,
                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, sliding_window=w,
                       layer_types=kinds)
    m = model_flops_per_token(cfg, seq_len=s)
    dims = [16 * h for h in (4, 2, 4, 4, 2)]
    keys = [s / 2 if kind == "full_attention" else w - w * w / (2 * s) for kind in kinds]
    assert m["attn_dims"] == dims and m["attn_dim"] == sum(dims) / 5
    assert m["attention"] == pytest.approx(4 * sum(d * k for d, k in zip(dims, keys)), rel=1e-15)


def test_layers_that_differ_in_attention_count_each_its_own():
    """Gemma 4 (transformers 5's per_layer_config): its full attention layers have heads of global_head_dim (32 here,
    16 in its sliding ones), so its attention term is 4 Σ_l heads × head_dim_l × keys_l, each layer with its own window
    — by plain sums, training rows and generation alike; its parameters as built (KV-shared layers without k/v
    projections, their MLPs twice as wide). Before, the count refused it (one head_dim for every layer), and a `tailkd
    distill` run of a Gemma 4 teacher failed after its last step."""
    from transformers import Gemma4TextConfig

    from tailkd.flops import _decode_keys, _generation_per_sequence

    sliding, full, w, s, heads = "sliding_attention", "full_attention", 8, 32, 4
    kinds = [sliding, sliding, full, sliding, full]
    cfg = Gemma4TextConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                           num_attention_heads=heads, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                           sliding_window=w, layer_types=kinds, hidden_size_per_layer_input=8,
                           vocab_size_per_layer_input=100, num_kv_shared_layers=2, use_double_wide_mlp=True)
    m = model_flops_per_token(cfg, seq_len=s)
    dims = [heads * (32 if kind == full else 16) for kind in kinds]
    assert m["attn_dims"] == dims and m["windows"] == [w, w, 0, w, 0]
    keys = [w - w * w / (2 * s) if kind == sliding else s / 2 for kind in kinds]
    assert m["attention"] == pytest.approx(4 * sum(d * k for d, k in zip(dims, keys)), rel=1e-15)
    assert m["attn_dim"] == sum(dims) / len(dims)
    # generation: per layer Σ_g min(P + g, w) keys (full layers: P + g), at its own d_attn
    prompt, gen = 5, 12
    decode_keys = [sum(min(prompt + g, w if kind == sliding else 10**9) for g in range(gen)) for kind in kinds]
    assert [_decode_keys(x, prompt, gen) for x in m["windows"]] == decode_keys
    attention = (prompt * 4 * sum(d * (w - w * w / (2 * prompt) if w < prompt else prompt / 2)
                                  for d in dims)
                 + 4 * sum(d * k for d, k in zip(dims, decode_keys)))
    plain = prompt * (m["matmul"] + m["head"]) + gen * (m["matmul"] + m["head"] + 5 * m["vocab"]) + attention
    assert _generation_per_sequence(m, prompt, gen) == pytest.approx(plain, rel=1e-15)
    # the parameters: layers 3 and 4 share layers 1's and 2's keys and values (no k/v projections or norms) and their
    # MLPs are 192 wide; the per-layer embeddings' projection (64 -> 5 x 8) and every layer's gate in and out of it
    d, hd, g = 64, [16, 16, 32, 16, 32], 8
    attention_params = sum(heads * h * d * 2 + (0 if i >= 3 else 2 * 2 * h * d + h) + h for i, h in enumerate(hd))
    mlp = sum(3 * d * (192 if i >= 3 else 96) for i in range(5))
    per_layer_input = 5 * (2 * d * g + d) + d * 5 * g + g
    norms = 5 * 4 * d + d
    assert m["params_nonembedding"] == attention_params + mlp + per_layer_input + norms


def test_flops_out_is_never_half_written(tmp_path, monkeypatch, capsys):
    """A write that fails half-way (a full disk: ENOSPC after 10 characters) leaves no file at --out (it left the
    10 characters), and the command reports it in one line with exit 1; the old file, if any, stays whole."""
    out = tmp_path / "flops.json"
    args = ["flops", "--teacher-params", "1.8e9", "--student-params", "1.2e9", "--vocab", "151936", "--hidden",
            "2048", "--teacher-layers", "24", "--student-layers", "18", "--out", str(out)]
    real = Path.write_text

    def full_disk(self, data, *a, **kw):
        real(self, data[:10], *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(args) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Path, "write_text", real)
    assert main(args) == 0
    whole = out.read_text()
    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(args) == 1 and out.read_text() == whole and list(tmp_path.iterdir()) == [out]


def test_flops_of_the_builtin_reads_its_config_not_its_weights(monkeypatch):
    """`flops --teacher smollm2` sizes the built-in from the config of its safetensors copy, as its help says (no
    weights read: it loaded the whole model); SmolLM2-135M: d = 576, 30 layers, V = 49152, 134.5M parameters."""
    from tailkd import models
    from tailkd.flops import size_from_spec

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("the weights were loaded"))
    s = size_from_spec("smollm2")
    assert (s.hidden, s.vocab, s.layers, s.params_total) == (576, 49152, 30, 134515008)


def test_flops_command_passes_every_size_setting_to_the_table(tmp_path, capsys):
    """`commands.flops` builds the table from every setting given: a narrower student (--student-hidden), tied
    heads, frozen embeddings and a --reference model each change the FLOPs, so the table must equal method_table's
    for the sizes built by hand (the student at --hidden, no reference and no frozen embeddings each survived the
    mutation audit: the CLI tests give none of them)."""
    from tailkd import commands
    from tailkd.command_config import FlopsConfig, FlopsOptions
    from tailkd.flops import size_from_spec, size_to_dict

    reference = tmp_path / "r.json"
    reference.write_text(json.dumps(QWEN_1_2B))
    f = FlopsOptions(teacher_params=1.8e9, student_params=3e8, vocab=151936, hidden=2048, student_hidden=1024,
                     teacher_layers=24, student_layers=12, teacher_tied=True, student_tied=True,
                     freeze_embeddings=True, reference=str(reference))
    got = commands.flops(FlopsConfig(flops=f).validate())
    teacher = ModelSize.from_total("teacher", 1.8e9, vocab=151936, hidden=2048, layers=24, tied=True)
    student = ModelSize.from_total("student", 3e8, vocab=151936, hidden=1024, layers=12, tied=True)
    assert got["teacher"] == size_to_dict(teacher) and got["student"] == size_to_dict(student)
    assert got["methods"] == method_table(teacher, student, seq_len=2048, tokens=1e6, delta=0.5,
                                          reference_cfg=size_from_spec(str(reference)), prompt_len=128, gen_len=256,
                                          ppo_epochs=4, freeze_embeddings=True)
    assert "Vanilla KD" in capsys.readouterr().out


def test_a_model_counted_from_its_modules_with_gpt2_names_and_a_padded_head():
    """A model counted from its modules (remote code: no transformers class) whose config names d, the layers and the
    heads as GPT-2's does (n_embd, n_layer, n_head; no transformers attribute map from hidden_size & co.) and whose
    head has more rows than its config's vocab_size (padded to a multiple of 8): d, the layers and d_attn come from
    GPT-2's names, V from the head's rows (the 2·d·V the token pays is the head's matmul). N by plain counting."""
    import torch

    d, layers, heads, vocab, rows, s = 8, 3, 2, 10, 16, 4

    class Remote(torch.nn.Module):
        config = type("Cfg", (), {"n_embd": d, "n_layer": layers, "n_head": heads, "vocab_size": vocab})()

        def __init__(self):
            super().__init__()
            self.wte = torch.nn.Embedding(rows, d)
            self.h = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
            self.lm_head = torch.nn.Linear(d, rows, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

    f = model_flops_per_token(Remote(), seq_len=s)
    assert (f["hidden"], f["layers"], f["attn_dim"], f["vocab"]) == (d, layers, d, rows)
    assert f["params_nonembedding"] == layers * (d * d + d)
    assert f["head"] == 2 * d * rows and f["attention"] == 2 * layers * s * d


def test_which_layers_slide_and_which_configs_are_experts():
    """The module docstring's rules as the config is read. Sliding windows: a window of 0, or one that no layer of
    ``layer_types`` slides under (dots1, Cohere's compass: sliding_window 4096, every layer full_attention), leaves
    every layer full ([] as model_flops_per_token documents); only ``sliding_attention`` and ``hybrid_sliding``
    layers slide (not another kind: dots3's indexed_attention); a ``layer_types`` shorter than the layers leaves the
    rest full. Experts: E is the first of num_local_experts / num_experts / n_routed_experts that is a positive
    integer (a 0 names none)."""
    from types import SimpleNamespace as Cfg

    from tailkd.flops import _experts, _windows

    mistral = {**MIXTRAL, "model_type": "mistral", "sliding_window": 0}
    for key in ("num_local_experts", "num_experts_per_tok"):
        del mistral[key]
    assert model_flops_per_token(mistral, seq_len=32)["windows"] == []
    full = {**QWEN_1_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 100, "use_sliding_window": True,
            "sliding_window": 8, "layer_types": ["full_attention", "full_attention"]}
    assert model_flops_per_token(full, seq_len=32)["windows"] == []
    assert _windows(Cfg(sliding_window=8, layer_types=["full_attention", "indexed_attention", "sliding_attention"]),
                    3) == (0, 0, 8)
    assert _windows(Cfg(sliding_window=8, layer_types=["sliding_attention"]), 3) == (8, 0, 0)
    # zaya's hybrid_sliding layers slide; recurrent, convolution and MLP-only layers (Jamba, LFM2, Nemotron-H's moe
    # and mlp) attend to nothing, with or without a window; hybrid (Falcon-H1) and chunked (Llama 4) count as full
    kinds = ["hybrid_sliding", "linear_attention", "conv", "moe", "mlp", "hybrid", "chunked_attention"]
    assert _windows(Cfg(sliding_window=8, layer_types=kinds), 7) == (8, -1, -1, -1, -1, 0, 0)
    assert _windows(Cfg(layer_types=kinds), 7) == (0, -1, -1, -1, -1, 0, 0)
    assert _windows(Cfg(sliding_window=None, layer_types=["hybrid", "full_attention"]), 2) == ()
    assert _experts(Cfg(num_local_experts=0, num_experts=8, num_experts_per_tok=2)) == (2, 8)


def test_distill_flops_refuses_what_it_cannot_count():
    """An unknown loss is a TailkdError naming the registry's losses (it was a KeyError), a loss that needs a teacher
    without one a ValueError saying so, and negative tokens a ValueError."""
    s = ModelSize("s", 300.0, hidden=4, vocab=50)
    with pytest.raises(TailkdError, match="loss 'nope' is not a loss; choose one of tad, kd"):
        distill_flops(s, s, 10, seq_len=0, loss="nope")
    with pytest.raises(ValueError, match="loss 'kd' needs a teacher"):
        distill_flops(None, s, 10, seq_len=0, loss="kd")
    with pytest.raises(ValueError, match="tokens=-1 must be >= 0"):
        distill_flops(s, s, -1, seq_len=0, loss="kd")


def test_distill_flops_per_token_of_a_fraction_of_a_token():
    """per_token is total / tokens for any tokens > 0, a fraction of one included (not total / max(tokens, 1)); only
    0 tokens give 0. Teacher 2N + 2dV, student 3·(2N + 2dV), loss layer (c_kd + c_clm)·V: integers, times 0.5 and
    back exactly."""
    t = ModelSize("t", 1000.0, hidden=8, vocab=50)
    s = ModelSize("s", 300.0, hidden=4, vocab=50)
    per_token = (2 * 1000 + 2 * 8 * 50) + 3 * (2 * 300 + 2 * 4 * 50) + (LOSSES["kd"].flops_per_vocab
                                                                      + CLM_FLOPS_PER_VOCAB) * 50
    half = distill_flops(t, s, 0.5, seq_len=0, loss="kd")
    assert half["total"] == 0.5 * per_token and half["per_token"] == per_token


def test_method_table_bounds_delta_one_and_its_generation_settings():
    """δ = 1 (MiniPLM keeps every scored token) is the closed end of (0, 1]: accepted, the teacher and the reference
    scoring one token per trained token; --gen-len 0 (nothing generated) and --ppo-epochs -1 are refused."""
    t = ModelSize("t", 1000.0, hidden=8, vocab=50)
    s = ModelSize("s", 300.0, hidden=4, vocab=50)
    rows = {r["method"].split(" (")[0]: r for r in method_table(t, s, seq_len=0, tokens=1.0, delta=1.0,
                                                                reference_params=7.0)}
    assert rows["MiniPLM"]["method"] == "MiniPLM (δ=1)"
    assert rows["MiniPLM"]["teacher"] == 2 * 1000 + 2 * 8 * 50 and rows["MiniPLM"]["other"] == 2 * 7.0
    assert rows["MiniPLM"]["loss"] == SCORE_FLOPS_PER_VOCAB * (50 + 50) + CLM_FLOPS_PER_VOCAB * 50
    for bad in ({"gen_len": 0}, {"ppo_epochs": -1}, {"prompt_len": -1}):
        with pytest.raises(TailkdError, match="--gen-len must be >= 1, --prompt-len >= 0 and --ppo-epochs >= 0"):
            method_table(t, s, seq_len=0, **bad)


def test_teacher_and_student_of_different_vocabularies_score_with_the_teacher_s():
    """A teacher of V_T = 50 and a student of V_S = 70: MiniPLM's default reference (given by its size) scores over the
    teacher's vocabulary, as the teacher does (5·(V_T + V_T) per scored token, + the student's CLM c_clm·V_S), and
    MiniLLM's teacher scores the P + G tokens with its own V_T (forward + 5·V_T); a reference_params of 0 is a
    reference of 0 parameters (no forward), not the 125M default. Integers and halves: exact sums."""
    t = ModelSize("t", 1000.0, hidden=8, vocab=50, layers=3, attn_dim=6)
    s = ModelSize("s", 300.0, hidden=4, vocab=70, layers=2, attn_dim=4)
    prompt, gen = 5, 7
    rows = {r["method"].split(" (")[0]: r for r in method_table(t, s, seq_len=16, tokens=1.0, prompt_len=prompt,
                                                                gen_len=gen, reference_params=0.0)}
    assert rows["MiniPLM"]["loss"] == SCORE_FLOPS_PER_VOCAB * (50 + 50) / 0.5 + CLM_FLOPS_PER_VOCAB * 70
    assert rows["MiniPLM"]["other"] == 0.0
    teacher_forward = 2 * 1000 + 2 * 8 * 50 + 4 * 3 * 6 * (prompt + gen) / 2
    assert rows["MiniLLM"]["teacher"] == teacher_forward + SCORE_FLOPS_PER_VOCAB * 50


def test_a_model_folder_without_config_json_and_a_config_without_model_type_are_refused(tmp_path):
    """size_from_spec of a folder lacking config.json says so (not transformers' message of a missing file), and a
    config dict without model_type is refused by name (not a KeyError's 'model_type')."""
    from tailkd.flops import size_from_spec

    (tmp_path / "m").mkdir()
    with pytest.raises(TailkdError, match="has no config.json; pass an HF model folder or a config.json"):
        size_from_spec(str(tmp_path / "m"))
    with pytest.raises(TailkdError, match="config c has no model_type; pass a transformers config.json"):
        model_size({"hidden_size": 8, "vocab_size": 50}, name="c")


def test_a_model_spec_that_is_no_model_names_the_commands_other_way(tmp_path, capsys):
    """A spec that is no config.json, model folder, .gguf file or 'smollm2' is refused in one line ending with the
    way each caller offers: `tailkd flops` the role's size flags, its --reference --reference-params,
    `tailkd reproduce` (which has no such flags: they were named there too) its --teacher."""
    from tailkd.command_config import ReproduceConfig
    from tailkd.reproduce import _check_ks

    missing = tmp_path / "absent"
    for args, way in ((["--teacher", str(missing), "--student-params", "1e8", "--vocab", "100", "--hidden", "8"],
                       "; or give sizes with --teacher-params --vocab --hidden"),
                      (["--teacher-params", "1e9", "--student", str(missing), "--vocab", "100", "--hidden", "8"],
                       "; or give sizes with --student-params --vocab --hidden"),
                      (["--teacher-params", "1e9", "--student-params", "1e8", "--vocab", "100", "--hidden", "8",
                        "--reference", str(missing)], "; or give its size with --reference-params")):
        assert main(["flops", *args]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert err == [f"tailkd: error: {missing} is not a config.json, a model folder, a .gguf file or "
                       f"'smollm2'{way}"], args
    cfg = ReproduceConfig()
    cfg.teacher.path = str(missing)
    with pytest.raises(TailkdError, match=rf"^{re.escape(str(missing))} is not a config\.json, a model folder, a "
                                          r"\.gguf file or 'smollm2' \(--teacher\)$"):
        _check_ks(cfg)
