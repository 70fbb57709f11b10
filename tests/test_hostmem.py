"""The CLI's processes reuse the host memory their tensors free (`tailkd.hostmem`), unless the user says otherwise."""

import os
import platform
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from tailkd import cli, hostmem

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# In a fresh process: the minor page faults of a "step" that fills three fresh 64 MiB tensors and frees them, three
# steps with glibc's defaults, then twelve after `keep_freed_memory`. With the defaults every block is a new mmap: a
# fault per 4 KiB page (3 x 16384 per step; 3 x 32 where transparent huge pages back them). Kept, the freed blocks
# are reused once the heap's free region holds a whole step: torch asks for 64-byte aligned blocks, for which
# glibc's memalign (before 2.38) needs 96 bytes more than the block it freed, so the first steps may still take a
# block or two from fresh memory (measured: settled after 4-6 steps in 8 of 8 processes), none after that.
PROBE = """
import resource, torch
from tailkd import hostmem

def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(16 << 20).fill_(1.0) for _ in range(3)]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = [step() for _ in range(3)]
kept = hostmem.keep_freed_memory()
print(min(plain), int(kept), max([step() for _ in range(12)][-3:]))
"""


def _malloc_setting(name: str) -> bool:
    """Whether environment variable ``name`` could set the allocator (what a test clears to start from glibc's own)."""
    return name.startswith("MALLOC_") or name in ("TAILKD_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD")


def _probe(**env) -> tuple[int, bool, int]:
    base = {k: v for k, v in os.environ.items() if not _malloc_setting(k)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return int(out[0]), out[1] == "1", int(out[2])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults_once_the_heap_holds_a_step():
    plain, kept, settled = _probe()
    assert kept
    assert plain >= 3 * 32  # fresh mappings: at least one fault per 2 MiB of each 64 MiB block
    assert settled * 100 < plain  # the last steps reuse the freed blocks: malloc's own bookkeeping at most


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
@pytest.mark.parametrize("env", [{"TAILKD_MALLOC": "system"}, {"MALLOC_ARENA_MAX": "2"}, {"MALLOC_TOP_PAD_": "0"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}])
def test_the_users_own_malloc_settings_are_left_alone(env):
    """glibc's own spellings: MALLOC_ARENA_MAX and MALLOC_ARENA_TEST end without the underscore the other
    ``MALLOC_*_`` variables end with (the aliases of glibc.malloc.* in glibc's elf/dl-tunables.list)."""
    plain, kept, settled = _probe(**env)
    assert not kept
    assert settled * 100 >= plain  # still fresh mappings in every step


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


def test_an_unknown_tailkd_malloc_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TAILKD_MALLOC", "sytem")
    monkeypatch.setattr(sys, "argv", ["tailkd", "flops", "--teacher-params", "1.8e9", "--student-params", "1.2e9",
                                      "--vocab", "151936", "--hidden", "2048", "--out", str(tmp_path / "f.json")])
    assert cli.entry() == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "TAILKD_MALLOC='sytem' must be 'system'" in err, err
    assert not (tmp_path / "f.json").exists()  # nothing ran


def _clean_malloc_env(monkeypatch) -> None:
    for name in filter(_malloc_setting, list(os.environ)):
        monkeypatch.delenv(name)


@pytest.mark.parametrize("env, own", [
    ({}, False), ({"TAILKD_MALLOC": "KEEP"}, False), ({"TAILKD_MALLOC": " System "}, True),
    ({"MALLOC_ARENA_TEST": "4"}, True), ({"MALLOC_TRIM_THRESHOLD_": "0"}, True),
    ({"LD_PRELOAD": "/usr/lib/libmimalloc.so.2"}, True), ({"LD_PRELOAD": "/opt/libtcmalloc_minimal.so"}, True),
    # not glibc's malloc settings: jemalloc's MALLOC_CONF (read only where jemalloc is loaded), another tunable
    ({"MALLOC_CONF": "narenas:1"}, False), ({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, False),
])
def test_which_environments_are_the_users_own_malloc_setting(monkeypatch, env, own):
    """TAILKD_MALLOC in any case and with spaces around; glibc's MALLOC_*_ variables and its two arena variables
    without the underscore, glibc.malloc tunables and a preloaded jemalloc / tcmalloc / mimalloc are the user's;
    other variables that only look alike are not."""
    _clean_malloc_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert hostmem._users_own_setting() is own


def test_an_unknown_tailkd_malloc_value_is_refused(monkeypatch):
    _clean_malloc_env(monkeypatch)
    monkeypatch.setenv("TAILKD_MALLOC", "default")
    with pytest.raises(hostmem.TailkdError, match=r"^TAILKD_MALLOC='default' must be 'system'"):
        hostmem.keep_freed_memory()


class _FakeLibc:
    """A C library whose ``mallopt`` records its calls and answers ``answer`` (glibc: 1 on success, 0 on error)."""

    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

        def mallopt(param, value):
            self.calls.append((param, value))
            return self.answer

        self.mallopt = mallopt


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_keep_freed_memory_sets_both_malloc_parameters_on_glibc_only(monkeypatch):
    """Two mallopt calls, M_MMAP_MAX = 0 then M_TRIM_THRESHOLD = the largest int (glibc's parameter numbers -4 and
    -1); True only where both succeed; False, calling nothing, for another C library or a libc without mallopt."""
    import ctypes

    _clean_malloc_env(monkeypatch)
    libc = _FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    assert hostmem.keep_freed_memory() is True
    assert libc.calls == [(-4, 0), (-1, 2**31 - 1)]
    libc.answer, libc.calls = 0, []
    assert hostmem.keep_freed_memory() is False
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # no mallopt (AttributeError)
    assert hostmem.keep_freed_memory() is False
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2.4"))
    libc.calls = []
    assert hostmem.keep_freed_memory() is False and libc.calls == []
