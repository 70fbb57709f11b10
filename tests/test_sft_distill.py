"""Supervised distillation through the trainer: response-only targets, the two-stage recipe, the CLM baseline."""

import json
import shutil

import pytest
import torch
from tiny import SENTENCES, make_teacher_dir, read_metrics, write_corpus
from transformers import AutoModelForCausalLM

from tailkd.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    teacher = make_teacher_dir(root / "teacher")
    corpus = write_corpus(root / "corpus.txt")
    pairs = root / "pairs.jsonl"
    with open(pairs, "w") as fh:
        for i in range(80):
            a, b = SENTENCES[i % len(SENTENCES)], SENTENCES[(3 * i + 1) % len(SENTENCES)]
            fh.write(json.dumps({"prompt": f"Q{i % 7}: {a}\n", "response": f" {b}"}) + "\n")
    return {"teacher": teacher, "corpus": corpus, "pairs": pairs, "cache": root / "cache"}


def sft_args(assets, out, *extra):
    return ["distill", "--task", "sft", "--teacher", str(assets["teacher"]), "--data", str(assets["pairs"]),
            "--data.cache_dir", str(assets["cache"]), "--student-layers", "2", "--seq-len", "96",
            "--batch-size", "4", "--lr", "3e-3", "--train.warmup_steps", "2", "--data.eval_rows", "8",
            "--data.heldout_fraction", "0.2", "--train.precision", "fp32", "--out", str(out), *extra]


@pytest.mark.parametrize("loss", ["tad", "drkl", "clm"])
def test_sft_distill_learns_and_counts_only_responses(assets, tmp_path, loss):
    run = tmp_path / loss
    assert main(sft_args(assets, run, "--loss", loss, "--steps", "15")) == 0
    held = [r for r in read_metrics(run) if r["split"] == "heldout"]
    assert held[-1]["student_clm"] < held[0]["student_clm"]
    # Held-out tokens are response tokens only: far fewer than rows x seq_len.
    assert 0 < held[0]["eval_tokens"] < 8 * 96 / 2
    assert AutoModelForCausalLM.from_pretrained(run / "final").config.num_hidden_layers == 2


def test_sft_truncation_is_a_tailkd_warning_line(assets, tmp_path, capsys):
    """`sft.prepare_sft`'s warning of examples cut to --seq-len prints as tailkd's other warnings do, one
    ``tailkd: warning: SFT data: ...`` line on stderr, not Python's ``.../sft.py:LINE: UserWarning: ...`` with the
    caller's source line under it."""
    assert main(sft_args(assets, tmp_path / "run", "--loss", "kd", "--steps", "1", "--seq-len", "40")) == 0
    err = capsys.readouterr().err.splitlines()
    lines = [x for x in err if "SFT data:" in x]
    assert len(lines) == 1 and lines[0].startswith("tailkd: warning: SFT data: ") and "truncated to --seq-len 40" in \
        lines[0], err
    assert not any("UserWarning" in x or "prepare_sft(" in x for x in err), err


def test_two_stage_recipe(assets, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    common = {"teacher": {"path": str(assets["teacher"])},
              "train": {"batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "precision": "fp32"},
              "data": {"cache_dir": str(assets["cache"]), "eval_rows": 4}}
    stages = [{"name": "domain", "student": {"num_layers": 2},
               "data": {"task": "pretrain", "paths": [str(assets["corpus"])], "seq_len": 32},
               "train": {"max_steps": 6}},
              {"name": "sft", "data": {"task": "sft", "paths": [str(assets["pairs"])], "seq_len": 96,
                                       "heldout_fraction": 0.2}, "train": {"max_steps": 6}}]
    import yaml

    recipe.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "runs"), "common": common, "stages": stages}))
    assert main(["recipe", str(recipe)]) == 0
    domain, sft = tmp_path / "runs" / "domain", tmp_path / "runs" / "sft"
    assert (domain / "final").is_dir() and (sft / "final").is_dir()
    cfg = yaml.safe_load((sft / "config.yaml").read_text())
    assert cfg["student"]["path"] == str(domain / "final") and cfg["data"]["task"] == "sft"
    # Stage 2 trained on from stage 1's student (chained above): its weights moved away from it.
    first = AutoModelForCausalLM.from_pretrained(domain / "final")
    second = AutoModelForCausalLM.from_pretrained(sft / "final")
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    # Re-running the recipe skips finished stages.
    assert main(["recipe", str(recipe)]) == 0


