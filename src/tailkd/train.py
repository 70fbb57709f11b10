"""The one training loop: setup -> held-out eval -> steps (-> eval, checkpoint) -> final student.

``distill(cfg)`` is the Python API behind ``tailkd distill``; `_distill` reads top to bottom:

1. setup (`setup_run`, its pieces in `tailkd.prepare`): processes (one, or several launched by torchrun /
   accelerate launch); the run folder decided (new, resume, or refused: `tailkd.runs`); teacher (eval, no grad,
   replicated on every rank or sharded) and student (built from the teacher or loaded); data (tokenised once to a
   cache, packed rows, held-out rows, ONE resumable sampler shared by all ranks); the loss layer (full logits or the
   chunked `tailkd.fused`) and the teacher signal (online or a teacher cache, `tailkd.teacher`); only then the run
   folder is written; AdamW + warm-up / cosine schedule; the state restored on ``--resume``;
2. steps (`train_step`): micro-batches (with ``train.on_policy``, some of them student-generated:
   `tailkd.onpolicy`) -> global valid-token count -> teacher signal -> the step's loss
   (`tailkd.objective.step_terms`) -> backward -> clip -> check -> AdamW step; then logging, the periodic held-out
   evaluation (`tailkd.evaluate.heldout_sums`) and checkpoint, and the stop checks;
3. the end (`finish`): final held-out metrics, a last checkpoint, the student saved with ``save_pretrained`` +
   tokenizer in ``run/final``, ``summary.json`` and ``curves.png``.

Global-batch semantics: ``train.batch_size`` rows per micro-batch IN TOTAL, split over the processes
(rank r takes rows r, r+W, r+2W, ... of every micro-batch drawn from the shared sampler), and
``train.grad_accum`` micro-batches per optimizer step. The same config therefore trains on the same rows
with the same gradient on 1 or W processes, and a run can resume on a different number of processes.

Faults: a step whose loss or gradient norm is not finite, or without a valid token, is skipped (no optimizer or
scheduler update) and counted; ``train.max_bad_steps`` non-finite steps in a row stop the run with a checkpoint.
SIGINT/SIGTERM finish the current step, write a checkpoint and return exit code 130/143 (`stop_on_signals`).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tailkd import checkpoint as ckpt
from tailkd import data as data_mod
from tailkd import distributed as dist
from tailkd import jsonfile, models, runs, sharded_teacher
from tailkd.config import DistillConfig
from tailkd.documents import DOCUMENTS_APART, restarts_positions
from tailkd.dropout import disable_dropout, saved_dropouts
from tailkd.errors import TailkdError
from tailkd.evaluate import finalize, heldout_sums
from tailkd.flops import distill_flops
from tailkd.objective import check_router_aux, count_valid_tokens, router_weight, step_terms
from tailkd.onpolicy import OnPolicy, on_policy_from_config
from tailkd.prepare import (
    attention_text,
    calibrate_sharded_teacher,
    check_batch_split,
    check_before_models,
    checkpoint_activations,
    choose_loss_path,
    compile_models,
    heldout_share_warning,
    loss_layer_text,
    make_optimizer,
    rank_batches,
    run_loss_chunk,
    set_steps_from_epochs,
    setup_data,
    setup_models,
    setup_teacher_signal,
    shared_vocab_summary,
    use_optimizer_settings,
)
from tailkd.registry import LOSSES
from tailkd.vocab import check_labels

TERMS = ("loss", "clm", "div", "cos", "aux")
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"  # train.report_to tensorboard: the event files, in the run folder


# --------------------------------------------------------------------------- small helpers


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 (step s < warmup: (s+1) / warmup, no step at lr 0), then cosine decay to ``min_ratio``
    at ``total``: transformers' ``cosine_with_min_lr`` schedule after the warm-up (tests/test_optimizer.py)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
                     fused_path: bool, chunk: int | None = None) -> tuple[dict, int]:
    """Forward + backward of this rank's micro-batches; gradients accumulate in ``.grad`` and are reduced over
    ranks by DDP/FSDP on the last micro-batch only.

    ``signal_of(batch, host_batch=)``: the teacher signal of a micro-batch (online teacher or teacher cache; None
    for clm).
    ``fused_path``: the loss from the final hidden states in chunks (`tailkd.fused`), else from full logits;
    ``chunk``: tokens per chunk (None: ``train.loss_chunk_size``, else `tailkd.fused`'s rule per micro-batch).

    No host-device synchronisation per micro-batch: batches go to the device without blocking (pinned memory), the
    fused layer plans its chunks from the host's labels, and the loss terms stay on the device until the one read
    of the step (the log and the finite check need it).

    Denominator: the GLOBAL number of valid tokens of the step (every micro-batch, every rank), summed with one
    all_reduce BEFORE the first backward. Each rank's loss is multiplied by the world size to undo DDP's
    gradient average, so the gradient equals that of one process running the whole global batch. Returns this
    rank's part of the loss terms (the parts add up over ranks to the step's loss) and the global valid-token
    count. A step without a single valid token (every label -100 on every rank) runs no forward at all."""
    (n_valid,) = dist.sum_over_ranks([sum(count_valid_tokens(mb["labels"]) for mb in micro)], device)
    n_valid = int(n_valid)
    scale = dist.loss_scale()
    chunk = chunk or cfg.train.loss_chunk_size or None
    sums = []  # per micro-batch: the terms as one detached device tensor
    for i, mb in enumerate(micro if n_valid else []):
        batch = {key: data_mod.to_device(value, device) for key, value in mb.items()}  # input_ids, labels, ... (b, T)
        with dist.grad_sync(model, sync=i == len(micro) - 1):
            signal = signal_of(batch, host_batch=mb) if signal_of is not None else None
            terms = step_terms(model, batch, signal, n_valid, cfg.loss, vocab_size=vocab, fused_path=fused_path,
                               chunk_size=chunk, autocast_dtype=ac, kernels=cfg.train.loss_kernels == "auto",
                               host_batch=mb, loss_scale=scale)
            (terms.loss * scale).backward()  # scale 1.0 in one process: exact, changes nothing
        sums.append(torch.stack([getattr(terms, key).detach().double() for key in TERMS]))
    values = torch.stack(sums).sum(0).tolist() if sums else [0.0] * len(TERMS)  # the step's one read
    return dict(zip(TERMS, values)), n_valid


def clip_and_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Total gradient norm before clipping (clips to ``max_norm`` when > 0). The same on every rank."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    return float(norm)


# --------------------------------------------------------------------------- held-out evaluation


def heldout(model, teacher, held_rows, cfg: DistillConfig, vocab: int, device, ac) -> dict:
    """Held-out metrics of the first ``data.eval_rows`` rows (`tailkd.evaluate.heldout_sums`): rank r scores rows
    r::world in the same number of forwards on every rank (`prepare.rank_batches`: at most ~1 GiB of float32 logits
    per model and forward, or one row), the sums are added over ranks, then divided once, so 1 and W processes give
    the same metrics."""
    n = min(len(held_rows), cfg.data.eval_rows)
    batches = rank_batches(held_rows, n, cfg.train.batch_size, cfg.data.seq_len, vocab)
    sums = heldout_sums(dist.unwrap(model), teacher, batches, vocab, device=device, autocast_dtype=ac)
    return finalize(dist.gather_sums(sums))


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What a distillation sets up once (`setup_run`) and every step uses."""

    cfg: DistillConfig
    out: Path
    device: torch.device
    ac: torch.dtype | None  # autocast dtype (bf16) or None (fp32)
    model: torch.nn.Module  # the student, under DDP / FSDP in a multi-process run
    teacher: torch.nn.Module | None
    tokenizer: object
    vocab: int
    train_rows: object
    held_rows: object
    signal_of: object  # (batch, host_batch=) -> tailkd.teacher.TeacherSignal (None for clm)
    signal_text: str
    fused_path: bool
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: data_mod.RowSampler
    progress: runs.Progress
    log: runs.MetricsLog | None  # rank 0 only
    on_policy: OnPolicy | None = None  # train.on_policy > 0: student-generated micro-batches
    loss_chunk: int | None = None  # fused layer: tokens per chunk, fixed for the run (None: the CPU's rule per call)
    shared_vocab: dict | None = None  # a teacher vocabulary extending the student's: `prepare.shared_vocab_summary`
    dropouts: list = field(default_factory=list)  # train.disable_dropout's zeroed config values (`saved_dropouts`)
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # this invocation's wall time by phase

    def write_metrics(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(record)

    def checkpoint(self) -> Path:
        t0 = time.perf_counter()
        path = runs.save(self.out, self.model, self.optimizer, self.scheduler, self.sampler, self.progress,
                         self.cfg.train.keep_last)
        self.seconds["checkpoints"] += time.perf_counter() - t0
        return path

    def heldout(self) -> dict:
        t0 = time.perf_counter()
        result = heldout(self.model, self.teacher, self.held_rows, self.cfg, self.vocab, self.device, self.ac)
        self.seconds["heldout"] += time.perf_counter() - t0
        return result


PHASES = ("setup", "steps", "heldout", "checkpoints", "outputs")  # `Run.seconds`, summary.json's phase_seconds


def phase_text(seconds: dict) -> str:
    """The run log's line of where this invocation's wall time went (`Run.seconds`)."""
    names = {"setup": "setup (models, data, teacher signal)", "steps": "training steps",
             "heldout": "held-out evaluations", "checkpoints": "checkpoints", "outputs": "final outputs"}
    return "wall time: " + ", ".join(f"{names[k]} {seconds[k]:.1f} s" for k in PHASES)


def setup_run(cfg: DistillConfig, device: torch.device) -> Run:
    """Models, data, loss layer and teacher signal (every input checked before the run folder is touched), then
    the run folder, the student under DDP/FSDP, AdamW and its schedule, the sampler; restored on ``--resume``."""
    ac = dist.autocast_dtype(cfg.train.precision, device)
    check_batch_split(cfg.train.batch_size)
    out, resuming, changes = dist.on_main_then_all(lambda: runs.prepare_run_dir(cfg))
    check_before_models(cfg)  # what needs no model (a teacher cache, a loaded student's tokenizer): before any loads
    if cfg.train.report_to == "tensorboard":
        runs.tensorboard_writer()  # the package, before any model loads
    seed_everything(cfg.train.seed)
    # rank 0 first: a GGUF teacher is converted into a cache once, a corpus tokenised into its cache once
    sharded = measured = None
    if cfg.teacher.parallel == "fsdp" and cfg.student.calibrated():  # collective: the student's calibration first
        sharded, measured = calibrate_sharded_teacher(cfg, device)
    teacher, student, tokenizer, vocab, teacher_vocab, table = dist.on_main_then_all(
        lambda: setup_models(cfg, device, measured))
    if teacher is not None and cfg.teacher.parallel == "fsdp":  # collective: every rank loads its shards at once
        teacher = sharded if sharded is not None else sharded_teacher.load_sharded_teacher(
            cfg.teacher.path, device=device, dtype=cfg.teacher.dtype, log=dist.say)
    elif teacher is not None:
        dist.say(f"teacher: {sharded_teacher.placement(teacher)} on each of the {dist.world()} rank(s)")
    model_max = models.model_max_length(student, *([] if teacher is None else [teacher]))
    if teacher is not None:
        if cfg.loss.k >= vocab and "k" in LOSSES[cfg.loss.name].knobs:
            raise TailkdError(f"loss.k={cfg.loss.k} must be smaller than the vocabulary ({vocab}); the paper uses 10")
    info, train_rows, held_rows = dist.on_main_then_all(lambda: setup_data(cfg, tokenizer, model_max,
                                                                           prompt_only=cfg.train.on_policy >= 1))
    if cfg.data.task == "pretrain" and (warning := heldout_share_warning(cfg.data, info.meta)):
        dist.say(warning, err=True)
    check_labels(vocab, tokenizer, {"training": train_rows, "held-out": held_rows})
    if cfg.train.epochs:
        set_steps_from_epochs(cfg, len(train_rows))
    fused_path = choose_loss_path(cfg, vocab)
    probe = data_mod.collate([train_rows[0]])["input_ids"][:, :16].to(device)
    shared_vocab = shared_vocab_summary(cfg, teacher, held_rows, train_rows, vocab, teacher_vocab, device, ac) \
        if teacher is not None and teacher_vocab > vocab else None
    signal_of, signal_text = setup_teacher_signal(cfg, teacher, student, tokenizer, info, vocab, device, ac,
                                                  fused_path, probe, train_rows)
    loss_chunk = run_loss_chunk(cfg, vocab, student, device) if fused_path else None
    sparse = signal_of is not None and signal_of.sparse
    dist.say(f"loss layer: {loss_layer_text(cfg, fused_path, vocab, device, loss_chunk, sparse)}; teacher signal: "
             f"{signal_text}")
    check_router_aux(student, probe, fused_path)
    if cfg.train.activation_checkpointing:
        dist.say(checkpoint_activations(student, cfg.train.activation_checkpointing))
    dropouts = disable_dropout(student, log=dist.say) if cfg.train.disable_dropout else []  # restored when saved
    if coef := router_weight(student):  # a mixture-of-experts student whose config asks for it, as in its own loss
        dist.say(f"router load-balancing loss: {coef:g} x the student's aux_loss per token "
                 "(its config's output_router_logits, router_aux_loss_coef; the metrics' aux term)")

    # every input checked out: only now touch the run folder
    dist.on_main_then_all(lambda: runs.claim_run_dir(out, cfg, resuming, student_init=table, changes=changes),
                          main_only=True)
    compiled = "; compiled (torch.compile)" if cfg.train.compile else ""
    apart = f"; {DOCUMENTS_APART}" if restarts_positions(cfg.data) else ""
    dist.say(f"attention: {attention_text(student, teacher)}{compiled}{apart}")
    if cfg.train.compile:
        compile_models(student, teacher)
    model = dist.wrap_student(student, cfg.train.parallel, device)
    optimizer = make_optimizer(model, cfg)
    t = cfg.train
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=t.warmup_steps, total=t.max_steps, min_ratio=t.min_lr_ratio))
    sampler = data_mod.RowSampler(len(train_rows), seed=t.seed, digest=getattr(train_rows, "digest", None),
                                  force=t.force_resume)
    restored = runs.restore(out, model, student, optimizer, scheduler, sampler) if resuming else None
    dist.on_main_then_all(lambda: runs.replace_config(out, cfg, changes), main_only=True)  # the checkpoint fits
    if restored is not None:
        use_optimizer_settings(optimizer, scheduler, t)
        if restored.step > t.max_steps:
            dist.say(f"tailkd: warning: the checkpoint is at step {restored.step}, past train.max_steps="
                     f"{t.max_steps}: nothing more is trained; the run ends at step {restored.step}", err=True)
    if sampler.rows_changed:
        dist.say("tailkd: warning: --force: the training rows differ from the checkpoint's (the data changed); the "
                 "saved order continues over the new rows", err=True)
    if resuming and restored is None:
        dist.say(f"{out} has no checkpoint yet: starting it from step 0")
    progress = restored or runs.Progress()
    on_policy = on_policy_from_config(cfg, tokenizer, train_rows, ac, vocab)
    # metrics.jsonl (rank 0): on resume, the lines after the checkpoint's step go (all of them without one)
    board = out / TENSORBOARD_DIR if cfg.train.report_to == "tensorboard" else None
    log = runs.MetricsLog(out / "metrics.jsonl", resume_step=progress.step if restored else -1, tensorboard=board) \
        if dist.is_main() else None
    return Run(cfg, out, device, ac, model, teacher, tokenizer, vocab, train_rows, held_rows, signal_of,
               signal_text, fused_path, optimizer, scheduler, sampler, progress, log, on_policy, loss_chunk,
               shared_vocab, dropouts)


