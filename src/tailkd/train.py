"""The one training loop: setup -> held-out eval -> steps (-> eval, checkpoint) -> final student.

``distill(cfg)`` is the Python API behind ``tailkd distill``. Reads top to bottom:

1. run folder: refuse to clobber, or resume, or overwrite (only after every input checked out);
2. teacher (eval, no grad), student (built from the teacher or loaded), shared vocabulary;
3. data: tokenised once to a cache, packed rows, held-out rows, a resumable sampler;
4. optimizer (AdamW) + warm-up/cosine schedule; state restored on ``--resume``;
5. steps: micro-batches -> global valid-token count -> objective -> backward -> clip -> step;
6. the final student saved with ``save_pretrained`` + tokenizer in ``run/final``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tailkd import checkpoint as ckpt
from tailkd import data as data_mod
from tailkd import models
from tailkd.config import DistillConfig, from_dict, save_yaml, to_dict
from tailkd.errors import TailkdError
from tailkd.evaluate import forward_logits, heldout_metrics
from tailkd.objective import count_valid_tokens, objective

# Config keys that may differ between a run and its resumption (they do not change the result).
RESUME_FREE_KEYS = {"train.resume", "train.overwrite", "train.max_steps", "train.eval_every", "train.save_every",
                    "train.log_every", "train.keep_last", "train.device", "train.out_dir", "train.stop_after"}


# --------------------------------------------------------------------------- small helpers


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TailkdError("train.device=cuda but no CUDA device is visible; use --device cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise TailkdError(f"train.device={name!r} is not a device; use auto, cpu or cuda")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    """Append-only JSONL; on resume, lines after the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- run folder


def prepare_run_dir(cfg: DistillConfig) -> tuple[Path, bool]:
    """Decide between a new run and a resume. Nothing is deleted here (see ``claim_run_dir``)."""
    out = Path(cfg.train.out_dir)
    exists = out.exists() and any(out.iterdir()) if out.exists() else False
    if out.exists() and not out.is_dir():
        raise TailkdError(f"train.out_dir {out} is a file; choose a folder name with --out")
    if cfg.train.resume:
        if not exists:
            raise TailkdError(f"--resume given but {out} holds no run; drop --resume to start a new run")
        saved = out / "config.yaml"
        if not saved.exists():
            raise TailkdError(f"{out} has no config.yaml, so it is not a tailkd run; choose another --out")
        import yaml

        old = _flat(to_dict(from_dict(DistillConfig, yaml.safe_load(saved.read_text()) or {})))
        new = _flat(to_dict(cfg))
        diff = sorted(k for k in new if k not in RESUME_FREE_KEYS and old.get(k) != new.get(k))
        if diff:
            k = diff[0]
            raise TailkdError(f"cannot resume {out}: {k} was {old.get(k)!r}, now {new.get(k)!r}; resume with the "
                              f"run's own config (--config {saved}) or start a new run with another --out")
        return out, True
    if exists and not cfg.train.overwrite:
        raise TailkdError(f"run folder {out} already exists; pass --resume to continue it, --overwrite to replace it, "
                          "or choose another --out")
    return out, False


def claim_run_dir(out: Path, cfg: DistillConfig, resuming: bool) -> None:
    if not resuming:
        if out.exists() and cfg.train.overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")


# --------------------------------------------------------------------------- setup


def setup_models(cfg: DistillConfig, device: torch.device, out: Path | None):
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
        print(format_table(table))
    vocab = models.check_vocab(t_tok, s_tok, teacher, student)
    student.train()
    if cfg.loss.name == "clm":
        teacher = None
    return teacher, student, t_tok, vocab, table


def setup_data(cfg: DistillConfig, tokenizer, model_max: int):
    data_mod.check_seq_len(cfg.data.seq_len, model_max)
    cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else data_mod.default_cache_root()
    paths = [Path(p) for p in cfg.data.paths] or data_mod.default_corpus_files(cache_root)
    info = data_mod.prepare_corpus_cached(
        paths, tokenizer, cache_root / "corpora", tokenizer_fingerprint=models.tokenizer_fingerprint(tokenizer),
        heldout_fraction=cfg.data.heldout_fraction, doc_sep=cfg.data.doc_sep,
    )
    train_rows = data_mod.PackedRows(info.train_bin, cfg.data.seq_len)
    held_rows = data_mod.PackedRows(info.heldout_bin, cfg.data.seq_len)
    return info, train_rows, held_rows


def _heldout(student, teacher, held_rows, cfg, vocab, device, ac):
    n = min(len(held_rows), cfg.data.eval_rows)
    sub = [held_rows[i] for i in range(n)]
    batches = (data_mod.collate(sub[i:i + cfg.train.batch_size]) for i in range(0, n, cfg.train.batch_size))
    return heldout_metrics(student, teacher, batches, vocab, device=device, autocast_dtype=ac)


# --------------------------------------------------------------------------- the loop


