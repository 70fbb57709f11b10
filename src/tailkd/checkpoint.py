"""Atomic, verifiable checkpoints of the whole training state.

A checkpoint is a folder ``checkpoints/step_00000020/`` holding

- ``student.safetensors``: the student's state dict (exact float values),
- ``trainer.pt``: optimizer, scheduler, data-sampler position, RNG states, counters,
- ``manifest.json``: step and the sha256 of both files.

It is written into a temporary folder next to its final place, fsync'ed, then renamed: a crash
(or SIGKILL) mid-write leaves at most a ``.tmp-*`` folder that is ignored and cleaned up
(``clean_partial_writes``), never a half checkpoint under a real name. Old checkpoints are pruned by
renaming them away first, so a kill mid-prune cannot leave a half-deleted folder under a real name
either. Loading verifies the manifest; a checkpoint that fails is named and the previous good one is used.

The student's weights are given as a FULL state dict keyed by parameter name (one process, DDP and FSDP
alike; see ``tailkd.distributed.full_state``), so a checkpoint does not depend on the number of processes.

Test hook: ``TAILKD_TEST_CHECKPOINT_PAUSE=<seconds>`` sleeps inside the writer after the student file is
written and before the trainer state and the manifest, so that a test can kill the process while a
checkpoint is half written (tests/test_faults.py). It has no other effect.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tailkd.errors import TailkdError

CKPT_DIR = "checkpoints"
FINAL_DIR = "final"  # the saved student, RUN/final (written by tailkd.train.finish)
MODEL_FILE = "student.safetensors"
STATE_FILE = "trainer.pt"
MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
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


def writer_tag() -> str:
    """``<pid>@<host>``: who writes a temporary folder, so that a later writer can tell a dead one's leftovers."""
    return f"{os.getpid()}@{socket.gethostname()}"


NAME_MAX = 255  # bytes in one file name (Linux, macOS; ext4, xfs, btrfs, tmpfs, NFS)
_TEMP_ROOM = len(".tmp-") + len("-4194304@") + len("-") + 12  # what a temporary name adds to the target's (pid_max
# is 2^22 on 64-bit Linux: seven digits) besides the host name, with `new_temp_dir`'s 12 random hex digits


def temp_stem(name: str) -> str:
    """``name`` as the temporary and set-aside names beside it hold it (``.tmp-<stem>-<pid>@<host>[-<random>]``,
    ``.old-<stem>-<pid>@<host>``): ``name`` itself where those stay within `NAME_MAX` bytes, else its first bytes and
    ``~`` and 8 hex digits of its sha256 (a target named near the limit, e.g. a 240-character --out, could not be
    written: File name too long). The same for every writer of one target on one host, so that
    `remove_dead_writers` finds a dead one's leftovers."""
    room = NAME_MAX - _TEMP_ROOM - len(socket.gethostname().encode())
    raw = name.encode()
    if len(raw) <= room:
        return name
    head = raw[: max(room - 9, 1)].decode("utf-8", errors="ignore")  # never half a multi-byte character
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:8]}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def left_by_dead_writer(name: str, untagged: bool = False) -> bool:
    """Whether ``name`` (``...-<pid>@<host>`` or ``...-<pid>@<host>-<random>``, see `writer_tag`) is the leftover of
    a writer of THIS host whose process is gone. Another host's (a shared disk): False. ``untagged``: also a
    temporary file ``.tmp-<file>-<pid>`` of an older tailkd (before writer tags), read as this host's."""
    m = re.search(rf"-(\d+)@{re.escape(socket.gethostname())}(-[^-]+)?$", name)
    if m is None and untagged:
        m = re.fullmatch(r"\.tmp-[^@]+-(\d+)", name)
    return m is not None and not pid_alive(int(m.group(1)))


def remove_dead_writers(final: Path) -> list[Path]:
    """Remove what a killed ``atomic_write_dir`` of ``final`` left beside it: ``.tmp-<name>-<pid>@<host>-*``
    folders (never complete) and ``.old-<name>-<pid>@<host>`` ones (the replaced folder; put back if the kill came
    between the two renames and ``final`` is missing), for writers of THIS host whose process is gone. A live
    writer's folders and other hosts' (a shared disk) are left alone. Returns what was removed or put back."""
    final = Path(final)
    host = re.escape(socket.gethostname())
    name = re.escape(temp_stem(final.name))
    ours = re.compile(rf"\.tmp-{name}-\d+@{host}-[^-]+|\.old-{name}-\d+@{host}")
    done = []
    try:
        siblings = sorted(final.parent.iterdir())
    except OSError:
        return done
    for p in siblings:
        if not ours.fullmatch(p.name) or not left_by_dead_writer(p.name):
            continue
        if p.name.startswith(".old-") and not final.exists():
            os.replace(p, final)
        elif p.is_symlink():  # a link an older tailkd set aside (`atomic_write_dir` of a link): rmtree refuses one
            p.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)
        done.append(p)
    return done


