"""Faults: real SIGKILLs (one while a checkpoint is half written) and resumes give the weights of an
uninterrupted run bit for bit; SIGINT/SIGTERM save and exit 130/143; corrupted checkpoints are named and
skipped; a full disk leaves the previous checkpoint intact; non-finite steps are skipped and counted."""

import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_runs import _Sampler
from tiny import dead_pid, make_teacher_dir, read_metrics, write_corpus

from tailkd import checkpoint as ckpt
from tailkd.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"teacher": make_teacher_dir(root / "teacher"), "corpus": write_corpus(root / "corpus.txt"),
            "cache": root / "cache", "root": root}


def args(assets, out, *extra, steps=12):
    return ["distill", "--teacher", str(assets["teacher"]), "--data", str(assets["corpus"]),
            "--data.cache_dir", str(assets["cache"]), "--student-layers", "2", "--seq-len", "32",
            "--batch-size", "4", "--lr", "3e-3", "--train.warmup_steps", "2", "--data.eval_rows", "4",
            "--train.eval_every", "0", "--steps", str(steps), "--train.save_every", "4", "--train.keep_last", "3",
            "--train.deterministic", "--device", "cpu", "--out", str(out), *extra]


def weights(path: Path) -> dict:
    return load_file(str(path))


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def train_losses(run: Path) -> list:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if r["split"] == "train"]


# --------------------------------------------------------------------------- real processes, real signals

STEPS = 48  # long enough to be killed mid-run several times; ~tens of ms per step


def spawn(argv, **env):
    """The CLI in a process of its own, SIGINT and SIGTERM at their defaults there as in a terminal, however the
    suite was started (a shell's background job starts with SIGINT ignored, which the run then keeps ignoring)."""
    return subprocess.Popen([sys.executable, "-m", "tailkd.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, **env}, preexec_fn=_default_signals)


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    steps = [int(ln.split('"step": ')[1].split(",")[0])
             for ln in lines if '"split": "train"' in ln and ln.endswith("}")]
    return max(steps, default=-1)


def wait_for(proc, predicate, what: str, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def half_written(run: Path) -> bool:
    root = run / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-step_") and (p / ckpt.MODEL_FILE).is_file()
                                 for p in root.iterdir())


@pytest.fixture(scope="module")
def reference(assets):
    run = assets["root"] / "reference"
    proc = subprocess.run([sys.executable, "-m", "tailkd.cli", *args(assets, run, steps=STEPS)], capture_output=True,
                          text=True, env=ENV, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_weights(assets, reference, tmp_path):
    run = tmp_path / "run"
    kills = [
        ({}, lambda: last_step(run) >= 3, "step 3 (before the first checkpoint)"),
        ({}, lambda: last_step(run) >= 17, "step 17"),
        ({"TAILKD_TEST_CHECKPOINT_PAUSE": "120"}, lambda: half_written(run), "a half-written checkpoint"),
        ({}, lambda: last_step(run) >= 38, "step 38"),
    ]
    for i, (env, ready, what) in enumerate(kills):
        proc = spawn(args(assets, run, *(["--resume"] if i else []), steps=STEPS), **env)
        wait_for(proc, ready, what)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, what
        if env:  # killed inside the writer: a temporary folder, never a half checkpoint under a real name
            assert half_written(run)
            for path in ckpt.list_checkpoints(run):
                assert ckpt.verify_checkpoint(path) is None, path
    proc = spawn(args(assets, run, "--resume", steps=STEPS))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # leftovers cleaned up
    assert_identical(weights(reference / "final" / "model.safetensors"), weights(run / "final" / "model.safetensors"))
    assert train_losses(run) == train_losses(reference)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_and_exits_with_a_resume_hint(assets, reference, tmp_path, sig, code):
    run = tmp_path / "run"
    proc = spawn(args(assets, run, steps=STEPS))
    wait_for(proc, lambda: last_step(run) >= 6, "step 6")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("tailkd:")]
    assert f"stopped by {sig.name} after step" in lines[-1] and "--resume" in lines[-1], lines
    assert "Traceback" not in err
    step = last_step(run)
    assert 6 <= step < STEPS and not (run / "final").exists()
    saved = ckpt.list_checkpoints(run)[-1]
    assert saved.name == f"step_{step:08d}" and ckpt.verify_checkpoint(saved) is None
    proc = spawn(args(assets, run, "--resume", steps=STEPS))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert_identical(weights(reference / "final" / "model.safetensors"), weights(run / "final" / "model.safetensors"))


def test_a_recipe_stopped_by_a_signal_exits_143_and_the_same_command_continues(assets, tmp_path):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    common = {"teacher": {"path": str(assets["teacher"])},
              "data": {"paths": [str(assets["corpus"])], "cache_dir": str(assets["cache"]), "seq_len": 32,
                       "eval_rows": 4},
              "train": {"batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 0, "save_every": 4,
                        "device": "cpu"}}
    stages = [{"name": "a", "student": {"num_layers": 2}, "train": {"max_steps": STEPS}},
              {"name": "b", "train": {"max_steps": 2}}]
    recipe.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "runs"), "common": common, "stages": stages}))
    first = tmp_path / "runs" / "a"
    proc = spawn(["recipe", str(recipe)])
    wait_for(proc, lambda: last_step(first) >= 6, "step 6 of the first stage")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # a script running the recipe must not go on as if it had finished
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tailkd: recipe stopped"), err[-1000:]
    assert not (first / "final").exists() and not (tmp_path / "runs" / "b").exists()
    proc = spawn(["recipe", str(recipe)])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert (first / "final").is_dir() and (tmp_path / "runs" / "b" / "final").is_dir()


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(assets, tmp_path):
    """The second SIGINT is sent once the run has said it saw the first (as a user presses Ctrl-C again after the
    message): two sent before Python's handler runs — the main thread still inside the C code writing the student
    file, on a loaded machine — are one signal to it (CPython keeps a flag per signal, not a count), and the run
    then goes on into the test's 120 s pause."""
    run = tmp_path / "run"
    proc = spawn(args(assets, run, steps=STEPS), TAILKD_TEST_CHECKPOINT_PAUSE="120")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    wait_for(proc, lambda: half_written(run), "the first checkpoint write")
    proc.send_signal(signal.SIGINT)  # the first: noted, the write goes on
    end = time.monotonic() + 60
    while not any("SIGINT received" in ln for ln in lines) and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    assert proc.poll() is None, f"the first SIGINT ended the run (rc {proc.returncode}): {''.join(lines)[-2000:]}"
    assert any("SIGINT received" in ln for ln in lines), f"no word of the first SIGINT: {''.join(lines)[-2000:]}"
    assert half_written(run), sorted(p.name for p in (run / "checkpoints").iterdir())
    proc.send_signal(signal.SIGINT)  # the second: out at once, the half-written checkpoint removed
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT received" in err and err.strip().splitlines()[-1] == "tailkd: interrupted", err[-2000:]
    assert not half_written(run) and ckpt.list_checkpoints(run) == [], sorted(p.name for p in run.rglob("*"))


