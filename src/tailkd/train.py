"""The one training loop: setup -> held-out eval -> steps (-> eval, checkpoint) -> final student.

``distill(cfg)`` is the Python API behind ``tailkd distill``. Reads top to bottom:

1. processes: one, or several launched by torchrun / accelerate launch (``tailkd.distributed``);
2. run folder: refuse to clobber, or resume, or overwrite (only after every input checked out);
3. teacher (eval, no grad, replicated on every rank), student (built from the teacher or loaded), vocabulary;
4. data: tokenised once to a cache, packed rows, held-out rows, ONE resumable sampler shared by all ranks;
5. optimizer (AdamW) + warm-up/cosine schedule; state restored on ``--resume``;
6. steps: micro-batches -> global valid-token count -> teacher signal (online teacher or a teacher cache,
   ``tailkd.teacher``) -> objective (full logits, or the fused chunked layer ``tailkd.fused``) -> backward ->
   clip -> check -> step;
7. the final student saved with ``save_pretrained`` + tokenizer in ``run/final``.

Global-batch semantics: ``train.batch_size`` rows per micro-batch IN TOTAL, split over the processes
(rank r takes rows r, r+W, r+2W, ... of every micro-batch drawn from the shared sampler), and
``train.grad_accum`` micro-batches per optimizer step. The same config therefore trains on the same rows
with the same gradient on 1 or W processes, and a run can resume on a different number of processes.

Faults: a step whose loss or gradient norm is not finite is skipped (no optimizer/scheduler update) and
counted; ``train.max_bad_steps`` in a row stop the run with a checkpoint. SIGINT/SIGTERM finish the
current step, write a checkpoint and return exit code 130/143 (see ``stop_on_signals``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tailkd import checkpoint as ckpt
from tailkd import data as data_mod
from tailkd import distributed as dist
from tailkd import fused, models
from tailkd import teacher as teacher_mod
from tailkd.config import DistillConfig, from_dict, load_yaml, save_yaml, to_dict
from tailkd.errors import TailkdError
from tailkd.evaluate import CHUNK_ELEMENTS, IGNORE_INDEX, add_sums, finalize, forward_logits, token_sums
from tailkd.flops import distill_flops
from tailkd.head import verify_head
from tailkd.objective import count_valid_tokens, step_terms
from tailkd.registry import LOSSES

# Config keys that may differ between a run and its resumption (they do not change the result).
RESUME_FREE_KEYS = {"train.resume", "train.overwrite", "train.max_steps", "train.eval_every", "train.save_every",
                    "train.log_every", "train.keep_last", "train.device", "train.out_dir", "train.stop_after",
                    "train.force_resume", "train.max_bad_steps", "train.parallel", "train.fused_loss",
                    "train.loss_chunk_size"}
TERMS = ("loss", "clm", "div", "cos")
CURVES_FILE = "curves.png"
resolve_device = dist.resolve_device  # kept here for callers of the single-process API


# --------------------------------------------------------------------------- small helpers


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def say(message: str, *, err: bool = False) -> None:
    """One line on rank 0 only (stdout, or stderr with ``err``), above the progress bar if one is shown."""
    if dist.is_main():
        tqdm.write(message, file=sys.stderr if err else sys.stdout)


NATIVE_BF16_ENV = "TAILKD_NATIVE_BF16"  # 0 / 1: override the detection below (e.g. 0 tests the fp32 path of CPUs
#                                       without native bf16 on a CPU that has it)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX).

    ``TAILKD_NATIVE_BF16=0`` (or ``1``) in the environment replaces the detection, so that ``precision: auto``
    takes the fp32 path (or bf16) whatever the hardware."""
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise TailkdError(f"{NATIVE_BF16_ENV}={forced!r} must be 0 (no native bf16: fp32 by default) or 1; "
                              "unset it to detect the hardware")
        return forced == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in probes)


