"""tailkd.corpus and tailkd.data: documents, the tokenised corpus on disk, packed rows, resumable sampling."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tailkd import corpus, data
from tailkd.errors import TailkdError
from tailkd.evaluate import batched

EOS = "<|endoftext|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (a byte-level BPE without merges) + an EOS special token (id 256)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, model_max_length=16)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


class CountingTokenizer:
    """Wraps a tokenizer, counts calls, and raises on a document containing ``fail_on`` (a simulated crash)."""

    def __init__(self, inner, fail_on: str | None = None):
        self.inner, self.fail_on, self.calls = inner, fail_on, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __call__(self, texts, **kw):
        self.calls += 1
        if self.fail_on is not None and any(self.fail_on in t for t in texts):
            raise RuntimeError("simulated crash while tokenising")
        return self.inner(texts, **kw)


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def docs_of(paths, **kw) -> list[str]:
    return list(corpus.iter_documents(paths, **kw))


def split_docs(bin_path, eos_id: int, tok) -> list[str]:
    """Decode a flat token file back into its documents (EOS-terminated)."""
    ids = np.fromfile(bin_path, dtype=np.uint32).tolist()
    out, cur = [], []
    for t in ids:
        if t == eos_id:
            out.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert cur == [], "a token file must end with EOS"
    return out


# --------------------------------------------------------------------------- reading documents


def test_doc_sep_blank_line_line_file(tmp_path):
    f = write(tmp_path / "a.txt", "one\n  indented two\n\n\n \t \nthree\r\nfour  \n\n")
    assert docs_of(f, doc_sep="blank_line") == ["one\n  indented two", "three\nfour"]
    assert docs_of(f, doc_sep="line") == ["one", "indented two", "three", "four"]
    assert docs_of(f, doc_sep="file") == ["one\n  indented two\n\n\n \t \nthree\nfour"]
    assert docs_of(f) == docs_of(f, doc_sep="blank_line")  # auto: blank_line for .txt
    g = write(tmp_path / "b.txt", "\n \t\n\nbody\n\nmore\n")
    assert docs_of(g, doc_sep="file") == ["body\n\nmore"]  # a document's leading blank lines are dropped


def test_suffixes_are_read_whatever_their_case(tmp_path):
    write(tmp_path / "A.JSONL", '{"text": "upper json"}\n')
    write(tmp_path / "B.Cor", "first line\nsecond line\n")
    assert docs_of(tmp_path) == ["upper json", "first line", "second line"]


def test_doc_sep_auto_reads_cor_by_line_and_strips_bom(tmp_path):
    cor = tmp_path / "news.cor"
    cor.write_bytes("\ufefffirst article\nsecond article\n\nthird".encode())
    assert docs_of(cor) == ["first article", "second article", "third"]
    assert docs_of(cor, doc_sep="blank_line") == ["first article\nsecond article", "third"]


@pytest.mark.parametrize("doc_sep", ["blank_line", "line", "file"])
def test_a_lone_cr_ends_a_line_of_a_text_file_as_python_reads_text(tmp_path, doc_sep):
    """Line endings \n, \r\n and a lone \r (classic Mac OS), as Python's universal newlines: a CR-only file was
    one line, so a .cor file of three articles was one document and \r stayed inside the text."""
    text = "one\ntwo\n\nthree\n\n\nfour five\nsix"
    unix = tmp_path / "unix.txt"
    unix.write_bytes(text.encode())
    for ending in ("\r", "\r\n"):
        other = tmp_path / f"other{len(ending)}.txt"
        other.write_bytes(text.replace("\n", ending).encode())
        got = docs_of(other, doc_sep=doc_sep)
        assert got == docs_of(unix, doc_sep=doc_sep), ending
        with open(other, encoding="utf-8") as fh:  # Python's own reading of the same bytes, by line
            assert fh.read().split("\n") == text.split("\n")
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"a\rb\r\nc\n\r\rd\r\r\ne")
    with open(mixed, encoding="utf-8") as fh:
        assert docs_of(mixed, doc_sep=doc_sep) == docs_of(write(tmp_path / "m.txt", fh.read()), doc_sep=doc_sep)


def test_a_bad_byte_after_lone_crs_names_its_line(tmp_path):
    f = tmp_path / "mac.txt"
    f.write_bytes(b"one\rtwo\rth\xffree\rfour")
    with pytest.raises(TailkdError, match="line 3 is not UTF-8"):
        docs_of(f)


def test_a_cr_only_jsonl_file_is_not_json_lines(tmp_path):
    """JSON Lines separates records by \n (\r\n allowed); a lone \r is JSON whitespace, not a record break, so a
    CR-only .jsonl file is refused as one line holding more than one value, naming the file."""
    f = tmp_path / "mac.jsonl"
    f.write_bytes(b'{"text": "a"}\r{"text": "b"}\r')
    with pytest.raises(TailkdError, match=r"mac.jsonl:1: not valid JSON \(Extra data\)"):
        docs_of(f)
    f.write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r\n')
    assert docs_of(f) == ["a", "b"]


def test_folder_is_recursive_sorted_and_skips_hidden(tmp_path):
    write(tmp_path / "b.txt", "B")
    write(tmp_path / "a" / "z.txt", "AZ")
    write(tmp_path / "a" / "c.txt", "AC")
    write(tmp_path / ".hidden.txt", "HIDDEN")
    write(tmp_path / ".git" / "config", "GIT")
    write(tmp_path / "a" / ".cache" / "x.txt", "CACHED")
    assert docs_of(tmp_path) == ["AC", "AZ", "B"]
    # paths keep the order given; a file listed twice is read once, under any name that leads to it
    assert docs_of([tmp_path / "b.txt", tmp_path / "a", tmp_path / "b.txt"]) == ["B", "AC", "AZ"]
    assert docs_of([tmp_path / "b.txt", tmp_path / "a" / ".." / "b.txt"]) == ["B"]
    (tmp_path / "link.txt").symlink_to(tmp_path / "b.txt")
    assert docs_of([tmp_path / "link.txt", tmp_path / "b.txt"]) == ["B"]


def test_jsonl_and_json_lines(tmp_path):
    write(tmp_path / "d.jsonl", '{"text": "hello  world\\n", "id": 1}\n\n \t\n{"text": "   "}\n{"text": "second"}\n')
    write(tmp_path / "e.json", '{"text": "from json"}\n')
    assert docs_of(tmp_path) == ["hello  world\n", "second", "from json"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(TailkdError, match=r'd\.jsonl:2: no "text" field \(found keys \[\'body\'\]\)'):
        docs_of(f)
    g = write(tmp_path / "g.jsonl", '{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(TailkdError, match=r"g\.jsonl:2: not valid JSON"):
        docs_of(g)
    h = write(tmp_path / "h.jsonl", '{"text": 3}\n')
    with pytest.raises(TailkdError, match=r'h\.jsonl:1: "text" is a int'):
        docs_of(h)


@pytest.mark.parametrize("line, match", [
    # a \ud800 escape without its other half parses into a str that is no Unicode text: it ended later, in hashing
    # or the tokenizer, as 'UnicodeEncodeError: ... surrogates not allowed'
    ('{"text": "a\\ud800b"}', r'"text" holds \\ud800, half of a UTF-16 surrogate pair .*remove the line$'),
    ('{"text": "low \\udc00 alone", "id": "x"}', r'"text" holds \\udc00, half of a UTF-16 surrogate pair'),
    pytest.param("[" * 100_000 + "]" * 100_000,  # past what Python's parser reads: a RecursionError
                 r"not valid JSON \(nested too deeply to read\); \.jsonl/\.json files need one", id="nested too deep"),
])
def test_jsonl_lines_that_are_no_text_name_file_and_line(tmp_path, line, match):
    f = write(tmp_path / "d.jsonl", '{"text": "ok"}\n' + line + "\n")
    with pytest.raises(TailkdError, match=r"d\.jsonl:2: " + match):
        docs_of(f)


def test_jsonl_surrogate_pair_is_one_character(tmp_path):
    """A whole pair of surrogate escapes is one character, kept; a lone one in a field tailkd does not read is left."""
    f = write(tmp_path / "d.jsonl", '{"text": "a\\ud83d\\ude00b", "note": "\\ud800 in another field"}\n')
    assert docs_of(f) == ["a\U0001f600b"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["first doc", None, "  ", "second doc"], "n": [1, 2, 3, 4]}),
                   tmp_path / "d.parquet", row_group_size=2)
    assert docs_of(tmp_path / "d.parquet") == ["first doc", "second doc"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(TailkdError, match=r'bad\.parquet has no "text" column \(columns: \[\'body\'\]\)'):
        docs_of(tmp_path / "bad.parquet")


def test_parquet_dictionary_encoded_text(tmp_path):
    """A dictionary-encoded string column (pandas "category") holds strings: read as any "text" column (it was
    refused: 'column "text" holds dictionary<values=string, ...>, not strings')."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": pa.array(["first doc", None, "second doc", "first doc"]).dictionary_encode()}),
                   tmp_path / "d.parquet")
    assert docs_of(tmp_path / "d.parquet") == ["first doc", "second doc", "first doc"]
    pq.write_table(pa.table({"text": pa.array([1, 2]).dictionary_encode()}), tmp_path / "ints.parquet")
    with pytest.raises(TailkdError, match=r'ints\.parquet: column "text" holds .*int64.*, not strings'):
        docs_of(tmp_path / "ints.parquet")