def distill(cfg: DistillConfig) -> dict:
    """Run a distillation described by ``cfg``; returns a summary dict (also saved as summary.json)."""
    cfg.validate()
    out, resuming = prepare_run_dir(cfg)
    device = resolve_device(cfg.train.device)
    ac = autocast_dtype(cfg.train.precision, device)
    seed_everything(cfg.train.seed)

    teacher, student, tokenizer, vocab, table = setup_models(cfg, device, out)
    model_max = models.model_max_length(student)
    if teacher is not None:
        model_max = min(model_max, models.model_max_length(teacher))
        if cfg.loss.k >= vocab and cfg.loss.name == "tad":
            raise TailkdError(f"loss.k={cfg.loss.k} must be smaller than the vocabulary ({vocab}); the paper uses 10")
    info, train_rows, held_rows = setup_data(cfg, tokenizer, model_max)

    # Every input checked out: only now touch the run folder.
    claim_run_dir(out, cfg, resuming)
    if table is not None and not resuming:
        (out / "student_init.json").write_text(json.dumps(table, indent=1))

    optimizer = make_optimizer(student, cfg)
    total = cfg.train.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=cfg.train.warmup_steps, total=total, min_ratio=cfg.train.min_lr_ratio)
    )
    sampler = data_mod.RowSampler(len(train_rows), seed=cfg.train.seed)
    state = {"step": 0, "tokens": 0, "elapsed": 0.0, "initial_heldout": None}

    if resuming:
        path = ckpt.latest_good_checkpoint(out)
        if path is None:
            raise TailkdError(f"{out} has no usable checkpoint to resume from; start again with --overwrite")
        saved = ckpt.load_checkpoint(path, student)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        sampler.load_state_dict(saved["sampler"])
        set_rng_state(saved["rng"])
        state = saved["state"]
        print(f"resuming {out} from {path.name} (step {state['step']})")
    log = MetricsLog(out / "metrics.jsonl", resume_step=state["step"] if resuming else None)

    if state["initial_heldout"] is None:
        state["initial_heldout"] = _heldout(student, teacher, held_rows, cfg, vocab, device, ac)
        log.write({"step": 0, "split": "heldout", "tokens": 0, **state["initial_heldout"]})

    def save(step: int) -> None:
        trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "sampler": sampler.state_dict(), "rng": rng_state(), "state": dict(state)}
        ckpt.save_checkpoint(out, step, student, trainer_state, cfg.train.keep_last)

    batches = data_mod.batches(train_rows, sampler, cfg.train.batch_size)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    bar = tqdm(total=total, initial=state["step"], desc=f"distill[{cfg.loss.name}]", unit="step", dynamic_ncols=True)
    want_hidden = cfg.loss.cosine_weight > 0
    student.train()
    stop_at = min(total, state["step"] + cfg.train.stop_after) if cfg.train.stop_after else total
    while state["step"] < stop_at:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.train.grad_accum)]
        # One denominator for the whole optimizer step: every micro-batch's valid tokens.
        n_valid = sum(count_valid_tokens(mb["labels"]) for mb in micro)
        terms_sum = {"loss": 0.0, "clm": 0.0, "div": 0.0, "cos": 0.0}
        for mb in micro:
            input_ids = mb["input_ids"].to(device)
            labels = mb["labels"].to(device)
            t_logits = t_hidden = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits, t_hidden = forward_logits(teacher, input_ids, vocab, autocast_dtype=ac,
                                                        output_hidden_states=want_hidden)
            s_logits, s_hidden = forward_logits(student, input_ids, vocab, autocast_dtype=ac,
                                                output_hidden_states=want_hidden)
            terms = objective(s_logits, labels, n_valid, cfg=cfg.loss, teacher_logits=t_logits,
                              segment_ids=mb["segment_ids"].to(device), student_hidden=s_hidden,
                              teacher_hidden=t_hidden)
            terms.loss.backward()
            for key in terms_sum:
                terms_sum[key] += float(getattr(terms, key).detach())
        grad_norm = None
        if cfg.train.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.grad_clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        dt = time.perf_counter() - t0
        state["step"] += 1
        state["tokens"] += tokens_per_step
        state["elapsed"] += dt
        step = state["step"]
        if step % cfg.train.log_every == 0 or step == total:
            log.write({"step": step, "split": "train", "tokens": state["tokens"], "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tokens_per_step / dt, "elapsed_s": state["elapsed"], **terms_sum})
        bar.set_postfix(loss=f"{terms_sum['loss']:.3f}", clm=f"{terms_sum['clm']:.3f}", div=f"{terms_sum['div']:.3f}",
                        tok_s=f"{tokens_per_step / dt:,.0f}")
        bar.update(1)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total:
            log.write({"step": step, "split": "heldout", "tokens": state["tokens"],
                       **_heldout(student, teacher, held_rows, cfg, vocab, device, ac)})
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step != total:
            save(step)
    bar.close()
    if state["step"] < total:
        save(state["step"])
        print(f"stopped after step {state['step']} of {total}; continue with: tailkd distill --config "
              f"{out / 'config.yaml'} --resume")
        return {"run": str(out), "steps": state["step"], "stopped": True}

    final_metrics = _heldout(student, teacher, held_rows, cfg, vocab, device, ac)
    log.write({"step": state["step"], "split": "heldout", "tokens": state["tokens"], **final_metrics})
    save(state["step"])
    final_dir = out / "final"

    def write_final(tmp: Path) -> None:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    ckpt.atomic_write_dir(final_dir, write_final)
    summary = {"run": str(out), "final": str(final_dir), "steps": state["step"], "tokens": state["tokens"],
               "train_seconds": state["elapsed"], "loss": cfg.loss.name,
               "heldout_before": state["initial_heldout"], "heldout_after": final_metrics}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    before, after = state["initial_heldout"], final_metrics
    if teacher is not None:
        print(f"held-out KL(teacher‖student): {before['kl']:.4f} -> {after['kl']:.4f}  "
              f"(student CLM {before['student_clm']:.3f} -> {after['student_clm']:.3f})")
    else:
        print(f"held-out student CLM: {before['student_clm']:.3f} -> {after['student_clm']:.3f}")
    print(f"student saved to {final_dir}")
    return summary
