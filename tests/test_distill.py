"""End to end through the real CLI on tiny random models: learning, exact resume, saved student, bad input."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import make_teacher_dir, read_metrics, write_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from tailkd import train as train_mod
from tailkd.cli import main
from tailkd.errors import TailkdError


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    teacher = make_teacher_dir(root / "teacher")
    corpus = write_corpus(root / "corpus.txt")
    return {"teacher": teacher, "corpus": corpus, "cache": root / "cache"}


def base_args(assets, out, *extra):
    return ["distill", "--teacher", str(assets["teacher"]), "--data", str(assets["corpus"]),
            "--data.cache_dir", str(assets["cache"]), "--student-layers", "2", "--seq-len", "32",
            "--batch-size", "4", "--lr", "3e-3", "--train.warmup_steps", "2", "--data.eval_rows", "8",
            "--out", str(out), *extra]


def test_expected_duration_says_one_step_and_one_evaluation_in_the_singular():
    """The ETA line counts one step and one held-out evaluation as such (a resume two steps before the end printed
    'expected: 6 s more (1 steps at 6.3 s/step)'); more are plural, none is left out, as before."""
    from tailkd.runs import expected_duration

    assert expected_duration(6.3, 1, 17.0, 1).startswith("expected: 23 s more (1 step at 6.3 s/step + 1 held-out "
                                                         "evaluation at 17 s); done around ")
    assert expected_duration(1.4, 38, 3.0, 4).startswith("expected: 1 min 05 s more (38 steps at 1.4 s/step + 4 "
                                                         "held-out evaluations at 3 s); done around ")
    assert expected_duration(6.3, 1, 0.0, 1).startswith("expected: 6 s more (1 step at 6.3 s/step); done around ")


def test_student_layers_list_overrides_num_layers(assets, tmp_path):
    """``--student.layers`` lists the teacher layers to keep and overrides num_layers (its help says so): with the
    default or another count also set, a list of a different length builds that student (it was refused: "layers
    lists 3 layers but num_layers=2")."""
    run = tmp_path / "run"
    assert main(base_args(assets, run, "--steps", "1", "--student.layers", "0", "1", "3")) == 0
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 3
    sources = [row["source"] or "" for row in json.loads((run / "student_init.json").read_text())]
    kept = {int(src.split("layers.")[1].split(".")[0]) for src in sources if "layers." in src}
    assert kept == {0, 1, 3}  # the student's layers are copied from the listed teacher layers


def test_the_student_settings_shape_the_student_a_run_builds(assets, tmp_path):
    """Every student.* build setting reaches the student a run builds from the teacher (`prepare.setup_models` ->
    `build_student`): widths, heads, MLP init, untied head, frozen embeddings (student_init.json and the saved
    student say so), and train.seed seeds its random MLP (a step at lr 1e-30 leaves every weight as built: each
    AdamW update, ~1e-30, is far below half an ulp of a weight of the student's ~0.02 init)."""
    from tailkd.models import load_teacher
    from tailkd.student import build_student

    run = tmp_path / "run"
    assert main(base_args(assets, run, "--steps", "1", "--student.layers", "0", "3", "--student.hidden_size", "32",
                          "--student.num_heads", "2", "--student.num_kv_heads", "1", "--student.intermediate_size",
                          "64", "--student.mlp_init", "copy", "--student.tie_embeddings", "false",
                          "--student.freeze_embeddings", "true")) == 0
    config = AutoModelForCausalLM.from_pretrained(run / "final").config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.tie_word_embeddings) == (2, 32, 2, 1, 64, False)
    table = {row["name"]: row for row in json.loads((run / "student_init.json").read_text())}
    assert table["model.layers.1.mlp.up_proj.weight"]["source"] == "model.layers.3.mlp.up_proj.weight"  # copied
    assert table["model.embed_tokens.weight"]["frozen"] and not table["lm_head.weight"]["frozen"]  # an untied head

    seeded = tmp_path / "seeded"
    assert main(base_args(assets, seeded, "--steps", "1", "--seed", "3", "--lr", "1e-30")) == 0
    teacher, _ = load_teacher(str(assets["teacher"]))
    built = dict(build_student(teacher, num_layers=2, seed=3)[0].named_parameters())
    saved = final_weights(seeded)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(saved[name], built[name].detach())