def test_sigterm_outside_a_training_loop_unwinds_says_one_line_and_exits_143(tmp_path, monkeypatch, capsys):
    """Any command but distill's loop: SIGTERM used to end the process at once (Python's default), leaving its
    temporary folders and saying nothing. Now its finally blocks run, one line, 143; a second SIGTERM is not caught."""
    from tailkd import commands

    work = tmp_path / "work"
    seen = {}

    def command(cfg):
        work.mkdir()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal interrupts this
            raise AssertionError("SIGTERM did not stop the command")
        finally:
            seen["second"] = signal.getsignal(signal.SIGTERM)
            shutil.rmtree(work)

    monkeypatch.setattr(commands, "flops", command)
    def callers(signum, frame):  # the caller's own handler (pytest has none): main's must take its place
        pass

    previous = signal.signal(signal.SIGTERM, callers)
    try:
        code = main(["flops", "--teacher-params", "1e9", "--student-params", "1e8", "--vocab", "1000",
                     "--hidden", "64"])
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["tailkd: terminated (SIGTERM)"] and "Traceback" not in err
    assert not work.exists()  # the command's cleanup ran
    assert seen["second"] is signal.SIG_DFL  # a second SIGTERM during the cleanup ends the process at once
    assert after is callers  # the caller's handler is back


def test_deterministic_mode_touches_nothing_when_off_and_restores_the_callers_setting(monkeypatch):
    """``train.deterministic`` off: the flag is neither set nor restored (setting it imports torch._dynamo, which
    made an interrupted run's unwinding take seconds). On: set for the block, then the caller's value and its
    warn_only are put back."""
    from tailkd import runs

    calls = []
    real = torch.use_deterministic_algorithms
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append((a, k)))
    with runs.deterministic_mode(False):
        pass
    assert calls == []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", real)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with runs.deterministic_mode(True):
            assert torch.are_deterministic_algorithms_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(False)
        with runs.deterministic_mode(True):
            assert torch.are_deterministic_algorithms_enabled()
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# --------------------------------------------------------------------------- checkpoints: corruption, full disk


@pytest.fixture(scope="module")
def short_reference(assets):
    run = assets["root"] / "short"
    assert main(args(assets, run)) == 0
    return run


def test_corrupted_checkpoints_are_named_and_the_previous_good_one_is_used(assets, short_reference, tmp_path,
                                                                           capsys):
    run = tmp_path / "run"
    assert main(args(assets, run, "--train.stop_after", "10")) == 0
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step_00000004", "step_00000008", "step_00000010"]
    newest = run / "checkpoints" / "step_00000010" / ckpt.MODEL_FILE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    middle = run / "checkpoints" / "step_00000008" / ckpt.STATE_FILE
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    middle.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(args(assets, run, "--resume")) == 0
    cap = capsys.readouterr()
    assert "skipping checkpoint" in cap.err and "step_00000010" in cap.err and "step_00000008" in cap.err
    assert "truncated or corrupted" in cap.err
    assert "from step_00000004 (step 4)" in cap.out
    assert_identical(weights(short_reference / "final" / "model.safetensors"),
                     weights(run / "final" / "model.safetensors"))
    assert train_losses(run) == train_losses(short_reference)


def test_no_usable_checkpoint_is_a_one_line_error(assets, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(args(assets, run, "--train.stop_after", "4")) == 0
    (run / "checkpoints" / "step_00000004" / ckpt.MANIFEST).unlink()
    capsys.readouterr()
    assert main(args(assets, run, "--resume")) == 2
    err = capsys.readouterr().err
    assert "tailkd: error: none of the 1 checkpoints" in err and "--overwrite" in err


def test_disk_full_while_saving_keeps_the_previous_checkpoint(assets, short_reference, tmp_path, capsys,
                                                              monkeypatch):
    run = tmp_path / "run"
    calls = []

    def full_disk(tensors, filename, *a, **kw):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\0" * 100)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return save_file(tensors, filename, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    assert main(args(assets, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tailkd: error: could not write checkpoint") and "No space left on device" in err[-1]
    assert "previous checkpoint, which is intact" in err[-1]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000004"]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_00000004") is None
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert main(args(assets, run, "--resume")) == 0
    assert_identical(weights(short_reference / "final" / "model.safetensors"),
                     weights(run / "final" / "model.safetensors"))


def _on_tmpfs(*paths: Path, page: int = 4096) -> int:
    """Bytes the files (folders: their files) take on a tmpfs: each file rounded up to whole pages."""
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return sum(-(-f.stat().st_size // page) * page for f in files)


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size_bytes) -> a folder on a tmpfs of that size; resize(size_bytes) grows it. Root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the fault-injection tests below cover the same paths)")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
        mounted.append(mnt)
        return mnt

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    yield mount, resize
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)


