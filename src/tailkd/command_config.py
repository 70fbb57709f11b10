"""Typed configs of the subcommands other than distill: eval, analyze-teacher, cache-teacher, lm-eval, compare, flops,
select-data, reproduce.

Each is a dataclass of sections, exactly like `tailkd.config.DistillConfig`: YAML (``--config``) mirrors it key
for key, every leaf is a flag ``--section.field`` and the flags users type most keep their short spellings
(``ALIASES``: ``--student``, ``--data``, ``--seq-len``, ``--out``, ...). Where a setting means what it means for
``tailkd distill`` the section is distill's own: ``data`` is a `DataConfig` (the same packed rows, held-out split,
``builtin:math`` and SFT rules) and ``teacher`` a `TeacherConfig`; ``OMIT`` lists the leaves of a reused section a
command does not read (no flag for them, and an unknown key in YAML), ``HELP`` the command's own --help of a reused
leaf that means something else there (select-data's --seq-len: its scoring window). The rest is one small section
per command (``eval``, ``generate``, ``analyze``, ``cache``, ``lm_eval``, ``compare``, ``flops``, ``select``,
``reproduce``). Floats are checked by `tailkd.config.FLOAT_RANGES`, choices by ``choices=`` metadata, both through
`tailkd.config.check_leaves`.

eval and lm-eval read a saved model; ``run_defaults`` fills the settings not given with the ones of the run that
produced it (``RUN/final`` -> ``RUN/config.yaml``), so the held-out split is the run's own.

A module of its own because `tailkd.config` holds the machinery and distill's config (over 800 lines): these
configs there would take it past 1,400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar, Optional

import yaml

from tailkd.config import (
    INT64,
    DataConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    _f,
    _leaves,
    check_at_least,
    check_data,
    check_device_name,
    check_leaves,
    check_out_path,
    check_out_writable,
    from_dict,
    leaf_value,
    read_yaml,
    utf8_text,
)
from tailkd.errors import TailkdError

EVAL_SPLITS = ("heldout", "train", "all")
CACHE_SPLITS = ("train", "heldout")
LM_EVAL_SPLITS = ("heldout", "all")
CACHE_HIDDEN_DTYPES = ("bf16", "fp16", "fp32")  # the keys of tailkd.cache.HIDDEN_DTYPES (a test checks they agree)
DEVICE_HELP = "auto (cuda if visible, else cpu), cpu, cuda or cuda:N"

# The data flags of tailkd distill, for every command with a data section (those of omitted leaves are unused).
DATA_ALIASES = {"data": "data.paths", "seq-len": "data.seq_len", "cache-dir": "data.cache_dir",
                "doc-sep": "data.doc_sep", "heldout-fraction": "data.heldout_fraction", "task": "data.task",
                "heldout-data": "data.heldout_paths"}
# data.* leaves that only shape SFT rows (prompt/response): omitted where a command reads packed text only.
SFT_ONLY = ("data.task", "data.sft_mode", "data.chat_template", "data.overlong", "data.split_seed",
            "data.instruct_heldout", "data.instruct_max_words")
# The SFT leaves, data.heldout_paths (--heldout-data, held-out files for pretraining and SFT alike) and
# data.document_attention (how packed rows attend): omitted (no flag; an unknown key in YAML) where a command reads
# the training corpus's documents only: lm-eval's held-out split is that corpus's own held-out fraction, and
# select-data scores every document of it on its own.
CORPUS_ONLY = (*SFT_ONLY, "data.heldout_paths", "data.document_attention")


def _aliases(section: str, cls, *names: str) -> dict[str, str]:
    """``--a-b`` -> ``section.a_b`` for the fields ``names`` of ``cls`` (all of them if none is named)."""
    names = names or tuple(f.name for f in fields(cls))
    return {name.replace("_", "-"): f"{section}.{name}" for name in names}


def _check_device(cfg, key: str) -> None:
    """The device name of setting ``key`` (`check_device_name`; whether CUDA is visible: at run time)."""
    check_device_name(key, leaf_value(cfg, key))


def check_replaced_output(cfg, key: str, command: str, marks: tuple[str, ...]) -> None:
    """The JSON file of output setting ``key`` replaces only an earlier output of ``command``: an existing non-empty
    file must be a JSON object holding the keys ``marks`` (what ``command`` always writes). Any other file — the
    student's config.json, a run's metrics.jsonl, a data file — is refused before anything runs: it was replaced
    after the work (a student that no longer loaded)."""
    out = Path(leaf_value(cfg, key) or "")
    if not str(out) or not out.is_file() or out.stat().st_size == 0:
        return
    try:
        old = json.loads(out.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError):  # ValueError: not UTF-8 or not JSON; Recursion: nested too deep
        old = None
    if not (isinstance(old, dict) and all(m in old for m in marks)):
        raise TailkdError(f"refusing to replace {out}: it is not a tailkd {command} output (a JSON object with "
                          f"{' and '.join(repr(m) for m in marks)}); choose another --out, or delete the file")


# --------------------------------------------------------------------------- the run that produced a saved model


def read_run_config(model_dir: str | Path | None) -> tuple[dict, Path | None]:
    """(the config.yaml of the run that produced ``model_dir``, its path): ``model_dir/config.yaml`` or
    ``model_dir/../config.yaml`` (``RUN/final`` -> ``RUN/config.yaml``); ({}, None) if there is none."""
    if not model_dir:
        return {}, None
    p = Path(model_dir)
    for cand in (p / "config.yaml", p.parent / "config.yaml"):
        if cand.is_file():
            fix = "give the teacher and data settings yourself and move it away"
            text = utf8_text(cand, f"the run config {cand} of {p}", f"save it as UTF-8, or {fix}")
            try:
                cfg = read_yaml(text)
            except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int of 4300+ digits
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise TailkdError(f"the run config {cand} of {p} is not valid YAML ({first}); repair it, or "
                                  f"{fix}") from None
            return (cfg if isinstance(cfg, dict) else {}), cand
    return {}, None


def run_sections(cls, model_dir: str | None, sections: tuple[str, ...]) -> tuple[dict, dict]:
    """(the ``sections`` of the run config of ``model_dir`` restricted to the leaves ``cls`` reads, the whole run
    config). Keys a command does not read are left out; a value of the wrong type is an error naming the file."""
    run, path = read_run_config(model_dir)
    keys = {dotted for dotted, _, _ in _leaves(cls)}
    out: dict = {}
    for section in sections:
        values = run.get(section)
        if isinstance(values, dict):
            out[section] = {k: v for k, v in values.items() if f"{section}.{k}" in keys}
    try:
        from_dict(cls, out)
    except TailkdError as exc:
        raise TailkdError(f"{path}: {exc}") from None
    return out, run


def _given(given: dict, section: str, key: str):
    part = given.get(section)
    return part.get(key) if isinstance(part, dict) else None


# --------------------------------------------------------------------------- tailkd eval


@dataclass
class EvalOptions:
    student: Optional[str] = _f(None, "saved student folder, e.g. runs/x/final (required); the teacher and data "
                                      "settings not given are those of its run (RUN/config.yaml)")
    split: str = _f("heldout", "which rows: the held-out split tailkd distill uses, train, or all",
                    choices=EVAL_SPLITS)
    batch_size: int = _f(4, "rows per forward pass (results do not depend on it); prompts per batch with --generate "
                            "(the sampled completions, with --samples, do)")
    max_rows: int = _f(64, "evaluate at most this many rows (0: all)")
    bins: int = _f(10, "calibration bins M on [0, 1] for Full-ECE and ECE")
    device: str = _f("auto", DEVICE_HELP)
    out: str = _f("eval.json", "JSON file for the results (e.g. RUN/eval.json for tailkd compare); a re-run replaces "
                               "an earlier eval output there, any other existing file is refused")


@dataclass
class GenerateOptions:
    enabled: bool = _f(False, "generation-based evaluation instead of the held-out metrics: decode held-out prompts "
                              "with student and teacher and score exact match of the final answer ('#### N', else "
                              "'the answer is N', else the last number) and ROUGE-L (generate.rouge)")
    prompts: list[str] = _f([], "prompt/response JSONL files whose every example is decoded (the response, a "
                                "reference, may be left out), rendered as "
                                "data.chat_template says (the run's) (default: the held-out split of the data when "
                                "data.task is sft, as an SFT run's; else the built-in math problems' held-out set)")
    max_new_tokens: int = _f(256, "tokens generated per prompt")
    samples: int = _f(0, "sampled completions per prompt besides greedy (>= 2 adds Distinct-n and Self-BLEU)")
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling p")
    limit: int = _f(20, "evaluate the first N prompts (0: all)")
    seed: int = _f(0, "sampling seed")
    rouge: bool = _f(True, "also score ROUGE-L F (rouge-score package, stemmed) of each completion against its "
                           "prompt's reference response, averaged over prompts; every example then needs a non-empty "
                           "reference (an error otherwise); false: exact match and diversity only")
    teacher: bool = _f(True, "decode with the teacher too, as a reference; false: the student only (the teacher's "
                             "results are the same for every student of one teacher, prompts and seed)")


@dataclass
class EvalConfig:
    """``tailkd eval``: a saved student against a teacher, on held-out rows (or generation on held-out prompts)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalOptions = field(default_factory=EvalOptions)
    generate: GenerateOptions = field(default_factory=GenerateOptions)

    OMIT: ClassVar[tuple[str, ...]] = ("teacher.cache", "teacher.parallel", "data.eval_rows")
    HELP: ClassVar[dict[str, str]] = {
        "data.seq_len": "tokens per packed held-out row (default: the student's run's; 128 without one); with "
                        "--generate the most tokens of a decoded prompt/response example (a pretraining run's row "
                        "length is not taken: 128 unless given)",
        "data.document_attention": "each document of a packed held-out row attends to itself alone (default: the "
                                   "student's run's; false without one)"}
    ALIASES: ClassVar[dict[str, str]] = {
        "student": "eval.student", "teacher": "teacher.path", "teacher-dtype": "teacher.dtype", **DATA_ALIASES,
        **_aliases("eval", EvalOptions, "split", "batch_size", "max_rows", "bins", "device", "out"),
        "generate": "generate.enabled", "gen-limit": "generate.limit",
        **_aliases("generate", GenerateOptions, "prompts", "max_new_tokens", "samples", "temperature", "top_p",
                   "seed", "rouge")}

    @classmethod
    def run_defaults(cls, given: dict) -> dict:
        """The teacher and data sections of the student's run. With ``--generate`` a pretraining run's data.paths
        and data.seq_len are left out: text holds no prompts (the built-in math problems are decoded instead, their
        examples limited by the given --seq-len or the default, not by the length of the run's packed text rows)."""
        out, run = run_sections(cls, _given(given, "eval", "student"), ("teacher", "data"))
        if _given(given, "generate", "enabled") and _given(run, "data", "task") != "sft":
            for key in ("paths", "seq_len"):
                out.get("data", {}).pop(key, None)
        return out

    def validate(self) -> EvalConfig:
        check_leaves(self)
        if not self.eval.student:
            raise TailkdError("eval.student is not set; pass --student DIR (a saved student, e.g. runs/x/final)")
        check_at_least(self, "data.seq_len", 2, " (a row needs a token and its successor)")
        check_data(self)
        for key in ("eval.batch_size", "eval.bins", "generate.max_new_tokens"):
            check_at_least(self, key, 1)
        for key in ("eval.max_rows", "generate.samples", "generate.limit"):
            check_at_least(self, key, 0, " (0: all)" if key != "generate.samples" else "")
        _check_device(self, "eval.device")
        check_out_path(self, "eval.out", folder=False)
        check_out_writable(self, "eval.out", into=False)
        check_replaced_output(self, "eval.out", "eval", ("student", "teacher"))
        if self.generate.enabled and self.data.paths and self.data.task != "sft":
            raise TailkdError("eval --generate decodes prompt/response data: pass the files with --prompts FILE.jsonl "
                              "(generate.prompts); --data (data.paths) is read by --generate only with --task sft, "
                              "as its held-out split")
        missing = next((p for p in self.generate.prompts if not Path(p).exists()), None)
        if missing is not None:
            raise TailkdError(f"generate.prompts: {missing} does not exist; fix the path given to --prompts")
        if self.generate.enabled and self.generate.rouge:
            _check_rouge_installed()
        return self


