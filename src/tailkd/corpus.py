"""Pretraining text -> a tokenised corpus on disk, split train / held-out (the rows are read by `tailkd.data`).

1. ``iter_documents``: stream documents out of text files / folders, JSON lines or parquet.
2. ``prepare_corpus``: tokenise every document, append EOS, split train / held-out by a hash of the
   document text, write ``train.bin`` / ``heldout.bin`` (flat uint32 token ids) and ``meta.json``
   into a temporary folder and rename it into place. ``prepare_corpus_cached`` names that folder
   by ``corpus_fingerprint`` and reuses it.

The built-in corpus (the Lee news corpus, `tailkd.assets`) is used when no path is given.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tailkd import jsonfile
from tailkd.config import DOC_SEPS
from tailkd.data import HELDOUT_FILE, META_FILE, TOKEN_BYTES, TOKEN_DTYPE, TRAIN_FILE
from tailkd.errors import TailkdError
from tailkd.losses import finite_number

FORMAT = "tailkd-corpus-2"  # bump when the on-disk layout or the split rule changes: invalidates caches
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
LINE_SUFFIXES = (".cor",)  # gensim-style corpora: one document per line ("auto" reads them as doc_sep="line")
DEFAULT_SETTINGS = {"heldout_fraction": 0.05, "doc_sep": "auto", "min_heldout_docs": 1, "append_eos": True}
TOKENIZE_BATCH_DOCS = 256  # documents per tokenizer call (the fast tokenizers parallelise within a call)
TOKENIZE_BATCH_CHARS = 4_000_000  # ... or fewer, so that one call never holds more than ~4 MB of text


# --------------------------------------------------------------------------- the built-in corpus


def default_cache_root() -> Path:
    """Root of tailkd's caches (the tokenised corpora, the built-in data's copies, the converted GGUF teachers of
    `tailkd.models`): ``$TAILKD_CACHE`` (``~`` expanded), else ``~/.cache/tailkd``."""
    env = os.environ.get("TAILKD_CACHE")
    return Path(os.path.expanduser(env)) if env else Path.home() / ".cache" / "tailkd"


def default_corpus_files(cache_dir: Path | None = None) -> list[Path]:
    """The Lee news corpus (300 + 50 articles, one per line; installed by ``python -m tailkd.install``), as UTF-8.

    ``lee.cor`` is not UTF-8 (it holds one Latin-1 byte, 0xA3 = "£"), and every other input must
    be UTF-8, so the files are converted once into ``<cache_dir>/default_corpus/`` (default
    ``default_cache_root()``) and those copies are returned. A copy is written atomically and never
    rewritten, so its mtime (part of the corpus fingerprint) stays put and the tokenised cache holds.
    """
    from tailkd.assets import find

    dest_dir = Path(cache_dir or default_cache_root()) / "default_corpus"
    out = []
    for src in find("corpus"):
        dest = dest_dir / src.name
        if not dest.is_file():
            _write_once(dest, _utf8_text(src), "the built-in news corpus")
        out.append(dest)
    return out


def python_docs_corpus(cache_dir: Path | None = None) -> Path:
    """``builtin:pydoc``: the topics of Python's own documentation (``pydoc_data.topics``, ~0.8 MB of English
    technical prose in every CPython; PSF licence) as JSON lines, one document per topic, written once into
    ``<cache_dir>/builtin_pydoc/`` (default ``default_cache_root()``). Text of another source than the news
    corpus: a held-out set for pretraining runs (``--heldout-data builtin:pydoc``)."""
    import sys
    from pydoc_data.topics import topics

    version = f"{sys.version_info[0]}{sys.version_info[1]}"  # each Python's docs differ a little
    dest = Path(cache_dir or default_cache_root()) / "builtin_pydoc" / f"topics-py{version}.jsonl"
    if not dest.is_file():  # written once, never rewritten: its mtime (in corpus fingerprints) stays put
        lines = "".join(json.dumps({"text": text}) + "\n" for _, text in sorted(topics.items()))
        _write_once(dest, lines, "Python's documentation (builtin:pydoc)")
    return dest


def _write_once(dest: Path, text: str, what: str) -> None:
    """Write a built-in corpus's copy ``dest`` into tailkd's cache, atomically and never over an existing one (a
    concurrent run's: its mtime is in the fingerprint of the corpus that run is tokenising; the text is the same).
    A cache that cannot be written is a TailkdError."""
    from tailkd.checkpoint import atomic_write_file

    try:
        atomic_write_file(dest, lambda tmp: tmp.write_text(text, encoding="utf-8"), replace=False)
    except FileExistsError:
        pass
    except OSError as exc:
        raise TailkdError(f"could not write {what} into {dest.parent} ({exc.strerror or exc}); set TAILKD_CACHE or "
                          "data.cache_dir to a writable folder") from exc


def _utf8_text(src: Path) -> str:
    raw = src.read_bytes()  # 0.4 MB in all
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # total: every byte is a character; right for the Lee files' "£"


# --------------------------------------------------------------------------- reading documents


def list_files(paths: str | Path | Iterable[str | Path], *, what: str = "data path",
               otherwise: str = "leave data.paths empty for the built-in news corpus") -> list[Path]:
    """The files behind ``paths``, in reading order: each path in the order given, a folder's files
    recursively and sorted by relative path, hidden files and folders (".name") skipped, duplicates dropped.
    A missing path is a ``TailkdError`` naming it as ``what``, with ``otherwise`` (if any) as the other fix."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out, seen = [], set()
    for p in map(Path, paths):
        if not p.exists():
            raise TailkdError(f"{what} {p} does not exist; fix the path" + (f", or {otherwise}" if otherwise else ""))
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                           key=lambda f: f.relative_to(p).as_posix())
            if not found:
                raise TailkdError(f"folder {p} holds no (non-hidden) files; put text, .jsonl or .parquet files in it")
        else:
            found = [p]
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def iter_documents(paths: str | Path | Iterable[str | Path], *, doc_sep: str = "auto") -> Iterator[str]:
    """Stream the documents of ``paths`` (files or folders), one file and one document at a time.

    - ``.jsonl`` / ``.json``: one JSON object per line, the document in its ``"text"`` field;
    - ``.parquet``: the ``text`` column (needs pyarrow), its nulls skipped (a column of arrow type null, as
      pandas writes an all-None one, holds none);
    - anything else: UTF-8 text, split by ``doc_sep``: ``"blank_line"`` (one or more blank lines
      between documents), ``"line"`` (each non-empty line), ``"file"`` (the whole file), or
      ``"auto"`` (``.cor`` files by line, the rest by blank line).

    Documents that are empty or whitespace are skipped. In text files, line endings (``\\n``, ``\\r\\n`` and a
    lone ``\\r``, as Python's universal newlines; JSON Lines end at ``\\n`` only) become ``\\n``
    and a document's trailing whitespace is dropped (for ``"line"`` its leading whitespace too);
    JSON and parquet texts are kept exactly. Raises
    ``TailkdError`` for a missing path, a binary or non-UTF-8 file, a JSON line without ``text``
    or whose ``text`` is no Unicode (an unpaired surrogate escape, see ``check_unicode``), or a
    corpus without a single document.
    """
    if doc_sep not in DOC_SEPS:
        raise TailkdError(f"doc_sep={doc_sep!r} is not one of {', '.join(DOC_SEPS)}")
    files = list_files(paths)
    n = 0
    for f in files:
        for doc in _iter_file(f, doc_sep):
            if doc.strip():
                n += 1
                yield doc
    if n == 0:
        names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise TailkdError(f"no documents in {names}: every file is empty or whitespace; pass files that "
                          "hold text")


