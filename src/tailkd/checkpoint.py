"""Atomic, verifiable checkpoints of the whole training state.

A checkpoint is a folder ``checkpoints/step_00000020/`` holding

- ``student.safetensors``: the student's state dict (exact float values),
- ``trainer.pt``: optimizer, scheduler, data-sampler position, RNG states, counters,
- ``manifest.json``: step and the sha256 of both files.

It is written into a temporary folder next to its final place, fsync'ed, then renamed: a crash
(or SIGKILL) mid-write leaves at most a ``.tmp-*`` folder that is ignored and cleaned up, never a
half checkpoint under a real name. Loading verifies the manifest; a checkpoint that fails is named
in a warning and the previous good one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tailkd.errors import TailkdError

CKPT_DIR = "checkpoints"
MODEL_FILE = "student.safetensors"
STATE_FILE = "trainer.pt"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_dir(final: Path, write) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``final`` (replacing it). Returns ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights share storage; safetensors refuses shared tensors, so keep one name per storage.
    out, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, trainer_state: dict, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically and prune to the last ``keep_last`` good ones."""
    final = Path(run_dir) / CKPT_DIR / f"step_{step:08d}"

    def write(tmp: Path) -> None:
        save_file(_state_dict_for_save(model), str(tmp / MODEL_FILE))
        torch.save(trainer_state, tmp / STATE_FILE)
        manifest = {"step": step, "files": {n: _sha256(tmp / n) for n in (MODEL_FILE, STATE_FILE)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))

    try:
        atomic_write_dir(final, write)
    except OSError as exc:
        raise TailkdError(
            f"could not write checkpoint {final} ({exc.strerror or exc}); free disk space and --resume "
            "from the previous checkpoint, which is intact"
        ) from exc
    ckpts = list_checkpoints(run_dir)
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders (not temporaries), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path) -> str | None:
    """None if ``path`` is complete and its files match the manifest, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return "missing or unreadable manifest.json"
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def latest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; bad ones are named in a warning and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict:
    """Load the student weights into ``model`` in place and return the trainer state."""
    state = load_file(str(Path(path) / MODEL_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied parameters were saved under one name only; anything else missing is an error.
    tied = {n for n in missing if _is_tied(model, n)}
    if set(missing) - tied or unexpected:
        raise TailkdError(f"checkpoint {path} does not fit this student (missing {sorted(set(missing) - tied)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}); resume with the run's own config")
    return torch.load(Path(path) / STATE_FILE, weights_only=False)


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    ptr = params[name].data_ptr()
    return any(p.data_ptr() == ptr and n != name for n, p in params.items())
