"""``tailkd seqkd-data``: sequence-level KD data (Kim & Rush 2016; SeqKD, a baseline of the TAD paper's Table 1):
the teacher's own responses to the prompts of JSONL files, written as prompt/response JSONL that
``tailkd distill --task sft`` trains a student on — with ``--loss clm`` SeqKD as published (the student fine-tuned
on teacher-generated sequences), with a divergence the teacher also scores its own tokens.

- Prompts: every example of ``data.paths`` (`tailkd.sft.read_sft_examples`, responses optional: ``{"prompt": ...}``
  alone; a chat's messages up to its last turn, `seqkd_prompt`: an assistant reply there is replaced, a history
  ending in a user turn is answered — earlier assistant turns stay the dataset's, and SFT trains on every assistant
  turn), in reading order (the first ``seqkd.limit``), rendered as ``tailkd distill`` renders them
  (``data.chat_template``: the tokenizer's template by default; train with the same setting), so that the responses
  train under the rendering they were generated in. Only the tokenizer's ids are generated (a padded LM head's rows
  past them are suppressed).
- Decoding (`tailkd.generation.generate_tokens`: batched, left-padded, a KV cache): greedy at ``seqkd.temperature``
  0 (the teacher's mode, which Kim & Rush approximate with beam search: no beam search here), else sampled at that
  temperature with nucleus ``seqkd.top_p`` and no top-k cut, ``seqkd.samples`` responses per prompt from a seeded,
  forked RNG; each stops at EOS or the template's end-of-turn, or after ``seqkd.max_new_tokens``. Such an unfinished
  response is dropped unless ``seqkd.keep_unfinished`` (training ends every response with an EOS, which the teacher
  did not write there). The text is decoded without special tokens and without its stop token: training renders it.
  A response whose text is empty or blank (the teacher stopped at once) is dropped and counted: nothing to train on.
- Output, ``seqkd.out``, written whole or not at all (a temporary folder renamed into place), and replaced only
  where it is new, empty or an earlier seqkd-data output (it holds ``seqkd.json``): ``responses.jsonl``, one line
  per response, the example's own form with the teacher's response in place of its reference (``{"prompt",
  "response"}``, or ``{"messages"}`` ending in the assistant turn); ``seqkd.json``, the settings, counts and tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

from tailkd import jsonfile
from tailkd.command_config import SeqkdDataConfig
from tailkd.errors import TailkdError

__all__ = ["seqkd_data", "seqkd_line", "seqkd_prompt"]


def seqkd_prompt(example, chat: bool):
    """What the teacher answers of ``example`` (`tailkd.sft.SFTExample`): a pair's prompt (a one-turn chat where
    ``chat``); a chat's messages up to its last turn, that turn left out where it is the assistant's (the reply
    replaced), kept where it is not (a history ending in a user turn asks that turn)."""
    if not example.is_chat:
        return example.generation_prompt(chat)
    messages = [dict(m) for m in example.messages]
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def seqkd_line(example, response: str) -> dict:
    """The JSONL object of ``example`` (`tailkd.sft.SFTExample`) answered with ``response``, in its own form."""
    if example.is_chat:
        return {"messages": [*seqkd_prompt(example, True), {"role": "assistant", "content": response}]}
    return {"prompt": example.prompt, "response": response}


def seqkd_data(cfg: SeqkdDataConfig) -> dict:
    """``tailkd seqkd-data``: see the module docstring. Returns seqkd.json's contents."""
    from tailkd import models, sft
    from tailkd.checkpoint import atomic_write_dir, check_replaceable
    from tailkd.distributed import resolve_device
    from tailkd.generation import generate_tokens
    from tailkd.vocab import real_vocab_size

    o = cfg.seqkd
    out = Path(o.out)
    check_replaceable(out, "seqkd.json", "seqkd-data")
    examples = sft.read_sft_examples([Path(p) for p in cfg.data.paths], references_optional=True)
    examples = examples[:o.limit] if o.limit else examples
    template = sft.resolve_chat_template(models.read_tokenizer(cfg.teacher.path),  # before the weights load
                                         sft.chat_template_setting(cfg.data.chat_template))
    chat = next((ex for ex in examples if ex.is_chat), None)
    if template is None and chat is not None:  # as training refuses it (`tailkd.sft.encode_example`)
        raise TailkdError(f"{chat.source}: chat messages need a chat template; use --data.chat_template auto with a "
                          "tokenizer that has one, or pass a template file")
    empty = next((ex for ex in examples if not (ex.is_chat or ex.prompt.strip())), None)
    if empty is not None:
        raise TailkdError(f'{empty.source}: the "prompt" is empty; remove the line or give the question')
    dev = resolve_device(o.device, "seqkd.device")
    teacher, tokenizer = models.load_teacher(cfg.teacher.path, device=dev, dtype=cfg.teacher.dtype)
    prompts = [seqkd_prompt(ex, template is not None) for ex in examples]
    t0 = time.perf_counter()
    sampled = o.temperature > 0
    outputs = generate_tokens(teacher, tokenizer, prompts, max_new_tokens=o.max_new_tokens, batch_size=o.batch_size,
                              do_sample=sampled, temperature=o.temperature if sampled else 1.0, top_p=o.top_p,
                              num_return_sequences=o.samples, seed=o.seed, chat_template=template,
                              vocab=real_vocab_size(tokenizer))
    seconds = time.perf_counter() - t0
    lines, unfinished, empty, tokens = [], 0, 0, 0
    for example, completions in zip(examples, outputs):
        for ids, stopped in completions:
            tokens += len(ids) + stopped  # the stop token was generated too
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if not text.strip():  # nothing to train on (distill refuses an empty response)
                empty += 1
                continue
            if not stopped:
                unfinished += 1
                if not o.keep_unfinished:
                    continue
            lines.append(seqkd_line(example, text))
    if not lines:
        raise TailkdError(f"no response to keep: {empty} empty, {unfinished} reached seqkd.max_new_tokens="
                          f"{o.max_new_tokens} without ending (raise --max-new-tokens, or pass --keep-unfinished true)")
    result = {"teacher": cfg.teacher.path, "data": list(cfg.data.paths), "chat_template": cfg.data.chat_template,
              "decoding": f"sampled (temperature {o.temperature}, top-p {o.top_p}, seed {o.seed})" if sampled
              else "greedy", "samples": o.samples, "max_new_tokens": o.max_new_tokens,
              "keep_unfinished": o.keep_unfinished, "prompts": len(examples), "responses": len(lines),
              "unfinished": unfinished, "empty": empty, "generated_tokens": tokens,
              "generation_seconds": round(seconds, 3)}

    def write(tmp: Path) -> None:
        (tmp / "responses.jsonl").write_text("".join(jsonfile.dumps(line) + "\n" for line in lines), encoding="utf-8")
        (tmp / "seqkd.json").write_text(jsonfile.dumps(result, indent=1), encoding="utf-8")

    atomic_write_dir(out, write)
    dropped = (f"; {unfinished} unfinished at {o.max_new_tokens} tokens " + ("kept" if o.keep_unfinished else
                                                                              "dropped") if unfinished else "") + \
        (f"; {empty} empty dropped" if empty else "")
    rendering = "" if cfg.data.chat_template == "auto" else f" --data.chat_template {cfg.data.chat_template}"
    print(f"{len(lines)} responses to {len(examples)} prompts ({tokens} tokens, {tokens / max(seconds, 1e-9):.0f} "
          f"tokens/s{dropped}): {out / 'responses.jsonl'} (train on it with the same rendering: tailkd distill "
          f"--task sft --data {out / 'responses.jsonl'}{rendering} --loss clm, SeqKD as published, or with a "
          "divergence)")
    return result