def test_eval_generate_on_an_sft_run(assets, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(sft_args(assets, run, "--loss", "kd", "--steps", "2")) == 0
    out = tmp_path / "gen.json"
    assert main(["eval", "--student", str(run / "final"), "--generate", "--max-new-tokens", "8", "--gen-limit", "3",
                 "--samples", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "generate" and result["examples"] == 3
    # the prompts decoded: the run's held-out pairs (it said "run/built-in held-out", a string where eval.json
    # has a list of paths)
    assert result["data"] == [str(assets["pairs"])] and result["split"] == "heldout"
    for side in ("student", "teacher"):
        assert 0.0 <= result[f"{side}_exact_match"] <= 1.0
        assert 0.0 <= result[f"{side}_distinct_1"] <= 1.0
    assert "exact_match" in capsys.readouterr().out


def test_sweep_recipe_evaluates_and_compares_every_stage(assets, tmp_path, capsys):
    """chain: false: every stage from the same start; then tailkd eval --generate of each and tailkd compare."""
    import yaml

    recipe = tmp_path / "sweep.yaml"
    common = {"teacher": {"path": str(assets["teacher"])}, "student": {"num_layers": 2},
              "data": {"task": "sft", "paths": [str(assets["pairs"])], "seq_len": 96, "heldout_fraction": 0.2,
                       "cache_dir": str(assets["cache"]), "eval_rows": 4},
              "train": {"batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "precision": "fp32", "max_steps": 3,
                        "on_policy": 0.5, "on_policy_max_new_tokens": 8}}
    doc = {"out_dir": str(tmp_path / "runs"), "chain": False, "common": common,
           "stages": [{"name": "fkl", "loss": {"name": "kd"}}, {"name": "rkl", "loss": {"name": "rkl"}}],
           "evaluate": {"generate": {"enabled": True, "max_new_tokens": 6, "limit": 3, "samples": 2}},
           "compare": {"compare": {"baseline": "fkl"}}}
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["recipe", str(recipe), "--set", "train.max_steps=2"]) == 0
    runs = tmp_path / "runs"
    for name in ("fkl", "rkl"):
        cfg = yaml.safe_load((runs / name / "config.yaml").read_text())
        assert cfg["student"]["path"] is None and cfg["train"]["max_steps"] == 2  # same start; --set applied
        result = json.loads((runs / name / "generate.json").read_text())
        assert result["mode"] == "generate" and 0.0 <= result["student_rougeL"] <= 1.0
    table = (runs / "compare" / "compare.md").read_text()
    assert "fkl" in table and "rkl" in table and "ROUGE-L" in table
    assert (runs / "compare" / "fidelity_diversity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["recipe", str(recipe), "--set", "train.max_steps=2"]) == 0  # all done: nothing runs again
    out = capsys.readouterr().out
    assert out.count("already done") == 4
    # other evaluate: settings: the evaluations on disk are not passed off as theirs (refused before anything runs)
    doc["evaluate"]["generate"]["limit"] = 2
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["recipe", str(recipe), "--set", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"tailkd: error: {runs / 'fkl' / 'generate.json'} was made with generate.limit=3, but the recipe's "
                   f"evaluate now gives 2; delete {runs / 'fkl' / 'generate.json'} to evaluate again with these "
                   "settings, or choose another --out")
    (runs / "fkl" / "generate.json").unlink()
    (runs / "rkl" / "generate.json").unlink()
    shutil.rmtree(runs / "rkl" / "final")  # rkl is trained again (resumed: it writes its outputs)
    rkl_before = json.loads((runs / "rkl" / "summary.json").read_text())
    assert main(["recipe", str(recipe), "--set", "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "stage fkl: already done" in out and "stage rkl: resuming" in out
    assert "stage fkl: evaluating" in out and "stage rkl: evaluating" in out
    for name in ("fkl", "rkl"):
        assert json.loads((runs / name / "generate.json").read_text())["examples"] == 2
    # evaluations of the same settings are kept, but not that of a stage trained again
    shutil.rmtree(runs / "rkl" / "final")
    assert main(["recipe", str(recipe), "--set", "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "stage fkl: evaluation already done" in out and "stage rkl: evaluating" in out
    assert rkl_before["steps"] == json.loads((runs / "rkl" / "summary.json").read_text())["steps"]


def test_recipe_errors_before_any_stage_runs(assets, tmp_path, capsys):
    import yaml

    recipe = tmp_path / "bad.yaml"
    doc = {"out_dir": str(tmp_path / "runs"), "chain": False,
           "common": {"teacher": {"path": str(assets["teacher"])}, "data": {"task": "sft"}},
           "stages": [{"name": "a", "loss": {"name": "kd"}}], "evaluate": {"generate": {"max_new_tokens": 0}}}
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["recipe", str(recipe)]) == 2
    assert "generate.max_new_tokens=0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main(["recipe", str(recipe), "--set", "train_max_steps=3"]) == 2
    assert "must look like section.key=value" in capsys.readouterr().err
