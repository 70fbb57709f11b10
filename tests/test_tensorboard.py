"""``--train.report_to tensorboard``: every metrics.jsonl number reaches TensorBoard as ``SPLIT/KEY`` at its step, read
back with TensorBoard's own reader; the folder is metrics.jsonl's copy, rewritten by each invocation (one event file,
each step once: what any loader shows), so a resumed run, or one whose report_to was switched at a resume, shows what
metrics.jsonl holds; without the package the run is refused in one line before anything is written."""

import json
import math
import shutil

import numpy as np
import pytest
from test_distill import assets, base_args  # noqa: F401 - the module fixture (tiny teacher, corpus)

from tailkd import jsonfile
from tailkd.cli import main

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def board(run) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the run's TensorBoard events, every event kept (size_guidance 0), none purged; one
    event file, and a step logged twice under one tag fails."""
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0},
                                             purge_orphaned_data=False)
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), (tag, steps)
        out[tag] = {e.step: e.value for e in events}
    return out


def expected(run) -> dict[str, dict[int, float]]:
    """The same from metrics.jsonl (non-finite values restored from its ``non_finite`` records): its numbers (not the
    step, not true/false) as float32, which TensorBoard keeps."""
    out: dict[str, dict[int, float]] = {}
    for record in map(jsonfile.loads, (run / "metrics.jsonl").read_text().splitlines()):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(f"{record['split']}/{key}", {})[record["step"]] = float(np.float32(value))
    return out


def timed(tag: str) -> bool:
    """A wall-clock measurement (elapsed_s, tokens_per_s, ...): two runs agree on its steps, not its values."""
    return tag.endswith(("_s", "_seconds"))


def same(a: dict, b: dict, *, clocks: bool = True) -> bool:
    """Equal tags, steps and values (NaN equal to NaN: a skipped step's loss); ``clocks=False``: the values of the
    wall-clock tags are not compared."""
    return a.keys() == b.keys() and all(
        a[t].keys() == b[t].keys() and (not clocks and timed(t) or all(
            a[t][s] == b[t][s] or (math.isnan(a[t][s]) and math.isnan(b[t][s])) for s in a[t])) for t in a)


def test_every_metrics_line_reaches_tensorboard(assets, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    assert main(base_args(assets, run, "--steps", "4", "--train.eval_every", "2",
                          "--train.report_to", "tensorboard")) == 0
    got, want = board(run), expected(run)
    assert same(got, want)
    assert set(want["heldout/kl"]) == {0, 2, 4} and set(want["train/loss"]) == {1, 2, 3, 4}
    assert not (tmp_path / "plain").exists()
    assert main(base_args(assets, tmp_path / "plain", "--steps", "1")) == 0  # the default: no event files
    assert not (tmp_path / "plain" / "tensorboard").exists()


def test_a_resumed_run_shows_each_step_once(assets, tmp_path):  # noqa: F811
    """A run killed past its last checkpoint (imitated: stopped after step 3, checkpoint 3 removed, so the resume
    starts again from step 2) logged step 3 twice; TensorBoard shows it once — the resumed invocation's, as
    metrics.jsonl keeps it — and the whole board equals the uninterrupted run's (a resume is bit-identical; the
    wall-clock tags on the same steps)."""
    common = ("--steps", "4", "--train.eval_every", "2", "--train.save_every", "2", "--train.deterministic", "true",
              "--train.report_to", "tensorboard")
    full, parted = tmp_path / "full", tmp_path / "parted"
    assert main(base_args(assets, full, *common)) == 0
    assert main(base_args(assets, parted, *common, "--train.stop_after", "3")) == 0
    shutil.rmtree(parted / "checkpoints" / "step_00000003")
    before = board(parted)
    assert set(before["train/loss"]) == {1, 2, 3}
    assert main(base_args(assets, parted, *common, "--resume")) == 0
    assert same(board(parted), expected(parted)) and same(board(full), expected(full))
    assert same(board(parted), board(full), clocks=False) and any(timed(t) for t in board(full))
    assert [json.loads(x)["step"] for x in (parted / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 2, 3, 4,
                                                                                                    4]


def test_report_to_switched_at_resumes_still_shows_metrics_jsonl(assets, tmp_path):  # noqa: F811
    """On for steps 1-4, off for a resume at 2 running to 6, on again for a resume at 6 running to 8: the board holds
    every row of metrics.jsonl (steps 5 and 6 of the invocation that did not log to it, not the first invocation's
    steps 3 and 4 that metrics.jsonl dropped)."""
    run = tmp_path / "run"
    common = ("--train.eval_every", "2", "--train.save_every", "2", "--train.deterministic", "true")
    tb = ("--train.report_to", "tensorboard")
    assert main(base_args(assets, run, "--steps", "8", *common, *tb, "--train.stop_after", "4")) == 0
    first = board(run)
    for step in ("step_00000004",):
        shutil.rmtree(run / "checkpoints" / step)  # killed past step 2's checkpoint
    assert main(base_args(assets, run, "--steps", "8", *common, "--resume", "--train.stop_after", "4")) == 0
    assert main(base_args(assets, run, "--steps", "8", *common, *tb, "--resume")) == 0
    got = board(run)
    assert same(got, expected(run)) and set(got["train/loss"]) == set(range(1, 9))
    assert got["train/elapsed_s"][3] != first["train/elapsed_s"][3]  # step 3 is the resumed invocation's


def test_each_line_is_on_disk_once_written(tmp_path):
    """Every line's events are on disk once it is written (a run killed later loses none of them): read back while
    the writer is still open. (`MetricsLog.write` flushes the writer's queue to make that certain; its thread is
    usually there first anyway, so this checks what is read, not that flush.)"""
    from tailkd.runs import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=-1, tensorboard=tmp_path / "tensorboard")
    try:
        log.write({"step": 0, "split": "heldout", "tokens": 0, "kl": 1.25, "name": "x"})
        log.write({"step": 1, "split": "train", "tokens": 64, "loss": 2.5, "skipped": False})
        log.write({"step": 2, "split": "train", "tokens": 128, "loss": float("nan"), "skipped": True})
        got, want = board(tmp_path), expected(tmp_path)
        assert same(got, want) and math.isnan(got["train/loss"][2])  # a skipped step's NaN loss: NaN on the board
        assert set(want) == {"heldout/tokens", "heldout/kl", "train/tokens", "train/loss"}
    finally:
        log.close()


def test_report_to_tensorboard_without_the_package_is_one_line(assets, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Without the tensorboard package (imitated: torch.utils.tensorboard fails to import) the run ends in one line
    naming it, exit 2, before any model loads or the run folder is made."""
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it raises ImportError
    run = tmp_path / "run"
    assert main(base_args(assets, run, "--steps", "1", "--train.report_to", "tensorboard")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tailkd: error: train.report_to tensorboard needs the tensorboard package: pip install tensorboard "
                   "(or pip install 'tailkd[tensorboard]')"]
    assert not run.exists()


def test_report_to_takes_none_or_tensorboard(assets, tmp_path, capsys):  # noqa: F811
    assert main(base_args(assets, tmp_path / "run", "--train.report_to", "wandb")) == 2
    err = capsys.readouterr().err
    assert "wandb" in err and "tensorboard" in err and "Traceback" not in err
