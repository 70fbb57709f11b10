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