def autocast_dtype(precision: str, device: torch.device):
    """bf16 autocast for ``precision`` bf16, or auto where the hardware has native bf16; else None (fp32)."""
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """``torch.use_deterministic_algorithms(True)`` for the duration (``train.deterministic``)."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by cuBLAS in deterministic mode
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def make_optimizer(model: torch.nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas))


class MetricsLog:
    """Append-only JSONL written by rank 0; on resume, lines after the checkpoint's step are dropped first
    (and a line cut short by a kill)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = []
            for ln in path.read_text().splitlines():
                try:
                    if json.loads(ln)["step"] <= resume_step:
                        keep.append(ln)
                except (ValueError, KeyError, TypeError):
                    continue  # empty, or the half line of a killed write
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise TailkdError(f"could not append to {self.path} ({exc.strerror or exc}); free disk space and continue "
                              "with --resume from the last checkpoint") from exc


def heldout_record(step: int, tokens: int, metrics: dict) -> dict:
    """A ``metrics.jsonl`` line of held-out metrics: ``tokens`` are the training tokens so far (the x-axis of the
    curves); the number of held-out tokens scored is ``eval_tokens``."""
    metrics = dict(metrics)
    return {"step": step, "split": "heldout", "tokens": tokens, "eval_tokens": metrics.pop("tokens", 0), **metrics}


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
    evals = f" + {evals_left} held-out evaluations at {eval_seconds:.0f} s" if eval_seconds and evals_left else ""
    return (f"expected: {format_duration(rest)} more ({steps_left} steps at {step_seconds:.1f} s/step{evals}); "
            f"done around {done}")


# --------------------------------------------------------------------------- run folder


def prepare_run_dir(cfg: DistillConfig) -> tuple[Path, bool, list[str]]:
    """Decide between a new run and a resume: (run folder, resuming, config changes accepted by --force).

    Nothing is written here (see ``claim_run_dir``)."""
    out = Path(cfg.train.out_dir)
    if out.exists() and not out.is_dir():
        raise TailkdError(f"train.out_dir {out} is a file; choose a folder name with --out")
    exists = out.is_dir() and any(out.iterdir())
    if cfg.train.resume:
        if not exists:
            raise TailkdError(f"--resume given but {out} holds no run; drop --resume to start a new run")
        saved = out / "config.yaml"
        if not saved.exists():
            raise TailkdError(f"{out} has no config.yaml, so it is not a tailkd run; choose another --out")
        try:
            old = _flat(to_dict(from_dict(DistillConfig, load_yaml(saved))))
        except TailkdError as exc:
            raise TailkdError(f"cannot resume {out}: its config.yaml is damaged ({exc}); start a new run with "
                              "another --out") from None
        new = _flat(to_dict(cfg))
        diff = sorted(k for k in new if k not in RESUME_FREE_KEYS and old.get(k) != new.get(k))
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
    return out, False, []


def _write_config(cfg: DistillConfig, path: Path) -> None:
    ckpt.atomic_write_file(path, lambda tmp: save_yaml(cfg, tmp))  # a kill never leaves a half config.yaml


def claim_run_dir(out: Path, cfg: DistillConfig, resuming: bool, changes: list[str]) -> None:
    """Rank 0: create (or replace, with --overwrite) the run folder and save the resolved config."""
    if not resuming:
        if out.exists() and cfg.train.overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, out / "config.yaml")
    elif changes:
        kept = out / f"config.replaced-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        shutil.copyfile(out / "config.yaml", kept)
        _write_config(cfg, out / "config.yaml")
        print(f"tailkd: warning: --force: resuming {out} with a changed config ({'; '.join(changes)}); "
              f"the old one is kept as {kept.name}", file=sys.stderr)


# --------------------------------------------------------------------------- setup


def setup_models(cfg: DistillConfig, device: torch.device):
    """Teacher (frozen) and student; returns (teacher or None, student, tokenizer, shared vocab, table)."""
    teacher, t_tok = models.load_teacher(cfg.teacher.path, device=device, dtype=cfg.teacher.dtype)
    table = None
    if cfg.student.path:
        student, s_tok = models.load_causal_lm(cfg.student.path)
        student.to(device=device, dtype=torch.float32)
        if cfg.student.freeze_embeddings:
            from tailkd.student import freeze_student_embeddings

            freeze_student_embeddings(student)
    else:
        from tailkd.student import build_student, format_table

        s = cfg.student
        student, table = build_student(
            teacher, num_layers=s.num_layers, layers=s.layers, hidden_size=s.hidden_size, num_heads=s.num_heads,
            num_kv_heads=s.num_kv_heads, intermediate_size=s.intermediate_size, mlp_init=s.mlp_init,
            freeze_embeddings=s.freeze_embeddings, seed=cfg.train.seed,
        )
        student.to(device=device, dtype=torch.float32)
        s_tok = t_tok
        say(format_table(table))
    vocab = models.check_vocab(t_tok, s_tok, teacher, student)
    student.train()
    if not LOSSES[cfg.loss.name].needs_teacher:
        teacher = None
    return teacher, student, t_tok, vocab, table


