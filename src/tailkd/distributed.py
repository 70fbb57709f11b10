"""Devices and processes: data parallelism through torch.distributed (DDP, default, or FSDP2 for the student; the
teacher replicated, or sharded with FSDP2: `tailkd.sharded_teacher`), the device of each rank and its training
precision (bf16 autocast where it is native), and each rank's peak memory.

No engine of our own: DDP's bucketed all-reduce (or FSDP2's reduce-scatter) moves the gradients. This module
only starts the process group from the launcher's environment, wraps the student, and offers the few
collectives the training loop needs (a sum of numbers, a broadcast, one rank first), all of them no-ops in
one process.

Launch with ``torchrun`` or ``accelerate launch`` (both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); see README "Multi-GPU". Backend: NCCL on CUDA, gloo on the CPU.

Gradient scale. The objective divides the loss of a rank's micro-batch by the GLOBAL number of valid tokens
of the optimizer step (every micro-batch of every rank, summed by ``all_reduce`` before the first backward).
DDP and FSDP2 then AVERAGE the gradients over ranks, so the trainer multiplies each rank's loss by the world
size (``loss_scale()``): the reduced gradient is Σ_ranks ∇(Σ_tokens L / N_global), exactly the gradient of
one process that ran the whole global batch.

Checkpoints hold FULL state dicts keyed by parameter name (``full_state``), gathered to rank 0: the same
files for one process, DDP and FSDP, so a run can resume on a different number of processes. On resume
rank 0 reads them and broadcasts them tensor by tensor (``load_full_state``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from tailkd.config import PARALLEL_MODES, check_device_name
from tailkd.errors import TailkdError

_owned = False  # True when this module started the process group (and so ends it)


# --------------------------------------------------------------------------- who am I


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_world_size() -> int:
    """The world size the launcher asked for (``WORLD_SIZE``; 1 when started as a plain process)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise TailkdError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun") from None


