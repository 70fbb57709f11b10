"""The CLI's processes reuse the host memory their tensors free (`tailkd.hostmem`), unless the user says otherwise."""

import os
import platform
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from tailkd import cli, hostmem

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: the minor page faults of filling a fresh 64 MiB tensor right after one of the same size was
# filled and freed, before and after `keep_freed_memory`. With glibc's defaults the block is a new mmap each time:
# a fault per 4 KiB page (16384; 32 where transparent huge pages back it); kept, the freed block is reused and its
# pages are already there: no fault but malloc's own bookkeeping.
PROBE = """
import resource, sys, torch
from tailkd import hostmem

def faults():
    torch.empty(16 << 20).fill_(1.0)  # filled, then freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults()
kept = hostmem.keep_freed_memory()
print(plain, int(kept), faults())
"""


def _probe(**env) -> tuple[int, bool, int]:
    base = {k: v for k, v in os.environ.items()
            if k != "TAILKD_MALLOC" and k != "GLIBC_TUNABLES" and not (k.startswith("MALLOC_") and k.endswith("_"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return int(out[0]), out[1] == "1", int(out[2])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    plain, kept, after = _probe()
    assert kept
    assert plain >= 32  # a fresh mapping: at least one fault per 2 MiB of the 64 MiB
    assert after * 10 < plain


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
@pytest.mark.parametrize("env", [{"TAILKD_MALLOC": "system"}, {"MALLOC_ARENA_MAX_": "2"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}])
def test_the_users_own_malloc_settings_are_left_alone(env):
    plain, kept, after = _probe(**env)
    assert not kept
    assert after * 10 >= plain  # still a fresh mapping per block


@pytest.mark.parametrize("cuda", [False, True])
def test_the_tailkd_command_keeps_freed_memory_on_a_machine_without_cuda(monkeypatch, tmp_path, cuda):
    """`tailkd` (`cli.entry`) keeps freed host memory before a subcommand runs, where no CUDA device is visible; `main`
    called from Python leaves the allocator alone; so does ``--help``. The console script is `cli.entry`."""
    import torch

    calls = []
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    flops = ["flops", "--teacher-params", "1.8e9", "--student-params", "1.2e9", "--vocab", "151936", "--hidden",
             "2048", "--teacher-layers", "24", "--student-layers", "18", "--out", str(tmp_path / "flops.json")]
    assert cli.main(flops) == 0 and calls == []
    monkeypatch.setattr(sys, "argv", ["tailkd", *flops])
    assert cli.entry() == 0 and calls == ([] if cuda else ["keep"])
    monkeypatch.setattr(sys, "argv", ["tailkd"])
    assert cli.entry() == 0 and calls == ([] if cuda else ["keep"])  # the help: no run
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "tailkd"]
    assert script.value == "tailkd.cli:entry"
