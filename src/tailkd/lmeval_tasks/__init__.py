"""lm-evaluation-harness on a saved student (``tailkd lm-eval``), with task files of our own over local data.

lm-eval 0.4.x ships task configs but no task data, so no built-in task runs offline. This package
ships two task templates that read local JSON lines through the ``json`` builder of ``datasets``:

- ``tailkd_ppl`` (``loglikelihood_rolling``): word/byte perplexity and bits per byte of documents
  ``{"text": ...}``. bits_per_byte = −Σ_docs log p(doc) / (ln 2 · Σ_docs bytes(doc)), where
  log p(doc) is the sum of the token log-probabilities (rolling windows of the model's context, the
  first token conditioned on the BOS/EOS token). That holds for a tokenizer that adds no BOS itself (the
  built-in SmolLM2's); with one that does (Llama-2, Gemma), lm-eval 0.4.x puts a second BOS before the
  document and counts log p(BOS | BOS) too (lm-eval's issue #3333).
- ``tailkd_gsm`` (``generate_until``): GSM8K-style exact match on ``{"question", "answer"}`` with the
  answer in GSM8K's format ``"... #### N"``; greedy decoding, the first ``#### (-?[0-9.,]+)`` of
  the output compared to N (lm-eval's gsm8k conventions: commas, ``$`` and a final ``.`` ignored).

``corpus_documents`` gives ``tailkd_ppl`` its documents; ``prepare_tasks`` writes the data JSONL files and
the rendered YAMLs (absolute paths filled in) into a work folder; that folder is what ``lm_eval
--include_path`` takes. ``run_lm_eval`` runs the harness in-process on an HF model folder (``--model hf
--model_args pretrained=DIR``); ``tailkd.commands.lm_eval`` is the ``tailkd lm-eval`` command. ``paper`` expands to
the paper's standard tasks, the paper's "eight datasets for few-shot performance, as in MiniPLM" (lm-eval's
default shots unless ``--num-fewshot``; the paper does not state its count; they download their data from the
Hugging Face hub, so they need network access: run with ``HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0``).
"""

from __future__ import annotations

import json
import os
import shlex
from importlib import resources
from pathlib import Path

from tailkd.errors import TailkdError

OUR_TASKS = ("tailkd_ppl", "tailkd_gsm")
# The TAD paper evaluates "on eight datasets for few-shot performance, as in MiniPLM" and names ARC-Easy and
# "Story" among them; MiniPLM's harness runs nine: these eight as named in lm-eval and StoryCloze, which needs a
# manual download (add storycloze_2016 yourself if you have it; which of the nine the paper left out it does not
# say).
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "lambada_openai", "openbookqa", "piqa", "social_iqa",
               "winogrande")
GSM_ANSWER_MARK = "#### "


