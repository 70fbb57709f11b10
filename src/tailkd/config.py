"""Typed run configuration: dataclasses that a YAML file mirrors and the CLI exposes as flags.

A distillation run is described by one `DistillConfig` with five sections. YAML files mirror it
key for key (``loss: {name: tad, k: 10}``); every leaf is also a flag ``--section.field`` (e.g.
``--loss.k 20``), and the most used ones have short aliases (``--loss tad``, ``--k 20``,
``--teacher DIR``). Unknown keys and values of the wrong type are errors that name the key.

The other subcommands (eval, analyze-teacher, cache-teacher, lm-eval, compare, flops, select-data, reproduce) have
configs of the same kind in `tailkd.command_config`, built from these sections where the meaning is the same; the
machinery below (``add_config_flags``, ``config_from_args``, ``from_dict``, ``check_leaves``) serves them all. A
config class may declare ``ALIASES`` (its short flags), ``OMIT`` (leaves of a reused section it does not read: no
flag, and an unknown key in YAML), ``HELP`` (the --help of a reused leaf that means something else there) and a
``run_defaults(given)`` class method (settings of the run that made a saved model).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import secrets
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from tailkd.errors import TailkdError

# The allowed values of the choice fields, defined here once (the modules that read them import them).
TEACHER_DTYPES = ("auto", "bf16", "fp32")
MLP_INITS = ("random", "copy")
REPORT_TO = ("none", "tensorboard")  # train.report_to: metrics.jsonl always, TensorBoard event files too
EXPERT_CHOICES = ("first", "used")  # which routed experts a student with fewer than its teacher keeps
LAYER_CHOICES = ("spaced", "influence")  # which teacher layers a student of num_layers keeps
MLP_UNIT_CHOICES = ("first", "active")  # which units of a dense MLP a narrower student copies
HIDDEN_CHANNEL_CHOICES = ("first", "active")  # which residual-stream channels a narrower student keeps
HEAD_CHOICES = ("first", "active")  # which attention heads a student with fewer keeps
SSM_HEAD_CHOICES = ("first", "active")  # which Mamba heads (Mamba-1's: channels) a student with fewer keeps
# the student choices made from calibration rows (a teacher forward before the build): (setting, calibrated value)
CALIBRATED_CHOICES = (("layer_choice", "influence"), ("experts", "used"), ("mlp_units", "active"),
                      ("hidden_channels", "active"), ("attention_heads", "active"), ("ssm_head_choice", "active"))
DOC_SEPS = ("auto", "blank_line", "line", "file")
TASKS = ("pretrain", "sft")
SFT_MODES = ("pad", "pack")
LOSS_KERNELS = ("auto", "torch")
OVERLONG = ("truncate", "drop")
DRKL_ANCHORS = ("label", "teacher_argmax")
PRECISIONS = ("auto", "bf16", "fp32")
FUSED_MODES = ("auto", "on", "off")
PARALLEL_MODES = ("ddp", "fsdp")
TEACHER_PARALLEL = ("replicate", "fsdp")


@dataclass(frozen=True)
class Range:
    """Allowed values of a float field: low ≤ v ≤ high, with either end open; NaN and ±inf never pass."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, v: float) -> bool:
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return math.isfinite(v) and above and below

    def describe(self) -> str:
        if self.high == math.inf:
            text = f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = (f"a finite number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        return f"{text} ({self.note})" if self.note else text


_NONNEGATIVE = Range(0.0)
# Every float field (each item of a list field): tests/test_config.py checks that every float field is listed.
FLOAT_RANGES = {
    "loss.beta": Range(0.0, note="the paper uses 2"),
    "loss.gamma": _NONNEGATIVE,
    "loss.temperature": Range(0.0, low_open=True, note="the paper uses 1"),
    "loss.jsd_beta": Range(0.0, 1.0),
    "loss.dkd_alpha": _NONNEGATIVE,
    "loss.dkd_beta": _NONNEGATIVE,
    "loss.skew_alpha": Range(0.0, 1.0, high_open=True),
    "loss.akl_mu": Range(0.0, 1.0, high_open=True),
    "loss.ab_alpha": _NONNEGATIVE,
    "loss.ab_beta": _NONNEGATIVE,
    "loss.clm_weight": _NONNEGATIVE,
    "loss.div_weight": _NONNEGATIVE,
    "loss.cosine_weight": _NONNEGATIVE,
    "data.heldout_fraction": Range(0.0, 1.0, low_open=True, high_open=True),
    "train.lr": Range(0.0, low_open=True),
    "train.weight_decay": _NONNEGATIVE,
    "train.adam_betas": Range(0.0, 1.0, high_open=True),
    "train.epochs": Range(0.0, note="0: train.max_steps decides"),
    "train.min_lr_ratio": Range(0.0, 1.0),
    "train.grad_clip": Range(0.0, note="0 disables clipping"),
    "train.on_policy": Range(0.0, 1.0, note="GKD's λ"),
    "train.on_policy_temperature": Range(0.0, low_open=True),
    "train.on_policy_top_p": Range(0.0, 1.0, low_open=True),
    # the subcommands' own sections (tailkd.command_config)
    "generate.temperature": Range(0.0, low_open=True),
    "generate.top_p": Range(0.0, 1.0, low_open=True),
    "lm_eval.limit": Range(0.0, low_open=True, note="below 1: a fraction of each task"),
    "flops.teacher_params": Range(0.0, low_open=True),
    "flops.student_params": Range(0.0, low_open=True),
    "flops.tokens": Range(0.0, low_open=True),
    "flops.delta": Range(0.0, 1.0, low_open=True, note="MiniPLM uses 0.5"),
    "flops.reference_params": Range(0.0, low_open=True),
    "reproduce.betas": Range(0.0, note="the paper sweeps 0.5, 1, 2, 5, 10"),
    "reproduce.scale": Range(0.0, low_open=True),
    "select.keep": Range(0.0, 1.0, low_open=True, note="the fraction of documents kept; MiniPLM uses 0.5"),
    "seqkd.temperature": Range(0.0, note="0: greedy"),
    "seqkd.top_p": Range(0.0, 1.0, low_open=True),
}

# The seeds of every command's config (each item of a list): numpy's range, which train.seed is given to
# (`tailkd.train.seed_everything`; -1 or 2^32 was numpy's 'Seed must be between 0 and 2**32 - 1', exit 1, once the
# run had started; cache.seed above 2^43: torch's 'Overflow when unpacking long long'). Not data.split_seed (hashed
# with each prompt) nor generate.seed (torch.manual_seed's, any 64-bit integer).
SEED_KEYS = ("train.seed", "cache.seed", "reproduce.seeds", "reproduce.sweep_seeds")
SEED_MAX = 2 ** 32 - 1
INT64 = 2 ** 63  # every int setting lies in [-INT64, INT64): what torch and numpy take (`_coerce`)

# The settings that name files or folders, of every command's config. A leading ``~`` in them is the user's home, read
# once here (`from_dict`, `DistillConfig.validate`), as transformers' TrainingArguments and datasets read theirs: given
# quoted or in YAML, it made a folder named '~' in the working directory (--out '~/runs/x', --data.cache_dir) or, for
# data paths, a 'does not exist' error while the teacher's '~' was expanded. tailkd's own words (smollm2, builtin:*,
# auto, none) start with no '~' and are left as they are.
PATH_KEYS = frozenset({
    "teacher.path", "teacher.cache", "student.path", "data.paths", "data.heldout_paths", "data.cache_dir",
    "data.chat_template", "loss.module", "train.out_dir", "eval.student", "eval.out", "generate.prompts",
    "analyze.teachers", "analyze.out", "compare.runs", "compare.baseline", "compare.out", "flops.teacher",
    "flops.student", "flops.reference", "flops.out", "lm_eval.model", "lm_eval.gsm_data", "lm_eval.work_dir",
    "lm_eval.out", "cache.out", "cache.tokenizer", "select.reference", "select.out", "reproduce.out", "seqkd.out"})


def expand_home(value):
    """A path setting's value (a string, a list of them, or None) with a leading ``~`` / ``~user`` expanded."""
    if isinstance(value, list):
        return [os.path.expanduser(v) if isinstance(v, str) else v for v in value]
    return os.path.expanduser(value) if isinstance(value, str) else value


def absolute_path(v):
    """A path setting's value (a string or a list of them) made absolute against the working directory, without
    resolving symlinks or ``..``; tailkd's own words (smollm2, builtin:*, auto, none), None and '' as they are."""
    if isinstance(v, list):
        return [absolute_path(x) for x in v]
    local = isinstance(v, str) and bool(v) and not v.startswith("builtin:") and v not in ("smollm2", "auto", "none")
    return str(Path(v).absolute()) if local else v


def absolute_paths(cfg: "DistillConfig") -> "DistillConfig":
    """A copy of ``cfg`` whose local paths are absolute (against the working directory, without resolving symlinks or
    ``..``): the run's config.yaml holds these, so that ``tailkd eval RUN/final``, ``tailkd distill --config
    RUN/config.yaml --resume`` and a recipe read the teacher, data and cache the run used from any working directory
    (relative ones were read against the reader's: 'not found', or another folder of the same name). tailkd's own
    words are kept: smollm2, builtin:*, auto / none (chat_template), a dotted loss.module."""
    from tailkd.registry import names_a_file

    module = cfg.loss.module
    t, st, d = cfg.teacher, cfg.student, cfg.data
    return dataclasses.replace(
        cfg, teacher=dataclasses.replace(t, path=absolute_path(t.path), cache=absolute_path(t.cache)),
        student=dataclasses.replace(st, path=absolute_path(st.path)),
        data=dataclasses.replace(d, paths=absolute_path(d.paths), heldout_paths=absolute_path(d.heldout_paths),
                                 cache_dir=absolute_path(d.cache_dir), chat_template=absolute_path(d.chat_template)),
        loss=dataclasses.replace(cfg.loss, module=absolute_path(module) if names_a_file(module) else module),
        train=dataclasses.replace(cfg.train, out_dir=absolute_path(cfg.train.out_dir)))


def _f(default, help: str, **kw):  # noqa: A002 - mirrors argparse's name
    """A dataclass field whose help text becomes the flag's ``--help`` line; ``choices=`` (a tuple) are the only
    values `check_leaves` accepts; ``positional="NAME"`` (a list field) makes it the positional arguments."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    if isinstance(default, dict):
        return field(default_factory=lambda d=default: dict(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TeacherConfig:
    path: str = _f("smollm2", "teacher: 'smollm2' (built-in SmolLM2-135M-Instruct), an HF model folder, or a .gguf "
                              "file")
    dtype: str = _f("auto", "teacher weights dtype: auto (bf16 on a CUDA device with native bf16, else fp32), "
                            "bf16, fp32", choices=TEACHER_DTYPES)
    cache: Optional[str] = _f(None, "teacher cache folder (tailkd cache-teacher) that training steps read instead "
                                    "of running the teacher; the teacher is still loaded for the student's "
                                    "initialisation and the held-out evaluation; unused by loss.name=clm (no "
                                    "teacher signal)")
    parallel: str = _f("replicate", "teacher placement: replicate (a whole copy on every rank) or fsdp (FSDP2 "
                                    "shards it over the ranks, forward only, loaded shard by shard from its "
                                    "safetensors so no rank holds it whole; its LM head stays replicated; also in "
                                    "one process, through FSDP2)", choices=TEACHER_PARALLEL)


# the student settings that only a student built from the teacher uses (an existing one, student.path, is loaded as it
# is; freeze_embeddings applies to both)
BUILD_KEYS = ("num_layers", "layers", "layer_choice", "hidden_size", "hidden_channels", "num_heads", "num_kv_heads",
              "attention_heads", "intermediate_size", "num_experts", "num_experts_per_tok", "experts", "ssm_heads",
              "ssm_head_choice", "calibration_rows", "head_dim", "mlp_units", "mlp_init", "tie_embeddings")


@dataclass
class StudentConfig:
    path: Optional[str] = _f(None, "existing student checkpoint (continued pretraining distillation), loaded as it is "
                                   "(of the student settings below only freeze_embeddings applies to it); if unset "
                                   "the student is built from the teacher")
    num_layers: Optional[int] = _f(6, "layers of the student built from the teacher (evenly spaced; whole periods of "
                                      "its layer kinds where its config sets them by periods: Jamba)")
    layers: Optional[list[int]] = _f(None, "explicit teacher layer indices for the student (overrides num_layers)")
    layer_choice: str = _f("spaced", "which num_layers teacher layers the student keeps: spaced (evenly, the first "
                                     "and last included; the paper; Gemma 4: with the layers its KV-shared ones "
                                     "read) or influence (those of largest Block Influence, "
                                     "1 - cos(layer input, layer output), over calibration_rows training rows: "
                                     "ShortGPT's, Minitron's depth pruning; Gemma 4: its last layer first, each "
                                     "KV-shared layer with the layer it reads)", choices=LAYER_CHOICES)
    hidden_size: Optional[int] = _f(None, "student hidden size (default: the teacher's)")
    hidden_channels: str = _f("first", "which residual-stream channels a student with a narrower hidden_size keeps: "
                                       "first, or active (those of largest mean |output| of the teacher's norms over "
                                       "calibration_rows training rows: Minitron's embedding-channel importance)",
                              choices=HIDDEN_CHANNEL_CHOICES)
    num_heads: Optional[int] = _f(None, "student attention heads (default: the teacher's)")
    num_kv_heads: Optional[int] = _f(None, "student key/value heads (default: the teacher's)")
    attention_heads: str = _f("first", "which heads a student with fewer num_heads / num_kv_heads keeps: first (the "
                                       "first query heads of the first KV heads), or active (per layer those whose "
                                       "output has the largest mean L2 norm over calibration_rows training rows, KV "
                                       "head by KV head: Minitron's head importance)", choices=HEAD_CHOICES)
    intermediate_size: Optional[int] = _f(None, "student MLP width (default: the teacher's); of a mixture of experts "
                                                "(Mixtral, Qwen-MoE, GLM-4.5), each routed expert's width")
    num_experts: Optional[int] = _f(None, "routed experts per layer of a student built from a mixture-of-experts "
                                          "teacher: the teacher's first ones (of each group under group-limited "
                                          "routing: GLM-4.5), at least its experts per token (default: all of them)")
    num_experts_per_tok: Optional[int] = _f(None, "experts each token is routed to in a student built from a "
                                                  "mixture-of-experts teacher (default: the teacher's)")
    experts: str = _f("first", "which routed experts a student with fewer than its mixture-of-experts teacher keeps "
                               "(num_experts): first (the teacher's first ones; of each group under group-limited "
                               "routing) or used (per layer the ones the teacher routes the most tokens of "
                               "calibration_rows training rows to; of each group likewise)", choices=EXPERT_CHOICES)
    ssm_heads: Optional[int] = _f(None, "Mamba-2 heads of each mixer of a student built from a teacher with Mamba-2 "
                                        "mixers (Mamba-2, Bamba, Granite 4.0-H, Falcon-H1, Nemotron-H): each group's "
                                        "first ones, a multiple of its n_groups (default: the teacher's); Jamba's "
                                        "Mamba-1 mixers: their channels (heads of one), the first ones; where a "
                                        "mixer is expand x hidden_size wide, ssm_heads x its head size must be a whole "
                                        "expand x hidden_size")
    ssm_head_choice: str = _f("first", "which Mamba heads (Jamba's Mamba-1 mixers: channels) a student with fewer "
                                       "ssm_heads keeps: first (each group's first ones), or active (per layer, group "
                                       "by group, those whose output — the mixer's out_proj input — has the largest "
                                       "mean L2 norm over calibration_rows training rows: Minitron's head importance, "
                                       "group-aware; a Mamba-1 channel's mean |value|)",
                              choices=SSM_HEAD_CHOICES)
    calibration_rows: int = _f(64, "training rows, evenly spaced over the training set, the teacher's forward over "
                                   "which measures its layers (layer_choice influence), its hidden channels "
                                   "(hidden_channels active), its heads (attention_heads active, ssm_head_choice "
                                   "active), its MLP units (mlp_units active) and counts its experts' use (experts "
                                   "used)")
    head_dim: Optional[int] = _f(None, "student attention head size, for families whose head size is not hidden / "
                                       "heads (Gemma, Qwen3; default: the teacher's)")
    mlp_init: str = _f("random", "MLP initialisation: random (the paper) or copy (copied and truncated)",
                       choices=MLP_INITS)
    mlp_units: str = _f("first", "which units of a dense MLP (or of each routed expert) a student with a narrower "
                                 "intermediate_size copies (mlp_init copy): first, or active (per layer, and per "
                                 "expert over the tokens routed to it, those of largest mean |activation| at the down "
                                 "projection's input over calibration_rows training rows: Minitron's width "
                                 "importance)", choices=MLP_UNIT_CHOICES)
    freeze_embeddings: bool = _f(False, "freeze the student's embeddings copied from the teacher (paper §3.2.2)")
    tie_embeddings: Optional[bool] = _f(None, "tie the student's LM head to its input embeddings: true, one matrix "
                                              "copied from the teacher's input embeddings (MiniPLM's Qwen "
                                              "students); false, a head of its own copied from the teacher's head; "
                                              "unset: as the teacher")

    def calibrated(self) -> bool:
        """Whether a setting of `CALIBRATED_CHOICES` asks to choose the student's layers, channels, heads, units or
        experts from calibration rows (a teacher pass before the student is built)."""
        return any(getattr(self, key) == value for key, value in CALIBRATED_CHOICES)

    def check_source(self) -> None:
        """An existing student (``path``) is loaded as it is: a setting of `BUILD_KEYS` other than its default (which
        shapes a student built from the teacher) is a TailkdError naming it."""
        if not self.path:
            return
        default = StudentConfig()
        for key in BUILD_KEYS:
            value = getattr(self, key)
            if value != getattr(default, key):
                raise TailkdError(f"student.{key}={value!r} shapes a student built from the teacher, but "
                                  f"student.path={self.path!r} loads an existing one: drop student.{key} (or "
                                  "student.path to build the student from the teacher)")

    @property
    def depth(self) -> Optional[int]:
        """The number of layers to build: ``num_layers``, or None where ``layers`` lists them (it overrides
        ``num_layers``, whose default would otherwise conflict with a list of another length)."""
        return None if self.layers is not None else self.num_layers


@dataclass
class DataConfig:
    paths: list[str] = _f([], "text files/folders, .jsonl (field 'text') or .parquet; empty: built-in news corpus. "
                              "Built-in sets: 'builtin:math' (GSM-style problems: the worked solutions as a "
                              "pretrain corpus, the problems with distill --task sft), 'builtin:pydoc' (Python's "
                              "documentation, for pretraining) and, with distill --task sft only, "
                              "'builtin:instruct' (AlpacaEval's instructions with gpt-3.5-turbo answers, CC BY-NC "
                              "4.0, non-commercial); with distill --task sft a built-in set brings its own held-out "
                              "split (data.math_heldout, data.instruct_heldout), as a pretraining corpus "
                              "data.heldout_fraction of its documents are held out")
    seq_len: int = _f(128, "tokens per training row (packed text, or sft: one or more examples and padding)")
    heldout_fraction: float = _f(0.05, "fraction of documents held out for evaluation")
    doc_sep: str = _f("auto", "document separator in text files: auto, blank_line, line, file", choices=DOC_SEPS)
    eval_rows: int = _f(16, "held-out rows used for the periodic held-out KL/CLM evaluation")
    cache_dir: Optional[str] = _f(None, "tailkd's data cache: tokenised corpora in <dir>/corpora, the built-in data "
                                        "sets beside them (default: $TAILKD_CACHE, else ~/.cache/tailkd)")
    task: str = _f("pretrain", "pretrain (packed text) or sft (prompt -> response JSONL; empty paths: built-in "
                               "GSM-style math problems); 'builtin:math' as a pretrain path is the math corpus",
                   choices=TASKS)
    heldout_paths: list[str] = _f([], "held-out files for evaluation (sft: JSONL; pretrain: text as data.paths, e.g. "
                                      "'builtin:pydoc', Python's documentation); empty: a fraction of data.paths")
    doc_eos: bool = _f(True, "pretrain: EOS after each document (boundaries in packed rows, for "
                             "--loss.per_document); false: one continuous token stream, each row one segment")
    sft_mode: str = _f("pad", "sft: pad (one example per row) or pack (several examples per row)", choices=SFT_MODES)
    document_attention: bool = _f(False, "packed rows: each document (pretrain: text up to its EOS; sft pack: an "
                                         "example) attends to itself alone, its positions restarting at 0 "
                                         "(transformers' packed-sequence masking, as TRL's padding_free); false: "
                                         "to the earlier documents of its row too")
    chat_template: str = _f("auto", "sft: auto (the tokenizer's template, plain pairs if none), none, or a "
                                    ".jinja file")
    overlong: str = _f("truncate", "sft: examples longer than seq_len are truncated (their END is cut: "
                                    "the response's last tokens and EOS) or dropped", choices=OVERLONG)
    split_seed: int = _f(0, "sft: seed of the held-out split (kept apart from train.seed)")
    math_train: int = _f(2000, "built-in math problems for training (sft; builtin:math's corpus: their solutions)")
    math_heldout: int = _f(200, "built-in math problems held out (sft; kept out of builtin:math's corpus)")
    instruct_heldout: int = _f(100, "sft: builtin:instruct instructions held out (of all 805, fixed by a hash)")
    instruct_max_words: int = _f(150, "sft: builtin:instruct keeps the pairs of at most N words (instruction + "
                                      "answer; 0: all): 734 of 805 by default")

    def check_builtin_paths(self) -> None:
        """TailkdError when ``paths`` name a built-in set that ``task`` cannot read: ``builtin:instruct`` is
        prompt/response data, for task sft only. (A method, not ``__post_init__``: a command that omits
        ``data.task``, e.g. lm-eval, validates a run's data section alone, and must still accept such a run.)"""
        if self.task != "sft" and "builtin:instruct" in (self.paths or ()):
            raise TailkdError("data.paths builtin:instruct is prompt/response data, read only with data.task sft "
                              "(tailkd distill --task sft); packed text (task pretrain) needs text files, "
                              "builtin:math, or no path for the built-in news corpus")


@dataclass
class LossConfig:
    name: str = _f("tad", "the loss: a name in the registry tailkd.registry.LOSSES (`tailkd losses` lists them with "
                          "their formulas): tad, kd, rkl, jsd, dkd, drkl, tvd, sym_kl, skew_kl, skew_rkl, akl, "
                          "alpha_beta; clm: no teacher")
    module: str = _f("", "a module of your own losses, imported before loss.name is looked up: a .py file (relative "
                         "to the working directory; its folder is not put on sys.path) or a dotted name on sys.path; "
                         "it adds them with tailkd.registry.register (README 'A loss of your own'); default: none, "
                         "the built-in losses only")
    k: int = _f(10, "TAD: number of teacher top-K tokens kept apart from the tail")
    beta: float = _f(2.0, "TAD: tail weight β; β(X) = β / mean teacher tail mass of the sequence")
    per_document: bool = _f(False, "TAD: normalise β per document of a packed row instead of per row")
    gamma: float = _f(0.5, "DRKL: weight γ of the renormalised non-target reverse KL")
    drkl_anchor: str = _f("label", "DRKL: anchor token, label or teacher_argmax", choices=DRKL_ANCHORS)
    temperature: float = _f(1.0, "softmax temperature τ applied to both sides (no τ² factor)")
    jsd_beta: float = _f(0.5, "JSD: mixing weight β of m = β p_T + (1-β) p_S")
    dkd_alpha: float = _f(1.0, "DKD: weight of the target/non-target binary KL")
    dkd_beta: float = _f(8.0, "DKD: weight of the non-target KL")
    skew_alpha: float = _f(0.1, "skew_kl / skew_rkl: mixing weight α of the skewed target (DistiLLM: 0.1)")
    akl_mu: float = _f(0.5, "AKL: the teacher's head holds its top tokens up to this cumulative probability")
    ab_alpha: float = _f(0.5, "alpha_beta: α (α = 1, β = 0 is forward KL)")
    ab_beta: float = _f(0.5, "alpha_beta: β (α = 0, β = 1 is reverse KL)")
    clm_weight: float = _f(1.0, "weight of the student's CLM loss (paper Eq. 4: 1)")
    div_weight: float = _f(1.0, "weight of the divergence (paper Eq. 4: 1); 0: not computed (the teacher does not "
                                "enter the loss; the div column reads 0)")
    cosine_weight: float = _f(0.0, "weight of the hidden-state cosine loss (paper §3.2.2)")
    options: dict[str, float] = _f({}, "the knobs of a loss of your own, NAME=VALUE each, repeatable (YAML: options: "
                                       "{NAME: VALUE}): the names its LossSpec.options declares, numbers; default: "
                                       "none given, the loss's own defaults (`tailkd losses` lists them). The built-in "
                                       "losses have none")

    def check(self) -> LossConfig:
        """ValueError naming the knob unless ``k`` is an integer >= 1, every float knob a number in its
        `FLOAT_RANGES` entry and ``drkl_anchor`` one of `DRKL_ANCHORS`: what the CLI's checks say, for configs built
        in Python (`tailkd.registry.bind` runs it, so the dense and the chunked paths refuse the same values)."""
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k={self.k!r} must be an integer >= 1 (the paper uses 10)")
        for f in dataclasses.fields(self):
            problem = out_of_range(f"loss.{f.name}", getattr(self, f.name))
            if problem:
                raise ValueError(problem[len("loss."):])
        if self.drkl_anchor not in DRKL_ANCHORS:
            raise ValueError(f"drkl_anchor={self.drkl_anchor!r} must be one of {', '.join(DRKL_ANCHORS)}")
        return self


@dataclass
class TrainConfig:
    out_dir: str = _f("runs/distill", "run folder (never silently overwritten)")
    max_steps: int = _f(40, "optimizer steps (the schedule's length)")
    epochs: float = _f(0.0, "passes over the training rows; > 0 sets max_steps = ceil(epochs x rows / (batch_size "
                            "x grad_accum)) once the data is read (paper §3.4: 3 epochs); 0: max_steps decides")
    stop_after: int = _f(0, "end this invocation after N steps with a checkpoint (0: run to max_steps); "
                            "continue with --resume, e.g. across cluster job time limits")
    batch_size: int = _f(4, "rows per micro-batch in TOTAL: split evenly over the processes of a multi-GPU run "
                            "(each takes batch_size / world), so results do not depend on the number of GPUs")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.1, "AdamW weight decay, of the weight matrices and embeddings (biases and norm "
                                  "weights get none: HF Trainer's groups)")
    adam_betas: list[float] = _f([0.9, 0.95], "AdamW betas")
    warmup_steps: int = _f(5, "linear warm-up steps N (step s < N at lr x (s+1)/N, one step ahead of transformers' "
                              "schedules, whose first step has lr 0), then cosine decay as transformers' "
                              "cosine_with_min_lr")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of lr (the cosine reaches it at max_steps)")
    grad_clip: float = _f(1.0, "gradient-norm clipping (0 disables)")
    precision: str = _f("auto", "auto (bf16 autocast where the hardware has native bf16: CUDA sm_80+ or ROCm, "
                                "CPUs with AVX512-BF16 or AMX; else fp32; TAILKD_NATIVE_BF16=0|1 overrides the "
                                "detection), bf16, fp32", choices=PRECISIONS)
    eval_every: int = _f(10, "held-out evaluation every N steps (0: only before and after)")
    save_every: int = _f(20, "checkpoint every N steps (0: only at the end)")
    keep_last: int = _f(2, "checkpoints kept")
    log_every: int = _f(1, "metrics line every N steps")
    report_to: str = _f("none", "where the metrics go besides metrics.jsonl: none, or tensorboard (OUT/tensorboard: "
                                "tensorboard --logdir OUT/tensorboard; HF TrainingArguments' report_to)",
                        choices=REPORT_TO)
    seed: int = _f(0, "seed for initialisation, data order and dropout")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    resume: bool = _f(False, "continue the run in out_dir from its last checkpoint")
    overwrite: bool = _f(False, "delete an existing run in out_dir (a folder with its config.yaml) and start again")
    force_resume: bool = _f(False, "with --resume: continue even though the config differs from the run's "
                                   "(the differences are printed; the old config.yaml is kept)")
    max_bad_steps: int = _f(5, "stop (with a checkpoint) after N steps in a row with a non-finite loss or "
                               "gradient; each such step is skipped without updating the weights")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms(True): bit-identical reruns and resumes "
                                    "(slower on GPU)")
    fused_loss: str = _f("auto", "LM heads + loss in chunks from the final hidden states, never [B, T, V] logits "
                                 "(every loss has a chunked form): auto (when one side's float32 logits of a "
                                 "process's share of a micro-batch would exceed 1 GiB), on, off", choices=FUSED_MODES)
    loss_chunk_size: int = _f(0, "tokens per chunk of the fused loss layer (0: CPU about 2^24 logits per chunk, TAD's "
                                 "grown to whole sequences up to 2^28 unless a top-K cache gives its ᾱ; CUDA from "
                                 "the free memory and the matmul shape, the same for every loss)")
    loss_kernels: str = _f("auto", "fused loss layer on CUDA: auto (Triton row kernels for kd, tad (K <= 64), rkl, "
                                   "jsd, and for any loss against a teacher cache, when triton is installed: pip "
                                   "install tailkd[kernels]) or torch", choices=LOSS_KERNELS)
    compile: bool = _f(False, "torch.compile the decoder stacks of student and teacher (a sharded teacher stays eager; "
                              "in place: checkpoints and saved students unchanged)")
    activation_checkpointing: int = _f(0, "recompute the activations of every N-th student decoder layer in the "
                                          "backward pass instead of keeping them (transformers' gradient "
                                          "checkpointing, non-reentrant): less activation memory, about a third "
                                          "more student compute, the same result; 0: keep every layer's")
    disable_dropout: bool = _f(False, "train the student without dropout (TRL's disable_dropout): its dropout "
                                      "layers, attention dropout and config dropout values at 0; the saved student's "
                                      "config keeps its own. Off: the config's dropout, as HF Trainer")
    parallel: str = _f("ddp", "multi-process runs (torchrun / accelerate launch): ddp, or fsdp (FSDP2 shards "
                              "the student's weights, gradients and optimizer state; torch >= 2.6)",
                       choices=PARALLEL_MODES)
    ddp_timeout: int = _f(1800, "multi-process runs: seconds a rank waits in one collective for the others (a hung "
                                "rank) before the run fails (HF TrainingArguments' ddp_timeout)")
    on_policy: float = _f(0.0, "sft: probability λ that a micro-batch's responses are sampled from the current "
                               "student and scored by the teacher (GKD's mixed policy; 0: the dataset's responses "
                               "only, 1: fully on-policy, where the data may be prompts alone)")
    on_policy_temperature: float = _f(1.0, "on-policy sampling temperature")
    on_policy_top_p: float = _f(1.0, "on-policy nucleus sampling p (no top-k cut)")
    on_policy_max_new_tokens: int = _f(128, "on-policy: most tokens sampled per response (a row never grows past "
                                            "data.seq_len)")


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "DistillConfig":
        """Check values that a type alone cannot; raise TailkdError naming the key and the fix."""
        from tailkd.registry import LOSSES, bind  # the registry (imports torch): loss names live there only

        c = self
        check_types(c)
        for key in PATH_KEYS & {dotted for dotted, _, _ in _leaves(DistillConfig)}:  # a config built in Python
            section, name = key.split(".")  # (`distill(cfg)`) is read as a YAML one
            setattr(getattr(c, section), name, expand_home(leaf_value(c, key)))
        if c.loss.module:
            load_loss_module(c.loss.module)
        if c.loss.name not in LOSSES:
            also = f" (loss.module={c.loss.module!r} registered none of that name)" if c.loss.module else ""
            own = "" if c.loss.module else "; a loss of your own: name the module that registers it with --loss.module"
            raise TailkdError(f"loss.name={c.loss.name!r} is not a loss{also}; choose one of {', '.join(LOSSES)}{own}")
        check_leaves(c)
        if len(c.train.adam_betas) != 2:
            raise TailkdError(f"train.adam_betas={' '.join(map(str, c.train.adam_betas))} must be two numbers (beta1 "
                              "beta2), e.g. 0.9 0.95")
        if c.loss.k < 1:
            raise TailkdError(f"loss.k={c.loss.k} must be >= 1 (the paper uses 10)")
        try:  # a loss's options (its kernel may refuse a value of its own options: say so before the run starts)
            bound = bind(c.loss)
            bound.kernel
        except ValueError as exc:
            raise TailkdError(f"loss.options: {exc}" if c.loss.options else str(exc)) from None
        c.loss.options = dict(bound.cfg.options)  # every option, its default where none is given: config.yaml holds
        # the values the run trains with, and a resume compares them (not what the flags happened to name)
        c.student.check_source()
        check_at_least(c, "student.calibration_rows", 1)
        if c.student.experts == "used" and c.student.mlp_init != "copy":
            raise TailkdError(f"student.experts=used keeps the experts the teacher uses, but student.mlp_init="
                              f"{c.student.mlp_init} draws the student's experts afresh: add --student.mlp_init copy")
        if c.student.mlp_units == "active" and c.student.mlp_init != "copy":
            raise TailkdError(f"student.mlp_units=active keeps the MLP units the teacher uses most, but "
                              f"student.mlp_init={c.student.mlp_init} draws the student's MLP afresh: add "
                              "--student.mlp_init copy")
        if c.student.layer_choice == "influence" and c.student.layers is not None:
            raise TailkdError("student.layer_choice=influence chooses the student's layers, and student.layers lists "
                              "them: drop one of the two")
        check_at_least(c, "data.seq_len", 2, " (a row needs a token and its successor)")  # as eval's
        check_out_path(c, "train.out_dir", folder=True)
        check_data(c)
        for key in ("data.eval_rows", "train.max_steps", "train.batch_size", "train.grad_accum", "train.keep_last",
                    "train.log_every", "train.max_bad_steps", "train.ddp_timeout"):
            check_at_least(c, key, 1)
        for key, hint in (("train.warmup_steps", ""), ("train.stop_after", " (0: run to max_steps)"),
                          ("train.eval_every", " (0: only before and after)"), ("train.save_every", " (0: only at "
                          "the end)"), ("train.loss_chunk_size", " (0: automatic)"),
                          ("train.activation_checkpointing", " (0: off)")):
            check_at_least(c, key, 0, hint)
        check_on_policy(c)
        if c.train.force_resume and not c.train.resume:
            raise TailkdError("train.force_resume (--force) only applies with --resume")
        if c.train.resume and c.train.overwrite:
            raise TailkdError("train.resume and train.overwrite exclude each other; pass one of them")
        if not LOSSES[c.loss.name].needs_teacher and c.loss.cosine_weight > 0:
            raise TailkdError(f"loss.cosine_weight needs a teacher; it cannot be used with loss.name={c.loss.name}")
        if c.loss.per_document and not c.data.doc_eos and c.data.task == "pretrain":
            raise TailkdError("loss.per_document needs the documents' boundaries, and data.doc_eos false removes "
                              "them (one continuous token stream); drop one of the two")
        return c