def _check_rouge_installed() -> None:
    """eval --generate scores ROUGE-L with the rouge-score package: say so before any model is loaded."""
    from importlib.util import find_spec

    if find_spec("rouge_score") is None:
        raise TailkdError("eval --generate scores ROUGE-L with the rouge-score package, which is not installed: "
                          "pip install rouge-score (a dependency of tailkd), or pass --generate.rouge false")


# --------------------------------------------------------------------------- tailkd analyze-teacher


@dataclass
class AnalyzeOptions:
    teachers: list[str] = _f(["smollm2"], "teacher specs (smollm2, HF folders, .gguf), each with its own tokeniser")
    split: str = _f("heldout", "which rows: the held-out split tailkd distill uses, train, or all",
                    choices=EVAL_SPLITS)
    batch_size: int = _f(4, "rows per forward pass")
    max_rows: int = _f(32, "analyse at most this many rows (0: all)")
    kmax: int = _f(100, "largest K of the tail-mass curve")
    device: str = _f("auto", DEVICE_HELP)
    out: str = _f("teacher_analysis", "output folder (teacher_analysis.json, teacher_tail_mass.png)")


@dataclass
class AnalyzeTeacherConfig:
    """``tailkd analyze-teacher``: tail mass α_K and mode mismatch of one or more teachers on a corpus."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # its dtype (the specs are analyze.teachers)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=256))
    analyze: AnalyzeOptions = field(default_factory=AnalyzeOptions)

    OMIT: ClassVar[tuple[str, ...]] = ("teacher.path", "teacher.cache", "teacher.parallel", "data.eval_rows")
    HELP: ClassVar[dict[str, str]] = {"data.seq_len": "tokens per packed row the teachers score"}
    ALIASES: ClassVar[dict[str, str]] = {"teacher": "analyze.teachers", "dtype": "teacher.dtype", **DATA_ALIASES,
                                         **_aliases("analyze", AnalyzeOptions, "split", "batch_size", "max_rows",
                                                    "kmax", "device", "out")}

    def validate(self) -> AnalyzeTeacherConfig:
        check_leaves(self)
        if not self.analyze.teachers:
            raise TailkdError("no teacher given; pass --teacher SPEC (e.g. smollm2), several to compare")
        check_at_least(self, "data.seq_len", 2, " (a row needs a token and its successor)")
        check_data(self)
        check_at_least(self, "analyze.batch_size", 1)
        check_at_least(self, "analyze.max_rows", 0, " (0: all)")
        check_at_least(self, "analyze.kmax", 1, " (the paper uses 100)")
        _check_device(self, "analyze.device")
        check_out_path(self, "analyze.out", folder=True)
        check_out_writable(self, "analyze.out", into=True)
        return self


# --------------------------------------------------------------------------- tailkd cache-teacher


@dataclass
class CacheOptions:
    out: Optional[str] = _f(None, "cache folder (required; resumed if it holds a cache with the same settings)")
    k: int = _f(64, "teacher top-K ids cached per token")
    hidden_states: bool = _f(False, "also cache the teacher's final hidden states (every loss exact at train time)")
    hidden_dtype: str = _f("bf16", "dtype of the cached hidden states", choices=CACHE_HIDDEN_DTYPES)
    tail_samples: int = _f(0, "M tail tokens sampled per position (0: none)")
    split: str = _f("train", "which rows to cache: the training rows (what distill reads), or the held-out ones (of "
                             "packed text: the corpus's own held-out fraction, never --heldout-data files; of SFT "
                             "data: the held-out examples, --heldout-data's where given; distill reads none: a "
                             "held-out cache is for the Python API, tailkd.cache.CacheReader)", choices=CACHE_SPLITS)
    batch_size: int = _f(8, "rows per teacher forward")
    rows_per_shard: Optional[int] = _f(None, "rows per shard (default: ~256 MiB shards)")
    max_rows: int = _f(0, "cache only the first N rows (0: all)")
    device: str = _f("auto", DEVICE_HELP)
    seed: int = _f(0, "seed of the tail samples")
    ddp_timeout: int = _f(1800, "torchrun: seconds a rank waits in one collective for the others (a hung rank) "
                                "before the run fails")
    tokenizer: Optional[str] = _f(None, "model folder whose tokenizer reads the data, of the teacher's vocabulary: a "
                                        "run with --student DIR reads its data with that student's (its chat "
                                        "template renders SFT prompts): pass DIR (default: the teacher's)")


@dataclass
class CacheTeacherConfig:
    """``tailkd cache-teacher``: the teacher's top-K (+ hidden states, tail samples) over distill's training rows
    (packed text, or ``--task sft``: prompt/response rows)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheOptions = field(default_factory=CacheOptions)

    OMIT: ClassVar[tuple[str, ...]] = ("teacher.cache", "data.eval_rows")
    HELP: ClassVar[dict[str, str]] = {
        "data.heldout_paths": "sft: held-out JSONL files, as distill reads them (training examples sharing their "
                              "prompts are dropped; --split heldout caches them); not with task pretrain, whose "
                              "held-out split is the corpus's own fraction"}
    ALIASES: ClassVar[dict[str, str]] = {"teacher": "teacher.path", "dtype": "teacher.dtype", **DATA_ALIASES,
                                         **_aliases("cache", CacheOptions)}

    def validate(self) -> CacheTeacherConfig:
        check_leaves(self)
        if not self.cache.out:
            raise TailkdError("cache.out is not set; pass --out DIR (the cache folder)")
        check_out_path(self, "cache.out", folder=True)
        check_out_writable(self, "cache.out", into=True)
        check_cache_out(Path(self.cache.out))  # before the teacher loads (minutes for a large one)
        for key in ("data.seq_len", "cache.k", "cache.batch_size", "cache.rows_per_shard", "cache.ddp_timeout"):
            check_at_least(self, key, 1)
        check_data(self)
        if self.data.heldout_paths and self.data.task != "sft":  # distill's training rows do not depend on them
            raise TailkdError("--heldout-data is read by cache-teacher only with --task sft (training examples "
                              "sharing a held-out prompt are dropped); a pretraining corpus's rows do not depend on "
                              "it, and --split heldout caches that corpus's own held-out fraction: drop it")
        check_at_least(self, "cache.tail_samples", 0, " (0: none)")
        check_at_least(self, "cache.max_rows", 0, " (0: all)")
        _check_device(self, "cache.device")
        return self


