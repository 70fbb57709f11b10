"""Loss layer forward + backward on one GPU, side by side in one run: tailkd dense, tailkd fused (torch row kernels),
tailkd fused (Triton row kernels, `tailkd.kernels`: reading the bf16 logits as the matmul wrote them, the default,
and ``_f32`` on a float32 copy of each chunk's logits, as before that change; ``_1024x4`` with every kernel pass at
1024 columns x 4 warps, the one launch before `kernels.CUDA_LAUNCH` chose per pass; ``_two_stage``, TAD only, with
its pass-1 top-K in two stages, the A/B of `kernels.TAD_TWO_STAGE`) and Liger's compiled chunked loss (if
liger_kernel imports).

  python bench/bench_gpu.py --out bench/results/gpu_loss_layer            # N=8192, V=151936, d=2048: 41-49 s, H200
  python bench/bench_gpu.py --rows 4 --methods tailkd_dense tailkd_fused_triton liger \
      --sweep-chunks --out bench/results/gpu_loss_layer_rows   # the same N as 4 rows of 2048 (training's rows)
  python bench/bench_gpu.py --device cpu --tokens 64 --vocab 1000 --hidden 64 --allow-missing --out /tmp/dry

Every cell computes, from final hidden states h_S, h_T [N, d] (bf16 on CUDA, under bf16 autocast as a training
step) and LM heads W_S (float32, trained), W_T (bf16): both sides' logits, CLM + divergence (kd; tad K=10, β=2; jsd
β=0.5) averaged over the N tokens, and the gradients of h_S and W_S. The labels of tailkd's fused cells are a host
tensor, as the trainer passes them (the chunk plan then reads no device data and the call never waits for the
device: until 2026-12-04 they were on the device, and the plan's nonzero/unique waited); dense and Liger get them
on the device. tailkd's fused cells use the library's default
chunk (`tailkd.fused.chunk_tokens`: on CUDA the same for every loss, from free memory and the matmul shape, grown
to the whole N-token row where it fits); Liger gets the same chunk unless --liger-chunk says otherwise. Liger has no
TAD. ``--rows R``: the N tokens as R rows (sequences) of N / R: TAD's ᾱ is per row, and the chunk rule grows
chunks to whole rows, so at R = 4 (rows of 2048, as the end-to-end runs train) every loss gets 2048-token chunks
and TAD needs no statistics pass. Then (``--sweep-chunks``, on CUDA 1024 2048 4096 8192 by default) the Triton
fused kd and tad cells again at fixed chunk sizes, a table of its own with TAD/KD per chunk: the data for the CUDA
chunk rule's constants (`fused._GPU_CHUNK_ELEMENTS`). ``--profile``: then torch.profiler's per-op table of one fused
Triton kd and tad step (device time on CUDA): where the time beyond the matmuls goes; and the four head matmuls of
one chunk alone under each BLAS library (cublas, cublaslt): their TFLOP/s at these shapes, the layer's matmul floor
(also in OUT.json, "gemms").

Time: CUDA events around each forward + backward, after --warmup runs, median of --repeats (on the CPU: the host
clock), each call starting with the device idle. On CUDA each cell also gives "device" time (median of
--device-repeats): the call issued while the device sleeps (`time_device`), so that the events bracket its kernels
back to back — what a training step pays, the host running ahead — without the host's launch overhead, and the host's
issue time beside it; TAD / KD is given by both. Extra peak memory: torch.cuda.max_memory_allocated during one more
run minus the allocation before it (on the CPU: not measured, reported as null). Output: ``OUT.json`` (every cell,
the versions, the device) and ``OUT.md`` (the table).

Dry run on the CPU: the Triton cells run under Triton's interpreter (TRITON_INTERPRET=1 is set here before tailkd's
kernels are imported), so they check the wiring and the values, not the speed. Every cell that cannot run (Liger
not installed, triton missing, an error) is listed; the script then exits 1 unless --allow-missing is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from machine import versions  # bench/ is this script's folder

LOSSES = ("kd", "tad", "jsd")
METHODS = ("tailkd_dense", "tailkd_fused_torch", "tailkd_fused_triton_f32", "tailkd_fused_triton_1024x4",
           "tailkd_fused_triton", "tailkd_fused_triton_two_stage", "liger")


_LOW_LOGITS = None  # tailkd.fused._low_logits, restored after each cell (main sets it)
_CUDA_LAUNCH = None  # tailkd.kernels.CUDA_LAUNCH, likewise
_TWO_STAGE = False  # tailkd.kernels.TAD_TWO_STAGE, likewise


def _inputs(n, vocab, d, device, seed=0, rows=1):
    """h_S (requires grad), W_S (float32, requires grad), h_T, W_T, labels [rows, N / rows] (the N tokens as rows
    sequences) on the device, and the same labels on the host (the fused cells', as the trainer passes them: the chunk
    plan is then made without waiting for the device); bf16 hidden states and teacher head on CUDA."""
    g = torch.Generator().manual_seed(seed)
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    h_s = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(device, low).requires_grad_(True)
    h_t = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(device, low)
    w_s = (torch.randn(vocab, d, generator=g) * 2).to(device).requires_grad_(True)
    w_t = (torch.randn(vocab, d, generator=g) * 3).to(device, low)
    labels = torch.randint(0, vocab, (rows, n // rows), generator=g)
    return h_s, w_s, h_t, w_t, labels.to(device), labels


def _cfg(loss):
    from tailkd.config import LossConfig

    return LossConfig(name=loss, k=10, beta=2.0, jsd_beta=0.5)


def _tailkd(method, loss, inputs, mm_dtype):
    from tailkd import fused, kernels
    from tailkd import head as head_mod
    from tailkd.objective import chunked_objective, objective

    h_s, w_s, h_t, w_t, labels, host_labels = inputs
    n, vocab = h_s.shape[0], w_s.shape[0]
    h_s, h_t = h_s.view(*labels.shape, -1), h_t.view(*labels.shape, -1)  # [rows, N / rows, d]
    method, _, chunk = method.partition("@")  # "...@C": C-token chunks instead of the library's default
    if method == "tailkd_dense":
        s_logits = h_s @ w_s.T
        with torch.no_grad():
            t_logits = h_t @ w_t.T
        return objective(s_logits, labels, n, cfg=_cfg(loss), teacher_logits=t_logits).loss
    fused._TRITON_DEVICES = ("cuda", "cpu") if method.startswith("tailkd_fused_triton") else ()
    if method == "tailkd_fused_triton_f32":  # the kernels on a float32 copy of each chunk's logits (before bf16)
        fused._low_logits = lambda plan, head: False
    if method == "tailkd_fused_triton_1024x4":  # every pass at 1024 x 4, the one launch before kernels.CUDA_LAUNCH
        kernels.CUDA_LAUNCH = {kind: kernels.Launch(1024, 4) for kind in _CUDA_LAUNCH}
    if method == "tailkd_fused_triton_two_stage":  # TAD's top-K in two stages (restored after the cell)
        kernels.TAD_TWO_STAGE = not _TWO_STAGE
    spec = head_mod.HeadSpec(vocab)
    return chunked_objective(h_s, head_mod.Head(w_s, None, spec), host_labels, n, cfg=_cfg(loss),
                             teacher_hidden=h_t, teacher_head=head_mod.Head(w_t, None, spec),
                             matmul_dtype=mm_dtype, chunk_size=int(chunk) if chunk else None).loss


def _liger(loss, inputs, chunk):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    h_s, w_s, h_t, w_t, labels, _ = inputs
    beta = 0.0 if loss == "kd" else 0.5  # Liger's beta = 0: forward KL(p‖q), as tailkd's jsd endpoints
    fn = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=beta, compiled=h_s.is_cuda,
                                 chunk_size=chunk)
    return fn(h_s, w_s, h_t, w_t, labels.reshape(-1))  # the mean over the N tokens, as tailkd's


def _step(method, loss, inputs, mm_dtype, chunk):
    """One forward + backward; returns the loss (mean over the N tokens of CLM + divergence), detached: a device
    tensor, not read here, so that the call itself does not wait for the device (`time_device`)."""
    h_s, w_s = inputs[0], inputs[1]
    with torch.autocast(h_s.device.type, dtype=torch.bfloat16, enabled=h_s.is_cuda):
        value = _liger(loss, inputs, chunk) if method == "liger" else _tailkd(method, loss, inputs, mm_dtype)
    value.backward()
    h_s.grad = w_s.grad = None
    return value.detach()


def _cell_skip(method, loss, device):
    """Why a cell cannot run here, or None."""
    if method == "tailkd_fused_triton_two_stage" and loss != "tad":
        return "n/a"  # the A/B of TAD's pass 1: the other losses run the same kernels as tailkd_fused_triton
    if method == "liger":
        if loss == "tad":
            return "n/a"  # Liger has no TAD: not a missing cell
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"liger_kernel not importable ({type(exc).__name__}: {exc})"
    if method.startswith("tailkd_fused_triton"):
        from tailkd import kernels

        if not kernels.available():
            return "triton not installed (pip install tailkd[kernels])"
    return None


def time_once(fn, device) -> float:
    """Seconds one call of fn takes: CUDA events on CUDA (synchronised), the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_SLEEP_HZ = {}  # device -> torch.cuda._sleep's cycles per second (calibrated once)
