"""A run folder and the state that makes a run resumable: claim it or resume it, its config, metrics.jsonl, and
checkpoints of the whole training state (student, optimizer, scheduler, sampler, RNG, counters).

`prepare_run_dir` decides (new run, resume, refuse) without writing; `claim_run_dir` writes only after every input
checked out. `Progress` holds the counters of a run (saved in every checkpoint; older checkpoints' dicts load with
defaults). `save` / `restore` go through `tailkd.checkpoint` (atomic, verified files) and `tailkd.distributed`
(full state dicts gathered to rank 0, broadcast back on resume), so a run resumes on another number of processes.
Run control: `deterministic_mode` (``train.deterministic``) and `stop_on_signals` (SIGINT / SIGTERM end a run after
its current step, with a checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from tailkd import checkpoint as ckpt
from tailkd import distributed as dist
from tailkd import jsonfile
from tailkd.config import (
    CALIBRATED_CHOICES,
    DistillConfig,
    absolute_paths,
    flatten,
    from_dict,
    load_yaml,
    save_yaml,
    to_dict,
)
from tailkd.errors import TailkdError

# Config keys that may differ between a run and its resumption. Run control, logging, held-out evaluation and
# checkpointing keys, and activation_checkpointing (the same operations, recomputed), leave the result bit-identical;
# the compute path (train.device, parallel, fused_loss,
# loss_chunk_size, loss_kernels, compile) computes the same maths with another float rounding (fused_loss on for the
# last 7 of 12 tiny steps: weights within 6e-8); train.max_steps lengthens or shortens the run, its warm-up / cosine
# schedule recomputed over the new length from the resumed step on (`tailkd.prepare.use_optimizer_settings`).
RESUME_FREE_KEYS = {"train.resume", "train.overwrite", "train.max_steps", "train.eval_every", "train.save_every",
                    "train.log_every", "train.keep_last", "train.device", "train.out_dir", "train.stop_after",
                    "train.force_resume", "train.max_bad_steps", "train.parallel", "train.fused_loss",
                    "train.loss_chunk_size", "train.loss_kernels", "train.compile", "train.ddp_timeout",
                    "train.activation_checkpointing", "train.report_to"}


@dataclasses.dataclass
class Progress:
    """The counters of a run, saved in every checkpoint (``trainer.pt``'s ``state``)."""

    step: int = 0
    tokens: int = 0  # training tokens so far (global: rows x seq_len)
    elapsed: float = 0.0  # seconds spent in steps
    initial_heldout: dict | None = None  # held-out metrics before the first step
    final_heldout: dict | None = None  # ... after the last (a resume after a failed final write reuses them; a further
    #                                      step, a run resumed with more steps, drops them: `tailkd.train`)
    bad_steps: int = 0  # steps skipped for a non-finite loss or gradient norm
    bad_in_a_row: int = 0
    empty_steps: int = 0  # steps skipped for having no valid token
    on_policy_batches: int = 0  # micro-batches whose responses the student generated (train.on_policy)
    generated_tokens: int = 0  # ... and the tokens it generated (all ranks)
    generation_seconds: float = 0.0  # seconds spent generating (rank 0's)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> Progress:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


LOG_REFRESH_S = 30.0  # the shortest interval between two refreshes of a progress bar whose stream is not a terminal


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar (rate, ETA) for a long loop. On a terminal it refreshes as tqdm does (up to 10 times a
    second); where its stream (``file``, default stderr) is not a terminal — a CI log, a file, a pipe — at most every
    `LOG_REFRESH_S` seconds, so a log holds a line per 30 s, not one carriage-return update per batch
    (``TQDM_MININTERVAL`` in the environment, or a ``mininterval`` given here, decides instead)."""
    from tqdm.auto import tqdm

    stream = kwargs.get("file") or sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        terminal = False
    if not terminal and "mininterval" not in kwargs and "TQDM_MININTERVAL" not in os.environ:
        kwargs.update(mininterval=LOG_REFRESH_S, maxinterval=max(LOG_REFRESH_S, kwargs.get("maxinterval", 0)))
    return tqdm(iterable, **kwargs)


class MetricsLog:
    """Append-only JSONL written by rank 0; on resume, lines after the checkpoint's step are dropped first
    (and a line cut short by a kill, or one that is not UTF-8 or not readable JSON). With ``tensorboard`` (a folder,
    ``train.report_to tensorboard``) every line's numbers go to TensorBoard too, as ``SPLIT/KEY`` at its step, flushed
    per line. The folder is metrics.jsonl's copy: each invocation removes its event files and writes the lines kept
    again first, so TensorBoard shows what metrics.jsonl holds whichever loader reads it (its fast loader ignores
    ``purge_step`` markers) and whatever earlier invocations logged or did not (report_to switched on at a resume)."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard: Path | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = []
            for raw in path.read_bytes().splitlines():
                try:
                    ln = raw.decode("utf-8")
                    if json.loads(ln)["step"] <= resume_step:
                        keep.append(ln)
                except (ValueError, KeyError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
                    continue  # empty, the half line of a killed write, or a damaged one
            try:
                ckpt.atomic_write_text(path, "".join(ln + "\n" for ln in keep))  # a kill here keeps the history
            except OSError as exc:
                raise TailkdError(f"could not write {path} ({exc.strerror or exc}); free disk space and continue "
                                  "with --resume") from exc
        self.board = None
        if tensorboard is not None:
            writer = tensorboard_writer()
            for old in tensorboard.rglob("events.out.tfevents.*") if tensorboard.is_dir() else ():  # ~0.6 ms a row
                old.unlink()
            self.board = writer(str(tensorboard))
            for raw in path.read_bytes().splitlines() if path.exists() else ():
                try:
                    record = jsonfile.loads(raw.decode("utf-8"))  # non-finite values restored
                except (ValueError, RecursionError):
                    continue
                if isinstance(record, dict) and "step" in record:
                    self._board(record)

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as fh:
                fh.write(jsonfile.dumps(record) + "\n")
        except OSError as exc:
            raise TailkdError(f"could not append to {self.path} ({exc.strerror or exc}); free disk space and continue "
                              "with --resume from the last checkpoint") from exc
        if self.board is not None:
            self._board(record)

    def _board(self, record: dict) -> None:
        split = record.get("split", "train")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.board.add_scalar(f"{split}/{key}", value, global_step=record["step"])
        self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def tensorboard_writer():
    """torch's ``SummaryWriter`` (``train.report_to tensorboard``), or a one-line TailkdError naming the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the tensorboard package
        raise TailkdError("train.report_to tensorboard needs the tensorboard package: pip install tensorboard (or "
                          "pip install 'tailkd[tensorboard]')") from None
    return SummaryWriter


def heldout_record(step: int, tokens: int, metrics: dict) -> dict:
    """A ``metrics.jsonl`` line of held-out metrics: ``tokens`` are the training tokens so far (the x-axis of the
    curves); the number of held-out tokens scored is ``eval_tokens``."""
    metrics = dict(metrics)
    return {"step": step, "split": "heldout", "tokens": tokens, "eval_tokens": metrics.pop("tokens", 0), **metrics}


# --------------------------------------------------------------------------- how long the rest takes


def evals_between(step: int, stop_at: int, every: int, total: int) -> int:
    """Held-out evaluations after ``step`` up to ``stop_at``: every ``every`` steps, and the final one at ``total``."""
    periodic = len([s for s in range(step + 1, stop_at + 1) if every and s % every == 0 and s != total])
    return periodic + (stop_at == total)


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def expected_duration(step_seconds: float, steps_left: int, eval_seconds: float, evals_left: int) -> str:
    """The line printed after the first steps: the time the rest of the invocation should take, measured."""
    rest = step_seconds * steps_left + eval_seconds * evals_left
    done = time.strftime("%H:%M", time.localtime(time.time() + rest))
    evals = (f" + {evals_left} held-out evaluation{'s' * (evals_left != 1)} at {eval_seconds:.0f} s"
             if eval_seconds and evals_left else "")
    return (f"expected: {format_duration(rest)} more ({steps_left} step{'s' * (steps_left != 1)} at "
            f"{step_seconds:.1f} s/step{evals}); done around {done}")


# --------------------------------------------------------------------------- run folder


def prepare_run_dir(cfg: DistillConfig) -> tuple[Path, bool, list[str]]:
    """Decide between a new run and a resume: (run folder, resuming, config changes accepted by --force).

    Nothing is written here (see ``claim_run_dir``)."""
    out = Path(cfg.train.out_dir)  # not a file, nor under one: `DistillConfig.validate` (`check_out_path`)
    exists = out.is_dir() and any(not _first_config_leftover(p) for p in out.iterdir())
    if cfg.train.resume:
        if not exists:
            raise TailkdError(f"--resume given but {out} holds no run; drop --resume to start a new run (a run folder "
                              "moved since: --out its new place, as RUN/config.yaml names the folder it started in)")
        saved = out / "config.yaml"
        if not saved.exists():
            raise TailkdError(f"{out} has no config.yaml, so it is not a tailkd run; choose another --out")
        try:
            old = saved_config(saved)
        except TailkdError as exc:
            raise TailkdError(f"cannot resume {out}: its config.yaml is damaged ({exc}); start a new run with "
                              "another --out") from None
        diff = sorted(config_changes(old, cfg, RESUME_FREE_KEYS))
        new = flatten(to_dict(absolute_paths(cfg)))
        changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff]
        if diff and not cfg.train.force_resume:
            k = diff[0]
            raise TailkdError(f"cannot resume {out}: {k} was {old.get(k)!r}, now {new.get(k)!r}; resume with the "
                              f"run's own config (--config {saved}), start a new run with another --out, or pass "
                              "--force to resume with the new config")
        return out, True, changes
    if exists and not cfg.train.overwrite:
        raise TailkdError(f"run folder {out} already exists; pass --resume to continue it, --overwrite to replace it, "
                          "or choose another --out")
    if exists and not (out / "config.yaml").is_file():  # --overwrite deletes the folder: only ever a run's
        raise TailkdError(f"{out} is not a tailkd run folder (no config.yaml) and --overwrite would delete everything "
                          "in it; choose a new or empty folder with --out")
    return out, False, []


def saved_config(path: Path) -> dict:
    """The config a run saved as ``path`` (its config.yaml), `flatten`ed, its paths `absolute_paths` (an older run's
    are relative); TailkdError when it cannot be read, holds a value of the wrong type or is empty (a run saves every
    section: an empty one would read as the defaults)."""
    doc = load_yaml(path)
    if not doc:
        raise TailkdError("it is empty")
    return flatten(to_dict(absolute_paths(from_dict(DistillConfig, doc))))


def config_changes(old: dict, cfg: DistillConfig, free) -> list[str]:
    """The settings (dotted keys, in ``cfg``'s order, then those only the saved config has: an entry of a mapping such
    as ``loss.options.alpha`` that ``cfg`` no longer gives) in which a saved config (``flatten``ed, its paths
    `absolute_paths`) differs from ``cfg``, leaving out the keys in ``free``: a path spelled otherwise (relative,
    absolute) is no change."""
    new = flatten(to_dict(absolute_paths(cfg)))
    return [k for k in [*new, *(k for k in old if k not in new)] if k not in free and old.get(k) != new.get(k)]


def _write_config(cfg: DistillConfig, path: Path, *, replace: bool = True) -> None:
    """The run's config.yaml, without what one invocation did to the folder (--resume, --overwrite, --force): the
    printed ``tailkd distill --config RUN/config.yaml --resume`` continues it, and a later change needs --force
    again. ``replace=False``: FileExistsError where there is one already."""
    cfg = absolute_paths(cfg)  # read from any working directory (eval, --resume)
    train = dataclasses.replace(cfg.train, resume=False, overwrite=False, force_resume=False)
    saved = dataclasses.replace(cfg, train=train)
    ckpt.atomic_write_file(path, lambda tmp: save_yaml(saved, tmp), replace=replace)  # never half a config.yaml


def _first_config_leftover(path: Path) -> bool:
    """The temporary file of a config.yaml write killed before its rename (`atomic_write_file`): in a folder that
    holds nothing else no run ever started, and a new run may use the folder (removing it)."""
    return re.fullmatch(r"\.tmp-config\.yaml-\d+(@.+)?", path.name) is not None and path.is_file()


def claim_run_dir(out: Path, cfg: DistillConfig, resuming: bool, student_init: list | None = None,
                  changes: list[str] = ()) -> None:
    """Rank 0 (`distributed.on_main_then_all`: an error here is raised on every rank): create (or replace, with
    --overwrite) the run folder and save the resolved config, and ``student_init`` (how a student built from the
    teacher was initialised) as student_init.json. A resume writes nothing here (a student chosen from calibration
    rows is checked against the run's student_init.json, `check_student_init`, unless --force changed a student
    setting: then the checkpoint's own check says what does not fit): a config changed with --force (``changes``) is
    saved by `replace_config` once the checkpoint has loaded."""
    if resuming:
        if cfg.student.calibrated() and student_init is not None and not any(c.startswith("student.") for c in changes):
            check_student_init(out, student_init)
        return
    if out.exists() and cfg.train.overwrite:  # the run in it goes, the folder stays: a link to a folder elsewhere
        try:  # (another disk), a mount point (which no rmtree may remove)
            for child in out.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        except OSError as exc:
            raise TailkdError(f"--overwrite could not delete {exc.filename or out} ({exc.strerror or exc}); delete the "
                              f"run in {out} yourself or choose another --out") from exc
    try:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in filter(_first_config_leftover, out.iterdir()):
            if ckpt.left_by_dead_writer(leftover.name, untagged=True):  # not a live one: a run claiming it now
                leftover.unlink(missing_ok=True)
        _write_config(cfg, out / "config.yaml", replace=False)  # never over the config.yaml of a run that claimed
    except FileExistsError:  # the folder since `prepare_run_dir` looked
        raise TailkdError(f"run folder {out} was claimed by another tailkd run started at the same time; choose "
                          "another --out") from None
    except OSError as exc:  # a full disk, a folder this user may not write
        raise TailkdError(f"could not write {out / 'config.yaml'} ({exc.strerror or exc}); free disk space or choose "
                          "another --out") from exc
    if student_init is not None:
        try:
            ckpt.atomic_write_text(out / "student_init.json", jsonfile.dumps(student_init, indent=1))
        except OSError as exc:
            raise TailkdError(f"could not write {out / 'student_init.json'} ({exc.strerror or exc}); free disk space "
                              "and run the command again with --overwrite") from exc


def check_student_init(out: Path, student_init: list[dict]) -> None:
    """A resume's student built from the teacher is the run's: each parameter from the same teacher tensor (and, kept
    by use, the same experts; by activity or importance, the same units, channels and heads) as its student_init.json
    says, else a TailkdError naming the first that differs — a student built from calibration rows
    (`tailkd.config.CALIBRATED_CHOICES`) can come out otherwise on another machine (another float rounding of a near
    tie), over changed data or from a changed teacher. A run without the file (or an
    unreadable one) is not checked."""
    try:
        saved = jsonfile.loads((out / "student_init.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(saved, list) or not all(isinstance(row, dict) for row in saved):
        return

    fields = ("source", "experts", "units", "channels", "heads", "ssm_heads")

    def key(row: dict) -> tuple:
        return tuple(row.get(f) for f in ("name", *fields))

    for was, now in zip(saved, student_init):
        if key(was) != key(now):
            field = next((f for f in fields if was.get(f) != now.get(f)), "source")
            what = (f"built from {now.get('source')}, the run's from {was.get('source')}" if field == "source" else
                    f"its {field} {now.get(field)}, the run's {was.get(field)}")
            settings = ", ".join(f"student.{key} {value}" for key, value in CALIBRATED_CHOICES)
            raise TailkdError(f"cannot resume {out}: the student built now differs from the run's (student_init.json): "
                              f"{now.get('name')} {what}: a student chosen from calibration rows ({settings}) came "
                              "out otherwise here; resume on the machine, data and teacher the run started with")


def replace_config(out: Path, cfg: DistillConfig, changes: list[str]) -> None:
    """Rank 0, a resume with --force and the config ``changes``: the old config.yaml kept as
    config.replaced-TIME.yaml, ``cfg`` saved in its place. Called once the checkpoint has loaded: a forced resume
    that fails (a checkpoint that does not fit the new student, another number of rows) leaves the run's own
    config.yaml, which the error tells the user to resume with."""
    if changes:
        kept = out / f"config.replaced-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        try:
            shutil.copyfile(out / "config.yaml", kept)
            _write_config(cfg, out / "config.yaml")  # atomic: the old one stays where this fails
        except OSError as exc:
            raise TailkdError(f"could not write {out / 'config.yaml'} ({exc.strerror or exc}); free disk space and "
                              "continue with --resume --force") from exc
        print(f"tailkd: warning: --force: resuming {out} with a changed config ({'; '.join(changes)}); "
              f"the old one is kept as {kept.name}", file=sys.stderr)


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out: Path, model, optimizer, scheduler, sampler, progress: Progress, keep_last: int) -> Path:
    """Collective: gather the full state to rank 0, which writes checkpoint ``progress.step``. Returns its path
    on every rank; a write error is raised on every rank."""
    model_state, optim_state = dist.full_state(model, optimizer)

    def write() -> Path:
        trainer_state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(),
                         "sampler": sampler.state_dict(), "rng": rng_state(), "state": progress.to_dict(),
                         "world_size": dist.world()}
        return ckpt.save_checkpoint(out, progress.step, model_state, trainer_state, keep_last)

    return dist.broadcast(dist.on_main_then_all(write, main_only=True))


def _untrained_in_checkpoint(model, optimizer, saved: dict) -> str | None:
    """The first weight the run's ``optimizer`` trains that the saved optimizer state (``full_state``'s, keyed by
    name; empty on the ranks other than 0) has not in the same parameter group, else None. Checked before loading:
    torch skips such a weight when it is tied to another (the embeddings frozen in the checkpoint, trained now) and
    loads the other moments of its group one place off."""
    groups = saved.get("param_groups")
    if not groups:
        return None
    names: dict[int, list[str]] = {}
    for name, param in dist.unwrap(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for i, group in enumerate(optimizer.param_groups):
        held = set(groups[i]["params"]) if i < len(groups) else set()
        for param in group["params"]:
            own = names.get(id(param), ["?"])
            if not held.intersection(own):
                return own[0]
    return None


def restore(out: Path, model, student, optimizer, scheduler, sampler) -> Progress | None:
    """Load the newest good checkpoint of ``out`` into every rank (rank 0 reads the files and broadcasts);
    returns its counters, or None when the run has no checkpoint at all (killed before its first one: it starts
    again from step 0)."""

    def pick() -> str | None:
        ckpt.clean_partial_writes(out)
        path, skipped = ckpt.find_checkpoint(out)
        for bad, problem in skipped:
            print(f"tailkd: warning: skipping checkpoint {bad}: {problem}", file=sys.stderr)
        if path is None and skipped:
            raise TailkdError(f"none of the {len(skipped)} checkpoints in {out / ckpt.CKPT_DIR} is usable (newest: "
                              f"{skipped[0][1]}); start again with --overwrite")
        return None if path is None else str(path)

    path = dist.broadcast(dist.on_main_then_all(pick, main_only=True))
    if path is None:
        return None
    model_state, saved = dist.on_main_then_all(lambda: ckpt.load_checkpoint(Path(path), student),
                                               main_only=True) or ({}, {"optimizer": {}})
    small = dist.broadcast({key: saved.get(key) for key in ("scheduler", "sampler", "rng", "state")} |
                           {"stepped": bool(saved["optimizer"].get("state")),
                            "unfit": _untrained_in_checkpoint(model, optimizer, saved["optimizer"])})
    if small["unfit"]:
        raise TailkdError(f"checkpoint {path} does not fit this run's optimizer (it holds no state of "
                          f"{small['unfit']}, which this run trains); resume with the run's own config")
    try:
        dist.load_full_state(model, optimizer, model_state, saved["optimizer"], optimizer_stepped=small["stepped"])
    except (KeyError, RuntimeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TailkdError(f"checkpoint {path} does not fit this run's optimizer ({msg}); resume with the run's "
                          "own config") from None
    scheduler.load_state_dict(small["scheduler"])
    sampler.load_state_dict(small["sampler"])
    set_rng_state(small["rng"])
    dist.say(f"resuming {out} from {Path(path).name} (step {small['state']['step']})")
    return Progress.from_dict(small["state"])


# --------------------------------------------------------------------------- run control


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """``torch.use_deterministic_algorithms(True)`` for the duration (``train.deterministic``); the caller's
    setting (its ``warn_only`` too) is put back afterwards. When not enabled nothing is touched: setting the flag
    imports ``torch._dynamo`` (seconds), which an interrupted run would pay while it unwinds."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by cuBLAS in deterministic mode
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGINT and SIGTERM only record themselves in the yielded list: the loop finishes
    its current step, writes a checkpoint and returns (exit code 128 + signal: 130 / 143). A second SIGINT
    (Ctrl-C twice) interrupts at once, without a checkpoint. A signal the process ignores stays ignored (SIGINT in a
    background job of a script: the shell starts it so). A no-op outside the main thread."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not received and dist.is_main():
            again = " again" if signum == signal.SIGINT else ""
            print(f"\ntailkd: {signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                  f"(Ctrl-C{again} to stop at once, without one)", file=sys.stderr, flush=True)
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