def check_cache_out(out: Path) -> None:
    """TailkdError where ``out`` is a folder holding files but no teacher cache (``cache.json``): a cache is never
    written among other files. A killed writer's temporary files (``.tmp-*``) do not count."""
    if out.is_dir() and not (out / "cache.json").is_file() and any(
            not p.name.startswith(".tmp-") for p in out.iterdir()):
        raise TailkdError(f"{out} exists and is not a teacher cache; choose a new or empty --out")


# --------------------------------------------------------------------------- tailkd lm-eval


WRITE_ONLY_WORK_DIR = "lm_eval_tasks"  # lm-eval --write-only's task folder when no --work-dir is given


@dataclass
class LmEvalOptions:
    model: Optional[str] = _f(None, "saved model folder, e.g. runs/x/final (required); the data settings not given "
                                    "are those of its run (RUN/config.yaml)")
    tasks: str = _f("tailkd_ppl", "comma-separated: tailkd_ppl, tailkd_gsm, paper, lm-eval task names")
    split: str = _f("heldout", "tailkd_ppl: the documents tailkd distill holds out of the training corpus (a run's "
                               "--heldout-data files are not read; an SFT run's data is refused: pass --data), or "
                               "all", choices=LM_EVAL_SPLITS)
    gsm_data: Optional[str] = _f(None, 'tailkd_gsm problems: .jsonl of {"question", "answer": "... #### N"}')
    max_gen_toks: int = _f(256, "tailkd_gsm: generated tokens at most (below the model's context: lm-eval keeps the "
                                     "last context - max_gen_toks tokens of the question)")
    limit: Optional[float] = _f(None, "at most this many documents per task; below 1: this fraction of them "
                                      "(lm-eval --limit)")
    num_fewshot: Optional[int] = _f(None, "few-shot examples (lm-eval --num_fewshot); tailkd_ppl and tailkd_gsm "
                                          "stay zero-shot")
    batch_size: int = _f(1, "lm-eval batch size")
    device: str = _f("auto", DEVICE_HELP)
    work_dir: Optional[str] = _f(None, "where task YAMLs + data are written (default: a temporary folder; with "
                                       "--write-only: ./lm_eval_tasks)")
    write_only: bool = _f(False, "only write the task folder and print the lm_eval command")
    out: str = _f("lm_eval.json", "JSON file for lm-eval's results; a re-run replaces an earlier lm-eval output there, "
                                  "any other existing file is refused")

    def task_folder(self) -> Optional[str]:
        """The folder the task files are written to: --work-dir, else --write-only's ./lm_eval_tasks, else None (a
        temporary folder, removed after the run)."""
        return self.work_dir or (WRITE_ONLY_WORK_DIR if self.write_only else None)