def final_weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def test_loss_falls_and_student_loads(assets, tmp_path, capsys):
    run = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(base_args(assets, run, "--steps", "20", "--train.eval_every", "10")) == 0
    wall = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "held-out KL(teacher‖student)" in out and str(run / "final") in out
    rows = read_metrics(run)
    train = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "heldout"]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert sum(r["loss"] for r in train[-5:]) < 0.8 * sum(r["loss"] for r in train[:5])
    assert held[-1]["kl"] < 0.8 * held[0]["kl"]
    assert {"lr", "tokens", "tokens_per_s", "clm", "div"} <= set(train[0])
    # The saved student is a plain HF model: loads anywhere, same logits as the trainer's student.
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 2
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()
    assert (run / "config.yaml").exists() and (run / "student_init.json").exists()
    # held-out lines carry the TRAINING tokens so far (the curves' x-axis) and the scored tokens apart
    tokens_per_step = 4 * 32
    assert [(r["step"], r["tokens"]) for r in held] == [(s, s * tokens_per_step) for s in (0, 10, 20)]
    assert all(r["eval_tokens"] == held[0]["eval_tokens"] > 0 for r in held)
    # the expected duration after the first steps, and the curves named in the final lines
    lines = out.strip().splitlines()
    assert any(ln.startswith("expected: ") and "18 steps at" in ln and "2 held-out evaluations" in ln
               for ln in lines)
    assert lines[-3] == f"curves (held-out KL, training loss): {run / 'curves.png'}"
    assert lines[-1] == f"student saved to {run / 'final'}"
    # where the wall time went, by phase: in summary.json and the log's last lines; each phase took time, the steps'
    # are train_seconds (a fresh run), and together they fit in the call's own wall time
    phases = json.loads((run / "summary.json").read_text())["phase_seconds"]
    assert list(phases) == list(train_mod.PHASES) and all(v > 0 for v in phases.values())
    assert phases["steps"] == json.loads((run / "summary.json").read_text())["train_seconds"]
    assert sum(phases.values()) <= wall
    assert lines[-2] == train_mod.phase_text(phases) and lines[-2].startswith("wall time: setup")
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _tiny_qwen3_next(path: Path, tokenizer, layer_types: list[str], seed: int) -> Path:
    """A random tiny Qwen3-Next (Gated DeltaNet linear-attention layers beside full attention, a mixture of 4
    experts) saved with ``tokenizer``: the hybrid layout of Qwen3-Next and Qwen3.5."""
    import transformers
    from test_flops import QWEN3_NEXT

    cfg = transformers.AutoConfig.for_model(**{
        **QWEN3_NEXT, "vocab_size": len(tokenizer), "num_hidden_layers": len(layer_types), "layer_types": layer_types,
        "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None})
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tiny_gemma4(path: Path, tokenizer, layer_types: list[str], seed: int, **config) -> Path:
    """A random tiny Gemma 4 text model (Gemma4ForCausalLM) saved with ``tokenizer``: its full attention layers'
    heads of global_head_dim (per_layer_config), per-layer embeddings, its last layers reusing earlier layers' keys
    and values (num_kv_shared_layers) with MLPs twice as wide."""
    import transformers

    cfg = transformers.Gemma4TextConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": len(layer_types),
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
        "layer_types": layer_types, "sliding_window": 8, "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": len(tokenizer), "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
        "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **config})
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_gemma4_teacher_and_student_distill_and_count_their_flops_layer_by_layer(assets, tmp_path):
    """A Gemma 4 teacher (5 layers, full attention in 1 and 4 with heads twice as wide) and a Gemma 4 student given
    as a folder: `tailkd distill` trains, saves and counts the run's FLOPs with each layer's own attention width and
    window (the count refused such a config, failing the run after its last step); and a student built from the
    teacher (its layers 1, 2, 4, narrower: 2 query heads by importance on 1 KV head of 8 rows, the full layers' heads
    halved alike, 16 rows) trains on the fused loss layer, saves its per-layer settings and counts its FLOPs with
    them."""
    from tiny import make_tokenizer

    sliding, full = "sliding_attention", "full_attention"
    tok = make_tokenizer(300)
    teacher = _tiny_gemma4(tmp_path / "teacher", tok, [sliding, full, sliding, sliding, full], 0)
    student = _tiny_gemma4(tmp_path / "student", tok, [sliding, full, sliding, full], 1, hidden_size=32,
                           num_kv_shared_layers=1)
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(assets["corpus"]),
                 "--data.cache_dir", str(assets["cache"]), "--seq-len", "32", "--batch-size", "4", "--steps", "2",
                 "--data.eval_rows", "8", "--train.precision", "fp32", "--out", str(run)]) == 0
    flops = json.loads((run / "summary.json").read_text())["flops"]
    assert flops["teacher"]["attn_dims"] == [64, 128, 64, 64, 128]
    assert flops["student"]["attn_dims"] == [64, 128, 64, 128]
    assert flops["teacher"]["windows"] == [8, 0, 8, 8, 0]
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert type(model).__name__ == "Gemma4ForCausalLM" and model.config.num_kv_shared_layers == 1
    # a student built from it: layers 1, 2, 4 (4 shares layer 1's keys and values), narrower, on the fused loss layer
    built = tmp_path / "built"
    assert main(["distill", "--teacher", str(teacher), "--student.layers", "1", "2", "4", "--student.hidden_size", "32",
                 "--student.intermediate_size", "48", "--student.num_heads", "2", "--student.num_kv_heads", "1",
                 "--student.head_dim", "8", "--student.attention_heads", "active", "--data", str(assets["corpus"]),
                 "--data.cache_dir",
                 str(assets["cache"]), "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--data.eval_rows", "8",
                 "--train.precision", "fp32", "--train.fused_loss", "on", "--out", str(built)]) == 0
    init = {row["name"]: row for row in json.loads((built / "student_init.json").read_text())}
    assert init["model.layers.2.mlp.up_proj.weight"]["shape"] == [96, 32]  # teacher layer 4's: twice as wide
    assert init["model.embed_tokens_per_layer.weight"]["shape"] == [len(tok), 3 * 8]
    student = AutoModelForCausalLM.from_pretrained(built / "final")
    assert student.config.layer_types == [full, sliding, full] and student.config.num_kv_shared_layers == 1
    assert student.config.to_dict()["per_layer_config"] == {"0": {"head_dim": 16}, "2": {"head_dim": 16}}
    assert init["model.layers.0.self_attn.q_proj.weight"]["shape"] == [2 * 16, 32] and len(init[
        "model.layers.1.self_attn.k_proj.weight"]["heads"]) == 2  # its kept query heads, named
    assert json.loads((built / "summary.json").read_text())["flops"]["student"]["attn_dims"] == [32, 16, 32]


def test_a_multimodal_gemma4_checkpoint_teaches_and_builds_a_text_student(assets, tmp_path):
    """Gemma 4's checkpoints are Gemma4ForConditionalGeneration (AutoModelForCausalLM loads them so): its context
    length is its text config's (the run stopped at "cannot tell the context length"), and a student is built from its
    text part (a Gemma4ForCausalLM) and trained on the fused loss layer."""
    import transformers
    from tiny import make_tokenizer

    sliding, full = "sliding_attention", "full_attention"
    tok = make_tokenizer(300)
    text = _tiny_gemma4(tmp_path / "text", tok, [sliding, full, sliding, sliding, full], 0)
    config = transformers.Gemma4Config(text_config=transformers.AutoConfig.from_pretrained(text).to_dict())
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--student.layers", "1", "2", "4", "--student.hidden_size",
                 "32", "--data", str(assets["corpus"]), "--data.cache_dir", str(assets["cache"]), "--seq-len", "32",
                 "--batch-size", "4", "--steps", "2", "--data.eval_rows", "8", "--train.precision", "fp32",
                 "--train.fused_loss", "on", "--out", str(run)]) == 0
    student = AutoModelForCausalLM.from_pretrained(run / "final")
    assert type(student).__name__ == "Gemma4ForCausalLM" and student.config.hidden_size == 32
    assert student.config.layer_types == [full, sliding, full]


