"""The ``tailkd`` command: one entry point mapping subcommands to plain functions.

Every subcommand's flags come from a typed config (`tailkd.config.add_config_flags`): ``distill`` from
`tailkd.config.DistillConfig` (run by `tailkd.train.distill`), the others (``COMMANDS`` below) from
`tailkd.command_config` (run by the functions of `tailkd.commands`). So each takes ``--config YAML`` mirroring
its sections, ``--section.field`` flags and the short aliases, and reports a bad value the same way.

Errors a user can cause end in one line ``tailkd: error: ...`` and exit code 2 (so does a path with a name longer
than the filesystem allows, wherever it is first read); anything unexpected ends in one line and exit code 1.
``--debug`` shows the traceback instead. A distill run stopped by SIGINT / SIGTERM saves a checkpoint and exits with
130 / 143 (a second Ctrl-C: 130 at once); so do ``recipe`` and ``reproduce`` when a signal stops one of their runs.
Any other command stopped by Ctrl-C or SIGTERM unwinds (its temporary folders removed, no output half written), prints
one line and exits with 130 / 143; a second SIGTERM ends it at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
import warnings

from tailkd import __version__
from tailkd import command_config as cc  # the subcommands' typed configs (no torch: importing them is cheap)
from tailkd.errors import TailkdError, Terminated


def _cmd_distill(args: argparse.Namespace) -> int:
    from tailkd.config import config_from_args

    cfg = config_from_args(args)  # config errors end here, before torch is even imported
    from tailkd.train import distill

    summary = distill(cfg)
    return int(summary.get("exit_code", 0))  # 130 / 143 when SIGINT / SIGTERM stopped the run (checkpoint saved)


# --------------------------------------------------------------------------- the other subcommands: one typed config
# each (tailkd.command_config), one plain function each (tailkd.commands)

# name: (config class, its function: a name in tailkd.commands or "module.name" in tailkd, --help line, description)
COMMANDS = {
    "eval": (
        cc.EvalConfig, "evaluate", "held-out KL, perplexity, agreement, Full-ECE of a student vs a teacher",
        "Evaluate a saved student (any HF causal-LM folder, e.g. RUN/final) against a teacher on held-out data: "
        "KL(teacher‖student), reverse KL, CLM loss and perplexity of both, top-1 agreement, Full-ECE and top-1 ECE "
        "of both. Streams over batches (sums, one division at the end). The teacher and data settings not given "
        "are those of the student's run (RUN/config.yaml), so the held-out rows are the ones the run held out. "
        "With --generate: exact match and diversity of decoded held-out prompts instead."),
    "analyze-teacher": (
        cc.AnalyzeTeacherConfig, "analyze_teacher",
        "teacher tail mass α_K (K=1..kmax, 100) and mode mismatch (paper Fig. 2)",
        "For one or more teachers on a corpus: the tail mass α_K = 1 − Σ top-K p averaged over positions with "
        "quartiles, K = 1..--kmax (default 100), and the rate at which the teacher's argmax differs from the actual "
        "next token. Writes teacher_analysis.json and a two-panel PNG."),
    "compare": (
        cc.CompareConfig, "compare", "several runs side by side: held-out KL curves and a table (paper Fig. 1)",
        "Plot held-out KL vs training tokens of several runs (metrics.jsonl) and tabulate final held-out KL, "
        "perplexity, Full-ECE (RUN/eval.json), agreement, tokens, training time and FLOPs, with "
        "Rel = 100·ln(metric / baseline); with generation results (tailkd eval --generate --out "
        "RUN/generate.json) also ROUGE-L, Distinct-2 and Self-BLEU, and a fidelity-vs-diversity scatter plot; "
        "with lm-eval results (tailkd lm-eval --out RUN/lm_eval.json) the mean task accuracy and Rel̄ = the mean "
        "over tasks of Rel (paper Table 1). Writes compare.md, compare.json, heldout_kl.png (and "
        "fidelity_diversity.png)."),
    "flops": (
        cc.FlopsConfig, "flops", "FLOPs of KD, TAD, MiniPLM, SeqKD, MiniLLM per 1M tokens (paper Table 3)",
        "Estimate PetaFLOPs per training tokens for vanilla KD, TAD, MiniPLM-style teacher scoring and "
        "generation-based methods, from model folders / config.json files (no weights read) or from sizes. "
        "Counting rules: see tailkd.flops and docs/evaluation.md."),
    "lm-eval": (
        cc.LmEvalConfig, "lm_eval", "run lm-evaluation-harness on a saved student (needs tailkd[eval])",
        "Run lm-evaluation-harness (--model hf) on a saved student. Our offline tasks: tailkd_ppl (perplexity of "
        "held-out documents; the data settings not given are those of the model's run) and tailkd_gsm (GSM-style "
        "exact match on --gsm-data). 'paper' expands to the paper's standard tasks (they download data: run with "
        "HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0)."),
    "cache-teacher": (
        cc.CacheTeacherConfig, "cache_teacher", "run the teacher once over the training rows; write a top-K cache",
        "Run the teacher once over the rows tailkd distill would train on (the same data settings: --data, "
        "--seq-len, doc separator, held-out fraction; with --task sft the prompt/response rows of an SFT run, its "
        "--data.sft_mode, chat template and --heldout-data) and write safetensors shards of its top-K ids (int32), "
        "their true log-probabilities and the log tail mass; optionally its final hidden states (exact losses at train "
        "time) and sampled tail tokens (unbiased tail estimate). Resumable: rerun the same command."),
    "select-data": (
        cc.SelectDataConfig, "select_data", "MiniPLM difference sampling: keep the documents a teacher prefers",
        "MiniPLM's data selection (the TAD paper's pretraining baseline): score every document of --data by the "
        "mean over its tokens of log p_teacher − log p_reference, keep the --keep fraction with the highest "
        "scores (ties to the earlier document) and write them as selected.jsonl; pretrain on it with tailkd "
        "distill --loss clm. The reference is a smaller model (e.g. a CLM run's final student); with another "
        "tokenizer than the teacher's (the paper's OPT-125M), each model scores a document in its own tokenization "
        "and the score is the log-likelihood ratio per UTF-8 byte. Also writes scores.jsonl and selection.json "
        "(the score used, tokens scored by each model, counts, FLOPs)."),
    "seqkd-data": (
        cc.SeqkdDataConfig, "seqkd.seqkd_data", "SeqKD data: the teacher's responses to prompts, as SFT JSONL",
        "Sequence-level KD (Kim & Rush 2016; SeqKD, a baseline of the TAD paper): the teacher answers the prompts of "
        "--data (prompt JSONL, responses optional: they are replaced), greedily by default or sampled "
        "(--temperature, --top-p, --samples per prompt), rendered with the chat template as tailkd distill --task "
        "sft renders them; responses that reach --max-new-tokens without ending are dropped unless "
        "--keep-unfinished, empty ones always. Writes responses.jsonl (train on it: tailkd distill --task sft --data "
        "OUT/responses.jsonl, with --loss clm as published) and seqkd.json (settings, counts, tokens)."),
    "reproduce": (
        cc.ReproduceConfig, "reproduce.reproduce", "the TAD paper's experiments over seeds, and a report of them",
        "Run CLM, KD and TAD over several seeds, a TAD β sweep and K sweep, evaluate every student on a held-out "
        "corpus of its own (default builtin:pydoc, another source than the news corpus trained on), analyse the "
        "teacher's tail, and write OUT/report.md with Fig. 1 (held-out KL with seed bands), Fig. 2 (α_K, mode "
        "mismatch), the sweeps and tables of mean ± std. The teacher/student/data/train flags are distill's and "
        "apply to every run; --scale multiplies the steps. Re-running continues a stopped or killed reproduction. "
        "The default size takes about 35 minutes on a 2-core CPU."),
}


def _cmd_command(args: argparse.Namespace) -> int:
    from tailkd.config import config_from_args

    cls, function, _, _ = COMMANDS[args.command]
    cfg = config_from_args(args, cls)  # config errors end here, before torch is even imported
    import importlib

    module, _, name = function.rpartition(".")  # "evaluate" is tailkd.commands.evaluate
    result = getattr(importlib.import_module(f"tailkd.{module or 'commands'}"), name)(cfg)
    return int(result.get("exit_code", 0)) if isinstance(result, dict) else 0  # reproduce: 130/143 when stopped


def _cmd_recipe(args: argparse.Namespace) -> int:
    from tailkd.config import merge, parse_assignment
    from tailkd.recipe import run_recipe

    overrides: dict = {}
    for text in args.set:
        overrides = merge(overrides, parse_assignment(text))
    summaries = run_recipe(args.recipe, args.out, overrides)
    if summaries and summaries[-1].get("stopped") and summaries[-1].get("exit_code"):  # SIGINT / SIGTERM: 130 / 143
        print(f"tailkd: recipe stopped; run the same command again to continue ({args.recipe})", file=sys.stderr)
        return int(summaries[-1]["exit_code"])
    return 0


def _cmd_losses(args: argparse.Namespace) -> int:
    from tailkd.config import load_loss_module
    from tailkd.registry import LOSSES

    if args.module:
        load_loss_module(args.module)
    head = ("loss", "per token", "knobs (loss.*)", "needs", "chunked form", "top-K cache", "source")
    rows = [(s.name, s.formula, "; ".join(filter(None, (", ".join(s.knobs), s.options and "options: " + ", ".join(
                f"{n}={v:g}" for n, v in s.options.items())))) or "-",
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
        description="Run the stages of a recipe YAML in order (keys: out_dir, chain, common, stages, evaluate, "
        "compare). A chain (the default): a stage without student.path starts from the previous stage's final "
        "student (configs/math-two-stage.yaml). A sweep (chain: false): every stage from the same start, then "
        "tailkd eval of each (evaluate:) and tailkd compare of all (compare:) (configs/drkl-instruct.yaml). "
        "Re-running skips finished stages and evaluations and resumes an interrupted stage.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--out", default=None, help="root folder of the stages (default: the recipe's out_dir)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting of every stage (over the recipe's common: and the stage's own keys), e.g. "
                   "--set train.max_steps=400; repeatable")
    p.set_defaults(func=_cmd_recipe)


class _Parser(argparse.ArgumentParser):
    """argparse with tailkd's one-line errors: ``tailkd distill: error: <message>``, exit 2, without the usage block
    (a subcommand's usage lists every flag: the error would scroll out of sight); an unknown flag names its closest
    spellings."""

    def error(self, message: str):
        what = "commands" if getattr(self, "_subcommands", None) else "flags"
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the {what})\n")

    def parse_args(self, args=None, namespace=None):
        import difflib

        args, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(self, "_subcommands", {}).get(getattr(args, "command", None), self)
            flags = [f for f in command._option_string_actions if f.startswith("--")]
            unknown = [e for e in extra if e.startswith("-")]
            near = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=3) if unknown else []
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
        return args


def build_parser() -> argparse.ArgumentParser:
    from tailkd.config import add_config_flags

    parser = _Parser(
        prog="tailkd",
        description="Knowledge distillation of causal language models: Tail-Aware Distillation (TAD), "
        "DRKL and the usual baselines, offline by default.",
    )
    parser.add_argument("--version", action="version", version=f"tailkd {__version__}")
    parser.add_argument("--debug", dest="debug_first", action="store_true",
                        help="show the full traceback on errors (before or after the command)")
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
    for name, (cls, _, help_line, description) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=help_line, description=description)
        add_config_flags(p, cls)
        p.set_defaults(func=_cmd_command)
    _add_recipe(sub, common)
    p = sub.add_parser("losses", parents=[common], help="list the losses of the registry (tailkd.registry.LOSSES)",
                       description="The losses --loss accepts: formula, knobs, chunked and top-K-cache forms, source.")
    p.add_argument("--loss.module", dest="module", default="", metavar="MODULE",
                   help="also the losses this module of your own registers (a .py file or a dotted name; as "
                        "distill's --loss.module)")
    p.set_defaults(func=_cmd_losses)
    parser._subcommands = dict(sub.choices)
    return parser


def _keep_host_memory() -> None:
    """On a machine without a CUDA device the runs compute on the host: its freed memory is kept for reuse
    (`tailkd.hostmem`; where a GPU computes, the host's large blocks are rare and best given back)."""
    import torch

    from tailkd import hostmem

    if not torch.cuda.is_available():
        hostmem.keep_freed_memory()


@contextlib.contextmanager
def _own_warnings():
    """tailkd's own warnings (``warnings.warn`` in its modules, e.g. SFT data truncated to --seq-len) printed as its
    other warnings are, ``tailkd: warning: MESSAGE`` on stderr, not Python's ``FILE:LINE: UserWarning: ...`` and the
    source line, and each time (a recipe's second stage warns again; Python's default shows a place once); other
    libraries' warnings keep Python's format and filters."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package):  # tailkd and its sub-packages, as the filter below
            print(f"tailkd: warning: {message}", file=sys.stderr if file is None else file)
        else:
            default(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores the filters and showwarning
        warnings.filterwarnings("always", module=r"tailkd(\.|$)")
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _unwind_on_sigterm():
    """Within the block SIGTERM raises `Terminated` (Python's default ends the process at once: temporary folders
    and lm-eval's work folder stayed, and nothing was said); the handler then steps aside, so a second SIGTERM ends
    the process at once. The previous handler is put back after. A SIGTERM whose `Terminated` Python ignored (raised
    inside a callback or ``__del__``: an import lock's, in a CI run) lets the block run on, and is raised as it ends.
    A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        fired.append(signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if fired:  # the block ended without the exception: it was raised where Python ignores exceptions
        raise Terminated


def main(argv: list[str] | None = None, *, keep_host_memory: bool = False) -> int:
    """Run one subcommand; returns its exit code. ``keep_host_memory``: `_keep_host_memory` first (the ``tailkd``
    command's processes: `entry`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    debug = getattr(args, "debug", False) or args.debug_first
    try:
        with _unwind_on_sigterm(), _own_warnings():
            if keep_host_memory:
                _keep_host_memory()
            return int(args.func(args) or 0)
    except TailkdError as exc:
        if debug:
            raise
        print(f"tailkd: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        if debug:
            raise
        print("tailkd: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        if debug:
            raise
        print("tailkd: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns surprises into one line
        if debug:
            raise
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:  # a path given: wherever it is first read
            print(f"tailkd: error: {exc.strerror}: {exc.filename} (one name holds at most 255 bytes on most "
                  "filesystems); give a shorter path", file=sys.stderr)
            return 2
        msg = ": " + str(exc).strip().splitlines()[0] if str(exc).strip() else ""  # AssertionError(): the name
        print(f"tailkd: error: {type(exc).__name__}{msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def entry() -> int:
    """The ``tailkd`` command (and ``python -m tailkd.cli``): `main` in a process that keeps its freed host memory
    for reuse where the run computes on the host (`_keep_host_memory`); a rank of a multi-process launch then ends
    without interpreter finalization (`tailkd.distributed.leave`)."""
    code = main(keep_host_memory=True)
    ranks = sys.modules.get("tailkd.distributed")  # imported by every command that can run in several processes
    if ranks is not None and os.environ.get("WORLD_SIZE", "1") != "1":  # torchrun / accelerate launch
        ranks.leave(code)
    return code


if __name__ == "__main__":
    sys.exit(entry())