def test_parquet_text_column_of_type_null_holds_no_documents(tmp_path):
    """pandas writes an all-None object column (an empty one too) with arrow type null: no documents, as a string
    column of nulls (it was refused: 'column "text" holds null, not strings'); the other files' documents are read."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": pa.nulls(3)}), tmp_path / "nulls.parquet")
    pq.write_table(pa.table({"text": pa.nulls(3, pa.string())}), tmp_path / "string-nulls.parquet")
    pq.write_table(pa.table({"text": ["a doc"]}), tmp_path / "one.parquet")
    for name in ("nulls", "string-nulls"):
        assert docs_of([tmp_path / f"{name}.parquet", tmp_path / "one.parquet"]) == ["a doc"]
        with pytest.raises(TailkdError, match=rf"^no documents in \S*{name}\.parquet: every file is empty"):
            docs_of(tmp_path / f"{name}.parquet")


def test_parquet_text_that_is_not_utf8_names_its_row(tmp_path):
    """Arrow strings are UTF-8 by contract, but a writer that does not check can store other bytes (here a surrogate
    in CESU-8, ED A0 80): one line naming the file and row (it was 'UnicodeDecodeError: 'utf-8' codec can't
    decode byte 0xed ...', exit 1)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    raw = pa.array([b"ok", b"fine", b"cut \xed\xa0\x80"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": raw}), tmp_path / "d.parquet", row_group_size=2)
    with pytest.raises(TailkdError, match=r'd\.parquet is not UTF-8 text \(row 3 of column "text" is not UTF-8 '
                                          r"\(invalid continuation byte\)\); remove it from data\.paths or convert"):
        docs_of(tmp_path / "d.parquet")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(TailkdError, match=r"d\.parquet needs pyarrow; install it with: pip install pyarrow"):
        docs_of(tmp_path / "d.parquet")


def test_binary_and_non_utf8_files_are_named(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02 some text")
    with pytest.raises(TailkdError, match=r"blob\.bin is not UTF-8 text \(it contains NUL bytes\)"):
        docs_of(tmp_path / "blob.bin")
    (tmp_path / "latin.txt").write_bytes(b"ok line\nprice \xa33\n")
    with pytest.raises(TailkdError, match=r"latin\.txt is not UTF-8 text \(line 2 is not UTF-8.*iconv"):
        docs_of(tmp_path / "latin.txt")
    (tmp_path / "late.txt").write_bytes(b"x" * 9000 + b"\nline two\nthree \x00 four\n")  # past the first 8 KiB
    with pytest.raises(TailkdError, match=r"late\.txt is not UTF-8 text \(line 3 contains NUL bytes\)"):
        docs_of(tmp_path / "late.txt")


def test_missing_path_and_empty_corpus(tmp_path):
    with pytest.raises(TailkdError, match=r"data path .*nope\.txt does not exist"):
        docs_of(tmp_path / "nope.txt")
    write(tmp_path / "blank.txt", "\n  \n\t\n")
    with pytest.raises(TailkdError, match=r"no documents in .*blank\.txt: every file is empty or whitespace"):
        docs_of(tmp_path / "blank.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TailkdError, match=r"folder .*empty holds no \(non-hidden\) files"):
        docs_of(tmp_path / "empty")
    with pytest.raises(TailkdError, match=r"doc_sep='para' is not one of auto, blank_line, line, file"):
        docs_of(tmp_path / "blank.txt", doc_sep="para")


@pytest.mark.parametrize("settings, needle", [
    ({"heldout_fraction": "0.1"}, r"heldout_fraction='0\.1' must lie in \[0, 1\)"),
    ({"heldout_fraction": None}, r"heldout_fraction=None must lie in \[0, 1\)"),
    ({"heldout_fraction": True}, r"heldout_fraction=True must lie in \[0, 1\)"),
    ({"heldout_fraction": 1.0}, r"heldout_fraction=1\.0 must lie in \[0, 1\)"),  # nothing left to train on
    ({"min_heldout_docs": 1.5}, r"min_heldout_docs=1\.5 must be a whole number >= 0"),
    ({"min_heldout_docs": float("inf")}, r"min_heldout_docs=inf must be a whole number >= 0"),
    ({"min_heldout_docs": True}, r"min_heldout_docs=True must be a whole number >= 0"),
    ({"min_heldout_docs": "3"}, r"min_heldout_docs='3' must be a whole number >= 0"),
])
def test_corpus_settings_of_the_wrong_type_are_one_line(tmp_path, settings, needle):
    # through the Python API (the CLI's config checks types first): a TypeError / OverflowError, or True taken as 1
    with pytest.raises(TailkdError, match=needle):
        corpus.prepare_corpus([tmp_path / "a.txt"], None, tmp_path / "out", **settings)


# --------------------------------------------------------------------------- the built-in corpus


def test_default_corpus_finds_lee_without_importing_gensim(tmp_path):
    imported_before = "gensim" in sys.modules
    files = corpus.default_corpus_files(tmp_path)
    assert [f.name for f in files] == ["lee_background.cor", "lee.cor"]
    assert ("gensim" in sys.modules) == imported_before
    # wc -l says 299 and 49: each file's last article has no trailing newline
    counts = [len(docs_of(f)) for f in files]
    assert counts == [300, 50]
    assert any("£3,000" in d for d in docs_of(files[1]))  # the one Latin-1 byte, now UTF-8
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert corpus.default_corpus_files(tmp_path) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # converted once: fingerprints stay stable


def test_default_corpus_not_installed_names_the_install_command(tmp_path, monkeypatch):
    from tailkd import assets

    monkeypatch.setattr(assets, "assets_dir", lambda: tmp_path / "empty")
    monkeypatch.setattr(assets, "_in_package", lambda asset: None)
    with pytest.raises(TailkdError, match=r"python -m tailkd\.install.*gensim==4\.3\.3"):
        corpus.default_corpus_files(tmp_path)


def test_builtin_corpora_in_an_unwritable_cache_are_one_line_errors(tmp_path):
    """The built-in corpora are copied into tailkd's cache on first use; a cache that cannot be written (read-only,
    full, a file in the way) ended `tailkd distill` as an unexpected error ("OSError: [Errno 30] Read-only file
    system: '.../default_corpus'", exit 1) instead of naming the cache and its fix."""
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    with pytest.raises(TailkdError, match=r"could not write the built-in news corpus into .*cache/default_corpus "
                                          r"\(.*\); set TAILKD_CACHE or data\.cache_dir to a writable folder"):
        corpus.default_corpus_files(blocked)
    with pytest.raises(TailkdError, match=r"could not write Python's documentation \(builtin:pydoc\) into "
                                          r".*cache/builtin_pydoc \(.*\); set TAILKD_CACHE"):
        corpus.python_docs_corpus(blocked)


def test_a_builtin_corpus_copy_written_meanwhile_by_another_run_is_kept(tmp_path, monkeypatch):
    """Two first runs at once both find no UTF-8 copy of the news corpus and both write it: the later rename
    replaced the copy the other run was already tokenising, with a new mtime (part of the corpus fingerprint), so
    that run could stop with "the data files changed while being tokenised". The copy found in place is kept."""
    from tailkd import assets

    src = tmp_path / "lee.cor"
    src.write_bytes(b"one \xa3 article\n")  # Latin-1, as the real lee.cor
    monkeypatch.setattr(assets, "find", lambda name: [src])
    dest = tmp_path / "cache" / "default_corpus" / "lee.cor"
    real_is_file = type(dest).is_file

    def another_run_writes_it_first(path):  # this run looks (no copy), then the other run's copy lands
        seen = real_is_file(path)
        if path == dest and not seen:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text("one £ article\n", encoding="utf-8")
            os.utime(dest, ns=(1_000_000_000, 1_000_000_000))
        return seen

    monkeypatch.setattr(type(dest), "is_file", another_run_writes_it_first)
    assert corpus.default_corpus_files(tmp_path / "cache") == [dest]
    monkeypatch.undo()
    assert dest.stat().st_mtime_ns == 1_000_000_000 and dest.read_text(encoding="utf-8") == "one £ article\n"
    assert [p.name for p in dest.parent.iterdir()] == ["lee.cor"]  # no temporary file left


def test_data_cache_and_gguf_cache_read_tailkd_cache_alike(tmp_path, monkeypatch):
    """TAILKD_CACHE='~/tk' (a Dockerfile's ENV, a systemd unit, a quoted export: no shell expands the ~): the GGUF
    cache expanded it, the data cache made a folder literally named '~' in the working directory."""
    from tailkd.models import gguf_cache_path

    monkeypatch.setenv("HOME", str(tmp_path))
    gguf = tmp_path / "t.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("TAILKD_CACHE", "~/tk")
    assert corpus.default_cache_root() == gguf_cache_path(gguf).parent.parent == tmp_path / "tk"
    monkeypatch.setenv("TAILKD_CACHE", "")
    assert corpus.default_cache_root() == gguf_cache_path(gguf).parent.parent == tmp_path / ".cache" / "tailkd"


def test_prepare_default_corpus(tmp_path, tok):
    info = corpus.prepare_corpus(corpus.default_corpus_files(tmp_path), tok, tmp_path / "corpus")
    m = info.meta
    assert m["train"]["docs"] + m["heldout"]["docs"] == 350
    assert 5 <= m["heldout"]["docs"] <= 35  # about 5 %
    rows = data.PackedRows(info.train_bin, 128)
    assert len(rows) == (m["train"]["tokens"] - 1) // 128


# --------------------------------------------------------------------------- tokenised corpus


def stored_ids(info) -> np.ndarray:
    """Every token id a prepared corpus stores: its train.bin, then its heldout.bin."""
    return np.concatenate([np.fromfile(info.train_bin, np.uint32), np.fromfile(info.heldout_bin, np.uint32)])


def corpus_file(tmp_path, n: int = 40, name: str = "c.txt"):
    return write(tmp_path / name, "\n\n".join(f"Document number {i}: some words about item {i * 7}." for i in range(n)))


def test_prepare_roundtrip_and_meta(tmp_path, tok):
    f = corpus_file(tmp_path)
    info = corpus.prepare_corpus(f, tok, tmp_path / "out", heldout_fraction=0.25)
    eos = tok.eos_token_id
    train, held = split_docs(info.train_bin, eos, tok), split_docs(info.heldout_bin, eos, tok)
    everything = docs_of(f)
    assert sorted(train + held) == sorted(everything)  # each document once, on one side
    assert not set(train) & set(held)
    assert train == [d for d in everything if d in set(train)]  # reading order kept
    threshold = int(0.25 * 2**64)
    expected_held = [d for d in everything
                     if int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "big") < threshold]
    assert held == expected_held and len(held) >= 1
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta == info.meta
    n_bytes = {d: len(d.encode()) for d in everything}
    assert meta["train"] == {"docs": len(train), "tokens": sum(n_bytes[d] + 1 for d in train)}
    assert meta["heldout"] == {"docs": len(held), "tokens": sum(n_bytes[d] + 1 for d in held)}
    assert meta["eos_id"] == eos == 256 and meta["dtype"] == "uint32" and meta["vocab_size"] == 257
    assert meta["settings"] == {"heldout_fraction": 0.25, "doc_sep": "auto", "min_heldout_docs": 1,
                                "append_eos": True}
    assert meta["fingerprint"] == info.fingerprint and len(info.fingerprint) == 64
    assert meta["files"] == [{"path": str(f.resolve()), "size": f.stat().st_size,
                              "mtime_ns": f.stat().st_mtime_ns}]
    assert meta["sha256"] == {name: hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest()
                              for name in ("train.bin", "heldout.bin")}
    assert sorted(os.listdir(tmp_path / "out")) == ["heldout.bin", "meta.json", "train.bin"]


def test_split_depends_on_text_only(tmp_path, tok):
    docs = [f"article {i} " + "x" * (i % 5) for i in range(60)]
    a = write(tmp_path / "a.txt", "\n\n".join(docs))
    b = write(tmp_path / "b.txt", "\n\n".join(reversed(docs)))
    ia = corpus.prepare_corpus(a, tok, tmp_path / "A", heldout_fraction=0.2)
    ia2 = corpus.prepare_corpus(a, tok, tmp_path / "A2", heldout_fraction=0.2)
    ib = corpus.prepare_corpus(b, tok, tmp_path / "B", heldout_fraction=0.2)
    assert ia.heldout_bin.read_bytes() == ia2.heldout_bin.read_bytes()
    assert ia.train_bin.read_bytes() == ia2.train_bin.read_bytes()
    held_a = split_docs(ia.heldout_bin, 256, tok)
    assert set(held_a) == set(split_docs(ib.heldout_bin, 256, tok))  # file order does not move documents
    assert 3 <= len(held_a) <= 25
    # no seed enters the split at all (prepare_corpus takes none): the training seed only orders train rows


def test_min_heldout_and_at_least_one_train_doc(tmp_path, tok):
    f = write(tmp_path / "three.txt", "alpha\n\nbeta\n\ngamma")
    info = corpus.prepare_corpus(f, tok, tmp_path / "o1", heldout_fraction=0.0, min_heldout_docs=1)
    assert (info.meta["heldout"]["docs"], info.meta["train"]["docs"]) == (1, 2)
    # the held-out document is the one with the smallest hash
    held = split_docs(info.heldout_bin, 256, tok)
    assert held == [min(["alpha", "beta", "gamma"], key=corpus.doc_hash)]
    info = corpus.prepare_corpus(f, tok, tmp_path / "o2", heldout_fraction=0.0, min_heldout_docs=5)
    assert (info.meta["heldout"]["docs"], info.meta["train"]["docs"]) == (2, 1)
    info = corpus.prepare_corpus(f, tok, tmp_path / "o3", heldout_fraction=0.999, min_heldout_docs=1)
    assert (info.meta["heldout"]["docs"], info.meta["train"]["docs"]) == (2, 1)
    assert split_docs(info.train_bin, 256, tok) == [max(["alpha", "beta", "gamma"], key=corpus.doc_hash)]
    one = write(tmp_path / "one.txt", "only one document")
    with pytest.raises(TailkdError, match=r"single document.*doc_sep=blank_line or line"):
        corpus.prepare_corpus(one, tok, tmp_path / "o4")
    assert not (tmp_path / "o4").exists()
    same = write(tmp_path / "same.txt", "copy\n\ncopy\n\ncopy")
    with pytest.raises(TailkdError, match=r"copies of each other"):
        corpus.prepare_corpus(same, tok, tmp_path / "o5")  # all held out (their hash is the lowest): none to train
    with pytest.raises(TailkdError, match=r"^cannot hold out 1 document\(s\) and keep one for training: the 3 "
                                          r"documents are copies of each other"):
        corpus.prepare_corpus(same, tok, tmp_path / "o6", heldout_fraction=0.999)  # all kept (the highest hash)
    assert not (tmp_path / "o5").exists() and not (tmp_path / "o6").exists()


def test_meta_vocab_size_counts_added_tokens(tmp_path):
    """meta.json's vocab_size bounds the ids stored: an added token (id 257 here) counts, as len(tokenizer) does
    (the tokenizer's vocab_size leaves added tokens out: 257)."""
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    info = corpus.prepare_corpus(write(tmp_path / "c.txt", "a <extra> b\n\nc"), tok, tmp_path / "out")
    ids = stored_ids(info)
    assert int(ids.max()) == 257 and info.meta["vocab_size"] == 258 == len(tok)


def test_equal_settings_give_one_corpus(tmp_path):
    """Settings equal as values (2.0 documents, append_eos 1) name the same corpus as their plain form."""
    f = write(tmp_path / "c.txt", "one\n\ntwo")
    plain = corpus.cached_fingerprint(f, tokenizer_fingerprint="t", min_heldout_docs=2, append_eos=True)
    assert corpus.cached_fingerprint(f, tokenizer_fingerprint="t", min_heldout_docs=2.0, append_eos=1) == plain
    assert corpus.cached_fingerprint(f, tokenizer_fingerprint="t", min_heldout_docs=3, append_eos=True) != plain


def test_documents_are_tokenised_in_batches_of_bounded_text(tmp_path, tok, monkeypatch):
    """One tokenizer call takes at most TOKENIZE_BATCH_DOCS documents and stops adding them once it holds
    TOKENIZE_BATCH_CHARS characters; the batching does not change the corpus."""
    f = corpus_file(tmp_path, n=30)  # documents of ~45 characters
    whole = corpus.prepare_corpus(f, tok, tmp_path / "whole")
    sizes = []

    class Recording(CountingTokenizer):
        def __call__(self, texts, **kw):
            sizes.append(sum(map(len, texts)))
            return super().__call__(texts, **kw)

    monkeypatch.setattr(corpus, "TOKENIZE_BATCH_CHARS", 100)
    small = corpus.prepare_corpus(f, Recording(tok), tmp_path / "small")
    assert len(sizes) >= 10 and max(sizes) < 100 + 60  # each call stops at the first document past 100 characters
    assert small.train_bin.read_bytes() == whole.train_bin.read_bytes()
    assert small.heldout_bin.read_bytes() == whole.heldout_bin.read_bytes()


def test_eos_inside_text_is_not_a_boundary(tmp_path, tok):
    f = write(tmp_path / "c.txt", f"before {EOS} after\n\nsecond\n\nthird")
    info = corpus.prepare_corpus(f, tok, tmp_path / "out")
    ids = stored_ids(info)
    assert int((ids == 256).sum()) == 3  # one EOS per document, none forged by the text
    assert f"before {EOS} after" in split_docs(info.train_bin, 256, tok) + split_docs(info.heldout_bin, 256, tok)


def test_ids_above_65535_survive(tmp_path):
    wl = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "hello": 70_000, "world": 3, "</s>": 100_000},
                                    unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = PreTrainedTokenizerFast(tokenizer_object=wl, eos_token="</s>", unk_token="[UNK]")
    f = write(tmp_path / "c.txt", "hello world\n\nworld hello hello")
    info = corpus.prepare_corpus(f, big, tmp_path / "out")
    ids = stored_ids(info)
    assert sorted(ids.tolist()) == sorted([70_000, 3, 100_000, 3, 70_000, 70_000, 100_000])


def test_tokenizer_without_eos_or_bos(tmp_path):
    wl = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bare = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]")
    f = write(tmp_path / "c.txt", "a a\n\na")
    with pytest.raises(TailkdError, match=r"has no EOS \(or BOS\) token to mark document boundaries"):
        corpus.prepare_corpus(f, bare, tmp_path / "out")
    info = corpus.prepare_corpus(f, bare, tmp_path / "out", append_eos=False)
    assert info.eos_id is None
    assert info.meta["train"]["tokens"] + info.meta["heldout"]["tokens"] == 3