# --------------------------------------------------------------------------- one step


@dataclass
class StepReport:
    """What one optimizer step did: its loss terms (summed over ranks), gradient norm, learning rate, seconds."""

    terms: dict
    grad_norm: float
    lr: float
    seconds: float
    empty: bool  # no valid token in the whole step
    finite: bool
    signals: int  # stop signals received by any rank
    generated: int = 0  # tokens the student generated (on-policy micro-batches, all ranks)
    generation_seconds: float = 0.0  # of ``seconds``, spent generating (this rank)

    @property
    def skipped(self) -> bool:
        return self.empty or not self.finite


def train_step(run: Run, signals: list[int]) -> StepReport:
    """One optimizer step: this rank's micro-batches, forward/backward, clip, check, update (a step with a
    non-finite loss or gradient, or without a valid token, updates nothing and is counted)."""
    t0 = time.perf_counter()
    p = run.progress
    micro = next_micro_batches(run.train_rows, run.sampler, run.cfg)
    generated, t_gen = 0, 0.0
    if run.on_policy is not None:  # some micro-batches' responses sampled from the student (before the count)
        t_gen = time.perf_counter()
        micro, n_batches, generated = run.on_policy.apply(dist.unwrap(run.model), micro, step=p.step,
                                                          rank=dist.rank())
        p.on_policy_batches += n_batches
        t_gen = time.perf_counter() - t_gen
    terms, n_valid = forward_backward(run.model, run.signal_of, micro, cfg=run.cfg, vocab=run.vocab,
                                      device=run.device, ac=run.ac, fused_path=run.fused_path, chunk=run.loss_chunk)
    *values, n_signals, generated = dist.sum_over_ranks([terms[k] for k in TERMS] + [len(signals), generated],
                                                        run.device)
    terms = dict(zip(TERMS, values))
    grad_norm = clip_and_norm(run.model, run.cfg.train.grad_clip)
    lr = run.scheduler.get_last_lr()[0]
    finite = math.isfinite(terms["loss"]) and math.isfinite(grad_norm)
    empty = n_valid == 0  # AdamW would still decay the weights and advance its moments: skip the step
    if finite and not empty:
        run.optimizer.step()
        run.scheduler.step()
        p.bad_in_a_row = 0
    elif empty:
        p.empty_steps += 1
    else:
        p.bad_steps += 1
        p.bad_in_a_row += 1
    run.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    p.step += 1
    p.tokens += run.cfg.train.batch_size * run.cfg.train.grad_accum * run.cfg.data.seq_len  # global
    p.elapsed += dt
    p.generated_tokens += int(generated)
    p.generation_seconds += t_gen
    return StepReport(terms, grad_norm, lr, dt, empty, finite, int(n_signals), int(generated), t_gen)


