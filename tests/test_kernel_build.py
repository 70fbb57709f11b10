"""The Triton row kernels compile for a Hopper GPU (sm_90) on a machine without one; those of every chunk hold no
register spills.

`bench/kernel_report.py --check` compiles every variant `tailkd.kernels` launches with the installed triton's
compiler and the ptxas its Linux wheel bundles, for the launch `kernels.launch` picks on CUDA (CI has no GPU: this
is where a kernel that the interpreter accepts but the compiler rejects, or one that spills, is caught). It runs in
a subprocess because the interpreter must be off there, and this test process may have imported the kernels
interpreted (tests/test_kernels.py). About 15 s.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_hopper_without_spills(tmp_path):
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton without its NVIDIA backend binaries (not the Linux wheel)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--check", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["date"] == datetime.date.today().isoformat() and report["versions"]["triton"] == triton.__version__
    rows = {r["variant"]: r for r in report["rows"]}
    assert len(rows) == 21 and all("error" not in r for r in rows.values())  # every launch tailkd.kernels makes
    hot = [r for name, r in rows.items() if "split sequences only" not in name]
    assert len(hot) == 20 and all(r["stack"] == r["local"] == 0 for r in hot)  # (--check: no spill in the
    # default per-chunk kernels; nor, at their launches, in the two-stage top-K's (A/B) stages)
    # stage A of the two-stage top-K is KD's statistics pass storing its block sums: the same transcendental work
    assert rows["stats: tad two-stage, stage A (A/B)"]["mufu"] == rows["stats: kd/rkl/jsd"]["mufu"]
    # TAD's gradient pass on its common rows does KD's transcendental work per element (q and p: one exp each; 𝒦's
    # columns found by its last entry: no exp); its top-K and tail sums ride on the statistics pass. Its per-row maths
    # (`kernels._tad_row`), outside the loop over V, adds one: p on 𝒦 (a [KP] exp); α^T and α^T/α^S are exponentiated
    # in float64 (libdevice's exp: no MUFU)
    per_row = 1
    assert rows["tad K=10: value + G"]["mufu"] == rows["kd: value + G"]["mufu"] + per_row
