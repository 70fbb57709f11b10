"""On-policy (student-generated) micro-batches for supervised distillation: GKD's mixed policy with rate λ.

With ``train.on_policy`` = λ > 0, each micro-batch of a supervised (``data.task sft``) run is, with probability
λ, replaced by one whose responses the CURRENT student samples from the batch's prompts; the teacher then scores
those tokens exactly as it scores dataset responses, and every divergence of the registry applies unchanged
(Agarwal et al. 2024, GKD; λ = 0 is plain supervised distillation, λ = 1 fully on-policy). Bookkeeping:

- a row's prompt is its tokens up to the first one that carries a label (``labels[f] != -100``: positions
  0..f), so the prompt is exactly the one the dataset row was rendered with (chat template included); a row of a
  prompt alone (no label: `tailkd.sft`'s prompt-only examples, trained at λ = 1) is all its real tokens;
- the student samples at most ``train.on_policy_max_new_tokens`` tokens (temperature, nucleus top-p, no top-k)
  from its distribution over the tokenizer's V ids, the ones the loss scores (rows of a padded LM head past them are
  no tokens: masked before temperature and top-p), batched and left-padded with a KV cache (`transformers`
  ``generate``), stopping at EOS or the chat template's
  end-of-turn token, which is kept and labelled as the dataset's EOS is; a row never grows past ``seq_len`` (each
  row is cut to its own room, so a long prompt in the micro-batch does not shorten the others' responses);
- the new row carries labels ONLY on the generated tokens (prompt and padding: -100), so the step's global
  count of valid tokens — the one denominator — counts generated tokens;
- the draws are counter-based: whether micro-batch m of step s is on-policy comes from ``(seed, s, m)`` (the
  same on every rank), its samples from ``(seed, s, m, rank)`` in a forked RNG. A resumed run therefore continues
  the same sampling stream with nothing to restore, and the training RNG is never touched. (The samples do
  depend on the number of processes, which splits the rows differently.)

Rows must hold one example each (``data.sft_mode pad``): a packed row has several prompts.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from tailkd import distributed as dist
from tailkd.data import IGNORE_INDEX
from tailkd.generation import build_row, decoding, generate_ids, padded_rows
from tailkd.sft import stop_token_ids


def _seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (stable across processes and Python versions, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def is_on_policy(rate: float, seed: int, step: int, micro: int) -> bool:
    """Whether micro-batch ``micro`` of optimizer step ``step`` (0-based) is generated: probability ``rate``.
    ``rate`` 0 and 1 decide without a draw."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    return random.Random(_seed("on-policy", seed, step, micro)).random() < rate


def prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[int]:
    """Per row of ``labels`` [b, T] (shifted once): the number of prompt tokens, i.e. 1 + the first position
    with a label (``input_ids[:n]`` is the prompt). A row without any label holds a prompt alone (`tailkd.sft`: all
    its real tokens, ``attention_mask``'s ones) — 0 where it has none or no mask is given (nothing to answer)."""
    valid = labels != IGNORE_INDEX
    first = torch.where(valid.any(1), valid.int().argmax(1), -1)
    alone = torch.zeros_like(first) if attention_mask is None else attention_mask.sum(1)
    return [int(f) + 1 if f >= 0 else int(n) for f, n in zip(first, alone)]


def sample_responses(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                     stops: list[int], pad_id: int, seed: int, autocast_dtype: torch.dtype | None = None,
                     vocab: int | None = None) -> list[list[int]]:
    """One sampled continuation per prompt (token ids), cut after its first stop token (kept), in one batched,
    left-padded ``generate`` call with a KV cache. ``vocab``: only ids below it are sampled (a padded LM head's
    rows past the tokenizer are no tokens; None: every row). The RNG is forked and seeded with ``seed``; the model
    runs in eval mode and is put back in its previous mode."""
    device_type = next(model.parameters()).device.type
    with decoding(model, seed), torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                                               enabled=autocast_dtype is not None):
        new = generate_ids(model, prompts, max_new_tokens=max_new_tokens, stops=stops, pad_id=pad_id,
                           do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0,
                           suppress_tokens=padded_rows(model, vocab))
    responses = []
    for ids in new:
        cut = next((j + 1 for j, t in enumerate(ids) if t in stops), len(ids))
        responses.append(ids[:cut])
    return responses


