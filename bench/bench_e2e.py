"""End to end: tokens/s of a distillation step with the online teacher vs the teacher cache.

A step = teacher signal (online forward, or reading the cache) + student forward/backward + loss; the AdamW update
itself is identical across modes and not applied (the gradients are dropped).
Modes (all interleaved step by step; median and min step time; tokens/s = B·T / step time; on a shared machine
the min is the least disturbed estimate):

- online/dense:   teacher forward -> full logits; student logits; `objective` (the current trainer)
- online/fused:   teacher + student final hidden states -> `objective.chunked_objective` (never [B, T, V])
- cache-topk:     top-K cache (K=64 truncated to loss.k) -> D_KL1 (dense `Divergence.sparse_per_token` / chunked
                  sparse path)
- cache-samples:  + 16 tail samples -> D_KL1 + unbiased tail estimate (fused sparse path)
- cache-hidden:   cached bf16 teacher hidden states + stored head -> exact TAD (fused)

  python bench/bench_e2e.py --teacher smollm2 --seq-len 128 --batch-size 4 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe, header  # bench/ is this script's folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--student-layers", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode (after one warm-up step)")
    ap.add_argument("--cache-k", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tail-samples", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--work", default=None, help="folder for the caches (default: a temporary folder, removed at "
                                                 "the end)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1 (timed steps per mode)")
    if args.k > args.cache_k:
        ap.error(f"--k {args.k} is above --cache-k {args.cache_k}: the caches hold the top --cache-k ids")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tailkd-e2e-"))
    try:
        run(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    """Write the three caches into ``work``, time the modes, print the table and write --out."""
    setting = describe("transformers")
    print(header(setting, torch.get_num_threads()), flush=True)

    from tailkd import cache, models
    from tailkd import corpus as corpus_mod
    from tailkd import data as data_mod
    from tailkd import teacher as teacher_mod
    from tailkd import vocab as vocab_mod
    from tailkd.config import LossConfig
    from tailkd.objective import step_terms
    from tailkd.student import build_student

    torch.manual_seed(0)
    teacher, tok = models.load_teacher(args.teacher, dtype="fp32")
    student, _ = build_student(teacher, num_layers=args.student_layers, seed=0)
    vocab = vocab_mod.check_vocab(tok, tok, teacher, student)
    root = corpus_mod.default_cache_root()
    info = corpus_mod.prepare_corpus_cached(corpus_mod.default_corpus_files(root), tok, root / "corpora",
                                            tokenizer_fingerprint=vocab_mod.tokenizer_fingerprint(tok))
    rows = data_mod.PackedRows(info.train_bin, args.seq_len)
    n_rows = args.batch_size * (args.steps + 1)
    corpus = {"fingerprint": info.fingerprint, "split": "train", "eos_id": info.eos_id,
              "settings": {"doc_sep": "auto", "heldout_fraction": 0.05}}
    caching = {}
    for name, kw in (("topk", {}), ("samples", {"tail_samples": args.tail_samples}),
                     ("hidden", {"hidden_states": True, "hidden_dtype": "bf16"})):
        t0 = time.perf_counter()
        meta = cache.write_cache(teacher, tok, rows, work / name, k=args.cache_k, corpus=corpus,
                                 teacher_name=args.teacher, max_rows=n_rows, batch_size=args.batch_size,
                                 log=lambda *_: None, **kw)
        seconds = time.perf_counter() - t0
        caching[name] = {"seconds": seconds, "tokens_per_s": n_rows * args.seq_len / seconds,
                         "bytes_per_token": meta["bytes_per_token"],
                         "disk_bytes": sum(p.stat().st_size for p in (work / name).iterdir())}
    cfg = LossConfig(name="tad", k=args.k, beta=2.0)
    readers = {name: teacher_mod.CachedTeacher(cache.CacheReader(work / name, k=args.k, seq_len=args.seq_len,
                                                                 corpus_fingerprint=info.fingerprint))
               for name in caching}
    online_dense = teacher_mod.OnlineTeacher(teacher, vocab, fused_path=False)
    online_fused = teacher_mod.OnlineTeacher(teacher, vocab, fused_path=True)
    modes = {  # name: (teacher source, fused path)
        "online/dense": (online_dense, False), "online/fused": (online_fused, True),
        "cache-topk/dense": (readers["topk"], False), "cache-topk/fused": (readers["topk"], True),
        "cache-samples/fused": (readers["samples"], True), "cache-hidden/fused": (readers["hidden"], True),
    }
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    sampler = data_mod.RowSampler(n_rows, seed=0, shuffle=False)
    batches = [next(data_mod.batches(rows, sampler, args.batch_size)) for _ in range(args.steps + 1)]
    times = {m: [] for m in modes}
    losses = {m: [] for m in modes}
    names = list(modes)
    for step, batch in enumerate(batches):
        order = names[step % len(names):] + names[: step % len(names)]
        for m in order:
            source, fused_path = modes[m]
            n_valid = int((batch["labels"] != -100).sum())
            t0 = time.perf_counter()
            signal = source(batch)
            terms = step_terms(student, batch, signal, n_valid, cfg, vocab_size=vocab, fused_path=fused_path,
                               chunk_size=args.chunk)
            terms.loss.backward()
            optimizer.zero_grad(set_to_none=True)  # the update itself is identical across modes: not applied
            dt = time.perf_counter() - t0
            if step > 0:
                times[m].append(dt)
                losses[m].append(float(terms.loss.detach()))
    tokens = args.batch_size * args.seq_len
    result = {"machine": platform.machine(), **setting, "threads": torch.get_num_threads(), "argv": sys.argv[1:],
              "loadavg_end": os.getloadavg(),
              "teacher": args.teacher, "vocab": vocab, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "student_layers": args.student_layers, "k": args.k, "cache_k": args.cache_k, "caching": caching,
              "modes": {m: {"median_step_s": statistics.median(ts), "tokens_per_s": tokens / statistics.median(ts),
                            "min_step_s": min(ts), "tokens_per_s_at_min": tokens / min(ts),
                            "all_s": ts, "mean_loss": statistics.mean(losses[m]),
                            "description": cache.cache_loss_description(
                                readers[m.split("/")[0].split("-")[1]].reader.meta, "tad", k=args.k)
                            if m.startswith("cache") else "tad: exact, online teacher"}
                        for m, ts in times.items()}}
    for m, r in result["modes"].items():
        print(f"{m:22s} median {r['median_step_s'] * 1e3:8.0f} ms/step {r['tokens_per_s']:8.0f} tok/s | min "
              f"{r['min_step_s'] * 1e3:8.0f} ms/step {r['tokens_per_s_at_min']:8.0f} tok/s | loss {r['mean_loss']:.4f}")
    for name, c in caching.items():
        print(f"caching {name:8s} {c['tokens_per_s']:8.0f} tok/s  {c['bytes_per_token']} B/token")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