def log_step(run: Run, report: StepReport, bar) -> None:
    """The step's warnings, its metrics.jsonl line (every ``log_every`` steps and every skipped one), the bar."""
    p, total = run.progress, run.cfg.train.max_steps
    terms, tok_s = report.terms, run.cfg.train.batch_size * run.cfg.train.grad_accum * run.cfg.data.seq_len / \
        report.seconds
    if report.empty:
        dist.say(f"tailkd: warning: step {p.step}: no valid token in the whole step (every label is -100); step "
                 f"skipped, no update ({p.empty_steps} such steps in all)", err=True)
    elif not report.finite:
        dist.say(f"tailkd: warning: step {p.step}: non-finite loss ({terms['loss']}) or gradient norm "
                 f"({report.grad_norm}); step skipped, no update ({p.bad_in_a_row} in a row, {p.bad_steps} in all)",
                 err=True)
    if p.step % run.cfg.train.log_every == 0 or p.step == total or report.skipped:
        run.write_metrics({"step": p.step, "split": "train", "tokens": p.tokens, "lr": report.lr,
                           "grad_norm": report.grad_norm, "tokens_per_s": tok_s, "elapsed_s": p.elapsed, **terms,
                           "skipped": report.skipped, "bad_steps": p.bad_steps, "empty_steps": p.empty_steps,
                           **on_policy_record(run, report)})
    gen = {"gen_tok_s": f"{report.generated / report.generation_seconds:,.0f}"} \
        if run.on_policy is not None and report.generation_seconds > 0 and report.generated else {}
    bar.set_postfix(loss=f"{terms['loss']:.3f}", clm=f"{terms['clm']:.3f}", div=f"{terms['div']:.3f}",
                    tok_s=f"{tok_s:,.0f}", **gen)
    bar.update(1)