def check_on_policy(c: DistillConfig) -> None:
    """``train.on_policy`` > 0 needs what sampling responses and scoring them takes."""
    t = c.train
    if t.on_policy_max_new_tokens < 1:
        raise TailkdError(f"train.on_policy_max_new_tokens={t.on_policy_max_new_tokens} must be >= 1")
    if t.on_policy == 0:
        return
    from tailkd.registry import LOSSES

    problem = (
        "it samples responses to prompts: use --task sft (prompt/response data)" if c.data.task != "sft" else
        "a teacher cache cannot score tokens the student generates: drop --teacher.cache" if c.teacher.cache else
        f"loss.name={c.loss.name} has no teacher to score the generated tokens: use a distillation loss"
        if not LOSSES[c.loss.name].needs_teacher else
        "packed rows hold several prompts: use --data.sft_mode pad" if c.data.sft_mode != "pad" else
        "FSDP's forward is a collective the ranks' different generation lengths would break: use "
        "--train.parallel ddp" if c.train.parallel == "fsdp" else None)
    if problem:
        raise TailkdError(f"train.on_policy={t.on_policy} cannot be used here: {problem}")


def check_types(cfg) -> None:
    """Each leaf of ``cfg`` read as the same value given in YAML would be (`_coerce`), for a config built in Python
    (`tailkd.train.distill(cfg)`, the functions of `tailkd.commands`): a string where a list of them goes becomes that
    list, an int where a float goes a float, another type a TailkdError naming the key. (A string as data.paths was
    read character by character: its first path '/', the whole file system listed.) A config from YAML or flags
    passes unchanged."""
    for dotted, tp, _ in _leaves(type(cfg)):
        section, name = dotted.split(".")
        value = leaf_value(cfg, dotted)
        if typing.get_origin(_unwrap_optional(tp)[0]) is list and isinstance(value, Iterable) \
                and not isinstance(value, (str, bytes, dict, Path)):
            value = list(value)  # a range, a tuple, a numpy array: its items
        value = [_python_scalar(v) for v in value] if isinstance(value, list) else _python_scalar(value)
        setattr(getattr(cfg, section), name, _coerce(value, tp, dotted))