def test_a_tokenizer_with_bos_only_closes_documents_with_it(tmp_path):
    wl = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1, "<s>": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos_only = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]", bos_token="<s>")
    info = corpus.prepare_corpus(write(tmp_path / "c.txt", "a a\n\na"), bos_only, tmp_path / "out")
    assert info.eos_id == 2
    ids = stored_ids(info)
    assert sorted(ids.tolist()) == [1, 1, 1, 2, 2]


def test_documents_are_tokenised_without_the_tokenizers_special_tokens(tmp_path):
    """A tokenizer that adds BOS to every call (Llama's post-processor) adds none to a corpus: each document is its
    text's tokens and the closing EOS, never a BOS the text did not hold."""
    from tokenizers import processors

    wl = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1, "<s>": 2, "</s>": 3}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wl.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    assert llama_like("a a")["input_ids"] == [2, 1, 1]  # the tokenizer's own default
    assert corpus.tokenize_documents(llama_like, ["a a", "a"]) == [[1, 1], [1]]
    info = corpus.prepare_corpus(write(tmp_path / "c.txt", "a a\n\na"), llama_like, tmp_path / "out")
    ids = stored_ids(info)
    assert sorted(ids.tolist()) == [1, 1, 1, 3, 3]


class FixedIds:
    """A tokenizer whose every document is ``ids`` (an id no uint32 holds, say)."""

    eos_token_id, bos_token_id, name_or_path = 0, None, "fixed"

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return 1

    def __call__(self, texts, **kw):
        return {"input_ids": [list(self.ids) for _ in texts]}