def on_policy_record(run: Run, report: StepReport) -> dict:
    """The on-policy fields of a metrics line: tokens generated in the step (all ranks) and their rate, the
    run's totals. Empty for a run without ``train.on_policy``."""
    if run.on_policy is None:
        return {}
    p, seconds = run.progress, report.generation_seconds
    return {"generated_tokens": report.generated, "gen_tokens_per_s": report.generated / seconds if seconds else 0.0,
            "on_policy_batches": p.on_policy_batches, "generated_tokens_total": p.generated_tokens}


def stop_for_bad_steps(run: Run, report: StepReport) -> None:
    """After ``train.max_bad_steps`` non-finite steps in a row: a checkpoint, then a one-line error."""
    p, limit = run.progress, run.cfg.train.max_bad_steps
    if p.bad_in_a_row < limit:
        return
    first = p.step - p.bad_in_a_row + 1
    p.bad_in_a_row = 0  # a --resume gets max_bad_steps new tries
    path = run.checkpoint()
    raise TailkdError(
        f"stopped at step {p.step}: {limit} steps in a row ({first}-{p.step}) had a non-finite loss or gradient "
        f"norm (last: loss {report.terms['loss']}, grad norm {report.grad_norm}); none of them changed the weights, "
        f"saved in {path}. Lower --lr, check the teacher and the data, then continue with --resume (--force to "
        f"change the config) or raise --train.max_bad_steps")


