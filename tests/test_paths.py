"""Paths and names: long file names, temporary names beside a target, leftovers of killed writers, `~`, relative
paths read from another working directory."""

import socket
import subprocess
import sys

import pytest

from tailkd import runs
from tailkd.config import DistillConfig


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


@pytest.mark.parametrize("tagged", [False, True], ids=["pid", "pid@host"])
def test_a_dead_writers_first_config_leftover_is_removed_when_the_run_starts(tmp_path, tagged):
    """A run killed while writing its first config.yaml leaves `atomic_write_file`'s temporary file, named
    ``.tmp-config.yaml-<pid>@<host>`` (an older tailkd: ``-<pid>``). Starting the run there again crashed on the
    tagged name (ValueError: invalid literal for int() with base 10: '<pid>@<host>', exit 1)."""
    out = tmp_path / "run"
    out.mkdir()
    pid = _dead_pid()
    leftover = out / (f".tmp-config.yaml-{pid}@{socket.gethostname()}" if tagged else f".tmp-config.yaml-{pid}")
    leftover.write_text("train:\n  lr: 0.0")
    cfg = DistillConfig()
    cfg.train.out_dir = str(out)
    assert runs.prepare_run_dir(cfg)[:2] == (out, False)
    runs.claim_run_dir(out, cfg, False, [])
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_a_live_or_other_hosts_first_config_leftover_is_left_alone(tmp_path):
    """A live writer's temporary config (a run claiming the folder right now) and another host's (a shared disk:
    its pid says nothing here) are not removed."""
    out = tmp_path / "run"
    out.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / f".tmp-config.yaml-{writer.pid}@{socket.gethostname()}"
        other = out / f".tmp-config.yaml-{_dead_pid()}@not-{socket.gethostname()}"
        for p in (live, other):
            p.write_text("train:\n  lr: 0.0")
        cfg = DistillConfig()
        cfg.train.out_dir = str(out)
        runs.claim_run_dir(out, cfg, False, [])
    finally:
        writer.kill()
        writer.wait()
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.yaml", live.name, other.name])


LONG_NAMES = {"ascii 250": "r" * 246 + ".json", "cjk 255 bytes": "中" * 85, "e-acute 254 bytes": "é" * 127}


@pytest.mark.parametrize("name", LONG_NAMES.values(), ids=LONG_NAMES.keys())
def test_a_target_named_near_name_max_is_written(tmp_path, name):
    """A file or folder whose name is near NAME_MAX (255 bytes) but within it: the temporary name beside it
    (``.tmp-<name>-<pid>@<host>...``, 20+ bytes more) was over the limit, so e.g. ``tailkd eval --out <240
    characters>.json`` failed after the evaluation with OSError: [Errno 36] File name too long (exit 1)."""
    from tailkd import checkpoint as ckpt

    assert len(name.encode()) <= ckpt.NAME_MAX
    ckpt.atomic_write_text(tmp_path / name, "one")
    ckpt.atomic_write_text(tmp_path / name, "two")  # replacing it
    assert (tmp_path / name).read_text() == "two"
    folder = tmp_path / "d" / name
    for text in ("one", "two"):
        ckpt.atomic_write_dir(folder, lambda tmp, text=text: (tmp / "f.txt").write_text(text))
        assert (folder / "f.txt").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", name])
    assert [p.name for p in folder.parent.iterdir()] == [name]


def test_a_dead_writers_leftovers_of_a_long_name_are_found(tmp_path):
    """`remove_dead_writers` finds a killed writer's shortened ``.tmp-*`` and ``.old-*`` (its pid longer or shorter
    than ours: the shortened name does not depend on it), and puts the set-aside folder back."""
    from tailkd import checkpoint as ckpt

    final = tmp_path / ("x" * 250)
    stem, tag = ckpt.temp_stem(final.name), f"{_dead_pid()}@{socket.gethostname()}"
    assert stem != final.name and len(f".tmp-{stem}-4194304@{socket.gethostname()}-{'0' * 12}".encode()) <= 255
    half = tmp_path / f".tmp-{stem}-{tag}-0123456789ab"
    aside = tmp_path / f".old-{stem}-{tag}"
    half.mkdir()
    aside.mkdir()
    (aside / "kept.txt").write_text("the old folder")
    assert sorted(ckpt.remove_dead_writers(final)) == sorted([half, aside])
    assert (final / "kept.txt").read_text() == "the old folder" and sorted(tmp_path.iterdir()) == [final]
