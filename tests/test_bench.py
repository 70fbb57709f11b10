"""The CPU-runnable benchmark scripts of bench/ run, at tiny sizes, as their docstrings and bench/RESULTS.md say."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tiny import make_teacher_dir

ROOT = Path(__file__).resolve().parents[1]


def _bench(script, *args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *(
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_bench_e2e_runs_every_mode(tmp_path):
    """bench_e2e.py end to end on a tiny teacher (the built-in news corpus, tokenised by it, in a fresh cache)."""
    teacher = make_teacher_dir(tmp_path / "teacher", train_steps=0)
    out = tmp_path / "e2e.json"
    proc = _bench("bench_e2e.py", "--teacher", str(teacher), "--student-layers", "1", "--seq-len", "16",
                  "--batch-size", "2", "--steps", "1", "--threads", "1", "--work", str(tmp_path / "work"),
                  "--out", str(out), env={"TAILKD_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = json.loads(out.read_text())["modes"]
    assert list(modes) == ["online/dense", "online/fused", "cache-topk/dense", "cache-topk/fused",
                           "cache-samples/fused", "cache-hidden/fused"]
    assert all(len(m["all_s"]) == 1 and math.isfinite(m["mean_loss"]) for m in modes.values())


def test_bench_fused_names_every_cell_it_does_not_measure_and_exits_1(tmp_path):
    """A cell above --max-elements, or a peer that cannot be imported (here a liger_kernel that fails to import), is
    named on stderr and in --out's not_measured, and the exit status is 1; the cells that could run are measured."""
    small = ["--threads", "1", "--vocab", "500", "--tokens", "64", "--hidden", "16", "--chunk", "32", "--repeats", "1"]
    out = tmp_path / "skipped.json"
    proc = _bench("bench_fused.py", *small, "--max-elements", "1000", "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "NOT MEASURED: V=500 N=64: N·V = 3.2e+04 is above --max-elements 1e+03" in proc.stderr
    result = json.loads(out.read_text())
    assert result["cells"] == [] and len(result["not_measured"]) == 1
    broken = tmp_path / "site" / "liger_kernel"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('liger_kernel cannot be loaded here')\n")
    out = tmp_path / "peer.json"
    proc = _bench("bench_fused.py", *small, "--losses", "kd", "--methods", "tailkd_fused", "liger", "--no-memory",
                  "--out", str(out), env={"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(tmp_path / "site")])})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "NOT MEASURED: V=500 N=64 kd liger: ImportError: liger_kernel cannot be loaded here" in proc.stderr
    result = json.loads(out.read_text())
    assert [(c["loss"], c["method"]) for c in result["cells"]] == [("kd", "tailkd_fused")]
    assert len(result["not_measured"]) == 1
    # every cell measured: exit 0
    proc = _bench("bench_fused.py", *small, "--losses", "kd", "tad", "--methods", "tailkd_dense", "tailkd_fused",
                  "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["cells"]) == 4 and result["not_measured"] == []
    assert all(c["peak_bytes"] is not None for c in result["cells"])