# --------------------------------------------------------------------------- the loop


def distill(cfg: DistillConfig) -> dict:
    """Run a distillation described by ``cfg``; returns a summary dict (also saved as summary.json).

    In several processes (torchrun / accelerate launch) every rank calls this; rank 0 writes the files. The
    summary's ``exit_code`` is non-zero (130 / 143) when a signal stopped the run early."""
    cfg.validate()
    device = dist.setup(cfg.train.device, process_group=cfg.teacher.parallel == "fsdp",  # FSDP2 needs a group
                        timeout_s=cfg.train.ddp_timeout)
    try:
        with runs.deterministic_mode(cfg.train.deterministic), contextlib.ExitStack() as cleanup:
            return _distill(cfg, device, cleanup)
    finally:
        dist.shutdown()


def _distill(cfg: DistillConfig, device: torch.device, cleanup: contextlib.ExitStack) -> dict:
    """Setup, the steps, the end; ``cleanup`` undoes the signal handlers and closes the progress bar."""
    t0 = time.perf_counter()
    run = setup_run(cfg, device)
    if run.log is not None:
        cleanup.callback(run.log.close)  # TensorBoard's writer thread
    run.seconds["setup"] = time.perf_counter() - t0
    p, t = run.progress, cfg.train
    stop_at = min(t.max_steps, p.step + t.stop_after) if t.stop_after else t.max_steps
    signals = cleanup.enter_context(runs.stop_on_signals())  # from here on SIGINT/SIGTERM stop after a step
    if p.initial_heldout is None:
        p.initial_heldout = run.heldout()
        run.write_metrics(runs.heldout_record(0, 0, p.initial_heldout))
    eval_seconds = run.seconds["heldout"]  # the first held-out evaluation (a resume has none: the ETA leaves it out)
    first_step = p.step
    run.model.train()
    bar = cleanup.enter_context(runs.progress_bar(total=t.max_steps, initial=p.step, desc=f"distill[{cfg.loss.name}]",
                                                  unit="step", dynamic_ncols=True, disable=not dist.is_main()))
    while p.step < stop_at:
        p.final_heldout = None  # a finished run resumed with more steps: its final metrics were of an earlier step
        report = train_step(run, signals)
        run.seconds["steps"] += report.seconds
        log_step(run, report, bar)
        if p.step == first_step + 2 and p.step < stop_at:  # the second step of this invocation: past warm-up costs
            dist.say(runs.expected_duration(report.seconds, stop_at - p.step, eval_seconds,
                                            runs.evals_between(p.step, stop_at, t.eval_every, t.max_steps)))
        saved = None
        if t.eval_every and p.step % t.eval_every == 0 and p.step != t.max_steps:
            run.write_metrics(runs.heldout_record(p.step, p.tokens, run.heldout()))
        if t.save_every and p.step % t.save_every == 0 and p.step != t.max_steps:
            saved = run.checkpoint()
        stop_for_bad_steps(run, report)
        if report.signals > 0 and p.step < t.max_steps:
            path = saved or run.checkpoint()
            bar.close()
            sig = signal.Signals(signals[0]) if signals else signal.SIGTERM
            dist.say(f"tailkd: stopped by {sig.name} after step {p.step} of {t.max_steps}; checkpoint {path}; "
                     f"continue with: tailkd distill --config {run.out / 'config.yaml'} --resume", err=True)
            return {"run": str(run.out), "steps": p.step, "stopped": True, "signal": sig.name,
                    "exit_code": 128 + sig}
    bar.close()
    if p.step < t.max_steps:  # --train.stop_after
        run.checkpoint()
        dist.say(f"stopped after step {p.step} of {t.max_steps}; continue with: tailkd distill --config "
                 f"{run.out / 'config.yaml'} --resume")
        return {"run": str(run.out), "steps": p.step, "stopped": True}
    return finish(run)


