"""The Triton row kernels alone on one chunk of logits, over launch configurations: which block × warps to use.

  python bench/bench_kernels.py --out bench/results/gpu_kernels          # CUDA: 2048 × 151936 bf16, ~35 s on an H200
  python bench/bench_kernels.py --device cpu --rows 4 --vocab 1000 --configs 128x4 --out /tmp/dry   # dry run

For each launch (``--configs``: ``default``, each pass at its `tailkd.kernels.CUDA_LAUNCH` entry, first; then
BLOCKxWARPS for both passes, 1024x4 being the single launch of every pass before the per-pass table) and each loss
(kd; tad K=10 and K=64, and K=10 with the tail sums folding every block themselves (``rescale=False``: the A/B of
`kernels.RESCALE_GAP`), K=10 and 64 with pass 1 in two stages (``two-stage``: the A/B of `kernels.TAD_TWO_STAGE`;
at a BLOCKxWARPS launch both stages take it); jsd β=0.5; a top-64 cache teacher
with 8 tail points), times the statistics pass and the value + gradient pass (written in place over the student's
logits, as the fused layer does) on one chunk of ``--rows`` rows: student and teacher logits [rows, V] in bf16,
random normal with scale 3 (TAD's top-K and tail sums see a realistic number of top-K entries: a row's running top-K
changes ~K·ln(V/K) times). Reports the median over ``--repeats`` (CUDA events; after a warm-up that compiles), the
bytes each pass must move (pass 1 reads s and t; pass 2 reads both and writes G; RKL/JSD read them once more;
against the cache only s is read) as GB/s, and TAD/KD per configuration. Those times start with the device idle, so
they include the host's launch overhead wherever issuing a pass takes longer than running it (TAD's pass 2 issues
~100 small [rows]-sized torch ops for its row coefficients and value); on CUDA each pass is also timed with the device
given a head start (`bench_gpu.time_device`: the kernels back to back, as in the layer, where the matmuls keep the
host ahead), beside the host's issue time: "device" and its TAD/KD. The logits are refreshed before every timed
repeat (pass 2 overwrites s). Exits 1 if a kernel errs. On the CPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1 is set here): a check of the wiring, not a speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import machine  # bench/ is this script's folder
import torch
from bench_gpu import _LEAD_S, time_device_covered, time_once

LOSSES = {"kd": (0, 0, True, False), "tad K=10": (3, 10, True, False), "tad K=10, no rescale": (3, 10, False, False),
          "tad K=10, two-stage": (3, 10, True, True), "tad K=64": (3, 64, True, False),
          "tad K=64, two-stage": (3, 64, True, True), "jsd": (2, 0, True, False),
          "cache K=64": (4, 64, True, False)}  # (kind, K, rescale, TAD's pass 1 in two stages)


def bench(rows, vocab, device, configs, repeats, warmup, seed=0):
    from tailkd import kernels

    g = torch.Generator(device="cpu").manual_seed(seed)
    s0 = (torch.randn(rows, vocab, generator=g) * 3).to(device, torch.bfloat16)
    t = (torch.randn(rows, vocab, generator=g) * 3).to(device, torch.bfloat16)
    s = s0.clone()
    cd = torch.full((rows,), 1.0 / rows, device=device)
    cq = torch.full((rows,), 0.5 / rows, device=device)
    y = torch.randint(0, vocab, (rows,), generator=g).to(device)
    log_w = torch.full((rows,), math.log(2.0), dtype=torch.float64, device=device)  # log β(X): TAD's and the cache's
    from tailkd.divergences import SparseTeacher

    ranked = torch.topk(t.float(), 72, dim=-1)  # a top-64 cache of t; ranks 64..71 as its 8 tail points
    logp = ranked.values - torch.logsumexp(t.float(), -1, keepdim=True)
    cache = SparseTeacher(ranked.indices[:, :64], logp[:, :64], torch.log1p(-logp[:, :64].exp().sum(-1)
                                                                             .clamp(max=1 - 1e-6)),
                          ranked.indices[:, 64:], logp[:, 64:], logp[:, 64:])  # tail log weights: log p_i
    elem = rows * vocab * s.element_size()
    cells = []
    for block, warps in configs:  # (None, None): each pass at its default launch
        for name, (kind, k, rescale, two_stage) in LOSSES.items():
            loss = kernels.RowLoss(kind, k=k, jsd_beta=0.5)
            cell = {"loss": name, "block": block, "warps": warps}
            try:
                def stats():
                    if kind == 4:
                        return kernels.sparse_stats(s, cache, block=block, warps=warps, rescale=rescale)
                    return kernels.row_stats(s, t, k, block=block, warps=warps, rescale=rescale,
                                             two_stage=two_stage)

                box = {}

                def grads():
                    if kind == 4:
                        box["v"] = kernels.sparse_values_and_grads(s, cache, box["st"], log_w, cd, cq, s, y=y, cy=cq,
                                                                   block=block, warps=warps)
                        return
                    box["v"] = kernels.row_values_and_grads(loss, s, t, box["st"], log_w if kind == 3 else None, cd, cq,
                                                            s, y=y, cy=cq, block=block, warps=warps)

                t1, t2, dev, lead = [], [], [], None
                for i in range(warmup + repeats):
                    s.copy_(s0)
                    a = time_once(lambda: box.__setitem__("st", stats()), device)
                    b = time_once(grads, device)
                    if i >= warmup:
                        t1.append(a)
                        t2.append(b)
                    if i >= warmup and device.type == "cuda" and dev is not None:  # each pass's device time alone
                        s.copy_(s0)
                        d1 = time_device_covered(lambda: box.__setitem__("st", stats()), device, lead or _LEAD_S)
                        d2 = d1 and time_device_covered(grads, device, d1[2])
                        dev = dev + [(d1, d2)] if d2 else None  # None: a pass waits for the device: no figure
                        lead = d2[2] if d2 else None
                if not torch.isfinite(box["v"]).all():
                    raise FloatingPointError("non-finite row value")
                p1, p2 = statistics.median(t1), statistics.median(t2)
                moved1 = elem if kind == 4 else 2 * elem  # a cache teacher: s alone
                moved2 = (2 if kind == 4 else 3) * elem + (2 * elem if kind in (1, 2) else 0)  # RKL/JSD: value pass
                cell.update(stats_s=p1, grad_s=p2, total_s=p1 + p2, stats_gbs=moved1 / p1 / 1e9,
                            grad_gbs=moved2 / p2 / 1e9)
                if dev:  # the passes' kernels back to back (the host ahead, as in the layer) and their issue time
                    for key, pick in (("stats_dev_s", lambda d: d[0][0]), ("grad_dev_s", lambda d: d[1][0]),
                                      ("stats_issue_s", lambda d: d[0][1]), ("grad_issue_s", lambda d: d[1][1])):
                        cell[key] = statistics.median([pick(d) for d in dev])
            except Exception as exc:  # noqa: BLE001 - reported; the script exits 1
                cell["error"] = f"{type(exc).__name__}: {exc}"[:300]
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    return cells


def _markdown(result):
    lines = [f"{result['date']}; device: {result['device']}; rows={result['rows']}, V={result['vocab']}, bf16 logits; "
             f"versions {result['versions']}", "",
             "| block × warps | loss | stats pass ms (GB/s) | value + G ms (GB/s) | total ms | / kd "
             "| device: stats + value/G ms (host issue ms) | device / kd |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        kd = next((x for x in result["cells"] if x["loss"] == "kd" and x["block"] == c["block"]
                   and x["warps"] == c["warps"] and "error" not in x), None)
        how = "default (per pass)" if c["block"] is None else f"{c['block']} × {c['warps']}"
        if "error" in c:
            lines.append(f"| {how} | {c['loss']} | ERROR {c['error']} | | | | | |")
            continue
        ratio = f"{c['total_s'] / kd['total_s']:.3f}" if kd else "—"
        dev, dev_ratio = "—", "—"
        if "stats_dev_s" in c:
            dev = (f"{c['stats_dev_s'] * 1e3:.3f} + {c['grad_dev_s'] * 1e3:.3f} ({c['stats_issue_s'] * 1e3:.2f} + "
                   f"{c['grad_issue_s'] * 1e3:.2f})")
            if kd and "stats_dev_s" in kd:
                own, base = (x["stats_dev_s"] + x["grad_dev_s"] for x in (c, kd))
                dev_ratio = f"{own / base:.3f}"
        lines.append(f"| {how} | {c['loss']} | {c['stats_s'] * 1e3:.3f} ({c['stats_gbs']:.0f}) "
                     f"| {c['grad_s'] * 1e3:.3f} ({c['grad_gbs']:.0f}) | {c['total_s'] * 1e3:.3f} | {ratio} | {dev} "
                     f"| {dev_ratio} |")
    return "\n".join(lines) + "\n"


def _launch(text: str) -> tuple:
    """One ``--configs`` entry: ``default`` -> (None, None), BLOCKxWARPS -> (BLOCK, WARPS), both positive."""
    if text == "default":
        return None, None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'default' or BLOCKxWARPS (e.g. 2048x8)")
    return int(parts[0]), int(parts[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=2048, help="rows of one chunk (the fused layer's CUDA chunk)")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--configs", nargs="+", default=None, type=_launch,
                    help="launches: 'default' (each pass at kernels.CUDA_LAUNCH's) or BLOCKxWARPS for both passes "
                         "(default: default 1024x4 2048x4 2048x8 4096x8 4096x16)")
    ap.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 1 on the CPU")
    ap.add_argument("--warmup", type=int, default=None, help="default 2 on CUDA, 0 on the CPU")
    ap.add_argument("--out", required=True, help="path prefix: writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: --device cuda but no CUDA device is visible; use --device cpu for the dry run (Triton's "
              "interpreter)", file=sys.stderr)
        return 1
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before tailkd.kernels is imported
    from tailkd import kernels

    if not kernels.available():
        print("bench_kernels: triton is not installed", file=sys.stderr)
        return 1
    configs = args.configs or [_launch(c) for c in ("default", "1024x4", "2048x4", "2048x8", "4096x8", "4096x16")]
    repeats = args.repeats or (10 if device.type == "cuda" else 1)
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 0)
    versions = {"torch": torch.__version__, **machine.versions("triton")}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    cells = bench(args.rows, args.vocab, device, configs, repeats, warmup)
    result = {"device": name, "rows": args.rows, "vocab": args.vocab, "versions": versions, "cells": cells,
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    Path(args.out + ".md").write_text(_markdown(result))
    print(_markdown(result))
    return 1 if any("error" in c for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
