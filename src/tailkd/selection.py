"""MiniPLM's difference sampling (Gu et al., 2024): keep the documents a large teacher finds far more likely than a
small reference model does, then pretrain (plain CLM) on them — the data-selection baseline of the TAD paper's
Tables 1, 4 and 5.

Same tokenizer (teacher and reference share one, `tailkd.vocab.tokenizer_fingerprint`): MiniPLM's score

    score(x) = (1/n) Σ_t [ log p_teacher(x_t | x_<t) − log p_reference(x_t | x_<t) ]

over the n scored tokens of a document (its tokens, then EOS, as `tailkd.corpus` packs it; the first token has no
context and is not scored; a document longer than a row is scored in consecutive windows of ``seq_len`` tokens,
each window's first token given as context only).

Different tokenizers (the paper's OPT-125M reference for Phi-2, Qwen2.5 and Gemma2, Galactica-125m for Phi-3): a
per-token mean compares different tokens, so each model M scores the document in its own tokenization and the
score is the tokenizer-independent log-likelihood ratio per UTF-8 byte of the document text:

    score(x) = [ log p_teacher(x) − log p_reference(x) ] / bytes(x),
    log p_M(x) = Σ_t log p_M(y_t | y_<t)   over all M's tokens y of x (then M's EOS when the run appends one),

the first conditioned on M's BOS token (its EOS if it has no BOS: lm-eval's loglikelihood_rolling prefix), in
windows of ``seq_len`` as above, for each model separately (`document_logprobs`, `byte_scores`).

The ``keep`` fraction with the highest scores is kept — ``keep · n_docs`` documents rounded half up (exactly,
``keep`` read as the decimal it is written as), at least one, ties broken by the earlier document (identical
documents tie exactly: `tie_duplicates`) — and written in corpus order, so a CLM run on ``selected.jsonl`` is the
MiniPLM baseline. Documents with no scored token (no byte)
rank last.

FLOPs (paper Table 3's accounting, `tailkd.flops`): each model runs one forward over every token it scores (in its
own tokenization), plus the log-softmax and gather of each (``SCORE_FLOPS_PER_VOCAB`` per entry of its vocabulary).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction

import torch

from tailkd.corpus import document_eos_id, tokenize_documents
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
    logits = forward_logits(model, ids[:, :-1], vocab, autocast_dtype=autocast_dtype)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.where(mask, logp, 0.0).double().sum(-1).cpu()


def document_scores(teacher, reference, docs: Sequence[Sequence[int]], vocab: int, *, seq_len: int,
                    batch_size: int, device, pad_id: int, autocast_dtype=None, progress=None) -> list[float]:
    """MiniPLM's score of each tokenised document (same tokenizer, see the module docstring); ``-inf`` for a document
    with no scored token. ``progress(n)`` is called after each batch with the number of tokens scored in it."""
    kw = {"device": device, "pad_id": pad_id, "autocast_dtype": autocast_dtype}

    def delta(batch):
        return token_logprob_sums(teacher, batch, vocab, **kw) - token_logprob_sums(reference, batch, vocab, **kw)

    diff, count = _window_sums(delta, docs, seq_len, batch_size, progress)
    return [diff[d] / count[d] if count[d] else -math.inf for d in range(len(docs))]


def document_logprobs(model, docs: Sequence[Sequence[int]], vocab: int, *, seq_len: int, batch_size: int, device,
                      pad_id: int, autocast_dtype=None, progress=None) -> list[float]:
    """Σ_t log p(x_t | x_<t) over tokens 1.. of each tokenised document (``windows`` of ``seq_len``), float64: with
    `document_ids` (``start=True``) the log-likelihood of the whole document. ``progress`` as `document_scores`."""
    kw = {"device": device, "pad_id": pad_id, "autocast_dtype": autocast_dtype}
    return _window_sums(lambda batch: token_logprob_sums(model, batch, vocab, **kw), docs, seq_len, batch_size,
                        progress)[0]


def _window_sums(score, docs, seq_len, batch_size, progress):
    """Per document, the sum of ``score(batch)`` (a float64 [B] tensor) over its windows, and its scored tokens."""
    items = [(d, w) for d, ids in enumerate(docs) for w in windows(ids, seq_len)]
    total = [0.0] * len(docs)
    count = [0] * len(docs)
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        batch = [w for _, w in chunk]
        for (d, w), value in zip(chunk, score(batch).tolist()):
            total[d] += value
            count[d] += len(w) - 1
        if progress is not None:
            progress(sum(len(w) - 1 for w in batch))
    return total, count


def document_ids(tokenizer, texts: list[str], append_eos: bool, *, start: bool = False) -> list[list[int]]:
    """Each document's token ids as `tailkd.corpus` packs them (its tokens, then EOS when ``append_eos``); with
    ``start``, first the token its first token is conditioned on in the cross-tokenizer score: BOS, else EOS."""
    eos = document_eos_id(tokenizer, append_eos)
    first = [start_id(tokenizer)] if start else []
    return [first + ids + ([] if eos is None else [eos]) for ids in tokenize_documents(tokenizer, texts)]


def start_id(tokenizer) -> int:
    """BOS, else EOS (lm-eval's prefix for loglikelihood_rolling), or a TailkdError if the tokenizer has neither."""
    return int(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else document_eos_id(tokenizer)


def byte_scores(teacher_logprobs: Sequence[float], reference_logprobs: Sequence[float],
                texts: Sequence[str]) -> list[float]:
    """The cross-tokenizer score [log p_teacher(x) − log p_reference(x)] / bytes(x) (UTF-8) of each document;
    ``-inf`` for a document with no byte."""
    return [(t - r) / n if (n := len(text.encode("utf-8"))) else -math.inf
            for t, r, text in zip(teacher_logprobs, reference_logprobs, texts, strict=True)]


def tie_duplicates(scores: Sequence[float], texts: Sequence[str]) -> list[float]:
    """Each document's score, identical documents (the same text) all given the first one's: a forward's float
    rounding depends on the padding of the batch a window lands in, so copies of one text scored in different batches
    differ in the last bits, and the later copy could outrank the earlier; this way they tie exactly."""
    first: dict[str, int] = {}
    return [scores[first.setdefault(text, i)] for i, text in enumerate(texts)]


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