@dataclass
class LmEvalConfig:
    """``tailkd lm-eval``: lm-evaluation-harness on a saved model, with our offline tasks over local data."""

    data: DataConfig = field(default_factory=DataConfig)  # tailkd_ppl's documents
    lm_eval: LmEvalOptions = field(default_factory=LmEvalOptions)

    OMIT: ClassVar[tuple[str, ...]] = ("data.seq_len", "data.eval_rows", *CORPUS_ONLY)
    ALIASES: ClassVar[dict[str, str]] = {**DATA_ALIASES, **_aliases("lm_eval", LmEvalOptions)}

    @classmethod
    def run_defaults(cls, given: dict) -> dict:
        """The data section of the model's run (tailkd_ppl then reads that run's held-out documents)."""
        return run_sections(cls, _given(given, "lm_eval", "model"), ("data",))[0]

    def validate(self) -> LmEvalConfig:
        check_leaves(self)
        if not self.lm_eval.model:
            raise TailkdError("lm_eval.model is not set; pass --model DIR (a saved model, e.g. runs/x/final)")
        for key in ("lm_eval.max_gen_toks", "lm_eval.batch_size"):
            check_at_least(self, key, 1)
        check_data(self)
        check_at_least(self, "lm_eval.num_fewshot", 0)
        _check_device(self, "lm_eval.device")
        check_out_path(self, "lm_eval.out", folder=False)
        check_out_writable(self, "lm_eval.out", into=False)
        work = replace(self, lm_eval=replace(self.lm_eval, work_dir=self.lm_eval.task_folder()))
        check_out_path(work, "lm_eval.work_dir", folder=True)
        check_out_writable(work, "lm_eval.work_dir", into=True)
        check_replaced_output(self, "lm_eval.out", "lm-eval", ("results",))
        return self