@pytest.mark.parametrize("ids, bad", [([1, 2**32], 2**32), ([-1, 1], -1)])
def test_token_ids_a_corpus_cannot_hold_are_refused(tmp_path, ids, bad):
    f = write(tmp_path / "c.txt", "one\n\ntwo\n\nthree")
    with pytest.raises(TailkdError, match=rf"^token id {bad} does not fit in uint32; this tokenizer cannot be used"):
        corpus.prepare_corpus(f, FixedIds(ids), tmp_path / "out", tokenizer_fingerprint="fixed")
    assert sorted(os.listdir(tmp_path)) == ["c.txt"]


def test_the_tokenizer_identity_follows_its_eos_and_bos(tmp_path):
    """Without a given tokenizer fingerprint, the corpus's is the tokenizer's rules and its EOS / BOS: a tokenizer
    whose EOS is another token writes other rows, so its corpus must not share a cache entry."""
    a, b = byte_tokenizer(), byte_tokenizer()
    assert corpus._tokenizer_identity(a) == corpus._tokenizer_identity(b)
    b.bos_token = EOS
    assert corpus._tokenizer_identity(a) != corpus._tokenizer_identity(b)
    c = byte_tokenizer()
    c.eos_token = "a"
    assert c.eos_token_id != a.eos_token_id and corpus._tokenizer_identity(a) != corpus._tokenizer_identity(c)
    f = corpus_file(tmp_path)
    assert corpus.prepare_corpus(f, a, tmp_path / "A").fingerprint != \
        corpus.prepare_corpus(f, c, tmp_path / "C").fingerprint