def _check_accelerate_env() -> None:
    """``accelerate launch`` with a DeepSpeed or FSDP plugin config would be silently ignored: refuse it."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise TailkdError("accelerate launch with a DeepSpeed config is not supported: tailkd drives torch.distributed "
                          "itself; use a multi-GPU accelerate config (configs/accelerate/) and --train.parallel fsdp "
                          "for ZeRO-3-like sharding")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise TailkdError("accelerate launch with an FSDP config is not read by tailkd: use a multi-GPU accelerate "
                          "config (configs/accelerate/) and pass --train.parallel fsdp")


def setup(device_name: str, *, process_group: bool = False, timeout_s: float = 1800) -> torch.device:
    """Start the process group when launched with WORLD_SIZE > 1 and return this rank's device.

    ``device_name``: auto, cpu, cuda (or cuda:N in one process). With several processes on CUDA each rank
    uses ``cuda:LOCAL_RANK`` and NCCL; on the CPU gloo. ``process_group``: in a plain process too, start a
    group of one (an in-memory store, no port), for FSDP2, which needs one (``--teacher.parallel fsdp``).
    ``timeout_s``: how long a rank waits in one collective for the others before it fails (``train.ddp_timeout``;
    30 minutes, as HF Trainer's ``ddp_timeout``).
    """
    global _owned
    _check_accelerate_env()
    n = launched_world_size()
    if n <= 1 and not (dist.is_available() and dist.is_initialized()):
        device = resolve_device(device_name)
        if process_group:
            if not dist.is_available():
                raise TailkdError("this torch build has no torch.distributed, which FSDP2 needs; use "
                                  "--teacher.parallel replicate")
            if device.type == "cuda":
                device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timedelta(seconds=timeout_s))
            _owned = True
        return device
    if not dist.is_available():
        raise TailkdError("this torch build has no torch.distributed; run in one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise TailkdError(f"train.device={device_name} but no CUDA device is visible; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise TailkdError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                              "launch at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        resolve_device(device_name)  # validates the name
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        _owned = True
    return device


def shutdown() -> None:
    """End the process group if ``setup`` started it."""
    global _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned = False


def leave(code: int) -> NoReturn:
    """End this process now with exit status ``code``, skipping Python's interpreter finalization: for a rank of a
    multi-process run whose work is done (files written, process group ended by `shutdown`). The communication
    library's worker threads outlive ``destroy_process_group`` (gloo's keep running until the group's last
    reference goes); one that releases a tensor created in Python while the interpreter finalizes must take the GIL
    and aborts the process instead ("terminate called without an active exception", SIGABRT) — a failed exit after
    a run that succeeded, seen in CI in a gloo rank of a spawned test worker and of a resumed torchrun run. On the
    2-core CPU the same abort ends 2 of 12 ranks that exit with their group not destroyed while the peer's last
    collective is still with its worker threads (0 of 10 after ``destroy_process_group``, which the CI ranks did
    call: their case is not reproduced; 0 of 10 after destroying and leaving). stdout, stderr and logging are
    flushed first; tailkd registers no exit handlers and starts no threads of its own."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """The device of setting ``key`` (train.device, eval.device, ...) = ``name``: auto, cpu, cuda or cuda:N, a
    CUDA one only where that device is visible (a one-line error naming ``key`` otherwise)."""
    check_device_name(key, name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TailkdError(f"{key}={name} but no CUDA device is visible; use --device cpu")
        if name != "cuda" and int(name[5:]) >= count:
            raise TailkdError(f"{key}={name} but only {count} CUDA device(s) are visible: use cuda:0 to "
                              f"cuda:{count - 1}")
    return torch.device(name)


# --------------------------------------------------------------------------- small collectives


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def say(message: str, *, err: bool = False) -> None:
    """One line on rank 0 only (stdout, or stderr with ``err``), above a progress bar if one is shown."""
    if is_main():
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr if err else sys.stdout)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a short list of numbers over ranks (float64; one all_reduce)."""
    if world() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest of every rank's ``value`` (float64; one all_reduce)."""
    if world() == 1:
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (pickled)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key-wise sum of every rank's dict of CPU float64 tensors (a rank may hold an empty dict).

    Added in rank order, so every rank gets the same bits. Used for evaluation: sums all-reduced, then
    divided once, so metrics do not depend on the number of processes.
    """
    if world() == 1:
        return sums
    parts: list = [None] * world()
    dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in sums.items()})
    total: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total[key] + value if key in total else value.clone()
    return total


def raise_if_any(error: BaseException | None) -> None:
    """Collective: if any rank passes an error, every rank raises a TailkdError (so no rank waits forever)."""
    if world() == 1:
        if error is not None:
            raise error
        return
    messages: list = [None] * world()
    dist.all_gather_object(messages, None if error is None else str(error) or type(error).__name__)
    if error is not None:
        raise error
    for r, msg in enumerate(messages):
        if msg is not None:
            raise TailkdError(f"{msg} (on rank {r})")


def on_main_then_all(fn, *, main_only: bool = False):
    """Run ``fn()`` on rank 0 first (e.g. to fill a cache once), then on the other ranks (unless ``main_only``).

    An error on rank 0 is raised on every rank. Returns ``fn()``'s result (None where it did not run).
    """
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - handed to every rank, then re-raised here
            error = exc
    raise_if_any(error)
    if not is_main() and not main_only:
        result = fn()
    return result


def peak_memory(device: torch.device) -> int:
    """This process's peak memory in bytes: on CUDA ``torch.cuda.max_memory_allocated`` (tensors on the device),
    on the CPU the peak resident set size — on Linux ``VmHWM`` of /proc/self/status, the high-water mark of this
    process's own memory (``getrusage``'s ru_maxrss is not: Linux carries it across execve, so a run started by
    a process that once held more — a test runner, a notebook, a benchmark driver — reported that peak), elsewhere
    ``getrusage(RUSAGE_SELF).ru_maxrss`` (macOS counts it in bytes, others in KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    own = _vm_hwm()
    if own is not None:
        return own
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _vm_hwm() -> int | None:
    """``VmHWM`` of /proc/self/status in bytes (Linux), None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory_per_rank(device: torch.device) -> list[int]:
    """Collective: `peak_memory` of every rank, in rank order (on every rank)."""
    mine = peak_memory(device)
    if world() == 1:
        return [mine]
    parts: list = [None] * world()
    dist.all_gather_object(parts, mine)
    return [int(p) for p in parts]


def memory_kind(device: torch.device) -> str:
    """What `peak_memory` measures on ``device``, in words (for logs and summary.json)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "peak RSS (VmHWM)" if _vm_hwm() is not None else "peak RSS (getrusage ru_maxrss)"


# --------------------------------------------------------------------------- the student under DDP / FSDP2


def loss_scale() -> float:
    """Factor on each rank's loss so that DDP's / FSDP's gradient AVERAGE over ranks becomes a SUM."""
    return float(world())


def wrap_student(student: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """The module to run forward/backward on: ``student`` itself in one process, else DDP or FSDP2.

    FSDP2 (``fully_shard``) shards every decoder layer (the classes in ``_no_split_modules``) and the root
    in place; it needs torch >= 2.6. Build the optimizer AFTER this call.
    """
    if world() == 1:
        return student
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if parallel == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise TailkdError(f"--train.parallel fsdp needs torch >= 2.6 (FSDP2), this is {torch.__version__}; "
                              "use --train.parallel ddp") from None
        layer_classes = set(getattr(student, "_no_split_modules", None) or [])
        for module in student.modules():
            if type(module).__name__ in layer_classes:
                fully_shard(module)
        fully_shard(student)
        return student
    raise TailkdError(f"train.parallel={parallel!r} is not a mode; choose one of {', '.join(PARALLEL_MODES)}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DDP wrapper (FSDP2 shards in place, so there is nothing to unwrap)."""
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


def grad_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch's backward: ``sync=False`` skips the gradient reduction (accumulate
    locally, DDP ``no_sync``), ``sync=True`` (the step's last micro-batch) reduces everything accumulated."""
    if world() == 1:
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else model.no_sync()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Collective: (model, optimizer) FULL state dicts keyed by parameter name, on the CPU, on rank 0
    (other ranks get empty dicts). The same layout for one process, DDP and FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    had_state = bool(optimizer.state)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if not had_state:
        # get_state_dict initialises an optimizer that never stepped with a zero-gradient step (AdamW: step 1,
        # zero moments); undo it, or the next real update would differ from a run that saved no checkpoint.
        optimizer.state.clear()
        if optim_state:
            optim_state["state"] = {}
    return _retie(model, model_state), optim_state


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optim_state: dict, *, optimizer_stepped: bool) -> None:
    """Collective: load full state dicts (as written by ``full_state``) that only rank 0 holds (the other ranks
    pass empty dicts): rank 0 broadcasts them tensor by tensor and FSDP keeps only its shard, so no other rank
    needs a copy of the whole checkpoint in memory. ``optimizer_stepped``: False when the checkpoint was saved
    before the first optimizer update (its optimizer state is empty)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=True, broadcast_from_rank0=world() > 1)
    # Two calls: set_state_dict would skip the model on ranks holding an empty dict. Both rewrite the dicts
    # they are given (keys and values): hand them shallow copies.
    set_model_state_dict(model, dict(model_state), options=options)
    set_optimizer_state_dict(model, optimizer, dict(optim_state), options=options)
    if not optimizer_stepped:
        optimizer.state.clear()  # drop set_state_dict's zero-gradient initialisation (see full_state)


def full_model_state(model: torch.nn.Module) -> dict:
    """Collective: the model's full state dict on rank 0 (CPU); empty on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return _retie(model, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def _retie(model: torch.nn.Module, state: dict) -> dict:
    """Tied parameters (one parameter under several names, e.g. embeddings and LM head) gathered as separate
    copies share one tensor again, so that they are saved once, as in one process."""
    first: dict[int, str] = {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        if id(param) in first and name in state and first[id(param)] in state:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)
    return state


# --------------------------------------------------------------------------- precision


NATIVE_BF16_ENV = "TAILKD_NATIVE_BF16"  # 0 / 1: override the detection below (e.g. 0 tests the fp32 path of CPUs
#                                       without native bf16 on a CPU that has it)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products natively (CUDA sm_80+ or ROCm; CPUs with AVX512-BF16 or AMX).

    ``TAILKD_NATIVE_BF16=0`` (or ``1``) in the environment replaces the detection, so that ``precision: auto``
    takes the fp32 path (or bf16) whatever the hardware."""
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise TailkdError(f"{NATIVE_BF16_ENV}={forced!r} must be 0 (no native bf16: fp32 by default) or 1; "
                              "unset it to detect the hardware")
        return forced == "1"
    if device.type == "cuda":  # without emulation: torch's default also says yes where bf16 is emulated (sm_70)
        return torch.cuda.is_bf16_supported(including_emulation=False)  # (the current device: each rank's own)
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in probes)


def autocast_dtype(precision: str, device: torch.device):
    """bf16 autocast for ``precision`` bf16, or auto where the hardware has native bf16; else None (fp32)."""
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None