def expand_tasks(spec: str | list[str]) -> list[str]:
    """``"tailkd_ppl,paper"`` → ``["tailkd_ppl", "arc_easy", ...]`` (order kept, duplicates dropped)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        for t in (PAPER_TASKS if name == "paper" else (name,)):
            if t not in out:
                out.append(t)
    if not out:
        raise TailkdError("no task given; pass --tasks tailkd_ppl,tailkd_gsm (or paper, or lm-eval task names)")
    return out


def _template(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.yaml.in").read_text(encoding="utf-8")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    os.replace(tmp, path)
    return path


def read_gsm_items(path: str | Path) -> list[dict]:
    """GSM-style problems from a JSONL file: ``{"question": str, "answer": str}`` per line.

    The final answer is the text after the answer's last ``####`` (an answer without ``####``: all of it), with its
    surrounding whitespace dropped, and is written back as ``"... #### <final>"``: lm-eval compares what follows the
    reference's last ``"#### "`` verbatim, so a trailing newline or ``"####42"`` would fail every right output.
    """
    p = Path(path)
    if not p.is_file():
        raise TailkdError(f"--gsm-data {p} does not exist; pass a .jsonl file of {{\"question\", \"answer\"}} lines")
    items = []
    for n, raw in enumerate(p.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TailkdError(f"{p}:{n}: not UTF-8 ({exc.reason}); --gsm-data needs UTF-8 JSON lines") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested past Python's stack
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply to read"
            raise TailkdError(f"{p}:{n}: not valid JSON ({why}); one object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or "answer" not in obj:
            raise TailkdError(f'{p}:{n}: needs "question" (a string) and "answer" fields, e.g. '
                              '{"question": "2+3?", "answer": "2+3=5 #### 5"}')
        head, mark, final = str(obj["answer"]).rpartition(GSM_ANSWER_MARK.strip())
        if not final.strip():
            raise TailkdError(f'{p}:{n}: the final answer is empty; give e.g. "2+3=5 #### 5" or "5"')
        answer = f"{head}{GSM_ANSWER_MARK}{final.strip()}" if mark else f"{GSM_ANSWER_MARK}{final.strip()}"
        items.append({"question": obj["question"], "answer": answer})
    if not items:
        raise TailkdError(f"--gsm-data {p} holds no problem; add {{\"question\", \"answer\"}} lines")
    return items


def corpus_documents(info, *, doc_sep: str = "auto", heldout_only: bool = True) -> list[str]:
    """The texts of the documents of a prepared corpus (`tailkd.corpus.CorpusInfo`, e.g. from
    `tailkd.prepare.setup_data`), in reading order; ``heldout_only``: exactly the documents ``tailkd distill`` holds
    out (a document is held out iff ``corpus.doc_hash`` < the corpus's ``split_threshold``)."""
    from tailkd import corpus

    files = [Path(f["path"]) for f in info.meta["files"]]
    threshold = info.meta["split_threshold"]
    docs = corpus.iter_documents(files, doc_sep=doc_sep)
    return [doc for doc in docs if not heldout_only or corpus.doc_hash(doc) < threshold]


def prepare_tasks(work_dir: str | Path, *, ppl_docs: list[str] | None = None, gsm_items: list[dict] | None = None,
                  max_gen_toks: int = 256) -> Path:
    """Write ``tailkd_ppl.jsonl`` / ``tailkd_gsm.jsonl`` and their rendered task YAMLs into ``work_dir``.

    Returns ``work_dir`` (absolute): pass it to ``lm_eval --include_path``. Only the tasks whose data is
    given are written. The tasks keep the arrow copies that ``datasets`` makes of their data in
    ``work_dir/datasets_cache`` (not the user's datasets cache, where every run's copy would stay). Each file is
    written whole or not at all (a temporary file renamed): a full disk or a kill never leaves a cut task YAML.
    """
    from tailkd.checkpoint import atomic_write_text

    if max_gen_toks < 1:
        raise TailkdError(f"--max-gen-toks {max_gen_toks} must be >= 1")
    if ppl_docs is not None and not ppl_docs:
        raise TailkdError("no documents for tailkd_ppl; pass --data with text")
    work = Path(work_dir).resolve()  # refused input above: nothing created
    work.mkdir(parents=True, exist_ok=True)
    cache = json.dumps(str(work / "datasets_cache"))  # datasets' arrow copies of the data, not in ~/.cache
    if ppl_docs is not None:
        data = _write_jsonl(work / "tailkd_ppl.jsonl", [{"text": d} for d in ppl_docs])
        # json.dumps gives a double-quoted string, valid YAML whatever characters the path holds
        text = _template("tailkd_ppl").replace("@PPL_FILE@", json.dumps(str(data)))
        atomic_write_text(work / "tailkd_ppl.yaml", text.replace("@CACHE_DIR@", cache))
    if gsm_items is not None:
        data = _write_jsonl(work / "tailkd_gsm.jsonl", gsm_items)
        text = _template("tailkd_gsm").replace("@GSM_FILE@", json.dumps(str(data))).replace("@CACHE_DIR@", cache)
        atomic_write_text(work / "tailkd_gsm.yaml", text.replace("@MAX_GEN_TOKS@", str(int(max_gen_toks))))
    return work


def lm_eval_command(model_dir: str | Path, tasks: list[str], include_path: Path, *, batch_size: int = 1,
                    device: str = "cpu", limit: float | None = None, num_fewshot: int | None = None) -> str:
    """The equivalent ``lm_eval`` command line (printed with ``--write-only``)."""
    parts = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={Path(model_dir).resolve()},dtype=float32",
             "--include_path", str(include_path), "--tasks", ",".join(tasks), "--batch_size", str(batch_size),
             "--device", device]
    if limit is not None:
        parts += ["--limit", f"{limit:g}"]
    if num_fewshot is not None:
        parts += ["--num_fewshot", str(num_fewshot)]
    return " ".join(shlex.quote(p) for p in parts)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TailkdError("lm-evaluation-harness is not installed; install it with: pip install 'tailkd[eval]' "
                          "(or pip install 'lm-eval[hf]>=0.4.5')") from None
    return lm_eval, TaskManager