_LEAD_S, _LEAD_MAX_S = 0.005, 0.2  # `device_times`: the device's first head start, and the longest tried


def _sleep_hz(device) -> float:
    if device not in _SLEEP_HZ:
        torch.cuda.synchronize(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(20_000_000)
        b.record()
        torch.cuda.synchronize(device)
        _SLEEP_HZ[device] = 20e6 / (a.elapsed_time(b) / 1e3)
    return _SLEEP_HZ[device]


def time_device(fn, device, lead_s: float) -> tuple[float, float] | None:
    """(device seconds, host seconds) of one call of fn on CUDA: fn is issued while the device sleeps for lead_s
    (`torch.cuda._sleep` queued first), so the events bracket its kernels run back to back — the cost a training
    step pays when the host runs ahead of the device — without the host's launch overhead, which `time_once` also
    counts where the host is slower than the device (many small kernels); the host seconds are those it took to
    issue fn. None where issuing took longer than the sleep (fn waits for the device, or lead_s is too short): the
    figure would then hold host time."""
    torch.cuda.synchronize(device)
    slept, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    slept.record()
    torch.cuda._sleep(int(lead_s * _sleep_hz(device)))
    start.record()
    t0 = time.perf_counter()
    fn()
    issue = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize(device)
    if issue >= 0.9 * slept.elapsed_time(start) / 1e3:
        return None
    return start.elapsed_time(end) / 1e3, issue


def time_device_covered(fn, device, lead_s: float = _LEAD_S) -> tuple[float, float, float] | None:
    """`time_device` with the head start doubled from lead_s until it covers the host's issuing (up to
    _LEAD_MAX_S): (device seconds, host seconds, the head start that covered it, for the next call); None off CUDA
    or where none does (fn waits for the device)."""
    if device.type != "cuda":
        return None
    while (r := time_device(fn, device, lead_s)) is None and lead_s < _LEAD_MAX_S:
        lead_s *= 2
    return None if r is None else (*r, lead_s)


def device_times(fn, device, repeats) -> dict | None:
    """Medians over repeats of `time_device_covered`: {"device_s", "issue_s"}; None where it has no figure."""
    got, lead = [], _LEAD_S
    for _ in range(repeats):
        if (r := time_device_covered(fn, device, lead)) is None:
            return None
        got.append(r)
        lead = r[2]
    return {"device_s": statistics.median([g[0] for g in got]), "issue_s": statistics.median([g[1] for g in got])}


def _time(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    return [time_once(fn, device) for _ in range(repeats)]


def _peak(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_cell(method, loss, inputs, device, args, chunk):
    reason = _cell_skip(method, loss, device)
    if reason:
        return {"method": method, "loss": loss, "skipped": reason}
    mm = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":  # the cached blocks of earlier cells back to the driver: the library's chunk rule
        torch.cuda.empty_cache()  # reads the free memory, which they would shrink (cell to cell otherwise)
    used = None  # the chunk this cell runs with (tokens)
    if method == "liger" or "@" in method:
        used = int(method.split("@")[1]) if "@" in method else chunk
    elif method != "tailkd_dense":
        from tailkd import fused

        h_s, w_s = inputs[0], inputs[1]
        used = fused.device_chunk(device, w_s.shape[0], h_s.shape[1], mm or torch.float32, inputs[4].shape[1])
    fn = lambda: _step(method, loss, inputs, mm, chunk)  # noqa: E731
    dev = None
    try:
        value = float(fn())
        times = _time(fn, device, args.warmup, args.repeats)
        peak = _peak(fn, device)
        try:  # a diagnostic beside the headline time: its failure must not lose the cell
            dev = device_times(fn, device, args.device_repeats)
        except Exception as exc:  # noqa: BLE001
            dev = {"device_error": f"{type(exc).__name__}: {exc}"[:200]}
    except Exception as exc:  # noqa: BLE001
        return {"method": method, "loss": loss, "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        from tailkd import fused

        fused._TRITON_DEVICES = ("cuda",)
        fused._low_logits = _LOW_LOGITS
        if _CUDA_LAUNCH is not None:
            from tailkd import kernels

            kernels.CUDA_LAUNCH = _CUDA_LAUNCH
            kernels.TAD_TWO_STAGE = _TWO_STAGE
    return {"method": method, "loss": loss, "value": value, "median_s": statistics.median(times), "all_s": times,
            "peak_bytes": peak, "chunk": used, **(dev or {})}


def profile_steps(inputs, device, losses=("kd", "tad"), rows=30):
    """torch.profiler's table of one forward + backward of the fused Triton layer per loss (after one warm-up step),
    sorted by the ops' own device time (CPU time on the CPU): matmuls, the row kernels, casts, fills, copies."""
    from torch.profiler import ProfilerActivity, profile

    from tailkd import fused

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    mm = torch.bfloat16 if device.type == "cuda" else None
    for loss in losses:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            _step("tailkd_fused_triton", loss, inputs, mm, None)
            with profile(activities=activities) as prof:
                _step("tailkd_fused_triton", loss, inputs, mm, None)
        finally:
            fused._TRITON_DEVICES = ("cuda",)
        print(f"== profile: tailkd_fused_triton, {loss}, one forward + backward (sorted by {key})")
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)


def gemm_rates(inputs, device, chunk, warmup=3, repeats=10):
    """The fused layer's four head matmuls of one ``chunk``-token chunk alone, as `tailkd.fused` issues them (student
    and teacher logits in bf16; grad_h = G·W_S and grad_W += Gᵀ·h_S with float32 output, `fused._matmul_into`), timed
    under each BLAS library torch offers here (``torch.backends.cuda.preferred_blas_library``: cublas, cublaslt):
    their TFLOP/s at these shapes, and their sum over the N tokens, the layer's matmul floor to set beside its time.
    Returns rows of dicts (printed as a table)."""
    from tailkd import fused

    h_s, w_s, h_t, w_t = inputs[:4]
    n, d = min(chunk, h_s.shape[0]), h_s.shape[1]
    v = w_s.shape[0]
    mm = torch.bfloat16 if device.type == "cuda" else torch.float32
    hs, ht, ws, wt = h_s.detach()[:n].to(mm), h_t[:n].to(mm), w_s.detach().to(mm), w_t.to(mm)
    g = torch.randn(n, v, dtype=mm, device=device) / v  # a logit gradient's scale (random data: realistic power draw)
    grad_h = torch.empty(n, d, dtype=torch.float32, device=device)
    grad_w = torch.zeros(v, d, dtype=torch.float32, device=device)
    gemms = {"student logits h_S·W_Sᵀ": lambda: hs @ ws.T, "teacher logits h_T·W_Tᵀ": lambda: ht @ wt.T,
             "grad_h = G·W_S (fp32 out)": lambda: fused._matmul_into(grad_h, g, ws, accumulate=False),
             "grad_W += Gᵀ·h_S (fp32 out)": lambda: fused._matmul_into(grad_w, g.T, hs, accumulate=True)}
    libs = [None]
    if device.type == "cuda":
        libs = ["cublas", "cublaslt"]
        before = torch.backends.cuda.preferred_blas_library()
    wide = set(fused._WIDE_OUT)  # a library without the float32-output addmm drops it from here: restored per library
    rows = []
    try:
        for lib in libs:
            if lib is not None:
                torch.backends.cuda.preferred_blas_library(lib)
            fused._WIDE_OUT.update(wide)
            total = 0.0
            for name, fn in gemms.items():
                sec = statistics.median(_time(fn, device, warmup, repeats))
                total += sec
                if "fp32 out" in name and mm != torch.float32 and device.type not in fused._WIDE_OUT:
                    name = name.replace("fp32 out", "bf16 product + upcast: no fp32-output addmm here")
                rows.append({"blas": lib or "cpu", "gemm": name, "ms": sec * 1e3, "tflops": 2 * n * d * v / sec / 1e12})
            rows.append({"blas": lib or "cpu", "gemm": f"all four x {h_s.shape[0] / n:g} chunks (N tokens)",
                         "ms": total * 1e3 * h_s.shape[0] / n, "tflops": 8 * n * d * v / total / 1e12})
    finally:
        fused._WIDE_OUT.update(wide)
        if device.type == "cuda":
            torch.backends.cuda.preferred_blas_library(before)
    print(f"== the head matmuls alone, one {n}-token chunk (d={d}, V={v}), median of {repeats}")
    print("| blas | matmul | ms | TFLOP/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['blas']} | {r['gemm']} | {r['ms']:.2f} | {r['tflops']:.3g} |")
    return rows


def _check_values(cells, device):
    """Every cell's loss must equal tailkd_dense's for the same loss, else the cell becomes an error (a cell that is
    fast because it computes something else is no result). Tolerance: on CUDA the logits are bf16 matmul outputs
    (unit roundoff 2^-8 = 3.9e-3 relative per logit), rounded at different places by each method, so the mean loss
    may differ by a few 1e-3 relative: 2e-2; on the CPU everything is float32 (1e-7 relative per operation, rows
    summed over V ≤ 1e4 terms): 1e-4."""
    rtol = 2e-2 if device.type == "cuda" else 1e-4
    for loss in LOSSES:
        ref = next((c for c in cells if c["loss"] == loss and c["method"] == "tailkd_dense" and "value" in c), None)
        for c in cells:
            if ref is None or c is ref or c["loss"] != loss or "value" not in c:
                continue
            if not abs(c["value"] - ref["value"]) <= rtol * abs(ref["value"]):
                c["error"] = f"loss {c['value']:.6g} differs from tailkd_dense's {ref['value']:.6g} (rtol {rtol})"


def _versions():
    return {"torch": torch.__version__, "python": platform.python_version(),
            **versions("triton", "liger-kernel", "transformers")}


def _ok(cell) -> bool:
    return bool(cell) and "median_s" in cell and "error" not in cell


def _device_text(cell) -> str:
    """A cell's device time (`device_times`) for the tables: ' [device X ms, issued in Y ms]', or why not."""
    if "device_s" in cell:
        return f" [device {cell['device_s'] * 1e3:.1f} ms, issued in {cell['issue_s'] * 1e3:.1f} ms]"
    if "device_error" in cell:
        return f" [device time: {cell['device_error']}]"
    return ""


def _ratio(a, b) -> str:
    """a / b by wall time, and by device time where both have it."""
    wall = f"{a['median_s'] / b['median_s']:.3f}"
    return f"{wall}; {a['device_s'] / b['device_s']:.3f}" if "device_s" in a and "device_s" in b else wall


def _markdown(result):
    rows = result.get("rows", 1)
    methods = result.get("methods", METHODS)
    shape = "one row" if rows == 1 else f"{rows} rows of {result['tokens'] // rows}"
    lines = [f"{result['date']}; device: {result['device']}; N={result['tokens']} ({shape}), V={result['vocab']}, "
             f"d={result['hidden']}, "
             f"default chunk at the start {result['chunk']} tokens "
             f"(Liger {result.get('liger_chunk', result['chunk'])}); "
             "each cell's chunk is in its cell (the library's rule reads the free memory then); versions "
             f"{result['versions']}", "",
             "| loss | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for loss in LOSSES:
        row = []
        for m in methods:
            c = next(c for c in result["cells"] if c["loss"] == loss and c["method"] == m)
            if "median_s" in c and "error" not in c:
                mem = "" if c["peak_bytes"] is None else f", {c['peak_bytes'] / 2**30:.1f} GiB"
                used = "" if c.get("chunk") is None else f", chunk {c['chunk']}"
                row.append(f"{c['median_s'] * 1e3:.1f} ms{_device_text(c)}{mem}{used} (loss {c['value']:.6g})")
            else:
                row.append(c.get("skipped") or "ERROR " + c["error"])
        lines.append(f"| {loss} | " + " | ".join(row) + " |")
    ratios = []
    for m in methods:
        got = {c["loss"]: c for c in result["cells"] if c["method"] == m}
        if m == "tailkd_fused_triton_two_stage":  # its kd is tailkd_fused_triton's (the A/B changes TAD alone)
            got["kd"] = next((c for c in result["cells"] if c["method"] == "tailkd_fused_triton"
                              and c["loss"] == "kd"), None)
        if _ok(got.get("kd")) and _ok(got.get("tad")):
            ratios.append(f"{m} {_ratio(got['tad'], got['kd'])}")
    if ratios:
        lines += ["", "TAD / KD (wall; device): " + ", ".join(ratios)]
    sweep = sorted({int(c["method"].split("@")[1]) for c in result["cells"] if "@" in c["method"]})
    if sweep:
        lines += ["", "Chunk sweep, tailkd fused (Triton kernels):", "",
                  "| chunk tokens | kd | tad | tad / kd (wall; device) |", "|---|---|---|---|"]
        for size in sweep:
            got = {c["loss"]: c for c in result["cells"] if c["method"] == f"tailkd_fused_triton@{size}"}
            text = []
            for loss in ("kd", "tad"):
                c = got.get(loss, {})
                ok = _ok(c)
                mem = "" if not ok or c["peak_bytes"] is None else f", {c['peak_bytes'] / 2**30:.1f} GiB"
                text.append(f"{c['median_s'] * 1e3:.1f} ms{_device_text(c)}{mem}" if ok else f"ERROR {c.get('error')}")
            ratio = _ratio(got["tad"], got["kd"]) if _ok(got.get("kd")) and _ok(got.get("tad")) else "—"
            lines.append(f"| {size} | {text[0]} | {text[1]} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=1,
                    help="the N tokens as ROWS sequences of N / ROWS tokens (default 1: one row; TAD's ᾱ is per row, "
                         "and the chunk rule grows chunks to whole rows)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                    help="only these columns, tailkd_dense among them (each cell's loss is checked against it; "
                         "default: all)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 on CUDA, 1 on the CPU")
    ap.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 1 on the CPU")
    ap.add_argument("--device-repeats", type=int, default=5,
                    help="CUDA: calls timed again with the device given a head start (`time_device`: its kernels "
                         "back to back, without the host's launch overhead), median in each cell as 'device'")
    ap.add_argument("--out", required=True, help="path prefix: writes OUT.json and OUT.md")
    ap.add_argument("--allow-missing", action="store_true", help="exit 0 even when a cell is skipped or fails")
    ap.add_argument("--liger-chunk", type=int, default=None,
                    help="Liger's chunk in tokens (default: tailkd's, the fused layer's default chunk)")
    ap.add_argument("--profile", action="store_true",
                    help="at the end, print torch.profiler's table of one fused Triton kd and tad step (by device "
                         "time per op: where the time beyond the matmuls goes) and time the head matmuls alone "
                         "under cublas and cublaslt")
    ap.add_argument("--sweep-chunks", type=int, nargs="*", default=None,
                    help="chunk sizes for the Triton fused kd/tad sweep (default on CUDA: 1024 2048 4096 8192)")
    args = ap.parse_args(argv)
    if args.methods and "tailkd_dense" not in args.methods:
        ap.error("--methods must include tailkd_dense (each cell's loss is checked against it)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is visible; use --device cpu for the dry run")
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before tailkd.kernels is imported: the Triton cells interpreted
    args.warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    args.repeats = args.repeats if args.repeats is not None else (10 if device.type == "cuda" else 1)
    from tailkd import fused

    global _LOW_LOGITS, _CUDA_LAUNCH, _TWO_STAGE
    _LOW_LOGITS = fused._low_logits
    from tailkd import kernels

    if kernels.available():
        _CUDA_LAUNCH = dict(kernels.CUDA_LAUNCH)
        _TWO_STAGE = kernels.TAD_TWO_STAGE
    if args.rows < 1 or args.tokens % args.rows:
        sys.exit(f"--rows {args.rows} must divide --tokens {args.tokens}")
    inputs = _inputs(args.tokens, args.vocab, args.hidden, device, rows=args.rows)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    chunk = fused.chunk_tokens(device.type, args.vocab, args.hidden, free, torch.bfloat16, args.tokens // args.rows)
    t0 = time.perf_counter()
    cells = []
    sweep = args.sweep_chunks if args.sweep_chunks is not None else ([1024, 2048, 4096, 8192] if device.type ==
                                                                      "cuda" else [])
    methods = args.methods or METHODS
    runs = [(m, loss) for loss in LOSSES for m in methods]
    runs += [(f"tailkd_fused_triton@{c}", loss) for c in sweep for loss in ("kd", "tad")]
    liger_chunk = args.liger_chunk or chunk
    for method, loss in runs:
        cell = run_cell(method, loss, inputs, device, args, liger_chunk if method == "liger" else chunk)
        cells.append(cell)
        print(json.dumps({k: v for k, v in cell.items() if k != "all_s"}), flush=True)
    _check_values(cells, device)  # before the files are written: a cell that fails it is an error there too
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"device": name, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "chunk": chunk,
              "liger_chunk": liger_chunk, "rows": args.rows, "methods": list(methods),
              "versions": _versions(), "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - t0,
              "cells": cells}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    table = _markdown(result)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table)
    if args.profile:
        profile_steps(inputs, device)
        result["gemms"] = gemm_rates(inputs, device, chunk)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
    missing = [c for c in cells if "error" in c or ("skipped" in c and c["skipped"] != "n/a")]
    if missing and not args.allow_missing:
        print(f"{len(missing)} cell(s) skipped or failed: " + "; ".join(
            f"{c['method']}/{c['loss']}: {c.get('skipped') or c['error']}" for c in missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
