"""What a benchmark states beside its figures: the date, the machine and the software (bench/RESULTS.md's Machine,
Software and Date lines are read from it)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe(*packages: str) -> dict:
    """date, python, torch, the tailkd commit (``+`` if the working tree differs), cpu, cpu_count and
    versions[package] (None where not installed) for each of ``packages``."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty=+", "--abbrev=12"],
                                capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "commit": commit, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "versions": versions(*packages)}


def versions(*packages: str) -> dict:
    """The installed version of each of ``packages`` (None where not installed)."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def header(info: dict, threads: int) -> str:
    """One line for the top of a benchmark's output."""
    versions = "  ".join(f"{k} {v or 'not installed'}" for k, v in info["versions"].items())
    return (f"# {info['date']}  tailkd {info['commit']}  torch {info['torch']}  python {info['python']}  "
            f"{versions}  threads {threads}  {info['cpu']} ({info['cpu_count']} CPUs)")
