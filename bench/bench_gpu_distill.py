"""End-to-end `tailkd distill` throughput on one GPU, side by side in one run: kd and tad, fused and dense loss layer,
and tad with a sharded teacher (--teacher.parallel fsdp: FSDP2 over one rank), for a Qwen1.5-1.8B-shaped teacher.

  PYTHONPATH=src python bench/bench_gpu_distill.py --out /tmp/gpu_distill          # one H200: ~6.5 min
  PYTHONPATH=src python bench/bench_gpu_distill.py --out /tmp/gpu_distill --compile   # + tad fused compiled (~+2 min)
  PYTHONPATH=src python bench/bench_gpu_distill.py --device cpu --tiny --out /tmp/gpu_distill_dry   # CPU dry run

Through a device tool (the command runs in the repository root, files written under $OUT come back): ::

  PYTHONPATH=src python bench/bench_gpu_distill.py --out "$OUT"

``$OUT`` then holds results.json, results.md and one folder per run (its stdout+stderr ``run.log``, metrics.jsonl,
summary.json, config.yaml): megabytes. The teacher, the corpus and the run folders live in --work (default: a new
temporary folder, removed at the end unless --keep-work), never under --out.

What it does:

1. Builds a teacher once (in a child process, so that this process never holds a CUDA context): a
   Qwen1.5-1.8B-shaped LlamaForCausalLM with random weights (V = 151936, d = 2048, MLP 5504, 24 layers, 16 heads,
   16 KV heads, untied embeddings: 1.84B parameters; Llama blocks because transformers 5's AutoTokenizer on a folder
   whose config says qwen2 ignores a custom tokenizer.json), saved in bf16 safetensors (3.7 GB), with a synthetic
   WordLevel tokenizer of exactly 151936 tokens "t0" ... "t151935" (whitespace split; "t0" is EOS/UNK). It checks
   that AutoTokenizer loads it with 151936 tokens and encodes "t5 t7" as [5, 7], and fails loudly otherwise.
   Throughput does not depend on the weights.
2. Writes a seeded corpus of random "t<id>" words (documents separated by blank lines), enough for every run.
3. Runs ``python -m tailkd.cli distill`` once per cell, each in its own process: a 12-layer student (1.23B),
   8 x 2048 tokens per step, --steps 8, bf16, held-out evaluation only before and after on one row, no periodic
   checkpoint. Cells: kd fused (--fused-loss on), tad fused, kd dense (--fused-loss off), tad dense, tad fused with
   --teacher.parallel fsdp (world size 1 still goes through FSDP2), and with --compile also tad fused with
   --train.compile true. After each run its final/ and checkpoints/ are deleted (the end-of-run checkpoint of a
   1.2B student with AdamW state is ~15 GB; the GPU machine's disk is 64 GB).

Reported per cell: the median of the ``tokens_per_s`` of the train lines of metrics.jsonl over the steps after the
first --skip-steps (default 2: start-up, Triton/compile warm-up and allocator growth excluded; tailkd times a step
with the host clock, the synchronisation of the logged loss and gradient norm included), summary.json's
``peak_memory_per_rank_bytes`` (torch.cuda.max_memory_allocated on CUDA; peak RSS on the CPU) and
``teacher_placement``, and the "loss layer:" line of the run's log. The script checks that the fused cells report a
fused loss layer, the dense ones full logits, and the fsdp cell a sharded teacher. A failed run or a missing cell is
reported and the script exits 1, unless --allow-missing.

Run time on one H200: teacher build + save 15-17 s, then 64-75 s per run on 2026-11-30 and ~105 s on 2026-12-04
(the 8 steps take 5-6 s of it; the rest is start-up, the held-out evaluations and writing the end-of-run
checkpoint; what grew was not split up then: the table now gives summary.json's phase_seconds beside each run's
wall time), ~6.5 min for the 5 cells on 2026-11-30 (the dense cells peak at 96 GiB).

On the CPU (``--device cpu --tiny``: V = 1000, d = 64, 4 layers, a 2-layer student, seq-len 64, batch 2, 3 steps,
fp32; the fsdp cell then runs FSDP2 over a one-process gloo group) it is only a dry run of the wiring, parsing and
table: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = {  # the teacher's shape
    "full": {"vocab": 151936, "hidden": 2048, "intermediate": 5504, "layers": 24, "heads": 16, "kv_heads": 16},
    "tiny": {"vocab": 1000, "hidden": 64, "intermediate": 172, "layers": 4, "heads": 4, "kv_heads": 4},
}
RUN_DEFAULTS = {  # student layers, seq-len, batch size, steps
    "full": {"student_layers": 12, "seq_len": 2048, "batch_size": 8, "steps": 8},
    "tiny": {"student_layers": 2, "seq_len": 64, "batch_size": 2, "steps": 3},
}
# name: (extra flags, expected loss layer prefix, expected teacher placement prefix)
CELLS = {
    "kd_fused": (["--loss", "kd", "--fused-loss", "on"], "fused", "replicated"),
    "tad_fused": (["--loss", "tad", "--fused-loss", "on"], "fused", "replicated"),
    "kd_dense": (["--loss", "kd", "--fused-loss", "off"], "full logits", "replicated"),
    "tad_dense": (["--loss", "tad", "--fused-loss", "off"], "full logits", "replicated"),
    "tad_fused_fsdp_teacher": (["--loss", "tad", "--fused-loss", "on", "--teacher.parallel", "fsdp"], "fused",
                               "sharded"),
}
COMPILE_CELL = {"tad_fused_compile": (["--loss", "tad", "--fused-loss", "on", "--train.compile", "true"], "fused",
                                      "replicated")}
T0 = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {message}", flush=True)


# --------------------------------------------------------------------------- the teacher (child process)


def build_teacher(folder: Path, preset: str, device: str, seed: int, info_path: Path) -> None:
    """Random Llama teacher of the preset's shape + the synthetic tokenizer, saved in ``folder``; checks the
    tokenizer through AutoTokenizer; writes the machine's description to ``info_path``."""
    import platform

    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = PRESETS[preset]
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_distill: --device cuda but no CUDA device is visible; use --device cpu --tiny for the "
                 "dry run")
    v = shape["vocab"]
    folder.mkdir(parents=True, exist_ok=True)
    core = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(v)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="t0", unk_token="t0", model_max_length=1 << 30)
    tok.save_pretrained(folder)
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=1))

    cfg = LlamaConfig(vocab_size=v, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model

    loaded = AutoTokenizer.from_pretrained(folder)
    ids = loaded("t5 t7")["input_ids"]
    problems = []
    if len(loaded) != v:
        problems.append(f"len(AutoTokenizer) = {len(loaded)}, expected {v}")
    if ids != [5, 7]:
        problems.append(f'AutoTokenizer encodes "t5 t7" as {ids}, expected [5, 7]')
    if loaded.eos_token_id != 0:
        problems.append(f"eos_token_id = {loaded.eos_token_id}, expected 0")
    if problems:
        sys.exit(f"bench_gpu_distill: the synthetic tokenizer in {folder} is wrong ({type(loaded).__name__}): "
                 + "; ".join(problems))
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "transformers": transformers.__version__}
    for name in ("triton", "tokenizers", "tailkd"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    info = {"device": name, "device_type": dev.type, "versions": versions, "teacher_params": n_params,
            "tokenizer_class": type(loaded).__name__, "cpu_count": os.cpu_count()}
    info_path.write_text(json.dumps(info, indent=1))


# --------------------------------------------------------------------------- the corpus


def write_corpus(path: Path, vocab: int, n_docs: int, words: int, seed: int) -> int:
    """Blank-line separated documents of ``words`` random "t<id>" words, ids 1..vocab-1 (0 is the EOS)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for d in range(n_docs):
            if d:
                f.write("\n\n")
            f.write(" ".join(f"t{rng.randrange(1, vocab)}" for _ in range(words)))
        f.write("\n")
    return n_docs * words


# --------------------------------------------------------------------------- one run


def run_env() -> dict:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_subprocess(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[int, float, bool]:
    """(exit code, seconds, timed out); stdout and stderr into ``log``; on timeout the whole process group goes, and
    so it does when this process is stopped (SIGTERM, e.g. from a time box around the script; `main` turns it into
    SystemExit): the run has a session of its own, which a signal to this script's group would not reach."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return rc, time.perf_counter() - t0, timed_out


def loss_layer_line(log_text: str) -> str | None:
    for line in log_text.splitlines():
        at = line.find("loss layer: ")
        if at >= 0:
            return line[at:].strip()
    return None


def tail(text: str, n: int = 15) -> str:
    return "\n".join(text.splitlines()[-n:])


def run_cell(name: str, spec: tuple, args, paths: dict, env: dict) -> dict:
    extra, want_layer, want_placement = spec
    run_dir = paths["runs"] / name
    keep = paths["out"] / "runs" / name
    keep.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "tailkd.cli", "distill", "--teacher", str(paths["teacher"]),
           "--data", str(paths["corpus"]), "--data.cache_dir", str(paths["cache"]),
           "--student-layers", str(args.student_layers), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--train.warmup_steps", "1",
           "--train.eval_every", "0", "--data.eval_rows", "1", "--train.save_every", "0", "--train.keep_last", "1",
           "--train.precision", args.precision, "--device", args.device, "--out", str(run_dir), *extra]
    say(f"run {name}: {' '.join(extra)}")
    rc, seconds, timed_out = run_subprocess(cmd, keep / "run.log", args.run_timeout, env)
    cell = {"run": name, "flags": extra, "exit_code": rc, "wall_s": round(seconds, 1), "errors": []}
    log_text = (keep / "run.log").read_text(errors="replace")
    if timed_out:
        cell["errors"].append(f"timed out after {args.run_timeout:.0f} s")
    elif rc != 0:
        cell["errors"].append(f"exit code {rc}")
    # what came out, even of a failed run
    for f in ("metrics.jsonl", "summary.json", "config.yaml"):
        if (run_dir / f).is_file():
            shutil.copy2(run_dir / f, keep / f)
    line = loss_layer_line(log_text)
    cell["loss_layer_line"] = line
    cell["loss_layer"] = line.split(": ", 1)[1].split("; teacher signal")[0] if line else None
    if line is None:
        cell["errors"].append('no "loss layer:" line in the log')
    elif not cell["loss_layer"].startswith(want_layer):
        cell["errors"].append(f"loss layer is {cell['loss_layer']!r}, expected {want_layer} ...")
    train = []
    if (run_dir / "metrics.jsonl").is_file():
        for text in (run_dir / "metrics.jsonl").read_text().splitlines():
            if text.strip():
                rec = json.loads(text)
                if rec.get("split") == "train" and "tokens_per_s" in rec:
                    train.append(rec)
    timed = [r["tokens_per_s"] for r in train if r["step"] > args.skip_steps]
    cell["tokens_per_s_all"] = [round(r["tokens_per_s"], 1) for r in train]
    cell["steps_timed"] = len(timed)
    cell["tokens_per_s_median"] = statistics.median(timed) if timed else None
    cell["losses"] = [round(r["loss"], 4) for r in train if "loss" in r]
    if not timed:
        cell["errors"].append(f"no train line with tokens_per_s after step {args.skip_steps} in metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    peaks = summary.get("peak_memory_per_rank_bytes")
    cell["peak_memory_per_rank_bytes"] = peaks
    cell["peak_memory_gib"] = max(peaks) / 2**30 if peaks else None
    cell["peak_memory_kind"] = summary.get("peak_memory_kind")
    cell["teacher_placement"] = summary.get("teacher_placement")
    cell["summary_loss_layer"] = summary.get("loss_layer")
    cell["phase_seconds"] = summary.get("phase_seconds")  # where the run's wall time went (tailkd.train.PHASES)
    if not summary:
        cell["errors"].append("no summary.json")
    else:
        if not peaks:
            cell["errors"].append("summary.json has no peak_memory_per_rank_bytes")
        if not str(cell["teacher_placement"] or "").startswith(want_placement):
            cell["errors"].append(f"teacher placement is {cell['teacher_placement']!r}, expected {want_placement} ...")
    if cell["errors"] and rc != 0:
        cell["log_tail"] = tail(log_text)
    for sub in ("final", "checkpoints"):  # ~5 GB and ~15 GB at the full size
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    med = cell["tokens_per_s_median"]
    status = "FAILED: " + "; ".join(cell["errors"]) if cell["errors"] else "OK"
    peak = cell["peak_memory_gib"]
    say(f"run {name}: {status} in {seconds:.0f} s" + (f"; tokens/s median {med:,.0f}" if med else "")
        + (f"; peak {peak:.1f} GiB" if peak else "") + f"; loss layer: {cell['loss_layer']}")
    if cell.get("log_tail"):
        print(cell["log_tail"], flush=True)
    return cell


# --------------------------------------------------------------------------- the table


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    v = m.get("versions", {})
    lines = [f"# tailkd distill end to end: {s['teacher_preset']} teacher ({result['teacher_params'] / 1e6:,.1f}M "
             f"parameters, V = {s['vocab']}), {s['student_layers']}-layer student, {s['batch_size']} x {s['seq_len']}"
             f" tokens per step, {s['steps']} steps, {s['precision']}",
             "",
             f"machine: {m.get('device')} ({m.get('device_type')}); torch {v.get('torch')} (CUDA {v.get('cuda')}), "
             f"transformers {v.get('transformers')}, triton {v.get('triton')}, tokenizers {v.get('tokenizers')}, "
             f"python {v.get('python')}; date {result['date']}; total {result['seconds']:.0f} s",
             "",
             f"tokens/s: median of metrics.jsonl's tokens_per_s over steps {s['skip_steps'] + 1}..{s['steps']}; peak "
             f"memory: summary.json peak_memory_per_rank_bytes ({result['peak_memory_kind'] or 'n/a'}); step-1 loss: "
             "the same data in every run (kd cells agree with each other, tad cells likewise, up to the loss layer's "
             "rounding); wall s: the whole run (start-up, held-out evaluations, end-of-run checkpoint included), then "
             "summary.json's phase_seconds: setup / steps / held-out evaluations / checkpoints / final outputs",
             "",
             "| run | loss layer | tokens/s (median) | peak memory GiB | teacher placement | step-1 loss | wall s "
             "(phases) |",
             "|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        med = f"{c['tokens_per_s_median']:,.0f}" if c.get("tokens_per_s_median") else "MISSING"
        mem = f"{c['peak_memory_gib']:.2f}" if c.get("peak_memory_gib") else "MISSING"
        name = c["run"] + (" (FAILED: " + "; ".join(c["errors"]) + ")" if c["errors"] else "")
        loss = f"{c['losses'][0]:.4f}" if c.get("losses") else "-"
        phases = c.get("phase_seconds")
        split = f" ({' / '.join(f'{v:.0f}' for v in phases.values())})" if phases else ""
        lines.append(f"| {name} | {c.get('loss_layer') or 'MISSING'} | {med} | {mem} | "
                     f"{c.get('teacher_placement') or 'MISSING'} | {loss} | {c['wall_s']:.0f}{split} |")
    if result["device_type"] == "cpu":
        lines += ["", "CPU dry run: checks the wiring only; the numbers mean nothing."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True, help="folder for results.json, results.md and the runs' logs")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a dry run, with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny teacher and runs (the CPU dry run)")
    ap.add_argument("--student-layers", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8; tiny 3)")
    ap.add_argument("--skip-steps", type=int, default=2, help="first steps left out of the median")
    ap.add_argument("--precision", default=None, choices=("bf16", "fp32", "auto"),
                    help="train.precision (default bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--compile", action="store_true", help="also a tad fused run with --train.compile true")
    ap.add_argument("--only", nargs="+", default=None, help="run only these cells (names as in the table)")
    ap.add_argument("--work", default=None, help="folder for the teacher, corpus and runs (default: a new temporary "
                                                 "folder, removed at the end)")
    ap.add_argument("--keep-work", action="store_true", help="keep --work (the teacher: 3.7 GB at full size)")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="seconds per run before it is killed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--allow-missing", action="store_true", help="exit 0 even when a run fails or a cell is missing")
    ap.add_argument("--_build-teacher", dest="build_teacher", nargs=3, metavar=("FOLDER", "PRESET", "INFO"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    preset = "tiny" if args.tiny else "full"
    for key, value in RUN_DEFAULTS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    args.preset = preset
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build_teacher:
        folder, preset, info = args.build_teacher
        build_teacher(Path(folder), preset, args.device, args.seed, Path(info))
        return 0
    # stopped from outside (a time box): unwind, so that the running run's process group is killed and --work removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_gpu_distill: stopped (SIGTERM)"))
    if args.steps <= args.skip_steps:
        sys.exit(f"bench_gpu_distill: --steps {args.steps} leaves no step after the first --skip-steps "
                 f"{args.skip_steps}")
    if args.device.startswith("cpu") and not args.tiny:
        say("warning: --device cpu without --tiny builds a 1.8B teacher and runs it on the CPU: hours")
    cells = dict(CELLS, **(COMPILE_CELL if args.compile else {}))
    if args.only:
        unknown = [n for n in args.only if n not in cells]
        if unknown:
            sys.exit(f"bench_gpu_distill: unknown cell(s) {unknown}; cells: {', '.join(cells)}")
        cells = {n: cells[n] for n in args.only}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    own_work = args.work is None
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tailkd-gpu-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = {"out": out, "teacher": work / "teacher", "corpus": work / "corpus.txt", "cache": work / "corpora",
             "runs": work / "runs"}
    paths["runs"].mkdir(exist_ok=True)
    free = shutil.disk_usage(work).free
    say(f"work folder {work} ({free / 1e9:.0f} GB free); results in {out}")
    if not args.tiny and free < 30e9:
        say(f"warning: {free / 1e9:.0f} GB free in {work}; a run needs ~25 GB (teacher 3.7 GB, end-of-run "
            "checkpoint ~15 GB, final/ ~5 GB)")
    env = run_env()
    shape = PRESETS[args.preset]
    try:
        # 1. the teacher, in a child process (no CUDA context here)
        say(f"building the {args.preset} teacher in {paths['teacher']} ({shape})")
        info_path = work / "machine.json"
        if paths["teacher"].exists():
            shutil.rmtree(paths["teacher"])
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--device", args.device,
               "--seed", str(args.seed), "--_build-teacher", str(paths["teacher"]), args.preset, str(info_path)]
        rc, seconds, _ = run_subprocess(cmd, out / "build_teacher.log", 1800.0, env)
        if rc != 0:
            print(tail((out / "build_teacher.log").read_text(errors="replace")), file=sys.stderr)
            sys.exit(f"bench_gpu_distill: building the teacher failed (exit code {rc}); log: "
                     f"{out / 'build_teacher.log'}")
        machine = json.loads(info_path.read_text())
        size = sum(p.stat().st_size for p in paths["teacher"].iterdir())
        say(f"teacher: {machine['teacher_params'] / 1e6:,.1f}M parameters, {size / 1e9:.2f} GB on disk, built in "
            f"{seconds:.0f} s; device {machine['device']}")

        # 2. the corpus: every run's rows + held-out (5% of the documents), with a margin
        need = (args.steps * args.batch_size + 2) * (args.seq_len + 1)
        words = 2 * args.seq_len
        n_docs = max(64, math.ceil(1.6 * need / words))
        total = write_corpus(paths["corpus"], shape["vocab"], n_docs, words, args.seed)
        say(f"corpus: {n_docs} documents x {words} words = {total:,} tokens (a run trains on {need:,})")

        # 3. the runs
        results = [run_cell(name, spec, args, paths, env) for name, spec in cells.items()]
    finally:
        if own_work and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    kinds = {c["peak_memory_kind"] for c in results if c.get("peak_memory_kind")}
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": time.perf_counter() - T0,
              "device_type": machine["device_type"], "machine": machine, "teacher_params": machine["teacher_params"],
              "peak_memory_kind": ", ".join(sorted(kinds)) or None, "argv": sys.argv[1:],
              "settings": {"teacher_preset": args.preset, **shape, "student_layers": args.student_layers,
                           "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
                           "skip_steps": args.skip_steps, "precision": args.precision, "corpus_docs": n_docs,
                           "corpus_words_per_doc": words},
              "cells": results}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "results.md").write_text(table)
    print(table, flush=True)
    failed = [c for c in results if c["errors"]]
    say(f"done: {len(results) - len(failed)} of {len(results)} runs OK; {out / 'results.md'}")
    if failed and not args.allow_missing:
        print(f"bench_gpu_distill: {len(failed)} run(s) failed or incomplete: " + "; ".join(
            f"{c['run']}: {', '.join(c['errors'])}" for c in failed) + f" (logs: {out}/runs/NAME/run.log)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