def _python_scalar(value):
    """A numpy (or torch) scalar as the Python number it holds (``.item()``); any other value as it is."""
    return value.item() if hasattr(value, "item") and getattr(value, "shape", None) == () else value


def check_leaves(cfg) -> None:
    """The checks every config shares: each leaf of the type its field has (`check_types`), each leaf with
    ``choices=`` holds one of them, then each float leaf (each item of a list) lies in its `FLOAT_RANGES` entry (None,
    an unset optional, passes); TailkdError naming the key."""
    check_types(cfg)
    leaves = list(_leaves(type(cfg)))
    for dotted, _, f in leaves:
        choices = f.metadata.get("choices")
        value = leaf_value(cfg, dotted)
        if choices and value not in choices:
            alts = " or ".join([", ".join(choices[:-1]), choices[-1]])
            raise TailkdError(f"{dotted}={value!r} must be {alts}")
    names = {dotted for dotted, _, _ in leaves}
    for key in FLOAT_RANGES:
        value = leaf_value(cfg, key) if key in names else None  # None: also an unset optional
        if value is not None and (problem := out_of_range(key, value)):
            raise TailkdError(problem)
    for key in SEED_KEYS:
        value = leaf_value(cfg, key) if key in names else None
        items = value if isinstance(value, list) else [value]
        if any(v is not None and not 0 <= v <= SEED_MAX for v in items):
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            raise TailkdError(f"{key}={shown}: {'each seed' if isinstance(value, list) else 'a seed'} must be an "
                              f"integer in [0, {SEED_MAX}] (numpy's range)")