def test_a_gemma3n_teacher_distils_into_a_student_folder(assets, tmp_path, capsys):
    """Gemma 3n (AltUp, LAuReL, per-layer embeddings, KV-shared layers), which tailkd builds no student from (refused
    in one line pointing at --student DIR): a tiny teacher and a Gemma 3n student given as a folder train on the fused
    loss layer, the run's FLOPs are counted and the student saves, as README says of other causal LMs."""
    import transformers
    from tiny import make_tokenizer

    tok = make_tokenizer(300)
    sliding, full = "sliding_attention", "full_attention"
    folders = {}
    for name, layers, hidden, shared, seed in (("teacher", 4, 64, 2, 0), ("student", 2, 32, 0, 1)):
        cfg = transformers.Gemma3nTextConfig(
            vocab_size=len(tok), vocab_size_per_layer_input=len(tok), hidden_size=hidden, intermediate_size=96,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            hidden_size_per_layer_input=8, num_kv_shared_layers=shared, sliding_window=8,
            layer_types=[sliding, full] * (layers // 2), activation_sparsity_pattern=[0.0] * layers, laurel_rank=4,
            altup_num_inputs=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        torch.manual_seed(seed)
        folders[name] = tmp_path / name
        transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    assert main(["distill", "--teacher", str(folders["teacher"]), "--student.num_layers", "2", "--out",
                 str(tmp_path / "refused"), "--data", str(assets["corpus"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tailkd: error: cannot build a student from a Gemma3nForCausalLM: supported teachers ")
    assert err.endswith("any causal LM teaches a student given as a folder (--student DIR)")
    assert not (tmp_path / "refused").exists()
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(folders["teacher"]), "--student", str(folders["student"]), "--data",
                 str(assets["corpus"]), "--data.cache_dir", str(assets["cache"]), "--seq-len", "32", "--batch-size",
                 "4", "--steps", "2", "--data.eval_rows", "8", "--train.precision", "fp32", "--train.fused_loss", "on",
                 "--out", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["flops"]["teacher"]["layers"] == 4
    assert type(AutoModelForCausalLM.from_pretrained(run / "final")).__name__ == "Gemma3nForCausalLM"


def test_a_hybrid_linear_attention_teacher_and_student_distill_fused_as_dense(assets, tmp_path):
    """A Qwen3-Next teacher (three linear-attention layers and one full) and a two-layer Qwen3-Next student given as
    a folder: `tailkd distill` runs on the fused loss layer and on full logits, their first steps' losses agree
    (float32: the same sums over 300-entry rows, reassociated by the chunks: a few hundred roundings of 2^-24, far
    below 1e-4 relative), and the saved student loads with its hybrid layer_types."""
    from tiny import make_tokenizer

    tok = make_tokenizer(300)
    teacher = _tiny_qwen3_next(tmp_path / "teacher", tok, ["linear_attention"] * 3 + ["full_attention"], 0)
    student = _tiny_qwen3_next(tmp_path / "student", tok, ["linear_attention", "full_attention"], 1)
    losses = {}
    for fused in ("on", "off"):
        run = tmp_path / f"run_{fused}"
        assert main(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(assets["corpus"]),
                     "--data.cache_dir", str(assets["cache"]), "--seq-len", "32", "--batch-size", "4", "--steps", "3",
                     "--data.eval_rows", "8", "--train.precision", "fp32", "--train.fused_loss", fused,
                     "--out", str(run)]) == 0
        losses[fused] = [r["loss"] for r in read_metrics(run) if r["split"] == "train"]
    assert len(losses["on"]) == 3 and all(math.isfinite(x) for x in losses["on"] + losses["off"])
    assert losses["on"][0] == pytest.approx(losses["off"][0], rel=1e-4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run_on" / "final")
    assert type(model).__name__ == "Qwen3NextForCausalLM"
    assert model.config.layer_types == ["linear_attention", "full_attention"]


def test_a_student_built_from_a_mixture_of_experts_teacher(assets, tmp_path, capsys):
    """A Mixtral teacher (4 layers, 4 experts, 2 per token; its config asks for the router load-balancing loss) and
    a student built from it with 2 layers and its first 3 experts (``--student.num_experts``), one per token
    (``--student.num_experts_per_tok``), experts and router copied (mlp_init copy): `tailkd distill` trains it on
    the fused layer with the router term (the run log says so; each metrics line's loss is clm + div + aux, aux >
    0); student_init.json says what was copied, truncated to the kept experts; the saved student loads as a Mixtral
    of 3 experts whose router rows are the teacher's first three changed by training."""
    import transformers
    from tiny import make_tokenizer

    tok = make_tokenizer(300)
    config = transformers.MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02,
                                        max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--student.num_layers", "2",
                 "--student.num_experts", "3", "--student.num_experts_per_tok", "1", "--student.mlp_init", "copy",
                 "--data", str(assets["corpus"]),
                 "--data.cache_dir", str(assets["cache"]), "--seq-len", "32", "--batch-size", "4", "--steps", "2",
                 "--data.eval_rows", "8", "--train.precision", "fp32", "--train.fused_loss", "on",
                 "--out", str(run)]) == 0
    assert "router load-balancing loss: 0.02 x the student's aux_loss per token" in capsys.readouterr().out
    train = [r for r in read_metrics(run) if r["split"] == "train"]
    assert len(train) == 2 and all(r["aux"] > 0.01 for r in train)  # 0.02 * aux_loss, which is ~k = 1 here
    for r in train:  # float32 terms summed in float64: a few ulps of 2^-24 apart
        assert r["loss"] == pytest.approx(r["clm"] + r["div"] + r["aux"], rel=1e-6)
    init = {row["name"]: row for row in json.loads((run / "student_init.json").read_text())}
    router = init["model.layers.1.mlp.gate.weight"]
    assert (router["shape"], router["action"], router["source"]) == ([3, 32], "truncated",
                                                                     "model.layers.3.mlp.gate.weight")
    assert init["model.layers.0.mlp.experts.down_proj"]["shape"] == [3, 32, 48]
    student = AutoModelForCausalLM.from_pretrained(run / "final")
    assert type(student).__name__ == "MixtralForCausalLM"
    assert (student.config.num_local_experts, student.config.num_experts_per_tok) == (3, 1)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    trained, start = student.model.layers[1].mlp.gate.weight, teacher.model.layers[3].mlp.gate.weight[:3]
    assert trained.shape == start.shape and not torch.equal(trained, start)


def _distil_a_built_student(assets, tmp_path, teacher, *student_args):
    """`tailkd distill` (fused layer, fp32, 2 steps) of a student built from ``teacher`` (a model of the tiny
    tokenizer's vocabulary, saved with it) with ``student_args``; the saved student, loaded."""
    from tiny import make_tokenizer

    teacher.save_pretrained(tmp_path / "teacher")
    make_tokenizer(300).save_pretrained(tmp_path / "teacher")
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), *student_args, "--data", str(assets["corpus"]),
                 "--data.cache_dir", str(assets["cache"]), "--seq-len", "32", "--batch-size", "4", "--steps", "2",
                 "--data.eval_rows", "8", "--train.precision", "fp32", "--train.fused_loss", "on",
                 "--out", str(run)]) == 0
    return AutoModelForCausalLM.from_pretrained(run / "final")


def _glm45_teacher(**overrides):
    """A GLM-4.5 teacher of the tiny tokenizer's vocabulary: 4 layers (0 dense), 8 experts in 2 groups, 2 per token
    from 1 group (``overrides`` change these), its score-correction biases drawn from N(0, 0.1)."""
    import transformers
    from tiny import make_tokenizer

    config = transformers.Glm4MoeConfig(**{
        "vocab_size": len(make_tokenizer(300)), "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "moe_intermediate_size": 24,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 0,
        "pad_token_id": None, **overrides})
    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in teacher.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return teacher


def test_a_student_built_from_a_glm45_teacher_keeps_its_expert_groups_and_score_correction(assets, tmp_path):
    """A GLM-4.5 teacher (DeepSeek-V3-style routing: 8 experts in n_group 2 groups, a saved score-correction bias per
    expert, shared experts, a dense first layer) and a student of 2 layers and 4 experts: `tailkd distill` trains it
    on the fused layer; the saved student is a GLM-4.5 of 4 experts in 2 groups (the first 2 of each teacher group:
    0, 1, 4, 5), its score-correction bias those experts' (a buffer: no gradient, unchanged by training), its layer 0
    dense and layer 1 routed (first_k_dense_replace 1 of teacher layers 0, 3)."""
    teacher = _glm45_teacher()
    student = _distil_a_built_student(assets, tmp_path, teacher, "--student.num_layers", "2", "--student.num_experts",
                                      "4", "--student.mlp_init", "copy")
    assert type(student).__name__ == "Glm4MoeForCausalLM"
    assert (student.config.n_routed_experts, student.config.n_group, student.config.first_k_dense_replace) == (4, 2, 1)
    assert [type(layer.mlp).__name__ for layer in student.model.layers] == ["Glm4MoeMLP", "Glm4MoeMoE"]
    kept = torch.tensor([0, 1, 4, 5])
    bias = teacher.model.layers[3].mlp.gate.e_score_correction_bias
    assert torch.equal(student.model.layers[1].mlp.gate.e_score_correction_bias, bias[kept])
    init = {row["name"]: row for row in json.loads((tmp_path / "run" / "student_init.json").read_text())}
    assert init["model.layers.1.mlp.experts.gate_up_proj"]["shape"] == [4, 48, 32]


def test_a_student_keeps_the_experts_its_teacher_uses(assets, tmp_path, capsys):
    """``--student.experts used``: a GLM-4.5 teacher (8 experts in 2 groups, both picked, 4 experts per token) whose
    layer 3 routes every token to experts 1, 2, 6, 7 and none to the others (their score-correction bias -1e4) and a
    student of its layers 0, 3 with 4 experts, experts copied: `tailkd distill` counts the teacher's routing over 6
    training rows (the run log gives the share of the routings the kept experts had: all), keeps 1, 2, 6, 7 — their
    biases in the saved student, their names in student_init.json."""
    teacher = _glm45_teacher(num_experts_per_tok=4, topk_group=2)
    with torch.no_grad():
        teacher.model.layers[3].mlp.gate.e_score_correction_bias[[0, 3, 4, 5]] = -1e4
    student = _distil_a_built_student(assets, tmp_path, teacher, "--student.num_layers", "2", "--student.num_experts",
                                      "4", "--student.mlp_init", "copy", "--student.experts", "used",
                                      "--student.calibration_rows", "6")
    assert ("experts kept by use (student.experts used, student.calibration_rows 6): 100.0%-100.0% of the teacher's "
            "routings in each of the 1 routed layers went to them") in capsys.readouterr().out
    kept = [1, 2, 6, 7]
    bias = teacher.model.layers[3].mlp.gate.e_score_correction_bias
    assert torch.equal(student.model.layers[1].mlp.gate.e_score_correction_bias, bias[kept])
    init = {row["name"]: row for row in json.loads((tmp_path / "run" / "student_init.json").read_text())}
    for name in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):  # parameters (the bias: a buffer)
        row = init[f"model.layers.1.mlp.{name}"]
        assert (row["experts"], row["routed_share"]) == (kept, 1.0), name