def _iter_file(path: Path, doc_sep: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        yield from _iter_jsonl(path)
    elif suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(path)
    else:
        mode = doc_sep if doc_sep != "auto" else ("line" if suffix in LINE_SUFFIXES else "blank_line")
        yield from _split_text(_iter_lines(path, lone_cr=True), mode)


def _physical_lines(fh, lone_cr: bool) -> Iterator[bytes]:
    """The lines of a binary file without their endings: ``\\n`` and ``\\r\\n`` end a line; with ``lone_cr`` a lone
    ``\\r`` does too (Python's universal newlines). UTF-8 never uses bytes 0x0A / 0x0D inside a multi-byte
    character, so splitting the bytes is exact."""
    for raw in fh:
        body = raw.removesuffix(b"\n")
        if lone_cr:
            yield from body.removesuffix(b"\r").split(b"\r") if raw.endswith(b"\n") else body.split(b"\r")
        else:
            yield body.removesuffix(b"\r")


def _iter_lines(path: Path, *, lone_cr: bool = False) -> Iterator[tuple[int, str]]:
    """(line number, line without its line ending) of a UTF-8 text file; binary or non-UTF-8 -> TailkdError.
    Lines end at ``\\n`` and ``\\r\\n``, and with ``lone_cr`` (plain text, not JSON Lines) at a lone ``\\r`` too."""
    with open(path, "rb") as fh:
        if b"\x00" in fh.read(8192):
            raise _binary_error(path, "it contains NUL bytes")
        fh.seek(0)
        for n, raw in enumerate(_physical_lines(fh, lone_cr), start=1):
            if b"\x00" in raw:
                raise _binary_error(path, f"line {n} contains NUL bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _binary_error(path, f"line {n} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                                          f"convert it with e.g. iconv -f latin1 -t utf-8") from None
            if n == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not text
            yield n, line


def _binary_error(path: Path, why: str) -> TailkdError:
    return TailkdError(f"{path} is not UTF-8 text ({why}); remove it from data.paths or convert it to UTF-8 text")


def _split_text(lines: Iterator[tuple[int, str]], mode: str) -> Iterator[str]:
    if mode == "line":
        for _, line in lines:
            yield line.strip()
        return
    buf: list[str] = []
    for _, line in lines:
        if mode == "blank_line" and not line.strip():
            if buf:
                yield "\n".join(buf).rstrip()
                buf = []
        elif buf or line.strip():  # leading blank lines of a document are dropped
            buf.append(line)
    if buf:
        yield "\n".join(buf).rstrip()


def _iter_jsonl(path: Path) -> Iterator[str]:
    for n, line in _iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested past Python's stack
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply to read"
            raise TailkdError(f"{path}:{n}: not valid JSON ({why}); .jsonl/.json files need one JSON object "
                              'per line, e.g. {"text": "..."}') from None
        if not isinstance(obj, dict) or "text" not in obj:
            found = f"keys {sorted(obj)[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
            raise TailkdError(f'{path}:{n}: no "text" field (found {found}); every line needs {{"text": "..."}}')
        if not isinstance(obj["text"], str):
            raise TailkdError(f'{path}:{n}: "text" is a {type(obj["text"]).__name__}, not a string; '
                              "store each document as a string")
        check_unicode(obj["text"], f'{path}:{n}: "text"')
        yield obj["text"]


def check_unicode(text: str, what: str) -> None:
    """TailkdError ``{what} holds \\ud800, ...`` where ``text`` holds an unpaired UTF-16 surrogate: a JSON ``\\ud800``
    escape without its other half parses into such a str, which is no Unicode text (UTF-8, the tokenizer and hashing
    refuse it). A whole pair (``\\ud83d\\ude00``) is one character and passes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # UTF-8 encodes every code point but a surrogate
        raise TailkdError(f"{what} holds \\u{ord(text[exc.start]):04x}, half of a UTF-16 surrogate pair without the "
                          "other half, which is no character (text cut inside a pair?); repair or remove the line") \
            from None


def _iter_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TailkdError(f"reading {path} needs pyarrow; install it with: pip install pyarrow "
                          "(or convert the file to .jsonl)") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TailkdError(f"{path} is not a readable parquet file ({exc}); rewrite it or remove it from data.paths") \
            from None
    names = pf.schema_arrow.names
    if "text" not in names:
        raise TailkdError(f'{path} has no "text" column (columns: {names[:8]}); rename the document column to "text"')
    kind = pf.schema_arrow.field("text").type
    values = kind.value_type if pa.types.is_dictionary(kind) else kind  # dictionary: e.g. a pandas "category" column
    if pa.types.is_null(values):  # pandas writes an all-None object column so (an empty one too): no documents
        return
    if not (pa.types.is_string(values) or pa.types.is_large_string(values)):
        raise TailkdError(f'{path}: column "text" holds {kind}, not strings; store each document as a string')
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        column = batch.column(0)
        try:
            texts = column.to_pylist()
        except UnicodeDecodeError as exc:  # arrow strings are UTF-8 by contract, which a writer may not have checked
            bad = next(i for i in range(len(column)) if not _decodes(column[i]))
            raise _binary_error(path, f'row {row + bad + 1} of column "text" is not UTF-8 ({exc.reason})') from None
        row += len(texts)
        for text in texts:
            if text is not None:
                yield text


def _decodes(scalar) -> bool:
    try:
        scalar.as_py()
    except UnicodeDecodeError:
        return False
    return True


# --------------------------------------------------------------------------- fingerprint and split


def _settings(**settings) -> dict:
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise TypeError(f"unknown corpus setting(s) {unknown}; known: {sorted(DEFAULT_SETTINGS)}")
    out = {**DEFAULT_SETTINGS, **settings}
    if out["doc_sep"] not in DOC_SEPS:
        raise TailkdError(f"doc_sep={out['doc_sep']!r} is not one of {', '.join(DOC_SEPS)}")
    if not (finite_number(out["heldout_fraction"]) and 0.0 <= out["heldout_fraction"] < 1.0):
        raise TailkdError(f"heldout_fraction={out['heldout_fraction']!r} must lie in [0, 1); 0.05 is usual")
    docs = out["min_heldout_docs"]
    if not (finite_number(docs) and int(docs) == docs and docs >= 0):
        raise TailkdError(f"min_heldout_docs={docs!r} must be a whole number >= 0")
    out["heldout_fraction"] = float(out["heldout_fraction"])
    out["min_heldout_docs"] = int(out["min_heldout_docs"])
    out["append_eos"] = bool(out["append_eos"])
    return out


def _file_stats(files: Sequence[Path]) -> list[dict]:
    stats = []
    for f in files:
        st = f.stat()
        stats.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return stats


def corpus_fingerprint(paths, tokenizer_fingerprint: str, settings: dict) -> str:
    """sha256 (hex) over the files (absolute path, size, mtime_ns), ``settings``, the tokenizer and ``FORMAT``.

    The files enter in READING order (see ``list_files``), not sorted: the order of ``paths`` decides
    the order of documents in ``train.bin`` and so the content of every row; a sorted list would let
    a reordered ``--data`` reuse a cache whose rows differ from a fresh build. Folders are sorted
    internally, so only the order the user wrote matters. An edit that keeps a file's size and
    mtime is not seen (as in make); touch the file to force a rebuild.
    """
    blob = {"format": FORMAT, "files": _file_stats(list_files(paths)), "settings": settings,
            "tokenizer": tokenizer_fingerprint}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode("utf-8")).hexdigest()


def _tokenizer_identity(tokenizer) -> str:
    """A fallback tokenizer fingerprint (the full vocabulary and rules) when the caller gives none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    ids = (type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id)
    return hashlib.sha256((json.dumps(ids) + body).encode("utf-8")).hexdigest()


def doc_hash(text: str) -> int:
    """64-bit hash of a document's text; the document is held out iff ``doc_hash < threshold``.

    It depends on the text alone (no seed, no position), so the held-out set never changes with the
    training seed or the file order, and duplicate documents land on the same side (no leakage).
    """
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _split_threshold(paths, doc_sep: str, fraction: float, min_heldout: int) -> tuple[int, int]:
    """First pass: count documents and choose the hash threshold. Returns (threshold, number of documents).

    Normally ``threshold = fraction * 2**64`` (about ``fraction`` of documents held out). It is raised to
    hold out the ``min_heldout`` lowest-hash documents if fewer fall below it, and lowered to keep the
    highest-hash document for training if all do. Only counts and ``min_heldout`` hashes are kept.
    """
    base = int(fraction * 2**64)
    n = below = 0
    lowest: list[int] = []  # max-heap (negated) of the min_heldout smallest hashes
    highest = -1
    for doc in iter_documents(paths, doc_sep=doc_sep):
        h = doc_hash(doc)
        n += 1
        below += h < base
        highest = max(highest, h)
        if min_heldout:
            if len(lowest) < min_heldout:
                heapq.heappush(lowest, -h)
            elif h < -lowest[0]:
                heapq.heapreplace(lowest, -h)
    if n == 1 and min_heldout > 0:
        raise TailkdError("the corpus holds a single document, so nothing can be held out for evaluation; split it "
                          "into documents (doc_sep=blank_line or line) or add more text")
    want = min(min_heldout, n - 1)
    if below < want:
        return sorted(-x for x in lowest)[want - 1] + 1, n
    if below == n:
        return highest, n
    return base, n


# --------------------------------------------------------------------------- tokenised corpus on disk


@dataclass(frozen=True)
class CorpusInfo:
    """A prepared corpus folder: ``train.bin`` / ``heldout.bin`` (flat uint32 ids) and ``meta.json``."""

    dir: Path
    meta: dict

    @property
    def train_bin(self) -> Path:
        return self.dir / TRAIN_FILE

    @property
    def heldout_bin(self) -> Path:
        return self.dir / HELDOUT_FILE

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def eos_id(self) -> int | None:
        return self.meta["eos_id"]


def load_corpus(out_dir: Path) -> CorpusInfo:
    """Open a prepared corpus folder, checking that its files match ``meta.json``."""
    out_dir = Path(out_dir)
    try:
        meta = jsonfile.read_object(out_dir / META_FILE)
    except (OSError, jsonfile.Damaged):
        raise TailkdError(f"{out_dir} is not a prepared corpus (no readable {META_FILE}); prepare it again") from None
    if meta.get("format") != FORMAT:
        raise TailkdError(f"{out_dir} was written in format {meta.get('format')!r}, not {FORMAT}; prepare it again")
    for name, split in ((TRAIN_FILE, "train"), (HELDOUT_FILE, "heldout")):
        f = out_dir / name
        tokens = meta.get(split, {}).get("tokens") if isinstance(meta.get(split), dict) else None
        if not isinstance(tokens, int) or not f.is_file() or f.stat().st_size != tokens * TOKEN_BYTES:
            raise TailkdError(f"{f} is missing or does not match {META_FILE}; delete {out_dir} and prepare the "
                              "corpus again")
    eos = meta.get("eos_id", "missing")
    if not (isinstance(meta.get("fingerprint"), str) and isinstance(meta.get("sha256", {}), dict)
            and (eos is None or isinstance(eos, int) and not isinstance(eos, bool))):
        raise TailkdError(f"{out_dir / META_FILE} is damaged (its fingerprint, eos_id or sha256 is missing or of "
                          f"another type); delete {out_dir} and prepare the corpus again")
    return CorpusInfo(out_dir, meta)


def document_eos_id(tokenizer, append_eos: bool = True) -> int | None:
    """The id closing each document (EOS, else BOS); None when ``append_eos`` is false; TailkdError if neither."""
    if not append_eos:
        return None
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return int(tid)
    raise TailkdError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no EOS "
                      "(or BOS) token to mark document boundaries; give it one (tokenizer.eos_token = ...) or use "
                      "another tokenizer")


