"""The ``tailkd`` command: one entry point mapping subcommands to plain functions.

Errors a user can cause end in one line ``tailkd: error: ...`` and exit code 2; anything
unexpected ends in one line and exit code 1. ``--debug`` shows the traceback instead. A distill run
stopped by SIGINT / SIGTERM saves a checkpoint and exits with 130 / 143 (a second Ctrl-C: 130 at once).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from tailkd import __version__
from tailkd.errors import TailkdError


def _cmd_distill(args: argparse.Namespace) -> int:
    from tailkd.config import config_from_args

    cfg = config_from_args(args)  # config errors end here, before torch is even imported
    from tailkd.train import distill

    summary = distill(cfg)
    return int(summary.get("exit_code", 0))  # 130 / 143 when SIGINT / SIGTERM stopped the run (checkpoint saved)


# --------------------------------------------------------------------------- evaluation subcommands (evaluate.py,
# analysis.py, compare.py, flops.py, lmeval_tasks/)


def _finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and ±inf are refused with the flag's name, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _generate_options(args: argparse.Namespace) -> dict | None:
    if not args.generate:
        return None
    return {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "samples": args.samples,
            "temperature": args.temperature, "top_p": args.top_p, "limit": args.gen_limit or None, "seed": args.seed}


def _cmd_eval(args: argparse.Namespace) -> int:
    from tailkd.evaluate import evaluate_student, format_table

    result = evaluate_student(args.student, args.teacher, data=args.data, seq_len=args.seq_len,
                              batch_size=args.batch_size, max_rows=None if args.max_rows == 0 else args.max_rows,
                              bins=args.bins, split=args.split, device=args.device, teacher_dtype=args.teacher_dtype,
                              cache_dir=args.cache_dir, out=args.out, generate=_generate_options(args))
    print(format_table(result))
    print(f"saved {args.out}")
    return 0


def _add_eval(sub, common) -> None:
    p = sub.add_parser(
        "eval", parents=[common], help="held-out KL, perplexity, agreement, Full-ECE of a student vs a teacher",
        description="Evaluate a saved student (any HF causal-LM folder, e.g. RUN/final) against a teacher on "
        "held-out data: KL(teacher‖student), reverse KL, CLM loss and perplexity of both, top-1 agreement, "
        "Full-ECE and top-1 ECE of both. Streams over batches (sums, one division at the end). Teacher, data "
        "and seq-len default to the run's config.yaml when the student sits in a run folder.",
    )
    p.add_argument("--student", required=True, help="student model folder (e.g. runs/x/final)")
    p.add_argument("--teacher", default=None, help="teacher spec: smollm2, an HF folder or a .gguf "
                   "(default: the run's teacher, else smollm2)")
    p.add_argument("--data", nargs="+", default=None, help="text/.jsonl/.parquet files or folders "
                   "(default: the run's data, else the built-in corpus)")
    p.add_argument("--split", default="heldout", choices=("heldout", "train", "all"),
                   help="which documents: the held-out split tailkd distill uses (default), train, or all")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="tokens per row (default: the run's, else "
                   "distill's default)")
    p.add_argument("--batch-size", type=_positive_int, default=4,
                   help="rows per forward pass (results do not depend on it)")
    p.add_argument("--max-rows", type=int, default=64, help="evaluate at most this many rows (0: all)")
    p.add_argument("--bins", type=_positive_int, default=10, help="calibration bins M on [0, 1] for Full-ECE and ECE")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--teacher-dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="teacher weights: auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--cache-dir", default=None, help="tokenised-corpus cache (default: ~/.cache/tailkd)")
    p.add_argument("--out", default="eval.json",
                   help="JSON file for the results (e.g. RUN/eval.json for tailkd compare)")
    g = p.add_argument_group("generation-based evaluation (prompt -> response data, e.g. after --task sft)")
    g.add_argument("--generate", action="store_true",
                   help="decode held-out prompts with student and teacher and score exact match of the final "
                   "answer ('#### N', else 'the answer is N', else the last number); --data then names "
                   "prompt/response JSONL (default: the run's SFT held-out split, else built-in math problems)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens generated per prompt")
    g.add_argument("--samples", type=int, default=0,
                   help="sampled completions per prompt besides greedy (>= 2 adds Distinct-n and Self-BLEU)")
    g.add_argument("--temperature", type=_finite_float, default=1.0, help="sampling temperature")
    g.add_argument("--top-p", type=_finite_float, default=1.0, help="nucleus sampling p")
    g.add_argument("--gen-limit", type=int, default=20, help="evaluate the first N prompts (0: all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=_cmd_eval)


def _cmd_analyze_teacher(args: argparse.Namespace) -> int:
    from tailkd.analysis import analyze_teachers, format_summary

    results = analyze_teachers(args.teacher, data=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                               max_rows=None if args.max_rows == 0 else args.max_rows, split=args.split,
                               kmax=args.kmax, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
                               out_dir=args.out)
    print(format_summary(results))
    print(f"saved {args.out}/teacher_analysis.json and {args.out}/teacher_tail_mass.png")
    return 0


def _add_analyze_teacher(sub, common) -> None:
    p = sub.add_parser(
        "analyze-teacher", parents=[common], help="teacher tail mass α_K (K=1..100) and mode mismatch (paper Fig. 2)",
        description="For one or more teachers on a corpus: the tail mass α_K = 1 − Σ top-K p averaged over "
        "positions with quartiles, K = 1..100, and the rate at which the teacher's argmax differs from the "
        "actual next token. Writes teacher_analysis.json and a two-panel PNG.",
    )
    p.add_argument("--teacher", nargs="+", default=["smollm2"], help="teacher specs (smollm2, HF folders, .gguf)")
    p.add_argument("--data", nargs="+", default=None, help="text/.jsonl/.parquet files or folders (default: built-in)")
    p.add_argument("--split", default="heldout", choices=("heldout", "train", "all"), help="which documents")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per row")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="rows per forward pass")
    p.add_argument("--max-rows", type=int, default=32, help="analyse at most this many rows (0: all)")
    p.add_argument("--kmax", type=_positive_int, default=100, help="largest K of the tail-mass curve")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="teacher weights dtype")
    p.add_argument("--cache-dir", default=None, help="tokenised-corpus cache (default: ~/.cache/tailkd)")
    p.add_argument("--out", default="teacher_analysis", help="output folder")
    p.set_defaults(func=_cmd_analyze_teacher)


def _cmd_compare(args: argparse.Namespace) -> int:
    from tailkd.compare import compare_runs

    result = compare_runs(args.runs, baseline=args.baseline, out_dir=args.out)
    print(result["markdown"])
    print(f"saved {result['table']} and {result['plot']}")
    return 0


def _add_compare(sub, common) -> None:
    p = sub.add_parser(
        "compare", parents=[common], help="several runs side by side: held-out KL curves and a table (paper Fig. 1)",
        description="Plot held-out KL vs training tokens of several runs (metrics.jsonl) and tabulate final held-out "
        "KL, perplexity, Full-ECE (RUN/eval.json), agreement, tokens, wall time and FLOPs, with "
        "Rel = 100·ln(metric / baseline). Writes compare.md, compare.json and heldout_kl.png.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by tailkd distill")
    p.add_argument("--baseline", default=None, help="run for the relative change (e.g. the vanilla KD run)")
    p.add_argument("--out", default="compare", help="output folder")
    p.set_defaults(func=_cmd_compare)


def _flops_size(spec, params, *, vocab, hidden, layers, tied, role):
    from tailkd.flops import ModelSize, size_from_spec

    if spec is not None:
        return size_from_spec(spec)
    if params is None:
        raise TailkdError(f"give --{role} SPEC (model folder, config.json, .gguf, smollm2) or --{role}-params N")
    if vocab is None or hidden is None:
        raise TailkdError(f"--{role}-params needs --vocab and --hidden "
                          "(and --student-hidden if the student is narrower)")
    return ModelSize.from_total(role, params, vocab=vocab, hidden=hidden, layers=layers or 0, tied=tied)


def _cmd_flops(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tailkd.flops import format_method_table, method_table, model_flops_per_token, size_from_spec, size_to_dict

    teacher = _flops_size(args.teacher, args.teacher_params, vocab=args.vocab, hidden=args.hidden,
                          layers=args.teacher_layers, tied=args.teacher_tied, role="teacher")
    student = _flops_size(args.student, args.student_params, vocab=args.vocab,
                          hidden=args.student_hidden or args.hidden, layers=args.student_layers,
                          tied=args.student_tied, role="student")
    reference = size_from_spec(args.reference) if args.reference else None
    rows = method_table(teacher, student, seq_len=args.seq_len, tokens=args.tokens, delta=args.delta,
                        reference_cfg=reference, reference_params=args.reference_params, prompt_len=args.prompt_len,
                        gen_len=args.gen_len, ppo_epochs=args.ppo_epochs, freeze_embeddings=args.freeze_embeddings)
    t = model_flops_per_token(teacher, seq_len=args.seq_len)
    s = model_flops_per_token(student, seq_len=args.seq_len)
    print(format_method_table(rows, t, s, tokens=args.tokens, seq_len=args.seq_len))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"teacher": size_to_dict(teacher), "student": size_to_dict(student),
                                             "seq_len": args.seq_len, "tokens": args.tokens, "methods": rows},
                                            indent=1))
        print(f"saved {args.out}")
    return 0


def _add_flops(sub, common) -> None:
    p = sub.add_parser(
        "flops", parents=[common], help="FLOPs of KD, TAD, MiniPLM, SeqKD, MiniLLM per 1M tokens (paper Table 3)",
        description="Estimate PetaFLOPs per training tokens for vanilla KD, TAD, MiniPLM-style teacher scoring and "
        "generation-based methods, from model folders / config.json files (no weights read) or from sizes. "
        "Counting rules: see tailkd.flops and docs/evaluation.md.",
    )
    p.add_argument("--teacher", default=None, help="teacher: model folder, config.json, .gguf or smollm2")
    p.add_argument("--student", default=None, help="student: model folder, config.json, .gguf or smollm2")
    p.add_argument("--teacher-params", type=_finite_float, default=None, help="teacher total parameters (e.g. 1.8e9)")
    p.add_argument("--student-params", type=_finite_float, default=None, help="student total parameters (e.g. 1.2e9)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (with --*-params)")
    p.add_argument("--hidden", type=int, default=None, help="teacher hidden size d (with --*-params)")
    p.add_argument("--student-hidden", type=int, default=None, help="student hidden size (default: --hidden)")
    p.add_argument("--teacher-layers", type=int, default=None, help="teacher layers (attention term; with --*-params)")
    p.add_argument("--student-layers", type=int, default=None, help="student layers (attention term; with --*-params)")
    p.add_argument("--teacher-tied", action="store_true",
                   help="with --teacher-params: its LM head is tied to the embedding")
    p.add_argument("--student-tied", action="store_true",
                   help="with --student-params: its LM head is tied to the embedding")
    p.add_argument("--seq-len", type=_positive_int, default=2048, help="tokens per training row (attention term)")
    p.add_argument("--tokens", type=_finite_float, default=1e6, help="training tokens to count (default 1M, as Table 3)")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="student embeddings/head frozen (no head weight grad)")
    p.add_argument("--delta", type=_finite_float, default=0.5, help="MiniPLM difference-sampling ratio δ")
    p.add_argument("--reference", default=None, help="MiniPLM reference model (folder/config.json)")
    p.add_argument("--reference-params", type=_finite_float, default=125e6, help="MiniPLM reference model parameters")
    p.add_argument("--prompt-len", type=int, default=128, help="generation methods: prompt tokens per sequence")
    p.add_argument("--gen-len", type=_positive_int, default=256, help="generation methods: generated tokens per prompt")
    p.add_argument("--ppo-epochs", type=int, default=4, help="MiniLLM: policy-update passes per rollout")
    p.add_argument("--out", default=None, help="also write the table as JSON")
    p.set_defaults(func=_cmd_flops)


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from tailkd.lmeval_tasks import format_results, lm_eval_student

    res = lm_eval_student(args.model, args.tasks, data=args.data, split=args.split, gsm_data=args.gsm_data,
                          work_dir=args.work_dir, max_gen_toks=args.max_gen_toks, cache_dir=args.cache_dir,
                          batch_size=args.batch_size, device=args.device, limit=args.limit,
                          num_fewshot=args.num_fewshot, out=None if args.write_only else args.out,
                          write_only=args.write_only)
    if args.write_only:
        print(f"tasks written to {res['include_path']}; run:\n{res['command']}")
        return 0
    print(format_results(res["results"]))
    print(f"saved {args.out}")
    return 0


def _add_lm_eval(sub, common) -> None:
    p = sub.add_parser(
        "lm-eval", parents=[common], help="run lm-evaluation-harness on a saved student (needs tailkd[eval])",
        description="Run lm-evaluation-harness (--model hf) on a saved student. Our offline tasks: tailkd_ppl "
        "(perplexity of held-out documents) and tailkd_gsm (GSM-style exact match on --gsm-data). 'paper' "
        "expands to the paper's standard tasks (they download data: run with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0).",
    )
    p.add_argument("--model", required=True, help="saved model folder (e.g. runs/x/final)")
    p.add_argument("--tasks", default="tailkd_ppl",
                   help="comma-separated: tailkd_ppl, tailkd_gsm, paper, lm-eval names")
    p.add_argument("--data", nargs="+", default=None, help="tailkd_ppl documents: text/.jsonl/.parquet "
                   "(default: the run's data, else the built-in corpus)")
    p.add_argument("--split", default="heldout", choices=("heldout", "all"),
                   help="tailkd_ppl: held-out documents or all")
    p.add_argument("--gsm-data", default=None,
                   help='tailkd_gsm problems: .jsonl of {"question", "answer": "... #### N"}')
    p.add_argument("--max-gen-toks", type=_positive_int, default=256, help="tailkd_gsm: generated tokens at most")
    p.add_argument("--limit", type=_finite_float, default=None, help="at most this many documents per task (lm-eval --limit)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (lm-eval --num_fewshot)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="lm-eval batch size")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--work-dir", default=None, help="where task YAMLs + data are written (default: a temp folder; "
                   "with --write-only: ./lm_eval_tasks)")
    p.add_argument("--write-only", action="store_true", help="only write the task folder and print the lm_eval command")
    p.add_argument("--cache-dir", default=None, help="tokenised-corpus cache (default: ~/.cache/tailkd)")
    p.add_argument("--out", default="lm_eval.json", help="JSON file for lm-eval's results")
    p.set_defaults(func=_cmd_lm_eval)


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    from tailkd.cache import cache_teacher, format_size_table

    meta = cache_teacher(args.teacher, data=args.data, seq_len=args.seq_len, k=args.k, out=args.out,
                         hidden_states=args.hidden_states, hidden_dtype=args.hidden_dtype,
                         tail_samples=args.tail_samples, split=args.split, batch_size=args.batch_size,
                         rows_per_shard=args.rows_per_shard, max_rows=args.max_rows, device=args.device,
                         dtype=args.dtype, cache_dir=args.cache_dir, doc_sep=args.doc_sep,
                         heldout_fraction=args.heldout_fraction, seed=args.seed)
    tokens = meta["num_rows"] * meta["corpus"]["seq_len"]
    print(f"cached {meta['num_rows']} rows x {meta['corpus']['seq_len']} tokens = {tokens:,} tokens in "
          f"{meta['num_shards']} shard(s): {meta['bytes_per_token']} bytes/token, "
          f"{meta['bytes_per_token'] * tokens / 1e9:.3f} GB ({meta['bytes_per_token']:,} GB per billion tokens)")
    hidden = meta["hidden_states"]
    print(format_size_table(meta["k"], hidden_size=meta["teacher"]["hidden_size"],
                            hidden_dtype=hidden["dtype"] if hidden else args.hidden_dtype,
                            tail_samples=args.tail_samples or 16))
    return 0


def _add_cache_teacher(sub, common) -> None:
    from tailkd.config import DataConfig

    p = sub.add_parser(
        "cache-teacher", parents=[common], help="run the teacher once over the training rows; write a top-K cache",
        description="Run the teacher once over the packed rows tailkd distill would train on (same --data, "
        "--seq-len, doc separator and held-out fraction) and write safetensors shards of its top-K ids (int32), "
        "their true log-probabilities and the log tail mass; optionally its final hidden states (exact losses at "
        "train time) and sampled tail tokens (unbiased tail estimate). Resumable: rerun the same command.",
    )
    p.add_argument("--teacher", default="smollm2", help="teacher spec: smollm2, an HF folder or a .gguf")
    p.add_argument("--data", nargs="+", default=None, help="text/.jsonl/.parquet files or folders (default: built-in)")
    p.add_argument("--seq-len", type=_positive_int, default=DataConfig().seq_len,
                   help="tokens per packed row (as tailkd distill)")
    p.add_argument("--k", type=_positive_int, default=64, help="teacher top-K ids cached per token")
    p.add_argument("--out", required=True, help="cache folder (resumed if it holds a cache with the same settings)")
    p.add_argument("--hidden-states", action="store_true", help="also cache the teacher's final hidden states")
    p.add_argument("--hidden-dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="hidden-state dtype")
    p.add_argument("--tail-samples", type=int, default=0, help="M tail tokens sampled per position (0: none)")
    p.add_argument("--split", default="train", choices=("train", "heldout"), help="which rows to cache")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="rows per teacher forward")
    p.add_argument("--rows-per-shard", type=int, default=None, help="rows per shard (default: ~256 MiB shards)")
    p.add_argument("--max-rows", type=int, default=0, help="cache only the first N rows (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="teacher weights dtype")
    p.add_argument("--cache-dir", default=None, help="tokenised-corpus cache (default: ~/.cache/tailkd)")
    p.add_argument("--doc-sep", default="auto", choices=("auto", "blank_line", "line", "file"),
                   help="document separator in text files (as data.doc_sep)")
    p.add_argument("--heldout-fraction", type=_finite_float, default=DataConfig().heldout_fraction,
                   help="as data.heldout_fraction")
    p.add_argument("--seed", type=int, default=0, help="seed of the tail samples")
    p.set_defaults(func=_cmd_cache_teacher)


def _cmd_recipe(args: argparse.Namespace) -> int:
    from tailkd.recipe import run_recipe

    run_recipe(args.recipe, args.out)
    return 0


def _cmd_losses(args: argparse.Namespace) -> int:
    from tailkd.registry import LOSSES

    head = ("loss", "per token", "knobs (loss.*)", "needs", "chunked form", "top-K cache", "source")
    rows = [(s.name, s.formula, ", ".join(s.knobs) or "-",
             ", ".join(n for n, on in (("teacher", s.needs_teacher), ("labels", s.needs_labels),
                                       ("teacher top-K and ᾱ(X)", s.tail_weight)) if on) or "-",
             "closed-form kernel" if s.kernel else "autograd per chunk" if s.needs_teacher else "-",
             "D_KL1 (+ tail estimate)" if s.sparse else "-", s.source) for s in LOSSES.values()]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return 0


def _add_recipe(sub, common) -> None:
    p = sub.add_parser(
        "recipe", parents=[common], help="run a multi-stage recipe (e.g. domain distillation, then SFT distillation)",
        description="Run the stages of a recipe YAML in order (keys: out_dir, common, stages); a stage without "
        "student.path starts from the previous stage's final student. Re-running skips finished stages and "
        "resumes an interrupted one. Example: configs/math-two-stage.yaml.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--out", default=None, help="root folder of the stages (default: the recipe's out_dir)")
    p.set_defaults(func=_cmd_recipe)


def build_parser() -> argparse.ArgumentParser:
    from tailkd.config import add_config_flags

    parser = argparse.ArgumentParser(
        prog="tailkd",
        description="Knowledge distillation of causal language models: Tail-Aware Distillation (TAD), "
        "DRKL and the usual baselines, offline by default.",
    )
    parser.add_argument("--version", action="version", version=f"tailkd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "distill", parents=[common], help="distil a teacher into a student (built-in offline default)",
        description="Distil a teacher into a student. With no arguments: the built-in SmolLM2-135M teacher, "
        "a 6-layer student built from it, TAD (K=10, beta=2) on a built-in news corpus, on this machine.",
    )
    add_config_flags(p)
    p.set_defaults(func=_cmd_distill)
    _add_eval(sub, common)
    _add_analyze_teacher(sub, common)
    _add_compare(sub, common)
    _add_flops(sub, common)
    _add_lm_eval(sub, common)
    _add_cache_teacher(sub, common)
    _add_recipe(sub, common)
    p = sub.add_parser("losses", parents=[common], help="list the losses of the registry (tailkd.registry.LOSSES)",
                       description="The losses --loss accepts: formula, knobs, chunked and top-K-cache forms, source.")
    p.set_defaults(func=_cmd_losses)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except TailkdError as exc:
        if debug:
            raise
        print(f"tailkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("tailkd: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns surprises into one line
        if debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"tailkd: error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