# --------------------------------------------------------------------------- tailkd compare


@dataclass
class CompareOptions:
    runs: list[str] = _f([], "run folders written by tailkd distill", positional="RUN")
    baseline: Optional[str] = _f(None, "run for the relative change (e.g. the vanilla KD run)")
    out: str = _f("compare", "output folder, replaced as a whole: new, empty or an earlier compare output (with "
                             "compare.json)")


@dataclass
class CompareConfig:
    """``tailkd compare``: runs side by side (held-out KL curves, a table with Rel = 100·ln(x / x_base); for runs with
    ``tailkd eval --generate`` results, ROUGE-L and diversity columns and a fidelity-vs-diversity scatter plot)."""

    compare: CompareOptions = field(default_factory=CompareOptions)

    ALIASES: ClassVar[dict[str, str]] = _aliases("compare", CompareOptions, "baseline", "out")

    def validate(self) -> CompareConfig:
        check_leaves(self)
        check_out_path(self, "compare.out", folder=True)
        check_out_writable(self, "compare.out", into=False)
        from tailkd.compare import check_compare_out

        check_compare_out(self.compare.out)  # before a recipe's stages run, not after them
        return self


# --------------------------------------------------------------------------- tailkd flops


@dataclass
class FlopsOptions:
    teacher: Optional[str] = _f(None, "teacher: model folder, config.json, .gguf or smollm2 (no weights read)")
    student: Optional[str] = _f(None, "student: model folder, config.json, .gguf or smollm2 (no weights read)")
    teacher_params: Optional[float] = _f(None, "teacher total parameters (e.g. 1.8e9), instead of --teacher")
    student_params: Optional[float] = _f(None, "student total parameters (e.g. 1.2e9), instead of --student")
    vocab: Optional[int] = _f(None, "vocabulary size (with --*-params)")
    hidden: Optional[int] = _f(None, "teacher hidden size d (with --*-params)")
    student_hidden: Optional[int] = _f(None, "student hidden size (default: --hidden)")
    teacher_layers: Optional[int] = _f(None, "teacher layers (attention term; with --*-params)")
    student_layers: Optional[int] = _f(None, "student layers (attention term; with --*-params)")
    teacher_tied: bool = _f(False, "with --teacher-params: its LM head is tied to the embedding")
    student_tied: bool = _f(False, "with --student-params: its LM head is tied to the embedding")
    seq_len: int = _f(2048, "tokens per training row (attention term)")
    tokens: float = _f(1e6, "training tokens to count (1M, as the paper's Table 3)")
    freeze_embeddings: bool = _f(False, "student input embeddings frozen (as distill's student.freeze_embeddings): "
                                        "a head tied to them has no weight gradient, an untied one still trains")
    delta: float = _f(0.5, "MiniPLM difference-sampling ratio δ")
    reference: Optional[str] = _f(None, "MiniPLM reference model (folder/config.json)")
    reference_params: float = _f(125e6, "MiniPLM reference model parameters (without --reference)")
    prompt_len: int = _f(128, "generation methods: prompt tokens per sequence")
    gen_len: int = _f(256, "generation methods: generated tokens per prompt")
    ppo_epochs: int = _f(4, "MiniLLM: policy-update passes per rollout")
    out: Optional[str] = _f(None, "also write the table as JSON (replacing an earlier flops output there; any other "
                                  "existing file is refused)")