def load_loss_module(source: str) -> None:
    """`tailkd.registry.load_module` of ``loss.module``, its failures a TailkdError in one line (the first line of
    the module's error; its traceback with ``--debug``)."""
    from tailkd.registry import load_module, names_a_file

    try:
        load_module(source)
    except Exception as exc:
        if names_a_file(source):
            itself = not Path(os.path.expanduser(source)).is_file() or Path(source).suffix != ".py"
        else:  # the module, or a package above it, is not on sys.path
            itself = isinstance(exc, ModuleNotFoundError) and f"{source}.".startswith(f"{exc.name}.")
        hint = ("; give a .py file, or a module importable from sys.path (PYTHONPATH)" if itself else
                " (a module that loss.module imports; a .py file's folder is not put on sys.path: add the folder of "
                "the modules it imports to PYTHONPATH, or install them)" if isinstance(exc, ModuleNotFoundError) else
                " (rerun with --debug for its traceback)")
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TailkdError(f"loss.module={source!r} could not be imported: {type(exc).__name__}: {msg}{hint}") from exc


def out_of_range(key: str, value) -> str | None:
    """``"key=value must be ..."`` unless ``value`` (a float leaf, or each item of a list leaf) is a number in
    ``key``'s `FLOAT_RANGES` entry (None then, as for a key without an entry): the one range check of
    `check_leaves` (configs read from YAML and flags) and `LossConfig.check` (configs built in Python)."""
    allowed = FLOAT_RANGES.get(key)
    items = value if isinstance(value, list) else [value]
    if allowed is None or all(not isinstance(v, bool) and isinstance(v, (int, float)) and v in allowed for v in items):
        return None
    if isinstance(value, list):
        return f"{key}={' '.join(map(str, value))}: each must be {allowed.describe()}"
    return f"{key}={value!r} must be {allowed.describe()}"


