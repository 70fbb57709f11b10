"""Several runs side by side (``tailkd compare``): the paper's Figure 1 and a table with relative change.

A run folder (written by ``tailkd distill``) holds ``metrics.jsonl`` (rows with ``split == "heldout"``
carry the held-out ``kl``, ``student_ppl``, ``agreement`` at ``tokens``), ``summary.json`` (``tokens``,
``train_seconds``, ``loss``, and ``flops`` = ``tailkd.flops.distill_flops(...)``) and optionally
the results of ``tailkd eval`` in ``eval.json`` and/or ``generate.json``: each file is read by what it holds,
held-out metrics (``tailkd eval --out RUN/eval.json``: ``student_full_ece``) or generation results (``"mode":
"generate"``, ``tailkd eval --generate --out RUN/generate.json``, or ``RUN/eval.json`` when a run has no
held-out evaluation: ``student_rougeL``, ``student_distinct_2``, ``student_self_bleu``).

The loss column names each run's loss, with the loss settings (config.yaml's ``loss:``) in which it differs from
another run of the same loss: ``tad (k=16)`` beside ``tad (k=64)``. Table values: the final held-out row of
``metrics.jsonl`` (the same held-out rows for every run trained on the same data and seq_len), Full-ECE from the
held-out evaluation; when any run has generation results, also ROUGE-L (fidelity), Distinct-2 and Self-BLEU
(diversity), and a fidelity-vs-diversity scatter plot of the runs that have both. Relative change against the
baseline run (paper §3.2.1): Rel = 100 · ln(metric / metric_baseline); negative = smaller than the baseline
(better for KL, perplexity and Full-ECE; worse for agreement).

lm-eval task accuracies (``tailkd lm-eval --out RUN/lm_eval.json``: lm-eval's ``acc``, or ``exact_match`` for
generation tasks such as ``tailkd_gsm``; perplexity tasks have neither and are left out): when any run has them, the
table adds the mean accuracy over the tasks every such run has and, against the baseline, the paper's Rel̄ (Table 1):
the mean over those tasks of Rel = 100 · ln(acc / acc_baseline); a second table lists each task's accuracy. The
tasks not in every such run are named in a note (with none shared, the mean and Rel̄ are "—"); a task scored with
other shots or on another number of documents in two runs (lm-eval's ``n-shot``, ``n-samples``) is an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tailkd import jsonfile
from tailkd.config import flatten, read_yaml, utf8_text
from tailkd.errors import TailkdError

# (column title, key in the run record, format, has a Rel column)
COLUMNS = [("held-out KL", "kl", ".4f", True), ("perplexity", "ppl", ".2f", True),
           ("Full-ECE", "full_ece", ".4f", True), ("agreement", "agreement", ".4f", True)]
# the same for the results of `tailkd eval --generate`, shown when any run has them
GENERATION_COLUMNS = [("ROUGE-L", "rougeL", ".4f", False), ("Distinct-2", "distinct_2", ".4f", False),
                      ("Self-BLEU", "self_bleu", ".4f", False)]
EVAL_FILES = ("eval.json", "generate.json")  # the names `tailkd eval --out` is given for a run, read in this order
LM_EVAL_FILE = "lm_eval.json"  # `tailkd lm-eval --out RUN/lm_eval.json`
LM_EVAL_OBJECTS = ("results", "n-shot", "n-samples")  # the parts of lm_eval.json compare reads
# the numbers of eval.json / generate.json compare reads
EVAL_NUMBERS = ("student_full_ece", "student_rougeL", "student_distinct_2", "student_self_bleu")


def _read_text(path: Path) -> str:
    return utf8_text(path, str(path), "re-create it or remove it")


def _check_fields(obj: dict, where: str, numbers=(), objects=(), strings=()) -> dict:
    """``obj`` when its ``numbers`` keys hold numbers (or null: a non-finite value, `tailkd.jsonfile`), ``objects``
    objects and ``strings`` strings wherever present; TailkdError naming ``where`` and the key otherwise."""
    for keys, ok, want in ((numbers, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
                           (objects, lambda v: isinstance(v, dict), "an object"),
                           (strings, lambda v: isinstance(v, str), "a string")):
        for key in keys:
            if obj.get(key) is not None and not ok(obj[key]):
                raise TailkdError(f'{where}: "{key}" is {jsonfile.kind(obj[key])}, not {want}; re-create it or '
                                  'remove it')
    return obj


def _read_json(path: Path, **fields) -> dict | None:
    """The object in the JSON file ``path`` (None without the file), its ``fields`` checked (`_check_fields`)."""
    if not path.is_file():
        return None
    try:
        obj = jsonfile.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested past Python's stack
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply to read"
        raise TailkdError(f"{path} is not valid JSON ({why}); re-create it or remove it") from None
    if not isinstance(obj, dict):
        raise TailkdError(f"{path} is not a JSON object (it holds {jsonfile.kind(obj)}); re-create it or remove it")
    return _check_fields(obj, str(path), **fields)


# the numbers of a metrics.jsonl row that compare reads: the curves' axes and the final held-out metrics
METRIC_NUMBERS = ("step", "tokens", "kl", "student_ppl", "agreement", "student_clm", "loss", "clm", "div")


def read_metrics(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows with a ``kl`` or ``student_clm``) of ``run/metrics.jsonl``, by tokens."""
    run = Path(run)
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise TailkdError(f"{run} has no metrics.jsonl, so it is not a tailkd run folder; pass folders written by "
                          "tailkd distill --out")
    train, held = [], []
    for n, line in enumerate(_read_text(metrics_path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = jsonfile.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested past Python's stack
            raise TailkdError(f"{metrics_path}:{n} is not valid JSON; repair or remove that line") from None
        if not isinstance(row, dict):
            raise TailkdError(f"{metrics_path}:{n} is not a JSON object (it holds {jsonfile.kind(row)}); repair or "
                              "remove that line")
        _check_fields(row, f"{metrics_path}:{n}", numbers=METRIC_NUMBERS)
        if row.get("split") == "heldout" and ("kl" in row or "student_clm" in row):
            held.append(row)
        elif row.get("split") == "train":
            train.append(row)
    def order(row: dict) -> tuple:
        return row.get("tokens") or 0, row.get("step") or 0

    return sorted(train, key=order), sorted(held, key=order)


def plot_run(run: str | Path, path: str | Path) -> Path:
    """The curves of one run as a PNG: held-out KL(teacher‖student) (student CLM for clm runs) and the training
    loss with its terms, against training tokens (written by ``tailkd distill`` as ``RUN/curves.png``)."""
    from tailkd.plots import plot_training_curves

    train, held = read_metrics(run)
    return plot_training_curves(train, held, path, title=Path(run).name)


def read_evals(run: str | Path) -> tuple[dict, dict]:
    """(held-out evaluation, generation evaluation) of a run: the first of ``RUN/eval.json`` and
    ``RUN/generate.json`` without and with ``"mode": "generate"`` respectively ({} for none)."""
    held: dict = {}
    gen: dict = {}
    for name in EVAL_FILES:
        ev = _read_json(Path(run) / name, strings=("mode",), numbers=EVAL_NUMBERS)
        if ev is None:
            continue
        if ev.get("mode") == "generate":
            gen = gen or ev
        else:
            held = held or ev
    return held, gen


def read_task_accuracies(run: str | Path) -> dict[str, float]:
    """{task: accuracy} from ``RUN/lm_eval.json`` (lm-eval's results as `tailkd lm-eval` saves them): each task's
    ``acc`` (its ``acc,none``), else its first ``exact_match`` (generation tasks); tasks with neither (perplexity)
    are left out; {} without the file."""
    saved = _read_json(Path(run) / LM_EVAL_FILE, objects=LM_EVAL_OBJECTS)
    results = saved.get("results") if saved is not None else None
    if not isinstance(results, dict):
        return {}
    out = {}
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        keys = ["acc,none"] + sorted(k for k in metrics if k.startswith("exact_match,"))
        value = next((metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))), None)
        if value is not None:
            out[task] = float(value)
    return out


