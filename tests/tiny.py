"""Tiny offline assets for end-to-end tests: a byte-level BPE tokenizer, a random teacher, a corpus."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A bushfire near the town forced hundreds of residents to leave their homes.",
    "The council met on Monday to discuss the new budget for roads and schools.",
    "Scientists measured the temperature of the lake every morning for a year.",
    "The team won the final match after a long and difficult season.",
    "Rain is expected across the southern coast later this week.",
    "The museum opened a new exhibition of paintings from the last century.",
    "Farmers said the dry winter had reduced the size of the harvest.",
]


def corpus_text(n_docs: int = 60, seed: int = 0) -> str:
    """Blank-line separated documents of a few sentences each (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        idx = torch.randint(0, len(SENTENCES), (4,), generator=g).tolist()
        docs.append(" ".join(SENTENCES[i] for i in idx))
    return "\n\n".join(docs) + "\n"


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def make_teacher_dir(path: Path, *, layers: int = 4, hidden: int = 64, seed: int = 0, train_steps: int = 60) -> Path:
    """A tiny Llama teacher + tokenizer saved as an HF folder (safetensors).

    It is first trained for ``train_steps`` CLM steps on ``corpus_text()`` so that it has a peaked,
    text-like next-token distribution worth distilling (a random teacher is nearly uniform).
    """
    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    if train_steps:
        ids = torch.tensor(tok(corpus_text(200, seed=seed + 1))["input_ids"])
        n = (len(ids) - 1) // 33
        rows = ids[: n * 33].view(n, 33)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(train_steps):
            batch = rows[torch.randint(0, n, (8,), generator=g)]
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_corpus(path: Path, n_docs: int = 60) -> Path:
    path.write_text(corpus_text(n_docs))
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def dead_pid() -> int:
    """The pid of a process that has exited (for a dead writer's leftovers)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@contextlib.contextmanager
def no_model_loads(before: str):
    """Within the block `tailkd.models.load_teacher` and `load_causal_lm` fail the test ("a model was loaded before
    BEFORE"): for a command that must refuse its input before any model loads. Undone at the block's end."""
    from tailkd import models

    def loaded(*args, **kwargs):
        raise AssertionError(f"a model was loaded before {before}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_teacher", loaded)
        mp.setattr(models, "load_causal_lm", loaded)
        yield
