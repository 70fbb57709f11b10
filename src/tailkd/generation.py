"""Generation-based evaluation: decode, pull out the final answer, score exact match and sample diversity.

The pieces, each a plain function:

- ``generate``: batched decoding with LEFT padding and an attention mask (greedy by default, or
  temperature / top-p sampling). Prompts are rendered exactly as ``tailkd.sft`` renders them for
  training: a string is tokenised as is (no special tokens added), a chat (a list of
  ``{"role", "content"}`` messages) goes through the chat template with the assistant header
  appended (``add_generation_prompt=True``). Decoding stops at EOS or the template's end-of-turn token.
- answers are read and compared by ``tailkd.answers`` (``extract_answer``, ``exact_match``).
- ``distinct_n`` / ``self_bleu`` (with our own ``sentence_bleu``): diversity of sampled outputs.
- ``rouge_l``: ROUGE-L F-measure against the reference responses, by the ``rouge-score`` package (Google's
  reference implementation, stemmed), imported only when asked for (a dependency of tailkd).
- ``generation_eval``: exact match and ROUGE-L of the student and the teacher (greedy) on held-out prompts and,
  with ``samples > 0``, the accuracy and diversity of sampled outputs — the fidelity/diversity view
  on which ``drkl``, ``rkl`` and ``kd`` students differ; with a ``judge`` (the teacher) ``answer_scores``: the
  teacher's view of each model's greedy answers, token by token (no reference needed).

Text metrics work on whitespace-separated words (``text.split()``), not model tokens, so that
students with different tokenisers would be compared on the same units; ROUGE-L on rouge-score's own words
(lower-cased ASCII letters and digits, Porter-stemmed), as published ROUGE-L numbers are.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections import Counter
from collections.abc import Sequence

import torch

from tailkd.answers import exact_match, extract_answer
from tailkd.data import IGNORE_INDEX
from tailkd.errors import TailkdError
from tailkd.models import max_positions
from tailkd.sft import Prompt, SFTExample, SFTRows, encode_prompt, stop_token_ids
from tailkd.vocab import real_vocab_size

# --------------------------------------------------------------------------- diversity


def _words(text: str) -> list[str]:
    return text.split()


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _check_order(n, name: str) -> None:
    """An n-gram order: an integer >= 1 (numpy's too; a bool is refused: Python would count True as 1)."""
    if not isinstance(n, bool) and hasattr(n, "__index__") and operator.index(n) >= 1:
        return
    raise ValueError(f"{name} must be an integer >= 1, got {n!r}")


def distinct_n(samples: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016) of a set of texts: |unique n-grams| / |n-grams|, pooled over the set (the
    common form; the paper divides by the number of words, the same for n = 1).

    Words are whitespace-separated. 1.0 = no n-gram repeats anywhere in the set; k identical copies of a
    text of at least n words without a repeated n-gram score 1/k. A set without any n-gram (all texts shorter
    than n, k copies of one included) scores 0.
    """
    _check_order(n, "n")
    counts: Counter = Counter()
    for s in samples:
        counts.update(_ngrams(_words(s), n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def sentence_bleu(hypothesis: str, references: Sequence[str], *, max_order: int = 4) -> float:
    """BLEU of one hypothesis against one or more references (whitespace words), in [0, 1].

    BLEU = BP · exp((1/N) Σ_{n=1..N} log p_n) with N = ``max_order``:

    - p_n = modified (clipped) n-gram precision: Σ_g min(c_hyp(g), max_r c_r(g)) / Σ_g c_hyp(g);
    - smoothing ("add-one for n ≥ 2", Lin & Och 2004; ``smooth_method="add-k", k=1`` in sacrebleu): for
      n ≥ 2, p_n = (matches + 1) / (total + 1); p_1 is unsmoothed, so no shared word at all gives 0;
    - BP = 1 if c > r else exp(1 − r/c), c = hypothesis length, r = the reference length closest to c
      (ties: the shorter one). An empty hypothesis scores 0, or 1 against an empty reference.

    Identical hypothesis and reference score exactly 1, empty ones included (sacrebleu scores ("", [""]) 0: then
    a set of identical empty samples, e.g. a student that ends every answer at once, would get Self-BLEU 0 and
    read as the most diverse).
    """
    _check_order(max_order, "max_order")
    hyp = _words(hypothesis)
    refs = [_words(r) for r in references]
    if not refs:
        raise ValueError("sentence_bleu needs at least one reference")
    if not hyp:
        return float(any(not r for r in refs))
    log_sum = 0.0
    for n in range(1, max_order + 1):
        h = _ngrams(hyp, n)
        max_ref: Counter = Counter()
        for r in refs:
            max_ref |= _ngrams(r, n)  # element-wise max of counts
        matches = sum(min(c, max_ref[g]) for g, c in h.items())
        total = sum(h.values())
        if n == 1:
            if matches == 0:
                return 0.0
            p = matches / total
        else:
            p = (matches + 1) / (total + 1)
        log_sum += math.log(p)
    c = len(hyp)
    r = min((len(x) for x in refs), key=lambda length: (abs(length - c), length))
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_sum / max_order)


def self_bleu(samples: Sequence[str], *, max_order: int = 4) -> float:
    """Self-BLEU (Zhu et al., 2018) of the samples of ONE prompt: the mean over i of
    ``sentence_bleu(samples[i], samples[:i] + samples[i+1:])``. 1 = all samples identical; 0 = no two
    samples share a word. Lower means more diverse. Needs at least two samples."""
    if len(samples) < 2:
        raise ValueError(f"self_bleu needs at least 2 samples, got {len(samples)}")
    scores = [sentence_bleu(s, [*samples[:i], *samples[i + 1:]], max_order=max_order) for i, s in enumerate(samples)]
    return sum(scores) / len(scores)


def diversity(groups: Sequence[Sequence[str]], *, orders: Sequence[int] = (1, 2, 3, 4)) -> dict[str, float]:
    """Distinct-n and Self-BLEU of sampled outputs, each computed within one prompt's samples and then
    averaged over prompts (the diversity of a model's answers to the same question, not across questions).
    Keys: ``distinct_1`` .. ``distinct_4``, ``self_bleu``.

    A prompt whose samples have no n-gram (all shorter than n words) counts with distinct-n 0, as `distinct_n`
    scores it, and is not left out of the mean: a student that collapses to empty or one-word answers on some
    prompts must read as less diverse there, not be averaged over its other prompts only. (Distinct answers
    shorter than n words also score 0 at that order; their diversity shows in the lower orders.)"""
    if not groups:
        raise ValueError("diversity needs at least one group of samples")
    out = {f"distinct_{n}": sum(distinct_n(g, n) for g in groups) / len(groups) for n in orders}
    out["self_bleu"] = sum(self_bleu(g) for g in groups) / len(groups)
    return out


# --------------------------------------------------------------------------- fidelity: ROUGE-L


def _rouge_scorer():
    """rouge-score's ROUGE-L scorer with the Porter stemmer, imported here so that tailkd runs without it."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise TailkdError("ROUGE-L needs the rouge-score package, a dependency of tailkd missing from this "
                          "environment: pip install rouge-score; or turn it off with --generate.rouge false") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over pairs of the ROUGE-L F-measure (Lin, 2004) of ``predictions[i]`` against ``references[i]``.

    Per pair, with LCS the longest common subsequence of the two word lists (rouge-score's tokeniser:
    lower case, every run of characters other than a-z and 0-9 splits words and is dropped, words longer
    than 3 letters Porter-stemmed): P = LCS / |prediction|, R = LCS / |reference|, F = 2PR / (P + R);
    0 when either side has no word (text in scripts other than Latin letters has none: it scores 0).
    Computed by the ``rouge-score`` package (``RougeScorer(["rougeL"], use_stemmer=True)``), not re-implemented.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_l needs at least one (prediction, reference) pair")
    scorer = _rouge_scorer()
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / len(scores)


def check_references(references: Sequence[str], sources: Sequence[str] | None = None) -> None:
    """``TailkdError`` naming the first held-out example without a reference response (None or blank):
    ROUGE-L against nothing would score 0 and silently pull the average down. ``sources[i]`` names example
    i in the message (e.g. ``file:line``); without it, its 1-based position in reading order."""
    missing = [i for i, r in enumerate(references) if not (isinstance(r, str) and r.strip())]
    if missing:
        first = sources[missing[0]] if sources else f"example {missing[0] + 1}"
        raise TailkdError(f"ROUGE-L needs a reference response for every prompt, but {len(missing)} of "
                          f"{len(references)} held-out examples have an empty reference (first: {first}); give each a "
                          "response (for a chat: a non-empty last assistant turn), or pass --generate.rouge false")


# --------------------------------------------------------------------------- decoding


def _device(model) -> torch.device:
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def decoding(model, seed: int):
    """Decoding with ``model``: eval mode (put back as it was after), ``torch.inference_mode``, and the torch RNG
    forked and seeded with ``seed`` (the caller's RNG is untouched; the same seed gives the same samples)."""
    device = _device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(seed)
            yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


def padded_rows(model, vocab: int | None) -> list[int] | None:
    """The rows of ``model``'s LM head past ``vocab`` (a padded head's: no tokens), for ``generate``'s
    ``suppress_tokens`` (set to -inf before temperature and top-p); None where there are none or ``vocab`` is None."""
    if vocab is None:
        return None
    rows = model.get_output_embeddings().weight.shape[0]  # generate's scores: one per LM-head row
    return list(range(vocab, rows)) if rows > vocab else None


def generate_ids(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stops: Sequence[int], pad_id: int,
                 num_return_sequences: int = 1, **sampling) -> list[list[int]]:
    """One batched ``generate`` call (KV cache) on token-id prompts, LEFT-padded with an attention mask so that
    every prompt's last token sits next to its first generated token: the generated ids of each output row (rows
    grouped by prompt: prompt r owns rows r*k .. r*k + k-1), padding after a stop token included. ``sampling``:
    ``do_sample`` and its settings, passed on. The caller chooses the mode, RNG and grad context."""
    device = _device(model)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (b, P), left-padded
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (b, P)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                         eos_token_id=list(stops), pad_token_id=pad_id, num_beams=1, repetition_penalty=1.0,
                         **sampling)  # (b * k, P + new)
    return out[:, width:].tolist()