def read_task_setups(run: str | Path) -> dict[str, tuple]:
    """{task: (shots, documents scored)} from ``RUN/lm_eval.json`` (lm-eval's ``n-shot`` and ``n-samples`` effective:
    what --num-fewshot and --limit made of the task); tasks without them are left out."""
    path = Path(run) / LM_EVAL_FILE
    saved = _read_json(path, objects=LM_EVAL_OBJECTS)
    if saved is None:
        return {}
    shots, samples = saved.get("n-shot") or {}, saved.get("n-samples") or {}
    _check_fields(shots, f"{path} n-shot", numbers=tuple(shots))  # a setup is a key: a list in it is unhashable
    return {t: (shots[t], _check_fields(samples[t], f"{path} n-samples {t}", numbers=("effective",))["effective"])
            for t in shots if isinstance(samples.get(t), dict) and samples[t].get("effective") is not None}


def check_task_setups(records: list[dict], tasks: list[str]) -> None:
    """TailkdError when two runs scored a task of ``tasks`` with other shots or another number of documents: their
    accuracies (and a Rel̄ over them) would compare different evaluations."""
    for task in tasks:
        seen = {}
        for r in records:
            setup = (r.get("task_setups") or {}).get(task)
            if setup is not None:
                seen.setdefault(setup, r["path"])
        if len(seen) > 1:
            (a, run_a), (b, run_b) = list(seen.items())[:2]
            raise TailkdError(f"{task} was scored with {b[0]} shots on {b[1]} documents in {run_b}/{LM_EVAL_FILE} but "
                              f"{a[0]} shots on {a[1]} in {run_a}/{LM_EVAL_FILE}; re-run tailkd lm-eval with the same "
                              "--num-fewshot and --limit for every run")