def task_manager(tasks: list[str], include_path: Path | None):
    """lm-eval's TaskManager over its own tasks and ``include_path`` (our written task files; None: lm-eval's own
    tasks only), or a TailkdError naming the first of ``tasks`` it does not know."""
    import inspect

    _, TaskManager = _import_lm_eval()
    kwargs = {"include_path": None if include_path is None else str(include_path)}
    if set(tasks) <= set(OUR_TASKS) and "include_defaults" in inspect.signature(TaskManager).parameters:
        kwargs["include_defaults"] = False  # indexing lm-eval's ~15k built-in task files takes seconds
    manager = TaskManager(**kwargs)
    known = set(manager.all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing:
        hint = ("pass its data (--data for tailkd_ppl, --gsm-data for tailkd_gsm)" if set(missing) & set(OUR_TASKS)
                else "check the name with `lm_eval ls tasks`")
        raise TailkdError(f"unknown lm-eval task {missing[0]!r}; {hint}")
    return manager


def run_lm_eval(model, tasks: list[str], *, include_path: Path, batch_size: int = 1, device: str = "cpu",
                limit: float | None = None, num_fewshot: int | None = None, log_samples: bool = False) -> dict:
    """Run lm-eval in-process. ``model``: an HF model folder (run as ``--model hf``) or an ``lm_eval`` LM instance.

    Returns lm-eval's results dict (``results``, ``configs``, ``n-samples``, ...; ``samples`` with
    ``log_samples``). Unknown task names, tasks whose data cannot be fetched and (with only our tasks, whose data
    are local) a model folder lm-eval cannot load are TailkdErrors.
    """
    lm_eval, _ = _import_lm_eval()
    manager = task_manager(tasks, include_path)
    folder = Path(model).resolve() if isinstance(model, (str, Path)) else None
    if folder is not None:
        model_args = {"pretrained": str(folder), "dtype": "float32"}
        model = "hf"
    else:
        model_args = None
    try:
        results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                          batch_size=batch_size, device=device, limit=limit, num_fewshot=num_fewshot,
                                          log_samples=log_samples)
    except (ConnectionError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if folder is not None and set(tasks) <= set(OUR_TASKS):  # our tasks' data are local: the hub has no part
            raise TailkdError(f"lm-eval could not load the model in {folder} ({first[:200]}); check that folder: a "
                              "saved model (config.json, its weights and tokenizer files), e.g. runs/x/final") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "False", "")
        fix = ("these tasks fetch their data from the Hugging Face hub: run online with HF_HUB_OFFLINE=0 "
               "HF_DATASETS_OFFLINE=0" if offline else "check the network and the model folder")
        raise TailkdError(f"lm-eval could not load a task's data or the model ({first[:200]}); {fix}") from None
    if results is None:
        raise TailkdError("lm-eval returned no results (a non-zero rank in a distributed run?)")
    return results


def summarize(results: dict) -> dict:
    """The JSON we save: lm-eval's results without the per-sample logs (``samples``); the task configs
    (``configs``, naming the data files of the work folder, gone when it was a temporary one) and the run's
    settings (``config``, versions, ``max_length``) are kept."""
    return {k: v for k, v in results.items() if k not in ("samples",)}


def format_results(results: dict) -> str:
    try:
        from lm_eval.utils import make_table

        return make_table(results)
    except Exception:  # noqa: BLE001 - printing must not fail the run; fall back to plain JSON
        return json.dumps(results.get("results", {}), indent=1, default=str)
