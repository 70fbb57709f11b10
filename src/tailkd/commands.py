"""The entry points of ``tailkd eval``, ``analyze-teacher``, ``cache-teacher``, ``lm-eval``, ``compare``, ``flops``
and ``select-data``.

One plain function per subcommand, each taking one typed config (`tailkd.command_config`), printing what the
command prints and returning its result; `tailkd.cli` parses the flags into that config (`config_from_args`, which
also fills in the settings of a saved model's run) and calls it, and a notebook can call it the same way with a
config it builds (``commands.evaluate(EvalConfig(eval=EvalOptions(student="runs/x/final")).validate())``: every
setting as written, none taken from the run).
This is glue: load models, build the rows, call the components' library functions
(`tailkd.evaluate.heldout_metrics`, `tailkd.analysis.teacher_statistics`, `tailkd.cache.write_cache`,
`tailkd.lmeval_tasks.run_lm_eval`, `tailkd.compare.compare_runs`, `tailkd.flops.method_table`,
`tailkd.selection.document_scores`), write the outputs.

Rows come from `tailkd.prepare.setup_data`, the function that builds ``tailkd distill``'s rows, so that a data
section means the same for every command: the same packed rows and held-out split for the same settings,
``builtin:math`` resolved to the built-in math corpus, the built-in news corpus when no path is given, SFT rows
for ``data.task sft``.

A module of its own rather than part of cli.py: cli.py stays the parser and the error policy (what becomes
``tailkd: error: ...``), and these functions are importable without argparse.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from tailkd import jsonfile
from tailkd.command_config import (
    AnalyzeTeacherConfig,
    CacheTeacherConfig,
    CompareConfig,
    EvalConfig,
    FlopsConfig,
    LmEvalConfig,
    SelectDataConfig,
)
from tailkd.config import DataConfig, DistillConfig
from tailkd.data import IGNORE_INDEX
from tailkd.documents import DOCUMENTS_APART, check_models, restarts_positions
from tailkd.errors import TailkdError

# --------------------------------------------------------------------------- rows, as tailkd distill builds them


def eval_rows(tokenizer, data: DataConfig, *, split: str = "heldout", max_rows: int | None = None,
              model_max: int | None = None) -> list[dict]:
    """The first ``max_rows`` rows (None: all) of ``split`` of ``data``, tokenised with ``tokenizer``: exactly the
    rows ``tailkd distill`` trains (``train``) and evaluates (``heldout``) on for the same data settings;
    ``all``: held-out rows, then training rows. ``model_max``: the longest sequence the models take. SFT rows of a
    prompt alone (`tailkd.sft`: a fully on-policy run's) have nothing to score and are left out."""
    from tailkd.prepare import setup_data

    _, train_rows, held_rows = setup_data(DistillConfig(data=data), tokenizer, model_max,
                                          heldout_only=split == "heldout")
    parts = {"heldout": [held_rows], "train": [train_rows], "all": [held_rows, train_rows]}[split]
    rows: list[dict] = []
    alone = 0  # SFT rows of a prompt alone (a fully on-policy run's training data): nothing to score
    for part in parts:
        for i in range(len(part)):
            if max_rows is not None and len(rows) >= max_rows:
                break
            row = part[i]
            if data.task == "sft" and not bool((row["labels"] != IGNORE_INDEX).any()):
                alone += 1
                continue
            rows.append(row)
    if not rows and alone:
        raise TailkdError(f"the {split} split holds prompts alone ({alone} rows: a fully on-policy run's data), no "
                          "response to score; use --split heldout")
    if not rows:
        raise TailkdError(f"the {split} split holds no row of {data.seq_len} tokens; give more data (--data), a "
                          "shorter --seq-len, or --split all")
    return rows


SPLIT_WORDS = {"heldout": "held-out", "train": "training", "all": "held-out and training"}  # the rows of a split


def scored_data(data: DataConfig, split: str) -> dict:
    """What eval.json, teacher_analysis.json and selection.json name as the data read: ``data`` (``data.paths``, a
    list: empty for the built-in corpus, as config.yaml writes it) and, where ``split`` takes held-out rows from files
    of their own (``data.heldout_paths``, e.g. ``--heldout-data builtin:pydoc``), ``heldout_data``: those files."""
    named = {"data": list(data.paths)}
    if data.heldout_paths and split != "train":
        named["heldout_data"] = list(data.heldout_paths)
    if restarts_positions(data):  # the rows' documents read apart (absent: together, as before the setting)
        named["document_attention"] = True
    return named


# --------------------------------------------------------------------------- tailkd eval


def evaluate(cfg: EvalConfig) -> dict:
    """``tailkd eval``: the student of ``cfg.eval.student`` against ``cfg.teacher`` on the held-out rows of
    ``cfg.data`` (`tailkd.evaluate.heldout_metrics`), or with ``cfg.generate.enabled`` exact match, ROUGE-L
    (``generate.rouge``) and diversity of decoded held-out prompts, and the teacher's view of the greedy answers
    (`tailkd.generation.generation_eval`, `answer_scores`). Writes
    ``cfg.eval.out`` (JSON), prints a table."""
    import torch

    from tailkd import models
    from tailkd.checkpoint import atomic_write_text
    from tailkd.distributed import resolve_device
    from tailkd.evaluate import batched, format_table, heldout_metrics
    from tailkd.runs import progress_bar
    from tailkd.vocab import check_labels, check_vocab, relation

    student = Path(cfg.eval.student)
    if not student.is_dir():
        raise TailkdError(f"--student {student} is not a folder; pass a saved student (e.g. runs/x/final)")
    dev = resolve_device(cfg.eval.device, "eval.device")
    relation(models.read_tokenizer(cfg.teacher.path), models.read_tokenizer(student))  # before either model loads
    s_model, s_tok = models.load_causal_lm(str(student))
    s_model.to(device=dev, dtype=torch.float32).eval()
    t_model, t_tok = models.load_teacher(cfg.teacher.path, device=dev, dtype=cfg.teacher.dtype)
    vocab = check_vocab(t_tok, s_tok, t_model, s_model)
    result: dict = {"student": str(student), "teacher": cfg.teacher.path}
    if cfg.generate.enabled:
        from tailkd.generation import generation_eval

        examples, template = generation_examples(cfg, s_tok)
        g = cfg.generate
        metrics = generation_eval(s_model, t_model if g.teacher else None, s_tok, examples, chat_template=template,
                                  max_new_tokens=g.max_new_tokens, batch_size=cfg.eval.batch_size, samples=g.samples,
                                  temperature=g.temperature, top_p=g.top_p, limit=g.limit or None, seed=g.seed,
                                  rouge=g.rouge, judge=t_model, vocab=vocab)
        result.update(mode="generate", **generation_data(cfg), **metrics)
    else:
        model_max = models.model_max_length(s_model, t_model)
        if check_models(cfg.data, student=s_model, teacher=t_model):  # packed documents kept apart, where asked
            print(DOCUMENTS_APART)
        rows = eval_rows(s_tok, cfg.data, split=cfg.eval.split, max_rows=cfg.eval.max_rows or None,
                         model_max=model_max)
        check_labels(vocab, s_tok, {SPLIT_WORDS[cfg.eval.split]: rows})
        with progress_bar(total=len(rows), unit="row", desc="eval", dynamic_ncols=True) as bar:  # rows/s, ETA
            metrics = heldout_metrics(s_model, t_model, batched(rows, cfg.eval.batch_size, bar.update), vocab,
                                      device=dev, bins=cfg.eval.bins)
        result.update(**scored_data(cfg.data, cfg.eval.split), split=cfg.eval.split, seq_len=cfg.data.seq_len,
                      rows=len(rows), vocab=vocab, **metrics)
    atomic_write_text(Path(cfg.eval.out), jsonfile.dumps(result, indent=1))
    print(format_table(result))
    print(f"saved {cfg.eval.out}")
    return result


def generation_data(cfg: EvalConfig) -> dict:
    """What a ``--generate`` eval.json names as the prompts decoded (`generation_examples`): ``data``, a list of paths
    (``builtin:math`` for the built-in problems), ``heldout_data`` where an SFT run's held-out files were read, and
    ``split`` (``all``: every example of ``--prompts``; else ``heldout``)."""
    if cfg.generate.prompts:
        return {"data": list(cfg.generate.prompts), "split": "all"}
    if cfg.data.task == "sft" and cfg.data.paths:
        return {**scored_data(cfg.data, "heldout"), "split": "heldout"}
    return {"data": ["builtin:math"], "split": "heldout"}


def generation_examples(cfg: EvalConfig, tokenizer):
    """(held-out examples, chat template) for ``tailkd eval --generate``.

    ``generate.prompts``: every example of those JSONL files (prompt/response or messages; `tailkd.sft.SFTExample`s,
    rendered by `generation.generation_eval` with the template returned). Otherwise, with
    ``data.task sft``, the held-out split of the data (an SFT run's own: ``data.heldout_paths``, else a held-out
    fraction of ``data.paths``; the built-in math problems' when no path is given); else the held-out set of the
    built-in math problems (``data.math_train``/``data.math_heldout`` name the same set as a builtin:math run's),
    examples of at most ``data.seq_len`` tokens (`EvalConfig.run_defaults` does not take a pretraining run's).
    """
    from tailkd import sft
    from tailkd.corpus import default_cache_root

    if cfg.generate.prompts:  # rendered as the run's rows were (data.chat_template), not always the tokenizer's
        template = sft.resolve_chat_template(tokenizer, sft.chat_template_setting(cfg.data.chat_template))
        return sft.read_sft_examples([Path(p) for p in cfg.generate.prompts], references_optional=True), template
    data = cfg.data if cfg.data.task == "sft" else DataConfig(
        task="sft", seq_len=cfg.data.seq_len, cache_dir=cfg.data.cache_dir, math_train=cfg.data.math_train,
        math_heldout=cfg.data.math_heldout)
    root = Path(data.cache_dir) if data.cache_dir else default_cache_root()
    _, held_rows, _ = sft.setup_sft_rows(data, tokenizer, root)
    return held_rows, held_rows.chat_template


# --------------------------------------------------------------------------- tailkd analyze-teacher


def analyze_teacher(cfg: AnalyzeTeacherConfig) -> dict:
    """``tailkd analyze-teacher``: `tailkd.analysis.teacher_statistics` of each teacher on ``cfg.data`` (with its own
    tokeniser). Writes ``out/teacher_tail_mass.png`` (paper Fig. 2: (a) mean α_K with the q25–q75 band, (b) mismatch
    rate), then ``out/teacher_analysis.json`` ({teacher spec: statistics + settings}): a JSON there is the PNG's."""
    from tailkd import models
    from tailkd.analysis import format_summary, teacher_statistics
    from tailkd.checkpoint import atomic_write_file, atomic_write_text
    from tailkd.distributed import resolve_device
    from tailkd.evaluate import batched
    from tailkd.plots import tail_mass_png
    from tailkd.runs import progress_bar
    from tailkd.vocab import check_labels, check_vocab, real_vocab_size

    a = cfg.analyze
    dev = resolve_device(a.device, "analyze.device")
    def check_kmax(vocab: int, spec) -> None:  # the per-position curves are [N, kmax]: a huge --kmax would fill the
        if a.kmax > vocab:  # memory with zeros
            raise TailkdError(f"analyze.kmax={a.kmax} is more than the vocabulary of {spec} ({vocab} tokens), where "
                              f"α_K = 0 for every K >= V; give --kmax {vocab} or less")

    for spec in a.teachers:  # every teacher found, its config and vocabulary read, before any is analysed (minutes
        check_kmax(real_vocab_size(models.read_tokenizer(spec)), spec)  # each), and again over the ids it scores
    results = {}
    for spec in a.teachers:
        model, tok = models.load_teacher(spec, device=dev, dtype=cfg.teacher.dtype)
        vocab = check_vocab(tok, tok, model, model)  # max token id + 1 (fewer for a pruned head: the ids it scores)
        check_kmax(vocab, spec)
        if check_models(cfg.data, teacher=model):
            print(DOCUMENTS_APART)
        rows = eval_rows(tok, cfg.data, split=a.split, max_rows=a.max_rows or None,
                         model_max=models.model_max_length(model))
        check_labels(vocab, tok, {SPLIT_WORDS[a.split]: rows})
        with progress_bar(total=len(rows), unit="row", desc="analyze-teacher", dynamic_ncols=True) as bar:
            stats = teacher_statistics(model, batched(rows, a.batch_size, bar.update), vocab, kmax=a.kmax, device=dev)
        results[spec] = {"teacher": spec, "vocab": vocab, "rows": len(rows), "seq_len": cfg.data.seq_len,
                         "split": a.split, **scored_data(cfg.data, a.split), **stats}
        del model
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    picture = tail_mass_png(results)  # drawn before anything on disk changes
    # Two files, not one folder (`tailkd reproduce` analyses into its own folder): the JSON is removed first and
    # written last, so a stop between the writes leaves no JSON (not done), never a JSON beside another's PNG.
    (out / "teacher_analysis.json").unlink(missing_ok=True)
    atomic_write_file(out / "teacher_tail_mass.png", lambda tmp: tmp.write_bytes(picture))
    atomic_write_text(out / "teacher_analysis.json", jsonfile.dumps(results, indent=1))
    print(format_summary(results))
    print(f"saved {out}/teacher_analysis.json and {out}/teacher_tail_mass.png")
    return results


# --------------------------------------------------------------------------- tailkd cache-teacher


def cache_teacher(cfg: CacheTeacherConfig, *, log=print) -> dict:
    """``tailkd cache-teacher``: the teacher run once over the rows ``tailkd distill`` trains on for the same
    data settings (`tailkd.prepare.setup_data`: packed text, or SFT rows read as a run below on-policy λ = 1 reads
    them, prompts alone refused), its top-K (+ hidden states, tail samples) written into
    ``cfg.cache.out`` by `tailkd.cache.write_cache` (resumable; under torchrun each rank writes the shards of its rows,
    with ``teacher.parallel fsdp`` a sharded teacher). Prints the sizes; returns the cache meta."""
    from tailkd import distributed as dist

    sharded = cfg.teacher.parallel == "fsdp"
    # torchrun: each rank writes the shards of its rows
    dev = dist.setup(cfg.cache.device, process_group=sharded, timeout_s=cfg.cache.ddp_timeout)
    try:
        return _cache_teacher(cfg, dev, sharded, log)
    finally:
        dist.shutdown()


def _cache_teacher(cfg: CacheTeacherConfig, dev, sharded: bool, log) -> dict:
    from tailkd import distributed as dist
    from tailkd import models
    from tailkd.cache import format_size_table, write_cache
    from tailkd.prepare import rows_fingerprint, setup_data
    from tailkd.vocab import check_labels, check_vocab

    c = cfg.cache
    if cfg.data.task == "sft":  # every SFT file read before the teacher loads (minutes for a large one), as distill
        from tailkd.sft import check_sft_files

        check_sft_files(cfg.data, prompt_only=False)
    data_tokenizer = dist.on_main_then_all(lambda: _cache_tokenizer(cfg)) if c.tokenizer else None
    if sharded:
        from tailkd.sharded_teacher import load_sharded_teacher, teacher_folder

        folder = dist.on_main_then_all(lambda: teacher_folder(cfg.teacher.path))  # a GGUF converted once
        model = load_sharded_teacher(cfg.teacher.path, device=dev, dtype=cfg.teacher.dtype, log=dist.say)
        tokenizer = models.load_tokenizer(folder)
    else:
        model, tokenizer = dist.on_main_then_all(
            lambda: models.load_teacher(cfg.teacher.path, device=dev, dtype=cfg.teacher.dtype))
    tokenizer = data_tokenizer or tokenizer
    check_models(cfg.data, teacher=model)  # packed documents kept apart (data.document_attention): a collective
    info, train_rows, held_rows = dist.on_main_then_all(lambda: setup_data(
        DistillConfig(teacher=cfg.teacher, data=cfg.data), tokenizer, models.model_max_length(model),
        prompt_only=False))
    rows = train_rows if c.split == "train" else held_rows
    settings = {"task": "sft", "sft_mode": cfg.data.sft_mode, "rendering": info["rendering"]} \
        if cfg.data.task == "sft" else {"doc_sep": cfg.data.doc_sep, "heldout_fraction": cfg.data.heldout_fraction,
                                        "doc_eos": cfg.data.doc_eos}
    if restarts_positions(cfg.data):  # the teacher read each document alone (absent: across its row, as before)
        settings["document_attention"] = True
    corpus = {"fingerprint": rows_fingerprint(info, rows), "split": c.split,
              "eos_id": getattr(info, "eos_id", tokenizer.eos_token_id), "settings": settings}
    ac = models.teacher_autocast_dtype(cfg.teacher.dtype, dev)
    vocab = check_vocab(tokenizer, tokenizer, model, model)
    check_labels(vocab, tokenizer, {SPLIT_WORDS[c.split]: rows})
    meta = write_cache(model, tokenizer, rows, c.out, k=c.k, corpus=corpus, teacher_name=cfg.teacher.path,
                       hidden_states=c.hidden_states, hidden_dtype=c.hidden_dtype, tail_samples=c.tail_samples,
                       seed=c.seed, batch_size=c.batch_size, rows_per_shard=c.rows_per_shard, max_rows=c.max_rows,
                       vocab_size=vocab, autocast_dtype=ac, log=log)
    if not dist.is_main():
        return meta
    tokens = meta["num_rows"] * meta["corpus"]["seq_len"]
    per_token = meta["bytes_per_token"]
    print(f"cached {meta['num_rows']} rows x {meta['corpus']['seq_len']} tokens = {tokens:,} tokens in "
          f"{meta['num_shards']} shard(s): {per_token} bytes/token, {per_token * tokens / 1e9:.3f} GB "
          f"({per_token:,} GB per billion tokens)")
    hidden = meta["hidden_states"]
    print(format_size_table(meta["k"], hidden_size=meta["teacher"]["hidden_size"],
                            hidden_dtype=hidden["dtype"] if hidden else c.hidden_dtype,
                            tail_samples=c.tail_samples or 16))
    return meta


def _cache_tokenizer(cfg: CacheTeacherConfig):
    """``cache.tokenizer``'s tokenizer, read alone before the teacher loads: the tokenizer a run with ``--student
    DIR`` reads its data with (its chat template renders SFT prompts), of the teacher's vocabulary
    (`vocab.relation` "same"; a teacher cache holds the teacher's ids of one shared vocabulary), else a TailkdError."""
    from tailkd import models
    from tailkd.vocab import relation

    tokenizer = models.read_tokenizer(cfg.cache.tokenizer)
    try:
        same = relation(models.read_tokenizer(cfg.teacher.path), tokenizer) == "same"
    except TailkdError:  # its line advises a distill run
        same = False
    if not same:
        raise TailkdError(f"--tokenizer {cfg.cache.tokenizer} does not have the teacher's vocabulary; a teacher cache "
                          "holds one shared vocabulary: pass the folder of the student you give tailkd distill "
                          "--student (one vocabulary with the teacher's), or use the online teacher")
    return tokenizer


# --------------------------------------------------------------------------- tailkd lm-eval


def lm_eval(cfg: LmEvalConfig, *, log_samples: bool = False) -> dict:
    """``tailkd lm-eval``: write our tasks' data for ``cfg.lm_eval.model`` and run lm-evaluation-harness on it.

    ``tailkd_ppl`` reads the documents of ``cfg.data`` (``split heldout``: those ``tailkd distill`` holds out;
    ``all``: every one); ``tailkd_gsm`` reads ``gsm_data``. With ``write_only`` nothing runs: the task folder is
    written and the ``lm_eval`` command printed. Returns ``{"command", "include_path", "results"}`` (``results``
    None with ``write_only``); ``log_samples`` keeps lm-eval's per-sample logs in ``results`` (never in the JSON).
    """
    import importlib.util
    import secrets
    import shutil
    import tempfile

    from tailkd import lmeval_tasks as tasks
    from tailkd.distributed import resolve_device

    o = cfg.lm_eval
    model_dir = Path(o.model)
    if not (model_dir / "config.json").is_file():
        raise TailkdError(f"--model {model_dir} is not a saved model folder (no config.json); pass e.g. runs/x/final")
    if not o.write_only:  # lm-eval loads it here: a config it cannot read is one line now, not its traceback later
        from tailkd import models

        models.read_config(model_dir)
    names = tasks.expand_tasks(o.tasks)
    ours = [t for t in names if t in tasks.OUR_TASKS]
    theirs = [t for t in names if t not in ours]
    if o.write_only and theirs and importlib.util.find_spec("lm_eval") is not None:
        tasks.task_manager(theirs, None)  # names the printed command would fail on; without lm-eval: not checked
    if o.num_fewshot and ours:  # tailkd_gsm's YAML says 0 shots, which lm-eval keeps; tailkd_ppl has no context
        print(f"tailkd: warning: {', '.join(ours)} {'is' if len(ours) == 1 else 'are'} zero-shot: --num-fewshot "
              f"{o.num_fewshot} applies to the other tasks only", file=sys.stderr)
    gsm_items = ppl_docs = None
    if "tailkd_gsm" in names:
        if o.gsm_data is None:
            raise TailkdError("tailkd_gsm needs --gsm-data FILE.jsonl with {\"question\", \"answer\"} lines "
                              "(answer ending in '#### N', as GSM8K)")
        gsm_items = tasks.read_gsm_items(o.gsm_data)
        _check_generation_room(model_dir, o.max_gen_toks)
    if "tailkd_ppl" in names:
        ppl_docs = ppl_documents(cfg)
    device = str(resolve_device(o.device, "lm_eval.device"))
    folder = o.task_folder()
    # removed after the run; named before it exists, so that a signal between its creation and the try (a SIGTERM
    # raised as an exception there left it behind, mkdtemp's result not yet assigned) still finds it
    temp = None if folder else Path(tempfile.gettempdir()) / f"tailkd-lmeval-{secrets.token_hex(8)}"
    work_dir = temp or Path(folder)
    try:
        if temp is not None:
            temp.mkdir(mode=0o700)  # as mkdtemp's: this user's only
        include = tasks.prepare_tasks(work_dir, ppl_docs=ppl_docs, gsm_items=gsm_items, max_gen_toks=o.max_gen_toks)
        command = tasks.lm_eval_command(model_dir, names, include, batch_size=o.batch_size, device=device,
                                        limit=o.limit, num_fewshot=o.num_fewshot)
        if o.write_only:
            print(f"tasks written to {include}; run:\n{command}")
            return {"command": command, "include_path": str(include), "results": None}
        results = tasks.run_lm_eval(model_dir, names, include_path=include, batch_size=o.batch_size, device=device,
                                    limit=o.limit, num_fewshot=o.num_fewshot, log_samples=log_samples)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    from tailkd.checkpoint import atomic_write_text

    out = atomic_write_text(Path(o.out), jsonfile.dumps(tasks.summarize(results), indent=1, default=str))
    print(tasks.format_results(results))
    print(f"saved {out}")
    return {"command": command, "include_path": None if temp is not None else str(include), "results": results}


def _check_generation_room(model_dir: Path, max_gen_toks: int) -> None:
    """TailkdError unless ``max_gen_toks`` is below the model's context: lm-eval's ``generate_until`` keeps the last
    context − max_gen_toks prompt tokens and fails (an assertion, after the model and the data are loaded) where
    that is not positive. A config that states no context is left to lm-eval (the tokenizer's, or its default)."""
    from transformers import AutoConfig

    from tailkd import models

    try:
        context = models.model_max_length(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    except (TailkdError, *models.config_errors()):  # no stated context, or a folder lm-eval's own loading reports
        return
    if context is not None and max_gen_toks >= context:  # None: no limit (Mamba's)
        raise TailkdError(f"tailkd_gsm: --max-gen-toks {max_gen_toks} leaves no room for the question in the "
                          f"{context}-token context of {model_dir} (lm-eval keeps the last {context} - max_gen_toks "
                          f"prompt tokens); pass --max-gen-toks below {context}, e.g. {context // 2}")


def ppl_documents(cfg: LmEvalConfig) -> list[str]:
    """The documents of ``tailkd_ppl``: those of ``cfg.data`` that ``tailkd distill`` holds out for the same data
    settings (``split heldout``), or all of them, in reading order. The held-out split of an SFT run's own data is
    a TailkdError: that run held out other examples (and trained on the text of that split)."""
    from transformers import AutoTokenizer

    from tailkd.command_config import read_run_config
    from tailkd.lmeval_tasks import corpus_documents
    from tailkd.prepare import setup_data

    run, run_path = read_run_config(cfg.lm_eval.model)
    run_data = run.get("data") if isinstance(run.get("data"), dict) else {}
    if cfg.lm_eval.split == "heldout" and run_data.get("task") == "sft" \
            and list(cfg.data.paths or []) == list(run_data.get("paths") or []):
        raise TailkdError(f"tailkd_ppl: {run_path} is an SFT run (data.task sft): it held out prompt/response "
                          "examples, and the held-out split of its data read as text is text it trained on; pass "
                          "text it did not train on with --data FILE ... (--split all: every document of it)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.lm_eval.model, local_files_only=True)
    # setup_data resolves data.paths and tokenises the corpus as distill does; only its corpus info is used here,
    # so rows of 1 token (any split of two tokens builds them; data.seq_len is not an lm-eval setting)
    info, _, _ = setup_data(DistillConfig(data=dataclasses.replace(cfg.data, seq_len=1)), tokenizer, None)
    return corpus_documents(info, doc_sep=cfg.data.doc_sep, heldout_only=cfg.lm_eval.split == "heldout")


# --------------------------------------------------------------------------- tailkd compare, tailkd flops


def compare(cfg: CompareConfig) -> dict:
    """``tailkd compare``: `tailkd.compare.compare_runs` (compare.md, compare.json, heldout_kl.png and, for runs
    with generation results, fidelity_diversity.png); prints the table and the files written."""
    from tailkd.compare import compare_runs

    result = compare_runs(cfg.compare.runs, baseline=cfg.compare.baseline, out_dir=cfg.compare.out)
    print(result["markdown"])
    print(f"saved {result['table']} and {result['plot']}")
    if result["fidelity_plot"] is not None:
        print(f"saved {result['fidelity_plot']} (ROUGE-L vs Distinct-2 and 1 - Self-BLEU, one point per run)")
    return result


def flops(cfg: FlopsConfig) -> dict:
    """``tailkd flops``: `tailkd.flops.method_table` for the teacher and student of ``cfg.flops`` (model specs or
    total sizes); prints the table, writes it as JSON to ``out`` if given; returns what the JSON holds."""
    from tailkd.flops import format_method_table, method_table, model_flops_per_token, size_from_spec, size_to_dict

    f = cfg.flops
    teacher = _model_size(f.teacher, f.teacher_params, vocab=f.vocab, hidden=f.hidden, layers=f.teacher_layers,
                          tied=f.teacher_tied, role="teacher")
    student = _model_size(f.student, f.student_params, vocab=f.vocab, hidden=f.student_hidden or f.hidden,
                          layers=f.student_layers, tied=f.student_tied, role="student")
    reference = size_from_spec(f.reference, "; or give its size with --reference-params") if f.reference else None
    rows = method_table(teacher, student, seq_len=f.seq_len, tokens=f.tokens, delta=f.delta, reference_cfg=reference,
                        reference_params=f.reference_params, prompt_len=f.prompt_len, gen_len=f.gen_len,
                        ppo_epochs=f.ppo_epochs, freeze_embeddings=f.freeze_embeddings)
    t = model_flops_per_token(teacher, seq_len=f.seq_len)
    s = model_flops_per_token(student, seq_len=f.seq_len)
    print(format_method_table(rows, t, s, tokens=f.tokens, seq_len=f.seq_len))
    result = {"teacher": size_to_dict(teacher), "student": size_to_dict(student), "seq_len": f.seq_len,
              "tokens": f.tokens, "methods": rows}
    if f.out:
        from tailkd.checkpoint import atomic_write_text

        atomic_write_text(Path(f.out), jsonfile.dumps(result, indent=1))  # a crash or a full disk: no half file
        print(f"saved {f.out}")
    return result


def _model_size(spec, params, *, vocab, hidden, layers, tied, role):
    """A `tailkd.flops.ModelSize` from a model spec, else from a total parameter count (FlopsConfig.validate has
    checked that one of them, and for a count vocab and hidden, are given)."""
    from tailkd.flops import ModelSize, size_from_spec

    if spec is not None:
        return size_from_spec(spec, f"; or give sizes with --{role}-params --vocab --hidden")
    return ModelSize.from_total(role, params, vocab=vocab, hidden=hidden, layers=layers or 0, tied=tied)


# --------------------------------------------------------------------------- tailkd select-data


def select_data(cfg: SelectDataConfig) -> dict:
    """``tailkd select-data``: MiniPLM's difference sampling (`tailkd.selection`) of the documents of
    ``cfg.data`` (the built-in news corpus if none), scored by ``cfg.teacher`` against ``select.reference``: with
    the teacher's tokenizer, MiniPLM's mean per-token log-likelihood ratio; with another tokenizer, the per-byte
    log-likelihood ratio, each model scoring the document in its own tokenization (a note says so at the start).
    Writes ``selected.jsonl`` (the kept documents, in corpus order), ``scores.jsonl`` (every document's score and
    whether it was kept) and ``selection.json`` (settings, the score used, tokens scored by each model, counts,
    FLOPs) into ``select.out``, atomically. That folder is replaced, so it must be new, empty or a previous
    select-data output (it holds ``selection.json``): any other is refused before a model is loaded.
    ``data.seq_len`` must fit both models' context."""
    from tailkd import corpus, models, selection
    from tailkd.checkpoint import atomic_write_dir, check_replaceable
    from tailkd.data import check_seq_len
    from tailkd.distributed import resolve_device
    from tailkd.flops import SCORE_FLOPS_PER_VOCAB, model_flops_per_token
    from tailkd.prepare import pretrain_paths
    from tailkd.runs import progress_bar
    from tailkd.vocab import check_labels, check_own_vocab, check_vocab, tokenizer_fingerprint

    s = cfg.select
    out = Path(s.out)
    check_replaceable(out, "selection.json", "select-data")
    dev = resolve_device(s.device, "select.device")
    teacher, tok = models.load_teacher(cfg.teacher.path, device=dev, dtype=cfg.teacher.dtype)
    reference, ref_tok = models.load_teacher(s.reference, device=dev, dtype=cfg.teacher.dtype)
    roles = {"teacher": (teacher, tok), "reference": (reference, ref_tok)}
    cross = tokenizer_fingerprint(tok) != tokenizer_fingerprint(ref_tok)
    if cross:
        print(f"note: the reference {s.reference} has another tokenizer than the teacher {cfg.teacher.path}: each "
              "model scores a document in its own tokenization, and its score is the log-likelihood ratio per byte")
        vocabs = {role: check_own_vocab(t, m, role) for role, (m, t) in roles.items()}
    else:
        vocabs = dict.fromkeys(roles, check_vocab(tok, ref_tok, teacher, reference, student_role="reference"))
    for role, spec, model in (("teacher", cfg.teacher.path, teacher), ("reference", s.reference, reference)):
        try:
            check_seq_len(cfg.data.seq_len, models.model_max_length(model))
        except TailkdError as exc:
            raise TailkdError(f"{exc} (the {role} {spec})") from None
    cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else corpus.default_cache_root()
    texts = list(corpus.iter_documents(pretrain_paths(cfg.data, cache_root), doc_sep=cfg.data.doc_sep))
    texts = texts[:s.max_docs] if s.max_docs else texts
    if not texts:
        raise TailkdError("the data holds no document to select from; check --data and --doc-sep")
    docs = selection.document_ids(tok, texts, cfg.data.doc_eos)
    kw = {"seq_len": cfg.data.seq_len, "batch_size": s.batch_size, "device": dev,
          "autocast_dtype": models.teacher_autocast_dtype(cfg.teacher.dtype, dev)}
    if cross:
        seqs = {role: selection.document_ids(t, texts, cfg.data.doc_eos, start=True) for role, (_, t) in roles.items()}
        for role, (_, t) in roles.items():
            check_labels(vocabs[role], t, {f"{role}'s": [ids[1:] for ids in seqs[role]]})
        tokens = {role: sum(len(ids) - 1 for ids in seqs[role]) for role in roles}
        with progress_bar(total=sum(tokens.values()), unit="tok", desc="select-data", dynamic_ncols=True) as bar:
            logp = {role: selection.document_logprobs(m, seqs[role], vocabs[role], pad_id=selection.start_id(t),
                                                      progress=bar.update, **kw) for role, (m, t) in roles.items()}
        scores = selection.byte_scores(logp["teacher"], logp["reference"], texts)
        how = "per-byte log-likelihood ratio, each model in its own tokenization (cross-tokenizer)"
    else:
        check_labels(vocabs["teacher"], tok, {"documents'": [ids[1:] for ids in docs]})
        tokens = dict.fromkeys(roles, sum(max(0, len(d) - 1) for d in docs))
        eos = corpus.document_eos_id(tok, cfg.data.doc_eos)
        with progress_bar(total=tokens["teacher"], unit="tok", desc="select-data", dynamic_ncols=True) as bar:
            scores = selection.document_scores(teacher, reference, docs, vocabs["teacher"], pad_id=eos or 0,
                                               progress=bar.update, **kw)
        how = "mean over scored tokens of log p_teacher - log p_reference"
    scores = selection.tie_duplicates(scores, texts)
    kept = selection.select_top(scores, s.keep)
    flops = {role: model_flops_per_token(m, seq_len=cfg.data.seq_len)["forward"] * tokens[role]
             for role, (m, _) in roles.items()}
    flops["scoring"] = sum(SCORE_FLOPS_PER_VOCAB * vocabs[role] * tokens[role] for role in roles)
    flops["total"] = sum(flops.values())
    result = {"teacher": cfg.teacher.path, "reference": s.reference, "keep": s.keep, "documents": len(docs),
              "kept": len(kept), "tokens_scored": tokens["teacher"], "tokens_scored_by": tokens,
              "kept_tokens": sum(len(docs[i]) for i in kept), "seq_len": cfg.data.seq_len,
              "data": list(cfg.data.paths), "doc_eos": cfg.data.doc_eos, "score": how, "flops": flops}
    kept_set = set(kept)

    def write(tmp: Path) -> None:
        (tmp / "selected.jsonl").write_text("".join(jsonfile.dumps({"text": texts[i]}) + "\n" for i in kept),
                                            encoding="utf-8")
        (tmp / "scores.jsonl").write_text("".join(jsonfile.dumps({"doc": i, "score": sc, "kept": i in kept_set}) + "\n"
                                                  for i, sc in enumerate(scores)), encoding="utf-8")
        (tmp / "selection.json").write_text(jsonfile.dumps(result, indent=1), encoding="utf-8")

    atomic_write_dir(out, write)
    print(f"kept {len(kept)} of {len(docs)} documents ({result['kept_tokens']} tokens); scoring took "
          f"{flops['total'] / 1e15:.3g} PFLOPs; {out / 'selected.jsonl'} (train on it: tailkd distill "
          f"--loss clm --data {out / 'selected.jsonl'})")
    return result

