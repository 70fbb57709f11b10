"""Loss layer forward+backward: tailkd dense vs fused, and peers (Liger, torchtune, TRL), time and peak memory.

Every method computes, from final hidden states h_S [N, d], h_T [N, d] and LM heads W_S, W_T [V, d]:
student + teacher logits, CLM + divergence, and the gradients of h_S and W_S.

  python bench/bench_fused.py --device cpu --vocab 32000 49152 151936 --tokens 256 1024 --hidden 256
  python bench/bench_fused.py --device cuda --vocab 151936 --tokens 8192 --hidden 2048 --max-elements 1e10  # GPU
  python bench/bench_fused.py --paired --methods tailkd_fused --losses kd tad tad_longrow --threads 1   # TAD/KD
  python bench/bench_fused.py --memory-only tailkd_fused --vocab 151936 --tokens 256 1024 4096   # memory vs N

tailkd's fused path gets ``chunk_size=--chunk`` (the same chunking for every loss: TAD/KD ratios compare like with
like); ``--fused-default-chunk`` passes ``chunk_size=None`` instead (the library default: ~2^24 logits per chunk,
and TAD grows chunks to whole sequences, up to 2^28 logits, to skip its teacher-statistics pass).
On a shared 2-core machine, ``--threads 1`` is the less disturbed measure: with 2 intra-op threads every parallel
region waits for the busy core (a scheduler tick), which penalises a loss by its NUMBER of operations, not its work.

Time: median of --repeats runs, methods interleaved within each repeat (same process, same inputs).
Peak memory: each (method, loss, V, N) runs once in a fresh subprocess. CPU: the process's peak RSS (VmHWM)
is reset through /proc/self/clear_refs after the inputs exist, and the reported number is VmHWM − VmRSS at that
point (what the loss layer adds, including the gradients it returns: [N, d] + [V, d]). CUDA:
torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the allocation before the call.
Peers are loaded from their PyPI packages: Liger's chunked loss (pure PyTorch, torch.func per chunk; Triton
kernels are not used here), torchtune's kd_losses / ce_chunked_output_loss modules (loaded by file: the
torchtune package __init__ pulls in tokenizer dependencies), TRL's GKDTrainer.generalized_jsd_loss.

A cell that is not measured — N·V above ``--max-elements`` (a CPU-time guard: raise it for large cells, as on the
GPU), a peer that cannot be imported (``--methods tailkd_dense tailkd_fused`` leaves the peers out), a memory
subprocess that fails, ``--device cuda`` without CUDA — is named on stderr and listed under ``not_measured`` in
``--out``, and the script exits 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from machine import describe, header  # bench/ is this script's folder

LOSSES = ("kd", "tad", "jsd", "tad_longrow")  # tad_longrow: one row of N tokens > chunk (TAD statistics pass)
PEERS = ("liger", "torchtune", "trl")
METHOD_NAMES = ("tailkd_dense", "tailkd_fused", *PEERS)
FUSED_DEFAULT_CHUNK = False  # --fused-default-chunk: tailkd_fused gets chunk_size=None (the library's default)
METHODS = None  # --methods: only these


# --------------------------------------------------------------------------- methods


def _peer_modules():
    mods = {}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        mods["liger"] = LigerFusedLinearJSDLoss
    except Exception as exc:  # noqa: BLE001
        mods["liger_error"] = f"{type(exc).__name__}: {exc}"
    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.submodule_search_locations:
        mods["torchtune_error"] = "ModuleNotFoundError: No module named 'torchtune'"
    else:
        base = os.path.join(next(iter(spec.submodule_search_locations)), "modules", "loss")
        try:
            for name in ("kd_losses", "ce_chunked_output_loss"):
                s = importlib.util.spec_from_file_location(f"_tt_{name}", os.path.join(base, f"{name}.py"))
                m = importlib.util.module_from_spec(s)
                s.loader.exec_module(m)
                mods[f"tt_{name}"] = m
        except Exception as exc:  # noqa: BLE001
            mods["torchtune_error"] = f"{type(exc).__name__}: {exc}"
    try:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        mods["trl"] = GKDTrainer.generalized_jsd_loss
    except Exception as exc:  # noqa: BLE001
        mods["trl_error"] = f"{type(exc).__name__}: {exc}"
    return mods


def methods_for(loss: str, mods: dict) -> list[str]:
    return [m for m in _methods_for(loss, mods) if METHODS is None or m in METHODS]


PEER_LOSSES = {"liger": ("kd", "jsd"), "torchtune": ("kd",), "trl": ("kd", "jsd")}  # what each peer measures


def unavailable(loss: str, mods: dict) -> list[tuple[str, str]]:
    """(peer, why) of each peer that measures ``loss`` (and that --methods asks for) but could not be loaded."""
    return [(m, mods[f"{m}_error"]) for m, losses in PEER_LOSSES.items()
            if loss in losses and f"{m}_error" in mods and (METHODS is None or m in METHODS)]


def _methods_for(loss: str, mods: dict) -> list[str]:
    out = ["tailkd_dense", "tailkd_fused"]
    if loss == "tad_longrow":
        return out
    if loss in PEER_LOSSES["liger"] and "liger" in mods:
        out.append("liger")
    if loss in PEER_LOSSES["torchtune"] and "tt_kd_losses" in mods:
        out.append("torchtune")
    if loss in PEER_LOSSES["trl"] and "trl" in mods:
        out.append("trl")
    return out


def not_measured(missing: list[str], why: str) -> None:
    """Name a cell that is not measured, on stderr, and keep it for --out and the exit status."""
    missing.append(why)
    print(f"NOT MEASURED: {why}", file=sys.stderr, flush=True)


def make_inputs(n, vocab, d, device, dtype, seed=0, seq_len=None):
    g = torch.Generator().manual_seed(seed)
    h_s = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(device, dtype)
    h_t = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(device, dtype)
    w_s = (torch.randn(vocab, d, generator=g) * 2).to(device, dtype)
    w_t = (torch.randn(vocab, d, generator=g) * 3).to(device, dtype)
    seq_len = seq_len or n
    labels = torch.randint(0, vocab, (n // seq_len, seq_len), generator=g).to(device)  # rows of seq_len tokens
    return h_s.requires_grad_(True), w_s.requires_grad_(True), h_t, w_t, labels


def _to_bf16(inputs):
    """GPU runs: bf16 hidden states and teacher head (as under autocast); the student head stays float32."""
    h_s, w_s, h_t, w_t, labels = inputs
    return h_s.detach().bfloat16().requires_grad_(True), w_s, h_t.bfloat16(), w_t.bfloat16(), labels


def run_once(method, loss, inputs, mods, *, chunk, mm_dtype):
    """One forward+backward; returns the loss value (float). CUDA: under bf16 autocast, as a training step."""
    if inputs[0].device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _run_once(method, loss, inputs, mods, chunk=chunk, mm_dtype=mm_dtype)
    return _run_once(method, loss, inputs, mods, chunk=chunk, mm_dtype=mm_dtype)


def _run_once(method, loss, inputs, mods, *, chunk, mm_dtype):
    from tailkd import head as head_mod
    from tailkd.config import LossConfig
    from tailkd.objective import chunked_objective, objective

    h_s, w_s, h_t, w_t, labels = inputs
    n, vocab = h_s.shape[0], w_s.shape[0]
    rows, seq_len = labels.shape
    h_s3, h_t3 = h_s.view(rows, seq_len, -1), h_t.view(rows, seq_len, -1)
    cfg = LossConfig(name=loss.removesuffix("_longrow"), k=10, beta=2.0, jsd_beta=0.5)
    if method == "tailkd_fused":
        spec = head_mod.HeadSpec(vocab)
        out = chunked_objective(h_s3, head_mod.Head(w_s, None, spec), labels, n, cfg=cfg, teacher_hidden=h_t3,
                                teacher_head=head_mod.Head(w_t, None, spec),
                                chunk_size=None if FUSED_DEFAULT_CHUNK else chunk, matmul_dtype=mm_dtype)
        value = out.loss
    elif method == "tailkd_dense":
        s_logits = h_s3 @ w_s.T  # (B, T, V)
        with torch.no_grad():
            t_logits = h_t3 @ w_t.T
        value = objective(s_logits, labels, n, cfg=cfg, teacher_logits=t_logits).loss
    elif method == "liger":
        beta = 0.0 if loss == "kd" else 0.5  # Liger: beta=0 is forward KL(p‖q), as tailkd's jsd endpoints
        fn = mods["liger"](weight_hard_loss=1.0, weight_soft_loss=1.0, beta=beta, compiled=h_s.is_cuda,
                           chunk_size=chunk)
        value = fn(h_s, w_s, h_t, w_t, labels.reshape(-1))
    elif method == "torchtune":
        n_chunks = max(1, seq_len // chunk)
        s_chunks = [c @ w_s.T for c in h_s3.chunk(n_chunks, dim=1)]  # torchtune: model emits chunked logits
        with torch.no_grad():
            t_chunks = [c @ w_t.T for c in h_t3.chunk(n_chunks, dim=1)]
        kd = mods["tt_kd_losses"].ForwardKLWithChunkedOutputLoss(num_output_chunks=n_chunks)
        ce = mods["tt_ce_chunked_output_loss"].CEWithChunkedOutputLoss(num_output_chunks=n_chunks)
        value = ce(s_chunks, labels) + kd(s_chunks, t_chunks, labels)
    elif method == "trl":
        s_logits = h_s @ w_s.T  # (N, V)
        with torch.no_grad():
            t_logits = h_t @ w_t.T
        beta = 0.0 if loss == "kd" else 0.5
        div = mods["trl"](s_logits, t_logits, labels=None, beta=beta, reduction="batchmean")  # [N, V]: Σ / N
        value = F.cross_entropy(s_logits, labels.reshape(-1)) + div
    else:
        raise ValueError(method)
    value.backward()
    h_s.grad = w_s.grad = None
    return float(value.detach())


# --------------------------------------------------------------------------- memory (one subprocess per cell)


def _status():
    text = open("/proc/self/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def worker(args) -> None:
    global FUSED_DEFAULT_CHUNK
    cell = json.loads(args.worker)
    FUSED_DEFAULT_CHUNK = bool(cell.get("fused_default_chunk"))
    if cell.get("threads"):
        torch.set_num_threads(cell["threads"])
    device = torch.device(cell["device"])
    mods = _peer_modules()
    dtype = torch.float32
    inputs = make_inputs(cell["n"], cell["vocab"], cell["d"], device, dtype, seq_len=cell["seq_len"])
    mm = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        inputs = _to_bf16(inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS
        base = _status()["VmRSS"]
    t0 = time.perf_counter()
    value = run_once(cell["method"], cell["loss"], inputs, mods, chunk=cell["chunk"], mm_dtype=mm)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status()["VmHWM"] - base
    print(json.dumps({"peak_bytes": peak, "value": value, "seconds": time.perf_counter() - t0}))


def measure_memory(cell: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(cell)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- timing (interleaved, one process)


def measure_time(pairs, n, vocab, d, device, repeats, chunk, mods, seq_lens) -> dict:
    """Median fwd+bwd time of every (loss, method) pair of one (V, N), all pairs interleaved in every repeat."""
    inputs = {sl: make_inputs(n, vocab, d, device, torch.float32, seq_len=sl) for sl in set(seq_lens.values())}
    mm = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        inputs = {sl: _to_bf16(inp) for sl, inp in inputs.items()}
    times = {pair: [] for pair in pairs}
    values = {}
    for loss, m in pairs:  # warm-up (and the values)
        values[(loss, m)] = run_once(m, loss, inputs[seq_lens[loss]], mods, chunk=chunk, mm_dtype=mm)
    for r in range(repeats):
        order = pairs[r % len(pairs):] + pairs[: r % len(pairs)]  # rotate: no pair always first
        for loss, m in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run_once(m, loss, inputs[seq_lens[loss]], mods, chunk=chunk, mm_dtype=mm)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[(loss, m)].append(time.perf_counter() - t0)
    return {pair: {"median_s": statistics.median(ts), "all_s": ts, "value": values[pair]} for pair, ts in times.items()}


def measure_paired(n, vocab, d, device, repeats, chunk, mods, seq_len, losses=LOSSES,
                   ref=("kd", "tailkd_fused")) -> dict:
    """Ratios t(pair) / t(ref) from back-to-back runs (order alternating), median over ``repeats`` pairs.

    A paired comparison cancels the slow drift of a shared machine's load; wall time and process CPU time.
    """
    inputs = {sl: make_inputs(n, vocab, d, device, torch.float32, seq_len=sl) for sl in (seq_len, n)}
    pairs = [(loss, m) for loss in losses for m in methods_for(loss, mods)]
    out = {}
    for pair in pairs:
        if pair == ref:
            continue
        walls, cpus = [], []
        for r in range(repeats + 1):
            got = {}
            for loss, m in ((ref, pair) if r % 2 else (pair, ref)):
                sl = n if loss == "tad_longrow" else seq_len
                w0, c0 = time.perf_counter(), time.process_time()
                run_once(m, loss, inputs[sl], mods, chunk=chunk, mm_dtype=None)
                got[(loss, m)] = (time.perf_counter() - w0, time.process_time() - c0)
            if r:  # the first pair is a warm-up
                walls.append(got[pair][0] / got[ref][0])
                cpus.append(got[pair][1] / got[ref][1])
        q = statistics.quantiles(walls, n=4) if len(walls) > 1 else [walls[0]] * 3
        out[f"{pair[0]}/{pair[1]}"] = {"wall_ratio": statistics.median(walls), "wall_q1": q[0], "wall_q3": q[2],
                                       "cpu_ratio": statistics.median(cpus), "walls": walls}
        ratio = out[f"{pair[0]}/{pair[1]}"]["wall_ratio"]
        print(f"V={vocab:6d} N={n:5d} {pair[0]:11s} {pair[1]:13s} / {ref[0]} {ref[1]}: wall x{ratio:.3f} "
              f"(IQR {q[0]:.3f}-{q[2]:.3f}), cpu x{statistics.median(cpus):.3f}", flush=True)
    return out


def report(paths: list[str]) -> str:
    """Markdown tables from result JSON files: time, peak memory, ratios to tailkd dense and TAD/KD."""
    cells = [c for p in paths for c in json.load(open(p))["cells"]]
    mem = {(c["method"], c["loss"], c["vocab"], c["n"]): c["peak_bytes"] for c in cells if "median_s" not in c}
    cells = [dict(c, peak_bytes=mem.get((c["method"], c["loss"], c["vocab"], c["n"]), c.get("peak_bytes")))
             for c in cells if "median_s" in c]  # --memory-only files override the peak of their cells
    lines = ["| V | N | loss | method | time (ms, median) | × tailkd dense | peak mem (MiB) | loss value |",
             "|---:|---:|---|---|---:|---:|---:|---:|"]
    dense = {(c["vocab"], c["n"], c["loss"]): c["median_s"] for c in cells if c["method"] == "tailkd_dense"}
    for c in cells:
        ref = dense.get((c["vocab"], c["n"], c["loss"]))  # None: no tailkd_dense cell (--methods left it out)
        mem = f"{c['peak_bytes'] / 2**20:,.0f}" if c.get("peak_bytes") is not None else "n/a"
        ratio = f"{c['median_s'] / ref:.2f}" if ref else "n/a"
        lines.append(f"| {c['vocab']} | {c['n']} | {c['loss']} | {c['method']} | {c['median_s'] * 1e3:,.0f} | "
                     f"{ratio} | {mem} | {c['value']:.4f} |")
    lines += ["", "| V | N | method | TAD / KD time (same run, medians) | TAD(long row, stats pass) / KD |",
              "|---:|---:|---|---:|---:|"]
    by = {(c["vocab"], c["n"], c["loss"], c["method"]): c["median_s"] for c in cells}
    for v, n in sorted({(c["vocab"], c["n"]) for c in cells}):
        for m in ("tailkd_dense", "tailkd_fused"):
            kd, tad, long = by.get((v, n, "kd", m)), by.get((v, n, "tad", m)), by.get((v, n, "tad_longrow", m))
            if kd and tad:
                lines.append(f"| {v} | {n} | {m} | {tad / kd:.2f} | {long / kd:.2f} |" if long else
                             f"| {v} | {n} | {m} | {tad / kd:.2f} | n/a |")
    return "\n".join(lines)


def report_peers(paths: list[str]) -> str:
    """Markdown: tailkd fused vs the fastest peer (time) and the peers' peak memory, per (V, N, loss)."""
    cells = [c for p in paths for c in json.load(open(p))["cells"] if "median_s" in c]
    lines = ["| V | N | loss | tailkd fused ms | MiB | fastest peer | peer ms | peer MiB | fused / fastest peer time | "
             "fused / tailkd dense time |", "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    mib = lambda c: f"{c['peak_bytes'] / 2**20:,.0f}" if c.get("peak_bytes") is not None else "n/a"  # noqa: E731
    for v, n, loss in sorted({(c["vocab"], c["n"], c["loss"]) for c in cells}):
        here = {c["method"]: c for c in cells if (c["vocab"], c["n"], c["loss"]) == (v, n, loss)}
        peers = [here[m] for m in PEERS if m in here]
        f, d = here.get("tailkd_fused"), here.get("tailkd_dense")
        if not f or not peers:
            continue
        best = min(peers, key=lambda c: c["median_s"])
        lines.append(f"| {v} | {n} | {loss} | {f['median_s'] * 1e3:,.0f} | {mib(f)} | {best['method']} | "
                     f"{best['median_s'] * 1e3:,.0f} | {mib(best)} | {f['median_s'] / best['median_s']:.2f} | "
                     + (f"{f['median_s'] / d['median_s']:.2f} |" if d else "n/a |"))
    return "\n".join(lines)


def report_memory(paths: list[str]) -> str:
    """Markdown pivot of --memory-only files: peak MiB per N (rows) and method/loss (columns)."""
    cells = [c for p in paths for c in json.load(open(p))["cells"]]
    cols = sorted({(c["vocab"], c["method"], c["loss"]) for c in cells})
    ns = sorted({c["n"] for c in cells})
    peak = {(c["vocab"], c["method"], c["loss"], c["n"]): c.get("peak_bytes") for c in cells}
    lines = ["| N | " + " | ".join(f"{m} {loss} (V={v})" for v, m, loss in cols) + " |",
             "|---:|" + "---:|" * len(cols)]
    for n in ns:
        row = []
        for v, m, loss in cols:
            b = peak.get((v, m, loss, n))
            row.append(f"{b / 2**20:,.0f}" if b is not None else "–")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def report_paired(paths: list[str]) -> str:
    """Markdown: paired time ratios (median and IQR of back-to-back ratios) of --paired files."""
    lines = ["| file | threads | fused chunking | V | N | pair / kd tailkd_fused | wall ratio (IQR) | CPU-time ratio |",
             "|---|---:|---|---:|---:|---|---:|---:|"]
    for p in paths:
        info = json.load(open(p))
        chunking = "library default" if info.get("fused_default_chunk") else f"chunk_size={info['chunk']}"
        for key, pairs in info.get("paired", {}).items():
            v, n = key.split("x")
            for name, r in pairs.items():
                lines.append(f"| {os.path.basename(p)} | {info['threads']} | {chunking} | {v} | {n} | {name} | "
                             f"{r['wall_ratio']:.3f} ({r['wall_q1']:.3f}–{r['wall_q3']:.3f}) | {r['cpu_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> int | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152, 151936])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--max-elements", type=float, default=2.0e8,
                    help="grid timing: a cell with N·V above this is not measured (named, exit 1; a CPU-time "
                         "guard); --paired and --memory-only do not apply it")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    ap.add_argument("--chunk", type=int, default=256, help="tokens per chunk for fused methods (tailkd, Liger)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: --chunk, so TAD chunks "
                    "hold whole rows); tad_longrow uses one row of N tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", nargs="+", default=None, help="print markdown tables of result JSON files")
    ap.add_argument("--paired", action="store_true",
                    help="paired time ratios to fused KD instead of the full grid (CPU only)")
    ap.add_argument("--memory-only", nargs="*", default=None, metavar="METHOD", choices=METHOD_NAMES,
                    help="only peak memory (fresh subprocess per cell), for these methods (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHOD_NAMES,
                    help="only these methods (e.g. tailkd_fused liger)")
    ap.add_argument("--fused-default-chunk", action="store_true",
                    help="tailkd_fused: chunk_size=None (library default; TAD grows chunks to whole sequences)")
    ap.add_argument("--report-peers", nargs="+", default=None, help="markdown: fused vs fastest peer")
    ap.add_argument("--report-memory", nargs="+", default=None, help="markdown: peak memory vs N (--memory-only files)")
    ap.add_argument("--report-paired", nargs="+", default=None, help="markdown: paired ratio files")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    reports = ((args.report, report, "no timed cell"), (args.report_peers, report_peers,
                                                         "no cell of these files has tailkd_fused beside a peer"),
               (args.report_memory, report_memory, "no cell"), (args.report_paired, report_paired, "no paired ratio"))
    if any(flag for flag, _, _ in reports):
        empty = []
        for flag, fn, what in reports:
            if flag:
                lines = fn(flag).splitlines()
                print("\n".join(lines))
                if len(lines) < 3 or not lines[2].startswith("|"):  # the (first) table has no row
                    empty.append(f"{what} in {' '.join(flag)}")
        for why in empty:
            print(f"bench_fused: {why}: that table is empty", file=sys.stderr)
        return 1 if empty else 0
    for n in args.tokens:  # the N tokens are rows of this length (tad_longrow: one row of N)
        row = min(n, args.seq_len or args.chunk)
        if n % row:
            ap.error(f"--tokens {n} is not a multiple of the row length {row} (--seq-len, default --chunk)")
    if args.paired and args.device == "cuda":  # its clocks read the host: on CUDA they would time the launches
        ap.error("--paired times on the CPU (host wall and process CPU time, float32); on CUDA use the grid or "
                 "bench/bench_gpu.py")
    global FUSED_DEFAULT_CHUNK, METHODS
    FUSED_DEFAULT_CHUNK, METHODS = args.fused_default_chunk, args.methods
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("NOT MEASURED: CUDA is not available on this machine: no GPU row measured (run with --device cuda on "
              "a GPU)", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    mods = _peer_modules()
    info = {"device": args.device, **describe("liger-kernel", "torchtune", "trl", "transformers"),
            "threads": torch.get_num_threads(), "hidden": args.hidden, "chunk": args.chunk,
            "peers": {k: v for k, v in mods.items() if k.endswith("_error")},
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "fused_default_chunk": args.fused_default_chunk, "argv": sys.argv[1:], "loadavg_start": os.getloadavg(),
            "cells": [], "not_measured": []}
    print(header(info, info["threads"]), flush=True)
    missing = info["not_measured"]
    if args.memory_only is not None:
        for vocab in args.vocab:
            for n in args.tokens:
                for loss in args.losses:
                    for method, why in unavailable(loss, mods):
                        if not args.memory_only or method in args.memory_only:
                            not_measured(missing, f"V={vocab} N={n} {loss} {method}: {why}")
                    for method in methods_for(loss, mods):
                        if args.memory_only and method not in args.memory_only:
                            continue
                        sl = n if loss == "tad_longrow" else min(n, args.seq_len or args.chunk)
                        cell = {"method": method, "loss": loss, "vocab": vocab, "n": n, "d": args.hidden,
                                "device": args.device, "chunk": args.chunk, "seq_len": sl, "threads": args.threads,
                                "fused_default_chunk": args.fused_default_chunk}
                        mem = measure_memory(cell)
                        info["cells"].append({**cell, "peak_bytes": mem.get("peak_bytes"),
                                              "mem_error": mem.get("error")})
                        print(f"V={vocab:6d} N={n:5d} {loss:11s} {method:13s} peak "
                              f"{(mem.get('peak_bytes') or 0) / 2**20:8.1f} MiB", flush=True)
                        if mem.get("error"):
                            not_measured(missing, f"V={vocab} N={n} {loss} {method} peak memory: {mem['error']}")
        return _finish(args, info)
    if args.paired:
        info["paired"] = {}
        for vocab in args.vocab:
            for n in args.tokens:
                sl = min(n, args.seq_len or args.chunk)
                for loss in args.losses:
                    for method, why in unavailable(loss, mods):
                        not_measured(missing, f"V={vocab} N={n} {loss} {method}: {why}")
                info["paired"][f"{vocab}x{n}"] = measure_paired(n, vocab, args.hidden, device, args.repeats,
                                                                args.chunk, mods, sl, losses=args.losses)
                if args.out:
                    with open(args.out, "w") as fh:
                        json.dump({**info, "loadavg_end": os.getloadavg()}, fh, indent=1)
        return _finish(args, info)
    for vocab in args.vocab:
        for n in args.tokens:
            if n * vocab > args.max_elements:
                not_measured(missing, f"V={vocab} N={n}: N·V = {n * vocab:.3g} is above --max-elements "
                                      f"{args.max_elements:.3g}; raise it to measure this cell")
                continue
            seq_lens = {loss: n if loss == "tad_longrow" else min(n, args.seq_len or args.chunk)
                        for loss in args.losses}
            for loss in args.losses:
                for method, why in unavailable(loss, mods):
                    not_measured(missing, f"V={vocab} N={n} {loss} {method}: {why}")
            pairs = [(loss, m) for loss in args.losses for m in methods_for(loss, mods)]
            if not pairs:
                continue
            timing = measure_time(pairs, n, vocab, args.hidden, device, args.repeats, args.chunk, mods, seq_lens)
            for (loss, method), t in timing.items():
                cell = {"method": method, "loss": loss, "vocab": vocab, "n": n, "d": args.hidden,
                        "device": args.device, "chunk": args.chunk, "seq_len": seq_lens[loss], "threads": args.threads,
                        "fused_default_chunk": args.fused_default_chunk}
                mem = {} if args.no_memory else measure_memory(cell)
                row = {**cell, **t, "peak_bytes": mem.get("peak_bytes"), "mem_error": mem.get("error")}
                info["cells"].append(row)
                peak = f"{row['peak_bytes'] / 2**20:8.1f} MiB" if row["peak_bytes"] is not None else "   -"
                print(f"V={vocab:6d} N={n:5d} {loss:11s} {method:13s} {t['median_s'] * 1e3:9.1f} ms  {peak}  "
                      f"loss={t['value']:.5f}", flush=True)
                if mem.get("error"):
                    not_measured(missing, f"V={vocab} N={n} {loss} {method} peak memory: {mem['error']}")
            if args.out:  # partial results survive an interrupted run
                with open(args.out, "w") as fh:
                    json.dump({**info, "loadavg_end": os.getloadavg()}, fh, indent=1)
    return _finish(args, info)


def _finish(args, info) -> int:
    """Write --out; exit status 1 (and a summary on stderr) if any cell was not measured."""
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**info, "loadavg_end": os.getloadavg()}, fh, indent=1)
    missing = info["not_measured"]
    if missing:
        print(f"bench_fused: {len(missing)} cell(s) not measured (listed above and under not_measured"
              f"{' in ' + args.out if args.out else ''})", file=sys.stderr)
        return 1
    if not info["cells"] and not any(info.get("paired", {}).values()):
        print("bench_fused: nothing was measured", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
