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


# --------------------------------------------------------------------------- one rule at a time, on a stand-in gym


def problem(question: str, answer="5", cot: str = "2 + 3 = 5\n#### 5") -> dict:
    """A gsm_symbolic-shaped item."""
    return {"question": question, "answer": answer, "metadata": {"answer_cot": cot}}


@pytest.fixture
def gym(monkeypatch):
    """reasoning-gym stood in by a generator whose first items of every seed are ``gym.items`` (set by the test),
    then distinct valid problems of that seed: which item draw_problems takes or skips is then known."""
    class Gym:
        items: list[dict] = []

        @classmethod
        def create_dataset(cls, name, *, seed, size):
            assert name == mathdata.DATASET
            return [*cls.items, *(problem(f"Problem {i} of seed {seed}?") for i in range(size))][:size]

    monkeypatch.setattr(mathdata, "_reasoning_gym", lambda: Gym)
    return Gym


def test_make_prompt_strips_the_question():
    assert mathdata.make_prompt("  How many?\n") == f"How many?\n{mathdata.INSTRUCTION}\n"


def test_an_item_is_valid_only_with_its_answer_on_its_own_last_line():
    """The solution must end in a line ``#### N`` whose number is the item's answer, and the question must not
    contain ``####`` (its prompt would then hold an answer line of its own)."""
    assert mathdata._valid(problem("Q?"))
    assert mathdata._valid(problem("Q?", answer=5, cot="2 + 3 = 5\n#### 5\n \n"))  # trailing blank lines are fine
    assert not mathdata._valid(problem("Q? #### 5"))
    assert not mathdata._valid(problem("Q?", cot="2 + 3 = 5 #### 5"))  # extracts to 5, but not on its own line
    assert not mathdata._valid(problem("Q?", answer="6"))
    assert not mathdata._valid(problem("Q?", answer="", cot="so\n#### many"))  # no number on either side: no match
    assert not mathdata._valid({"question": "Q?", "answer": "5", "metadata": {}})
    assert not mathdata._valid(problem(None))


def test_draw_problems_skips_repeats_excluded_and_invalid_items(gym):
    gym.items = [problem("A?"), problem("B?", answer=5, cot="1 + 4 = 5\n#### 5\n\n"), problem("A?"),
                 problem("C? #### 5"), problem("D?"), problem("E?")]
    out, skipped = mathdata.draw_problems(3, seed=7, exclude={"D?"})
    assert [x["question"] for x in out] == ["A?", "B?", "E?"]
    assert skipped == {"duplicate": 2, "invalid": 1}  # the second "A?" and the excluded "D?"; "C? #### 5"
    assert out[1] == {"question": "B?", "answer": "5", "solution": "1 + 4 = 5\n#### 5"}  # stripped, a string


def test_draw_problems_gives_up_after_max_tries(gym):
    assert len(mathdata.draw_problems(4, seed=0, max_tries=4)[0]) == 4
    with pytest.raises(TailkdError, match=r"gave only 4 distinct valid problems for seed 0 in 4 draws"):
        mathdata.draw_problems(5, seed=0, max_tries=4)


def test_a_corpus_document_has_no_blank_line_inside():
    """Blank lines separate the corpus's documents, so one made of spaces or tabs inside a solution goes too."""
    doc = mathdata._corpus_document({"question": " Q?\n", "solution": "a\n  \nb\n\t\n\n#### 5\n"})
    assert doc == "Q?\na\nb\n#### 5"


def test_a_count_that_is_a_bool_is_refused(tmp_path):
    with pytest.raises(TailkdError, match="n_train must be a positive whole number, got True"):
        mathdata.write_math_dataset(tmp_path / "m", n_train=True, n_heldout=5)
    assert not (tmp_path / "m").exists()


def test_a_dataset_missing_a_file_is_written_again(gym, tmp_path):
    files = mathdata.write_math_dataset(tmp_path / "m", n_train=3, n_heldout=2)
    corpus = files.corpus.read_text()
    files.corpus.unlink()
    assert mathdata.write_math_dataset(tmp_path / "m", n_train=3, n_heldout=2).corpus.read_text() == corpus


def test_a_dataset_of_another_format_is_replaced_only_with_overwrite(gym, tmp_path):
    files = mathdata.write_math_dataset(tmp_path / "m", n_train=3, n_heldout=2)
    meta_path = tmp_path / "m" / mathdata.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["settings"]["format"] = "tailkd-math-0"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TailkdError, match="holds a math dataset of another format; pass overwrite=True"):
        mathdata.write_math_dataset(tmp_path / "m", n_train=3, n_heldout=2)
    assert json.loads(meta_path.read_text())["settings"]["format"] == "tailkd-math-0"  # not touched
    assert mathdata.write_math_dataset(tmp_path / "m", n_train=3, n_heldout=2, overwrite=True) == files
    assert json.loads(meta_path.read_text())["settings"]["format"] == mathdata.FORMAT


def test_a_file_in_the_way_is_refused(gym, tmp_path):
    (tmp_path / "m").write_text("mine")
    with pytest.raises(TailkdError, match="refusing to write the math dataset into .*: it exists and is not"):
        mathdata.write_math_dataset(tmp_path / "m", n_train=3, n_heldout=2)
    assert (tmp_path / "m").read_text() == "mine"


def test_overwrite_never_replaces_a_folder_that_is_no_math_dataset(gym, tmp_path):
    """overwrite=True replaces a math dataset (a folder with its meta.json), not a folder of the user's nor a file:
    it did, deleting what was there."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "mine", tmp_path / "file"):
        with pytest.raises(TailkdError, match="refusing to write the math dataset into .*: it exists and is not"):
            mathdata.write_math_dataset(out, n_train=3, n_heldout=2, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert mathdata.write_math_dataset(tmp_path / "empty", n_train=3, n_heldout=2, overwrite=True).train.is_file()


@pytest.mark.parametrize("meta", ['{"settings": {"lr": 0.1}}', '{"run": 1}', "not json"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_users_folder_with_a_meta_json_of_its_own_is_neither_replaced_nor_called_damaged(gym, tmp_path, meta,
                                                                                            overwrite):
    """A folder of the user's holding a meta.json (and a train.jsonl) of its own is not a math dataset: refused as
    one, untouched. It was called damaged with the advice to delete it, and overwrite=True deleted it."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "meta.json").write_text(meta)
    (out / "train.jsonl").write_text('{"prompt": "mine", "response": "mine"}\n')
    with pytest.raises(TailkdError, match="refusing to write the math dataset into .*: it exists and is not"):
        mathdata.write_math_dataset(out, n_train=3, n_heldout=2, overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.jsonl"]
    assert (out / "meta.json").read_text() == meta


def test_default_math_dataset_keeps_one_folder_per_setting_in_the_cache_given(gym, tmp_path, monkeypatch):
    """Under ``<cache_dir>/math``; two settings of the seeds are two folders, neither rewriting the other."""
    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "default"))  # not the user's cache, should cache_dir be lost
    first = mathdata.default_math_dataset(tmp_path, n_train=3, n_heldout=2)
    assert first.train.parent.parent == tmp_path / "math"
    other = mathdata.default_math_dataset(tmp_path, n_train=3, n_heldout=2, heldout_seed=5)
    assert other.train.parent != first.train.parent
    meta = json.loads((first.train.parent / mathdata.META_FILE).read_text())
    assert meta["settings"]["heldout_seed"] == mathdata.DEFAULT_SEEDS["heldout_seed"]
