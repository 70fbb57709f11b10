"""CPU benchmark of the loss layer: forward+backward time and peak memory of tad vs forward_kl (and jsd, reverse_kl).

Timing runs in this process, interleaving the losses repeat by repeat (alternating order) and reporting medians; the
tad/forward_kl ratio is the median of the per-repeat ratios, so both sides of each ratio saw the same machine load;
it is given for wall time and for process CPU time (less sensitive to other tenants of a shared machine).
Peak memory runs each (loss, V) once in a fresh subprocess and reports the growth of the peak resident set size
(VmHWM) during one forward+backward, inputs excluded. A last section measures float32 accuracy of TAD's tail
term β(X)·α^T·D_KL2 on a peaked teacher: summed over the tail directly (tailkd) vs taken as KL − D_KL1.

    python bench/bench_losses.py            # full table (a few minutes on 2 cores)
    python bench/bench_losses.py --quick    # smoke run (seconds)
"""

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time

import torch
from machine import cpu_model  # bench/ is this script's folder

from tailkd import losses

LOSSES = {
    "forward_kl": lambda s, t, mask: losses.forward_kl(s, t),
    "tad": lambda s, t, mask: losses.tad(s, t, mask, k=10, beta=2.0),
    "reverse_kl": lambda s, t, mask: losses.reverse_kl(s, t),
    "jsd": lambda s, t, mask: losses.jsd(s, t, beta=0.5),
}