def tokenize_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each document, as the corpus stores them (before the closing EOS)."""
    # No special tokens added; split_special_tokens: a document that *contains* "<|endoftext|>" as text
    # must not produce a real EOS id (that would forge a document boundary); verbose=False: documents
    # longer than the model's context are expected here (they are packed into rows later).
    enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)
    return enc["input_ids"]


def prepare_corpus(paths, tokenizer, out_dir: Path, *, heldout_fraction: float = 0.05, doc_sep: str = "auto",
                   min_heldout_docs: int = 1, append_eos: bool = True,
                   tokenizer_fingerprint: str | None = None) -> CorpusInfo:
    """Tokenise the documents of ``paths`` into ``out_dir`` (replacing a previous corpus there, atomically).

    Two streaming passes over the documents: the first counts them and fixes the held-out threshold
    (see ``_split_threshold``), the second tokenises batches of documents (no special tokens; the
    EOS id — or BOS if there is none — appended after each document when ``append_eos``) and
    appends them to ``train.bin`` or ``heldout.bin`` in reading order. Everything is written into a
    temporary folder next to ``out_dir`` and renamed into place: an error or a crash leaves the
    previous ``out_dir`` (if any) as it was, never a half-written corpus.
    """
    from tailkd.checkpoint import atomic_write_dir  # the project's one atomic-folder writer

    settings = _settings(heldout_fraction=heldout_fraction, doc_sep=doc_sep, min_heldout_docs=min_heldout_docs,
                         append_eos=append_eos)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not (out_dir / META_FILE).is_file():
        raise TailkdError(f"refusing to replace {out_dir}: it exists and is not a tailkd corpus; choose a new or "
                          "empty folder")
    eos = document_eos_id(tokenizer, append_eos)
    tok_fp = tokenizer_fingerprint or _tokenizer_identity(tokenizer)
    fingerprint = corpus_fingerprint(paths, tok_fp, settings)
    files = list_files(paths)
    stats = _file_stats(files)
    threshold, n_docs = _split_threshold(files, doc_sep, heldout_fraction, min_heldout_docs)
    top = np.iinfo(TOKEN_DTYPE).max  # the largest token id a corpus stores

    def write(tmp: Path) -> None:
        counts = {"train": {"tokens": 0, "docs": 0}, "heldout": {"tokens": 0, "docs": 0}}
        hashes = {"train": hashlib.sha256(), "heldout": hashlib.sha256()}  # of the bytes written
        with open(tmp / TRAIN_FILE, "wb") as f_train, open(tmp / HELDOUT_FILE, "wb") as f_held:
            sinks = {"train": f_train, "heldout": f_held}

            def flush(batch: list[str]) -> None:
                parts: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
                for text, ids in zip(batch, tokenize_documents(tokenizer, batch)):
                    split = "heldout" if doc_hash(text) < threshold else "train"
                    arr = np.asarray(ids if eos is None else [*ids, eos], dtype=np.int64)
                    if arr.size and (arr.min() < 0 or arr.max() > top):  # two reductions; the culprit only on failure
                        bad = int(arr[(arr < 0) | (arr > top)][0])
                        raise TailkdError(f"token id {bad} does not fit in {np.dtype(TOKEN_DTYPE).name}; "
                                          "this tokenizer cannot be used with tailkd corpora")
                    parts[split].append(arr.astype(TOKEN_DTYPE))
                    counts[split]["docs"] += 1
                    counts[split]["tokens"] += int(arr.size)
                for split, arrs in parts.items():
                    if arrs:
                        block = np.concatenate(arrs)
                        block.tofile(sinks[split])
                        hashes[split].update(block.tobytes())

            batch, chars = [], 0
            for doc in iter_documents(files, doc_sep=doc_sep):
                batch.append(doc)
                chars += len(doc)
                if len(batch) >= TOKENIZE_BATCH_DOCS or chars >= TOKENIZE_BATCH_CHARS:
                    flush(batch)
                    batch, chars = [], 0
            if batch:
                flush(batch)

        seen = counts["train"]["docs"] + counts["heldout"]["docs"]
        if seen != n_docs or _file_stats(files) != stats:
            raise TailkdError(f"the data files changed while being tokenised ({n_docs} documents, then {seen}); "
                              "run again once they stay put")
        want = min(min_heldout_docs, n_docs - 1)
        if counts["heldout"]["docs"] < want or counts["train"]["docs"] == 0:
            raise TailkdError(f"cannot hold out {want} document(s) and keep one for training: the {n_docs} documents "
                              "are copies of each other; add more distinct text")
        meta = {
            "format": FORMAT, "fingerprint": fingerprint, "dtype": np.dtype(TOKEN_DTYPE).name,
            "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
            "tokenizer_fingerprint": tok_fp, "vocab_size": len(tokenizer), "eos_id": eos,
            "settings": settings, "split_threshold": threshold, **counts,
            "sha256": {TRAIN_FILE: hashes["train"].hexdigest(), HELDOUT_FILE: hashes["heldout"].hexdigest()},
            "files": stats, "created_unix": time.time(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    try:
        atomic_write_dir(out_dir, write)
    except OSError as exc:
        raise TailkdError(f"could not write the corpus to {out_dir} ({exc.strerror or exc}); free disk space or "
                          "set data.cache_dir to another disk") from exc
    return load_corpus(out_dir)


def cached_fingerprint(paths, *, tokenizer_fingerprint: str, **settings) -> str:
    """The fingerprint `prepare_corpus_cached` gives the corpus of ``paths`` (its `CorpusInfo.fingerprint`, what a
    teacher cache records), without tokenising: the same arguments less the tokenizer."""
    return corpus_fingerprint(paths, tokenizer_fingerprint, _settings(**settings))


def prepare_corpus_cached(paths, tokenizer, cache_root: Path, *, tokenizer_fingerprint: str,
                          **settings) -> CorpusInfo:
    """``prepare_corpus`` into ``cache_root/<fingerprint[:16]>``, or reuse that folder if it is already complete.

    ``settings``: ``heldout_fraction``, ``doc_sep``, ``min_heldout_docs``, ``append_eos`` (defaults as in
    ``prepare_corpus``). Any change to a file (size or mtime), a setting or the tokenizer gives a new
    fingerprint and so a new folder; older folders are left for the user to delete.
    """
    settings = _settings(**settings)
    fingerprint = cached_fingerprint(paths, tokenizer_fingerprint=tokenizer_fingerprint, **settings)
    out_dir = Path(cache_root) / fingerprint[:16]
    if (out_dir / META_FILE).is_file():
        try:
            info = load_corpus(out_dir)
        except TailkdError:
            info = None  # damaged: prepared again below, replacing it atomically
        if info is not None and info.fingerprint == fingerprint:
            return info
    return prepare_corpus(paths, tokenizer, out_dir, tokenizer_fingerprint=tokenizer_fingerprint, **settings)