def finish(run: Run) -> dict:
    """Final held-out metrics and a last checkpoint (holding them: a resume after a failed write of the outputs
    below goes straight to writing them again), then the student as a plain HF folder, summary.json, curves.png."""
    p, cfg, out = run.progress, run.cfg, run.out
    if p.final_heldout is None:
        p.final_heldout = run.heldout()
        run.write_metrics(runs.heldout_record(p.step, p.tokens, p.final_heldout))
        run.checkpoint()
    t_outputs = time.perf_counter()
    model_state = dist.full_model_state(run.model)
    peaks = dist.peak_memory_per_rank(run.device)  # collective
    final_dir, curves = out / ckpt.FINAL_DIR, out / CURVES_FILE
    summary = {"run": str(out), "final": str(final_dir), "steps": p.step, "tokens": p.tokens,
               "train_seconds": p.elapsed, "loss": cfg.loss.name, "world_size": dist.world(),
               "bad_steps": p.bad_steps, "empty_steps": p.empty_steps, "curves": str(curves),
               "loss_layer": "fused" if run.fused_path else "full logits", "teacher_signal": run.signal_text,
               "teacher_placement": sharded_teacher.placement(run.teacher) if run.teacher is not None else None,
               "peak_memory_per_rank_bytes": peaks, "peak_memory_kind": dist.memory_kind(run.device),
               "heldout_before": p.initial_heldout, "heldout_after": p.final_heldout,
               "flops": distill_flops(run.teacher, dist.unwrap(run.model), p.tokens, seq_len=cfg.data.seq_len,
                                      loss=cfg.loss.name, freeze_embeddings=cfg.student.freeze_embeddings)}
    if run.shared_vocab is not None:
        summary["shared_vocab"] = run.shared_vocab
    if run.on_policy is not None:
        summary["on_policy"] = {"rate": cfg.train.on_policy, "batches": p.on_policy_batches,
                                "generated_tokens": p.generated_tokens, "generation_seconds": p.generation_seconds}

    def write_final(tmp: Path) -> None:
        with saved_dropouts(run.dropouts):  # the config as built or loaded
            dist.unwrap(run.model).save_pretrained(tmp, state_dict=model_state)
        run.tokenizer.save_pretrained(tmp)

    def write_outputs() -> None:
        from tailkd.compare import plot_run

        try:
            ckpt.atomic_write_dir(final_dir, write_final)
            plot_run(out, curves)
            run.seconds["outputs"] = time.perf_counter() - t_outputs  # (summary.json's own write: not counted)
            summary["phase_seconds"] = dict(run.seconds)
            ckpt.atomic_write_text(out / "summary.json", jsonfile.dumps(summary, indent=1))
        except Exception as exc:
            failure = ckpt.io_failure(exc)
            if failure is None:
                raise
            raise TailkdError(f"could not write the run's outputs in {out} ({failure.strerror or failure}); free disk "
                              f"space and continue with --resume: the last checkpoint (step {p.step}) is intact "
                              "and only the outputs are written again") from exc

    dist.on_main_then_all(write_outputs, main_only=True)
    before, after = p.initial_heldout, p.final_heldout
    if run.teacher is not None:
        dist.say(f"held-out KL(teacher‖student): {before['kl']:.4f} -> {after['kl']:.4f}  "
                 f"(student CLM {before['student_clm']:.3f} -> {after['student_clm']:.3f})")
    else:
        dist.say(f"held-out student CLM: {before['student_clm']:.3f} -> {after['student_clm']:.3f}")
    dist.say(f"teacher: {summary['teacher_placement'] or 'none'}; peak memory per rank "
             f"({summary['peak_memory_kind']}): {', '.join(f'{b / 2**30:.2f} GiB' for b in peaks)}")
    dist.say(f"curves (held-out {'KL' if run.teacher is not None else 'CLM'}, training loss): {curves}")
    dist.say(phase_text(run.seconds))
    dist.say(f"student saved to {final_dir}")
    return summary
