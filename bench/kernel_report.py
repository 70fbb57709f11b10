"""The Triton row kernels compiled ahead of time for a GPU, without one: registers, spills, occupancy, SASS.

  python bench/kernel_report.py                      # sm_90 (H100/H200), V = 151936, bf16 logits: a table
  python bench/kernel_report.py --check              # exit 1 if a variant fails to compile or spills
  python bench/kernel_report.py --arch 80 --vocab 32000 --dtype fp32 --block 2048 --warps 8 --json out.json

Compiles every kernel variant that `tailkd.kernels` launches (pass 1 for KD/RKL/JSD, for TAD with K = 10 and K = 64,
for α^T alone, and TAD's in two stages (`kernels.TAD_TWO_STAGE`); pass 2 of each loss, with and without the
gradient; both passes against a top-K cache teacher; the backward's scaling of ∂W and ∂h) with the installed
triton's compiler and its bundled ptxas, for the launch `kernels.launch` chooses for each pass on CUDA (or
--block/--warps), with the argument specialisation the JIT gives real tensors (16-byte aligned pointers; V and the
row strides divisible by 16 when V is). Reported per variant, from the cubin (cuobjdump ships with triton):
registers per thread, stack frame and local memory (spills: a failure under --check in the kernels every chunk runs
by default; only reported for the α^T-alone pass, which runs over split sequences alone, and for the A/B variants
that a switch in `tailkd.kernels` turns on), shared memory, resident warps per SM (65536 registers; the arch's warp,
block and shared-memory limits), and static SASS counts: instructions, MUFU (exp2/log2/rcp) and BAR (block-wide
reductions synchronise through shared memory). Static counts are a proxy of the work per element, not a time: the
speed is measured on a GPU (bench/bench_kernels.py, bench/bench_gpu.py).

Needs triton with its NVIDIA backend (the Linux wheel); TRITON_INTERPRET must be unset (the interpreter replaces
the kernels). About 1 s per variant on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import machine  # bench/ is this script's folder
import torch

REGS_PER_SM, REG_UNIT = 65536, 256
# per compute capability (CUDA C Programming Guide, "Technical Specifications per Compute Capability"): resident
# warps and blocks per SM, shared memory per SM in KiB
SM_LIMITS = {80: (64, 32, 164), 86: (48, 16, 100), 87: (48, 16, 164), 89: (48, 24, 100), 90: (64, 32, 228)}


def _variants(logits: str):
    """(name, pass kind for `kernels.launch`, kernel, signature, constexprs) of every launch `tailkd.kernels` makes,
    mirrored from its torch side."""
    from tailkd import kernels as K

    def stats(k, student=True, keep=False):
        kp = K.padded_k(k)
        sig = {"s_ptr": f"*{logits}", "t_ptr": f"*{logits}", "stats_ptr": "*fp32", "ids_ptr": "*i32",
               "ttop_ptr": "*fp32", "stop_ptr": "*fp32", "blk_ptr": "*fp32", "V": "i32", "stride_s": "i32",
               "stride_t": "i32", "gap": "fp32", "K": "constexpr", "KP": "constexpr", "STUDENT": "constexpr",
               "KEEP": "constexpr", "NBP": "constexpr", "BLOCK": "constexpr"}
        return K._stats_kernel, sig, {"K": k, "KP": kp, "STUDENT": student, "KEEP": keep, "NBP": None if keep else 2}

    def topk(k):  # stage B of the two-stage top-K (NBP: the blocks of a row at its launch, set in `report`)
        sig = {"s_ptr": f"*{logits}", "t_ptr": f"*{logits}", "stats_ptr": "*fp32", "blk_ptr": "*fp32",
               "ids_ptr": "*i32", "ttop_ptr": "*fp32", "stop_ptr": "*fp32", "V": "i32", "stride_s": "i32",
               "stride_t": "i32", "gap": "fp32", "K": "constexpr", "KP": "constexpr", "NBP": "constexpr",
               "STUDENT": "constexpr", "BLOCK": "constexpr"}
        return K._topk_kernel, sig, {"K": k, "KP": K.padded_k(k), "NBP": None, "STUDENT": True}

    def dense(loss, value, write):
        sig = {"s_ptr": f"*{logits}", "t_ptr": f"*{logits}", "out_ptr": f"*{logits}", "stats_ptr": "*fp32",
               "coef_ptr": "*fp32", "y_ptr": "*i64", "value_ptr": "*fp32", "V": "i32", "stride_s": "i32",
               "stride_t": "i32", "stride_o": "i32", "bj": "fp32", "cj": "fp32", "LOSS": "constexpr",
               "VALUE": "constexpr", "WRITE": "constexpr", "BLOCK": "constexpr"}
        return K._dense_kernel, sig, {"LOSS": loss, "VALUE": value, "WRITE": write}

    def tad(k, write, rare=False):
        kp = K.padded_k(k)
        sig = {"s_ptr": f"*{logits}", "t_ptr": f"*{logits}", "out_ptr": f"*{logits}", "stats_ptr": "*fp32",
               "ids_ptr": "*i32", "ttop_ptr": "*fp32", "stop_ptr": "*fp32", "w_ptr": "*fp64", "cd_ptr": "*fp32",
               "cq_ptr": "*fp32", "cy_ptr": "*fp32", "y_ptr": "*i64", "value_ptr": "*fp32", "V": "i32",
               "stride_s": "i32", "stride_t": "i32", "stride_o": "i32", "K": "constexpr", "KP": "constexpr",
               "WRITE": "constexpr", "RARE": "constexpr", "BLOCK": "constexpr"}
        return K._tad_kernel, sig, {"K": k, "KP": kp, "WRITE": write, "RARE": rare}

    def sparse_stats():
        sig = {"s_ptr": f"*{logits}", "ids_ptr": "*i32", "stats_ptr": "*fp32", "V": "i32", "stride_s": "i32",
               "gap": "fp32", "K": "constexpr", "BLOCK": "constexpr"}
        return K._sparse_stats_kernel, sig, {"K": 64}

    def sparse_grad():
        sig = {"s_ptr": f"*{logits}", "out_ptr": f"*{logits}", "stats_ptr": "*fp32", "coef_ptr": "*fp32",
               "y_ptr": "*i64", "V": "i32", "stride_s": "i32", "stride_o": "i32", "BLOCK": "constexpr"}
        return K._sparse_grad_kernel, sig, {}

    def scale(dtype):  # the layer's backward (`kernels.scale_`): ∂W (the head's float32), ∂h (the hidden states')
        sig = {"x_ptr": f"*{dtype}", "g_ptr": "*fp32", "expected": "fp32", "numel": "i32", "BLOCK": "constexpr"}
        return K._scale_kernel, sig, {}

    return [
        ("stats: kd/rkl/jsd", "stats", *stats(0)),
        ("stats: tad K=10", "stats_topk", *stats(10)),
        ("stats: tad K=64", "stats_topk", *stats(64)),
        ("stats: α^T alone K=10 (split sequences only)", "stats_topk", *stats(10, student=False)),
        ("stats: tad two-stage, stage A (A/B)", "two_stage", *stats(0, keep=True)),
        ("stats: tad K=10, two-stage, stage B (A/B)", "two_stage_topk", *topk(10)),
        ("stats: tad K=64, two-stage, stage B (A/B)", "two_stage_topk", *topk(64)),
        ("kd: value + G", "dense", *dense(0, True, True)),
        ("kd: value", "dense", *dense(0, True, False)),
        ("rkl: value", "dense", *dense(1, True, False)),
        ("rkl: G", "dense", *dense(1, False, True)),
        ("jsd: value", "dense", *dense(2, True, False)),
        ("jsd: G", "dense", *dense(2, False, True)),
        ("tad K=10: value + G", "tad", *tad(10, True)),
        ("tad K=10: value", "tad", *tad(10, False)),
        ("tad K=64: value + G", "tad", *tad(64, True)),
        ("tad K=10, rare rows: value + G", "tad", *tad(10, True, rare=True)),
        ("cache teacher K=64: stats", "sparse", *sparse_stats()),
        ("cache teacher: G", "sparse", *sparse_grad()),
        ("backward: scale ∂W (fp32)", "scale", *scale("fp32")),
        ("backward: scale ∂h (bf16)", "scale", *scale("bf16")),
    ]


def _attrs(kernel, signature, vocab):
    """The JIT's specialisation of real launches: pointers 16-byte aligned; V and strides divisible by 16 if V is."""
    names = list(signature)
    out = {}
    for i, name in enumerate(names):
        kind = signature[name]
        if kind.startswith("*") or (kind == "i32" and vocab % 16 == 0 and (name == "V" or name.startswith("stride"))):
            out[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return out


def _tool(name):
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} (triton without its NVIDIA backend binaries)")
    return str(path)