def test_a_really_full_disk_while_saving_keeps_the_previous_checkpoint(assets, short_reference, small_tmpfs,
                                                                       capsys):
    """A tmpfs that holds the run up to its first checkpoint and the next checkpoint's weights, but only half of
    its trainer state (optimizer moments): torch's zip writer fails there with a RuntimeError of its own, which
    must still read as the documented disk-full message. Then the disk grows and --resume finishes the run,
    bit-identical to an uninterrupted one."""
    first = short_reference / "checkpoints" / "step_00000004"
    model_bytes = (first / ckpt.MODEL_FILE).stat().st_size
    trainer_bytes = (first / ckpt.STATE_FILE).stat().st_size
    # the run folder at step 4: config, student table, metrics (the whole reference run's: a little more), the
    # first checkpoint
    at_step_4 = _on_tmpfs(*(short_reference / n for n in ("config.yaml", "student_init.json", "metrics.jsonl")),
                          first)
    mount, resize = small_tmpfs
    run = mount(at_step_4 + 4 * 4096 + model_bytes + trainer_bytes // 2) / "run"
    capsys.readouterr()
    assert main(args(assets, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"tailkd: error: could not write checkpoint {run}/checkpoints/step_00000008 (No space left on "
                       "device); free disk space and --resume from the previous checkpoint, which is intact")
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000004"]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_00000004") is None
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_identical(weights(run / "checkpoints" / "step_00000004" / ckpt.MODEL_FILE),
                     weights(first / ckpt.MODEL_FILE))  # the previous checkpoint loads, and is the reference's
    resize(64 << 20)
    assert main(args(assets, run, "--resume")) == 0
    assert "from step_00000004 (step 4)" in capsys.readouterr().out
    assert_identical(weights(short_reference / "final" / "model.safetensors"),
                     weights(run / "final" / "model.safetensors"))
    assert train_losses(run) == train_losses(short_reference)


class _FullDiskFile:
    """A binary file that takes ``budget`` bytes, then fails like a full disk (ENOSPC)."""

    def __init__(self, fh, budget: int):
        self.fh, self.left = fh, budget

    def write(self, data) -> int:
        if len(data) > self.left:
            self.fh.write(bytes(data)[: self.left])
            self.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


@pytest.mark.parametrize("budget", [0, 50, 10_000, 300_000, 401_000])
def test_save_torch_raises_the_oserror_behind_torchs_runtimeerror(tmp_path, monkeypatch, budget):
    """torch.save into a file that fills up raises RuntimeError("... unexpected pos ...") at most budgets (a bare
    OSError at a few); save_torch raises the ENOSPC either way."""
    import builtins

    obj = {"a": torch.randn(100_000), "b": {"c": torch.randn(1000)}}  # ~404 kB
    with builtins.open(tmp_path / "plain.pt", "wb") as fh, pytest.raises((RuntimeError, OSError)):
        torch.save(obj, _FullDiskFile(fh, budget))
    monkeypatch.setattr(ckpt, "open", lambda path, mode="r": _FullDiskFile(builtins.open(path, mode), budget),
                        raising=False)
    with pytest.raises(OSError) as caught:
        ckpt.save_torch(obj, tmp_path / "state.pt")
    assert caught.value.errno == errno.ENOSPC


def test_disk_full_inside_torch_save_is_the_documented_error(assets, short_reference, tmp_path, capsys,
                                                             monkeypatch):
    """Fault injection for machines where no small filesystem can be mounted: the trainer state's file takes
    100 kB, then ENOSPC; torch.save turns that into a RuntimeError, tailkd reports the OSError behind it."""
    import builtins

    run = tmp_path / "run"
    calls = []

    def open_then_fill(path, mode="r", *a, **kw):
        fh = builtins.open(path, mode, *a, **kw)
        if str(path).endswith(ckpt.STATE_FILE) and "w" in mode:
            calls.append(path)
            if len(calls) == 2:
                return _FullDiskFile(fh, 100_000)
        return fh

    monkeypatch.setattr(ckpt, "open", open_then_fill, raising=False)  # the module's name, not the builtin
    assert main(args(assets, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tailkd: error: could not write checkpoint") and "(No space left on device)" in err[-1]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000004"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert main(args(assets, run, "--resume")) == 0
    assert_identical(weights(short_reference / "final" / "model.safetensors"),
                     weights(run / "final" / "model.safetensors"))


def test_a_failed_write_of_the_final_outputs_resumes_into_writing_them(assets, short_reference, tmp_path, capsys,
                                                                       monkeypatch):
    from safetensors import SafetensorError

    real = ckpt.atomic_write_dir

    def full_at_final(final, write):
        if Path(final).name == "final":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(final, write)

    monkeypatch.setattr(ckpt, "atomic_write_dir", full_at_final)
    run = tmp_path / "run"
    assert main(args(assets, run)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"tailkd: error: could not write the run's outputs in {run} (No space left on device)")
    assert "--resume" in last and "step 12" in last
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    # the checkpoint the message names: the last step's, written by finish with the final held-out metrics (the loop
    # saves every 4 steps but leaves step 12 to finish); a resume from step 8 would train 4 steps again
    assert ckpt.list_checkpoints(run)[-1].name == "step_00000012"
    monkeypatch.undo()
    assert main(args(assets, run, "--resume")) == 0
    assert "past train.max_steps" not in capsys.readouterr().err  # at max_steps, not past it: no warning
    assert_identical(weights(short_reference / "final" / "model.safetensors"),
                     weights(run / "final" / "model.safetensors"))
    finals = [r for r in read_metrics(run) if r["split"] == "heldout" and r["step"] == 12]
    assert len(finals) == 1  # the final held-out metrics were kept in the checkpoint, not computed twice
    assert (run / "curves.png").is_file() and (run / "summary.json").is_file()


def test_a_resume_before_the_first_checkpoint_starts_the_metrics_again(assets, tmp_path, capsys):
    """A run killed before its first checkpoint (here: its checkpoints removed) resumes from step 0: the metrics lines
    it had written all go, the step-0 held-out line included (it is evaluated and written again), so that
    metrics.jsonl has one line per step and split."""
    run = tmp_path / "run"
    assert main(args(assets, run, "--train.stop_after", "2")) == 0
    shutil.rmtree(run / "checkpoints")
    assert main(args(assets, run, "--resume", "--train.stop_after", "1")) == 0
    assert f"{run} has no checkpoint yet: starting it from step 0" in capsys.readouterr().out
    assert [(r["step"], r["split"]) for r in read_metrics(run)] == [(0, "heldout"), (1, "train")]


def test_a_full_disk_while_appending_to_metrics_is_one_line_and_resume_continues(assets, short_reference, tmp_path,
                                                                               capsys, monkeypatch):
    """ENOSPC on an append to metrics.jsonl (the line of step 6, after checkpoint 4): one line naming the file and
    the fix, exit 2; the --resume it advises ends with the uninterrupted run's weights."""
    from tailkd import runs

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            if '"step": 6,' in text:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(text)

    def full_at_step_6(path, mode="r", *a, **kw):
        fh = open(path, mode, *a, **kw)
        return FullDisk(fh) if Path(path).name == "metrics.jsonl" and mode == "a" else fh

    monkeypatch.setattr(runs, "open", full_at_step_6, raising=False)
    run = tmp_path / "run"
    assert main(args(assets, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"tailkd: error: could not append to {run / 'metrics.jsonl'} ({os.strerror(errno.ENOSPC)}); "
                       "free disk space and continue with --resume from the last checkpoint")
    assert max(r["step"] for r in read_metrics(run)) == 5
    monkeypatch.undo()
    assert main(args(assets, run, "--resume")) == 0
    assert_identical(weights(short_reference / "final" / "model.safetensors"),
                     weights(run / "final" / "model.safetensors"))
    assert [s for s, _ in train_losses(run)] == list(range(1, 13))


def _two_layers(frozen_first: bool, optimizer=torch.optim.AdamW):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(not frozen_first)
    optimizer = optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def test_a_resume_continues_the_random_streams_of_the_checkpoint(tmp_path):
    """A student with dropout draws from the global random generators at every step: runs.restore puts back the
    Python, NumPy and torch states the checkpoint saved, so the draws after a resume are those after the save."""
    import random

    import numpy as np

    from tailkd import runs

    model, optimizer, scheduler = _two_layers(frozen_first=False)
    runs.save(tmp_path, model, optimizer, scheduler, _Sampler(), runs.Progress(step=1), keep_last=2)
    after_save = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # what a new process's set-up draws meanwhile
    runs.restore(tmp_path, model, model, optimizer, scheduler, _Sampler())
    after_restore = (random.random(), np.random.rand(), torch.rand(3))
    assert after_restore[:2] == after_save[:2] and torch.equal(after_restore[2], after_save[2])


def test_a_checkpoint_of_other_shapes_is_named_by_the_weight_that_differs(tmp_path):
    """load_checkpoint refuses weights of the student's names but other shapes (a student.hidden_size changed under
    --force), naming the weight and both shapes, before the optimizer sees them."""
    from tailkd.errors import TailkdError

    path = ckpt.save_checkpoint(tmp_path, 1, torch.nn.Linear(3, 2).state_dict(), {}, keep_last=1)
    with pytest.raises(TailkdError, match=r"weight has shape \(2, 3\), the student \(4, 3\)"):
        ckpt.load_checkpoint(path, torch.nn.Linear(3, 4))
    # weights the student lacks (a checkpoint of a student with a bias, loaded into one without) are refused too
    with pytest.raises(TailkdError, match=r"does not fit this student \(missing \[\], unexpected \['bias'\]\)"):
        ckpt.load_checkpoint(path, torch.nn.Linear(3, 2, bias=False))


def test_a_checkpoint_keeps_views_of_one_storage_at_other_offsets(tmp_path):
    """Tied weights (one tensor, several names) are saved once; views of one storage at other offsets (e.g. the
    halves of a fused tensor) are other weights, each saved."""
    base = torch.arange(4.0)
    path = ckpt.save_checkpoint(tmp_path, 1, {"a": base[:2], "b": base[2:], "tied": base[:2]}, {}, keep_last=1)
    saved = load_file(str(path / ckpt.MODEL_FILE))
    assert sorted(saved) == ["a", "b"] and torch.equal(saved["b"], torch.tensor([2.0, 3.0]))


def test_a_checkpoint_whose_optimizer_state_does_not_fit_is_a_one_line_error(tmp_path):
    """A checkpoint saved with a frozen layer (student.freeze_embeddings) resumed with --force without it: the
    optimizer has no saved state for the unfrozen weights. A TailkdError naming the checkpoint, the weight and the
    fix (it quoted torch's advice 'use StateDictOptions(strict=False)', which a user cannot follow). Any other
    state torch refuses (here AdamW's loaded into SGD) is the same line with torch's reason."""
    from tailkd import runs
    from tailkd.errors import TailkdError

    model, optimizer, scheduler = _two_layers(frozen_first=True)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    runs.save(tmp_path, model, optimizer, scheduler, _Sampler(), runs.Progress(step=1), keep_last=2)
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    model, optimizer, scheduler = _two_layers(frozen_first=False)
    with pytest.raises(TailkdError) as info:
        runs.restore(tmp_path, model, model, optimizer, scheduler, _Sampler())
    assert str(info.value) == (f"checkpoint {checkpoint} does not fit this run's optimizer (it holds no state of "
                               "0.weight, which this run trains); resume with the run's own config")
    model, optimizer, scheduler = _two_layers(frozen_first=True, optimizer=lambda params, lr: torch.optim.SGD(
        params, lr=lr, momentum=0.9))
    with pytest.raises(TailkdError) as info:
        runs.restore(tmp_path, model, model, optimizer, scheduler, _Sampler())
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith("); resume with the run's own config")
    assert msg.startswith(f"checkpoint {checkpoint} does not fit this run's optimizer (")


def _tied_llama(frozen_embeddings: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    model.get_input_embeddings().requires_grad_(not frozen_embeddings)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trained if p.ndim >= 2]},
                                   {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}], lr=1e-3)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def test_tied_embeddings_frozen_in_the_checkpoint_and_trained_now_are_refused_at_the_resume(tmp_path):
    """--resume --force turning student.freeze_embeddings off, with tied embeddings: torch skips the shared weight
    missing from the checkpoint and loads the other moments shifted by one place (q_proj's onto the embeddings), and
    the first step failed with 'RuntimeError: The size of tensor a (64) must match the size of tensor b (300)',
    exit 1 (moments of equal shapes would have been swapped silently). It is refused when the checkpoint loads."""
    from tailkd import runs
    from tailkd.errors import TailkdError

    model, optimizer, scheduler = _tied_llama(frozen_embeddings=True)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    runs.save(tmp_path, model, optimizer, scheduler, _Sampler(), runs.Progress(step=1), keep_last=2)
    model, optimizer, scheduler = _tied_llama(frozen_embeddings=False)
    with pytest.raises(TailkdError) as info:
        runs.restore(tmp_path, model, model, optimizer, scheduler, _Sampler())
    assert str(info.value) == (f"checkpoint {tmp_path / 'checkpoints' / 'step_00000001'} does not fit this run's "
                               "optimizer (it holds no state of model.embed_tokens.weight, which this run trains); "
                               "resume with the run's own config")
    # the other way (embeddings trained in the checkpoint, frozen now) loads every moment onto its own weight
    model, optimizer, scheduler = _tied_llama(frozen_embeddings=False)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    runs.save(tmp_path / "b", model, optimizer, scheduler, _Sampler(), runs.Progress(step=1), keep_last=2)
    model, optimizer, scheduler = _tied_llama(frozen_embeddings=True)
    runs.restore(tmp_path / "b", model, model, optimizer, scheduler, _Sampler())
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for g in optimizer.param_groups for p in g["params"])