def shared_tasks(records: list[dict]) -> list[str]:
    """The tasks every run with lm-eval accuracies has (sorted): the ones its mean accuracy and Rel̄ average over."""
    sets = [set(r["tasks"]) for r in records if r.get("tasks")]
    return sorted(set.intersection(*sets)) if sets else []


def task_summary(record: dict, baseline: dict | None, tasks: list[str]) -> tuple[float | None, float | None]:
    """(mean accuracy over ``tasks``, Rel̄ = mean over ``tasks`` of 100·ln(acc / acc_baseline)) of a run; None where a
    task (or the baseline's) is missing or an accuracy is 0."""
    acc = record.get("tasks") or {}
    if not tasks or any(t not in acc for t in tasks):
        return None, None
    mean = sum(acc[t] for t in tasks) / len(tasks)
    base = (baseline or {}).get("tasks") or {}
    rels = [relative_change(acc[t], base.get(t)) for t in tasks]
    return mean, (None if baseline is None or None in rels else sum(rels) / len(rels))


def load_run(path: str | Path) -> dict:
    """One run folder → a record: ``name``, ``path``, ``loss``, ``curve`` (tokens, kl), final metrics, costs, and
    the student's ROUGE-L, Distinct-2 and Self-BLEU from its generation evaluation (None without one)."""
    run = Path(path)
    held = read_metrics(run)[1]  # a run without a teacher (clm) has no kl: its perplexity is still compared
    curve = [r for r in held if "kl" in r]
    summary = _read_json(run / "summary.json", numbers=("tokens", "train_seconds"), objects=("flops",),
                         strings=("loss",)) or {}
    ev, gen = read_evals(run)
    loss = _config_loss(run)
    final = held[-1] if held else {}
    flops = _check_fields(summary.get("flops") or {}, f"{run / 'summary.json'} flops", numbers=("total",))
    return {
        "name": run.name, "path": str(run), "loss": summary.get("loss") or loss.get("name"),
        "loss_settings": {k: v for k, v in flatten(loss).items() if k != "name"},
        "curve": ([r.get("tokens", 0) for r in curve], [r["kl"] for r in curve]),
        "kl": final.get("kl"), "ppl": final.get("student_ppl"), "agreement": final.get("agreement"),
        "full_ece": ev.get("student_full_ece"), "tokens": summary.get("tokens", final.get("tokens")),
        "train_seconds": summary.get("train_seconds"), "flops": flops.get("total"), "finished": bool(summary),
        "rougeL": gen.get("student_rougeL"), "distinct_2": gen.get("student_distinct_2"),
        "self_bleu": gen.get("student_self_bleu"), "tasks": read_task_accuracies(run),
        "task_setups": read_task_setups(run),
    }


def has_generation(record: dict) -> bool:
    """Whether a run record carries any result of ``tailkd eval --generate`` (ROUGE-L or diversity)."""
    return any(record.get(key) is not None for _, key, _, _ in GENERATION_COLUMNS)