def setup_data(cfg: DistillConfig, tokenizer, model_max: int):
    """(info, train_rows, held_rows): packed text rows (task pretrain) or prompt/response rows (task sft).

    Both give rows of ``input_ids``/``labels`` (shifted once, -100 = ignore)/``segment_ids``; the loop is the same.
    """
    data_mod.check_seq_len(cfg.data.seq_len, model_max)
    cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else data_mod.default_cache_root()
    if cfg.data.task == "sft":
        from tailkd.sft import setup_sft_rows

        train_rows, held_rows, info = setup_sft_rows(cfg.data, tokenizer, cache_root)
        return info, train_rows, held_rows
    paths = [Path(p) for p in cfg.data.paths if p != "builtin:math"]
    if "builtin:math" in cfg.data.paths:  # the worked solutions of the built-in math problems (stage-1 corpus)
        from tailkd.mathdata import default_math_dataset

        math = default_math_dataset(cache_root, n_train=cfg.data.math_train, n_heldout=cfg.data.math_heldout)
        paths.append(math.corpus)
    paths = paths or data_mod.default_corpus_files(cache_root)
    info = data_mod.prepare_corpus_cached(
        paths, tokenizer, cache_root / "corpora", tokenizer_fingerprint=models.tokenizer_fingerprint(tokenizer),
        heldout_fraction=cfg.data.heldout_fraction, doc_sep=cfg.data.doc_sep,
    )
    train_rows = data_mod.PackedRows(info.train_bin, cfg.data.seq_len)
    held_rows = data_mod.PackedRows(info.heldout_bin, cfg.data.seq_len)
    return info, train_rows, held_rows