def new_temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/<prefix><random>`` with the mode of any new folder (0o777 less the umask), not
    tempfile.mkdtemp's 0o700, which a rename into place would keep (a saved student unreadable to the user's group)."""
    while True:
        path = Path(parent) / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _new_file_mode(folder: Path) -> int:
    """The mode a new file gets in ``folder`` (0o666 less the umask), read off a probe file."""
    probe = Path(folder) / f".tmp-mode-probe-{secrets.token_hex(6)}"
    probe.touch()
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def _set_mode(path: Path, mode: int) -> None:
    if path.stat().st_mode & 0o777 != mode:
        os.chmod(path, mode)


def new_file_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode of a new file (0o666 less the umask): safetensors 0.8 creates its
    files 0o600 whatever the umask (safetensors issue #782), so a saved model.safetensors was unreadable to the user's
    group beside its config.json."""
    mode = _new_file_mode(folder)
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink():
            _set_mode(f, mode)


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """TailkdError unless the output folder ``out`` may be replaced whole (`atomic_write_dir`): missing, an empty
    folder, or an earlier output of ``what`` (a folder holding ``marker``); never a file or a folder of other files."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / marker).is_file():
        raise TailkdError(f"refusing to replace {out}: it exists and is not a tailkd {what} output (no {marker}); "
                          "choose a new or empty folder for --out")


def atomic_write_dir(final: Path, write) -> Path:
    """Call ``write(tmp_dir)`` then rename ``tmp_dir`` to ``final`` (replacing it). Returns ``final``, a folder with
    the permissions of any new one (`new_temp_dir`), its files those of any new file (`new_file_modes`).

    The temporary folder ``.tmp-<name>-<pid>@<host>-*`` is removed when ``write`` fails or a signal stops it (the
    replaced folder put back if it was already moved aside); one left by a killed process is removed by the next
    writer of ``final`` (``remove_dead_writers``). Two writers of ``final`` at once both succeed: the folder in place
    at the end is one of theirs, whole (`_put_in_place`). ``final`` a symlink (--out a link to a folder on another
    disk): the folder it points to is replaced (made if missing), the link stays."""
    given = final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers(final)
    if final.is_symlink():  # renamed aside, the link itself was replaced by a folder here, on the wrong disk
        final = Path(os.path.realpath(final))
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_writers(final)
    tmp = new_temp_dir(final.parent, f".tmp-{temp_stem(final.name)}-{writer_tag()}-")
    old = final.with_name(f".old-{temp_stem(final.name)}-{writer_tag()}")
    try:
        write(tmp)
        new_file_modes(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _put_in_place(tmp, final, old)
        _fsync_dir(final.parent)
    except BaseException:  # a failure, Ctrl-C or SIGTERM (Terminated): the old folder back if it was moved aside
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    return given


def _put_in_place(tmp: Path, final: Path, old: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final``: the folder there first moved aside to ``old``, then removed.

    No test-then-rename: another writer of ``final`` may rename between any two of these steps. The folder to move
    aside may be gone (the other moved it: nothing to move), and ``final`` may hold the other's complete folder when
    ours comes (renamed in while ours was moved aside: ENOTEMPTY); that one then stays, ours is dropped, as if ours
    had come first and been replaced. Either way one writer's whole folder is in place, and no ``.old-*`` is left."""
    try:
        os.replace(final, old)
    except FileNotFoundError:
        pass
    try:
        os.replace(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_file(final: Path, write, *, replace: bool = True) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``final``, fsync it, rename it to ``final`` (replacing
    it) and fsync the folder: after a crash there is the old file or the new one, never half of one. The file has
    the mode of any new file (`new_file_modes`). ``replace=False``: never replace an existing ``final``, even one
    another process creates meanwhile (FileExistsError). The temporary file is ``.tmp-<name>-<pid>@<host>`` (a long
    name shortened: `temp_stem`). ``final`` a symlink (--out a link to a file on another disk) and ``replace``: the
    file it points to is replaced (made if missing), the link stays. Returns ``final`` as given."""
    given = final = Path(final)
    if replace and final.is_symlink():  # renamed over, the link itself would become the file, here, on the wrong disk
        final = Path(os.path.realpath(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{temp_stem(final.name)}-{writer_tag()}")  # `left_by_dead_writer` tells a dead one's
    try:
        write(tmp)
        _set_mode(tmp, _new_file_mode(final.parent))  # that of any new file (safetensors 0.8 writes 0o600)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, final)
        else:
            _rename_new(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(final.parent)
    return given


def _rename_new(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` unless ``final`` exists (FileExistsError): a hard link fails atomically on an
    existing name; where the file system has no hard links, a check then a rename."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:
        if final.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(final)) from None
        os.replace(tmp, final)


def atomic_write_text(final: Path, text: str) -> Path:
    """`atomic_write_file` of UTF-8 text."""
    return atomic_write_file(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class _RecordingWriter:
    """A binary file for torch.save that remembers the OSError of a failed write (torch's zip writer replaces it
    with a RuntimeError such as "[enforce fail at inline_container.cc:672] . unexpected pos 40960 vs 40852")."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_torch(obj, path: Path) -> None:
    """``torch.save(obj, path)``, raising a failed write (disk full, quota, I/O error) as the OSError it is."""
    with open(path, "wb") as fh:
        sink = _RecordingWriter(fh)
        try:
            torch.save(obj, sink)
        except RuntimeError as exc:
            if sink.error is not None:
                raise sink.error from exc
            raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, raising a failed write as an OSError (safetensors raises its own
    ``SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)``)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        failure = io_failure(exc)
        if failure is None:
            raise
        raise failure from exc