@dataclass(frozen=True)
class OnPolicy:
    """The on-policy settings of a run (`tailkd.config.TrainConfig`'s ``on_policy*``) and its tokeniser's ids."""

    rate: float
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    stops: tuple[int, ...]
    pad_id: int
    autocast_dtype: torch.dtype | None = None
    vocab: int | None = None  # the ids it samples: the run's V (`tailkd.vocab.check_vocab`), not padded rows

    def apply(self, model, micro: list[dict], *, step: int, rank: int) -> tuple[list[dict], int, int]:
        """This rank's micro-batches of step ``step`` with the on-policy ones generated by ``model`` (the student,
        unwrapped). Returns (micro-batches, how many were generated, tokens generated on this rank)."""
        out, n_batches, n_tokens = [], 0, 0
        for m, batch in enumerate(micro):
            if not is_on_policy(self.rate, self.seed, step, m):
                out.append(batch)
                continue
            new, tokens = self.generate_batch(model, batch, seed=_seed("sample", self.seed, step, m, rank))
            out.append(new)
            n_batches, n_tokens = n_batches + 1, n_tokens + tokens
        return out, n_batches, n_tokens

    def generate_batch(self, model, batch: dict, *, seed: int) -> tuple[dict, int]:
        """``batch`` (rows of one example each) with every response replaced by one sampled from ``model`` (a row
        holding a prompt alone is answered the same way); a row without any token stays as it is. Returns (the batch,
        tokens generated)."""
        seq_len = batch["input_ids"].shape[1]
        lengths = prompt_lengths(batch["labels"], batch.get("attention_mask"))
        rows = [i for i, n in enumerate(lengths) if n > 0]
        if not rows:
            return batch, 0
        prompts = [batch["input_ids"][i, :lengths[i]].tolist() for i in rows]
        rooms = [seq_len + 1 - len(p) for p in prompts]  # per row (>= 1: a label fits), not the longest prompt's
        responses = sample_responses(model, prompts, max_new_tokens=min(self.max_new_tokens, max(rooms)),
                                     temperature=self.temperature, top_p=self.top_p, stops=list(self.stops),
                                     pad_id=self.pad_id, seed=seed, autocast_dtype=self.autocast_dtype,
                                     vocab=self.vocab)
        responses = [r[:room] for r, room in zip(responses, rooms)]
        new = {key: value.clone() for key, value in batch.items()}  # e.g. row_index is kept as it is
        for i, prompt, response in zip(rows, prompts, responses):
            for key, value in build_row(prompt, response, seq_len, self.pad_id).items():
                new[key][i] = value.to(new[key].dtype)
        return new, sum(len(r) for r in responses)


def on_policy_from_config(cfg, tokenizer, train_rows, ac, vocab: int | None = None) -> OnPolicy | None:
    """``train.on_policy`` > 0 (an SFT run, checked by the config): the sampling settings, the stop tokens of the
    rows' rendering (EOS, and the chat template's end-of-turn), their padding id and the ids sampled: ``vocab``, the
    run's V (fewer than the tokenizer's where an LM head is pruned: `tailkd.vocab.scored_vocab`), or None: the
    tokenizer's."""
    from tailkd.vocab import real_vocab_size

    t = cfg.train
    if t.on_policy == 0:
        return None
    template = train_rows.chat_template
    stops = stop_token_ids(tokenizer, chat=template is not None, chat_template=template)
    dist.say(f"on-policy: with probability {t.on_policy} a micro-batch's responses are sampled from the student "
             f"(temperature {t.on_policy_temperature}, top-p {t.on_policy_top_p}, at most "
             f"{t.on_policy_max_new_tokens} new tokens) and scored by the teacher")
    return OnPolicy(t.on_policy, t.on_policy_temperature, t.on_policy_top_p, t.on_policy_max_new_tokens, t.seed,
                    tuple(stops), train_rows.pad_id, ac, real_vocab_size(tokenizer) if vocab is None else vocab)