def test_a_kill_between_the_two_renames_of_a_replaced_checkpoint_is_repaired(tmp_path):
    state = {"w": torch.arange(4.0)}
    good = ckpt.save_checkpoint(tmp_path, 4, state, {"step": 4}, keep_last=3)
    # A re-save of step 4 moved the old folder aside and was killed before the new one was renamed in.
    os.replace(good, good.with_name(".old-step_00000004-999"))
    tmp = good.with_name(".tmp-step_00000004-abc")
    tmp.mkdir()
    (tmp / ckpt.MODEL_FILE).write_bytes(b"partial")
    assert ckpt.list_checkpoints(tmp_path) == []
    ckpt.clean_partial_writes(tmp_path)
    assert ckpt.list_checkpoints(tmp_path) == [good] and ckpt.verify_checkpoint(good) is None
    assert sorted(p.name for p in good.parent.iterdir()) == ["step_00000004"]
    # a kill after the new folder was renamed in, before the old one was removed: the old one goes, the new stays
    aside = good.with_name(".old-step_00000004-999")
    aside.mkdir()
    (aside / ckpt.MODEL_FILE).write_bytes(b"the replaced one")
    ckpt.clean_partial_writes(tmp_path)
    assert sorted(p.name for p in good.parent.iterdir()) == ["step_00000004"] and ckpt.verify_checkpoint(good) is None


@pytest.mark.parametrize("manifest", [b"[" * 100_000 + b"]" * 100_000, b"\xff{}", b"[1]"])
def test_a_damaged_manifest_makes_a_checkpoint_unusable_not_a_traceback(tmp_path, manifest):
    """`verify_checkpoint` names a manifest nested past Python's parser (a RecursionError before, which stopped the
    resume instead of falling back to an older checkpoint), not UTF-8, or not an object as unreadable."""
    good = ckpt.save_checkpoint(tmp_path, 4, {"w": torch.arange(4.0)}, {"step": 4}, keep_last=3)
    (good / ckpt.MANIFEST).write_bytes(manifest)
    assert ckpt.verify_checkpoint(good) in ("missing or unreadable manifest.json",
                                            f"manifest.json does not list {ckpt.MODEL_FILE} and {ckpt.STATE_FILE}")


def test_pruning_never_deletes_the_checkpoint_just_written_for_a_newer_corrupted_one(tmp_path):
    """A resume skips a corrupted newest checkpoint (step 8) and continues from step 4; its next checkpoint (step 5)
    was pruned with keep_last=1 (keep_last may change on --resume) because step 8 sorts after it, leaving only the
    corrupted one: the next --resume found nothing usable and the run had to start again. Pruning keeps the last
    keep_last checkpoints up to the one just written; the newer one is replaced when the run reaches its step."""
    state = {"w": torch.arange(4.0)}
    ckpt.save_checkpoint(tmp_path, 4, state, {"step": 4}, keep_last=2)
    bad = ckpt.save_checkpoint(tmp_path, 8, state, {"step": 8}, keep_last=2)
    (bad / ckpt.MODEL_FILE).write_bytes(b"corrupted")
    assert ckpt.find_checkpoint(tmp_path)[0].name == "step_00000004"
    new = ckpt.save_checkpoint(tmp_path, 5, state, {"step": 5}, keep_last=1)
    assert ckpt.find_checkpoint(tmp_path)[0] == new and ckpt.verify_checkpoint(new) is None
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000005", "step_00000008"]


def test_the_newest_checkpoint_that_verifies_is_found_and_newer_bad_ones_named(tmp_path):
    """find_checkpoint: the newest of steps 1, 2, 3 whose files match its manifest — step 2 when step 3's trainer
    state is cut short — with step 3 named as skipped; a file named like a checkpoint is none, and a manifest that
    does not list both files makes a checkpoint unusable."""
    state = {"w": torch.arange(4.0)}
    steps = [ckpt.save_checkpoint(tmp_path, i, state, {"step": i}, keep_last=3) for i in (1, 2, 3)]
    assert ckpt.find_checkpoint(tmp_path) == (steps[2], [])
    (steps[2] / ckpt.STATE_FILE).write_bytes((steps[2] / ckpt.STATE_FILE).read_bytes()[:-1])
    found, skipped = ckpt.find_checkpoint(tmp_path)
    assert found == steps[1] and [p for p, _ in skipped] == [steps[2]] and "checksum" in skipped[0][1]
    (tmp_path / ckpt.CKPT_DIR / "step_00000009").write_text("not a checkpoint")
    assert ckpt.list_checkpoints(tmp_path) == steps
    manifest = json.loads((steps[1] / ckpt.MANIFEST).read_text())
    del manifest["files"][ckpt.STATE_FILE]
    (steps[1] / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert "does not list" in ckpt.verify_checkpoint(steps[1])
    assert ckpt.find_checkpoint(tmp_path)[0] == steps[0]


def test_a_checkpoint_file_changed_past_its_first_mebibyte_does_not_verify(tmp_path):
    """The manifest's sha256 covers every byte: a student.safetensors of ~1.5 MiB with one byte changed near its end
    fails the check."""
    path = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.zeros(400_000)}, {"step": 1}, keep_last=1)
    model = path / ckpt.MODEL_FILE
    data = bytearray(model.read_bytes())
    assert len(data) > 1 << 20
    data[-2] ^= 1
    model.write_bytes(bytes(data))
    assert "does not match its checksum" in ckpt.verify_checkpoint(path)


