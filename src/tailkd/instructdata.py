"""The offline instruction-following data of ``--task sft --data builtin:instruct``: AlpacaEval's instructions.

Source: the ``instruct`` asset (`tailkd.assets`), ``example/outputs.json`` of the ``alpaca-eval==0.6.6`` sdist on
PyPI: the 805 instructions of the AlpacaEval set (sources: selfinstruct 252, oasst 188, koala 156, helpful_base 129,
vicuna 80), each with a reference answer (``output``) written by gpt-3.5-turbo-0301 (the file's ``generator``
field just reads "example"; the same outputs are AlpacaFarm's ``examples/data/eval_gpt-3.5-turbo-0301.json``).
LICENSE: the code of alpaca-eval is Apache-2.0, its DATA is CC BY-NC 4.0 — non-commercial use only; the answers are
OpenAI model outputs, under OpenAI's terms too. Use it for research, not to train a commercial model.

``write_instruct_dataset`` converts it, into one folder:

- ``train.jsonl`` / ``heldout.jsonl``: one ``{"prompt", "response", "source"}`` per line (plain pairs, read by
  ``tailkd.sft.prepare_sft``; ``source`` is the AlpacaEval subset, ignored by training). ``prompt`` = the
  instruction + a newline, as the math set's prompts (so the plain rendering, which inserts no separator, puts
  the response on its own line; with a chat template it is the user turn); ``response`` = the answer, stripped.
- ``meta.json``: settings, counts, the source file's SHA-256.

The split comes first and is fixed: of all 805 instructions, the ``heldout`` ones with the smallest
``sha256("tailkd-instruct\\n" + instruction)`` are held out, independent of the file order and of the length
filter, so an instruction held out in one run is never training data in another (a different length filter only
drops pairs from both sides). The length filter comes second: a pair is kept when its instruction and answer
have at most ``max_words`` words together (whitespace-separated; 0 keeps all). Defaults (``heldout=100``,
``max_words=150``): 734 of the 805 pairs kept, 645 for training and 89 held out (of the 705 / 100). Rendered
through SmolLM2's chat template (system prompt included) 725 of the 734 fit in 256 tokens and 442 in 128 (the
others are truncated by ``prepare_sft``, which warns), so a default CPU run is cheap.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

from tailkd import jsonfile
from tailkd.errors import TailkdError

ASSET = "instruct"  # the key in tailkd.assets.ASSETS
FORMAT = "tailkd-instruct-1"  # bump when the files' content or layout changes
TRAIN_FILE, HELDOUT_FILE, META_FILE = "train.jsonl", "heldout.jsonl", "meta.json"
DEFAULTS = {"heldout": 100, "max_words": 150}
SPLIT_SALT = "tailkd-instruct"


class InstructFiles(NamedTuple):
    train: Path
    heldout: Path


def read_outputs(path) -> list[dict]:
    """The records of an AlpacaEval outputs file (a JSON list of {"instruction", "output", "dataset", ...}) as
    {"instruction", "output", "dataset"}; TailkdError for a file of another shape or with repeated instructions."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: UnicodeDecodeError too; Recursion: too deep
        why = "nested too deeply to read" if isinstance(exc, RecursionError) else str(exc)[:80]
        raise TailkdError(f"{path} is not a readable JSON file ({why}); reinstall it with "
                          "`python -m tailkd.install instruct`") from None
    if not isinstance(records, list) or not records:
        raise TailkdError(f"{path} is not a JSON list of instructions; reinstall it with "
                          "`python -m tailkd.install instruct`")
    out, seen = [], set()
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)):
            raise TailkdError(f'{path}: record {i} has no "instruction" and "output" strings')
        if r["instruction"].strip() in seen:
            raise TailkdError(f"{path}: record {i} repeats an instruction ({r['instruction'][:40]!r})")
        seen.add(r["instruction"].strip())
        out.append({"instruction": r["instruction"], "output": r["output"], "dataset": str(r.get("dataset", ""))})
    return out


def make_prompt(instruction: str) -> str:
    return f"{instruction.strip()}\n"


def _split_key(instruction: str) -> bytes:
    return hashlib.sha256(f"{SPLIT_SALT}\n{instruction.strip()}".encode()).digest()


def words(record: dict) -> int:
    """Whitespace-separated words of the instruction and the answer together."""
    return len(record["instruction"].split()) + len(record["output"].split())