def io_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write, or None if ``exc`` is not one: an OSError itself, or a
    ``SafetensorError`` that names an ``os error N`` (safetensors' way of reporting e.g. a full disk, also from
    ``save_pretrained``). torch's own wrapping is undone where tailkd writes (`save_torch`)."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"os error (\d+)", str(exc)) if isinstance(exc, SafetensorError) else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Tied weights share storage; safetensors refuses shared tensors, so keep one name per storage.
    out, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def _test_pause() -> None:
    seconds = os.environ.get("TAILKD_TEST_CHECKPOINT_PAUSE")
    if seconds:
        time.sleep(float(seconds))


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], trainer_state: dict,
                    keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically and prune to the last ``keep_last`` up to it (newer ones, which a resume
    skipped as bad, are left to be replaced: never counted in place of the one just written).

    ``model_state``: the student's full state dict (name -> tensor); ``trainer_state``: anything torch.save
    takes. A failed write (disk full, permissions: an OSError, also where torch or safetensors wrap it in their own
    error) becomes a TailkdError; nothing of the new checkpoint is left and the previous ones are intact.
    """
    final = Path(run_dir) / CKPT_DIR / f"step_{step:08d}"

    def write(tmp: Path) -> None:
        save_safetensors(_dedupe_shared(model_state), tmp / MODEL_FILE)
        _test_pause()
        save_torch(trainer_state, tmp / STATE_FILE)
        manifest = {"step": step, "files": {n: file_sha256(tmp / n) for n in (MODEL_FILE, STATE_FILE)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))

    try:
        clean_partial_writes(run_dir)
        atomic_write_dir(final, write)
    except OSError as exc:
        raise TailkdError(
            f"could not write checkpoint {final} ({exc.strerror or exc}); free disk space and --resume "
            "from the previous checkpoint, which is intact"
        ) from exc
    # up to this one: a newer checkpoint is one a --resume skipped as bad (replaced when the run reaches its step)
    ckpts = [p for p in list_checkpoints(run_dir) if p.name <= final.name]
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        _remove_dir(old)
    return final


def _remove_dir(path: Path) -> None:
    """Rename out of the way first (atomic), then delete: never a half-deleted folder under a real name."""
    gone = path.with_name(f".tmp-deleting-{path.name}-{os.getpid()}")
    try:
        os.replace(path, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def clean_partial_writes(run_dir: Path) -> None:
    """Remove what a killed writer left in ``run_dir/checkpoints``: ``.tmp-*`` folders (never complete), and
    ``.old-*`` folders (a replaced checkpoint; put back if the kill came between the two renames); and in ``run_dir``
    what a writer of the saved student ``final/`` left: ``.tmp-final-*`` and ``.old-final-*`` (the run writes final/
    again at its end)."""
    for p in sorted(Path(run_dir).glob(f".tmp-{FINAL_DIR}-*")) + sorted(Path(run_dir).glob(f".old-{FINAL_DIR}-*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".old-"):
            m = re.match(r"\.old-(step_\d+)-", p.name)
            if m and not (root / m.group(1)).exists():
                os.replace(p, root / m.group(1))
            else:
                shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders (not temporaries), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path) -> str | None:
    """None if ``path`` is complete and its files match the manifest, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8 or not JSON; Recursion: nested too deep
        return "missing or unreadable manifest.json"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or set(files) != {MODEL_FILE, STATE_FILE}:
        return f"manifest.json does not list {MODEL_FILE} and {STATE_FILE}"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if file_sha256(f) != digest:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def find_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that verifies or None, [(newer bad checkpoint, what is wrong), ...])."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def load_checkpoint(path: Path, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(the student's full state dict, the trainer state) of checkpoint ``path``.

    ``model`` (the unwrapped student) is only used to check that the weights fit it and to restore the
    names of tied parameters, which were saved once.
    """
    path = Path(path)
    state = load_file(str(path / MODEL_FILE))
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, param in params.items():  # tied names: take the tensor saved under a partner's name
        if name not in state:
            partner = next((n for n, p in params.items() if p is param and n in state), None)
            if partner is not None:
                state[name] = state[partner]
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise TailkdError(f"checkpoint {path} does not fit this student (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); resume with the run's own config")
    for name, tensor in model.state_dict().items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise TailkdError(f"checkpoint {path} does not fit this student: {name} has shape "
                              f"{tuple(state[name].shape)}, the student {tuple(tensor.shape)}; resume with the "
                              "run's own config")
    return state, torch.load(path / STATE_FILE, weights_only=False)