def test_crash_leaves_no_corpus_and_keeps_the_previous_one(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(corpus, "TOKENIZE_BATCH_DOCS", 2)  # several batches written before the crash
    f = corpus_file(tmp_path, n=20)
    crashing = CountingTokenizer(tok, fail_on="Document number 15")
    with pytest.raises(RuntimeError, match="simulated crash"):
        corpus.prepare_corpus(f, crashing, tmp_path / "fresh")
    assert crashing.calls > 3
    assert sorted(os.listdir(tmp_path)) == ["c.txt"]  # neither the corpus nor a temporary folder

    good = corpus.prepare_corpus(f, tok, tmp_path / "good")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in good.dir.iterdir()}
    write(f, f.read_text() + "\n\nDocument number 99 and more")
    with pytest.raises(RuntimeError, match="simulated crash"):
        corpus.prepare_corpus(f, CountingTokenizer(tok, fail_on="Document number 15"), tmp_path / "good")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in good.dir.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "good"]


def test_refuses_to_replace_a_folder_that_is_not_a_corpus(tmp_path, tok):
    f = corpus_file(tmp_path)
    precious = write(tmp_path / "home" / "notes.txt", "mine")
    with pytest.raises(TailkdError, match=r"refusing to replace .*home: it exists and is not a tailkd corpus"):
        corpus.prepare_corpus(f, tok, tmp_path / "home")
    assert precious.read_text() == "mine"


def test_cache_reuse_and_invalidation(tmp_path, tok):
    f = corpus_file(tmp_path / "src")
    root = tmp_path / "cache"
    counting = CountingTokenizer(tok)
    info = corpus.prepare_corpus_cached(f, counting, root, tokenizer_fingerprint="tok-A", heldout_fraction=0.1)
    assert counting.calls >= 1 and info.dir.parent == root and info.dir.name == info.fingerprint[:16]
    settings = {**corpus.DEFAULT_SETTINGS, "heldout_fraction": 0.1}
    assert info.fingerprint == corpus.corpus_fingerprint(f, "tok-A", settings)
    mtime = info.train_bin.stat().st_mtime_ns
    calls = counting.calls
    again = corpus.prepare_corpus_cached(f, counting, root, tokenizer_fingerprint="tok-A", heldout_fraction=0.1)
    assert again.dir == info.dir and counting.calls == calls  # not tokenised again
    assert again.train_bin.stat().st_mtime_ns == mtime

    # a changed file, a changed setting and another tokenizer each give a new folder
    write(f, f.read_text() + "\n\nA new closing document.")
    changed = corpus.prepare_corpus_cached(f, counting, root, tokenizer_fingerprint="tok-A", heldout_fraction=0.1)
    assert changed.dir != info.dir and counting.calls > calls
    assert changed.meta["train"]["docs"] + changed.meta["heldout"]["docs"] == 41
    other = corpus.prepare_corpus_cached(f, tok, root, tokenizer_fingerprint="tok-A", heldout_fraction=0.2)
    other_tok = corpus.prepare_corpus_cached(f, tok, root, tokenizer_fingerprint="tok-B", heldout_fraction=0.1)
    assert len({changed.dir, other.dir, other_tok.dir}) == 3
    # a damaged cache entry is rebuilt, not trusted
    with open(changed.train_bin, "ab") as fh:
        fh.write(b"\x00\x00\x00\x00")
    rebuilt = corpus.prepare_corpus_cached(f, tok, root, tokenizer_fingerprint="tok-A", heldout_fraction=0.1)
    assert rebuilt.dir == changed.dir and rebuilt.train_bin.stat().st_size == 4 * rebuilt.meta["train"]["tokens"]
    (rebuilt.dir / "meta.json").write_text(json.dumps({"format": corpus.FORMAT, "fingerprint": "x"}))
    with pytest.raises(TailkdError, match=r"does not match meta\.json; delete .* and prepare the corpus again"):
        corpus.load_corpus(rebuilt.dir)
    assert corpus.prepare_corpus_cached(f, tok, root, tokenizer_fingerprint="tok-A", heldout_fraction=0.1).meta == \
        corpus.load_corpus(rebuilt.dir).meta
    with pytest.raises(TypeError, match="unknown corpus setting"):
        corpus.prepare_corpus_cached(f, tok, root, tokenizer_fingerprint="tok-A", seq_len=4)


