"""Held-out evaluation of a student against a teacher, streamed over batches.

Every metric is a sum over valid held-out tokens accumulated batch by batch and divided once at
the end, so results do not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from tailkd import losses
from tailkd.objective import IGNORE_INDEX


def forward_logits(model, input_ids: torch.Tensor, vocab_size: int, *, autocast_dtype=None,
                   output_hidden_states: bool = False):
    """Run ``model`` and return logits sliced to the shared vocabulary (and the last hidden state)."""
    device_type = input_ids.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(input_ids=input_ids, output_hidden_states=output_hidden_states, use_cache=False)
    logits = out.logits[..., :vocab_size]  # (B, T, V) <- the big tensor
    hidden = out.hidden_states[-1] if output_hidden_states else None
    return logits, hidden


@torch.no_grad()
def heldout_metrics(student, teacher, batches: Iterable[dict], vocab_size: int, *, device="cpu",
                    autocast_dtype=None) -> dict:
    """KL(teacher‖student) and reverse KL, CLM loss of both, top-1 agreement, over all valid tokens.

    ``teacher`` may be None (then only the student's CLM loss is reported).
    """
    sums = {"kl": 0.0, "rkl": 0.0, "student_clm": 0.0, "teacher_clm": 0.0, "agree": 0.0}
    n = 0
    was_training = student.training
    student.eval()
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            mask = labels != IGNORE_INDEX
            s_logits, _ = forward_logits(student, input_ids, vocab_size, autocast_dtype=autocast_dtype)
            s_logits = s_logits.float()
            V = s_logits.shape[-1]
            ce = F.cross_entropy(s_logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
            sums["student_clm"] += ce.item()
            if teacher is not None:
                t_logits, _ = forward_logits(teacher, input_ids, vocab_size, autocast_dtype=autocast_dtype)
                t_logits = t_logits.float()
                sums["kl"] += losses.forward_kl(s_logits, t_logits)[mask].sum().item()
                sums["rkl"] += losses.reverse_kl(s_logits, t_logits)[mask].sum().item()
                sums["teacher_clm"] += F.cross_entropy(t_logits.reshape(-1, V), labels.reshape(-1),
                                                       ignore_index=IGNORE_INDEX, reduction="sum").item()
                sums["agree"] += (s_logits.argmax(-1) == t_logits.argmax(-1))[mask].sum().item()
            n += int(mask.sum().item())
    finally:
        student.train(was_training)
    out = {"tokens": n, "student_clm": sums["student_clm"] / max(n, 1)}
    out["student_ppl"] = float(torch.tensor(out["student_clm"]).exp())
    if teacher is not None:
        out.update(kl=sums["kl"] / max(n, 1), rkl=sums["rkl"] / max(n, 1),
                   teacher_clm=sums["teacher_clm"] / max(n, 1), agreement=sums["agree"] / max(n, 1))
        out["teacher_ppl"] = float(torch.tensor(out["teacher_clm"]).exp())
    return out
