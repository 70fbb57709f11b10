"""``tailkd reproduce`` end to end on tiny models: every run, evaluation and figure, the report's numbers taken
from the runs, a kill (SIGKILL, mid-way) and a resume, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny import make_teacher_dir, read_metrics, write_corpus

from tailkd.cli import main
from tailkd.command_config import ReproduceConfig
from tailkd.reproduce import plan


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    other = root / "other.txt"
    other.write_text(write_corpus(root / "unused.txt", n_docs=20).read_text().replace("the", "a"))
    return {"teacher": make_teacher_dir(root / "teacher"), "corpus": write_corpus(root / "corpus.txt"),
            "other": other, "cache": root / "cache"}


def _args(assets, out):
    return ["reproduce", "--teacher", str(assets["teacher"]), "--data", str(assets["corpus"]), "--heldout-data",
            str(assets["other"]), "--cache-dir", str(assets["cache"]), "--seq-len", "32", "--data.eval_rows", "4",
            "--student.num_layers", "1", "--steps", "4", "--train.eval_every", "2", "--train.warmup_steps", "1",
            "--train.save_every", "2", "--train.batch_size", "2", "--seeds", "0", "1", "--betas", "1", "2",
            "--ks", "5", "10", "--eval-rows", "4", "--out", str(out)]


def test_plan_names_every_run_once():
    cfg = ReproduceConfig()
    names = [e.name for e in plan(cfg)]
    assert names[:3] == ["clm-s0", "kd-s0", "tad-s0"] and len(names) == len(set(names)) == 9 + 3 + 2
    assert {"tad-beta0p5-s0", "tad-beta4-s0", "tad-k5-s0", "tad-k20-s0"} <= set(names)
    tad = next(e for e in plan(cfg) if e.name == "tad-k20-s0").cfg
    assert (tad.loss.k, tad.loss.beta, tad.train.seed, tad.data.heldout_paths) == (20, 2.0, 0, ["builtin:pydoc"])
    cfg.reproduce.scale = 2.5
    assert plan(cfg)[0].cfg.train.max_steps == 100 and plan(cfg)[0].cfg.train.eval_every == 25  # 40, 10 scaled


def test_reproduce_killed_then_resumed_writes_the_report(assets, tmp_path):
    out = tmp_path / "rep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tailkd.cli", *_args(assets, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "runs" / "kd-s0" / "checkpoints").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way through a run: no handler, nothing flushed
    proc.wait()
    assert not (out / "report.md").exists()
    assert main(_args(assets, out)) == 0
    names = ["clm-s0", "kd-s0", "tad-s0", "clm-s1", "kd-s1", "tad-s1", "tad-beta1-s0", "tad-k5-s0"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(names)
    for name in names:
        run = out / "runs" / name
        steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
        assert steps == [1, 2, 3, 4], name  # the killed run resumed: every step once
        assert (run / "final" / "config.json").is_file() and (run / "eval.json").is_file()
        assert not (run / "checkpoints").exists()  # pruned once every run had finished
    report = (out / "report.md").read_text()
    numbers = json.loads((out / "report.json").read_text())
    for png in ("fig1_heldout_kl.png", "fig2_tail_mass.png", "sweeps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in report
    ev = {n: json.loads((out / "runs" / n / "eval.json").read_text()) for n in names}
    want = [100 * (ev[f"tad-s{s}"]["kl"] / ev[f"kd-s{s}"]["kl"] - 1) for s in (0, 1)]
    assert numbers["paired"]["tad_vs_kd_kl_percent"] == pytest.approx(want, rel=1e-12)
    assert numbers["beta_sweep"] == pytest.approx({"1.0": ev["tad-beta1-s0"]["kl"], "2.0": ev["tad-s0"]["kl"]})
    assert numbers["k_sweep"] == pytest.approx({"5": ev["tad-k5-s0"]["kl"], "10": ev["tad-s0"]["kl"]})
    assert f"below KD's in **{sum(w < 0 for w in want)} of 2** seeds" in report
    # the held-out data is the other corpus: the evaluations say so
    assert all(e["rows"] >= 1 for e in ev.values())
    # a second invocation redoes nothing but the report
    before = {n: (out / "runs" / n / "eval.json").stat().st_mtime_ns for n in names}
    assert main(_args(assets, out)) == 0
    assert before == {n: (out / "runs" / n / "eval.json").stat().st_mtime_ns for n in names}


@pytest.mark.parametrize("extra, needle", [(["--seeds"], "seeds"), (["--ks", "0"], "reproduce.ks"),
                                           (["--betas", "-1"], "reproduce.betas"), (["--scale", "0"], "scale")])
def test_bad_input_is_one_line(assets, tmp_path, extra, needle):
    proc = subprocess.run([sys.executable, "-m", "tailkd.cli", *_args(assets, tmp_path / "r"), *extra],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and needle in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "r").exists()


def test_the_gpu_config_loads():
    """configs/reproduce/paper-qwen-1.8b-gpu.yaml: the paper's §3.2.1 sizes through tailkd reproduce (nothing runs)."""
    from pathlib import Path

    from tailkd.cli import build_parser
    from tailkd.config import config_from_args

    path = Path(__file__).resolve().parents[1] / "configs" / "reproduce" / "paper-qwen-1.8b-gpu.yaml"
    cfg = config_from_args(build_parser().parse_args(["reproduce", "--config", str(path)]), ReproduceConfig)
    runs = plan(cfg)
    assert len(runs) == 14 and {r.cfg.train.max_steps for r in runs} == {7630}
    assert {(r.cfg.data.seq_len, r.cfg.student.num_layers, r.cfg.teacher.path) for r in runs} == {
        (2048, 20, "/models/Qwen1.5-1.8B")}