@dataclass
class FlopsConfig:
    """``tailkd flops``: FLOPs of KD, TAD, MiniPLM, SeqKD, MiniLLM per training tokens (paper Table 3).

    One section of its own: FLOPs are counted from model sizes, with no data, weights or dtype, so none of
    distill's sections applies."""

    flops: FlopsOptions = field(default_factory=FlopsOptions)

    ALIASES: ClassVar[dict[str, str]] = _aliases("flops", FlopsOptions)

    def validate(self) -> FlopsConfig:
        check_leaves(self)
        f = self.flops
        for role in ("teacher", "student"):
            if getattr(f, role) is None:
                if getattr(f, f"{role}_params") is None:
                    raise TailkdError(f"give --{role} SPEC (model folder, config.json, .gguf, smollm2) or "
                                      f"--{role}-params N")
                if f.vocab is None or f.hidden is None:
                    raise TailkdError(f"--{role}-params needs --vocab and --hidden "
                                      "(and --student-hidden if the student is narrower)")
        for key in ("flops.seq_len", "flops.gen_len", "flops.vocab", "flops.hidden", "flops.student_hidden"):
            check_at_least(self, key, 1)
        for key in ("flops.prompt_len", "flops.ppo_epochs", "flops.teacher_layers", "flops.student_layers"):
            check_at_least(self, key, 0)
        check_out_path(self, "flops.out", folder=False)
        check_out_writable(self, "flops.out", into=False)
        check_replaced_output(self, "flops.out", "flops", ("methods",))
        return self


# The dataclasses of `tailkd distill` and of these commands, for tests and tools that walk every config.
# --------------------------------------------------------------------------- tailkd select-data


@dataclass
class SelectOptions:
    reference: Optional[str] = _f(None, "reference model (required), smaller than the teacher: an HF folder, a "
                                        ".gguf file, or a student tailkd saved (e.g. a CLM run's final); another "
                                        "tokenizer than the teacher's scores per byte, each model in its own")
    keep: float = _f(0.5, "fraction of the documents kept, those with the highest scores (MiniPLM: 0.5)")
    out: str = _f("selected", "output folder: selected.jsonl (the kept documents, field text, in corpus order), "
                              "scores.jsonl, selection.json; a new or empty folder, or a previous select-data output "
                              "(replaced); any other folder is refused")
    batch_size: int = _f(8, "windows of data.seq_len tokens per forward")
    max_docs: int = _f(0, "score only the first N documents (0: all)")
    device: str = _f("auto", DEVICE_HELP)


