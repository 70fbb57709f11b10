"""Prompt/response data for supervised distillation: JSONL -> token rows whose labels cover ONLY responses.

Input: JSON lines, each either ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``
(other keys are ignored). Output: the trainer's row contract (``tailkd.data``): int64 ``[T]`` tensors ``input_ids``,
``labels`` (shifted once, here; -100 = ignore) and ``segment_ids`` (example index within the row). No position ids
(the model numbers a row's positions 0..T-1 itself), except in packed rows with ``data.document_attention``
(`tailkd.documents`: each example's own, from 0).

Rendering (``chat_template``):

- ``None`` (plain): ``prompt + response + EOS``, each part tokenised on its own with no special tokens added and NO
  separator inserted (the data must carry one, e.g. a prompt ending in "\\n"). Text that spells a special token
  ("<|endoftext|>") is tokenised as text, never as the special id.
- ``"auto"``: the tokenizer's chat template when it has one (pairs become one user turn and one assistant
  turn), else plain. Any other string is used as the (Jinja) chat template itself.
- Chats (``messages``) need a template.

Which tokens carry labels: for pairs, the response tokens and the EOS; for chats, every assistant turn's content tokens
and the end-of-turn token that closes it (ChatML: ``<|im_end|>``). Prompts, padding and template scaffolding (system
prompts, role headers like ``<|im_start|>assistant\\n``, the newline after ``<|im_end|>``) are -100. The spans come
from rendering the conversation incrementally: the prefix up to an assistant turn with the assistant header
(``add_generation_prompt=True``) and the prefix including the turn; the turn's tokens are the difference, cut after the
last special token in it (the end-of-turn). Checks, each a ``TailkdError`` naming file:line: the rendered prefix is a
text prefix of the rendered conversation, its TOKENS are a prefix of the conversation's tokens (a merge across the
boundary would make the spans ambiguous), the difference starts with the turn's content (no header leaked into it), and
message contents do not spell special tokens. This works for any template, with or without ``{% generation %}`` markers
(SmolLM2's has none).

Example with the labels shifted once (``x`` = tokens, ``m`` = response mask; the last token is never an input)::

    x       P1 P2 R1 R2 E          (prompt P, response R, EOS E)
    input   P1 P2 R1 R2
    labels  -  R1 R2 E             (labels[t] = x[t+1] if m[t+1] else -100)

Layout (``mode``): ``"pad"`` (one example per row, right-padded to ``seq_len``) or ``"pack"`` (examples placed whole,
in order, into rows of ``seq_len`` — next-fit: an example that does not fit in the current row's space starts a new
row; the rest of a row is padding). Padding positions carry label -100, the segment id after the row's last example and
``attention_mask`` 0 — which only a mixture's router term uses, to keep its routing statistics off the padding
(`tailkd.objective.step_terms`): attention is causal and padding on the right, so real tokens never attend to padding.
In packed rows later examples DO attend to earlier ones (no block-diagonal mask): the usual packing approximation,
harmless in practice as the earlier text is unrelated and fully visible; ``data.document_attention`` (rows with
``restart_positions``) or ``mode="pad"`` give exact per-example attention.

Examples longer than ``seq_len + 1`` tokens (``seq_len`` positions): ``overlong="truncate"`` (default) keeps the first
``seq_len + 1`` tokens, i.e. drops the END of the response (and its EOS) — a warning gives the count; ``"drop"``
removes them. Either way an example left without a single label (its prompt alone fills the row) is dropped and
counted.

Prompts alone (``prompt_only``: a line without a response or with a blank one, a chat without an assistant turn; a
training run reads them so only fully on-policy, ``train.on_policy`` 1, else refuses them naming file and line;
evaluations read a run's data so): a row of the generation prompt (`encode_prompt`: the tokens before the first label
of the same prompt with a response), all of it input, no label, at most ``seq_len`` tokens (never truncated: dropped
and counted); held out they are dropped, counted and warned of (nothing to score).
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tailkd.config import OVERLONG, SFT_MODES, utf8_text
from tailkd.data import IGNORE_INDEX, content_digest, document_positions
from tailkd.errors import TailkdError

Prompt = str | list[dict]  # a plain prompt, or chat messages without the final assistant turn
# the refusals of a training line without a response, below train.on_policy 1 (`prepare_sft`)
PROMPTS_ALONE_HINT = " (prompts alone train fully on-policy: --train.on_policy 1)"


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class SFTExample:
    """One training example: a plain pair (``prompt``, ``response``) or a chat (``messages``).

    ``source`` is ``"file:line"``. ``generation_prompt`` / ``reference`` are what generation-based evaluation uses:
    the prompt (for a chat: the messages before the LAST assistant turn; all where none is: prompts to decode) and
    the reference response (the last assistant turn's content; "" where there is none)."""

    source: str
    prompt: str | None = None
    response: str | None = None
    messages: tuple[dict, ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def reference(self) -> str:
        if self.messages is None:
            return self.response
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")

    @property
    def prompt_only(self) -> bool:
        """A prompt with nothing to train on — no or a blank response, a chat without an assistant turn: read for
        training only where the student answers every prompt (``train.on_policy`` 1)."""
        if self.messages is None:
            return not self.response.strip()
        return not any(m["role"] == "assistant" for m in self.messages)

    def generation_prompt(self, chat: bool) -> Prompt:
        """The prompt as rendered for training: a chat (list of messages) if ``chat``, else the plain string."""
        if self.messages is None:
            return [{"role": "user", "content": self.prompt}] if chat else self.prompt
        last = max((i for i, m in enumerate(self.messages) if m["role"] == "assistant"), default=len(self.messages))
        return [dict(m) for m in self.messages[:last]]

    def key(self) -> str:
        """The prompt as canonical JSON, in the example's own format: the held-out split's hash input (kept as it
        is, so that no run's split moves between versions)."""
        return json.dumps(self.generation_prompt(chat=self.is_chat), sort_keys=True, ensure_ascii=False)

    def prompt_key(self) -> str:
        """The prompt as a chat template sees it, as canonical JSON: a pair ``(X, ·)`` and a chat whose one turn
        before the reply is ``user: X`` share it. Examples sharing it are one prompt: never on both sides of a split."""
        return json.dumps(self.generation_prompt(chat=True), sort_keys=True, ensure_ascii=False)


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TailkdError(f"{path}:{n}: not UTF-8 ({exc.reason}); SFT data must be UTF-8 JSON lines") from None
            yield n, line.removeprefix("\ufeff") if n == 1 else line


def _parse(obj, where: str, references_optional: bool = False, hint: str = "") -> SFTExample:
    from tailkd.corpus import check_unicode

    if not isinstance(obj, dict):
        raise TailkdError(f'{where}: a JSON {type(obj).__name__}, not an object; write {{"prompt": ..., '
                          '"response": ...} or {"messages": [...]} per line')
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise TailkdError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
        for j, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise TailkdError(f'{where}: message {j} is not {{"role": str, "content": str}} (got {m!r:.80})')
            for k in ("role", "content"):
                check_unicode(m[k], f'{where}: message {j}\'s "{k}"')
        if not references_optional and not any(m["role"] == "assistant" for m in msgs):
            raise TailkdError(f'{where}: no "assistant" message, so nothing to train on; add the assistant reply{hint}')
        return SFTExample(where, messages=tuple({"role": m["role"], "content": m["content"]} for m in msgs))
    needed = ("prompt",) if references_optional else ("prompt", "response")  # prompts to decode: a reference or not
    if missing := [k for k in needed if k not in obj]:
        why = hint if missing[0] == "response" else ""
        raise TailkdError(f'{where}: no "{missing[0]}" field (found keys {sorted(obj)[:6]}); every line needs '
                          f'{" and ".join(map(json.dumps, needed))}, or "messages"{why}')
    obj = {"response": "", **obj}
    for k in ("prompt", "response"):
        if not isinstance(obj[k], str):
            raise TailkdError(f'{where}: "{k}" is a {type(obj[k]).__name__}, not a string')
        check_unicode(obj[k], f'{where}: "{k}"')
    if not obj["response"].strip() and not references_optional:
        raise TailkdError(f'{where}: "response" is empty; remove the line or give the reference answer{hint}')
    return SFTExample(where, prompt=obj["prompt"], response=obj["response"])


def read_sft_examples(paths, *, references_optional: bool = False, hint: str = "") -> list[SFTExample]:
    """Every example of ``paths`` (files or folders, as ``tailkd.corpus.list_files``), in reading order.

    Blank lines are skipped. ``TailkdError`` (with file:line) for a line that is not JSON, not an object,
    lacks ``prompt``/``response`` (or ``messages``), has the wrong types or text that is no Unicode (an unpaired
    surrogate escape, ``tailkd.corpus.check_unicode``); and for a file without examples; for an empty ``response`` too
    unless ``references_optional`` (prompts to decode: the response is only a reference, which ROUGE-L then asks for;
    a missing one, or a chat without an assistant turn, is then an empty one). ``hint`` ends the refusals of a missing
    response (training files: `PROMPTS_ALONE_HINT`).
    """
    from tailkd.corpus import list_files

    out = []
    for f in list_files(paths, what="SFT data", otherwise=""):  # no data.paths: the math set, not the news corpus
        n_file = 0
        for n, line in _read_lines(f):
            if not line.strip():
                continue
            where = f"{f}:{n}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested past Python's stack
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply to read"
                raise TailkdError(f"{where}: not valid JSON ({why}); SFT data needs one JSON object per line") \
                    from None
            out.append(_parse(obj, where, references_optional, hint))
            n_file += 1
        if n_file == 0:
            raise TailkdError(f'{f} holds no examples (empty or blank); add lines like {{"prompt": ..., "response": '
                              '...} or remove the file')
    return out


# --------------------------------------------------------------------------- rendering and masks


def resolve_chat_template(tokenizer, chat_template: str | None) -> str | None:
    """``None`` -> None (plain); ``"auto"`` -> the tokenizer's template or None; any other string -> itself."""
    if chat_template is None:
        return None
    if chat_template == "auto":
        return getattr(tokenizer, "chat_template", None) or None
    if not isinstance(chat_template, str) or not chat_template.strip():
        raise TailkdError(f"chat_template must be None, 'auto' or a Jinja template string, got {chat_template!r:.60}")
    return chat_template


def _template_for(tokenizer, chat_template: str | None) -> str:
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TailkdError(f"chat messages need a chat template but tokenizer {name} has none; pass one "
                          "(chat_template='{% for m in messages %}...') or use prompt/response pairs")
    return template


def render_chat(tokenizer, messages: Sequence[dict], *, chat_template: str | None = None,
                add_generation_prompt: bool = False, where: str = "a conversation") -> str:
    """The conversation as text, through ``chat_template`` (or the tokenizer's); ``where`` names it in errors."""
    import jinja2  # transformers renders templates with it

    template = _template_for(tokenizer, chat_template)
    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:  # e.g. raise_exception("roles must alternate")
        raise TailkdError(f"{where}: the chat template failed ({str(exc)[:120]}); fix the messages "
                          "or pass another chat_template") from None


def _tokenize_text(tokenizer, texts: list[str]) -> list[list[int]]:
    """Plain text: no special tokens added, and text spelling a special token stays text."""
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def _tokenize_rendered(tokenizer, texts: list[str]) -> list[list[int]]:
    """Template output: its special tokens ("<|im_start|>") must be recognised; nothing added."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def encode_prompt(tokenizer, prompt: Prompt, *, chat_template: str | None = None,
                  where: str = "a conversation") -> list[int]:
    """Token ids of a generation prompt, rendered exactly as in training: a string as plain text, a chat
    through the template with the assistant header appended (``add_generation_prompt=True``)."""
    if isinstance(prompt, str):
        return _tokenize_text(tokenizer, [prompt])[0]
    text = render_chat(tokenizer, prompt, chat_template=chat_template, add_generation_prompt=True, where=where)
    return _tokenize_rendered(tokenizer, [text])[0]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TailkdError(f"tokenizer {name} has no EOS token to end responses; set tokenizer.eos_token")
    return int(tokenizer.eos_token_id)


def _special_tokens(tokenizer) -> dict[str, int]:
    """Every special token and its id: those the tokenizer names (EOS, ``additional_special_tokens``) and the added
    tokens flagged special without being named (SmolLM2's ``<file_sep>`` and 13 others), all of which the
    tokenizer recognises in rendered text and ``split_special_tokens`` treats as text."""
    out = {t: int(i) for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids) if t}
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False) and added.content:
            out.setdefault(added.content, int(i))
    return out


def _special_ids(tokenizer) -> set[int]:
    return set(_special_tokens(tokenizer).values())


def _check_contents(tokenizer, messages: Sequence[dict], where: str) -> None:
    specials = list(_special_tokens(tokenizer))
    for m in messages:
        hit = next((t for t in specials if t in m["content"]), None)
        if hit is not None:
            raise TailkdError(f"{where}: a {m['role']} message contains the special token {hit!r} as text, which "
                              "would forge template structure; remove it from the data")


def _chat_spans(tokenizer, messages: Sequence[dict], template: str,
                where: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the rendered conversation and the [start, end) span of each assistant turn's labels."""
    _check_contents(tokenizer, messages, where)
    full = render_chat(tokenizer, messages, chat_template=template, where=where)
    bounds = []  # (prefix text with assistant header, text including the turn, turn index)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], chat_template=template, add_generation_prompt=True, where=where)
        upto = render_chat(tokenizer, messages[:i + 1], chat_template=template, where=where)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TailkdError(f"{where}: the chat template renders assistant turn {i} differently inside the whole "
                              "conversation than on its own (e.g. it rewrites earlier turns), so the response tokens "
                              "cannot be located; use a template that renders turns append-only, or plain pairs")
        bounds.append((before, upto, i))
    texts = [full] + [t for b in bounds for t in b[:2]]
    ids = _tokenize_rendered(tokenizer, texts)
    full_ids, spans, special = ids[0], [], _special_ids(tokenizer)
    for k, (_, _, i) in enumerate(bounds):
        before_ids, upto_ids = ids[1 + 2 * k], ids[2 + 2 * k]
        for part in (before_ids, upto_ids):
            if full_ids[:len(part)] != part:
                raise TailkdError(f"{where}: the tokens of the conversation up to assistant turn {i} are not a prefix "
                                  "of the whole conversation's tokens (a token merges across the boundary), so the "
                                  "response mask would be ambiguous; change the text at that boundary (e.g. end the "
                                  "turn with a newline) or use plain pairs")
        start, end = len(before_ids), len(upto_ids)
        eot = [j for j in range(start, end) if full_ids[j] in special]
        if eot:
            end = eot[-1] + 1  # through the end-of-turn token; what follows (a newline) is scaffolding
        content = messages[i]["content"].strip()
        shown = tokenizer.decode(full_ids[start:end], skip_special_tokens=False).lstrip()
        if content and not shown.startswith(content[:32]):
            raise TailkdError(f"{where}: the chat template puts text between the assistant header and the content of "
                              f"turn {i} ({shown[:40]!r}), so template scaffolding would be trained on; use a template "
                              "whose add_generation_prompt emits the whole assistant header")
        spans.append((start, end))
    return full_ids, spans


def stop_token_ids(tokenizer, *, chat: bool, chat_template: str | None = None) -> list[int]:
    """Token ids that end a response: EOS, and for chats the template's end-of-turn token(s) (the special
    tokens that close an assistant turn, found by rendering a probe conversation)."""
    stops = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if chat:
        template = _template_for(tokenizer, chat_template)
        probe = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
        ids, spans = _chat_spans(tokenizer, probe, template, "the chat template's probe conversation")
        special = _special_ids(tokenizer)
        stops += [t for t in ids[spans[0][0]:spans[0][1]] if t in special and t not in stops]
    if not stops:
        raise TailkdError("the tokenizer has no EOS token and the prompts use no chat template, so generation "
                          "could never stop early; set tokenizer.eos_token")
    return stops


def encode_example(tokenizer, example: SFTExample, chat_template: str | None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, response_mask)`` of one example: int64 / bool arrays of equal length (unshifted, untruncated).
    ``chat_template`` is the RESOLVED template (``resolve_chat_template``), None = plain. A prompt-only example
    (`SFTExample.prompt_only`) gives its prompt as generation renders it (`encode_prompt`) and a mask of zeros."""
    if chat_template is None and example.is_chat:
        raise TailkdError(f"{example.source}: chat messages need a chat template; use chat_template='auto' with "
                          "a tokenizer that has one, or pass a template")
    if example.prompt_only:
        prompt = example.generation_prompt(chat_template is not None)
        if not isinstance(prompt, str):
            _check_contents(tokenizer, prompt, example.source)
        ids = encode_prompt(tokenizer, prompt, chat_template=chat_template, where=example.source)
        return np.asarray(ids, dtype=np.int64), np.zeros(len(ids), dtype=bool)
    if chat_template is None:
        p, r = _tokenize_text(tokenizer, [example.prompt, example.response])
        ids = [*p, *r, _eos_id(tokenizer)]
        mask = [False] * len(p) + [True] * (len(r) + 1)
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
    messages = example.messages if example.is_chat else (
        {"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.response})
    ids, spans = _chat_spans(tokenizer, messages, chat_template, example.source)
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        mask[start:end] = True
    return np.asarray(ids, dtype=np.int64), mask


# --------------------------------------------------------------------------- rows


class SFTRows(Dataset):
    """Map-style dataset of ``seq_len``-token rows (see the module docstring for the layout).

    ``examples[k]`` is the k-th example kept; ``rows[i]`` lists the example indices in row i (one in
    ``"pad"`` mode). ``chat_template`` is the template the examples were rendered with (None = plain), so
    that generation can render their prompts the same way (``sft_rows_to_prompts``). ``restart_positions``
    (``data.document_attention``; set after construction, as `tailkd.prepare.setup_data` does): packed rows also
    carry ``position_ids`` that restart at each example (`tailkd.documents`; a pad row holds one example: unchanged).
    """

    restart_positions = False

    def __init__(self, examples: list[SFTExample], encoded: list[tuple[np.ndarray, np.ndarray]], *, seq_len: int,
                 mode: str, pad_id: int, chat_template: str | None):
        self.examples, self.seq_len, self.mode, self.pad_id = examples, seq_len, mode, int(pad_id)
        self.chat_template = chat_template
        self.inputs: list[np.ndarray] = []  # per example: ids[:-1]; a prompt alone (no mask set): all of it
        self.targets: list[np.ndarray] = []  # per example: ids[1:] where the response mask is set, else -100
        for ids, mask in encoded:
            if not mask.any():  # a prompt-only example: the student's answer starts after its last token
                self.inputs.append(ids.astype(np.int32))
                self.targets.append(np.full(len(ids), IGNORE_INDEX, dtype=np.int32))
                continue
            self.inputs.append(ids[:-1].astype(np.int32))
            self.targets.append(np.where(mask[1:], ids[1:], IGNORE_INDEX).astype(np.int32))
        self.rows: list[list[int]] = []
        if mode == "pad":
            self.rows = [[k] for k in range(len(examples))]
        else:  # next-fit packing, in example order
            used = seq_len
            for k, x in enumerate(self.inputs):
                if used + len(x) > seq_len:
                    self.rows.append([])
                    used = 0
                self.rows[-1].append(k)
                used += len(x)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self.rows) <= i < len(self.rows):
            raise IndexError(f"row {i} out of range for {len(self.rows)} rows")
        members = self.rows[i]
        T = self.seq_len
        input_ids = np.full(T, self.pad_id, dtype=np.int64)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        segment_ids = np.full(T, len(members), dtype=np.int64)  # padding: the segment after the last example
        at = 0
        for seg, k in enumerate(members):
            n = len(self.inputs[k])
            input_ids[at:at + n] = self.inputs[k]
            labels[at:at + n] = self.targets[k]
            segment_ids[at:at + n] = seg
            at += n
        attention_mask = torch.from_numpy((segment_ids < len(members)).astype(np.int64))  # 0 on the padding alone
        row = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
               "segment_ids": torch.from_numpy(segment_ids), "attention_mask": attention_mask}
        if self.restart_positions and self.mode == "pack":
            row["position_ids"] = document_positions(row["segment_ids"])
        return row

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the rows' content (layout, token ids, labels): kept by a checkpoint (`RowSampler`)."""
        return content_digest({"seq_len": self.seq_len, "mode": self.mode, "pad_id": self.pad_id,
                               "rows": self.rows, "inputs": self.inputs, "targets": self.targets})

    @functools.cached_property
    def input_digest(self) -> str:
        """SHA-256 of what the rows give the teacher (layout, token ids; not the labels): a teacher cache's identity
        of them (`tailkd.prepare.rows_fingerprint`)."""
        return content_digest({"seq_len": self.seq_len, "mode": self.mode, "pad_id": self.pad_id,
                               "rows": self.rows, "inputs": self.inputs})

    def stats(self) -> dict:
        tokens = sum(len(x) for x in self.inputs)
        labelled = sum(int((y != IGNORE_INDEX).sum()) for y in self.targets)
        return {"examples": len(self.examples), "rows": len(self.rows), "tokens": tokens,
                "response_tokens": labelled, "fill": tokens / max(1, len(self.rows) * self.seq_len),
                "prompt_only": sum(e.prompt_only for e in self.examples)}


def sft_rows_to_prompts(rows: SFTRows) -> tuple[list[Prompt], list[str]]:
    """``(prompts, references)`` of the examples in ``rows``, prompts rendered as in training (a chat if
    the rows were rendered with a chat template; pass ``rows.chat_template`` on to ``generate``)."""
    chat = rows.chat_template is not None
    return [e.generation_prompt(chat) for e in rows.examples], [e.reference for e in rows.examples]


# --------------------------------------------------------------------------- the whole preparation


def _split_key(example: SFTExample, seed: int) -> int:
    blob = f"{seed}\n{example.key()}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def _heldout_split(examples: list[SFTExample], fraction: float, seed: int) -> tuple[list[SFTExample], list[SFTExample]]:
    """Hold out the ``round(fraction * n)`` examples (at least 1, at most n - 1) with the smallest
    ``sha256(seed, prompt)``, plus any other example with the same prompt (no prompt on both sides; a pair and a
    one-turn chat asking the same are one prompt, `SFTExample.prompt_key`, and take the smaller of their hashes).
    Deterministic, independent of the file order; file order is kept within each split."""
    if fraction == 0 or not examples:
        return list(examples), []
    n = len(examples)
    if n < 2:
        raise TailkdError(f"only {n} SFT example, so none can be held out; add examples or give held-out examples of "
                          "their own (--heldout-data FILE)")
    prompts = [e.prompt_key() for e in examples]
    group: dict[str, int] = {}  # a prompt in both formats (pair, one-turn chat) takes its smallest key: one side
    for e, prompt in zip(examples, prompts):
        k = _split_key(e, seed)
        group[prompt] = min(k, group.get(prompt, k))
    keys = [group[prompt] for prompt in prompts]
    want = min(n - 1, max(1, round(fraction * n)))
    cut = sorted(keys)[want - 1]
    held = [k <= cut for k in keys]
    if all(held):
        raise TailkdError("every SFT example shares one prompt, so none is left for training; add distinct prompts")
    return [e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h]


def _encode_all(tokenizer, examples: list[SFTExample], template: str | None, seq_len: int, overlong: str,
                counts: dict) -> tuple[list[SFTExample], list[tuple[np.ndarray, np.ndarray]]]:
    """The examples kept and their ``(ids, mask)``; ``counts`` gets those cut and dropped. A prompt-only example
    (read for training where the student answers every prompt; held out, it has nothing to score) keeps its whole
    prompt and needs room for one answer token: at most ``seq_len`` tokens, never truncated."""
    kept, encoded = [], []
    for e in examples:
        if e.prompt_only and "dropped_prompt_only" in counts:
            counts["dropped_prompt_only"] += 1
            continue
        if e.prompt_only and not e.is_chat and not e.prompt.strip():  # as seqkd-data refuses it
            raise TailkdError(f'{e.source}: the "prompt" is empty and there is no response: nothing to answer; remove '
                              "the line")
        ids, mask = encode_example(tokenizer, e, template)
        if e.prompt_only:
            counts["dropped_no_response"] += len(ids) > seq_len  # its prompt alone fills the row
            if len(ids) <= seq_len:
                kept.append(e)
                encoded.append((ids, mask))
            continue
        cut = len(ids) > seq_len + 1
        if cut:
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        if not mask[1:].any():
            counts["dropped_no_response"] += 1  # its prompt alone fills the row
            continue
        counts["truncated"] += cut  # kept, but shortened
        kept.append(e)
        encoded.append((ids, mask))
    return kept, encoded


def prepare_sft(paths, tokenizer, *, seq_len: int, mode: str = "pad", chat_template: str | None = "auto",
                heldout_fraction: float = 0.05, heldout_paths=None, seed: int = 0,
                overlong: str = "truncate", prompt_only: bool = False) -> tuple[SFTRows, SFTRows, dict]:
    """Read, render, mask and lay out prompt/response data. Returns ``(train_rows, heldout_rows, info)``.

    - ``paths``: JSONL files or folders (see ``read_sft_examples``). ``seq_len``: positions per row; an example of L
      tokens takes L - 1 positions. ``mode``: ``"pad"`` or ``"pack"``; ``chat_template``: None, ``"auto"`` (default)
      or a template string; ``overlong``: ``"truncate"`` (default) or ``"drop"`` (see the module docstring).
    - Held out: the examples of ``heldout_paths`` if given (training examples with the same prompt as a held-out one
      are dropped, counted and warned of), else a ``heldout_fraction`` of ``paths`` chosen by a hash of ``seed`` and
      the prompt (``_heldout_split``). ``heldout_fraction=0`` gives empty held-out rows.
    - ``prompt_only``: ``paths`` may hold prompts alone (`SFTExample.prompt_only`: training reads them so where the
      student answers every prompt, ``train.on_policy`` 1); held out they have nothing to score: dropped, counted and
      warned of (``heldout_paths`` need responses as ever). Otherwise they are refused, naming file and line.
    - ``info``: settings, the resolved rendering, per-split counts (examples, rows, tokens, response tokens, fill)
      and the examples truncated / dropped. Deterministic: the same inputs give the same rows.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise TailkdError(f"--seq-len must be a positive whole number of tokens, got {seq_len!r}")
    if mode not in SFT_MODES:
        raise TailkdError(f"SFT mode {mode!r} is not one of {', '.join(SFT_MODES)}")
    if overlong not in OVERLONG:
        raise TailkdError(f"overlong={overlong!r} is not one of {', '.join(OVERLONG)}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise TailkdError(f"heldout_fraction={heldout_fraction} must lie in [0, 1); 0.05 is usual")
    template = resolve_chat_template(tokenizer, chat_template)
    examples = read_sft_examples(paths, references_optional=prompt_only, hint="" if prompt_only else PROMPTS_ALONE_HINT)
    overlap = 0
    if heldout_paths:
        held = read_sft_examples(heldout_paths)
        held_keys = {e.prompt_key() for e in held}
        train = [e for e in examples if e.prompt_key() not in held_keys]
        overlap = len(examples) - len(train)
        if not train:
            raise TailkdError("every training example's prompt is also in the held-out files; give distinct data")
        if overlap:
            warnings.warn(f"SFT data: {overlap} of {len(examples)} training example(s) dropped: their prompt is also "
                          "in the held-out files (a prompt is never on both sides of the split)", stacklevel=2)
    else:
        train, held = _heldout_split(examples, float(heldout_fraction), seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)

    splits, counts = {}, {}
    for name, exs in (("train", train), ("heldout", held)):
        c = {"truncated": 0, "dropped_overlong": 0, "dropped_no_response": 0,
             **({"dropped_prompt_only": 0} if name == "heldout" else {})}
        kept, encoded = _encode_all(tokenizer, exs, template, seq_len, overlong, c)
        if name == "train" and not kept:
            raise TailkdError(f"no training example keeps a response token within --seq-len {seq_len}; use a larger "
                              "--seq-len or shorter prompts")
        if c.get("dropped_prompt_only"):
            warnings.warn(f"SFT data: {c['dropped_prompt_only']} held-out example(s) hold a prompt alone, which the "
                          "held-out metrics cannot score: not used (--heldout-data FILE gives held-out responses)",
                          stacklevel=2)
        splits[name] = SFTRows(kept, encoded, seq_len=seq_len, mode=mode, pad_id=pad_id, chat_template=template)
        counts[name] = c
    cut = {k: counts["train"][k] + counts["heldout"][k] for k in counts["train"]}  # the keys both splits count
    if cut["truncated"] or cut["dropped_overlong"] or cut["dropped_no_response"]:
        warnings.warn(f"SFT data: {cut['truncated']} example(s) truncated to --seq-len {seq_len} (end of the "
                      f"response lost), {cut['dropped_overlong']} dropped as too long, {cut['dropped_no_response']} "
                      "dropped with no response token left; raise --seq-len to keep them whole", stacklevel=2)
    info = {"mode": mode, "seq_len": seq_len, "rendering": "chat" if template else "plain",
            "chat_template": template, "overlong": overlong, "seed": seed,
            "heldout_source": "files" if heldout_paths else f"fraction {heldout_fraction}",
            "dropped_train_overlap": overlap,
            **{f"{name}": {**splits[name].stats(), **counts[name]} for name in splits}}
    return splits["train"], splits["heldout"], info


BUILTIN_SFT = ("builtin:math", "builtin:instruct")


def builtin_sft_files(name: str, data_cfg, cache_root: Path) -> tuple[Path, Path]:
    """``(train.jsonl, heldout.jsonl)`` of the built-in SFT set ``name``, written into ``cache_root`` on first use:
    ``builtin:math``, the GSM-style math problems (`tailkd.mathdata`; ``data.math_train``/``data.math_heldout``),
    or ``builtin:instruct``, AlpacaEval's instructions with reference answers (`tailkd.instructdata`;
    ``data.instruct_heldout``/``data.instruct_max_words``)."""
    if name == "builtin:math":
        from tailkd.mathdata import default_math_dataset

        math = default_math_dataset(cache_root, n_train=data_cfg.math_train, n_heldout=data_cfg.math_heldout)
        return math.train, math.heldout
    if name == "builtin:instruct":
        from tailkd.instructdata import default_instruct_dataset

        inst = default_instruct_dataset(cache_root, heldout=data_cfg.instruct_heldout,
                                        max_words=data_cfg.instruct_max_words)
        return inst.train, inst.heldout
    raise _unknown_builtin(name)


def _unknown_builtin(name: str) -> TailkdError:
    return TailkdError(f"unknown built-in data {name!r}; the built-in SFT sets are {', '.join(BUILTIN_SFT)}")


def check_sft_files(data_cfg, *, prompt_only: bool) -> None:
    """Read the JSONL files of an SFT run's ``data.paths`` and ``data.heldout_paths`` as `setup_sft_rows` reads them
    (the built-in sets are tailkd's own), so that a bad line is refused, naming file and line, before any model loads;
    ``prompt_only`` as there; a built-in name that is not one of them is refused as there."""
    if unknown := [p for p in map(str, data_cfg.paths) if p.startswith("builtin:") and p not in BUILTIN_SFT]:
        raise _unknown_builtin(unknown[0])
    paths = [Path(p) for p in data_cfg.paths if not str(p).startswith("builtin:")]
    if paths:
        read_sft_examples(paths, references_optional=prompt_only, hint="" if prompt_only else PROMPTS_ALONE_HINT)
    if held := [Path(p) for p in data_cfg.heldout_paths if not str(p).startswith("builtin:")]:
        read_sft_examples(held)


def chat_template_setting(value: str) -> str | None:
    """``data.chat_template`` as `prepare_sft` / `resolve_chat_template` take it: ``"auto"``, None for ``"none"``,
    else the text of the template file it names."""
    if value == "none":
        return None
    if value == "auto":
        return value
    tfile = Path(value)
    if not tfile.is_file():
        raise TailkdError(f"data.chat_template {value!r} is neither auto, none nor a template file; pass a .jinja file")
    text = utf8_text(tfile, f"data.chat_template {value}", "save it as UTF-8")
    if not text.strip():
        raise TailkdError(f"data.chat_template {value} is empty; write a Jinja chat template in it, or pass auto or "
                          "none")
    return text


def setup_sft_rows(data_cfg, tokenizer, cache_root: Path, *, prompt_only: bool = True) -> tuple[SFTRows, SFTRows,
                                                                                                   dict]:
    """The trainer's entry point for ``data.task = sft``: rows from ``data.paths`` (JSONL files, and the built-in
    sets ``builtin:math`` / ``builtin:instruct``, `builtin_sft_files`), the built-in math problems when no path is
    given. Held out: ``data.heldout_paths`` if given; else the built-in sets' own held-out files when a built-in set
    is used (JSONL files given beside it are then all training data); else a ``data.heldout_fraction`` of the files.
    Held-out rows must not be empty. ``prompt_only`` (`prepare_sft`'s): training files may hold prompts alone — what
    a fully on-policy run trains on (a run below λ = 1 reads them strictly; evaluations read a run's data as
    given)."""
    paths, builtin_held = [], []
    for p in data_cfg.paths or ["builtin:math"]:
        if str(p).startswith("builtin:"):
            train_file, held_file = builtin_sft_files(str(p), data_cfg, cache_root)
            paths.append(train_file)
            builtin_held.append(held_file)
        else:
            paths.append(Path(p))
    held = [Path(p) for p in data_cfg.heldout_paths] or builtin_held or None
    train_rows, held_rows, info = prepare_sft(
        paths, tokenizer, seq_len=data_cfg.seq_len, mode=data_cfg.sft_mode,
        chat_template=chat_template_setting(data_cfg.chat_template),
        heldout_fraction=data_cfg.heldout_fraction, heldout_paths=held, seed=data_cfg.split_seed,
        overlong=data_cfg.overlong, prompt_only=prompt_only)
    if len(held_rows) == 0 and info["heldout"]["dropped_prompt_only"]:
        raise TailkdError(f"the SFT held-out split holds prompts alone ({info['heldout']['dropped_prompt_only']}), "
                          "which the held-out metrics cannot score; pass --heldout-data FILE with responses (e.g. "
                          "the teacher's: tailkd seqkd-data)")
    if len(held_rows) == 0:
        raise TailkdError("the SFT held-out split is empty; pass --heldout-data FILE or raise data.heldout_fraction")
    if len(train_rows) == 0:
        raise TailkdError("no SFT training examples are left; check data.paths and data.seq_len")
    return train_rows, held_rows, info