@pytest.mark.parametrize("damage", [
    lambda meta: json.dumps([meta]),  # not an object: an AttributeError
    lambda meta: "[" * 100_000 + "]" * 100_000,  # nested past Python's parser: a RecursionError
    lambda meta: json.dumps({k: v for k, v in meta.items() if k != "fingerprint"}),  # a KeyError
    lambda meta: json.dumps({**meta, "eos_id": "x"}),  # "'bool' object has no attribute 'long'" at the first batch
    lambda meta: json.dumps({**meta, "sha256": "x"}),  # an AttributeError
])
def test_a_damaged_corpus_meta_is_refused_and_prepared_again(tmp_path, tok, damage):
    """A prepared corpus whose meta.json is not an object, is nested past Python's parser or holds a field of another
    type is refused by load_corpus, and the cache prepares it again, as it does an unreadable one; each was a
    traceback (exit 1) of the run that found it in its data.cache_dir."""
    f = corpus_file(tmp_path / "src")
    root = tmp_path / "cache"
    info = corpus.prepare_corpus_cached(f, tok, root, tokenizer_fingerprint="tok-A")
    meta = info.dir / "meta.json"
    good = json.loads(meta.read_text())
    meta.write_text(damage(good))
    with pytest.raises(TailkdError, match=r"prepare (it|the corpus) again$"):
        corpus.load_corpus(info.dir)
    again = corpus.prepare_corpus_cached(f, tok, root, tokenizer_fingerprint="tok-A")
    assert again.dir == info.dir
    assert {k: v for k, v in again.meta.items() if k != "created_unix"} == \
        {k: v for k, v in good.items() if k != "created_unix"}


def test_a_corpus_of_another_format_is_prepared_again(tmp_path, tok):
    f = corpus_file(tmp_path / "src")
    root = tmp_path / "cache"
    info = corpus.prepare_corpus_cached(f, tok, root, tokenizer_fingerprint="tok-A")
    meta = json.loads((info.dir / "meta.json").read_text())
    (info.dir / "meta.json").write_text(json.dumps({**meta, "format": "tailkd-corpus-1"}))
    with pytest.raises(TailkdError, match=rf"^{info.dir} was written in format 'tailkd-corpus-1', not "
                                          rf"{corpus.FORMAT}; prepare it again$"):
        corpus.load_corpus(info.dir)
    again = corpus.prepare_corpus_cached(f, tok, root, tokenizer_fingerprint="tok-A")
    assert again.dir == info.dir and again.meta["format"] == corpus.FORMAT
    # a complete corpus in the folder of this fingerprint's first 16 digits, of another fingerprint, is not reused
    (info.dir / "meta.json").write_text(json.dumps({**meta, "fingerprint": info.fingerprint[:16] + "0" * 48}))
    assert corpus.prepare_corpus_cached(f, tok, root, tokenizer_fingerprint="tok-A").fingerprint == info.fingerprint


