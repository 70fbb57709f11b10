"""The teacher signal of a training step: an online teacher forward, or a teacher cache reader.

A `TeacherSignal` is one of
- ``logits`` [B, T, V]: the online teacher's full logits (dense path, small vocabularies / short rows);
- ``hidden`` [B, T, d_T] + ``head``: the teacher's final hidden states and LM head (online teacher on the fused
  path, or a cache written with ``--hidden-states``): exact teacher logits, computed chunk by chunk when fused;
- ``sparse``: a `divergences.SparseTeacher` from a top-K cache (D_KL1, plus a sampled tail estimate when cached).

`tailkd.objective.step_terms` turns a student, a batch and a signal into the step's loss terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tailkd.data import model_inputs
from tailkd.divergences import SparseTeacher
from tailkd.errors import TailkdError
from tailkd.head import Head, final_hidden, model_head

__all__ = ["CachedTeacher", "OnlineTeacher", "TeacherSignal"]


@dataclass
class TeacherSignal:
    logits: torch.Tensor | None = None  # (B, T, V)
    hidden: torch.Tensor | None = None  # (B, T, d_T)
    head: Head | None = None
    sparse: SparseTeacher | None = None


class OnlineTeacher:
    """Runs the (frozen) teacher on each batch: full logits (dense) or final hidden states + head (fused)."""

    sparse = False  # its signal is never a top-K teacher

    def __init__(self, model, vocab_size: int, *, fused_path: bool, autocast_dtype=None, want_hidden: bool = False):
        self.model, self.vocab, self.fused = model, vocab_size, fused_path
        self.want_hidden = want_hidden
        # a teacher whose weights are all in the autocast dtype already (bf16 on CUDA) runs without autocast: the
        # same bf16 matmuls, without autocast's per-op dispatch and its float32 round trips
        floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
        self.autocast_dtype = None if floats == {autocast_dtype} else autocast_dtype
        self.head = model_head(model, vocab_size) if fused_path else None

    @torch.no_grad()
    def __call__(self, batch: dict, host_batch: dict | None = None) -> TeacherSignal:
        input_ids = batch["input_ids"]
        dev = input_ids.device
        extra = model_inputs(batch)  # the position ids of packed documents (data.document_attention)
        with torch.autocast(dev.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if self.fused:
                return TeacherSignal(hidden=final_hidden(self.model, input_ids, **extra), head=self.head)
            out = self.model(input_ids=input_ids, output_hidden_states=self.want_hidden, use_cache=False, **extra)
        return TeacherSignal(logits=out.logits[..., : self.vocab],
                             hidden=out.hidden_states[-1] if self.want_hidden else None)


class CachedTeacher:
    """Reads the teacher signal of a batch from a `cache.CacheReader` (the batch needs ``row_index`` [B])."""

    def __init__(self, reader, *, device="cpu", verify_rows: bool = True):
        self.reader, self.device, self.verify_rows = reader, torch.device(device), verify_rows
        self.head = reader.head(self.device) if reader.has_hidden else None
        self.sparse = self.head is None  # its signal: a top-K teacher (TeacherSignal.sparse), else hidden states

    def __call__(self, batch: dict, host_batch: dict | None = None) -> TeacherSignal:
        """``host_batch``: the same micro-batch on the host: its row indices and ids are read without a device
        synchronisation."""
        batch = host_batch if host_batch is not None else batch
        if "row_index" not in batch:
            raise TailkdError("a cached teacher needs the row index of every batch row; draw batches with "
                              "tailkd.data.batches or collate_rows")
        idx = batch["row_index"].tolist()
        ids = batch["input_ids"].cpu() if self.verify_rows else None
        if self.head is not None:
            hidden = self.reader.teacher_hidden(idx, input_ids=ids, device=self.device)
            return TeacherSignal(hidden=hidden, head=self.head)
        return TeacherSignal(sparse=self.reader.sparse_teacher(idx, input_ids=ids, device=self.device))