def _resources(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    instrs = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    return {"regs": int(fields["REG"]), "local": int(fields["LOCAL"]), "stack": int(fields["STACK"]),
            "shared_static": int(fields["SHARED"]), "sass": len(instrs),
            "mufu": sum(op.startswith("MUFU") for op in instrs), "bar": sum(op.startswith("BAR") for op in instrs)}


def _warps_per_sm(regs: int, warps: int, shared: int, arch: int = 90) -> int:
    max_warps, max_blocks, shared_kib = SM_LIMITS[arch]
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    blocks = min(max_blocks, max_warps // warps, REGS_PER_SM // (per_warp * warps),
                 (shared_kib * 1024) // max(shared, 1))
    return blocks * warps


def report(arch: int = 90, vocab: int = 151936, logits: str = "bf16", block: int | None = None,
           warps: int | None = None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tailkd import kernels as K

    rows = []
    for name, kind, kernel, signature, constexprs in _variants(logits):
        go = K.launch(vocab, torch.device("cuda"), block, warps, kind)
        constexprs = {**constexprs, "BLOCK": go.block}
        if constexprs.get("NBP", 0) is None:  # the two-stage top-K's blocks per row, as `kernels.row_stats` sets it
            constexprs["NBP"] = max(2, triton.next_power_of_2(triton.cdiv(vocab, go.block)))
        row = {"variant": name, "block": go.block, "warps": go.warps}
        try:
            src = ASTSource(kernel, signature, constexprs=constexprs, attrs=_attrs(kernel, signature, vocab))
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=go.options)
            row.update(_resources(compiled.asm["cubin"]))
            row["shared"] = int(compiled.metadata.shared)
            row["warps_per_sm"] = _warps_per_sm(row["regs"], go.warps, row["shared"], arch)
        except Exception as exc:  # noqa: BLE001 - reported per variant; --check fails on it
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
    return rows


def _table(rows, header: str) -> str:
    lines = [header, "", "| variant | block × warps | regs | stack + local B (spills) | shared B | warps/SM | SASS "
             "| MUFU | BAR |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['block']} × {r['warps']} | compile error: {r['error']} |||||||")
        else:
            lines.append(f"| {r['variant']} | {r['block']} × {r['warps']} | {r['regs']} | {r['stack'] + r['local']} "
                         f"| {r['shared']} "
                         f"| {r['warps_per_sm']} | {r['sass']} | {r['mufu']} | {r['bar']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS),
                    help="CUDA compute capability ×10 (90: H100/H200, 80: A100, 89: L4/L40S/RTX 4090)")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="the logits' dtype")
    ap.add_argument("--block", type=int, default=None, help="columns per step (default: kernels.launch on CUDA)")
    ap.add_argument("--warps", type=int, default=None, help="warps per row (default: kernels.launch on CUDA)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--check", action="store_true", help="exit 1 if a variant fails to compile or spills")
    args = ap.parse_args(argv)
    import triton

    rows = report(args.arch, args.vocab, args.dtype, args.block, args.warps)
    print(_table(rows, f"sm_{args.arch}, V = {args.vocab}, {args.dtype} logits, triton {triton.__version__}"))
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "vocab": args.vocab, "dtype": args.dtype,
                                               "triton": triton.__version__, **machine.describe("triton"),
                                               "rows": rows}, indent=1))
    bad = [r["variant"] for r in rows if "error" in r or (_hot(r) and (r["local"] or r["stack"]))]
    spills = [r["variant"] for r in rows if "error" not in r and not _hot(r) and (r["local"] or r["stack"])]
    if spills:
        print(f"kernel_report: spills outside the default per-chunk kernels (reported, not a failure): "
              f"{', '.join(spills)}")
    if bad:
        print(f"kernel_report: {len(bad)} variant(s) fail to compile or spill: {', '.join(bad)}", file=sys.stderr)
    return 1 if args.check and bad else 0


def _hot(row) -> bool:
    """Whether a variant runs on every chunk of a training step by default (a spill there fails --check); the α^T-alone
    pass runs only over the tokens of sequences that span chunks (TAD's ᾱ), and an "(A/B)" variant only when its
    switch in `tailkd.kernels` is flipped (then it is the default one and is checked)."""
    return "split sequences only" not in row["variant"] and "(A/B)" not in row["variant"]


if __name__ == "__main__":
    sys.exit(main())
