"""A teacher sharded over the ranks with FSDP2 (``--teacher.parallel fsdp``), loaded so that no rank ever holds all
of its weights.

Loading (`load_sharded_teacher`; collective: every rank calls it, also a single process, through FSDP2):

1. Skeleton: the model class built from ``config.json`` with every PARAMETER on the meta device (no memory) while
   every BUFFER is computed for real by the model's own ``__init__`` (`_params_on_meta`): rotary ``inv_freq`` and
   the like come out exactly as in a normal load, with no per-architecture code. Persistent buffers present in
   the checkpoint are then read from it.
2. ``fully_shard`` (FSDP2) on every decoder layer (the classes of the model's ``_no_split_modules``), on the input
   embedding when it is not tied to the head, then on the root; ``reshard_after_forward=True`` everywhere (the
   root too: a teacher never runs a backward that would reuse its gathered weights), ``requires_grad`` False,
   the shards stored, gathered and computed in the teacher dtype (``--teacher.dtype``: bf16 on CUDA by default; an
   fp32 teacher stays fp32: the ``MixedPrecisionPolicy`` casts nothing). The LM head is in ``ignored_params``:
   replicated (below). A tied input embedding IS the head's tensor, so it is replicated with it: one tensor, read
   once.
3. ``to_empty(device)``: each rank allocates its shards only: FSDP2 shards dim 0 (``Shard(0)``) as ``torch.chunk``
   does, so rank r owns rows ``[r·c, min(n, (r+1)·c))`` of a tensor of n rows, ``c = ceil(n / W)`` (an empty
   chunk on the last ranks when W > n); no dimension has to divide by W, and the number of layers does not matter
   either (each layer is sharded, not assigned to a rank). The buffers computed in step 1 are put back.
4. Fill: for every parameter, ``safe_open(file).get_slice(name)[start:end]`` reads this rank's rows only, straight
   into its local shard; the file is opened per tensor so that its memory map (mapped pages count in the RSS) is
   released after each tensor. Peak host memory per rank ≈ its shards + one tensor's rows (+ the replicated head).

The teacher must be a folder of safetensors files (``model.safetensors`` or an index and shards): a folder with
``pytorch_model*.bin`` only is refused (a pickle cannot be read by slices; re-save it with ``save_pretrained``).
Checkpoints whose tensor names are not the model's (transformers 5 converts them on load and back on save: a mixture
of experts' per-expert tensors into one [E, ...] tensor per projection, renamed modules) are read through those same
conversions (`_Checkpoint`): a renamed tensor by slices as any other, a converted one whole (all its sources: one
layer's experts), then sliced, so a rank's peak while loading is its shards + one such tensor.
The built-in teacher and ``.gguf`` files are converted once into tailkd's plain safetensors cache
(`tailkd.models.model_dir`; the conversion dequantizes the GGUF, on rank 0, whole: the GGUF is the small
quantized form) and loaded from there shard by shard.

LM head: REPLICATED (``ignored_params``), not gathered per call. At the fused loss layer's peak the full head is in
memory either way (the chunked loss multiplies by all V rows), so gathering it per step (``DTensor.full_tensor()``)
saves nothing at the peak: it adds the all-gather's buffers and one all-gather of V·d per micro-batch, and saves
only the (W−1)/W of the head that a replicated copy holds between steps. Measured on the CPU (2 gloo ranks; a
4-layer Llama, d=512, V=32,000, untied, fp32: 173 MB, its head 65.5 MB; peak RSS per rank above the baseline,
through loading, one no-grad forward of 256 tokens and one 64-token chunk of head logits): 251 MB with the head
replicated vs 349 MB sharded and gathered per call (after loading alone: 120 vs 87 MB). The fused layer
(`tailkd.fused`) and the teacher cache read the head as the plain tensor it then is (`tailkd.head.model_head`),
unchanged. Cost: V·d·2 bytes per rank in bf16 (Llama-3 70B: 128,256 × 8,192 × 2 B = 2.1 GB; untied, its input
embedding is sharded, gathered for the lookup only).

Building a student from a sharded teacher (`student_source`): the student is initialised from a skeleton whose
only real tensors are those the student copies (the chosen layers, embeddings, final norm, head), read whole from
the files, so a rank holds the student's share of the teacher, never the teacher. A student whose layers, channels,
heads, MLP units or experts are chosen from calibration rows (`tailkd.calibration`) is measured on the sharded
teacher first, loaded before the student then (`tailkd.prepare.calibrate_sharded_teacher`): the skeleton holds the
layers that pass chose, and a rank holds its shards and that skeleton while the student is built.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from tailkd import distributed as dist
from tailkd import models
from tailkd.errors import TailkdError

__all__ = ["is_sharded", "load_sharded_teacher", "local_numel", "placement", "shard_rows", "student_source",
           "teacher_folder"]


# --------------------------------------------------------------------------- the folder and its tensors


def teacher_folder(spec, cache_dir=None) -> Path:
    """The safetensors folder of a teacher spec (the built-in and ``.gguf`` files: their converted cache, made on the
    first call: call it on rank 0 first), or a one-line TailkdError: a folder without safetensors is refused."""
    path = models.model_dir(spec, cache_dir)
    models.read_config(path)
    if not models.safetensors_files(path):
        bins = sorted(p.name for p in path.glob("*.bin"))
        found = f"only {', '.join(bins)}" if bins else "no weights"
        raise TailkdError(f"teacher.parallel=fsdp reads the teacher's safetensors files slice by slice, and {path} "
                          f"has {found}: re-save it with save_pretrained (safetensors) or use "
                          "--teacher.parallel replicate")
    return path


def _weight_map(folder: Path) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it}."""
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for file in models.safetensors_files(folder):
        with safe_open(str(file), "pt") as fh:
            out.update(dict.fromkeys(fh.keys(), file))
    return out


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a tensor of ``n`` rows that rank ``rank`` of ``world`` holds under FSDP2's dim-0
    sharding (``torch.chunk``: chunks of ceil(n / W) rows, the last ones shorter or empty)."""
    c = math.ceil(n / world) if n else 0
    start = min(n, rank * c)
    return start, min(n, start + c)


def _read(files: dict[str, Path], name: str, rows: tuple[int, int] | None, shape) -> torch.Tensor:
    """Tensor ``name`` (rows ``[start, end)`` of dim 0 with ``rows``) read from its file, whose shape must be
    ``shape`` (None: as stored). The file is opened for this tensor only: its memory map goes when it is read."""
    from safetensors import safe_open

    if name not in files:
        raise TailkdError(f"the teacher's safetensors files have no tensor {name!r}, which its model class expects, "
                          "nor tensors that transformers' conversions for this architecture turn into it: "
                          "use --teacher.parallel replicate (from_pretrained reads the folder)")
    with safe_open(str(files[name]), "pt") as fh:
        sl = fh.get_slice(name)
        stored = tuple(sl.get_shape())
        if shape is not None and stored != tuple(shape):
            raise TailkdError(f"tensor {name} of {files[name]} has shape {stored}, its model class expects "
                              f"{tuple(shape)}: the folder's config.json and weights do not match")
        if rows is None:
            return sl[:] if stored else fh.get_tensor(name)
        return sl[rows[0]:rows[1]]


class _Checkpoint:
    """The teacher folder's tensors by the model's own names: stored under them, or under the names of the checkpoint
    format that transformers converts on load (`transformers.conversion_mapping`, the same conversions
    ``from_pretrained`` applies; ``save_pretrained`` writes that format back): a renamed tensor is read by slices,
    a converted one (a mixture's per-expert tensors stacked and concatenated) whole from all its sources, then
    sliced. The conversion plan is built from the model before FSDP2 swaps its classes, only where a name is
    missing from the files."""

    def __init__(self, folder: Path, model):
        self.files = _weight_map(folder)
        expected = model.state_dict()
        self._plan = self._conversions(model, expected) if set(expected) - set(self.files) else {}
        self._model, self._done = model, {}

    def _conversions(self, model, expected: dict) -> dict:
        """{model name: (converter or None for a renaming, [(source pattern, checkpoint name), ...])}."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        plan: dict = {}
        for key in sorted(self.files, key=dot_natural_key):  # experts in index order, as from_pretrained
            renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
            if renamed != key and renamed in expected:
                plan.setdefault(renamed, (by_pattern.get(pattern), []))[1].append((pattern, key))
        return plan

    def has(self, name: str) -> bool:
        return name in self.files or name in self._plan

    def read(self, name: str, rows: tuple[int, int] | None, shape) -> torch.Tensor:
        """Tensor ``name`` of the model (rows ``[start, end)`` with ``rows``), of shape ``shape`` (see `_read`)."""
        if name in self.files or name not in self._plan:
            return _read(self.files, name, rows, shape)
        converter, sources = self._plan[name]
        if converter is None:  # stored under another name
            return _read(self.files, sources[0][1], rows, shape)
        value = self._done.pop(name, None)
        if value is None:
            import copy

            op = copy.deepcopy(converter)  # a fresh copy per target, as from_pretrained
            for pattern, key in sources:
                op.add_tensor(name, key, pattern, _read(self.files, key, None, None))
            self._done = op.convert(name, model=self._model, config=self._model.config)
            value = self._done.pop(name)  # other targets of the same sources (a split) wait for their read
        if tuple(value.shape) != tuple(shape):
            raise TailkdError(f"tensor {name}, converted from {sources[0][1]} and {len(sources) - 1} more, has shape "
                              f"{tuple(value.shape)}, its model class expects {tuple(shape)}: the folder's config.json "
                              "and weights do not match")
        return value if rows is None else value[rows[0]:rows[1]]


# --------------------------------------------------------------------------- the skeleton


@contextlib.contextmanager
def _params_on_meta():
    """Within: every parameter a module registers goes to the meta device (it never takes memory; one that already
    is, e.g. a tied weight registered twice, is kept as is, so ties stay), every buffer stays real, as
    accelerate's ``init_empty_weights(include_buffers=False)`` does."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kept = module._parameters[name]
            module._parameters[name] = torch.nn.Parameter(kept.to("meta"), requires_grad=kept.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _skeleton(folder: Path, dtype: torch.dtype):
    """The teacher's model class from its config, parameters on meta, buffers real (on the CPU), eval mode, frozen;
    its generation_config read from the folder (`tailkd.student.build_student` passes it on to the student)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = models.read_config(folder)
    with _params_on_meta(), models.per_layer_refusal(folder):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if model.can_generate():
        try:  # as from_pretrained: the folder's generation_config.json, else (none, unreadable) the config's
            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        except OSError:
            pass
    model.eval()
    model.requires_grad_(False)
    return models.autocast_safe(model)


def _read_saved_buffers(model, files: _Checkpoint, persistent: set, skipped: tuple[str, ...] = ()) -> None:
    """Copy into ``model`` the buffers it saves (``persistent``: its state_dict's names; GLM-4.5's expert score
    correction) that the folder holds, as from_pretrained loads them; none under a ``skipped`` prefix."""
    for name, b in model.named_buffers():
        if name in persistent and not name.startswith(skipped) and files.has(name):
            b.copy_(files.read(name, None, b.shape))


def _decoder_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the decoder layers (the outermost modules of the classes of ``_no_split_modules``: Mamba's
    lists its mixer beside its block), in order."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ in classes]
    layers = [(n, m) for n, m in layers if not any(n.startswith(f"{outer}.") for outer, _ in layers)]
    if not layers:
        raise TailkdError(f"{type(model).__name__} names no decoder layer class (_no_split_modules), so FSDP2 cannot "
                          "shard it layer by layer: use --teacher.parallel replicate")
    return layers


def _set_param(model, name: str, value: torch.Tensor, aliases: dict[str, list[str]]) -> None:
    """Make ``value`` (a frozen Parameter) the parameter ``name`` and every name tied to it."""
    param = torch.nn.Parameter(value, requires_grad=False)
    for alias in aliases.get(name, [name]):
        owner, _, attr = alias.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = param


def _aliases(model) -> dict[str, list[str]]:
    """{first name of a parameter: all its names} (tied weights have several)."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(p), name)
        out.setdefault(key, []).append(name)
    return out


def student_source(spec, student_cfg, *, dtype="auto", device="cpu", cache_dir=None, measured: dict | None = None):
    """``(teacher skeleton, tokenizer)`` to build the student from (`tailkd.student.build_student`) and check the
    vocabulary against, without loading the teacher: the skeleton's parameters are on meta except those a student built
    from it copies (every parameter outside the decoder layers and those of the layers the student keeps), read whole in
    the teacher dtype; their saved (persistent) buffers are read too. With ``student_cfg.path`` (an existing student)
    none is read. ``measured``: a calibration of the sharded teacher (`tailkd.student.calibrate`), which chooses the
    layers where it measured their influence (`tailkd.calibrated.calibrated_layers`)."""
    from tailkd.calibrated import calibrated_layers
    from tailkd.layer_choice import layer_needs, layer_period, student_layers
    from tailkd.multimodal import text_teacher
    from tailkd.sizing import config_family, family_spec

    folder = teacher_folder(spec, cache_dir)
    model = _skeleton(folder, models.resolve_dtype(dtype, device))
    tokenizer = models.load_tokenizer(folder)
    if student_cfg.path:
        return model, tokenizer
    text = text_teacher(model)  # a multimodal checkpoint's text part (Gemma 3's, Gemma 4's): the skeleton's modules
    layers = _decoder_layers(text)
    fam = config_family(text.config, family_spec(text))
    chosen = student_layers(text.config, fam, *calibrated_layers(measured or {}, student_cfg.depth, student_cfg.layers,
                                                                 layer_period(text.config, fam),
                                                                 layer_needs(text.config, fam)))
    dropped = {id(m) for i, (_, m) in enumerate(layers) if i not in set(chosen)}
    skipped = tuple(f"{name}." for name, m in model.named_modules() if id(m) in dropped)  # the checkpoint's names
    used = {id(t) for t in (*text.parameters(), *text.buffers())}  # a vision or audio tower stays on meta
    files, aliases = _Checkpoint(folder, model), _aliases(model)
    for name, p in list(model.named_parameters()):
        if id(p) in used and not name.startswith(skipped):
            _set_param(model, name, files.read(name, None, p.shape).to(p.dtype), aliases)
    with torch.no_grad():
        _read_saved_buffers(model, files, {n for n, b in model.named_buffers() if id(b) in used}
                            & set(model.state_dict()), skipped)
    return text, tokenizer


# --------------------------------------------------------------------------- the sharded teacher


def load_sharded_teacher(spec, *, device: torch.device, dtype="auto", cache_dir=None, log=None):
    """Collective: the teacher of ``spec`` sharded over the process group with FSDP2 (see the module docstring), eval
    mode, frozen. Needs a process group (`tailkd.distributed.setup`, with ``process_group=True`` in one process).
    ``log``: a function given one line (placement, this rank's shard, seconds)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise TailkdError("teacher.parallel=fsdp needs a process group: start it with "
                          "tailkd.distributed.setup(device, process_group=True)")
    t0 = time.perf_counter()
    device = torch.device(device)
    folder = teacher_folder(spec, cache_dir)
    torch_dtype = models.resolve_dtype(dtype, device)
    model = _skeleton(folder, torch_dtype)
    files = _Checkpoint(folder, model)  # before fully_shard, which swaps the model's classes
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    ignored = set(head.parameters()) if head is not None else set()
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    persistent = set(model.state_dict().keys())
    aliases = _aliases(model)  # to_empty unties tied parameters: tied again below
    model_class = type(model).__name__  # fully_shard swaps the class for FSDP<name>

    world = dist.world()
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch_dtype) if device.type == "cuda" else MixedPrecisionPolicy()
    options = {"mesh": mesh, "reshard_after_forward": True, "mp_policy": mp, "ignored_params": ignored}
    for _, layer in _decoder_layers(model):
        fully_shard(layer, **options)
    if embed is not None and not (set(embed.parameters()) & ignored):
        fully_shard(embed, **options)  # untied: gathered for the lookup only, not for the whole forward
    fully_shard(model, **options)
    model.to_empty(device=device)
    for name, names in aliases.items():
        if len(names) > 1:
            if is_dtensor(model.get_parameter(name)):
                raise TailkdError(f"{model_class} ties {', '.join(names)}, which FSDP2 would shard: "
                                  "use --teacher.parallel replicate")
            _set_param(model, name, model.get_parameter(name).detach(), aliases)

    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])  # computed by the model's own __init__ (rotary inv_freq, ...)
        _read_saved_buffers(model, files, persistent)
        for name, p in list(model.named_parameters()):
            if is_dtensor(p):
                local = p.to_local()
                rows = shard_rows(p.shape[0], dist.rank(), world)
                if local.shape[0] != rows[1] - rows[0]:  # FSDP2 changed its layout: never fill wrong rows silently
                    raise RuntimeError(f"{name}: local shard of {tuple(local.shape)}, expected rows {rows}")
                if local.numel():
                    local.copy_(files.read(name, rows, p.shape))
            else:  # the replicated LM head (and a tied input embedding: the same tensor, read once)
                p.copy_(files.read(name, None, p.shape))
        for name, names in aliases.items():  # ties kept: one tensor under every name
            if any(model.get_parameter(alias) is not model.get_parameter(name) for alias in names):
                raise RuntimeError(f"tied parameter {name} came apart from {names}")
    if log is not None:
        mine, total = local_numel(model), sum(p.numel() for p in model.parameters())
        log(f"teacher: {placement(model)} (FSDP2 per decoder layer; LM head replicated): this rank holds "
            f"{mine:,} of its {total:,} parameters, loaded from {folder} in {time.perf_counter() - t0:.1f} s")
    return model


def is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can be one
        return False
    return isinstance(x, DTensor)


def is_sharded(model) -> bool:
    """Whether ``model`` holds FSDP2-sharded parameters (a forward of it is then a collective)."""
    return model is not None and any(is_dtensor(p) for p in model.parameters())


def local_numel(model) -> int:
    """Parameters this rank holds: its shards plus the replicated tensors (each tied tensor once)."""
    return sum(p.to_local().numel() if is_dtensor(p) else p.numel() for p in model.parameters())


def placement(model) -> str:
    """How the teacher is placed, in words: "replicated" or "sharded over W ranks"."""
    if not is_sharded(model):
        return "replicated"
    w = dist.world()
    return f"sharded over {w} rank{'s' if w != 1 else ''}"
