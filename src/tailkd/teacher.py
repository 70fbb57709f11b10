"""The teacher signal of a training step: an online teacher forward, or a teacher cache reader.

A `TeacherSignal` is one of
- ``logits`` [B, T, V]: the online teacher's full logits (dense path, small vocabularies / short rows);
- ``hidden`` [B, T, d_T] + ``head``: the teacher's final hidden states and LM head (online teacher on the fused
  path, or a cache written with ``--hidden-states``): exact teacher logits, computed chunk by chunk when fused;
- ``sparse``: a `fused.SparseTeacher` from a top-K cache (D_KL1, plus a sampled tail estimate when cached).

`step_terms` turns a student, a batch and a signal into the objective's `ObjectiveTerms`, on the dense path
(`tailkd.objective.objective`) or the fused one (`tailkd.fused.fused_objective`), with the same denominator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tailkd import fused
from tailkd.errors import TailkdError

__all__ = ["TeacherSignal", "OnlineTeacher", "CachedTeacher", "step_terms"]


@dataclass
class TeacherSignal:
    logits: torch.Tensor | None = None  # (B, T, V)
    hidden: torch.Tensor | None = None  # (B, T, d_T)
    head: fused.Head | None = None
    sparse: fused.SparseTeacher | None = None


class OnlineTeacher:
    """Runs the (frozen) teacher on each batch: full logits (dense) or final hidden states + head (fused)."""

    def __init__(self, model, vocab_size: int, *, fused_path: bool, autocast_dtype=None, want_hidden: bool = False):
        self.model, self.vocab, self.fused = model, vocab_size, fused_path
        self.autocast_dtype, self.want_hidden = autocast_dtype, want_hidden
        self.head = fused.model_head(model, vocab_size) if fused_path else None

    @torch.no_grad()
    def __call__(self, batch: dict) -> TeacherSignal:
        input_ids = batch["input_ids"]
        dev = input_ids.device
        with torch.autocast(dev.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if self.fused:
                return TeacherSignal(hidden=fused.final_hidden(self.model, input_ids), head=self.head)
            out = self.model(input_ids=input_ids, output_hidden_states=self.want_hidden, use_cache=False)
        return TeacherSignal(logits=out.logits[..., : self.vocab],
                             hidden=out.hidden_states[-1] if self.want_hidden else None)


class CachedTeacher:
    """Reads the teacher signal of a batch from a `cache.CacheReader` (the batch needs ``row_index`` [B])."""

    def __init__(self, reader, *, device="cpu", verify_rows: bool = True):
        self.reader, self.device, self.verify_rows = reader, torch.device(device), verify_rows
        self.head = reader.head(self.device) if reader.has_hidden else None

    def __call__(self, batch: dict) -> TeacherSignal:
        if "row_index" not in batch:
            raise TailkdError("a cached teacher needs the row index of every batch row; draw batches with "
                              "tailkd.data.batches or collate_rows")
        idx = batch["row_index"].tolist()
        ids = batch["input_ids"].cpu() if self.verify_rows else None
        if self.head is not None:
            hidden = self.reader.teacher_hidden(idx, input_ids=ids, device=self.device)
            return TeacherSignal(hidden=hidden, head=self.head)
        return TeacherSignal(sparse=self.reader.sparse_teacher(idx, input_ids=ids, device=self.device))


def step_terms(student, batch: dict, signal: TeacherSignal | None, num_valid_tokens, cfg, *, vocab_size: int,
               fused_path: bool, chunk_size: int | None = None, autocast_dtype=None, student_head=None):
    """`ObjectiveTerms` of one micro-batch (``batch`` on the student's device), dense or fused.

    ``signal`` is None only for loss clm. Fused: the student's final hidden states + head go to
    `fused.fused_objective` (never [B, T, V]); dense: the student's logits go to `objective.objective`.
    """
    from tailkd.objective import objective

    input_ids, labels = batch["input_ids"], batch["labels"]
    segment_ids = batch.get("segment_ids")
    dev = input_ids.device
    want_cos = cfg.cosine_weight > 0
    if cfg.name != "clm" and signal is None:
        raise TailkdError(f"loss.name={cfg.name} needs a teacher signal")
    if want_cos and (signal is None or signal.hidden is None and signal.logits is None):
        raise TailkdError("loss.cosine_weight > 0 needs the teacher's hidden states: use the online teacher or a "
                          "cache written with --hidden-states")
    sig = signal or TeacherSignal()
    with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        if fused_path:
            h_s = fused.final_hidden(student, input_ids)  # (B, T, d_S)
        else:
            out = student(input_ids=input_ids, output_hidden_states=want_cos, use_cache=False)
            s_logits = out.logits[..., :vocab_size]  # (B, T, V) <- the big tensor
            h_s = out.hidden_states[-1] if want_cos else None
    if fused_path:
        head = student_head or fused.model_head(student, vocab_size)
        mm = autocast_dtype if autocast_dtype is not None else None
        return fused.fused_objective(h_s, head, labels, num_valid_tokens, cfg=cfg, teacher_hidden=sig.hidden,
                                     teacher_head=sig.head, sparse_teacher=sig.sparse, segment_ids=segment_ids,
                                     chunk_size=chunk_size, matmul_dtype=mm)
    t_logits, divergence = sig.logits, None
    if t_logits is None and sig.hidden is not None:
        t_logits = fused.apply_head(sig.hidden, sig.head).float()  # cached hidden states: (B, T, V)
    if sig.sparse is not None and cfg.name != "clm":
        from tailkd.cache import cache_divergence

        seg = segment_ids if cfg.per_document else None
        divergence = cache_divergence(s_logits, sig.sparse, labels != -100, loss=cfg.name, beta=cfg.beta,
                                      segment_ids=seg)
    t_hidden = sig.hidden if want_cos else None
    return objective(s_logits, labels, num_valid_tokens, cfg=cfg, teacher_logits=t_logits, segment_ids=segment_ids,
                     student_hidden=h_s, teacher_hidden=t_hidden, divergence=divergence)
