"""tailkd.mathdata: the offline GSM-style default (reasoning-gym), disjoint splits, answers that extract."""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import build_tiny_tokenizer

from tailkd import mathdata
from tailkd.answers import extract_answer, normalize_number
from tailkd.corpus import iter_documents
from tailkd.errors import TailkdError
from tailkd.sft import prepare_sft

pytest.importorskip("reasoning_gym", reason=f"needs {mathdata.RG_PIN}")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("math") / "gsm"
    return out, mathdata.write_math_dataset(out, n_train=60, n_heldout=20)


def test_files_and_format(small):
    out, files = small
    train, held = read_jsonl(files.train), read_jsonl(files.heldout)
    assert (len(train), len(held)) == (60, 20)
    for x in train + held:
        assert set(x) == {"prompt", "response", "answer"}
        question = x["prompt"].removesuffix("\n" + mathdata.INSTRUCTION + "\n")
        assert question != x["prompt"] and "####" not in question
        assert re.search(r"\n#### -?[\d.,]+\Z", x["response"]), x["response"][-40:]
        assert extract_answer(x["response"]) == normalize_number(x["answer"]) is not None
    meta = json.loads((out / mathdata.META_FILE).read_text())
    assert meta["train"] == 60 and meta["settings"]["reasoning_gym"] == mathdata._rg_version()


def test_train_and_heldout_share_no_question(small):
    _, files = small
    train = {x["prompt"] for x in read_jsonl(files.train)}
    held = {x["prompt"] for x in read_jsonl(files.heldout)}
    assert len(train) == 60 and len(held) == 20 and not train & held


def test_adjacent_seeds_overlap_in_reasoning_gym_but_not_in_our_files(tmp_path):
    import reasoning_gym

    def questions(seed, n):
        return {x["question"] for x in reasoning_gym.create_dataset("gsm_symbolic", seed=seed, size=n)}

    # item i of seed s is drawn from Random(s + i): seeds 1 and 2 share problems
    assert questions(1, 100) & questions(2, 100)
    files = mathdata.write_math_dataset(tmp_path / "m", n_train=100, n_heldout=100, train_seed=1, heldout_seed=2)
    train = {x["prompt"] for x in read_jsonl(files.train)}
    held = {x["prompt"] for x in read_jsonl(files.heldout)}
    assert len(train) == 100 and len(held) == 100 and not train & held
    meta = json.loads((tmp_path / "m" / mathdata.META_FILE).read_text())
    assert meta["skipped"]["train"]["duplicate"] >= 1


def test_corpus_holds_the_training_solutions_only(small):
    _, files = small
    docs = list(iter_documents([files.corpus]))  # the default doc_sep splits it by blank line
    train, held = read_jsonl(files.train), read_jsonl(files.heldout)
    assert len(docs) == len(train)
    for doc, x in zip(docs, train):
        assert doc.endswith(x["response"].splitlines()[-1]) and doc.startswith(x["prompt"].split("\n")[0][:40])
    text = files.corpus.read_text()
    assert not any(x["prompt"].split("\n")[0] in text for x in held)


def test_deterministic_and_reused(small, tmp_path):
    out, files = small
    before = {f: f.stat().st_mtime_ns for f in files}
    again = mathdata.write_math_dataset(out, n_train=60, n_heldout=20)
    assert again == files and {f: f.stat().st_mtime_ns for f in files} == before  # reused, not rewritten
    fresh = mathdata.write_math_dataset(tmp_path / "other", n_train=60, n_heldout=20)
    assert [p.read_text() for p in fresh] == [p.read_text() for p in files]
    bigger = mathdata.write_math_dataset(tmp_path / "other", n_train=70, n_heldout=20)  # other settings: rewritten
    assert len(read_jsonl(bigger.train)) == 70


def test_refuses_foreign_folders_and_bad_settings(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TailkdError, match="refusing"):
        mathdata.write_math_dataset(tmp_path / "mine", n_train=5, n_heldout=5)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(TailkdError, match="n_train"):
        mathdata.write_math_dataset(tmp_path / "x", n_train=0, n_heldout=5)
    with pytest.raises(TailkdError, match="different seeds"):
        mathdata.write_math_dataset(tmp_path / "x", n_train=5, n_heldout=5, train_seed=3, heldout_seed=3)


@pytest.mark.parametrize("text", ["[1]", '{"settings": "x"}', "[" * 100_000 + "]" * 100_000, b"\xff", ""])
def test_a_damaged_meta_json_is_one_line(small, tmp_path, text):
    """A math dataset folder whose meta.json is not an object (or its settings not one), is nested past Python's
    parser, is not UTF-8 or is empty: one line naming it and the fix. They were an AttributeError, a RecursionError,
    and '... holds a math dataset of another format; pass overwrite=True', which a CLI user cannot pass."""
    import shutil

    out, _ = small
    copy = tmp_path / "gsm"
    shutil.copytree(out, copy)
    meta = copy / mathdata.META_FILE
    meta.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TailkdError, match=rf"^{re.escape(str(meta))} is damaged \(.*\); delete {re.escape(str(copy))} "
                                          "to write the math dataset again$"):
        mathdata.write_math_dataset(copy, n_train=60, n_heldout=20)
    assert mathdata.write_math_dataset(copy, n_train=60, n_heldout=20, overwrite=True).train.is_file()


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` raise ImportError
    with pytest.raises(TailkdError, match=re.escape(mathdata.RG_INSTALL)):
        mathdata.write_math_dataset(tmp_path / "m", n_train=5, n_heldout=5)
    assert not (tmp_path / "m").exists()


def test_feeds_prepare_sft(small):
    _, files = small
    tok = build_tiny_tokenizer()
    _, held, info = prepare_sft([files.train], tok, seq_len=2048, chat_template=None,
                                    heldout_paths=[files.heldout])
    assert info["train"]["examples"] == 60 and info["heldout"]["examples"] == 20
    assert info["train"]["truncated"] == 0 and info["dropped_train_overlap"] == 0
    answers = [x["answer"] for x in read_jsonl(files.heldout)]
    assert [extract_answer(e.reference) for e in held.examples] == [normalize_number(a) for a in answers]
