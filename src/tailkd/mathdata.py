"""The offline math default: GSM8K-style word problems with worked solutions, from ``reasoning-gym``.

``write_math_dataset`` writes, into one folder:

- ``train.jsonl`` / ``heldout.jsonl``: one ``{"prompt", "response", "answer"}`` per line (plain pairs, read
  by ``tailkd.sft.prepare_sft``; ``answer`` is the item's final answer, ignored by training). ``prompt`` =
  the question + ``INSTRUCTION`` + a newline (so the plain rendering, which inserts no separator, puts the
  response on its own line); ``response`` = the worked solution (``metadata["answer_cot"]``), ending in
  ``#### N``.
- ``corpus.txt``: the TRAINING problems with their solutions as plain-text documents separated by blank
  lines (blank lines inside a solution are collapsed), for stage-1 domain pretraining distillation
  (``tailkd distill --data corpus.txt``; the default ``doc_sep="auto"`` splits it by blank line). Held-out
  problems never enter it.
- ``meta.json``: settings, counts, the reasoning-gym version.

Problems come from reasoning-gym's ``gsm_symbolic`` generator (Apache-2.0), which is deterministic in
(seed, index). Different seeds do NOT guarantee disjoint problems: item ``i`` of seed ``s`` is drawn
from ``Random(s + i)``, so nearby seeds share items, and small templates repeat questions even within one
seed (about 7 in 2000). So the held-out problems are drawn first (``heldout_seed``, duplicates skipped),
then training problems (``train_seed``) skipping any question already taken; the two files share no
question, which is checked before writing. Every item is checked: its solution ends with ``#### N`` and
``tailkd.answers.extract_answer(solution)`` equals the item's answer (items that fail are skipped and
counted; none did on 6000 items of reasoning-gym 0.1.25).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path
from typing import NamedTuple

from tailkd import jsonfile
from tailkd.answers import extract_answer, normalize_number
from tailkd.errors import TailkdError

RG_PACKAGE = "reasoning-gym"
RG_PIN = "reasoning-gym==0.1.25"  # the version the defaults were checked with; the data depend on it
RG_INSTALL = f'pip install "{RG_PIN}"'
DATASET = "gsm_symbolic"
FORMAT = "tailkd-math-1"  # bump when the files' content or layout changes
INSTRUCTION = "Solve it step by step and write the final answer on the last line as '#### <number>'."
TRAIN_FILE, HELDOUT_FILE, CORPUS_FILE, META_FILE = "train.jsonl", "heldout.jsonl", "corpus.txt", "meta.json"
DEFAULT_SEEDS = {"train_seed": 0, "heldout_seed": 1_000_000_000}  # far apart: Random(seed + i) never coincides


class MathFiles(NamedTuple):
    train: Path
    heldout: Path
    corpus: Path


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise TailkdError(f"the built-in math data needs the {RG_PACKAGE} package; install it with: {RG_INSTALL}") \
            from None
    return reasoning_gym


def _rg_version() -> str:
    try:
        return importlib.metadata.version(RG_PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - imported but without metadata
        return "unknown"


def make_prompt(question: str) -> str:
    return f"{question.strip()}\n{INSTRUCTION}\n"


def _valid(item: dict) -> bool:
    cot = item.get("metadata", {}).get("answer_cot")
    if not isinstance(cot, str) or not isinstance(item.get("question"), str) or "####" in item["question"]:
        return False
    if not re.search(r"\n#### [^\n]+\Z", cot.rstrip()):
        return False
    want = normalize_number(str(item.get("answer", "")))
    return want is not None and extract_answer(cot) == want


def draw_problems(n: int, *, seed: int, exclude: set[str] = frozenset(),
                  max_tries: int | None = None) -> tuple[list[dict], dict]:
    """``n`` distinct, valid gsm_symbolic items of ``seed`` (in index order) whose question is not in
    ``exclude``. Returns (items as {"question", "answer", "solution"}, counts of skipped items)."""
    rg = _reasoning_gym()
    tries = max_tries or 3 * n + 1000
    ds = rg.create_dataset(DATASET, seed=seed, size=tries)
    out, seen = [], set(exclude)
    skipped = {"duplicate": 0, "invalid": 0}
    for i in range(tries):
        if len(out) == n:
            break
        item = ds[i]
        if item["question"] in seen:
            skipped["duplicate"] += 1
            continue
        if not _valid(item):
            skipped["invalid"] += 1
            continue
        seen.add(item["question"])
        out.append({"question": item["question"], "answer": str(item["answer"]),
                    "solution": item["metadata"]["answer_cot"].rstrip()})
    if len(out) < n:
        raise TailkdError(f"reasoning-gym gave only {len(out)} distinct valid problems for seed {seed} in {tries} "
                          f"draws ({skipped}); ask for fewer problems")
    return out, skipped


def _corpus_document(item: dict) -> str:
    text = f"{item['question'].strip()}\n{item['solution'].strip()}"
    return re.sub(r"\n\s*\n+", "\n", text)  # blank lines separate documents, so none inside one


def write_math_dataset(out_dir, *, n_train: int = 2000, n_heldout: int = 200,
                       train_seed: int = DEFAULT_SEEDS["train_seed"],
                       heldout_seed: int = DEFAULT_SEEDS["heldout_seed"], overwrite: bool = False) -> MathFiles:
    """Write ``train.jsonl``, ``heldout.jsonl``, ``corpus.txt`` and ``meta.json`` into ``out_dir`` (see the
    module docstring) and return their paths ``(train, heldout, corpus)``.

    If ``out_dir`` already holds a math dataset written with the same settings, it is reused as is (no
    regeneration) unless ``overwrite``. A folder that exists, is not empty and is not a tailkd math
    dataset is never replaced. The folder is written under a temporary name and renamed into place.
    """
    from tailkd.checkpoint import atomic_write_dir

    for name, v in (("n_train", n_train), ("n_heldout", n_heldout)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TailkdError(f"{name} must be a positive whole number, got {v!r}")
    if train_seed == heldout_seed:
        raise TailkdError(f"train_seed and heldout_seed are both {train_seed}; use different seeds")
    _reasoning_gym()  # a missing package fails here, before anything is touched
    out_dir = Path(out_dir)
    settings = {"format": FORMAT, "dataset": DATASET, "n_train": n_train, "n_heldout": n_heldout,
                "train_seed": train_seed, "heldout_seed": heldout_seed, "instruction": INSTRUCTION,
                "reasoning_gym": _rg_version()}
    files = MathFiles(out_dir / TRAIN_FILE, out_dir / HELDOUT_FILE, out_dir / CORPUS_FILE)
    meta_path = out_dir / META_FILE
    ours, old = _math_dataset_at(out_dir)  # (False, None) for a file or nothing at out_dir
    if out_dir.exists() and not ours and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TailkdError(f"refusing to write the math dataset into {out_dir}: it exists and is not a tailkd math "
                          "dataset; choose a new or empty folder")
    if ours and not overwrite:  # overwrite replaces a math dataset only
        if old is None:
            raise TailkdError(f"{meta_path} is damaged (no readable settings); delete {out_dir} to write the math "
                              "dataset again")
        if old == settings and all(f.is_file() for f in files):
            return files
        if old.get("format") != FORMAT:
            raise TailkdError(f"{out_dir} holds a math dataset of another format; pass overwrite=True or "
                              "choose another folder")

    held, held_skipped = draw_problems(n_heldout, seed=heldout_seed)
    held_questions = {x["question"] for x in held}
    train, train_skipped = draw_problems(n_train, seed=train_seed, exclude=held_questions)
    overlap = held_questions & {x["question"] for x in train}
    if overlap:  # cannot happen by construction; checked because held-out leakage would void every result
        raise TailkdError(f"{len(overlap)} held-out question(s) also in training data; this is a bug, please report")

    def write(tmp: Path) -> None:
        for path, items in ((tmp / TRAIN_FILE, train), (tmp / HELDOUT_FILE, held)):
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps({"prompt": make_prompt(x["question"]), "response": x["solution"],
                                          "answer": x["answer"]}, ensure_ascii=False) + "\n" for x in items)
        (tmp / CORPUS_FILE).write_text("\n\n".join(_corpus_document(x) for x in train) + "\n", encoding="utf-8")
        meta = {"settings": settings, "train": len(train), "heldout": len(held),
                "skipped": {"train": train_skipped, "heldout": held_skipped}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    try:
        atomic_write_dir(out_dir, write)
    except OSError as exc:
        raise TailkdError(f"could not write the math dataset to {out_dir} ({exc.strerror or exc}); choose another "
                          "folder") from exc
    return files


def _math_dataset_at(folder: Path) -> tuple[bool, dict | None]:
    """``(ours, settings)``: whether ``folder`` holds a math dataset this module wrote, and its meta.json's settings
    (None where that file is damaged). Ours: a meta.json whose settings name a tailkd math format, or a folder of
    this module's four files and nothing else (its meta.json damaged). A user's folder with a meta.json of its own
    is not: it is never replaced, nor its deletion advised."""
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return False, None
    try:
        old = jsonfile.read_object(meta_path).get("settings")
    except jsonfile.Damaged:
        old = None
    if isinstance(old, dict) and str(old.get("format")).startswith("tailkd-math-"):
        return True, old
    names = {p.name for p in folder.iterdir()}
    return names == {META_FILE, TRAIN_FILE, HELDOUT_FILE, CORPUS_FILE}, None


def default_math_dataset(cache_dir=None, **settings) -> MathFiles:
    """``write_math_dataset`` into ``<cache>/math/<settings>`` (``cache_dir``, else ``tailkd.corpus``'s cache
    root), reused when it already exists: the built-in data of ``--task sft``."""
    from tailkd.corpus import default_cache_root

    args = {"n_train": 2000, "n_heldout": 200, **DEFAULT_SEEDS, **settings}
    name = f"{DATASET}-{args['n_train']}-{args['n_heldout']}-{args['train_seed']}-{args['heldout_seed']}"
    root = Path(cache_dir) if cache_dir else default_cache_root()
    return write_math_dataset(root / "math" / name, **args)