def check_device_name(key: str, name: str) -> None:
    """TailkdError unless ``name`` (the value of setting ``key``) is a device name: auto, cpu, cuda or cuda:N.
    Whether a CUDA device is there is `tailkd.distributed.resolve_device`'s to check."""
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise TailkdError(f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:N")


def check_data(cfg) -> None:
    """The data section's built-in set settings, for every command that has one (distill and the commands of
    `tailkd.command_config`): their sizes at least 1 (instruct_max_words at least 0: 0 keeps all) and, where the
    command reads ``data.task``, no built-in set the task cannot read (`DataConfig.check_builtin_paths`; lm-eval,
    which omits it, must accept the data section of an sft run) and, where it reads ``data.document_attention``,
    documents to keep apart (``data.doc_eos`` boundaries; SFT rows packed) — before any model loads."""
    for key in ("data.math_train", "data.math_heldout"):
        check_at_least(cfg, key, 1)
    check_at_least(cfg, "data.instruct_max_words", 0, " (0: all)")
    if "data.task" not in getattr(cfg, "OMIT", ()):
        cfg.data.check_builtin_paths()
    d = cfg.data
    if "data.document_attention" not in getattr(cfg, "OMIT", ()) and d.document_attention:
        if d.task != "sft" and not d.doc_eos:
            raise TailkdError("data.document_attention needs the documents' boundaries, and data.doc_eos false "
                              "removes them (one continuous token stream); drop one of the two")
        if d.task == "sft" and d.sft_mode == "pad":
            raise TailkdError("data.document_attention keeps the examples of packed rows apart, and data.sft_mode pad "
                              "rows hold one example each (apart already); drop it, or pack: --data.sft_mode pack")


def check_at_least(cfg, key: str, low: int, hint: str = "") -> None:
    """TailkdError ``key=v must be >= low`` (plus ``hint``) unless the int leaf ``key`` is None or >= ``low``."""
    value = leaf_value(cfg, key)
    if value is not None and value < low:
        raise TailkdError(f"{key}={value} must be >= {low}{hint}")


def check_out_path(cfg, key: str, folder: bool) -> None:
    """The output path ``key``: a folder that is not an existing file (``folder``), or a file that is not an
    existing folder, never empty; and no existing file among its parent folders (they are created when missing)."""
    out = leaf_value(cfg, key)
    if out == "":  # Path("") is the working directory: a run or a folder written among its files, or a late crash
        raise TailkdError(f"{key} is empty; give a {'folder' if folder else 'file'} name ({flag_of(cfg, key)})")
    if not out:
        return
    try:
        _check_out_path(key, out, folder)
    except OSError as exc:  # a name longer than the filesystem's limit (errno 36), a looping symlink, ...
        raise TailkdError(f"{key}={out} cannot be used: {exc.strerror or exc}; choose another path (one name "
                          "holds at most 255 bytes on most filesystems)") from None


def _check_out_path(key: str, out: str, folder: bool) -> None:
    if folder and Path(out).exists() and not Path(out).is_dir():
        raise TailkdError(f"{key}={out} is a file; give a folder name")
    if not folder and Path(out).is_dir():
        raise TailkdError(f"{key}={out} is a folder; give a file name")
    parent = next((p for p in Path(out).absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise TailkdError(f"{key}={out}: {parent} is a file, not a folder; give a path in a folder")


def check_out_writable(cfg, key: str, *, into: bool) -> None:
    """TailkdError unless a file can be created where the output ``key`` is written: in the folder itself (``into``:
    a folder the command writes files into), else in its parent (a file, or a folder renamed into place whole; a
    symlink's beside what it points to, as `tailkd.checkpoint.atomic_write_file` / `atomic_write_dir` write it);
    the nearest of them that exists, where the missing folders would be made. A probe file is created and removed
    there (as `tailkd.checkpoint` reads a new file's mode): a folder without write permission or on a read-only file
    system was found only after the evaluation, analysis or scoring had run (PermissionError, exit 1)."""
    out = leaf_value(cfg, key)
    if not out:
        return
    path = Path(out).absolute()
    if not into and path.is_symlink():  # --out a link to a file or folder on another disk (or one still to be made)
        path = Path(os.path.realpath(path))
    start = path if into else path.parent
    folder = next((p for p in (start, *start.parents) if p.is_dir()), None)
    if folder is None:
        return
    probe = folder / f".tmp-probe-{secrets.token_hex(6)}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise TailkdError(f"{key}={out}: cannot write in {folder} ({exc.strerror or exc}); choose another "
                          f"{flag_of(cfg, key)}, or make that folder writable") from None
    probe.unlink(missing_ok=True)


def short_flags(cls) -> dict[str, str]:
    """``section.key`` -> its short flag (without ``--``) for the config class (or instance) ``cls``: its
    ``ALIASES``, for `DistillConfig` the module's."""
    return {v: k for k, v in getattr(cls, "ALIASES", ALIASES).items()}


def flag_of(cfg, key: str) -> str:
    """The flag a user types for setting ``key`` of ``cfg``: its short alias (``--out``, ``--work-dir``), else
    ``--key``."""
    return f"--{short_flags(cfg).get(key, key)}"


def leaf_value(cfg, dotted: str):
    """The value of leaf ``section.field`` of ``cfg``."""
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


# --------------------------------------------------------------------------- typing helpers


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently coerce int->float) a YAML/CLI value against a field type."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise TailkdError(f"config key {key} cannot be null")
    origin = typing.get_origin(base)
    if origin is dict:  # NAME: number pairs (loss.options); a list of mappings (the flag's NAME=VALUE words) merges
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(item, dict) for item in items):
            raise TailkdError(f"config key {key} expects NAME: number pairs (YAML: {{alpha: 0.5}}; flag: alpha=0.5), "
                              f"got {value!r}")
        out = {name: v for item in items for name, v in item.items()}
        bad = next(((n, v) for n, v in out.items() if not isinstance(n, str) or isinstance(v, bool)
                    or not isinstance(v, (int, float))), None)
        if bad:  # the names and ranges are the loss's to check (`tailkd.registry.bind`)
            raise TailkdError(f"config key {key} expects NAME: number pairs, got {bad[0]!r}: {bad[1]!r}")
        return {name: float(v) for name, v in out.items()}
    if origin is list:
        (item_tp,) = typing.get_args(base)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, key) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        raise TailkdError(f"config key {key} expects true/false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT64 <= value < INT64:  # torch and numpy read it as a C long long: 'Overflow when unpacking'
                raise TailkdError(f"config key {key} expects a 64-bit integer (of size below 2^63), got {value}")
            return value
        raise TailkdError(f"config key {key} expects an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TailkdError(f"config key {key} expects a number, got {value!r}")
    if base is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise TailkdError(f"config key {key} expects a string, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = "", omit: frozenset[str] | None = None, base=None):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types.

    Keys not given keep the values of ``base`` (default: ``cls()``, so a section keeps the defaults its config
    gives it). ``omit``: dotted leaves that are not keys (default: ``cls.OMIT``, the leaves of reused sections a
    command does not read); they keep their defaults."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "<root>"
        raise TailkdError(f"config section {where} must be a mapping, got {type(data).__name__}")
    omit = frozenset(getattr(cls, "OMIT", ())) if omit is None else omit
    base = cls() if base is None else base
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if prefix + f.name not in omit}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in section '{prefix.rstrip('.')}'" if prefix else ""
        raise TailkdError(f"unknown config key {prefix}{unknown[0]}{where}; valid keys: {', '.join(sorted(names))}")
    choices = {f.name: f.metadata.get("choices", ()) for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, f"{prefix}{name}.", omit, base=getattr(base, name))
        else:
            if isinstance(value, bool) and {"on", "off"} <= set(choices[name]):
                value = "on" if value else "off"  # YAML 1.1 reads an unquoted on / off as true / false
            kwargs[name] = _coerce(value, tp, prefix + name)
            if prefix + name in PATH_KEYS:
                kwargs[name] = expand_home(kwargs[name])
    return dataclasses.replace(base, **kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {"section.key": value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def merge(base: dict, override: dict, prefix: str = "") -> dict:
    """Deep-merge ``override`` into a copy of ``base``. Where ``override`` has a section (a mapping) and ``base`` a
    value that is neither a mapping nor null at that key, TailkdError: a section of ``base`` that is not a mapping
    (``train: 5`` in a --config under --steps) would be dropped without a word."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, f"{prefix}{key}.")
        elif isinstance(value, dict) and out.get(key) is not None:
            raise TailkdError(f"config section {prefix}{key} must be a mapping, got {type(out[key]).__name__}")
        else:
            out[key] = value
    return out


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads a float written with an exponent and no dot (``1e-4``, ``5E+2``) as a
    number, as YAML 1.2 does; YAML 1.1's rule wants a dot (``1.0e-4``) and reads ``lr: 1e-4`` as a string."""


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str):
    """The document ``text`` as `YamlLoader` reads it (every YAML a user writes: --config, run configs, --set);
    a document nested past Python's stack is a ``yaml.YAMLError`` too, as any other YAML that cannot be read."""
    try:
        return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader
    except RecursionError:  # PyYAML's composer and constructor recurse per nesting level
        raise yaml.YAMLError("nested too deeply to read") from None


def utf8_text(path: Path, name: str, fix: str) -> str:
    """The text of the file ``path`` (a YAML file, a chat template) as ``read_text(encoding="utf-8")`` reads it (line
    endings \\r\\n and \\r as \\n); where it is not UTF-8, a TailkdError: ``name`` (the file in words), the line
    (counted so: a lone \\r ends one), then ``fix``."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1
        raise TailkdError(f"{name} is not UTF-8 text (line {line}: {exc.reason}); {fix}") from None


def load_yaml(path: str | Path, *, what: str = "config file", missing: str = "pass an existing YAML file to --config",
              mapping: str = "sections (teacher:, student:, ...)") -> dict:
    """The mapping in the YAML file ``path``, or a one-line TailkdError naming it as ``what`` (a missing file: with
    the fix ``missing``; not a mapping: of ``mapping``). Defaults: a --config file; `tailkd.recipe` names its own."""
    p = Path(os.path.expanduser(path))  # '~user' of no user as it is (pathlib: RuntimeError)
    if not p.is_file():
        raise TailkdError(f"{what} {p} {'is a folder, not a file' if p.is_dir() else 'does not exist'}; {missing}")
    text = utf8_text(p, f"{what} {p}", "save it as UTF-8")
    try:
        data = read_yaml(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int of over 4300 digits
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TailkdError(f"{what} {p} is not valid YAML ({first}); fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TailkdError(f"{what} {p} must hold a mapping of {mapping}")
    return data


def save_yaml(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


# --------------------------------------------------------------------------- CLI flags

# Short flags for the knobs people type most; each maps to one ``section.field``.
ALIASES = {
    "teacher": "teacher.path",
    "student": "student.path",
    "teacher-cache": "teacher.cache",
    "student-layers": "student.num_layers",
    "data": "data.paths",
    "seq-len": "data.seq_len",
    "task": "data.task",
    "heldout-data": "data.heldout_paths",
    "loss": "loss.name",
    "k": "loss.k",
    "beta": "loss.beta",
    "gamma": "loss.gamma",
    "temperature": "loss.temperature",
    "cosine-weight": "loss.cosine_weight",
    "out": "train.out_dir",
    "steps": "train.max_steps",
    "batch-size": "train.batch_size",
    "grad-accum": "train.grad_accum",
    "lr": "train.lr",
    "seed": "train.seed",
    "device": "train.device",
    "resume": "train.resume",
    "overwrite": "train.overwrite",
    "force": "train.force_resume",
    "fused-loss": "train.fused_loss",
}


def _leaves(cls, prefix: str = "", omit: frozenset[str] | None = None):
    """(dotted name, type, field) of every leaf of config ``cls``, in field order, skipping ``cls.OMIT``."""
    omit = frozenset(getattr(cls, "OMIT", ())) if omit is None else omit
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, prefix + f.name + ".", omit)
        elif prefix + f.name not in omit:
            yield prefix + f.name, tp, f


def _str2bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


_TYPE_NAMES = {int: "INT", float: "FLOAT", bool: "BOOL", str: "TEXT"}  # a flag's value in --help


def _name_value(text: str) -> dict:
    """An argparse type for a dict leaf's words: ``NAME=VALUE`` (a number) -> ``{NAME: VALUE}``."""
    name, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or number is None or not re.fullmatch(r"[a-z][a-z0-9_]*", name.strip()):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with a number, e.g. alpha=0.5; got {text!r}")
    return {name.strip(): number}


def add_config_flags(parser: argparse.ArgumentParser, cls=DistillConfig) -> None:
    """Add ``--config`` and one flag per leaf of ``cls`` (plus its short aliases: ``cls.ALIASES``, for
    `DistillConfig` the module's ``ALIASES``); a field marked ``positional=`` takes the positional arguments. A leaf's
    help is its field's, or the command's own where a shared section means something else there (``cls.HELP``,
    {dotted name: help})."""
    parser.add_argument("--config", metavar="YAML", help="YAML file mirroring the config sections; flags override it")
    reverse = short_flags(cls)
    defaults = cls()
    own_help = getattr(cls, "HELP", {})
    for dotted, tp, f in _leaves(cls):
        base, optional = _unwrap_optional(tp)
        default = leaf_value(defaults, dotted)
        if typing.get_origin(base) is dict:  # NAME=VALUE words, merged over the YAML's mapping; a repeated flag adds
            parser.add_argument("--" + dotted, dest=dotted, nargs="*", type=_name_value, metavar="NAME=VALUE",
                                action="extend", default=argparse.SUPPRESS,
                                help=own_help.get(dotted, f.metadata.get("help", "")))
            continue
        is_list = typing.get_origin(base) is list
        unset = ("no value unsets it" if is_list else "null unsets it") if optional else ""
        text = own_help.get(dotted, f.metadata.get("help", ""))
        if "default:" in text:  # the help says what the default means: not a second "(default: None)"
            text += f" ({unset})" if unset else ""
        else:
            text += f" (default: {default}{'; ' + unset if unset else ''})"
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text}
        if f.metadata.get("positional"):
            (item,) = typing.get_args(base)
            parser.add_argument(dotted, metavar=f.metadata["positional"], nargs="*", type=item, **kw)
            continue
        names = ["--" + dotted]
        if dotted in reverse:
            names.insert(0, "--" + reverse[dotted])
        item = typing.get_args(base)[0] if is_list else base
        choices = f.metadata.get("choices")
        kw["metavar"] = "{" + ",".join(choices) + "}" if choices else _TYPE_NAMES[item]  # --help: the type
        if is_list:  # no value: an empty list (YAML's []), or None for an optional one
            kw.update(nargs="*", type=item)
        elif base is bool:
            kw.update(nargs="?", const=True, type=_or_null(_str2bool) if optional else _str2bool)
        else:
            kw.update(type=_or_null(base) if optional else base)
        parser.add_argument(*names, dest=dotted, **kw)


def _or_null(base):
    """An argparse type for an optional field: ``null`` (YAML's word) is None, anything else ``base(text)``."""
    def parse(text: str):
        return None if text == "null" else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error ("invalid int value")
    return parse


def config_from_args(args: argparse.Namespace, cls=DistillConfig):
    """YAML (``--config``) first, then explicit flags on top; under both, for a config with a ``run_defaults``
    hook (eval, lm-eval), the settings of the run that produced the saved model; validated."""
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    override: dict = {}
    for dotted, tp, _ in _leaves(cls):
        value = vars(args).get(dotted, argparse.SUPPRESS)
        if value == [] and _unwrap_optional(tp)[1]:
            value = None  # an optional list flag given without values: unset
        if typing.get_origin(tp) is dict and value is not argparse.SUPPRESS:
            value = {name: v for item in value for name, v in item.items()}  # deep-merged over the YAML's mapping
        if value is not argparse.SUPPRESS:  # (Python 3.10 stores SUPPRESS for an empty positional list)
            node = override
            parts = dotted.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
    return config_from_dict(cls, merge(data, override))


def config_from_dict(cls, given: dict):
    """Config ``cls`` from the sections ``given`` (YAML and flags merged), under them the settings of the run
    that produced a saved model for a config with a ``run_defaults`` hook (eval, lm-eval); validated."""
    if hasattr(cls, "run_defaults"):
        from_dict(cls, given)  # the types first: run_defaults reads the saved model's path from them
        given = merge(cls.run_defaults(given), given)
    cfg = from_dict(cls, given)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def parse_assignment(text: str) -> dict:
    """``section.key=value`` (the value read as YAML: numbers, true/false, lists) -> ``{section: {key: value}}``."""
    dotted, sep, value = text.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise TailkdError(f"--set {text!r} must look like section.key=value, e.g. train.max_steps=400")
    try:
        parsed = read_yaml(value) if value.strip() else ""
    except (yaml.YAMLError, ValueError):
        parsed = value
    node: dict = {}
    out = node
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = parsed
    return out