def test_a_checkpoint_save_first_clears_what_killed_writers_left(tmp_path):
    """save_checkpoint starts by removing a killed writer's leftovers: a ``.tmp-*`` folder in checkpoints/ (never
    complete) and the saved student's ``.tmp-final-*`` / ``.old-final-*`` beside final/ (the run writes final/ again
    at its end)."""
    root = tmp_path / ckpt.CKPT_DIR
    left = [root / ".tmp-step_00000002-999@host-abc", tmp_path / ".tmp-final-999@host-abc",
            tmp_path / ".old-final-999@host"]
    for p in left:
        p.mkdir(parents=True)
        (p / "part").write_text("half")
    path = ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {"step": 2}, keep_last=1)
    assert not any(p.exists() for p in left) and ckpt.verify_checkpoint(path) is None


def test_a_safetensors_write_failure_is_raised_as_its_oserror(tmp_path, monkeypatch):
    """safetensors reports a failed write as ``SafetensorError: ... (os error 28)``: save_safetensors raises it as the
    OSError it is (errno 28), so a full disk reads as one, and another errno as itself (13: a folder it may not
    write, not a full disk); another SafetensorError stays as it is, and another error naming an os error is none."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(OSError) as err:
        ckpt.save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert err.value.errno == 28
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(SafetensorError("other")))
    with pytest.raises(SafetensorError, match="other"):
        ckpt.save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    denied = ckpt.io_failure(SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)"))
    assert (denied.errno, denied.strerror) == (errno.EACCES, os.strerror(errno.EACCES))
    assert ckpt.io_failure(RuntimeError("I/O error (os error 28)")) is None


def test_pruning_keeps_the_last_keep_last_checkpoints(tmp_path):
    for step in range(1, 5):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, {}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_a_replaced_checkpoint_put_aside_by_a_writer_on_a_hyphenated_host_is_repaired(tmp_path):
    state = {"w": torch.arange(4.0)}
    good = ckpt.save_checkpoint(tmp_path, 4, state, {"step": 4}, keep_last=3)
    os.replace(good, good.with_name(".old-step_00000004-999@build-node-7"))  # the writer's tag is <pid>@<host>
    ckpt.clean_partial_writes(tmp_path)
    assert ckpt.list_checkpoints(tmp_path) == [good] and ckpt.verify_checkpoint(good) is None


def test_a_writer_killed_mid_write_leaves_nothing_after_the_next_write(tmp_path):
    """SIGKILL while ``atomic_write_dir`` writes (as a corpus being tokenised): its temporary folder is removed
    by the next writer of the same folder, and nothing else is."""
    final = tmp_path / "corpus"
    code = ("import sys, time\nfrom pathlib import Path\nfrom tailkd.checkpoint import atomic_write_dir\n"
            "def write(tmp):\n    (tmp / 'train.bin').write_bytes(b'x' * 100)\n    print('writing', flush=True)\n"
            "    time.sleep(60)\n"
            f"atomic_write_dir(Path({str(final)!r}), write)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".tmp-corpus-{proc.pid}@")
    host = left[0][len(f".tmp-corpus-{proc.pid}@"):].rsplit("-", 1)[0]
    keep = [tmp_path / f".tmp-corpus-{os.getpid()}@{host}-live0000",  # a live writer (this process)
            tmp_path / f".tmp-corpus-{dead_pid()}@another-host-x1",  # another host's writer (a shared disk)
            tmp_path / f".tmp-other-{dead_pid()}@{host}-abcd1234"]  # a writer of another folder
    for p in keep:
        p.mkdir()
    ckpt.atomic_write_dir(final, lambda tmp: (tmp / "train.bin").write_bytes(b"done"))
    assert (final / "train.bin").read_bytes() == b"done"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corpus", *(p.name for p in keep)])


def test_a_folder_put_aside_by_a_killed_writer_is_put_back_or_removed(tmp_path):
    final = tmp_path / "corpus"
    host = ckpt.writer_tag().split("@", 1)[1]
    aside = tmp_path / f".old-corpus-{dead_pid()}@{host}"
    aside.mkdir()
    (aside / "meta.json").write_text("{}")
    assert ckpt.remove_dead_writers(final) == [aside]  # killed between the two renames: the old folder returns
    assert (final / "meta.json").read_text() == "{}" and not aside.exists()
    aside.mkdir()  # killed after the second rename: the new folder is in place, the old one goes
    assert ckpt.remove_dead_writers(final) == [aside] and not aside.exists() and final.is_dir()


def test_a_checkpoint_keeps_each_weight_exactly(tmp_path):
    """student.safetensors holds each weight as the student has it: its dtype and every bit of its values (float32
    values that bfloat16 would round, bfloat16 ones kept in bfloat16), a non-contiguous one (a transposed view,
    which safetensors refuses as it is) too; manifest.json names the step."""
    torch.manual_seed(0)
    state = {"w": torch.randn(3, 4), "h": torch.randn(4).to(torch.bfloat16), "t": torch.randn(4, 3).t()}
    path = ckpt.save_checkpoint(tmp_path, 7, state, {"step": 7}, keep_last=1)
    saved = load_file(str(path / ckpt.MODEL_FILE))
    assert {k: v.dtype for k, v in saved.items()} == {k: v.dtype for k, v in state.items()}
    assert all(torch.equal(saved[k], v) for k, v in state.items())
    assert json.loads((path / ckpt.MANIFEST).read_text())["step"] == 7


def test_a_prune_stopped_midway_leaves_no_half_checkpoint_under_a_real_name(tmp_path, monkeypatch):
    """Pruning renames an old checkpoint out of the way before deleting it: a kill while its files are deleted leaves
    a ``.tmp-*`` folder, which the next save removes, never a half-deleted ``step_*`` folder."""
    state = {"w": torch.zeros(2)}
    ckpt.save_checkpoint(tmp_path, 1, state, {"step": 1}, keep_last=1)
    real_rmtree = shutil.rmtree

    def killed_after_one_file(path, ignore_errors=False):
        if "step_00000001" not in Path(path).name:
            return real_rmtree(path, ignore_errors=ignore_errors)
        (Path(path) / ckpt.MODEL_FILE).unlink()
        raise KeyboardInterrupt  # the kill, its first file deleted

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, state, {"step": 2}, keep_last=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002"]
    ckpt.save_checkpoint(tmp_path, 3, state, {"step": 3}, keep_last=1)
    assert [p.name for p in (tmp_path / ckpt.CKPT_DIR).iterdir()] == ["step_00000003"]


def test_a_checkpoint_missing_a_file_is_named_and_the_previous_one_used(tmp_path):
    """verify_checkpoint names a file of the manifest that is gone (deleted by hand, a copy that skipped it) instead
    of raising FileNotFoundError, so that find_checkpoint falls back to the previous checkpoint."""
    state = {"w": torch.zeros(2)}
    first, second = [ckpt.save_checkpoint(tmp_path, i, state, {"step": i}, keep_last=2) for i in (1, 2)]
    (second / ckpt.STATE_FILE).unlink()
    assert ckpt.find_checkpoint(tmp_path) == (first, [(second, f"missing {ckpt.STATE_FILE}")])


# --------------------------------------------------------------------------- non-finite loss or gradients


def poisoned_teacher(assets, root: Path) -> Path:
    """The tiny teacher with one NaN in teacher layer 1, which the 2-layer student does not copy (it takes
    layers 0 and 3): the teacher's logits are all NaN, the student starts finite."""
    bad = root / "nan-teacher"
    shutil.copytree(assets["teacher"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return bad


def test_a_nan_teacher_stops_after_max_bad_steps_with_a_usable_checkpoint(assets, tmp_path, capsys):
    from tailkd import models
    from tailkd.student import build_student

    run = tmp_path / "run"
    teacher = poisoned_teacher(assets, tmp_path)
    code = main([*args(assets, run), "--teacher", str(teacher), "--train.max_bad_steps", "3",
                 "--train.log_every", "10"])  # a skipped step has its metrics line whatever log_every says
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("tailkd: error: stopped at step 3: 3 steps in a row (1-3) had a non-finite loss"), last
    assert "--resume" in last and "max_bad_steps" in last and "step_00000003" in last
    assert err.count("tailkd: warning: step") == 3
    rows = [r for r in read_metrics(run) if r["split"] == "train"]
    assert [(r["step"], r["skipped"], r["bad_steps"]) for r in rows] == [(1, True, 1), (2, True, 2), (3, True, 3)]
    saved = ckpt.list_checkpoints(run)[-1]
    assert saved.name == "step_00000003" and ckpt.verify_checkpoint(saved) is None
    state = torch.load(saved / ckpt.STATE_FILE, weights_only=False)
    assert state["state"]["bad_steps"] == 3 and state["scheduler"]["last_epoch"] == 0  # no scheduler step
    assert state["optimizer"]["state"] == {}  # AdamW never stepped
    # The weights were never updated: they are the freshly built student's, all finite.
    t, _ = models.load_teacher(str(teacher), device="cpu", dtype="fp32")
    start = build_student(t, num_layers=2, seed=0)[0].state_dict()
    w = load_file(str(saved / ckpt.MODEL_FILE))
    for name, tensor in w.items():
        assert torch.isfinite(tensor).all() and torch.equal(tensor, start[name]), name


def test_non_finite_steps_mid_run_are_skipped_and_counted(assets, tmp_path, capsys, monkeypatch):
    """Step 3: the loss is NaN; step 4: the loss is finite but a gradient is NaN. Both change nothing (weights,
    AdamW moments, schedule); the run goes on and finishes."""
    import tailkd.objective as objective_mod

    real = objective_mod.objective
    calls = []

    def poisoned(student_logits, *a, **kw):
        calls.append(1)  # one call per step (grad_accum 1; evaluation does not use the objective)
        terms = real(student_logits, *a, **kw)
        if len(calls) == 3:
            terms.loss = terms.loss * float("nan")
        if len(calls) == 4:
            student_logits.register_hook(lambda g: torch.full_like(g, float("nan")))
        return terms

    monkeypatch.setattr(objective_mod, "objective", poisoned)  # tailkd.objective.step_terms calls it
    run = tmp_path / "run"
    assert main(args(assets, run, "--train.save_every", "1", "--train.keep_last", "20", steps=6)) == 0
    err = capsys.readouterr().err
    assert "tailkd: warning: step 3: non-finite loss (nan)" in err
    assert "tailkd: warning: step 4: non-finite loss" in err and "gradient norm (nan)" in err
    rows = [r for r in read_metrics(run) if r["split"] == "train"]
    assert [r["skipped"] for r in rows] == [False, False, True, True, False, False]
    assert [r["bad_steps"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert rows[4]["lr"] == rows[2]["lr"]  # the schedule did not advance on skipped steps
    c = {s: run / "checkpoints" / f"step_{s:08d}" for s in (2, 3, 4, 5)}
    assert_identical(weights(c[2] / ckpt.MODEL_FILE), weights(c[4] / ckpt.MODEL_FILE))
    opt2 = torch.load(c[2] / ckpt.STATE_FILE, weights_only=False)["optimizer"]["state"]
    opt4 = torch.load(c[4] / ckpt.STATE_FILE, weights_only=False)["optimizer"]["state"]
    for name in opt2:
        assert all(torch.equal(opt2[name][k], opt4[name][k]) for k in opt2[name]), name
    assert not torch.equal(weights(c[5] / ckpt.MODEL_FILE)["model.norm.weight"],
                           weights(c[4] / ckpt.MODEL_FILE)["model.norm.weight"])
    final = weights(run / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())
    assert torch.load(c[5] / ckpt.STATE_FILE, weights_only=False)["state"]["bad_steps"] == 2
    # a step that updates ends the run of bad steps: train.max_bad_steps counts bad steps IN A ROW
    in_a_row = [torch.load(c[s] / ckpt.STATE_FILE, weights_only=False)["state"]["bad_in_a_row"] for s in c]
    assert in_a_row == [0, 1, 2, 0]


def test_a_step_without_valid_tokens_changes_nothing(assets, tmp_path, capsys, monkeypatch):
    """Step 3 draws rows whose labels are all -100: no weight decay, no AdamW moment or step-count update, no
    schedule step; it is counted (empty_steps) and logged like a skipped step, and the run goes on."""
    import tailkd.train as train_mod

    real = train_mod.next_micro_batches
    calls = []

    def masked_at_step_3(rows, sampler, cfg):
        micro = real(rows, sampler, cfg)
        calls.append(1)
        if len(calls) == 3:
            for mb in micro:
                mb["labels"] = torch.full_like(mb["labels"], -100)
        return micro

    monkeypatch.setattr(train_mod, "next_micro_batches", masked_at_step_3)
    run = tmp_path / "run"
    assert main(args(assets, run, "--train.save_every", "1", "--train.keep_last", "20", steps=5)) == 0
    err = capsys.readouterr().err
    assert "tailkd: warning: step 3: no valid token in the whole step" in err
    rows = [r for r in read_metrics(run) if r["split"] == "train"]
    assert [r["skipped"] for r in rows] == [False, False, True, False, False]
    assert [r["empty_steps"] for r in rows] == [0, 0, 1, 1, 1] and all(r["bad_steps"] == 0 for r in rows)
    assert rows[3]["lr"] == rows[2]["lr"]  # the schedule did not advance
    c = {s: run / "checkpoints" / f"step_{s:08d}" for s in (2, 3, 4)}
    assert_identical(weights(c[2] / ckpt.MODEL_FILE), weights(c[3] / ckpt.MODEL_FILE))  # not even weight decay
    opt2 = torch.load(c[2] / ckpt.STATE_FILE, weights_only=False)["optimizer"]["state"]
    opt3 = torch.load(c[3] / ckpt.STATE_FILE, weights_only=False)["optimizer"]["state"]
    for name in opt2:
        assert all(torch.equal(opt2[name][k], opt3[name][k]) for k in opt2[name]), name  # moments and step count
    assert not torch.equal(weights(c[4] / ckpt.MODEL_FILE)["model.norm.weight"],
                           weights(c[3] / ckpt.MODEL_FILE)["model.norm.weight"])
    assert torch.load(c[4] / ckpt.STATE_FILE, weights_only=False)["state"]["empty_steps"] == 1
    assert json.loads((run / "summary.json").read_text())["empty_steps"] == 1


def test_atomic_write_file_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "summary.json"
    ckpt.atomic_write_text(target, "old")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        ckpt.atomic_write_file(target, half_then_crash)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    ckpt.atomic_write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_an_exclusive_atomic_write_without_hard_links_still_never_replaces(tmp_path, monkeypatch):
    """atomic_write_file(replace=False) on a file system without hard links (os.link failing with EPERM, as on FAT)
    writes a new file by a check then a rename, and still refuses an existing one: FileExistsError, its text kept,
    no temporary file left."""
    def no_links(src, dst):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(ckpt.os, "link", no_links)
    target = tmp_path / "config.yaml"
    ckpt.atomic_write_file(target, lambda tmp: tmp.write_text("first"), replace=False)
    with pytest.raises(FileExistsError):
        ckpt.atomic_write_file(target, lambda tmp: tmp.write_text("second"), replace=False)
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an open file descriptor through /proc")
def test_atomic_writes_fsync_the_new_data_before_renaming_it_into_place(tmp_path, monkeypatch):
    """After a power cut the name holds the old data or the whole new data: atomic_write_file and atomic_write_dir
    fsync every new file before the rename that puts it under the real name (a rename may reach the disk before
    the data it names), and the folder holding the name after it (the rename itself is on disk only then)."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt.atomic_write_text(tmp_path / "summary.json", "new")
    (tmp,) = [src for kind, src in events if kind == "rename"]
    folder = ("fsync", str(tmp_path))
    assert events.index(("fsync", tmp)) < events.index(("rename", tmp)) < events.index(folder)
    events.clear()
    ckpt.atomic_write_dir(tmp_path / "final", lambda d: (d / "a.txt").write_text("a"))
    (tmp,) = [src for kind, src in events if kind == "rename" and ".tmp-" in src]
    assert events.index(("fsync", f"{tmp}/a.txt")) < events.index(("rename", tmp)) < events.index(folder)


def test_atomic_write_dir_stopped_between_its_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    """A folder output (select-data's, the saved student final/) replaced by atomic_write_dir is moved aside, then
    the new one renamed into place: Ctrl-C / SIGTERM (`Terminated`) between the two renames removed the new folder
    and left the old one under ``.old-*``: no output at all under the real name until a later writer put it back.
    The old folder is now put back at once, the new one removed, nothing else left."""
    target = tmp_path / "sel"
    ckpt.atomic_write_dir(target, lambda tmp: (tmp / "selection.json").write_text("old"))
    real_replace = os.replace
    calls = []

    def stopped_before_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", stopped_before_second_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write_dir(target, lambda tmp: (tmp / "selection.json").write_text("new"))
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert Path(calls[0][1]).name.startswith(".old-sel-")  # the first rename moved the old folder aside
    assert (target / "selection.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["sel"]


class _Interleaving:
    """Writers in threads, one at a time: each parks at its start and before each ``os.replace``, and ``order`` (one
    name per step, e.g. "ABBA") says who takes the next step once every live writer is parked; a name whose writer
    is done is skipped, and past the end of ``order`` the writers go in any order. Deterministic: the file system
    sees the renames in exactly that order."""

    def __init__(self, order: str, real_replace):
        self.order, self.real_replace = list(order), real_replace
        self.cv = threading.Condition()
        self.parked, self.live = set(), set()

    def _may_go(self, me: str) -> bool:
        if self.parked != self.live:  # someone is still running to its next step
            return False
        while self.order and self.order[0] not in self.live:
            self.order.pop(0)
        return not self.order or self.order[0] == me

    def step(self) -> None:
        me = threading.current_thread().name
        with self.cv:
            self.parked.add(me)
            self.cv.notify_all()
            self.cv.wait_for(lambda: self._may_go(me))
            if self.order:
                self.order.pop(0)
            self.parked.discard(me)

    def replace(self, src, dst):
        self.step()
        self.real_replace(src, dst)

    def run(self, writers: dict) -> dict:
        errors = {}

        def body(fn):
            try:
                self.step()
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors[threading.current_thread().name] = exc
            finally:
                with self.cv:
                    self.live.discard(threading.current_thread().name)
                    self.parked.discard(threading.current_thread().name)
                    self.cv.notify_all()

        threads = [threading.Thread(target=body, args=(fn,), name=name) for name, fn in writers.items()]
        self.live = set(writers)
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        return errors


@pytest.mark.parametrize("order", sorted({"".join(p) for p in itertools.permutations("AAABBB")}))
def test_two_writers_of_one_folder_at_once_both_succeed(tmp_path, monkeypatch, order):
    """Two processes writing one folder through atomic_write_dir at once (two select-data or compare runs into one
    --out): their renames interleaved, and the second failed (exit 1) with "OSError: [Errno 39] Directory not empty"
    (its new folder renamed onto the one the other had just put in place) or FileNotFoundError (moving aside a
    folder the other had just moved), leaving an .old-* folder. Every interleaving of the two writers' steps (start,
    the renames) now ends with both writers done, one complete output in place and nothing else beside it."""
    target = tmp_path / "sel"
    ckpt.atomic_write_dir(target, lambda tmp: (tmp / "selection.json").write_text("old"))
    host = ckpt.writer_tag().split("@", 1)[1]
    pids = {"A": os.getpid(), "B": os.getppid()}  # two live writers (a dead one's folders are removed)
    sched = _Interleaving(order, os.replace)
    monkeypatch.setattr(ckpt, "writer_tag", lambda: f"{pids[threading.current_thread().name]}@{host}")
    monkeypatch.setattr(ckpt.os, "replace", sched.replace)

    def writer(text):
        def write(tmp):
            (tmp / "selection.json").write_text(text)
            (tmp / "scores.json").write_text(text)
        return lambda: ckpt.atomic_write_dir(target, write)

    errors = sched.run({"A": writer("A"), "B": writer("B")})
    monkeypatch.setattr(ckpt.os, "replace", sched.real_replace)
    assert errors == {}
    assert [p.name for p in tmp_path.iterdir()] == ["sel"]
    assert (target / "selection.json").read_text() in ("A", "B")
    assert (target / "scores.json").read_text() == (target / "selection.json").read_text()


def test_atomic_folders_get_the_permissions_of_any_new_folder(tmp_path):
    """A folder written by atomic_write_dir (the saved student RUN/final, checkpoints, select-data's output, the corpus
    cache) has the mode of any folder the user creates (0o777 less the umask), not tempfile.mkdtemp's 0o700, which the
    rename kept: RUN/final was drwx------, unreadable to the user's group (another account's lm-eval, a shared
    cluster folder)."""
    old = os.umask(0o022)  # a common umask, under which 0o700 and the expected 0o755 differ
    try:
        plain = tmp_path / "plain"
        plain.mkdir()
        final = ckpt.atomic_write_dir(tmp_path / "final", lambda tmp: (tmp / "config.json").write_text("{}"))
        step = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"step": 1}, keep_last=1)
    finally:
        os.umask(old)
    assert (plain.stat().st_mode & 0o777) == 0o755
    assert (final.stat().st_mode & 0o777) == 0o755 and (step.stat().st_mode & 0o777) == 0o755


def test_a_kill_while_the_final_student_is_written_leaves_no_partial_folder_after_the_resume(assets, tmp_path):
    """A SIGKILL while RUN/final is written leaves its temporary folder (.tmp-final-*, as big as the student); the
    resume that writes final/ again removes it, and a final/ moved aside (.old-final-*) by a kill between the two
    renames of a replaced final/. Both were kept for good: only checkpoints/ was cleaned."""
    run = tmp_path / "run"
    assert main(args(assets, run, "--train.stop_after", "4")) == 0
    partial = run / ".tmp-final-k1ll3d"  # what the kill leaves (atomic_write_dir's temporary folder)
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    moved = run / ".old-final-999"
    moved.mkdir()
    (moved / "config.json").write_text("{}")
    assert main(args(assets, run, "--resume")) == 0
    assert (run / "final" / "model.safetensors").is_file()
    assert not partial.exists() and not moved.exists()


def test_atomic_folders_files_get_the_permissions_of_any_new_file(tmp_path):
    """The files of a folder written by atomic_write_dir have the mode of any new file (0o666 less the umask), as
    config.json: safetensors 0.8 creates its files 0o600 whatever the umask (safetensors issue #782), so the saved
    student's model.safetensors (and a checkpoint's student.safetensors) were -rw------- beside a -rw-r--r--
    config.json, unreadable to the user's group. Also the GGUF cache's converted model."""
    from safetensors.torch import save_file as save_safetensors_file

    def write(tmp):
        save_safetensors_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text("{}")

    old = os.umask(0o022)  # a common umask, under which 0o600 and the expected 0o644 differ
    try:
        final = ckpt.atomic_write_dir(tmp_path / "final", write)
        step = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"step": 1}, keep_last=1)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for folder in (final, step) for f in folder.iterdir()}
    assert modes == dict.fromkeys(["model.safetensors", "config.json", ckpt.MODEL_FILE, ckpt.STATE_FILE,
                                   ckpt.MANIFEST], 0o644)
    assert ckpt.verify_checkpoint(step) is None


def test_a_link_in_an_atomic_folder_leaves_the_mode_of_what_it_points_to(tmp_path):
    """The files of an atomic folder get the mode of any new file; a symbolic link among them is not followed: the
    file it points to, outside the folder, keeps its own mode (chmod follows links)."""
    outside = tmp_path / "private.txt"
    outside.write_text("mine")
    outside.chmod(0o600)
    old = os.umask(0o022)
    try:
        final = ckpt.atomic_write_dir(tmp_path / "final", lambda tmp: (tmp / "link").symlink_to(outside))
    finally:
        os.umask(old)
    assert (final / "link").is_symlink() and outside.stat().st_mode & 0o777 == 0o600


def test_atomic_files_get_the_permissions_of_any_new_file(tmp_path):
    """A file written by atomic_write_file (a teacher-cache shard, through safetensors) has the mode of any new file
    (0o666 less the umask), as the cache's cache.json: safetensors 0.8 creates its files 0o600 (issue #782)."""
    from safetensors.torch import save_file as save_safetensors_file

    old = os.umask(0o022)  # a common umask, under which 0o600 and the expected 0o644 differ
    try:
        shard = ckpt.atomic_write_file(tmp_path / "shard.safetensors",
                                       lambda tmp: save_safetensors_file({"w": torch.zeros(2)}, str(tmp)))
        meta = ckpt.atomic_write_text(tmp_path / "cache.json", "{}")
    finally:
        os.umask(old)
    assert (shard.stat().st_mode & 0o777) == (meta.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json", "shard.safetensors"]


def test_two_new_runs_started_at_once_into_one_folder_do_not_share_it(tmp_path):
    """Two `tailkd distill` with the same --out (two first runs: both default to runs/distill) started together:
    each checked that the folder held no run before loading its models, then both claimed it, and the two runs
    trained into one folder (one metrics.jsonl of both, each other's checkpoints, the second config.yaml) and both
    ended with exit 0. The second claim now fails with one line and leaves the first run's config.yaml."""
    from tailkd import runs
    from tailkd.config import DistillConfig
    from tailkd.errors import TailkdError

    out = tmp_path / "distill"
    first, second = DistillConfig(), DistillConfig()
    first.train.out_dir = second.train.out_dir = str(out)
    second.train.seed = 7
    decided = [runs.prepare_run_dir(cfg) for cfg in (first, second)]  # both before either claims: a new run each
    assert [resuming for _, resuming, _ in decided] == [False, False]
    runs.claim_run_dir(out, first, False)
    with pytest.raises(TailkdError, match=r"run folder .*distill was claimed by another tailkd run started at the "
                                          r"same time; choose another --out"):
        runs.claim_run_dir(out, second, False)
    assert "seed: 0" in (out / "config.yaml").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_a_full_disk_when_a_run_claims_its_folder_is_one_line(tmp_path, monkeypatch):
    """A new run on a full disk (or in a folder it may not write): the run's config.yaml, written when the run
    claims its folder after every input checked out, failed with 'tailkd: error: OSError: [Errno 28] No space left
    on device (rerun with --debug ...)', exit 1, an unexpected error naming no file nor fix. The config.yaml of a
    resume with --force and the rewrite of metrics.jsonl on --resume failed the same way. Each is now one
    TailkdError (exit 2) naming the file and the fix."""
    from tailkd import runs
    from tailkd.config import DistillConfig
    from tailkd.errors import TailkdError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cfg = DistillConfig()
    cfg.train.out_dir = str(tmp_path / "run")
    monkeypatch.setattr(runs, "save_yaml", full)
    with pytest.raises(TailkdError, match=rf"^could not write {tmp_path / 'run'}/config\.yaml \(No space left on "
                                          r"device\); free disk space or choose another --out"):
        runs.claim_run_dir(Path(cfg.train.out_dir), cfg, False)
    monkeypatch.undo()
    real_write, init = ckpt.atomic_write_text, tmp_path / "init"  # student_init.json just after it, still in the
    monkeypatch.setattr(ckpt, "atomic_write_text",  # claim (rank 0's error raised on every rank)
                        lambda path, text: full() if path.name == "student_init.json" else real_write(path, text))
    with pytest.raises(TailkdError, match=rf"^could not write {init}/student_init\.json \(No space left on device\); "
                                          r"free disk space and run the command again with --overwrite$"):
        runs.claim_run_dir(init, cfg, False, student_init={"layers": [0, 1]})
    assert (init / "config.yaml").is_file()
    monkeypatch.setattr(runs, "save_yaml", full)
    old = tmp_path / "old"  # a resume with --force writes the changed config: the same, and the old one stays
    old.mkdir()
    (old / "config.yaml").write_text("train: {seed: 0}\n")
    with pytest.raises(TailkdError, match=rf"^could not write {old}/config\.yaml \(No space left on device\); free "
                                          r"disk space and continue with --resume --force"):
        runs.replace_config(old, cfg, ["train.seed: 0 -> 1"])
    assert (old / "config.yaml").read_text() == "train: {seed: 0}\n"
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n')
    monkeypatch.setattr(ckpt, "atomic_write_file", full)
    with pytest.raises(TailkdError, match=rf"^could not write {metrics} \(No space left on device\); free disk space "
                                          r"and continue with --resume"):
        runs.MetricsLog(metrics, resume_step=1)
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_resume_drops_damaged_metrics_lines_as_it_drops_a_half_written_one(tmp_path):
    """`runs.MetricsLog` on --resume keeps the lines up to the checkpoint's step and drops the others, a damaged
    line among them: bytes that are not UTF-8 were a UnicodeDecodeError and a line nested past Python's parser a
    RecursionError (a traceback, the run not resumed)."""
    from tailkd import runs

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1}\n\xff{"step": 1}\n' + b"[" * 100_000 + b"]" * 100_000 + b'\n{"step": 2}\n'
                        b'[1]\n{"step": "x"}\n{"step": 3}\n{"ste')
    runs.MetricsLog(metrics, resume_step=2)
    assert metrics.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