def make_inputs(vocab: int, tokens: int, seed: int = 0):
    """Student/teacher logits [B, T, V] (B = 4 rows), teacher more peaked than the student."""
    gen = torch.Generator().manual_seed(seed)
    shape = (4, tokens // 4, vocab)
    teacher = torch.randn(shape, generator=gen).mul_(3.0)  # [B, T, V] (in place: no transient copy in the RSS baseline)
    student = torch.randn(shape, generator=gen).mul_(2.0)  # [B, T, V]
    return student, teacher, torch.ones(shape[:2], dtype=torch.bool)


def fwd_bwd_seconds(name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(wall, process CPU) seconds of one forward+backward; CPU time is less sensitive to other tenants."""
    x = student.clone().requires_grad_(True)  # fresh leaf, outside the timed region
    wall, cpu = time.perf_counter(), time.process_time()
    LOSSES[name](x, teacher, mask).sum().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_table(vocab: int, tokens: int, repeats: int, slow_repeats: int) -> dict:
    student, teacher, mask = make_inputs(vocab, tokens)
    for name in LOSSES:  # warm-up (allocator, thread pool)
        fwd_bwd_seconds(name, student[:, :2], teacher[:, :2], mask[:, :2])
    wall = {name: [] for name in LOSSES}
    cpu = {name: [] for name in LOSSES}
    for r in range(repeats):
        pair = ["forward_kl", "tad"] if r % 2 == 0 else ["tad", "forward_kl"]
        for name in pair + (["reverse_kl", "jsd"] if r < slow_repeats else []):
            w, c = fwd_bwd_seconds(name, student, teacher, mask)
            wall[name].append(w)
            cpu[name].append(c)
    wall_ratios = [a / b for a, b in zip(wall["tad"], wall["forward_kl"], strict=True)]
    cpu_ratios = [a / b for a, b in zip(cpu["tad"], cpu["forward_kl"], strict=True)]
    return {
        "median_s": {name: statistics.median(v) for name, v in wall.items() if v},
        "ratio_wall": statistics.median(wall_ratios),
        "ratio_range": (min(wall_ratios), max(wall_ratios)),
        "ratio_cpu": statistics.median(cpu_ratios),
    }


def peak_memory_mb(name: str, vocab: int, tokens: int) -> float:
    """Growth of the peak resident set (VmHWM) during one forward+backward, measured in a fresh interpreter.

    VmHWM belongs to the address space, so it starts afresh at exec (ru_maxrss would inherit this process's peak).
    """
    code = (
        "import sys\n"
        f"sys.path.insert(0, {sys.path[0]!r})\n"
        "import bench_losses as b\n"
        f"s, t, m = b.make_inputs({vocab}, {tokens})\n"
        "s.requires_grad_(True)\n"
        "base = b.vm_hwm_kib()\n"
        f"b.LOSSES[{name!r}](s, t, m).sum().backward()\n"
        "print((b.vm_hwm_kib() - base) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def vm_hwm_kib() -> int:
    """Peak resident set size of this process so far, in KiB (Linux /proc)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def tail_term_accuracy(vocab: int, tokens: int) -> dict:
    """Max relative error (float32 vs float64) of β(X)·α^T·D_KL2 on a peaked teacher (α^T ~ 1e-6..1e-4)."""
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(1, tokens, vocab, generator=gen, dtype=torch.float64) * 2
    teacher[..., :10] += 16.0  # the top-10 hold nearly all the mass
    student = teacher + torch.randn(1, tokens, vocab, generator=gen, dtype=torch.float64) * 0.5
    mask = torch.ones(1, tokens, dtype=torch.bool)
    _, d2, alpha = losses.tad_decompose(student, teacher, k=10)  # float64: the reference values
    abar = alpha.mean(1, keepdim=True).expand_as(alpha)
    exact = (2.0 / abar) * alpha * d2
    s32, t32 = student.float(), teacher.float()
    d1_32 = losses.tad_decompose(s32, t32, k=10)[0]
    direct = losses.tad(s32, t32, mask, k=10, beta=2.0, seq_alpha_mean=abar.float()) - d1_32
    cancel = (2.0 / abar.float()) * (losses.forward_kl(s32, t32) - d1_32)  # β(X)·(KL − D_KL1)
    return {
        "alpha_max": float(alpha.max()),
        "direct": _max_rel(direct, exact),
        "kl_minus_d_kl1": _max_rel(cancel, exact),
    }


def _max_rel(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((x.double() - exact).abs() / exact).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: V 4096, N 128, 2 repeats, 1 slow repeat where not given")
    parser.add_argument("--vocab", type=int, nargs="*", default=None, help="default 32000 49152 151936")
    parser.add_argument("--tokens", type=int, nargs="*", default=None,
                        help="N per vocabulary size (default 2048 1536 512)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of tad and forward_kl (default 9)")
    parser.add_argument("--slow-repeats", type=int, default=None,
                        help="timed repeats of reverse_kl and jsd, the first of the --repeats (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = ([4096], [128], 2, 1) if args.quick else ([32000, 49152, 151936], [2048, 1536, 512], 9, 3)
    given = (args.vocab, args.tokens, args.repeats, args.slow_repeats)
    args.vocab, args.tokens, args.repeats, args.slow_repeats = (d if g is None else g for g, d in zip(given, defaults))
    if not args.vocab:
        parser.error("--vocab needs at least one size")
    if len(args.vocab) != len(args.tokens):
        parser.error(f"one --tokens per --vocab ({len(args.vocab)} and {len(args.tokens)} given)")
    for tokens in args.tokens:
        if tokens < 4 or tokens % 4:
            parser.error(f"--tokens {tokens} is not a multiple of 4 (the logits are 4 rows of N/4 tokens)")
    if args.repeats < 1 or args.slow_repeats < 1:
        parser.error("--repeats must be at least 1, and so must --slow-repeats")
    print(f"# {datetime.date.today()}  torch {torch.__version__}  threads {torch.get_num_threads()}  {cpu_model()}")
    print(f"# python {platform.python_version()}  {' '.join(sys.argv)}\n")
    print(
        "| V | N | forward_kl ms | tad ms | tad/forward_kl wall (min-max) | tad/forward_kl CPU time | reverse_kl ms "
        "| jsd ms | peak MB " + " / ".join(LOSSES) + " |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for vocab, tokens in zip(args.vocab, args.tokens, strict=True):
        res = time_table(vocab, tokens, args.repeats, args.slow_repeats)
        ms = {k: f"{v * 1e3:.0f}" for k, v in res["median_s"].items()}
        mem = " / ".join(f"{peak_memory_mb(name, vocab, tokens):.0f}" for name in LOSSES)
        lo, hi = res["ratio_range"]
        print(
            f"| {vocab} | {tokens} | {ms['forward_kl']} | {ms['tad']} | {res['ratio_wall']:.3f} ({lo:.2f}-{hi:.2f}) "
            f"| {res['ratio_cpu']:.3f} | {ms['reverse_kl']} | {ms['jsd']} | {mem} |",
            flush=True,
        )
    size = (2048, 16) if args.quick else (32000, 64)
    acc = tail_term_accuracy(*size)
    print(
        f"\nfloat32 tail term β(X)·α^T·D_KL2, V={size[0]}, N={size[1]}, max α^T={acc['alpha_max']:.1e}: max rel. error "
        f"direct tail sum (tad) {acc['direct']:.1e}, KL − D_KL1 {acc['kl_minus_d_kl1']:.1e}"
    )


if __name__ == "__main__":
    main()
