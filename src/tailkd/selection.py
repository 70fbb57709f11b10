"""MiniPLM's difference sampling (Gu et al., 2024): keep the documents a large teacher finds far more likely than a
small reference model does, then pretrain (plain CLM) on them — the data-selection baseline of the TAD paper's
Tables 1, 4 and 5.

    score(x) = (1/n) Σ_t [ log p_teacher(x_t | x_<t) − log p_reference(x_t | x_<t) ]

over the n scored tokens of a document (its tokens, then EOS, as `tailkd.corpus` packs it; the first token has no
context and is not scored; a document longer than a row is scored in consecutive windows of ``seq_len`` tokens,
each window's first token given as context only). The ``keep`` fraction with the highest scores is kept —
``keep · n_docs`` documents rounded half up (exactly, ``keep`` read as the decimal it is written as), at least one,
ties broken by the earlier document — and written in corpus order, so a CLM run on ``selected.jsonl`` is the
MiniPLM baseline. Documents with no scored token rank last.

FLOPs (paper Table 3's accounting, `tailkd.flops`): both models run one forward over every scored token, plus the
log-softmax and gather of each (``SCORE_FLOPS_PER_VOCAB`` per vocabulary entry).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction

import torch

from tailkd.errors import TailkdError
from tailkd.evaluate import forward_logits


def windows(ids: Sequence[int], seq_len: int) -> Iterator[list[int]]:
    """Consecutive windows of at most ``seq_len + 1`` tokens overlapping by one: each scores its tokens 1.. given
    the ones before (within the window), and together they score every token but the document's first."""
    for start in range(0, max(1, len(ids) - 1), seq_len):
        part = list(ids[start:start + seq_len + 1])
        if len(part) >= 2:
            yield part


@torch.no_grad()
def token_logprob_sums(model, batch: list[list[int]], vocab: int, *, device, pad_id: int,
                       autocast_dtype=None) -> torch.Tensor:
    """Σ_t log p(x_t | x_<t) over tokens 1.. of each window of ``batch`` (float64 [B]).

    Windows are right-padded: in a causal model a pad after the last real token changes no real position's
    logits, and the pads' own labels are masked out."""
    length = max(len(w) for w in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), length - 1, dtype=torch.bool)
    for i, w in enumerate(batch):
        ids[i, :len(w)] = torch.tensor(w)
        mask[i, :len(w) - 1] = True
    ids, mask = ids.to(device), mask.to(device)
    logits, _ = forward_logits(model, ids[:, :-1], vocab, autocast_dtype=autocast_dtype)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.where(mask, logp, 0.0).double().sum(-1).cpu()


def document_scores(teacher, reference, docs: Sequence[Sequence[int]], vocab: int, *, seq_len: int,
                    batch_size: int, device, pad_id: int, autocast_dtype=None, progress=None) -> list[float]:
    """MiniPLM's score of each tokenised document (see the module docstring); ``-inf`` for a document with no
    scored token. ``progress(n)`` is called after each batch with the number of tokens scored in it."""
    items = [(d, w) for d, ids in enumerate(docs) for w in windows(ids, seq_len)]
    diff = [0.0] * len(docs)
    count = [0] * len(docs)
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        batch = [w for _, w in chunk]
        kw = {"device": device, "pad_id": pad_id, "autocast_dtype": autocast_dtype}
        delta = token_logprob_sums(teacher, batch, vocab, **kw) - token_logprob_sums(reference, batch, vocab, **kw)
        for (d, w), value in zip(chunk, delta.tolist()):
            diff[d] += value
            count[d] += len(w) - 1
        if progress is not None:
            progress(sum(len(w) - 1 for w in batch))
    return [diff[d] / count[d] if count[d] else -math.inf for d in range(len(docs))]


def kept_count(n_docs: int, keep: float) -> int:
    """keep · n_docs rounded half up, at least 1 (``keep`` in (0, 1]).

    Exact: ``keep`` is taken as the decimal it prints as (``str(keep)``), not as its binary float, so
    kept_count(50, 0.29) is 15 (0.29 · 50 = 14.5 rounds up), where the float product 14.499999999999998 would give 14;
    and halves round up, not to even as Python's ``round`` does (kept_count(10, 0.25) is 3)."""
    if not (0.0 < keep <= 1.0):
        raise TailkdError(f"select.keep={keep} must lie in (0, 1] (the fraction of documents kept; MiniPLM: 0.5)")
    return max(1, min(n_docs, math.floor(Fraction(str(keep)) * n_docs + Fraction(1, 2))))


def select_top(scores: Sequence[float], keep: float) -> list[int]:
    """Indices of the kept documents in corpus order: the ``kept_count`` highest scores, ties to the earlier one."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:kept_count(len(scores), keep)])