@dataclass
class SelectDataConfig:
    """``tailkd select-data``: MiniPLM's difference sampling of a pretraining corpus (`tailkd.selection`)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=256))
    select: SelectOptions = field(default_factory=SelectOptions)

    OMIT: ClassVar[tuple[str, ...]] = ("teacher.cache", "teacher.parallel", "data.eval_rows", "data.heldout_fraction",
                                       *CORPUS_ONLY)
    ALIASES: ClassVar[dict[str, str]] = {"teacher": "teacher.path", "dtype": "teacher.dtype", **DATA_ALIASES,
                                         **_aliases("select", SelectOptions)}
    HELP: ClassVar[dict[str, str]] = {
        "data.seq_len": "tokens per scoring window: a longer document is scored in consecutive windows of this many "
                        "tokens, each given the previous window's last token as context"}

    def validate(self) -> SelectDataConfig:
        check_leaves(self)
        if not self.select.reference:
            raise TailkdError("select.reference is not set; pass --reference MODEL (a model smaller than the "
                              "teacher, e.g. a CLM run's RUN/final, or the paper's OPT-125M)")
        check_at_least(self, "data.seq_len", 1)
        check_at_least(self, "select.batch_size", 1)
        check_data(self)
        check_at_least(self, "select.max_docs", 0, " (0: all)")
        check_out_path(self, "select.out", folder=True)
        check_out_writable(self, "select.out", into=False)
        _check_device(self, "select.device")
        return self


# --------------------------------------------------------------------------- tailkd seqkd-data


@dataclass
class SeqkdOptions:
    out: str = _f("seqkd", "output folder: responses.jsonl (each prompt with the teacher's response: train on it with "
                           "tailkd distill --task sft --data OUT/responses.jsonl) and seqkd.json (settings, counts)")
    samples: int = _f(1, "responses per prompt, each a line of its own (> 1 needs seqkd.temperature > 0)")
    temperature: float = _f(0.0, "0: greedy decoding (the teacher's mode, which Kim & Rush approximate with beam "
                                 "search; no beam search here); > 0: sampled at this temperature")
    top_p: float = _f(1.0, "nucleus p when sampling (no top-k cut)")
    max_new_tokens: int = _f(256, "most tokens per response")
    keep_unfinished: bool = _f(False, "keep responses that reach max_new_tokens without EOS or the template's "
                                      "end-of-turn (training would end them with an EOS the teacher did not write); "
                                      "false: drop them, counted in seqkd.json")
    batch_size: int = _f(8, "prompts per batched generate call")
    limit: int = _f(0, "answer the first N prompts only (0: all)")
    seed: int = _f(0, "sampling seed")
    device: str = _f("auto", DEVICE_HELP)


@dataclass
class SeqkdDataConfig:
    """``tailkd seqkd-data``: sequence-level KD data, the teacher's responses to prompts (`tailkd.seqkd`)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seqkd: SeqkdOptions = field(default_factory=SeqkdOptions)

    OMIT: ClassVar[tuple[str, ...]] = (
        "teacher.cache", "teacher.parallel", "data.seq_len", "data.heldout_fraction", "data.doc_sep", "data.eval_rows",
        "data.cache_dir", "data.task", "data.heldout_paths", "data.doc_eos", "data.sft_mode", "data.overlong",
        "data.document_attention",
        "data.split_seed", "data.math_train", "data.math_heldout", "data.instruct_heldout", "data.instruct_max_words")
    ALIASES: ClassVar[dict[str, str]] = {"teacher": "teacher.path", "dtype": "teacher.dtype", "data": "data.paths",
                                         **_aliases("seqkd", SeqkdOptions)}
    HELP: ClassVar[dict[str, str]] = {
        "data.paths": "prompt JSONL files (or folders of them): {\"prompt\": ...} with or without a \"response\" (it "
                      "is replaced), or {\"messages\": [...]} (a last assistant turn is replaced, a history ending "
                      "in a user turn answered)",
        "data.chat_template": "how prompts are rendered, as tailkd distill --task sft renders them: auto (the "
                              "tokenizer's template, plain pairs if none), none, or a Jinja file"}

    def validate(self) -> SeqkdDataConfig:
        check_leaves(self)
        if not self.data.paths:
            raise TailkdError("data.paths is not set; pass --data PROMPTS.jsonl (prompts, with or without responses)")
        builtin = next((p for p in self.data.paths if p.startswith("builtin:")), None)
        if builtin is not None:
            raise TailkdError(f"seqkd-data reads prompt JSONL files, not {builtin}; pass files with --data")
        for key in ("seqkd.samples", "seqkd.max_new_tokens", "seqkd.batch_size"):
            check_at_least(self, key, 1)
        check_at_least(self, "seqkd.limit", 0, " (0: all)")
        if self.seqkd.samples > 1 and self.seqkd.temperature == 0:
            raise TailkdError(f"seqkd.samples={self.seqkd.samples} needs sampling: greedy decoding (seqkd.temperature "
                              "0) gives one response per prompt; set --temperature, e.g. 1")
        _check_device(self, "seqkd.device")
        check_out_path(self, "seqkd.out", folder=True)
        check_out_writable(self, "seqkd.out", into=False)
        return self


# --------------------------------------------------------------------------- tailkd reproduce


@dataclass
class ReproduceOptions:
    out: str = _f("report", "output folder: runs/ (one run folder per experiment), report.md and its figures")
    seeds: list[int] = _f([0, 1, 2], "seeds of the CLM, KD and TAD runs (the paper's Fig. 1 with seed bands); each "
                                     "once")
    betas: list[float] = _f([0.5, 1.0, 2.0, 4.0], "TAD β sweep at K = 10, each > 0 and once (the paper's Table 2: "
                                                  "0.5 1 2 5 10, as configs/reproduce/paper-qwen-1.8b-gpu.yaml)")
    ks: list[int] = _f([5, 10, 20], "TAD K sweep at β = 2, each once (the paper's §3.2.1: 1 5 10 20, as "
                                    "configs/reproduce/paper-qwen-1.8b-gpu.yaml)")
    sweep_seeds: list[int] = _f([0], "seeds of the β and K sweeps, each one of reproduce.seeds (β = 2, K = 10 is "
                                     "that seed's main TAD run)")
    scale: float = _f(1.0, "multiplies train.max_steps and train.eval_every (e.g. 4: four times longer runs; "
                           "the runs' length is always train.max_steps × scale: train.epochs is not a setting here)")
    eval_rows: int = _f(64, "held-out rows of the final evaluation of each student (0: all)")
    device: str = _f("auto", DEVICE_HELP)