def fidelity_diversity_points(records: list[dict]) -> dict[str, dict]:
    """{run name: {"rougeL", "distinct_2", "self_bleu"}} of the runs that have all three; the others are left out."""
    keys = [key for _, key, _, _ in GENERATION_COLUMNS]
    return {r["name"]: {k: r[k] for k in keys} for r in records if all(r.get(k) is not None for k in keys)}


def _config_loss(run: Path) -> dict:
    """The ``loss:`` section of the run's config.yaml ({} without a readable one), read as every run config is
    (`tailkd.config.read_yaml`)."""
    import yaml

    p = run / "config.yaml"
    if not p.is_file():
        return {}
    try:
        cfg = read_yaml(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):  # read_yaml: nested past Python's stack is a YAMLError too
        return {}
    loss = cfg.get("loss") if isinstance(cfg, dict) else None
    return loss if isinstance(loss, dict) else {}


def loss_labels(records: list[dict]) -> list[str]:
    """The loss column: each run's loss name, followed by the loss settings in which it differs from another run of
    the same loss (``tad (k=16)`` beside ``tad (k=64)``; ``amari (options.alpha=0.3)``), so that runs of one loss
    with other knobs do not look alike. A setting a run's config.yaml does not hold counts as differing."""
    labels = []
    for r in records:
        same = [o.get("loss_settings") or {} for o in records if o["loss"] == r["loss"]]
        keys = sorted({k for s in same for k in s})
        mine = r.get("loss_settings") or {}
        differ = [k for k in keys if len({repr(s.get(k)) for s in same}) > 1 and k in mine]
        knobs = ", ".join(f"{k}={_short(mine[k])}" for k in differ)
        labels.append((r["loss"] or "—") + (f" ({knobs})" if knobs else ""))
    return labels


def _short(value) -> str:
    """A setting as the label shows it: a float as format's g (``2``, not ``2.0``) where that is its value, else
    exactly (``1.0000001``: g's six digits would show it as ``1``, beside a run of 1.0 it must differ from)."""
    if not isinstance(value, float):
        return str(value)
    short = format(value, "g")
    return short if float(short) == value else repr(value)


def relative_change(value: float | None, baseline: float | None) -> float | None:
    """Rel = 100 · ln(value / baseline) (paper §3.2.1); None when either is missing or not positive."""
    if value is None or baseline is None or value <= 0 or baseline <= 0:
        return None
    return 100.0 * math.log(value / baseline)


def _fmt(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def markdown_table(records: list[dict], baseline: dict | None) -> str:
    """The comparison table in Markdown; Rel columns only when a baseline is given, the generation columns only
    when some run has generation results."""
    generation = any(has_generation(r) for r in records)
    columns = COLUMNS + (GENERATION_COLUMNS if generation else [])
    head = ["run", "loss", "tokens"]
    for title, _, _, rel in columns:
        head.append(title)
        if rel and baseline is not None:
            head.append(f"Rel {title}")
    tasks = shared_tasks(records)
    scored = any(r.get("tasks") for r in records)  # the columns stay ("—") when no task is in every run
    if scored:
        head += ["tasks: mean acc"] + (["Rel̄ (tasks)"] if baseline is not None else [])
    head += ["train time", "PFLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r, loss in zip(records, loss_labels(records)):
        name = r["name"] + (" (baseline)" if baseline is r else "") + ("" if r["finished"] else " (unfinished)")
        cells = [name, loss, _fmt(r["tokens"], ",d") if isinstance(r["tokens"], int) else "—"]
        for _, key, fmt, rel in columns:
            cells.append(_fmt(r[key], fmt))
            if rel and baseline is not None:
                cells.append(_fmt(relative_change(r[key], baseline[key]), "+.2f"))
        if scored:
            mean, rel_bar = task_summary(r, baseline, tasks)
            cells += [_fmt(mean, ".4f")] + ([_fmt(rel_bar, "+.2f")] if baseline is not None else [])
        cells += [_hms(r["train_seconds"]), _fmt(None if r["flops"] is None else r["flops"] / 1e15, ".3g")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", ("held-out KL = mean KL(teacher‖student) [nats/token] and perplexity, agreement from each run's "
                  "final held-out row of metrics.jsonl; Full-ECE from RUN/eval.json "
                  "(`tailkd eval --out RUN/eval.json`); PFLOPs = summary.json flops.total / 1e15.")]
    if generation:
        notes.append("ROUGE-L = mean F-measure of the student's greedy completions against the reference responses; "
                     "Distinct-2 (higher) and Self-BLEU (lower = more diverse) of its sampled completions "
                     "(`--samples` ≥ 2); from `tailkd eval --generate --out RUN/generate.json` (or RUN/eval.json).")
    if scored:
        left_out = sorted(set().union(*(r.get("tasks") or {} for r in records)) - set(tasks))
        notes.append(f"tasks: lm-eval accuracy (acc; exact_match for generation tasks) from RUN/{LM_EVAL_FILE} "
                     f"(`tailkd lm-eval --out RUN/{LM_EVAL_FILE}`), mean over the {len(tasks)} "
                     f"task{'' if len(tasks) == 1 else 's'} every run with "
                     "results has" + ("; Rel̄ = the mean over them of each task's Rel (paper Table 1)"
                                      if baseline is not None else "")
                     + (f"; left out (not in every run's results): {', '.join(left_out)}" if left_out else "") + ".")
    if baseline is not None:
        notes.append(f"Rel = 100·ln(metric / metric of {baseline['name']}).")
    if tasks:
        notes += ["", "| run | " + " | ".join(tasks) + " |", "|" + "|".join("---" for _ in range(len(tasks) + 1)) + "|"]
        notes += ["| " + " | ".join([r["name"]] + [_fmt((r.get("tasks") or {}).get(t), ".4f") for t in tasks]) + " |"
                  for r in records]
    return "\n".join(lines + notes) + "\n"


def check_compare_out(out_dir: str | Path) -> None:
    """TailkdError unless ``out_dir`` may be replaced by a compare output: a new or empty folder, or an earlier
    compare output (it holds compare.json), never a folder of other files (one of the runs compared)."""
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "compare.json").is_file():
        raise TailkdError(f"refusing to replace {out}: it exists and is not a tailkd compare output (no compare.json); "
                          "choose a new or empty folder for --out")


