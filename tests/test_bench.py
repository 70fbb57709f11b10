"""The benchmark scripts of bench/ on the CPU, at tiny sizes, as their docstrings and bench/RESULTS.md say: they run,
state the date, machine and versions, and refuse, or exit 1 naming it, what they cannot measure.

Here: bench_e2e, bench_fused and bench_losses end to end; bench_gpu's torch cells (its value check); bench_kernels'
refusal without CUDA. Not here (minutes of Triton's interpreter or of `tailkd distill` runs): the interpreted dry
runs of bench_gpu and bench_kernels and bench_gpu_distill --tiny, which `DRY=1 bench/gpu_check.sh` runs;
bench/kernel_report.py --check is tests/test_kernel_build.py."""

import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_teacher_dir

ROOT = Path(__file__).resolve().parents[1]


def _bench(script, *args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *(
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_bench_e2e_runs_every_mode(tmp_path):
    """bench_e2e.py end to end on a tiny teacher (the built-in news corpus, tokenised by it, in a fresh cache); its
    --out states the date and versions; without --work its temporary folder of caches is removed at the end (it was
    left behind: ~126 MB per run at RESULTS.md's size); settings that cannot give a figure are refused before any
    work, in one line."""
    teacher = make_teacher_dir(tmp_path / "teacher", train_steps=0)
    out = tmp_path / "e2e.json"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"TAILKD_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp)}
    args = ["--teacher", str(teacher), "--student-layers", "1", "--seq-len", "16", "--batch-size", "2",
            "--threads", "1"]
    proc = _bench("bench_e2e.py", *args, "--steps", "1", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp.glob("tailkd-e2e-*")) == []
    result = json.loads(out.read_text())
    assert result["date"] == datetime.date.today().isoformat() and result["python"] == platform.python_version()
    assert result["versions"]["transformers"] and result["cpu_count"] == os.cpu_count()
    assert result["date"] in proc.stdout.splitlines()[0]
    for bad, why in ((["--steps", "0"], "--steps must be at least 1"),
                     (["--k", "65"], "--k 65 is above --cache-k 64")):
        proc = _bench("bench_e2e.py", *args, *bad, env=env)
        assert proc.returncode == 2 and why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    modes = result["modes"]
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


SMALL = ["--threads", "1", "--vocab", "500", "--tokens", "64", "--hidden", "16", "--chunk", "32", "--repeats", "1"]


def test_bench_fused_states_date_machine_and_versions_and_reports_without_a_dense_cell(tmp_path):
    """--out states the date, Python, the CPU and the peers' versions (RESULTS.md's Machine/Software/Date lines come
    from it), and --report of a run without tailkd_dense (e.g. --methods tailkd_fused liger, --help's example) gives
    its table with × tailkd dense as n/a instead of failing."""
    out = tmp_path / "fused.json"
    proc = _bench("bench_fused.py", *SMALL, "--losses", "kd", "--methods", "tailkd_fused", "--no-memory",
                  "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["date"] == datetime.date.today().isoformat()
    assert result["python"] == platform.python_version() and result["torch"]
    assert {"liger-kernel", "torchtune", "trl", "transformers"} <= set(result["versions"])
    assert result["cpu"] and result["cpu_count"] == os.cpu_count()
    assert result["date"] in proc.stdout.splitlines()[0]
    proc = _bench("bench_fused.py", "--report", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 500 | 64 | kd | tailkd_fused |" in proc.stdout and "| n/a |" in proc.stdout


def test_bench_fused_refuses_what_it_cannot_measure_with_one_line(tmp_path):
    """N that is not a whole number of rows is refused up front with one line (it failed deep in the library, naming
    a wrong hidden width); --paired with nothing to pair to fused KD, and a peer report of files without peer
    cells, exit 1 saying so (they exited 0 with an empty result)."""
    proc = _bench("bench_fused.py", *SMALL[:5], "80", *SMALL[6:], "--losses", "kd", "--methods", "tailkd_fused")
    assert proc.returncode == 2 and "--tokens 80 is not a multiple of the row length 32" in proc.stderr
    assert "Traceback" not in proc.stderr
    out = tmp_path / "paired.json"
    proc = _bench("bench_fused.py", *SMALL, "--paired", "--losses", "kd", "--methods", "tailkd_fused",
                  "--out", str(out))
    assert proc.returncode == 1 and "nothing was measured" in proc.stderr, proc.stderr[-3000:]
    proc = _bench("bench_fused.py", *SMALL, "--losses", "kd", "--methods", "tailkd_fused", "--no-memory",
                  "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _bench("bench_fused.py", "--report-peers", str(out))
    assert proc.returncode == 1 and "no cell of these files has tailkd_fused beside a peer" in proc.stderr
    proc = _bench("bench_fused.py", *SMALL, "--paired", "--device", "cuda", "--out", str(out))
    assert proc.returncode == 2 and "--paired times on the CPU" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_gpu_files_carry_the_value_check(tmp_path):
    """A cell whose loss differs from tailkd_dense's is an error in OUT.json and OUT.md, not only on stderr (the
    check ran after the files were written, which then showed it as a measurement). Here tailkd_fused_torch's
    loss is scaled by 1.01, beyond the CPU tolerance 1e-4; CPU dry run, no Triton cell."""
    out = tmp_path / "gpu"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_gpu; real = bench_gpu._tailkd\n"
            "bench_gpu._tailkd = lambda m, *a: real(m, *a) * (1.01 if m == 'tailkd_fused_torch' else 1.0)\n"
            "sys.exit(bench_gpu.main(sys.argv[2:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench"), "--device", "cpu", "--tokens", "16",
                           "--vocab", "50", "--hidden", "8", "--methods", "tailkd_dense", "tailkd_fused_torch",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1 and "differs from tailkd_dense's" in proc.stderr, proc.stderr[-3000:]
    cells = json.loads((tmp_path / "gpu.json").read_text())["cells"]
    assert [c["method"] for c in cells if "error" in c] == ["tailkd_fused_torch"] * 3
    table = (tmp_path / "gpu.md").read_text()
    assert table.count("ERROR loss") == 3 and datetime.date.today().isoformat() in table.splitlines()[0]


def test_bench_gpu_refuses_methods_without_the_reference_column(tmp_path):
    """--methods without tailkd_dense would leave every cell's loss unchecked: refused in one line, exit 2, no file."""
    proc = _bench("bench_gpu.py", "--device", "cpu", "--tokens", "16", "--vocab", "50", "--hidden", "8", "--methods",
                  "tailkd_fused_torch", "--out", str(tmp_path / "gpu"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--methods must include tailkd_dense (each cell's loss is checked against it)" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_bench_kernels_refuses_cuda_without_a_gpu_in_one_line(tmp_path):
    """The default --device cuda on a machine without CUDA: one line and exit 1 (was a traceback from torch)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    proc = _bench("bench_kernels.py", "--rows", "4", "--vocab", "100", "--out", str(tmp_path / "k"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == "bench_kernels: --device cuda but no CUDA device is visible; use --device cpu " \
                                  "for the dry run (Triton's interpreter)"


def test_bench_losses_quick_states_its_setting_and_refuses_bad_sizes():
    """--quick (RESULTS.md's smoke run) prints the date, versions and CPU, a table row and the accuracy line; sizes
    that would measure nothing (an empty --vocab: an empty table and exit 0 before), mismatched lists or N not a
    multiple of its 4 rows (which measured 4·⌊N/4⌋ tokens under N's label) are refused with one line."""
    proc = _bench("bench_losses.py", "--quick", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = proc.stdout.splitlines()[0]
    assert datetime.date.today().isoformat() in head and torch.__version__ in head
    assert "| 4096 | 128 |" in proc.stdout and "max rel. error direct tail sum" in proc.stdout
    for args, why in ((["--vocab", "--tokens"], "--vocab needs at least one size"),
                      (["--vocab", "1000", "2000", "--tokens", "64"], "one --tokens per --vocab (2 and 1 given)"),
                      (["--vocab", "1000", "--tokens", "66"], "--tokens 66 is not a multiple of 4"),
                      (["--repeats", "0"], "--repeats must be at least 1"),
                      (["--quick", "--vocab", "1000", "--tokens", "66"], "--tokens 66 is not a multiple of 4")):
        proc = _bench("bench_losses.py", *args)
        assert proc.returncode == 2 and why in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_bench_losses_quick_keeps_the_sizes_given():
    """--quick sets only what is not given: explicit sizes and repeats are measured and labelled as asked (they were
    replaced by its 4096 x 128 silently)."""
    proc = _bench("bench_losses.py", "--quick", "--vocab", "512", "--tokens", "32", "--repeats", "1", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 512 | 32 |" in proc.stdout and "| 4096 |" not in proc.stdout


def test_bench_kernels_refuses_a_malformed_launch_in_one_line(tmp_path):
    """--configs takes 'default' or BLOCKxWARPS; anything else is one line and exit 2 (was a ValueError traceback)."""
    for bad in ("2048", "axb", "2048x4x2", "0x4"):
        proc = _bench("bench_kernels.py", "--device", "cpu", "--rows", "4", "--vocab", "100", "--configs", bad,
                      "--out", str(tmp_path / "k"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (bad, proc.stderr[-3000:])
        assert f"--configs: {bad!r} is not 'default' or BLOCKxWARPS" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())