def split_and_filter(records: list[dict], *, heldout: int = DEFAULTS["heldout"],
                     max_words: int = DEFAULTS["max_words"]) -> tuple[list[dict], list[dict], dict]:
    """``(train, held, counts)``: the ``heldout`` records with the smallest split key held out (of ALL records),
    then, on both sides, the records of at most ``max_words`` words (0: all) with a non-empty answer kept, in
    file order. ``counts``: pairs, kept and dropped per side."""
    for name, v, low in (("heldout", heldout, 1), ("max_words", max_words, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise TailkdError(f"data.instruct_{name} must be a whole number >= {low}, got {v!r}")
    if heldout >= len(records):
        raise TailkdError(f"data.instruct_heldout={heldout} leaves none of the {len(records)} instructions for "
                          "training; hold out fewer")
    order = sorted(range(len(records)), key=lambda i: _split_key(records[i]["instruction"]))
    held_ids = set(order[:heldout])

    def keep(r: dict) -> bool:
        return bool(r["output"].strip()) and (max_words == 0 or words(r) <= max_words)

    sides = {"train": [r for i, r in enumerate(records) if i not in held_ids],
             "heldout": [r for i, r in enumerate(records) if i in held_ids]}
    kept = {name: [r for r in rs if keep(r)] for name, rs in sides.items()}
    counts = {"pairs": len(records), "kept": sum(len(v) for v in kept.values()),
              **{name: {"kept": len(kept[name]), "dropped": len(sides[name]) - len(kept[name])} for name in sides}}
    for name in sides:
        if not kept[name]:
            raise TailkdError(f"no {name} pair has at most data.instruct_max_words={max_words} words; raise it "
                              "(0 keeps all)")
    return kept["train"], kept["heldout"], counts


def _line(r: dict) -> str:
    return json.dumps({"prompt": make_prompt(r["instruction"]), "response": r["output"].strip(),
                       "source": r["dataset"]}, ensure_ascii=False) + "\n"


def write_instruct_dataset(source, out_dir, *, heldout: int = DEFAULTS["heldout"],
                           max_words: int = DEFAULTS["max_words"]) -> InstructFiles:
    """Convert the outputs file ``source`` into ``train.jsonl``, ``heldout.jsonl`` and ``meta.json`` in ``out_dir``
    (see the module docstring); return the paths ``(train, heldout)``.

    A folder already written from the same source bytes with the same settings is reused as is. A folder that
    exists and is not such a dataset is never replaced. The folder is written under a temporary name and renamed
    into place (`tailkd.checkpoint.atomic_write_dir`)."""
    from tailkd.checkpoint import atomic_write_dir

    source, out_dir = Path(source), Path(out_dir)
    try:
        blob = source.read_bytes()
    except OSError as exc:
        raise TailkdError(f"cannot read the instruction data {source} ({exc.strerror or exc}); reinstall it with "
                          "`python -m tailkd.install instruct`") from None
    settings = {"format": FORMAT, "heldout": heldout, "max_words": max_words, "split_salt": SPLIT_SALT,
                "source_sha256": hashlib.sha256(blob).hexdigest()}
    files = InstructFiles(out_dir / TRAIN_FILE, out_dir / HELDOUT_FILE)
    meta_path = out_dir / META_FILE
    if out_dir.exists():
        try:
            old = jsonfile.read_object(meta_path).get("settings", {}) if meta_path.is_file() else {}
        except jsonfile.Damaged:
            old = {}
        if old == settings and all(f.is_file() for f in files):
            return files
        ours = isinstance(old, dict) and str(old.get("format", "")).startswith("tailkd-instruct")
        if not ours and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise TailkdError(f"refusing to write the instruction data into {out_dir}: it exists and is not a tailkd "
                              "instruction dataset; choose a new or empty folder")
    train, held, counts = split_and_filter(read_outputs(source), heldout=heldout, max_words=max_words)
    overlap = {r["instruction"].strip() for r in train} & {r["instruction"].strip() for r in held}
    if overlap:  # cannot happen by construction; checked because held-out leakage would void every result
        raise TailkdError(f"{len(overlap)} held-out instruction(s) also in training data; this is a bug, please report")

    def write(tmp: Path) -> None:
        for path, rs in ((tmp / TRAIN_FILE, train), (tmp / HELDOUT_FILE, held)):
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(_line(r) for r in rs)
        meta = {"settings": settings, "source": str(source), **counts}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    try:
        atomic_write_dir(out_dir, write)
    except OSError as exc:
        raise TailkdError(f"could not write the instruction data to {out_dir} ({exc.strerror or exc}); choose "
                          "another cache folder") from exc
    return files


def default_instruct_dataset(cache_dir=None, *, heldout: int = DEFAULTS["heldout"],
                             max_words: int = DEFAULTS["max_words"], source=None) -> InstructFiles:
    """``write_instruct_dataset`` of the installed ``instruct`` asset (``source`` overrides it) into
    ``<cache>/instruct/<settings>`` (``cache_dir``, else ``tailkd.corpus.default_cache_root``), reused when it exists:
    the data of ``--data builtin:instruct``."""
    from tailkd.assets import find
    from tailkd.corpus import default_cache_root

    source = Path(source) if source is not None else find(ASSET)[0]
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir else default_cache_root()
    return write_instruct_dataset(source, root / "instruct" / f"alpaca_eval-h{heldout}-w{max_words}-{digest}",
                                  heldout=heldout, max_words=max_words)
