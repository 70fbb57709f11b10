"""Supervised distillation through the trainer: response-only targets, the two-stage recipe, the CLM baseline, a
teacher cache of SFT rows."""

import json
import re
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


def _cache_sft(assets, out, *extra, data=None):
    """``tailkd cache-teacher`` over the rows `sft_args` trains on (K = 8; ``data``: other pairs)."""
    assert main(["cache-teacher", "--task", "sft", "--teacher", str(assets["teacher"]), "--data",
                 str(data or assets["pairs"]), "--data.cache_dir", str(assets["cache"]), "--seq-len", "96",
                 "--data.heldout_fraction", "0.2", "--k", "8", "--out", str(out), "--device", "cpu", *extra]) == 0


def _train_rows(assets, data, mode):
    from tailkd.config import DistillConfig
    from tailkd.models import load_teacher
    from tailkd.prepare import setup_data

    cfg = DistillConfig()
    cfg.data.task, cfg.data.paths, cfg.data.cache_dir = "sft", [str(data)], str(assets["cache"])
    cfg.data.seq_len, cfg.data.heldout_fraction, cfg.data.sft_mode = 96, 0.2, mode
    model, tok = load_teacher(str(assets["teacher"]), dtype="fp32")
    return model, tok, setup_data(cfg, tok, None, prompt_only=False)[1]


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_a_teacher_cache_of_sft_rows_holds_the_teachers_top_k_of_every_training_row(assets, tmp_path, mode):
    """cache-teacher --task sft caches the rows an SFT run trains on, in its order (pad: one example a row, pack:
    several, of shorter pairs): one cached row per training row, the rows' digest as the cache's corpus
    (`SFTRows.input_digest`), every row's hash equal, and at the response positions the loss reads the teacher's
    top-8 ids of the online forward of that row (the cache ran the rows in batches of 8, the online forward all at
    once)."""
    from tailkd import cache
    from tailkd import data as data_mod

    out = tmp_path / "c"
    data = assets["pairs"]
    if mode == "pack":  # pairs of ~10 tokens: several a row
        data = tmp_path / "short.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "response": f" {i * 7}"}) + "\n" for i in range(90)))
    _cache_sft(assets, out, "--data.sft_mode", mode, data=data)
    model, tok, rows = _train_rows(assets, data, mode)
    meta = json.loads((out / "cache.json").read_text())
    assert meta["num_rows"] == len(rows) > 1 and meta["corpus"]["fingerprint"] == rows.input_digest
    assert meta["corpus"]["settings"] == {"task": "sft", "sft_mode": mode, "rendering": "plain"}
    batch = data_mod.collate([rows[i] for i in range(len(rows))])
    got = cache.open_cache(out, tokenizer=tok, corpus_fingerprint=rows.input_digest, seq_len=96, k=8,
                           teacher_model=model, rows=len(rows)).rows(range(len(rows)), input_ids=batch["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[..., : len(tok)]
    top = torch.topk(logits, 9, dim=-1)
    # positions whose top-9 logits lie 1e-4 apart or more: an order no float32 rounding of these |z| ≲ 30 logits
    # (γ_64 ≈ 4e-6 relative per 64-term dot product, in another blocking) can change; most positions
    apart = (top.values[..., :-1] - top.values[..., 1:]).min(-1).values > 1e-4
    response = (batch["labels"] != -100) & apart
    assert int(response.sum()) > 0.9 * int((batch["labels"] != -100).sum())
    assert (max(map(len, rows.rows)) > 1) == (mode == "pack")  # examples per row
    assert torch.equal(got["topk_ids"].long()[response], top.indices[..., :8][response])


def test_an_sft_run_from_a_cache_of_hidden_states_is_the_online_run(assets, tmp_path, capsys):
    """`tailkd distill --task sft --teacher-cache` reads the cache of its rows (each batch's row hashes checked) and,
    from fp32 hidden states, trains as the online teacher does: the same losses step by step. Both runs compute the
    teacher's logits by the same float32 ops on the same rows, in batches of 8 (cache) or 4 (run); the blocking of a
    64-term dot product may differ (γ_64 ≈ 4e-6 of its magnitude per layer): 1e-4 relative holds both runs' losses
    over the 4 steps with room. A top-K cache gives the K+1 bucket loss (D_KL1), a lower bound of the online TAD."""

    hidden, topk = tmp_path / "cache-hidden", tmp_path / "cache-topk"
    _cache_sft(assets, hidden, "--hidden-states", "--hidden-dtype", "fp32")
    _cache_sft(assets, topk)
    capsys.readouterr()
    runs = {}
    for name, extra in (("online", []), ("hidden", ["--teacher-cache", str(hidden)]),
                        ("topk", ["--teacher-cache", str(topk)])):
        assert main(sft_args(assets, tmp_path / name, "--loss", "tad", "--k", "8", "--steps", "4", *extra)) == 0
        runs[name] = [r for r in read_metrics(tmp_path / name) if r["split"] == "train"]
    out = capsys.readouterr().out
    assert f"teacher signal: teacher cache {hidden}: tad: exact" in out
    assert f"teacher signal: teacher cache {topk}: tad: D_KL1 only" in out
    assert [r["step"] for r in runs["hidden"]] == [1, 2, 3, 4]
    for a, b in zip(runs["hidden"], runs["online"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["clm"] == pytest.approx(b["clm"], rel=1e-4)
    assert runs["topk"][0]["div"] < runs["online"][0]["div"]  # D_KL1 without the tail term
    assert runs["topk"][0]["clm"] == pytest.approx(runs["online"][0]["clm"], rel=1e-6)  # the same student at step 1


def test_a_teacher_cache_of_other_rows_is_refused_before_any_model_loads(assets, tmp_path, capsys):
    """The cache's rows against the run's before any model loads (`prepare.train_corpus_fingerprint`: the SFT files
    tokenised): another held-out split, split seed, file, or (named: their digests differ too) packing, a cache of
    packed text for an SFT run and of SFT rows for a pretraining run, a held-out cache — one line each, exit 2, no run
    folder. cache-teacher reads --heldout-data only with --task sft (a pretraining corpus's rows do not depend on
    it)."""
    from tiny import no_model_loads

    from tailkd import cache

    sft_cache, text_cache, held_cache = tmp_path / "sft", tmp_path / "text", tmp_path / "held"
    _cache_sft(assets, sft_cache)
    _cache_sft(assets, held_cache, "--split", "heldout")
    assert main(["cache-teacher", "--teacher", str(assets["teacher"]), "--data", str(assets["corpus"]),
                 "--data.cache_dir", str(assets["cache"]), "--seq-len", "96", "--k", "8", "--out", str(text_cache),
                 "--device", "cpu"]) == 0
    other = tmp_path / "other.jsonl"
    other.write_text("".join(line + "\n" for line in assets["pairs"].read_text().splitlines()[:-1]))
    capsys.readouterr()
    run = tmp_path / "run"
    digests = (r"does not match this run: its corpus is [0-9a-f]{12}, the run's is [0-9a-f]{12}; rebuild it with "
               r"tailkd cache-teacher for this run's teacher, data and --seq-len")
    cases = [(["--data.heldout_fraction", "0.3", "--teacher-cache", str(sft_cache)], sft_cache, digests),
             (["--data.split_seed", "3", "--teacher-cache", str(sft_cache)], sft_cache, digests),
             (["--data", str(other), "--teacher-cache", str(sft_cache)], sft_cache, digests),
             (["--data.sft_mode", "pack", "--teacher-cache", str(sft_cache)], sft_cache,
              r"holds SFT rows of --data.sft_mode pad, the run's are pack: rebuild it with tailkd cache-teacher "
              r"--data.sft_mode pack, or run with --data.sft_mode pad"),
             (["--teacher-cache", str(text_cache)], text_cache,
              r"holds packed text rows, this run trains on SFT rows \(cache-teacher --task sft\): rebuild it with "
              r"tailkd cache-teacher --task sft, or run with --task pretrain"),
             (["--task", "pretrain", "--data", str(assets["corpus"]), "--teacher-cache", str(sft_cache)], sft_cache,
              r"holds SFT rows \(cache-teacher --task sft\), this run trains on packed text rows: rebuild it with "
              r"tailkd cache-teacher --task pretrain, or run with --task sft"),
             (["--teacher-cache", str(held_cache)], held_cache,
              r"does not match this run: its split is 'heldout', the run's is 'train'; a run reads the train rows: "
              r"rebuild it with tailkd cache-teacher --split train")]
    with no_model_loads("the cache's rows were checked"):
        for extra, used, line in cases:
            assert main(sft_args(assets, run, "--loss", "kd", "--k", "8", "--steps", "1", *extra)) == 2, extra
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and re.fullmatch(
                rf"tailkd: error: teacher cache {re.escape(str(used))} {line}", err[0]), (extra, err)
            assert not run.exists()
        assert main(["cache-teacher", "--teacher", str(assets["teacher"]), "--data", str(assets["corpus"]),
                     "--heldout-data", str(assets["corpus"]), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tailkd: error: --heldout-data is read by cache-teacher only with "
                                                   "--task sft"), err
    assert cache.read_meta(sft_cache)["corpus"]["fingerprint"] != cache.read_meta(text_cache)["corpus"]["fingerprint"]


def test_cache_teacher_reads_sft_data_with_the_students_tokenizer_and_its_files_before_the_teacher(assets, tmp_path,
                                                                                                    capsys):
    """A run with --student DIR reads SFT data with the student's tokenizer, whose chat template may differ from the
    teacher's (one vocabulary, so the tokenizers' fingerprints agree): a cache of the teacher's rendering is refused
    before any model loads, the line naming `cache-teacher --tokenizer DIR`, and the cache written with it serves the
    run. cache-teacher reads the SFT files (a bad line, an unknown built-in set) before the teacher loads, as distill
    does, and refuses a --tokenizer whose vocabulary the teacher's extends."""
    from tiny import make_tokenizer, no_model_loads

    student = shutil.copytree(assets["teacher"], tmp_path / "student")
    config = json.loads((student / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    (student / "tokenizer_config.json").write_text(json.dumps(config))
    teachers, students = tmp_path / "teacher-rendering", tmp_path / "student-rendering"
    _cache_sft(assets, teachers)
    _cache_sft(assets, students, "--tokenizer", str(student))
    assert json.loads((students / "cache.json").read_text())["corpus"]["settings"]["rendering"] == "chat"
    capsys.readouterr()
    run = sft_args(assets, tmp_path / "run", "--student", str(student), "--loss", "kd", "--k", "8", "--steps", "2")
    at = run.index("--student-layers")
    del run[at:at + 2]  # the student is loaded
    with no_model_loads("the cache's rows were checked"):
        assert main([*run, "--teacher-cache", str(teachers)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"(this run reads its SFT data with the student's tokenizer, whose "
                                             f"chat template is not the teacher's: cache-teacher --tokenizer "
                                             f"{student})"), err
    assert main([*run, "--teacher-cache", str(students)]) == 0
    assert f"teacher signal: teacher cache {students}: kd: D_KL1 only" in capsys.readouterr().out
    # a student of the teacher's own template: rows that differ otherwise are not put down to the tokenizer
    same = shutil.copytree(assets["teacher"], tmp_path / "same-template")
    run[run.index(str(student))] = str(same)
    run[run.index(str(tmp_path / "run"))] = str(tmp_path / "run-same")
    with no_model_loads("the cache's rows were checked"):
        assert main([*run, "--data.heldout_fraction", "0.3", "--teacher-cache", str(teachers)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its corpus is" in err[0] and "--tokenizer" not in err[0], err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(assets["pairs"].read_text().splitlines()[0] + '\n{"prompt": "x", \n')
    narrower = shutil.copytree(assets["teacher"], tmp_path / "narrower")
    make_tokenizer(290).save_pretrained(narrower)  # 290 of the teacher's 300 ids: its vocabulary extends this one
    cases = [(["--data", str(bad)], f"tailkd: error: {bad}:2: not valid JSON"),
             (["--data", "builtin:pydoc"], "tailkd: error: unknown built-in data 'builtin:pydoc'; the built-in SFT "
                                           "sets are builtin:math, builtin:instruct"),
             (["--data", str(assets["pairs"]), "--tokenizer", str(narrower)],
              f"tailkd: error: --tokenizer {narrower} does not have the teacher's vocabulary; a teacher cache "
              "holds one shared vocabulary: pass the folder of the student you give tailkd distill --student")]
    with no_model_loads("the SFT files were read"):
        for extra, start in cases:
            assert main(["cache-teacher", "--task", "sft", "--teacher", str(assets["teacher"]), "--out",
                         str(tmp_path / "never"), "--device", "cpu", *extra]) == 2, extra
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(start), (extra, err)
    assert not (tmp_path / "never").exists()
