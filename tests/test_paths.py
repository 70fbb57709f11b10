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