def test_a_student_keeps_the_most_influential_layers_and_resumes_only_as_built(assets, tmp_path, capsys):
    """``--student.layer_choice influence``: the assets' Llama teacher (4 layers) with layers 1 and 3 adding nothing
    (o_proj and down_proj zero): a 2-layer student keeps teacher layers 0 and 2 (evenly spaced: 0 and 3; the run log
    names them with their Block Influence, student_init.json's sources say so). A run stopped after a step resumes;
    the same resume with a student_init.json naming other layers is refused in one line, the run folder untouched."""
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"])
    with torch.no_grad():
        for i in (1, 3):
            teacher.model.layers[i].self_attn.o_proj.weight.zero_()
            teacher.model.layers[i].mlp.down_proj.weight.zero_()
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(assets["teacher"]).save_pretrained(tmp_path / "teacher")
    args = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(assets["corpus"]), "--data.cache_dir",
            str(assets["cache"]), "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--data.eval_rows", "8",
            "--train.precision", "fp32", "--student.num_layers", "2", "--student.layer_choice", "influence",
            "--student.calibration_rows", "6", "--out", str(tmp_path / "run")]
    run = tmp_path / "run"
    assert main([*args, "--train.stop_after", "1"]) == 0
    assert re.search(r"layers kept by influence \(student\.layer_choice influence, student\.calibration_rows 6\): "
                     r"teacher layers 0 2, their Block Influence 0\.\d{4}-0\.\d{4}\n", capsys.readouterr().out)
    init = json.loads((run / "student_init.json").read_text())
    sources = [row["source"] for row in init if row["name"].endswith("self_attn.q_proj.weight")]
    assert sources == ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight"]
    assert main([*args, "--resume"]) == 0
    assert len([r for r in read_metrics(run) if r["split"] == "train"]) == 2
    for row in init:  # the run as if built of layers 0 and 3
        row["source"] = row["source"] and row["source"].replace("model.layers.2.", "model.layers.3.")
    (run / "student_init.json").write_text(json.dumps(init))
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main([*args, "--steps", "3", "--resume", "--force"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(r"tailkd: error: cannot resume \S+: the student built now differs from the run's "
                        r"\(student_init\.json\): model\.layers\.1\.\S+ built from model\.layers\.2\.\S+, the "
                        r"run's from model\.layers\.3\.\S+: a student chosen from calibration rows "
                        r"\(student\.layer_choice influence, student\.experts used, student\.mlp_units active, "
                        r"student\.hidden_channels active, student\.attention_heads active, student\.ssm_head_choice "
                        r"active\) came out otherwise "
                        r"here; resume on the machine, data and teacher the run started with", last)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_a_student_keeps_the_most_active_mlp_units(assets, tmp_path, capsys):
    """``--student.mlp_units active`` with a copied, narrower MLP (64 of the assets teacher's 128 units): the run log
    gives the share of the teacher's activity the kept units had (more than half: the most active half), and
    student_init.json names how many units each MLP tensor keeps, with a digest of which."""
    run = tmp_path / "run"
    assert main(base_args(assets, run, "--steps", "1", "--train.precision", "fp32", "--student.intermediate_size", "64",
                          "--student.mlp_init", "copy", "--student.mlp_units", "active",
                          "--student.calibration_rows", "6")) == 0
    found = re.search(r"MLP units kept by activity \(student\.mlp_units active, student\.calibration_rows 6\): "
                      r"(\d+\.\d)%-(\d+\.\d)% of the teacher's mean \|activation\| in each of the 2 layers\n",
                      capsys.readouterr().out)
    assert found and 50 < float(found.group(1)) <= float(found.group(2)) < 100
    init = {row["name"]: row for row in json.loads((run / "student_init.json").read_text())}
    for name in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
        assert re.fullmatch(r"64 of 128, sha1 [0-9a-f]{16}", init[f"model.layers.1.mlp.{name}"]["units"])
    assert "units" not in init["model.layers.1.self_attn.q_proj.weight"]


def test_a_student_keeps_the_most_active_hidden_channels_and_resumes_only_as_built(assets, tmp_path, capsys):
    """``--student.hidden_channels active`` with a narrower residual stream (32 of the assets teacher's 64 channels):
    the run log gives how many channels were kept and the share of the norms' activity they had (more than half: the
    most active half), student_init.json names them (count and digest) on the embeddings' row. A run stopped after a
    step resumes; the same resume with a student_init.json naming other channels is refused in one line, the run
    folder untouched."""
    run = tmp_path / "run"
    args = base_args(assets, run, "--steps", "2", "--train.precision", "fp32", "--student.hidden_size", "32",
                     "--student.hidden_channels", "active", "--student.calibration_rows", "6")
    assert main([*args, "--train.stop_after", "1"]) == 0
    found = re.search(r"hidden channels kept by activity \(student\.hidden_channels active, student\.calibration_rows "
                      r"6\): 32 of 64, (\d+\.\d)% of the mean \|output\| of the teacher's norms\n",
                      capsys.readouterr().out)
    assert found and 50 < float(found.group(1)) < 100
    init = json.loads((run / "student_init.json").read_text())
    assert [(row["name"], row["channels"][:15]) for row in init if "channels" in row] == [
        ("model.embed_tokens.weight", "32 of 64, sha1 ")]
    assert main([*args, "--resume"]) == 0
    assert len([r for r in read_metrics(run) if r["split"] == "train"]) == 2
    for row in init:
        if "channels" in row:
            row["channels"] = "32 of 64, sha1 0000000000000000"
    (run / "student_init.json").write_text(json.dumps(init))
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main([*args, "--steps", "3", "--resume", "--force"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(r"tailkd: error: cannot resume \S+: the student built now differs from the run's "
                        r"\(student_init\.json\): model\.embed_tokens\.weight its channels 32 of 64, sha1 "
                        r"[0-9a-f]{16}, the run's 32 of 64, sha1 0{16}: a student chosen from calibration rows .*",
                        last)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_a_student_keeps_the_most_important_heads(assets, tmp_path, capsys):
    """``--student.attention_heads active`` with 2 query heads on 1 KV head (of the assets teacher's 4 on 2): the run
    log gives the share of each layer's head importance the kept heads had (more than a quarter: the better KV head's
    better pair), student_init.json names each layer's kept query heads (both of one teacher KV head) on its attention
    tensors and on no other."""
    run = tmp_path / "run"
    assert main(base_args(assets, run, "--steps", "1", "--train.precision", "fp32", "--student.num_heads", "2",
                          "--student.num_kv_heads", "1", "--student.attention_heads", "active",
                          "--student.calibration_rows", "6")) == 0
    found = re.search(r"attention heads kept by importance \(student\.attention_heads active, student\."
                      r"calibration_rows 6\): (\d+\.\d)%-(\d+\.\d)% of the teacher's head output norm in each of "
                      r"the 2 attention layers\n", capsys.readouterr().out)
    assert found and 25 < float(found.group(1)) <= float(found.group(2)) < 100
    init = {row["name"]: row for row in json.loads((run / "student_init.json").read_text())}
    for layer in (0, 1):
        heads = init[f"model.layers.{layer}.self_attn.q_proj.weight"]["heads"]
        assert heads in ([0, 1], [2, 3])
        for name in ("k_proj.weight", "v_proj.weight", "o_proj.weight"):
            assert init[f"model.layers.{layer}.self_attn.{name}"]["heads"] == heads
    assert [name for name, row in init.items() if "heads" in row and ".self_attn." not in name] == []


def test_a_student_built_from_a_deepseek_v3_teacher_narrows_its_latent_attention_by_whole_heads(assets, tmp_path):
    """A DeepSeek-V3 teacher (multi-head latent attention: q through a rank-24 pair, each head's [key | value] expanded
    from one rank-16 latent; a head's query 8 + 4 rows, its value 12) and a student of 2 layers, 2 of 4 heads and a
    48-wide residual stream: `tailkd distill` trains it on the fused layer; the saved student is a DeepSeek-V3 whose
    per-head projections hold 2 heads' blocks and whose latent ranks are the teacher's."""
    import transformers
    from tiny import make_tokenizer

    tok = make_tokenizer(300)
    config = transformers.DeepseekV3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=12, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student = _distil_a_built_student(assets, tmp_path, teacher, "--student.num_layers", "2", "--student.num_heads",
                                      "2", "--student.hidden_size", "48")
    assert type(student).__name__ == "DeepseekV3ForCausalLM"
    c = student.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.kv_lora_rank) == (2, 2, 48, 16)
    attention = student.model.layers[1].self_attn
    assert attention.q_b_proj.weight.shape == (2 * 12, 24) and attention.kv_b_proj.weight.shape == (2 * 20, 16)
    assert attention.o_proj.weight.shape == (48, 2 * 12)


def test_a_router_term_the_students_forward_cannot_give_is_refused_before_the_run_folder(assets, tmp_path,
                                                                                        monkeypatch, capsys):
    """A student whose config asks for the router term but whose forward on the fused path returns no aux_loss (here:
    a model taken for one without logits_to_keep, whose base model runs alone) is one line, exit 2, before the run
    folder is touched; on full logits the same student trains."""
    import transformers
    from tiny import make_tokenizer

    import tailkd.head

    tok = make_tokenizer(300)
    config = transformers.MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        output_router_logits=True, max_position_embeddings=256, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=None)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    monkeypatch.setattr(tailkd.head, "_takes_logits_to_keep", lambda model: False)
    args = ["distill", "--teacher", str(tmp_path / "teacher"), "--student.num_layers", "1", "--data",
            str(assets["corpus"]), "--data.cache_dir", str(assets["cache"]), "--seq-len", "32", "--batch-size", "4",
            "--steps", "1", "--data.eval_rows", "8", "--train.precision", "fp32"]
    assert main([*args, "--train.fused_loss", "on", "--out", str(tmp_path / "fused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("tailkd: error: the student's config sets output_router_logits, but its forward "
                   "(MixtralForCausalLM) returned no aux_loss: set output_router_logits to false in its config.json")
    assert not (tmp_path / "fused").exists()
    assert main([*args, "--train.fused_loss", "off", "--out", str(tmp_path / "dense")]) == 0


def test_a_student_built_from_a_hybrid_teacher(assets, tmp_path):
    """A student built from the Qwen3-Next teacher (three Gated DeltaNet layers and one gated full-attention layer,
    4 experts): 2 layers (0 and 3: one of each kind), hidden 32, 2 experts; `tailkd distill` trains it on the fused
    layer; the saved student loads with those layer types and sizes, its linear attention narrowed on the residual
    side only."""
    from tiny import make_tokenizer

    tok = make_tokenizer(300)
    teacher = _tiny_qwen3_next(tmp_path / "teacher", tok, ["linear_attention"] * 3 + ["full_attention"], 0)
    run = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--student.num_layers", "2", "--student.hidden_size", "32",
                 "--student.num_experts", "2", "--data", str(assets["corpus"]), "--data.cache_dir",
                 str(assets["cache"]), "--seq-len", "32", "--batch-size", "4", "--steps", "2", "--data.eval_rows", "8",
                 "--train.precision", "fp32", "--train.fused_loss", "on", "--out", str(run)]) == 0
    init = {row["name"]: row for row in json.loads((run / "student_init.json").read_text())}
    qkvz = init["model.layers.0.linear_attn.in_proj_qkvz.weight"]
    assert (qkvz["shape"][1], qkvz["action"], qkvz["source"]) == (32, "truncated",
                                                                 "model.layers.0.linear_attn.in_proj_qkvz.weight")
    assert init["model.layers.1.self_attn.q_proj.weight"]["source"] == "model.layers.3.self_attn.q_proj.weight"
    student = AutoModelForCausalLM.from_pretrained(run / "final")
    assert type(student).__name__ == "Qwen3NextForCausalLM"
    assert student.config.layer_types == ["linear_attention", "full_attention"]
    assert (student.config.hidden_size, student.config.num_experts) == (32, 2)


def _assert_stop_and_resume_is_bit_identical(assets, tmp_path, steps: int, save_every: int, stop_after: int):
    """A run stopped after ``stop_after`` steps and resumed ends with the uninterrupted run's weights and losses."""
    full, parted = tmp_path / "full", tmp_path / "parted"
    schedule = ("--steps", str(steps), "--train.save_every", str(save_every))
    assert main(base_args(assets, full, *schedule)) == 0
    assert main(base_args(assets, parted, *schedule, "--train.stop_after", str(stop_after))) == 0
    assert not (parted / "final").exists()
    assert main(base_args(assets, parted, *schedule, "--resume")) == 0
    a, b = final_weights(full), final_weights(parted)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    la = [r for r in read_metrics(full) if r["split"] == "train"]
    lb = [r for r in read_metrics(parted) if r["split"] == "train"]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    return full


def test_stop_and_resume_is_bit_identical(assets, tmp_path):
    _assert_stop_and_resume_is_bit_identical(assets, tmp_path, steps=20, save_every=5, stop_after=10)


def test_stop_and_resume_is_bit_identical_with_dropout(assets, tmp_path):
    """A student with attention dropout (inherited from its teacher's config) draws dropout masks from torch's RNG
    at every step: the resume continues those draws where the checkpoint left them (`runs.set_rng_state`), so its
    weights and losses equal an uninterrupted run's (a resume that starts the RNG from the seed again draws other
    masks after the stop). The teacher runs in eval mode: its forward draws nothing."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(assets["teacher"], teacher)
    cfg = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps(cfg | {"attention_dropout": 0.3}))
    full = _assert_stop_and_resume_is_bit_identical(dict(assets, teacher=teacher), tmp_path, steps=8, save_every=4,
                                                    stop_after=4)
    assert json.loads((full / "final" / "config.json").read_text())["attention_dropout"] == 0.3


def test_a_loss_of_the_users_module_trains_resumes_and_is_evaluated(assets, tmp_path):
    """README "A loss of your own": ``--loss.module FILE`` imports the user's file, which registers a loss; the run
    trains ``--loss NAME`` on the fused layer (its closed-form kernel), and a fresh ``tailkd`` process resumes it from
    the printed ``--config RUN/config.yaml --resume`` (config.yaml names the module) bit-identically; the FLOPs count
    the row's per-vocabulary entry, and ``tailkd eval`` of the student needs nothing of the loss. Without the module,
    a ``tailkd`` process refuses the name in one line."""
    from tailkd.registry import LOSSES

    module = tmp_path / "my_losses.py"
    module.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "from user_loss import register_hellinger\n\nregister_hellinger()\n")
    full, parted = tmp_path / "full", tmp_path / "parted"
    common = ("--loss", "hellinger", "--loss.module", str(module), "--fused-loss", "on", "--steps", "4")
    saved = dict(LOSSES)
    try:
        assert main(base_args(assets, full, *common)) == 0
    finally:
        LOSSES.clear()
        LOSSES.update(saved)
        for name in [n for n in sys.modules if n.startswith("tailkd_user_losses_")]:
            del sys.modules[name]
    assert main(base_args(assets, parted, *common, "--train.stop_after", "2")) == 0  # imported again: a new row
    LOSSES.clear()
    LOSSES.update(saved)
    proc = _cli("distill", "--config", str(parted / "config.yaml"), "--resume")
    assert proc.returncode == 0, proc.stderr
    a, b = final_weights(full), final_weights(parted)
    assert all(torch.equal(a[name], b[name]) for name in a)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["loss"] == "hellinger"
    vocab = AutoModelForCausalLM.from_pretrained(full / "final").config.vocab_size
    assert summary["flops"]["loss_layer"] == summary["flops"]["tokens"] * (18 + 6) * vocab  # + the CLM's 6
    assert main(["eval", "--student", str(full / "final"), "--max-rows", "4", "--out", str(tmp_path / "e.json")]) == 0
    proc = _cli("distill", "--config", str(full / "config.yaml"), "--loss.module", "", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"tailkd: error: loss.name='hellinger' is not a loss; choose one of {', '.join(LOSSES)}; a loss of your own: "
        "name the module that registers it with --loss.module"]


def test_a_loss_option_trains_is_saved_and_a_resume_with_another_value_is_refused(assets, tmp_path, capsys):
    """``--loss.options alpha=0.3`` of a loss of one's own (Amari's α-divergence, tests/user_loss.py) reaches the run
    (its first loss differs from the default α = ½'s, computed on the same first batch), is saved in config.yaml, and a
    resume that changes the value or drops it (then the default, 0.5, which the resume's config holds) is refused
    naming the key."""
    from tailkd.registry import LOSSES

    module = tmp_path / "my_losses.py"
    module.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "from user_loss import register_amari\n\nregister_amari()\n")
    common = ("--loss", "amari", "--loss.module", str(module), "--fused-loss", "on", "--steps", "4")
    run, half = tmp_path / "run", tmp_path / "half"
    saved = dict(LOSSES)
    try:
        assert main(base_args(assets, run, *common, "--loss.options", "alpha=0.3", "--train.stop_after", "2")) == 0
        assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["options"] == {"alpha": 0.3}
        assert main(base_args(assets, half, *common, "--train.stop_after", "1")) == 0
        first = [r["loss"] for r in read_metrics(run) if r["split"] == "train"][0]
        assert first != [r["loss"] for r in read_metrics(half) if r["split"] == "train"][0]
        capsys.readouterr()
        for options, was in ((["--loss.options", "alpha=0.4"], "0.3, now 0.4"), ([], "0.3, now 0.5")):
            assert main(base_args(assets, run, *common, *options, "--resume")) == 2
            assert f"cannot resume {run}: loss.options.alpha was {was}" in capsys.readouterr().err
        assert main(base_args(assets, run, *common, "--loss.options", "alpha=0.3", "--resume")) == 0
        assert (run / "final").is_dir()
    finally:
        LOSSES.clear()
        LOSSES.update(saved)
        for name in [n for n in sys.modules if n.startswith("tailkd_user_losses_")]:
            del sys.modules[name]


def test_a_setting_only_the_saved_config_has_is_a_change():
    """`runs.config_changes` lists a key of the saved config that the new one lacks (an entry of a mapping such as
    loss.options that the run's loss now does not give), after the new config's own changed keys."""
    from tailkd.config import DistillConfig, absolute_paths, flatten, to_dict
    from tailkd.runs import config_changes

    cfg = DistillConfig()
    old = flatten(to_dict(absolute_paths(cfg)))
    assert config_changes(old, cfg, set()) == []
    old["loss.options.alpha"], old["loss.k"] = 0.5, 20
    assert config_changes(old, cfg, set()) == ["loss.k", "loss.options.alpha"]


def test_a_resume_with_changed_logging_eval_and_checkpoint_keys_is_bit_identical(assets, tmp_path):
    """`runs.RESUME_FREE_KEYS` of run control, logging, evaluation and checkpointing (and device auto, the CPU
    here) are accepted on --resume and change no bit: held-out evaluations and checkpoints between the steps leave
    the weights and every training line as they are."""
    full, parted = tmp_path / "full", tmp_path / "parted"
    common = ("--steps", "6", "--train.eval_every", "0", "--train.save_every", "0", "--device", "cpu")
    assert main(base_args(assets, full, *common)) == 0
    assert main(base_args(assets, parted, *common, "--train.stop_after", "3")) == 0
    assert main(base_args(assets, parted, *common, "--resume", "--device", "auto", "--train.eval_every", "1",
                          "--train.save_every", "1", "--train.keep_last", "1", "--train.log_every", "2",
                          "--train.max_bad_steps", "2")) == 0
    a, b = final_weights(full), final_weights(parted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = {r["step"]: (r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(full) if r["split"] == "train"}
    lb = {r["step"]: (r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(parted) if r["split"] == "train"}
    assert sorted(lb) == [1, 2, 3, 4, 6] and all(lb[s] == la[s] for s in lb)
    held = [r["step"] for r in read_metrics(parted) if r["split"] == "heldout"]
    assert held == [0, 4, 5, 6]


def test_forced_resume_trains_with_the_new_optimizer_settings(assets, tmp_path):
    """--resume --force with another lr, weight decay or AdamW betas trains with them from the resumed step (the
    config.yaml says so): loading the checkpoint's optimizer and schedule brought back the saved ones, so the run
    went on at the old lr while its config.yaml and the warning named the new one."""
    run = tmp_path / "run"
    assert main(base_args(assets, run, "--steps", "6", "--train.stop_after", "3")) == 0
    assert main(base_args(assets, run, "--steps", "6", "--resume", "--force", "--lr", "1e-3",
                          "--train.weight_decay", "0.5", "--train.adam_betas", "0.8", "0.9")) == 0
    lrs = [r["lr"] for r in read_metrics(run) if r["split"] == "train"]

    def cosine(lr, step, warmup=2, total=6, floor=0.1):  # warm-up 2 (base_args), then cosine to 10% of lr
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))

    assert lrs[:3] == pytest.approx([3e-3 / 2, 3e-3, cosine(3e-3, 2)], rel=1e-12)
    assert lrs[3:] == pytest.approx([cosine(1e-3, s) for s in (3, 4, 5)], rel=1e-12)
    from tailkd.checkpoint import STATE_FILE, find_checkpoint

    groups = torch.load(find_checkpoint(run)[0] / STATE_FILE, weights_only=False)["optimizer"]["param_groups"]
    assert [(tuple(g["betas"]), g["weight_decay"], g["initial_lr"]) for g in groups] == [
        ((0.8, 0.9), 0.5, 1e-3), ((0.8, 0.9), 0.0, 1e-3)]


def test_the_saved_config_continues_a_run_started_with_overwrite_or_resumed_with_force(assets, tmp_path):
    """``tailkd distill --config RUN/config.yaml --resume`` (the command a stopped run prints) continues the run
    however it was started. config.yaml kept the invocation's --overwrite (then 'train.resume and train.overwrite
    exclude each other') and a forced resume's --resume --force (after which every resume from it was forced
    without a word, and starting a new run from it said '--resume given but ... holds no run')."""
    import yaml

    run = tmp_path / "run"
    saved = str(run / "config.yaml")
    assert main(base_args(assets, run, "--steps", "1")) == 0
    assert main(base_args(assets, run, "--steps", "4", "--overwrite", "--train.stop_after", "1")) == 0
    assert main(["distill", "--config", saved, "--resume"]) == 0  # stop_after 1: the run's setting
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2]  # 1 more step, not up to step 1
    assert main(["distill", "--config", saved, "--resume", "--force", "--k", "5"]) == 0
    flags = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (flags["resume"], flags["overwrite"], flags["force_resume"]) == (False, False, False)
    assert main(["distill", "--config", saved, "--resume", "--k", "7"]) == 2  # a change still needs --force
    assert main(["distill", "--config", saved, "--resume", "--train.stop_after", "0"]) == 0
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4]
    assert main(["distill", "--config", saved, "--out", str(tmp_path / "new"), "--steps", "1"]) == 0


def _cli(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "tailkd.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("tailkd: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert needle in lines[-1], lines[-1]


def test_existing_run_is_never_clobbered(assets, tmp_path):
    run = tmp_path / "run"
    assert main(base_args(assets, run, "--steps", "2")) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _one_line_error(_cli(*base_args(assets, run, "--steps", "2")), "already exists")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize(
    "change, needle",
    [
        (["--teacher", "/nonexistent/teacher"], "/nonexistent/teacher"),
        (["--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
        (["--seq-len", "4096"], "seq"),
        (["--k", "0"], "loss.k"),
        (["--beta", "-1"], "loss.beta"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(assets, tmp_path, change, needle):
    run = tmp_path / "run"
    _one_line_error(_cli(*base_args(assets, run, "--steps", "2"), *change), needle)
    assert not run.exists()


def test_empty_corpus(assets, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    run = tmp_path / "run"
    _one_line_error(_cli(*base_args(assets, run, "--steps", "2"), "--data", str(empty)), "empty")
    assert not run.exists()


@pytest.mark.parametrize("first", [False, True])
def test_debug_shows_traceback(assets, tmp_path, first):
    """``--debug`` after the command or before it (as ``tailkd --debug distill ...``; it was refused: "unrecognized
    arguments: --debug; did you mean --debug?")."""
    args = (*base_args(assets, tmp_path / "run", "--steps", "2"), "--teacher", "/nonexistent/t")
    proc = _cli("--debug", *args) if first else _cli(*args, "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_version_and_help():
    proc = _cli("--version")
    assert proc.returncode == 0 and "tailkd" in proc.stdout
    proc = _cli("distill", "--help")
    assert proc.returncode == 0 and "--loss.k" in proc.stdout and "--resume" in proc.stdout


# --------------------------------------------------------------------------- data and schedule options (issue 14)


def _setup_data(assets, **data):
    from transformers import AutoTokenizer

    from tailkd.config import DataConfig, DistillConfig
    from tailkd.prepare import setup_data

    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    cfg = DistillConfig(data=DataConfig(**{"paths": [str(assets["corpus"])], "cache_dir": str(assets["cache"]),
                                           "seq_len": 32, **data}))
    return tok, setup_data(cfg, tok, 128)


def test_heldout_data_for_pretraining_replaces_the_heldout_split_only(assets, tmp_path):
    """--heldout-data in a pretraining run: held-out KL on a corpus of its own (every document of it), while the
    training rows, and so every training step, stay those of a run without it."""
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Document {i} of another source: the river rose and the bridge closed."
                                 for i in range(12)) + "\n")
    tok, (_, train_a, held_a) = _setup_data(assets)
    _, (_, train_b, held_b) = _setup_data(assets, heldout_paths=[str(other)])
    assert len(train_a) == len(train_b) and all(torch.equal(train_a[i]["input_ids"], train_b[i]["input_ids"])
                                                for i in range(len(train_a)))
    want = torch.tensor([t for doc in other.read_text().split("\n\n") if doc.strip()
                         for t in [*tok(doc.strip(), add_special_tokens=False)["input_ids"], tok.eos_token_id]])
    assert len(held_b) == (len(want) - 1) // 32 and torch.equal(held_b[0]["input_ids"], want[:32])

    plain, with_other = tmp_path / "plain", tmp_path / "other"
    assert main(base_args(assets, plain, "--steps", "3", "--train.precision", "fp32")) == 0
    assert main(base_args(assets, with_other, "--steps", "3", "--train.precision", "fp32", "--heldout-data",
                          str(other))) == 0
    a, b = read_metrics(plain), read_metrics(with_other)
    def losses(rows):
        return [(r["step"], r["loss"], r["clm"], r["div"]) for r in rows if r["split"] == "train"]

    assert losses(a) == losses(b) and len(losses(a)) == 3  # same rows, same steps (the run is deterministic)
    held_other = [r for r in b if r["split"] == "heldout"]
    assert held_other[0]["eval_tokens"] == min(8, len(held_b)) * 32
    assert held_other[-1]["kl"] != [r for r in a if r["split"] == "heldout"][-1]["kl"]
    # tailkd eval of the run reads the same held-out corpus (the run's data settings): the same rows and model,
    # only the batching may differ (fp32 in both, whatever the CPU; float32 sums of <= 8 x 32 token values:
    # ~1e-6 relative apart at most)
    proc = _cli("eval", "--student", str(with_other / "final"), "--max-rows", "8", "--out",
                str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["kl"] == pytest.approx(held_other[-1]["kl"], rel=1e-5)


def test_cache_dir_help_says_where_corpora_go(assets):
    """data.cache_dir is the root of tailkd's data cache: corpora land in <dir>/corpora (its help said the default
    was ~/.cache/tailkd/corpora, i.e. that the flag names the corpora folder itself, and left out $TAILKD_CACHE)."""
    from tailkd.config import DataConfig

    _, (info, _, _) = _setup_data(assets)
    assert info.dir.parent == Path(assets["cache"]) / "corpora"
    text = DataConfig.__dataclass_fields__["cache_dir"].metadata["help"]
    assert "<dir>/corpora" in text and "$TAILKD_CACHE, else ~/.cache/tailkd)" in text


def test_data_smaller_than_a_row_is_named_as_the_data(assets, tmp_path):
    """A --data corpus whose training or held-out split is shorter than one row: the error names that split of
    --data, then the cached token file (it named only corpora/<fingerprint>/train.bin)."""
    for split, docs, seq_len in (("training", 2, 64), ("held-out", 3, 64)):  # 14 tokens a document; 1 held out
        small = tmp_path / f"{docs}.txt"
        small.write_text("\n\n".join(f"Article {i}: the quick brown fox jumps over the lazy dog." for i in range(docs)))
        with pytest.raises(TailkdError, match=rf"^--data's {split} split \(its tokens: .*\.bin\) holds \d+ tokens, "
                                              rf"fewer than one row of --seq-len {seq_len} needs \({seq_len + 1}\); "):
            _setup_data(assets, paths=[str(small)], seq_len=seq_len)


def test_heldout_data_smaller_than_a_row_is_named(assets, tmp_path):
    """--heldout-data too short for one row: the error says it is the held-out data (it named only the cached
    corpora/<fingerprint>/train.bin, which reads as the training corpus)."""
    small = tmp_path / "small.txt"
    small.write_text("The quick brown fox.\n")
    with pytest.raises(TailkdError, match=r"train\.bin holds \d+ tokens, fewer than one row") as exc:
        _setup_data(assets, heldout_paths=[str(small)])
    assert str(exc.value).startswith(f"--heldout-data {small}: ")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")  # no documents: named as the held-out data too (it said "point data.paths at ...")
    with pytest.raises(TailkdError, match=rf"^--heldout-data {blank}: no documents in {blank}: every file is empty "
                                          r"or whitespace; pass files that hold text$"):
        _setup_data(assets, heldout_paths=[str(blank)])


def test_doc_eos_false_reads_one_continuous_stream(assets):
    tok, (info, train, held) = _setup_data(assets, doc_eos=False)
    assert info.eos_id is None
    ids = torch.cat([train[i]["input_ids"] for i in range(len(train))])
    assert not (ids == tok.eos_token_id).any()
    assert all(not train[i]["segment_ids"].any() for i in range(len(train)))
    _, (info_eos, train_eos, _) = _setup_data(assets)
    assert info_eos.fingerprint != info.fingerprint and len(train_eos) > len(train)  # the EOS tokens are gone


def test_epochs_set_the_schedule_length(assets, tmp_path):
    _, (_, train, _) = _setup_data(assets)
    run = tmp_path / "run"
    assert main(base_args(assets, run, "--train.epochs", "0.25", "--train.eval_every", "0")) == 0
    steps = math.ceil(0.25 * len(train) / 4)  # 4 rows per step
    assert steps > 1
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == list(range(1, steps + 1))
    assert f"max_steps: {steps}" in (run / "config.yaml").read_text()


def test_per_document_needs_document_boundaries(assets, tmp_path):
    _one_line_error(_cli(*base_args(assets, tmp_path / "run", "--steps", "2"), "--loss.per_document", "true",
                         "--data.doc_eos", "false"), "doc_eos")
    _one_line_error(_cli(*base_args(assets, tmp_path / "run", "--steps", "2"), "--train.epochs", "-1"),
                    "train.epochs")


def test_compile_gives_the_eager_run_and_logs_attention(assets, tmp_path, capsys, monkeypatch):
    """--train.compile (torch.compile of the decoder stacks, in place): the first step's loss is the eager one's up
    to float32 reassociation by the compiler (2-layer model, 4 x 32 tokens: ~1e-6 relative at most; later steps
    may differ by Adam's sign-like first updates, so only step 1 is compared); the saved student is a plain one.

    Its own inductor cache: the shared one (/tmp/torchinductor_$USER) may hold kernels another process built for
    another CPU capability (ATEN_CPU_CAPABILITY, as when a CPU without native bf16 is emulated), which the cache
    serves here anyway (measured with torch 2.13: NaN losses or a corrupted heap)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = ("--steps", "2", "--train.precision", "fp32", "--train.eval_every", "0")
    assert main(base_args(assets, eager, *common)) == 0
    capsys.readouterr()
    assert main(base_args(assets, compiled, *common, "--train.compile", "true")) == 0
    log = capsys.readouterr().out
    assert "attention: student sdpa, teacher sdpa; compiled (torch.compile)" in log
    a, b = (next(r for r in read_metrics(run) if r["split"] == "train") for run in (eager, compiled))
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert set(final_weights(compiled)) == set(final_weights(eager))  # no _orig_mod. prefixes


def test_activation_checkpointing_trains_the_same_student(assets, tmp_path, capsys):
    """--train.activation_checkpointing 1 through the fused loss layer (the student's final hidden states): the
    recompute runs the same operations on the same inputs, so the run's losses and saved student are bit for bit the
    plain run's; the log says which layers recompute; resuming with it changed is free (the same result)."""
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    common = ("--steps", "2", "--train.eval_every", "0", "--train.fused_loss", "on")
    assert main(base_args(assets, plain, *common)) == 0
    capsys.readouterr()
    assert main(base_args(assets, checkpointed, *common, "--train.activation_checkpointing", "1")) == 0
    out = capsys.readouterr()
    assert "activation checkpointing: 2 of the student's 2 layers recompute their activations" in out.out
    assert "use_cache" not in out.out + out.err
    a, b = (read_metrics(run) for run in (plain, checkpointed))
    assert [(r["step"], r["loss"]) for r in a if r["split"] == "train"] == \
        [(r["step"], r["loss"]) for r in b if r["split"] == "train"]
    wa, wb = final_weights(plain), final_weights(checkpointed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert main(base_args(assets, plain, "--steps", "3", "--train.eval_every", "0", "--train.fused_loss", "on",
                          "--train.activation_checkpointing", "1", "--resume")) == 0
    assert [r["step"] for r in read_metrics(plain) if r["split"] == "train"] == [1, 2, 3]


def test_adamw_is_fused_on_cuda_only():
    from tailkd.config import DistillConfig
    from tailkd.prepare import make_optimizer

    model = torch.nn.Linear(4, 4)
    assert not make_optimizer(model, DistillConfig()).defaults["fused"]
    if torch.cuda.is_available():
        assert make_optimizer(model.cuda(), DistillConfig()).defaults["fused"]


def test_disable_dropout_trains_as_without_dropout_and_saves_the_config_as_built(assets, tmp_path):
    """``--train.disable_dropout``: a student built from a teacher whose config sets attention dropout 0.3 trains
    bit for bit as one built from the same teacher with 0.0 (final weights, losses), while without the flag its
    dropout changes the result; its saved config keeps 0.3 (the config it was built with), and the log says so."""
    dropped = tmp_path / "teacher-dropout"
    shutil.copytree(assets["teacher"], dropped)
    config = json.loads((dropped / "config.json").read_text())
    assert config["attention_dropout"] == 0.0
    (dropped / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    from safetensors.torch import load_file

    def run(name, teacher, *extra):
        out = tmp_path / name
        args = base_args({**assets, "teacher": teacher}, out, "--steps", "2", "--train.deterministic", "true", *extra)
        assert main(args) == 0
        return out, load_file(str(out / "final" / "model.safetensors"))

    (_, plain), (off, quiet), (_, noisy) = (run("plain", assets["teacher"]),
                                            run("off", dropped, "--train.disable_dropout", "true"),
                                            run("on", dropped))
    assert all(torch.equal(plain[k], quiet[k]) for k in plain)
    assert not all(torch.equal(plain[k], noisy[k]) for k in plain)
    assert json.loads((off / "final" / "config.json").read_text())["attention_dropout"] == 0.3
    assert [r["loss"] for r in read_metrics(off) if r["split"] == "train"] == \
        [r["loss"] for r in read_metrics(tmp_path / "plain") if r["split"] == "train"]