def compare_runs(runs: list[str | Path], *, baseline: str | Path | None = None,
                 out_dir: str | Path = "compare") -> dict:
    """``tailkd compare``: writes ``out_dir/compare.md``, ``compare.json``, ``heldout_kl.png`` and, when some runs have
    ROUGE-L and diversity, ``fidelity_diversity.png``; returns the markdown, the paths (``fidelity_plot`` None
    without that plot) and the records. ``out_dir`` is replaced as a whole (`tailkd.checkpoint.atomic_write_dir`:
    never a mix of two compares' files, nothing changed by an interrupted one), so it must be new, empty or an
    earlier compare output (`check_compare_out`)."""
    from tailkd.plots import plot_fidelity_diversity, plot_heldout_kl

    if not runs:
        raise TailkdError("no run given; pass one or more run folders written by tailkd distill")
    check_compare_out(out_dir)
    records = [load_run(r) for r in runs]
    base = None
    if baseline is not None:
        key = str(Path(baseline).resolve())
        matches = [r for r in records if str(Path(r["path"]).resolve()) == key]
        base = matches[0] if matches else load_run(baseline)
        if not matches:
            records.insert(0, base)
    labels = [r["name"] for r in records]  # the baseline's too: the names key the figure's curves
    if len(set(labels)) < len(labels):  # same folder names in different places: use the paths
        for r in records:
            r["name"] = r["path"]
    check_task_setups(records, shared_tasks(records))
    from tailkd.checkpoint import atomic_write_dir  # (torch only when writing)

    out = Path(out_dir)
    table = markdown_table(records, base)
    points = fidelity_diversity_points(records)

    def write(tmp: Path) -> None:
        (tmp / "compare.md").write_text(table, encoding="utf-8")
        # a run without held-out KL (no teacher) has no curve: no legend entry without a line
        plot_heldout_kl({r["name"]: r["curve"] for r in records if r["curve"][0]}, tmp / "heldout_kl.png")
        if points:
            plot_fidelity_diversity(points, tmp / "fidelity_diversity.png")
        (tmp / "compare.json").write_text(jsonfile.dumps([{k: v for k, v in r.items()} for r in records], indent=1),
                                          encoding="utf-8")

    atomic_write_dir(out, write)
    return {"markdown": table, "table": str(out / "compare.md"), "plot": str(out / "heldout_kl.png"),
            "fidelity_plot": str(out / "fidelity_diversity.png") if points else None, "records": records}