def choose_loss_path(cfg: DistillConfig, vocab: int) -> bool:
    """``train.fused_loss``: True for the fused, chunked loss layer (`tailkd.fused`), False for full logits."""
    tokens = max(1, cfg.train.batch_size // dist.world()) * cfg.data.seq_len  # one rank's micro-batch
    fused_path = fused.use_fused(cfg.train.fused_loss, tokens, vocab)
    if fused_path and cfg.train.parallel == "fsdp":
        if cfg.train.fused_loss == "on":
            raise TailkdError("train.fused_loss=on does not combine with train.parallel=fsdp (FSDP shards the LM head "
                              "the fused layer reads); use --train.parallel ddp or --train.fused_loss off")
        return False
    return fused_path


def setup_teacher_signal(cfg: DistillConfig, teacher, student, tokenizer, info, vocab: int, device, ac,
                         fused_path: bool, probe: torch.Tensor):
    """(signal_of, description): where each step's teacher signal comes from, and in words which loss that gives.

    Online: the teacher runs on every micro-batch (full logits, or final hidden states + LM head when fused).
    ``teacher.cache``: a `tailkd.cache.CacheReader` checked against this run (tokenizer, corpus, split, seq_len,
    K, teacher weights, and each batch's row hashes); a top-K cache gives D_KL1 (+ a sampled tail estimate), a
    cache with hidden states the exact loss. On the fused path the LM heads are checked once against the models'
    own logits (``probe``: a few token ids)."""
    if fused_path:
        verify_head(student, probe, vocab_size=vocab)
    if not LOSSES[cfg.loss.name].needs_teacher:
        return None, "clm: no teacher"
    if cfg.teacher.cache:
        from tailkd.cache import open_cache

        reader = open_cache(cfg.teacher.cache, tokenizer=tokenizer, corpus_fingerprint=info.fingerprint,
                            split="train", seq_len=cfg.data.seq_len,
                            k=cfg.loss.k if "k" in LOSSES[cfg.loss.name].knobs else None, teacher_model=teacher)
        description = reader.check_loss(cfg.loss.name, cfg.loss.temperature, cfg.loss.cosine_weight)
        return teacher_mod.CachedTeacher(reader, device=device), f"teacher cache {cfg.teacher.cache}: {description}"
    if fused_path:
        verify_head(teacher, probe, vocab_size=vocab)
    online = teacher_mod.OnlineTeacher(teacher, vocab, fused_path=fused_path, autocast_dtype=ac,
                                       want_hidden=cfg.loss.cosine_weight > 0)
    return online, f"{cfg.loss.name}: exact, online teacher"


def check_batch_split(batch_size: int) -> None:
    w = dist.world()
    if batch_size % w:
        raise TailkdError(f"train.batch_size={batch_size} is the GLOBAL micro-batch and must split evenly over the "
                          f"{w} processes; use --batch-size {math.ceil(batch_size / w) * w}")


# --------------------------------------------------------------------------- data: this rank's share


def next_micro_batches(rows: data_mod.PackedRows, sampler: data_mod.RowSampler, cfg: DistillConfig) -> list[dict]:
    """This rank's ``grad_accum`` micro-batches of the next optimizer step.

    Every rank draws the same global micro-batch of ``train.batch_size`` row indices from the shared sampler
    (same seed, same state) and keeps rows ``rank::world``: the ranks' rows are disjoint and together exactly
    the one-process batch, and the sampler's state stays the same on every rank (rank 0 saves it)."""
    r, w = dist.rank(), dist.world()
    micro = []
    for _ in range(cfg.train.grad_accum):
        idx = [next(sampler) for _ in range(cfg.train.batch_size)]
        micro.append(data_mod.collate_rows(rows, idx[r::w]))  # (batch_size / world, T) each, + row_index
    return micro


# --------------------------------------------------------------------------- one optimizer step


def forward_backward(model, signal_of, micro: list[dict], *, cfg: DistillConfig, vocab: int, device, ac,
                     fused_path: bool) -> dict:
    """Forward + backward of this rank's micro-batches; gradients accumulate in ``.grad`` and are reduced over
    ranks by DDP/FSDP on the last micro-batch only.

    ``signal_of(batch)``: the teacher signal of a micro-batch (online teacher or teacher cache; None for clm).
    ``fused_path``: the loss from the final hidden states in chunks (`tailkd.fused`), else from full logits.

    Denominator: the GLOBAL number of valid tokens of the step (every micro-batch, every rank), summed with one
    all_reduce BEFORE the first backward. Each rank's loss is multiplied by the world size to undo DDP's
    gradient average, so the gradient equals that of one process running the whole global batch. Returns this
    rank's part of the loss terms (the parts add up over ranks to the step's loss) and the global valid-token
    count. A step without a single valid token (every label -100 on every rank) runs no forward at all."""
    (n_valid,) = dist.sum_over_ranks([sum(count_valid_tokens(mb["labels"]) for mb in micro)], device)
    n_valid = int(n_valid)
    scale = dist.loss_scale()
    chunk = cfg.train.loss_chunk_size or None
    terms_sum = dict.fromkeys(TERMS, 0.0)
    for i, mb in enumerate(micro if n_valid else []):
        batch = {key: value.to(device) for key, value in mb.items()}  # input_ids, labels, segment_ids (b, T)
        with dist.grad_sync(model, sync=i == len(micro) - 1):
            signal = signal_of(batch) if signal_of is not None else None
            terms = step_terms(model, batch, signal, n_valid, cfg.loss, vocab_size=vocab, fused_path=fused_path,
                               chunk_size=chunk, autocast_dtype=ac)
            (terms.loss * scale).backward()  # scale 1.0 in one process: exact, changes nothing
        for key in TERMS:
            terms_sum[key] += float(getattr(terms, key).detach())
    return terms_sum, n_valid


def clip_and_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Total gradient norm before clipping (clips to ``max_norm`` when > 0). The same on every rank."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    return float(norm)


# --------------------------------------------------------------------------- held-out evaluation


@torch.no_grad()
def heldout(model, teacher, held_rows, cfg: DistillConfig, vocab: int, device, ac) -> dict:
    """Held-out metrics of the first ``data.eval_rows`` rows (tailkd.evaluate's sums): rank r scores rows
    r::world, the sums are added over ranks, then divided once, so 1 and W processes give the same metrics.

    Every rank runs the same number of forward passes (FSDP's forward is a collective): a rank without rows
    left runs a throw-away forward on row 0."""
    student = dist.unwrap(model)
    n = min(len(held_rows), cfg.data.eval_rows)
    r, w = dist.rank(), dist.world()
    mine = list(range(r, n, w))
    per_batch = max(1, cfg.train.batch_size // w)
    # rows per forward: at most ~1 GiB of float32 logits per model (metrics do not depend on it), e.g. 1 row of
    # 2048 x 151936 instead of the training micro-batch's 8 rows (10 GB per model)
    per_batch = max(1, min(per_batch, fused.AUTO_BYTES // (4 * cfg.data.seq_len * vocab)))
    n_batches = math.ceil(math.ceil(n / w) / per_batch)
    sums: dict[str, torch.Tensor] = {}
    was_training = student.training
    student.eval()
    try:
        for b in range(n_batches):
            rows = mine[b * per_batch:(b + 1) * per_batch]
            batch = data_mod.collate([held_rows[i] for i in (rows or [0])])
            input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)  # (b, T)
            s_logits, _ = forward_logits(student, input_ids, vocab, autocast_dtype=ac)  # (b, T, V)
            t_logits = None
            if teacher is not None:
                t_logits, _ = forward_logits(teacher, input_ids, vocab, autocast_dtype=ac)  # (b, T, V)
            mask = labels != IGNORE_INDEX  # (b, T)
            if not rows or not bool(mask.any()):
                continue
            s_logits, y = s_logits[mask], labels[mask]  # (N, V), (N,)
            t_logits = None if t_logits is None else t_logits[mask]  # (N, V)
            chunk = max(1, CHUNK_ELEMENTS // s_logits.shape[-1])  # positions per [chunk, V] piece
            for start in range(0, y.numel(), chunk):
                sl = slice(start, start + chunk)
                add_sums(sums, token_sums(s_logits[sl], None if t_logits is None else t_logits[sl], y[sl]))
    finally:
        student.train(was_training)
    return finalize(dist.gather_sums(sums))


# --------------------------------------------------------------------------- checkpoints


def save(out: Path, model, optimizer, scheduler, sampler, state: dict, keep_last: int) -> Path:
    """Collective: gather the full state to rank 0, which writes checkpoint ``state["step"]``. Returns its path
    on every rank; a write error is raised on every rank."""
    model_state, optim_state = dist.full_state(model, optimizer)

    def write() -> Path:
        trainer_state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(),
                         "sampler": sampler.state_dict(), "rng": rng_state(), "state": dict(state),
                         "world_size": dist.world()}
        return ckpt.save_checkpoint(out, state["step"], model_state, trainer_state, keep_last)

    return dist.broadcast(dist.on_main_then_all(write, main_only=True))


def restore(out: Path, model, student, optimizer, scheduler, sampler) -> dict | None:
    """Load the newest good checkpoint of ``out`` into every rank (rank 0 reads the files and broadcasts);
    returns its trainer counters, or None when the run has no checkpoint at all (killed before its first
    one: it starts again from step 0)."""

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
                           {"stepped": bool(saved["optimizer"].get("state"))})
    try:
        dist.load_full_state(model, optimizer, model_state, saved["optimizer"], optimizer_stepped=small["stepped"])
    except (KeyError, RuntimeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TailkdError(f"checkpoint {path} does not fit this run's optimizer ({msg}); resume with the run's "
                          "own config") from None
    scheduler.load_state_dict(small["scheduler"])
    sampler.load_state_dict(small["sampler"])
    set_rng_state(small["rng"])
    say(f"resuming {out} from {Path(path).name} (step {small['state']['step']})")
    return {"bad_steps": 0, "bad_in_a_row": 0, "empty_steps": 0, **small["state"]}


# --------------------------------------------------------------------------- signals


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGINT and SIGTERM only record themselves in the yielded list: the loop finishes
    its current step, writes a checkpoint and returns (exit code 128 + signal: 130 / 143). A second SIGINT
    (Ctrl-C twice) interrupts at once, without a checkpoint. A no-op outside the main thread."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not received and dist.is_main():
            print(f"\ntailkd: {signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                  "(Ctrl-C again to stop at once, without one)", file=sys.stderr, flush=True)
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- the loop


def distill(cfg: DistillConfig) -> dict:
    """Run a distillation described by ``cfg``; returns a summary dict (also saved as summary.json).

    In several processes (torchrun / accelerate launch) every rank calls this; rank 0 writes the files. The
    summary's ``exit_code`` is non-zero (130 / 143) when a signal stopped the run early."""
    cfg.validate()
    device = dist.setup(cfg.train.device)
    try:
        with deterministic_mode(cfg.train.deterministic), contextlib.ExitStack() as cleanup:
            return _distill(cfg, device, cleanup)
    finally:
        dist.shutdown()


def _distill(cfg: DistillConfig, device: torch.device, cleanup: contextlib.ExitStack) -> dict:
    """The loop; ``cleanup`` undoes the signal handlers and closes the progress bar on every way out."""
    ac = autocast_dtype(cfg.train.precision, device)
    check_batch_split(cfg.train.batch_size)
    out, resuming, changes = dist.on_main_then_all(lambda: prepare_run_dir(cfg))
    seed_everything(cfg.train.seed)

    # --- models (rank 0 first: a GGUF teacher is converted into a cache once)
    teacher, student, tokenizer, vocab, table = dist.on_main_then_all(lambda: setup_models(cfg, device))
    model_max = models.model_max_length(student)
    if teacher is not None:
        model_max = min(model_max, models.model_max_length(teacher))
        if cfg.loss.k >= vocab and "k" in LOSSES[cfg.loss.name].knobs:
            raise TailkdError(f"loss.k={cfg.loss.k} must be smaller than the vocabulary ({vocab}); the paper uses 10")

    # --- data (rank 0 first: the corpus is tokenised into its cache once)
    info, train_rows, held_rows = dist.on_main_then_all(lambda: setup_data(cfg, tokenizer, model_max))

    # --- the loss layer and the teacher signal (online or a teacher cache, checked against this run)
    fused_path = choose_loss_path(cfg, vocab)
    probe = data_mod.collate([train_rows[0]])["input_ids"][:, :16].to(device)
    signal_of, signal_text = setup_teacher_signal(cfg, teacher, student, tokenizer, info, vocab, device, ac,
                                                  fused_path, probe)
    chunk_text = f", {cfg.train.loss_chunk_size} tokens per chunk" if cfg.train.loss_chunk_size else ""
    say(f"loss layer: {'fused (LM heads + loss in chunks' + chunk_text + ')' if fused_path else 'full logits'}; "
        f"teacher signal: {signal_text}")

    # --- every input checked out: only now touch the run folder
    dist.on_main_then_all(lambda: claim_run_dir(out, cfg, resuming, changes), main_only=True)
    if table is not None and not resuming and dist.is_main():
        (out / "student_init.json").write_text(json.dumps(table, indent=1))

    # --- student under DDP/FSDP, optimizer, schedule, sampler; restored on --resume
    model = dist.wrap_student(student, cfg.train.parallel, device)
    optimizer = make_optimizer(model, cfg)
    total = cfg.train.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=cfg.train.warmup_steps, total=total, min_ratio=cfg.train.min_lr_ratio)
    )
    sampler = data_mod.RowSampler(len(train_rows), seed=cfg.train.seed)
    state = {"step": 0, "tokens": 0, "elapsed": 0.0, "initial_heldout": None, "bad_steps": 0, "bad_in_a_row": 0,
             "empty_steps": 0}
    restored = restore(out, model, dist.unwrap(model), optimizer, scheduler, sampler) if resuming else None
    if resuming and restored is None:
        say(f"{out} has no checkpoint yet: starting it from step 0")
    state = restored or state
    # metrics.jsonl (rank 0): on resume, the lines after the checkpoint's step go (all of them without one)
    keep_until = state["step"] if restored else -1
    log = MetricsLog(out / "metrics.jsonl", resume_step=keep_until) if dist.is_main() else None

    def write_metrics(record: dict) -> None:
        if log is not None:
            log.write(record)

    def checkpoint() -> Path:
        return save(out, model, optimizer, scheduler, sampler, state, cfg.train.keep_last)

    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len  # global
    stop_at = min(total, state["step"] + cfg.train.stop_after) if cfg.train.stop_after else total
    signals = cleanup.enter_context(stop_on_signals())  # from here on SIGINT/SIGTERM stop after a step
    eval_seconds = 0.0  # measured on the first held-out evaluation (a resume has none: the ETA leaves them out)
    if state["initial_heldout"] is None:
        t_eval = time.perf_counter()
        state["initial_heldout"] = heldout(model, teacher, held_rows, cfg, vocab, device, ac)
        write_metrics(heldout_record(0, 0, state["initial_heldout"]))
        eval_seconds = time.perf_counter() - t_eval
    first_step = state["step"]

    model.train()
    bar = cleanup.enter_context(tqdm(total=total, initial=state["step"], desc=f"distill[{cfg.loss.name}]",
                                     unit="step", dynamic_ncols=True, disable=not dist.is_main()))
    while state["step"] < stop_at:
        t0 = time.perf_counter()
        # --- forward/backward of this rank's rows
        micro = next_micro_batches(train_rows, sampler, cfg)
        terms, n_valid = forward_backward(model, signal_of, micro, cfg=cfg, vocab=vocab, device=device, ac=ac,
                                          fused_path=fused_path)
        # --- the step's loss terms summed over ranks, and whether any rank got a stop signal
        *values, n_signals = dist.sum_over_ranks([terms[k] for k in TERMS] + [len(signals)], device)
        terms = dict(zip(TERMS, values))
        # --- clip, check, update (a non-finite loss or gradient, or no valid token: no update at all, counted)
        grad_norm = clip_and_norm(model, cfg.train.grad_clip)
        lr = scheduler.get_last_lr()[0]
        finite = math.isfinite(terms["loss"]) and math.isfinite(grad_norm)
        empty = n_valid == 0  # AdamW would still decay the weights and advance its moments: skip the step
        if finite and not empty:
            optimizer.step()
            scheduler.step()
            state["bad_in_a_row"] = 0
        elif empty:
            state["empty_steps"] += 1
        else:
            state["bad_steps"] += 1
            state["bad_in_a_row"] += 1
        optimizer.zero_grad(set_to_none=True)

        # --- bookkeeping and logging (rank 0)
        dt = time.perf_counter() - t0
        state["step"] += 1
        state["tokens"] += tokens_per_step
        state["elapsed"] += dt
        step = state["step"]
        skipped = empty or not finite
        if empty:
            say(f"tailkd: warning: step {step}: no valid token in the whole step (every label is -100); step "
                f"skipped, no update ({state['empty_steps']} such steps in all)", err=True)
        elif not finite:
            say(f"tailkd: warning: step {step}: non-finite loss ({terms['loss']}) or gradient norm ({grad_norm});"
                f" step skipped, no update ({state['bad_in_a_row']} in a row, {state['bad_steps']} in all)", err=True)
        if step % cfg.train.log_every == 0 or step == total or skipped:
            write_metrics({"step": step, "split": "train", "tokens": state["tokens"], "lr": lr,
                           "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                           "elapsed_s": state["elapsed"], **terms, "skipped": skipped,
                           "bad_steps": state["bad_steps"], "empty_steps": state["empty_steps"]})
        bar.set_postfix(loss=f"{terms['loss']:.3f}", clm=f"{terms['clm']:.3f}", div=f"{terms['div']:.3f}",
                        tok_s=f"{tokens_per_step / dt:,.0f}")
        bar.update(1)
        if step == first_step + 2 and step < stop_at:  # the second step of this invocation: past the warm-up costs
            say(expected_duration(dt, stop_at - step, eval_seconds,
                                  evals_between(step, stop_at, cfg.train.eval_every, total)))

        # --- periodic held-out evaluation and checkpoint
        saved = None
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total:
            write_metrics(heldout_record(step, state["tokens"], heldout(model, teacher, held_rows, cfg, vocab, device,
                                                                        ac)))
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step != total:
            saved = checkpoint()

        # --- stop early: too many non-finite steps in a row, or a signal
        if state["bad_in_a_row"] >= cfg.train.max_bad_steps:
            first = step - state["bad_in_a_row"] + 1
            state["bad_in_a_row"] = 0  # a --resume gets max_bad_steps new tries
            path = checkpoint()
            raise TailkdError(
                f"stopped at step {step}: {cfg.train.max_bad_steps} steps in a row ({first}-{step}) had a "
                f"non-finite loss or gradient norm (last: loss {terms['loss']}, grad norm {grad_norm}); none of "
                f"them changed the weights, saved in {path}. Lower --lr, check the teacher and the data, then "
                f"continue with --resume (--force to change the config) or raise --train.max_bad_steps")
        if n_signals > 0 and step < total:
            path = saved or checkpoint()
            bar.close()
            sig = signal.Signals(signals[0]) if signals else signal.SIGTERM
            say(f"tailkd: stopped by {sig.name} after step {step} of {total}; checkpoint {path}; continue with: "
                f"tailkd distill --config {out / 'config.yaml'} --resume", err=True)
            return {"run": str(out), "steps": step, "stopped": True, "signal": sig.name, "exit_code": 128 + sig}
    bar.close()

    if state["step"] < total:
        checkpoint()
        say(f"stopped after step {state['step']} of {total}; continue with: tailkd distill --config "
            f"{out / 'config.yaml'} --resume")
        return {"run": str(out), "steps": state["step"], "stopped": True}

    # --- the end: final held-out metrics, a last checkpoint (holding them: a resume after a failed write of the
    # outputs below goes straight to writing them again), the student as a plain HF folder, summary, curves
    if state.get("final_heldout") is None:
        state["final_heldout"] = heldout(model, teacher, held_rows, cfg, vocab, device, ac)
        write_metrics(heldout_record(state["step"], state["tokens"], state["final_heldout"]))
        checkpoint()
    final_metrics = state["final_heldout"]
    model_state = dist.full_model_state(model)
    final_dir = out / "final"

    def write_final(tmp: Path) -> None:
        dist.unwrap(model).save_pretrained(tmp, state_dict=model_state)
        tokenizer.save_pretrained(tmp)

    curves = out / CURVES_FILE
    summary = {"run": str(out), "final": str(final_dir), "steps": state["step"], "tokens": state["tokens"],
               "train_seconds": state["elapsed"], "loss": cfg.loss.name, "world_size": dist.world(),
               "bad_steps": state["bad_steps"], "empty_steps": state["empty_steps"], "curves": str(curves),
               "loss_layer": "fused" if fused_path else "full logits",
               "teacher_signal": signal_text, "heldout_before": state["initial_heldout"],
               "heldout_after": final_metrics,
               "flops": distill_flops(teacher, dist.unwrap(model), state["tokens"], seq_len=cfg.data.seq_len,
                                      loss=cfg.loss.name, freeze_embeddings=cfg.student.freeze_embeddings)}

    def write_outputs() -> None:
        from tailkd.compare import plot_run

        try:
            ckpt.atomic_write_dir(final_dir, write_final)
            plot_run(out, curves)
            ckpt.atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
        except Exception as exc:
            failure = ckpt.io_failure(exc)
            if failure is None:
                raise
            raise TailkdError(f"could not write the run's outputs in {out} ({failure.strerror or failure}); free disk "
                              f"space and continue with --resume: the last checkpoint (step {state['step']}) is intact "
                              "and only the outputs are written again") from exc

    dist.on_main_then_all(write_outputs, main_only=True)
    before, after = state["initial_heldout"], final_metrics
    if teacher is not None:
        say(f"held-out KL(teacher‖student): {before['kl']:.4f} -> {after['kl']:.4f}  "
            f"(student CLM {before['student_clm']:.3f} -> {after['student_clm']:.3f})")
    else:
        say(f"held-out student CLM: {before['student_clm']:.3f} -> {after['student_clm']:.3f}")
    say(f"curves (held-out KL, training loss): {curves}")
    say(f"student saved to {final_dir}")
    return summary
