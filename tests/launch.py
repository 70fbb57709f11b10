"""Launching tailkd in other processes for the multi-process tests: a free port, and the CLI in 1 or N processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

# PYTHONFAULTHANDLER: a process killed by a fatal signal (SIGABRT from a C++ std::terminate, as gloo ranks were twice
# in CI at the end of their run: `tailkd.distributed.leave`) prints every thread's Python stack into the stderr a
# failing run_cli shows (conftest sets it for the ranks `spawn` starts)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONFAULTHANDLER": "1"}


def spawn(fn, args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)``, each process ending as the CLI's ranks do once ``fn``
    returned: `tailkd.distributed.leave` (no interpreter finalization, where a gloo worker thread can abort it). An
    exception in ``fn`` still reaches the parent as mp.spawn reports it."""
    import torch.multiprocessing as mp

    mp.spawn(_run_then_leave, args=(fn, *args), nprocs=nprocs, join=True)


def _run_then_leave(rank: int, fn, *args) -> None:
    fn(rank, *args)
    from tailkd import distributed

    distributed.leave(0)


def as_a_plain_process(monkeypatch) -> None:
    """This process's environment as outside any launcher (no WORLD_SIZE, RANK, LOCAL_RANK), for the test's span."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def join_gloo(rank: int, world: int, port: int, timeout_s: float = 1800):
    """In a process `spawn` started: join ``world`` gloo ranks on the CPU as rank ``rank`` (one thread each) through
    `tailkd.distributed.setup` (its ``timeout_s``), as torchrun's environment would; returns the device."""
    import torch

    from tailkd import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return distributed.setup("cpu", timeout_s=timeout_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failure_text(err: str) -> str:
    """What a failed run's assertion shows: where a process died of a fatal signal, the start of its faulthandler
    dump (every thread's Python stack; torchrun's own report and the dump's list of extension modules would push it
    out of the end), then the end of stderr."""
    at = err.find("Fatal Python error")
    return (err[at:at + 6000] + "\n[...]\n" if at >= 0 else "") + err[-3000:]


def run_cli(argv, nproc: int = 1, expect: int = 0) -> tuple[str, str]:
    """``python -m tailkd.cli argv`` in one process, or under torchrun with ``nproc`` gloo processes; asserts the
    exit code ``expect`` and returns (stdout, stderr). A session of its own, so that a hang ends with the whole
    group (torchrun AND its workers) killed after 300 s."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                      "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.Popen([sys.executable, *launcher, "-m", "tailkd.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"timed out: {failure_text(err)}") from None
    assert proc.returncode == expect, failure_text(err)
    return out, err