def build_row(prompt: list[int], response: list[int], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The trainer's row (``input_ids``, ``labels``, ``segment_ids``, ``attention_mask``, each [seq_len]) of ``prompt
    + response``: labels (shifted once) on the response tokens only; right padding with label -100, segment 1 and
    attention_mask 0 (as `tailkd.sft.SFTRows`' rows): on-policy micro-batches and `answer_scores`' rows."""
    ids = (prompt + response)[:seq_len + 1]
    n = len(ids) - 1  # positions with an input and a next token
    input_ids = torch.full((seq_len,), pad_id, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.ones(seq_len, dtype=torch.long)
    input_ids[:n] = torch.tensor(ids[:-1], dtype=torch.long)
    segment_ids[:n] = 0
    attention_mask = (segment_ids == 0).long()
    first = len(prompt) - 1  # labels[t] = ids[t + 1]: the first generated token is the label of position P - 1
    if n > first:
        labels[first:n] = torch.tensor(ids[first + 1:], dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids, "attention_mask": attention_mask}


def generate(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1,
             seed: int = 0, chat_template: str | None = None, progress: bool = True,
             vocab: int | None = None) -> list[list[str]]:
    """Complete each prompt; returns ``outputs[i][j]``, the j-th of ``num_return_sequences`` completions of prompt i.

    - A prompt is a string (tokenised as is, no special tokens added) or a chat: a list of messages
      rendered with the chat template (``chat_template`` or the tokenizer's) plus the assistant header —
      the same rendering as ``tailkd.sft`` uses for training (``encode_prompt``).
    - Prompts are sorted by length and decoded ``batch_size`` at a time, LEFT-padded with an attention
      mask (so every prompt's last token sits next to its first generated token), then put back in order.
    - Greedy by default; ``do_sample=True`` samples at ``temperature`` with nucleus ``top_p`` and NO
      top-k cut (unlike transformers' default of 50), i.e. from the model's own distribution at
      ``temperature=1, top_p=1``. The torch RNG is seeded with ``seed`` inside a forked RNG state (the
      caller's RNG is untouched); the same prompts, batch size and seed give the same samples.
    - Decoding stops at EOS or the chat template's end-of-turn token (``stop_token_ids``) or after
      ``max_new_tokens``; the text is decoded without special tokens and without the stop token.

    - ``vocab``: only ids below it are generated (`generate_tokens`); None: every row of the model's head.

    The model is run in eval mode under ``torch.inference_mode`` and put back in its previous mode.
    """
    outputs = generate_tokens(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              do_sample=do_sample, temperature=temperature, top_p=top_p,
                              num_return_sequences=num_return_sequences, seed=seed, chat_template=chat_template,
                              progress=progress, vocab=vocab)
    return [[tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in row] for row in outputs]


def generate_tokens(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int, batch_size: int = 8,
                    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                    num_return_sequences: int = 1, seed: int = 0, chat_template: str | None = None,
                    progress: bool = True, vocab: int | None = None,
                    keep_stop: bool = False) -> list[list[tuple[list[int], bool]]]:
    """`generate`'s decoding, as token ids: ``outputs[i][j]`` is the j-th completion of prompt i, ``(ids, stopped)``
    — its ids without the stop token (``keep_stop``: with it, last), and whether a stop token ended it (False: it ran
    to ``max_new_tokens``).
    ``vocab``: only ids below it are generated (the rows of a padded LM head past the tokenizer's ids are no tokens:
    suppressed, greedy or sampled, as on-policy sampling does); None: every row of the head."""
    from tailkd.runs import progress_bar

    if max_new_tokens < 1:
        raise TailkdError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise TailkdError(f"--batch-size must be >= 1, got {batch_size}")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("greedy decoding returns one sequence per prompt; set do_sample=True for several")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise TailkdError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if not prompts:
        return []
    stops = stop_token_ids(tokenizer, chat=any(not isinstance(p, str) for p in prompts), chat_template=chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [encode_prompt(tokenizer, p, chat_template=chat_template) for p in prompts]
    limit = max_positions(model)
    for i, ids in enumerate(encoded):
        if not ids:
            raise TailkdError(f"prompt {i} is empty after tokenisation; every prompt needs at least one token")
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise TailkdError(f"prompt {i} has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that exceeds "
                              f"the model's {limit} positions; lower --max-new-tokens or shorten the prompt")
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0} \
        if do_sample else {"do_sample": False}
    if padded := padded_rows(model, vocab):
        sampling["suppress_tokens"] = padded
    outputs: list[list[tuple[list[int], bool]] | None] = [None] * len(encoded)
    with decoding(model, seed):
        starts = range(0, len(order), batch_size)
        for start in progress_bar(starts, desc="generate", unit="batch", disable=not progress, dynamic_ncols=True):
            idx = order[start:start + batch_size]
            new = generate_ids(model, [encoded[i] for i in idx], max_new_tokens=max_new_tokens, stops=stops,
                               pad_id=pad_id, num_return_sequences=num_return_sequences, **sampling)
            for row, i in enumerate(idx):
                completions = []
                for ids in new[row * num_return_sequences:(row + 1) * num_return_sequences]:
                    cut = next((j for j, t in enumerate(ids) if t in stops), None)
                    completions.append((ids, False) if cut is None else (ids[:cut + keep_stop], True))
                outputs[i] = completions
    return outputs  # type: ignore[return-value]


# --------------------------------------------------------------------------- the evaluation


def _prompts_and_references(heldout_examples, chat_template: str | None):
    """(prompts, reference responses, sources, chat template) of held-out ``SFTRows``, of `tailkd.sft.SFTExample`s
    (a chat prompt where ``chat_template`` is given, else the plain one) or of ``(prompt, reference)`` pairs. The
    sources name the examples in messages: ``file:line`` for examples read from files, else ``example N`` (1-based,
    in order)."""
    if isinstance(heldout_examples, SFTRows):
        items, chat = heldout_examples.examples, heldout_examples.chat_template is not None
        chat_template = heldout_examples.chat_template if chat_template is None else chat_template
    else:
        items, chat = heldout_examples, chat_template is not None
    prompts, references, sources = [], [], []
    for k, item in enumerate(items):
        if isinstance(item, SFTExample):
            prompts.append(item.generation_prompt(chat))
            references.append(item.reference)
            sources.append(item.source)
            continue
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], str)):
            raise ValueError(f"held-out example {k} is not a (prompt, reference) pair: {item!r:.80}")
        prompts.append(item[0])
        references.append(item[1])
        sources.append(f"example {k + 1}")
    return prompts, references, sources, chat_template


def _model_metrics(model, tokenizer, prompts, references, *, max_new_tokens, batch_size, samples, temperature, top_p,
                   seed, chat_template, progress, name, rouge, vocab) -> tuple[dict, list[str], list[list[int]]]:
    """The metrics of one model (keys prefixed ``name_``), its greedy completions and their ids (a stop token that
    ended one kept last)."""
    answers = [o[0] for o in generate_tokens(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, chat_template=chat_template, progress=progress,
                                             vocab=vocab, keep_stop=True)]
    greedy = [tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True) for ids, stopped in answers]
    answered = sum(extract_answer(g) is not None for g in greedy) / len(greedy)
    out = {f"{name}_exact_match": exact_match(greedy, references),
           f"{name}_strict_exact_match": exact_match(greedy, references, strict=True), f"{name}_answer_rate": answered}
    if rouge:
        out[f"{name}_rougeL"] = rouge_l(greedy, references)
    if samples > 0:
        groups = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          do_sample=True, temperature=temperature, top_p=top_p, num_return_sequences=samples,
                          seed=seed, chat_template=chat_template, progress=progress, vocab=vocab)
        flat_pred = [s for g in groups for s in g]
        flat_ref = [r for r, g in zip(references, groups) for _ in g]
        out[f"{name}_sample_exact_match"] = exact_match(flat_pred, flat_ref)
        if rouge:
            out[f"{name}_sample_rougeL"] = rouge_l(flat_pred, flat_ref)
        if samples >= 2:
            out.update({f"{name}_{k}": v for k, v in diversity(groups).items()})
    return out, greedy, [ids for ids, _ in answers]


def check_room(tokenizer, prompts, max_new_tokens: int, models, *, chat_template: str | None = None) -> None:
    """Every prompt (rendered as decoding renders it) + ``max_new_tokens`` within the positions of every one of
    ``models`` (those that score answers they did not decode: a teacher of fewer positions), else one TailkdError
    before any decoding."""
    limits = [n for n in map(max_positions, models) if n is not None]
    if not limits:
        return
    limit = min(limits)
    for i, p in enumerate(prompts):
        n = len(encode_prompt(tokenizer, p, chat_template=chat_template))
        if n + max_new_tokens > limit:
            raise TailkdError(f"prompt {i} has {n} tokens; with --max-new-tokens {max_new_tokens} its answers exceed "
                              f"the {limit} positions the models scoring them take; lower --max-new-tokens or shorten "
                              "the prompt")


def answer_scores(student, judge, tokenizer, prompts, answers: Sequence[Sequence[int]], *, name: str, vocab: int,
                  chat_template: str | None = None, batch_size: int = 8) -> dict:
    """The teacher's (``judge``) view of ``name``'s answers, no reference needed: over every answer token (a stop
    token that ended an answer included, as on-policy training labels it), KL(teacher‖student) ``name_answers_kl``,
    KL(student‖teacher) ``name_answers_rkl`` — the on-policy (reverse-KL) objective where the answers are the
    student's —, the teacher's NLL of the tokens ``name_answers_teacher_nll`` (nats/token) and their count
    ``name_answer_tokens``: `tailkd.evaluate.heldout_metrics` of rows prompt + answer labelled on the answer, the
    prompts rendered as decoding rendered them, over the ``vocab`` ids both heads score."""
    from tailkd.evaluate import batched, heldout_metrics

    encoded = [encode_prompt(tokenizer, p, chat_template=chat_template) for p in prompts]
    seq_len = max(len(p) + len(a) for p, a in zip(encoded, answers)) - 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padding is never read
    rows = [build_row(p, list(a), seq_len, pad_id) for p, a in zip(encoded, answers)]
    m = heldout_metrics(student, judge, batched(rows, batch_size), vocab, device=_device(student))
    return {f"{name}_answers_kl": m["kl"], f"{name}_answers_rkl": m["rkl"],
            f"{name}_answers_teacher_nll": m["teacher_clm"], f"{name}_answer_tokens": m["tokens"]}


def generation_eval(student, teacher, tokenizer, heldout_examples, *, max_new_tokens: int = 256,
                    batch_size: int = 8, samples: int = 0, temperature: float = 1.0, top_p: float = 1.0,
                    seed: int = 0, limit: int | None = None, chat_template: str | None = None,
                    progress: bool = True, return_outputs: bool = False, rouge: bool = True, judge=None,
                    vocab: int | None = None) -> dict:
    """Exact match and ROUGE-L of the student and the teacher (greedy) on held-out prompts; with ``samples`` ≥ 1
    also the accuracy of ``samples`` sampled completions per prompt, and with ``samples`` ≥ 2 their diversity.

    ``heldout_examples``: the held-out ``SFTRows`` of ``tailkd.sft.prepare_sft`` (prompts rendered as in
    training, references = the reference responses), a sequence of `tailkd.sft.SFTExample` (e.g. of
    ``read_sft_examples``; chat prompts where ``chat_template`` is given, else plain ones; messages name them by
    ``file:line``), or a sequence of ``(prompt, reference)`` pairs.
    ``teacher`` may be None. ``limit``: evaluate the first ``limit`` examples only. ``rouge``: score ROUGE-L
    (`rouge_l`); every evaluated example then needs a non-empty reference (``TailkdError`` before decoding).
    ``judge``: a teacher that scores each model's greedy answers (`answer_scores`; None: not scored; every prompt +
    ``max_new_tokens`` must fit the student's and its positions, `check_room`, before any decoding); ``vocab``: the
    ids generated and scored (the run's V, `tailkd.vocab.check_vocab`: a padded head's rows past them are no tokens;
    None: every row of each head, or with a judge the tokenizer's ids).

    Returns a flat dict: ``examples``, ``max_new_tokens``, ``samples``; per model (``student_*``,
    ``teacher_*``): ``exact_match`` (greedy, flexible extraction), ``strict_exact_match`` (greedy, only
    ``#### N`` counts), ``answer_rate`` (greedy outputs with a number at all), with ``rouge`` ``rougeL`` (greedy
    outputs vs references, mean F-measure), and when sampling ``sample_exact_match`` and with ``rouge``
    ``sample_rougeL`` (fidelity, over all samples), ``distinct_1..4`` and ``self_bleu`` (diversity:
    higher distinct / lower self-BLEU = more diverse; see ``diversity``). ``return_outputs`` adds
    ``outputs``: {"student": [...], "teacher": [...]} greedy texts, in example order. With ``judge``, per model
    ``answers_kl``, ``answers_rkl``, ``answers_teacher_nll``, ``answer_tokens`` (`answer_scores`).
    """
    if samples < 0:
        raise TailkdError(f"--samples must be >= 0, got {samples}")
    prompts, references, sources, chat_template = _prompts_and_references(heldout_examples, chat_template)
    if limit is not None:
        prompts, references, sources = prompts[:limit], references[:limit], sources[:limit]
    if not prompts:
        raise TailkdError("no held-out examples to generate for; give more held-out data or a larger --limit")
    if rouge:
        check_references(references, sources)
        _rouge_scorer()  # a missing package is reported before any decoding
    if judge is not None:
        vocab = real_vocab_size(tokenizer) if vocab is None else vocab  # the ids the answers are scored over
        check_room(tokenizer, prompts, max_new_tokens, (student, judge), chat_template=chat_template)
    common = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "samples": samples,
              "temperature": temperature, "top_p": top_p, "seed": seed, "chat_template": chat_template,
              "progress": progress, "rouge": rouge, "vocab": vocab}
    result: dict = {"examples": len(prompts), "max_new_tokens": max_new_tokens, "samples": samples}
    outputs = {}
    for name, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        metrics, greedy, answers = _model_metrics(model, tokenizer, prompts, references, name=name, **common)
        result.update(metrics)
        outputs[name] = greedy
        if judge is not None:
            result.update(answer_scores(student, judge, tokenizer, prompts, answers, name=name, batch_size=batch_size,
                                        vocab=vocab, chat_template=chat_template))
    if return_outputs:
        result["outputs"] = outputs
    return result