@dataclass
class ReproduceConfig:
    """``tailkd reproduce``: the TAD paper's experiments at a chosen size, resumable, and their report
    (`tailkd.reproduce`). The teacher, student, data and train sections are distill's, for every run."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(heldout_paths=["builtin:pydoc"], eval_rows=32))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(eval_every=10, keep_last=1))
    reproduce: ReproduceOptions = field(default_factory=ReproduceOptions)

    OMIT: ClassVar[tuple[str, ...]] = (
        "teacher.cache", "data.task", "data.sft_mode", "data.chat_template", "data.overlong", "data.split_seed",
        "data.instruct_heldout", "data.instruct_max_words", "train.out_dir", "train.seed", "train.resume",
        "train.overwrite", "train.force_resume", "train.stop_after", "train.device", "train.epochs", "train.on_policy",
        "train.on_policy_temperature", "train.on_policy_top_p", "train.on_policy_max_new_tokens")
    ALIASES: ClassVar[dict[str, str]] = {  # distill's short flags for what reproduce shares with it
        "teacher": "teacher.path", "student-layers": "student.num_layers", **DATA_ALIASES, "steps": "train.max_steps",
        "batch-size": "train.batch_size", "grad-accum": "train.grad_accum", "lr": "train.lr",
        "fused-loss": "train.fused_loss", **_aliases("reproduce", ReproduceOptions)}

    def validate(self) -> ReproduceConfig:
        check_leaves(self)
        r = self.reproduce
        for key in ("seeds", "betas", "ks", "sweep_seeds"):
            if not getattr(r, key):
                raise TailkdError(f"reproduce.{key} is empty; give at least one value")
        if min(r.ks) < 1:
            raise TailkdError(f"reproduce.ks holds {min(r.ks)}; every K must be >= 1 (the paper sweeps 1, 5, 10, 20)")
        if min(r.betas) <= 0:
            raise TailkdError(f"reproduce.betas holds {min(r.betas):g}; every β of the sweep must be > 0 (it is drawn "
                              "on a log axis; the paper sweeps 0.5 to 10)")
        for key in ("seeds", "betas", "ks", "sweep_seeds"):
            values = getattr(r, key)
            twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if twice is not None:
                raise TailkdError(f"reproduce.{key} names {twice:g} twice; give each value once (a run per value)")
        extra = [s for s in r.sweep_seeds if s not in r.seeds]
        if extra:
            raise TailkdError(f"reproduce.sweep_seeds holds {extra[0]}, which is not one of reproduce.seeds "
                              f"({' '.join(map(str, r.seeds))}): the sweeps cross at that seed's main TAD run; add it "
                              "to --seeds or drop it from --sweep-seeds")
        if self.train.epochs:
            raise TailkdError(f"train.epochs={self.train.epochs:g} does not apply to tailkd reproduce: every run is "
                              "train.max_steps × reproduce.scale steps; set 0 and give --steps (or --scale)")
        check_at_least(self, "reproduce.eval_rows", 0, " (0: all)")
        # before the plan scales them (max(1, round(steps × scale)) would make --steps 0 or -5 one step)
        check_at_least(self, "train.max_steps", 1)
        check_at_least(self, "train.eval_every", 0, " (0: only before and after)")
        self.scaled_steps()  # a --scale whose runs' lengths no setting could hold: refused here, not while planning
        _check_device(self, "reproduce.device")
        check_out_path(self, "reproduce.out", folder=True)
        check_out_writable(self, "reproduce.out", into=True)
        return self

    def scaled_steps(self) -> tuple[int, int]:
        """Every run's ``(train.max_steps, train.eval_every)``: each × ``reproduce.scale``, rounded, at least 1
        (eval_every 0 stays 0); a TailkdError where a product is not an integer a setting may hold (below 2^63)."""
        scale = self.reproduce.scale
        out = []
        for key in ("max_steps", "eval_every"):
            value = getattr(self.train, key)
            scaled = value * scale
            if not scaled < INT64:  # also inf (40 × 1e308)
                raise TailkdError(f"reproduce.scale={scale:g} makes train.{key} {value} × {scale:g} = {scaled:.3g}, "
                                  f"more than a setting may hold (2^63); give a smaller --scale")
            out.append(max(1, round(scaled)) if value else 0)
        return out[0], out[1]


__all__ = ["AnalyzeTeacherConfig", "CacheTeacherConfig", "CompareConfig", "EvalConfig",
           "FlopsConfig", "LmEvalConfig", "ReproduceConfig", "SelectDataConfig", "read_run_config", "run_sections"]
