"""The paper configs' students: the parameter counts their comments state are the counts of the students they
build, computed from the teachers' published shapes on the meta device (no weights, no memory)."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tailkd.flops import model_size
from tailkd.student import student_config

REPO = Path(__file__).resolve().parents[1]
# The teachers' config.json values that set parameter counts (from their model cards / config files).
TEACHERS = {
    "/models/Qwen1.5-1.8B": (Qwen2ForCausalLM, Qwen2Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, tie_word_embeddings=False)),
    "/models/Qwen2.5-3B": (Qwen2ForCausalLM, Qwen2Config(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, tie_word_embeddings=True)),
    "/models/phi-2": (PhiForCausalLM, PhiConfig(
        vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
        partial_rotary_factor=0.4, tie_word_embeddings=False)),
    "/models/gemma-2-9b": (Gemma2ForCausalLM, Gemma2Config(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256)),
}
COUNTS = re.compile(r"student: ([\d.]+)B parameters, ([\d.]+)B non-embedding\s+\(teacher: ([\d.]+)B, ([\d.]+)B")
PAPER = sorted(p for p in (REPO / "configs").glob("paper-*.yaml") if COUNTS.search(p.read_text()))


def test_the_paper_configs_state_their_counts():
    names = {p.name for p in PAPER}
    assert {"paper-qwen-1.8b.yaml", "paper-qwen-1.8b-0.5b.yaml", "paper-phi2.yaml", "paper-qwen2.5-3b.yaml",
            "paper-gemma2-9b.yaml"} <= names


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_stated_counts_are_the_built_students(path):
    doc = yaml.safe_load(path.read_text())
    cls, cfg = TEACHERS[doc["teacher"]["path"]]
    with torch.device("meta"):
        teacher = cls(cfg)
    s = doc["student"]
    options = {k: s[k] for k in ("num_layers", "layers", "hidden_size", "num_heads", "num_kv_heads",
                                 "intermediate_size", "head_dim") if k in s}
    student = model_size(student_config(teacher, **options))
    t = model_size(teacher)
    stated = [float(x) for x in COUNTS.search(path.read_text()).groups()]
    got = [student.params_total, student.params_nonembedding, t.params_total, t.params_nonembedding]
    assert [round(x / 1e9, 3) for x in got] == stated  # the comments round to the millions