def test_a_folder_without_a_meta_json_is_not_a_prepared_corpus(tmp_path):
    """load_corpus on a folder without meta.json (or one it cannot read) is its one line, as for a damaged one, not a
    FileNotFoundError traceback."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(TailkdError, match=r"^.*empty is not a prepared corpus \(no readable meta\.json\); prepare it "
                                          r"again$"):
        corpus.load_corpus(tmp_path / "empty")


def test_fingerprint_follows_the_order_of_paths(tmp_path):
    a, b = write(tmp_path / "a.txt", "a"), write(tmp_path / "b.txt", "b")
    fp = corpus.corpus_fingerprint([a, b], "t", corpus.DEFAULT_SETTINGS)
    assert fp == corpus.corpus_fingerprint([a, b], "t", dict(corpus.DEFAULT_SETTINGS))
    assert fp != corpus.corpus_fingerprint([b, a], "t", corpus.DEFAULT_SETTINGS)  # different row contents
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 1000))
    assert fp != corpus.corpus_fingerprint([a, b], "t", corpus.DEFAULT_SETTINGS)


# --------------------------------------------------------------------------- packed rows


def token_file(tmp_path, tokens, name="t.bin"):
    path = tmp_path / name
    np.asarray(tokens, dtype=np.uint32).tofile(path)
    return path


@settings(max_examples=40, deadline=None, derandomize=True)
@given(tokens=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=60), seq_len=st.integers(1, 9))
def test_rows_are_the_stream_shifted_once(tmp_path_factory, tokens, seq_len):
    tmp = tmp_path_factory.mktemp("rows")
    if len(tokens) < seq_len + 1:
        with pytest.raises(TailkdError, match="--seq-len"):
            data.PackedRows(token_file(tmp, tokens), seq_len, eos_id=0)
        return
    rows = data.PackedRows(token_file(tmp, tokens), seq_len, eos_id=0)
    assert len(rows) == (len(tokens) - 1) // seq_len
    stream = []
    for i in range(len(rows)):
        r = rows[i]
        assert all(v.shape == (seq_len,) and v.dtype == torch.int64 for v in r.values())
        assert r["input_ids"].tolist() == tokens[i * seq_len:(i + 1) * seq_len]
        assert r["labels"].tolist() == tokens[i * seq_len + 1:(i + 1) * seq_len + 1]
        assert set(r) == {"input_ids", "labels", "segment_ids"}  # no position ids: the model numbers 0..T-1 itself
        if i + 1 < len(rows):
            assert r["labels"][-1] == rows[i + 1]["input_ids"][0]  # across the row boundary
        stream += r["input_ids"].tolist()
    assert stream + [int(rows[len(rows) - 1]["labels"][-1])] == tokens[:len(rows) * seq_len + 1]
    # segment ids: the number of EOS (id 0) strictly before each position within the row
    for i in range(len(rows)):
        x = rows[i]["input_ids"].tolist()
        assert rows[i]["segment_ids"].tolist() == [sum(t == 0 for t in x[:j]) for j in range(seq_len)]


def test_segment_ids_increment_right_after_eos(tmp_path):
    E = 9
    path = token_file(tmp_path, [1, 2, E, 3, E, E, 4, 5, 6, E, 7, 8, 1])
    rows = data.PackedRows(path, 6, eos_id=E)
    assert rows[0]["input_ids"].tolist() == [1, 2, E, 3, E, E]
    assert rows[0]["segment_ids"].tolist() == [0, 0, 0, 1, 1, 2]
    assert rows[1]["input_ids"].tolist() == [4, 5, 6, E, 7, 8]
    assert rows[1]["segment_ids"].tolist() == [0, 0, 0, 0, 1, 1]  # restarts at 0 in every row
    assert rows[-1]["labels"].tolist() == [5, 6, E, 7, 8, 1]
    assert (rows[0]["labels"] != data.IGNORE_INDEX).all()
    with pytest.raises(IndexError):
        rows[2]


def test_rows_read_eos_from_meta_and_pickle(tmp_path, tok):
    info = corpus.prepare_corpus(corpus_file(tmp_path), tok, tmp_path / "out")
    rows = data.PackedRows(info.train_bin, 16)
    assert rows.eos_id == 256
    first = rows[3]
    clone = pickle.loads(pickle.dumps(rows))
    assert clone._tokens is None and all(torch.equal(first[k], clone[3][k]) for k in first)
    seg, x = first["segment_ids"], first["input_ids"]
    after_eos = torch.nonzero(x[:-1] == 256).flatten() + 1
    assert (seg[after_eos] == seg[after_eos - 1] + 1).all()


def test_too_small_corpus_names_seq_len(tmp_path):
    path = token_file(tmp_path, [1, 2, 3, 4])
    with pytest.raises(TailkdError, match=r"holds 4 tokens, fewer than one row of --seq-len 8 needs \(9\); "
                                          r"use a --seq-len of at most 3 or more data"):
        data.PackedRows(path, 8, eos_id=0)
    held = token_file(tmp_path, [1, 2, 3], name="heldout.bin")
    with pytest.raises(TailkdError, match=r"at most 2 or more data or a larger data\.heldout_fraction"):
        data.PackedRows(held, 4, eos_id=0)
    with pytest.raises(TailkdError, match=r"no meta\.json next to"):
        data.PackedRows(path, 2)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(TailkdError, match="not a flat uint32 token file"):
        data.PackedRows(tmp_path / "odd.bin", 1, eos_id=0)


def test_check_seq_len():
    data.check_seq_len(128, 128)
    data.check_seq_len(4096, None)
    with pytest.raises(TailkdError, match=r"--seq-len 2048 exceeds the model's maximum context of 1024 tokens; "
                                          r"use --seq-len 1024 or less"):
        data.check_seq_len(2048, 1024)
    with pytest.raises(TailkdError, match="positive"):
        data.check_seq_len(0, 1024)
    for bad in (True, 4.0, "8"):  # a YAML `yes` is a bool, which Python counts as the int 1: not a length
        with pytest.raises(TailkdError, match=rf"^--seq-len must be a positive whole number of tokens, got {bad!r}$"):
            data.check_seq_len(bad, 1024)


def test_packed_rows_refuse_a_seq_len_that_is_no_whole_number(tmp_path):
    path = token_file(tmp_path, list(range(10)))
    for bad in (True, 0, -2, 2.0):
        with pytest.raises(TailkdError, match=rf"^--seq-len must be a positive whole number of tokens, got {bad!r}$"):
            data.PackedRows(path, bad, eos_id=0)


def test_a_rows_tensors_are_its_own(tmp_path):
    """input_ids and labels are one slice of the token stream shifted by one; each row's tensors own their memory,
    so that a caller writing into labels (masking a prompt, say) leaves input_ids as they were."""
    rows = data.PackedRows(token_file(tmp_path, list(range(10))), 4, eos_id=None)
    row = rows[0]
    row["labels"][:2] = data.IGNORE_INDEX
    row["input_ids"][3] = 99
    assert row["input_ids"].tolist() == [0, 1, 2, 99] and row["labels"].tolist() == [-100, -100, 3, 4]
    assert rows[0]["input_ids"].tolist() == [0, 1, 2, 3] and rows[0]["labels"].tolist() == [1, 2, 3, 4]


def test_collate_and_batches_refuse_nothing_to_stack(tmp_path):
    with pytest.raises(ValueError, match="^collate needs at least one row$"):
        data.collate([])
    rows = data.PackedRows(token_file(tmp_path, list(range(10))), 3, eos_id=0)
    for bad in (0, -1):
        with pytest.raises(TailkdError, match=rf"^batch size must be at least 1, got {bad}$"):
            next(data.batches(rows, data.RowSampler(len(rows), seed=0), bad))
    with pytest.raises(TailkdError, match=r"^no training rows to sample; use a smaller --seq-len or more data$"):
        data.RowSampler(0, seed=0)


# --------------------------------------------------------------------------- sampling


def test_sampler_epochs_are_seeded_permutations():
    s = data.RowSampler(10, seed=3)
    first, second = [next(s) for _ in range(10)], [next(s) for _ in range(10)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert first == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert second == torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()
    assert s.state_dict() == {"epoch": 2, "position": 0, "seed": 3, "num_rows": 10, "shuffle": True, "digest": None}
    again = data.RowSampler(10, seed=3)
    assert [next(again) for _ in range(20)] == first + second
    plain = data.RowSampler(4, seed=0, shuffle=False)
    assert [next(plain) for _ in range(6)] == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("consumed", [0, 3, 6, 7, 8, 20])
def test_sampler_resumes_exactly(consumed):
    a = data.RowSampler(7, seed=11)
    for _ in range(consumed):
        next(a)
    state = a.state_dict()
    b = data.RowSampler(7, seed=999)  # the saved seed wins
    b.load_state_dict(state)
    assert [next(b) for _ in range(25)] == [next(a) for _ in range(25)]  # across epoch boundaries


def test_sampler_refuses_a_saved_position_outside_the_epoch():
    """A saved position past the last row (or negative: a damaged trainer.pt) is one line naming it, not an
    IndexError at the first draw or a silent wrap to the end of the epoch."""
    for position in (7, -1):
        state = {**data.RowSampler(7, seed=0).state_dict(), "position": position}
        with pytest.raises(TailkdError, match=rf"saved sampler position {position} is outside 0..6"):
            data.RowSampler(7, seed=0).load_state_dict(state)


def test_a_sampler_that_has_drawn_continues_from_the_state_it_loads():
    """load_state_dict into a sampler that has drawn already (its epoch's order made) continues the loaded state, as
    a new sampler does, not the order of its own epoch."""
    saved = data.RowSampler(7, seed=11)
    for _ in range(10):  # epoch 1, position 3
        next(saved)
    used = data.RowSampler(7, seed=11)
    next(used)  # epoch 0's order made
    used.load_state_dict(saved.state_dict())
    assert [next(used) for _ in range(10)] == [next(saved) for _ in range(10)]


def test_sampler_refuses_a_changed_corpus():
    a = data.RowSampler(7, seed=0)
    next(a)
    with pytest.raises(TailkdError, match=r"num_rows=7, this run 9: the training corpus or --seq-len changed"):
        data.RowSampler(9, seed=0).load_state_dict(a.state_dict())
    with pytest.raises(TailkdError, match=r"^the saved data order has shuffle=True, this run False: "):
        data.RowSampler(7, seed=0, shuffle=False).load_state_dict(a.state_dict())


def test_packed_rows_digest_follows_their_tokens(tmp_path, tok):
    docs = [f"Document number {i}: some words about item {i * 7}." for i in range(40)]
    a = write(tmp_path / "a.txt", "\n\n".join(docs))
    b = write(tmp_path / "b.txt", "\n\n".join(reversed(docs)))  # the same documents (and split) in another order
    ia = corpus.prepare_corpus(a, tok, tmp_path / "A", heldout_fraction=0.25)
    ia2 = corpus.prepare_corpus(a, tok, tmp_path / "A2", heldout_fraction=0.25)
    ib = corpus.prepare_corpus(b, tok, tmp_path / "B", heldout_fraction=0.25)
    ra, ra2, rb = (data.PackedRows(i.train_bin, 8) for i in (ia, ia2, ib))
    assert len(ra) == len(rb) and not np.array_equal(ra.tokens, rb.tokens)
    assert ra.digest == ra2.digest and ra.digest != rb.digest and len(ra.digest) == 64
    assert data.PackedRows(ia.train_bin, 9).digest != ra.digest  # rows of another length
    assert data.PackedRows(ia.train_bin, 8, eos_id=None).digest != ra.digest  # other segment_ids: one document
    meta = json.loads((tmp_path / "A2" / "meta.json").read_text())
    del meta["sha256"]  # a corpus tokenised before the digest was recorded: unknown, not checked
    (tmp_path / "A2" / "meta.json").write_text(json.dumps(meta))
    assert data.PackedRows(ia2.train_bin, 8).digest is None


def test_content_digest_tells_apart_what_rows_of_other_content_would_be():
    """A row source's digest (`PackedRows`, `SFTRows`) changes with any change to the content of its rows; parts
    equal as data give equal digests."""
    d = data.content_digest
    a = np.arange(6, dtype=np.int32)
    assert d(a) == d(a.copy()) and len(d(a)) == 64
    assert d(a) != d(a.reshape(2, 3)) and d(a) != d(a.view(np.uint32))  # the same bytes, another shape / dtype
    assert d(a) != d(np.arange(1, 7, dtype=np.int32)) and d(a) != d(a[::-1].copy())  # other values, every element
    assert d(a[::2]) == d(np.ascontiguousarray(a[::2]))  # a strided view hashes its elements, not its buffer
    assert d([[1, 2], [3]]) != d([[1], [2, 3]]) and d([[], [1]]) != d([[1], []])  # the grouping is content
    assert d({"a": 1, "b": 2}) == d({"b": 2, "a": 1})  # a dict is its items, whatever their insertion order
    assert d({"a": 1}) != d({"b": 1}) and d({"a": 1, "b": 2}) != d({"a": 2, "b": 1})  # keys are content
    assert d(1) != d("1") and d(None) != d("None") and d([1]) != d(1)  # JSON values by type


def test_sampler_refuses_rows_whose_content_changed_unless_forced():
    a = data.RowSampler(7, seed=0, digest="aaaa")
    next(a)
    with pytest.raises(TailkdError, match=r"^the training rows differ from the checkpoint's: .* --force to continue"):
        data.RowSampler(7, seed=0, digest="bbbb").load_state_dict(a.state_dict())
    forced = data.RowSampler(7, seed=0, digest="bbbb", force=True)
    assert not forced.rows_changed
    forced.load_state_dict(a.state_dict())
    assert forced.rows_changed  # the trainer warns (tests/test_bad_input.py)
    assert [next(forced) for _ in range(3)] == [next(a) for _ in range(3)]  # the saved order continues
    assert forced.state_dict()["digest"] == "bbbb"  # the next resume compares with the new rows
    for saved, now in (("aaaa", None), (None, "bbbb")):  # unknown on either side (older corpus or checkpoint)
        old = data.RowSampler(7, seed=0, digest=saved)
        data.RowSampler(7, seed=0, digest=now).load_state_dict(old.state_dict())
    legacy = {k: v for k, v in a.state_dict().items() if k != "digest"}  # a checkpoint from before digests
    data.RowSampler(7, seed=0, digest="bbbb").load_state_dict(legacy)


def test_batches_resume_exactly(tmp_path):
    path = token_file(tmp_path, list(range(1, 60)))
    rows = data.PackedRows(path, 4, eos_id=0)  # 14 rows
    sampler = data.RowSampler(len(rows), seed=5)
    stream = data.batches(rows, sampler, 3)
    seen = [next(stream) for _ in range(6)]  # 18 rows: past the first epoch
    assert all(b["input_ids"].shape == (3, 4) and b["labels"].shape == (3, 4) for b in seen)
    assert torch.equal(seen[0]["labels"][:, :-1], seen[0]["input_ids"][:, 1:])
    state = sampler.state_dict()
    assert state["epoch"] == 1 and state["position"] == 4
    continued = [next(stream) for _ in range(5)]
    resumed = data.RowSampler(len(rows), seed=5)
    resumed.load_state_dict(state)
    fresh = data.batches(rows, resumed, 3)
    for want in continued:
        got = next(fresh)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_heldout_rows_in_order_with_a_last_small_batch(tmp_path):
    path = token_file(tmp_path, list(range(1, 33)))
    rows = data.PackedRows(path, 3, eos_id=0)  # 10 rows
    out = list(batched([rows[i] for i in range(len(rows))], 4))  # how `tailkd eval` batches held-out rows
    assert [b["input_ids"].shape[0] for b in out] == [4, 4, 2]
    assert torch.cat([b["input_ids"] for b in out]).flatten().tolist() == list(range(1, 31))


def test_a_file_edited_during_tokenisation_is_refused(tmp_path, tok):
    f = corpus_file(tmp_path, n=10)

    class EditingTokenizer(CountingTokenizer):
        def __call__(self, texts, **kw):
            if self.calls == 0:
                with open(f, "a", encoding="utf-8") as fh:
                    fh.write("\n\nwritten while tokenising")
            return super().__call__(texts, **kw)

    with pytest.raises(TailkdError, match=r"the data files changed while being tokenised.*run again"):
        corpus.prepare_corpus(f, EditingTokenizer(tok), tmp_path / "out")
    assert not (tmp_path / "out").exists()
