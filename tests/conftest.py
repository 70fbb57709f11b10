"""Shared fixtures: a tiny byte-level tokenizer and seeded tiny causal LMs (no hub, no files)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # processes the tests start dump their stacks on a fatal signal
# pytest -n N (pytest-xdist, the README's test command): N worker processes share the cores. Each gets a thread pool of
# its share, for itself and the processes it starts (OMP_NUM_THREADS), unless the caller set one: N pools of all the
# cores would oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _THREADS = max(1, _CORES // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)
if not torch.cuda.is_available():  # tailkd's Triton kernels run interpreted on the CPU (tests/test_kernels.py); set
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (torch.compile's inductor does)


def refuse_new_files_in(monkeypatch, folder) -> None:
    """Creating a file in ``folder`` fails with EACCES (``os.open`` with O_CREAT), as in a folder without write
    permission or on a read-only file system: the tests run as root, whom chmod -w refuses nothing."""
    import errno
    from pathlib import Path

    real_open = os.open

    def no_permission(path, flags, *a, **kw):
        if Path(path).parent == Path(folder) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_permission)


def triton_interpreter_problem():
    """Why tailkd's Triton kernels cannot run interpreted on this CPU machine, or None where they can (or where CUDA
    is visible: there they run compiled). Triton's interpreter up to 3.6 takes a runtime loop bound (the kernels'
    ``range(0, V, BLOCK)``) as a one-element numpy array and calls ``int()`` on it, which numpy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.7 passes a scalar. The test extras
    do not ask for triton >= 3.7 (CUDA builds of torch pin their own triton: torch 2.11 pins 3.6); this names the
    mismatch where an environment pairs an older triton with a newer numpy (the GPU machine's image: triton 3.6,
    numpy 2.5); a fresh CPU install gets the newest triton."""
    import numpy
    import triton
    from packaging.version import Version

    if torch.cuda.is_available():
        return None
    if Version(triton.__version__).release < (3, 7) and Version(numpy.__version__).release >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot run the kernels with numpy {numpy.__version__} "
                "(needs triton >= 3.7, or numpy < 2.4)")
    return None


@pytest.fixture
def triton_kernels():
    """`tailkd.kernels` where its kernels can run here (compiled on CUDA, interpreted on the CPU); skips where triton
    is not installed or its interpreter cannot run them (`triton_interpreter_problem`)."""
    from tailkd import kernels

    if not kernels.available():
        pytest.skip("triton is not installed")
    if triton_interpreter_problem():
        pytest.skip(triton_interpreter_problem())
    return kernels


# 256 byte symbols + len(TINY_MERGES) merged tokens + len(TINY_SPECIALS) special tokens.
TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
TINY_SPECIALS = ["<|endoftext|>", "<|pad|>"]
TINY_VOCAB = 256 + len(TINY_MERGES) + len(TINY_SPECIALS)  # 262


def build_tiny_tokenizer(merges=TINY_MERGES):
    """A byte-level BPE tokenizer: the 256 byte symbols, `merges`, then the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=TINY_SPECIALS[0], bos_token=TINY_SPECIALS[0], pad_token=TINY_SPECIALS[1]
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny byte-level tokenizer (len == TINY_VOCAB); treat it as read-only."""
    return build_tiny_tokenizer()


_TINY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    # 4 experts, 2 per token; save_pretrained writes the checkpoint format (one tensor per expert and projection)
    "mixtral": ("MixtralConfig", {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2}),
}


def rotated_qk(model, x, head_dim: int, apply_rotary_pos_emb, layer: int = 1):
    """q and k of ``model``'s decoder layer ``layer`` for inputs ``x`` [1, T, d] at positions 0..T-1, after its RoPE
    (``apply_rotary_pos_emb`` of the model's family), as [1, heads, T, head_dim] each."""
    attn = model.model.layers[layer].self_attn
    positions = torch.arange(x.shape[1])[None]
    q = attn.q_proj(x).view(1, x.shape[1], -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, x.shape[1], -1, head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(x, positions)
    return apply_rotary_pos_emb(q, k, cos, sin)


def make_tiny_lm(family="llama", *, seed=0, **overrides):
    """A seeded tiny causal LM of `family` (llama, qwen2, mistral, mixtral, gpt2), float32, eval mode.

    Defaults: vocab TINY_VOCAB, hidden 64, 4 layers, 4 heads (2 KV heads), MLP 128, 128 positions.
    Every parameter (norm weights and biases included) is redrawn from N(0, 0.1) (norm weights
    1 + N(0, 0.1)), so a tensor that is not copied cannot equal its source by accident.
    `overrides` go to the config (use the family's own names, e.g. `n_embd` for gpt2).
    """
    import transformers

    if family == "gpt2":
        kwargs = {"vocab_size": TINY_VOCAB, "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 128,
                      "bos_token_id": 0, "eos_token_id": 0}
        config_cls = transformers.GPT2Config
    elif family in _TINY_CONFIGS:
        name, extra = _TINY_CONFIGS[family]
        kwargs = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=0, pad_token_id=None, **extra)
        config_cls = getattr(transformers, name)
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            is_norm_weight = param.ndim == 1 and name.endswith("weight")
            param.copy_(1.0 + noise if is_norm_weight else noise)
    return model.eval()


@pytest.fixture
def tiny_lm():
    """The factory `make_tiny_lm(family="llama", *, seed=0, **config_overrides)`."""
    return make_tiny_lm


@pytest.fixture(scope="session")
def smollm2():
    """The real built-in teacher (SmolLM2-135M-Instruct, float32, CPU, frozen) and its tokenizer.

    Loaded from tailkd's own cache ($TAILKD_CACHE, else ~/.cache/tailkd), as `tailkd distill` loads it:
    `scripts/setup.sh` converts the GGUF there once, and the cache keeps one entry per GGUF content (a
    conversion into a temporary folder per session cost ~25-40 s of every CI run).
    """
    from tailkd.models import load_teacher

    return load_teacher("smollm2")
