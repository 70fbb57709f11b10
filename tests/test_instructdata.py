"""tailkd.instructdata and ``--data builtin:instruct``: AlpacaEval's instructions (the ``instruct`` asset, copied out of
the alpaca-eval sdist) as prompt/response SFT data with a fixed held-out split. No network: the asset is faked."""

import dataclasses
import hashlib
import io
import json
import random
import tarfile
import zipfile

import pytest

from tailkd import assets, install, instructdata
from tailkd.config import DataConfig
from tailkd.data import IGNORE_INDEX
from tailkd.errors import TailkdError
from tailkd.sft import setup_sft_rows, sft_rows_to_prompts

MEMBER = "alpaca_eval-0.6.6/example/outputs.json"


def records(n: int = 30) -> list[dict]:
    """AlpacaEval-shaped records; record i's answer has i + 1 words (so the word filter has work)."""
    return [{"instruction": f"Name thing number {i}.", "output": " ".join(["word"] * (i + 1)), "generator": "example",
             "dataset": ["koala", "oasst"][i % 2], "datasplit": "eval"} for i in range(n)]


def sdist(path, data: bytes, member: str = MEMBER):
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    """The instruct asset installed from a tiny fake sdist (its SHA-256 pinned in place of the real one) into a
    temporary share/tailkd; returns the record list."""
    recs = records()
    blob = json.dumps(recs).encode()
    real = assets.ASSETS["instruct"]
    monkeypatch.setitem(assets.ASSETS, "instruct",
                        dataclasses.replace(real, sha256=(hashlib.sha256(blob).hexdigest(),)))
    share = tmp_path / "share"
    monkeypatch.setattr(assets, "assets_dir", lambda: share)
    monkeypatch.setattr(assets, "_in_package", lambda asset: None)
    install.install(["instruct"], archives=[sdist(tmp_path / "alpaca_eval-0.6.6.tar.gz", blob)], root=share)
    return recs


# --------------------------------------------------------------------------- the asset row


def test_the_asset_row_pins_the_sdist_member():
    a = assets.ASSETS["instruct"]
    assert (a.pin, a.members, a.sdist) == ("alpaca-eval==0.6.6", ("example/outputs.json",), True)
    assert len(a.sha256) == 1 and len(a.sha256[0]) == 64


def test_a_file_with_other_bytes_is_refused_and_not_kept(tmp_path):
    bad = sdist(tmp_path / "alpaca_eval-0.6.6.tar.gz", json.dumps(records()).encode())
    with pytest.raises(TailkdError, match=r"outputs\.json in .* is not the expected file \(SHA-256"):
        install.extract("instruct", bad, tmp_path / "share")
    assert not any(p.is_file() for p in (tmp_path / "share").rglob("*"))  # no half or wrong copy left


def test_the_wheel_does_not_hold_it_and_says_so(tmp_path):
    wheel = tmp_path / "alpaca_eval-0.6.6-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("alpaca_eval/__init__.py", "")
    with pytest.raises(TailkdError, match=r"only its sdist, alpaca_eval-0\.6\.6\.tar\.gz"):
        install.extract("instruct", wheel, tmp_path / "share")


def test_given_both_archives_the_sdist_is_used(tmp_path, fake_asset, monkeypatch):
    blob = json.dumps(fake_asset).encode()
    wheel = tmp_path / "alpaca_eval-0.6.6-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("alpaca_eval/__init__.py", "")
    src = sdist(tmp_path / "alpaca_eval-0.6.6.tar.gz", blob)
    path = install.install(["instruct"], archives=[wheel, src], root=tmp_path / "other")["instruct"][0]
    assert path.read_bytes() == blob and path.name == "outputs.json"


def test_the_download_asks_pip_for_the_sdist(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        sdist(tmp_path / "alpaca_eval-0.6.6.tar.gz", b"[]")

        class Done:
            returncode, stderr = 0, ""
        return Done()

    monkeypatch.setattr(install.subprocess, "run", fake_run)
    assert install.download(assets.ASSETS["instruct"], tmp_path).name == "alpaca_eval-0.6.6.tar.gz"
    cmd = seen["cmd"]
    assert cmd[cmd.index("--no-binary") + 1] == "alpaca-eval" and cmd[-1] == "alpaca-eval==0.6.6"
    assert "--no-deps" in cmd


# --------------------------------------------------------------------------- conversion


def test_split_is_fixed_disjoint_and_independent_of_order_and_filter():
    recs = records(40)
    train, held, counts = instructdata.split_and_filter(recs, heldout=8, max_words=0)
    assert (len(train), len(held), counts["pairs"], counts["kept"]) == (32, 8, 40, 40)
    names = {r["instruction"] for r in held}
    assert not names & {r["instruction"] for r in train}
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    assert {r["instruction"] for r in instructdata.split_and_filter(shuffled, heldout=8, max_words=0)[1]} == names
    # the filter drops pairs on both sides and moves none across: held-out stays a subset of the same 8
    train_f, held_f, c = instructdata.split_and_filter(recs, heldout=8, max_words=24)
    assert {r["instruction"] for r in held_f} <= names and not {r["instruction"] for r in train_f} & names
    assert all(instructdata.words(r) <= 24 for r in train_f + held_f)
    kept = sum(instructdata.words(r) <= 24 for r in recs)  # 4-word instruction + i + 1 answer words
    assert kept == 20 and c["kept"] == kept == len(train_f) + len(held_f)
    assert c["train"]["dropped"] + c["heldout"]["dropped"] == 40 - kept
    assert [r["instruction"] for r in train_f] == [r["instruction"] for r in recs if r in train_f]  # file order


def test_bad_settings_and_files(tmp_path):
    with pytest.raises(TailkdError, match="instruct_heldout=30 leaves none"):
        instructdata.split_and_filter(records(30), heldout=30)
    with pytest.raises(TailkdError, match="data.instruct_max_words must be"):
        instructdata.split_and_filter(records(30), max_words=-1)
    with pytest.raises(TailkdError, match="no train pair has at most"):
        instructdata.split_and_filter(records(30), heldout=3, max_words=2)
    bad = tmp_path / "outputs.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a ", "output": "c"}]))
    with pytest.raises(TailkdError, match="record 1 repeats an instruction"):
        instructdata.read_outputs(bad)
    bad.write_text('{"instruction": "a"}')
    with pytest.raises(TailkdError, match="not a JSON list"):
        instructdata.read_outputs(bad)
    bad.write_text("[" * 100_000 + "]" * 100_000)  # nested past Python's parser: a RecursionError before
    with pytest.raises(TailkdError, match=r"is not a readable JSON file \(nested too deeply to read\)"):
        instructdata.read_outputs(bad)


def test_write_converts_reuses_and_refuses_foreign_folders(tmp_path):
    src = tmp_path / "outputs.json"
    recs = records(30)
    recs[0]["instruction"], recs[0]["output"] = "  Say hi. ", "\nHi there!  "
    src.write_text(json.dumps(recs))
    files = instructdata.write_instruct_dataset(src, tmp_path / "out", heldout=5, max_words=0)
    lines = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    assert len(lines) == 30 and set(lines[0]) == {"prompt", "response", "source"}
    first = next(x for x in lines if x["prompt"].startswith("Say"))
    assert (first["prompt"], first["response"]) == ("Say hi.\n", "Hi there!")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["settings"]["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (meta["train"]["kept"], meta["heldout"]["kept"]) == (25, 5)
    stamp = files.train.stat().st_mtime_ns
    assert instructdata.write_instruct_dataset(src, tmp_path / "out", heldout=5, max_words=0) == files
    assert files.train.stat().st_mtime_ns == stamp  # reused, not rewritten
    instructdata.write_instruct_dataset(src, tmp_path / "out", heldout=6, max_words=0)  # other settings: rewritten
    assert len(files.heldout.read_text().splitlines()) == 6
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(TailkdError, match="not a tailkd instruction dataset"):
        instructdata.write_instruct_dataset(src, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"
    (tmp_path / "out" / "meta.json").write_text("[" * 100_000 + "]" * 100_000)  # as any damaged meta.json (it
    with pytest.raises(TailkdError, match="not a tailkd instruction dataset"):  # was a RecursionError, exit 1)
        instructdata.write_instruct_dataset(src, tmp_path / "out", heldout=6, max_words=0)


def test_read_outputs_refuses_an_empty_list_and_a_record_without_an_answer(tmp_path):
    bad = tmp_path / "outputs.json"
    bad.write_text("[]")
    with pytest.raises(TailkdError, match="not a JSON list of instructions"):
        instructdata.read_outputs(bad)
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(TailkdError, match='record 1 has no "instruction" and "output" strings'):
        instructdata.read_outputs(bad)


def test_the_source_of_a_pair_is_always_a_string(tmp_path):
    src = tmp_path / "outputs.json"
    src.write_text(json.dumps([{"instruction": "a", "output": "b", "dataset": 3}, {"instruction": "c", "output": "d"}]))
    assert [r["dataset"] for r in instructdata.read_outputs(src)] == ["3", ""]


def test_the_heldout_pairs_are_those_of_the_smallest_salted_hash():
    """The documented rule (sha256 of "tailkd-instruct\\n" + the stripped instruction) computed here, so the split
    cannot move unnoticed where the real asset is not installed; spaces around an instruction do not move it."""
    recs = records(40)

    def key(r):
        return hashlib.sha256(f"tailkd-instruct\n{r['instruction'].strip()}".encode()).digest()

    want = sorted(recs, key=key)[:8]
    held = instructdata.split_and_filter(recs, heldout=8, max_words=0)[1]
    assert held == [r for r in recs if r in want]  # in file order
    padded = [{**r, "instruction": f"  {r['instruction']}\n"} for r in recs]
    held_padded = instructdata.split_and_filter(padded, heldout=8, max_words=0)[1]
    assert [r["instruction"].strip() for r in held_padded] == [r["instruction"] for r in held]


def test_a_setting_that_is_a_bool_is_refused():
    with pytest.raises(TailkdError, match="data.instruct_heldout must be a whole number >= 1, got True"):
        instructdata.split_and_filter(records(30), heldout=True)


def test_a_pair_with_an_empty_answer_is_dropped_even_when_all_are_kept():
    recs = records(30)
    held = instructdata.split_and_filter(recs, heldout=5, max_words=0)[1]
    blank = {held[0]["instruction"], next(r for r in recs if r not in held)["instruction"]}  # one on each side
    recs = [{**r, "output": " \n"} if r["instruction"] in blank else r for r in recs]
    train, held, counts = instructdata.split_and_filter(recs, heldout=5, max_words=0)
    assert (counts["train"], counts["heldout"]) == ({"kept": 24, "dropped": 1}, {"kept": 4, "dropped": 1})
    assert not blank & {r["instruction"] for r in train + held}


def test_a_filter_that_leaves_no_heldout_pair_is_refused():
    recs = records(30)
    held = {r["instruction"] for r in instructdata.split_and_filter(recs, heldout=5, max_words=0)[1]}
    recs = [{**r, "output": "word " * 50} if r["instruction"] in held else r for r in recs]
    with pytest.raises(TailkdError, match="no heldout pair has at most data.instruct_max_words=40 words"):
        instructdata.split_and_filter(recs, heldout=5, max_words=40)  # every training pair fits


def test_a_reused_folder_missing_a_file_is_written_again(tmp_path):
    src = tmp_path / "outputs.json"
    recs = records(30)
    src.write_text(json.dumps(recs))
    files = instructdata.write_instruct_dataset(src, tmp_path / "out", heldout=5, max_words=0)
    held = files.heldout.read_text()
    files.heldout.unlink()
    assert instructdata.write_instruct_dataset(src, tmp_path / "out", heldout=5, max_words=0).heldout.read_text() \
        == held
    lines = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    source = {f"{r['instruction']}\n": r["dataset"] for r in recs}
    assert [x["source"] for x in lines] == [source[x["prompt"]] for x in lines]  # each pair's AlpacaEval subset


def test_another_tailkd_dataset_or_a_file_in_the_way_is_refused(tmp_path):
    """A folder of the math set (a tailkd dataset, but not an instruction one) and a file where the folder should be
    are never replaced."""
    src = tmp_path / "outputs.json"
    src.write_text(json.dumps(records(30)))
    math = tmp_path / "math"
    math.mkdir()
    (math / "meta.json").write_text(json.dumps({"settings": {"format": "tailkd-math-1"}}))
    (math / "train.jsonl").write_text("mine\n")
    (tmp_path / "file").write_text("mine")
    for out in (math, tmp_path / "file"):
        with pytest.raises(TailkdError, match="it exists and is not a tailkd instruction dataset"):
            instructdata.write_instruct_dataset(src, out, heldout=5, max_words=0)
    assert (math / "train.jsonl").read_text() == "mine\n" and (tmp_path / "file").read_text() == "mine"


def test_default_instruct_dataset_converts_the_source_given_into_the_cache_given(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "assets_dir", lambda: tmp_path / "empty")  # no installed asset to fall back on
    monkeypatch.setattr(assets, "_in_package", lambda asset: None)
    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "default"))  # not the user's cache, should cache_dir be lost
    src = tmp_path / "outputs.json"
    src.write_text(json.dumps(records(30)))
    files = instructdata.default_instruct_dataset(tmp_path / "cache", heldout=3, max_words=10, source=src)
    assert files.train.parent.parent == tmp_path / "cache" / "instruct"
    meta = json.loads((files.train.parent / "meta.json").read_text())
    assert (meta["settings"]["heldout"], meta["settings"]["max_words"], meta["kept"]) == (3, 10, 6)  # i + 5 <= 10


# --------------------------------------------------------------------------- builtin:instruct in tailkd


def sft_config(tmp_path, **kw) -> DataConfig:
    return DataConfig(task="sft", paths=["builtin:instruct"], cache_dir=str(tmp_path / "cache"), seq_len=256,
                      instruct_heldout=5, instruct_max_words=0, **kw)


def test_builtin_instruct_rows_label_only_the_responses(tmp_path, fake_asset, tiny_tokenizer):
    cfg = sft_config(tmp_path)
    train, held, info = setup_sft_rows(cfg, tiny_tokenizer, tmp_path / "cache")
    assert (len(train.examples), len(held.examples), info["rendering"]) == (25, 5, "plain")
    by_prompt = {f"{r['instruction']}\n": r["output"] for r in fake_asset}
    eos = tiny_tokenizer.eos_token
    for rows in (train, held):
        for i, e in enumerate(rows.examples):
            row = rows[i]
            labelled = row["labels"][row["labels"] != IGNORE_INDEX]
            assert tiny_tokenizer.decode(labelled) == by_prompt[e.prompt] + eos  # the response + EOS, nothing else
            n_prompt = len(tiny_tokenizer(e.prompt, add_special_tokens=False)["input_ids"])
            assert (row["labels"][: n_prompt - 1] == IGNORE_INDEX).all()
    assert not {e.prompt for e in train.examples} & {e.prompt for e in held.examples}
    # the cached files are the split of instructdata, and a second setup gives the same rows
    want = instructdata.split_and_filter(fake_asset, heldout=5, max_words=0)[1]
    assert [e.prompt for e in held.examples] == [f"{r['instruction']}\n" for r in want]
    again = setup_sft_rows(cfg, tiny_tokenizer, tmp_path / "cache")[1]
    assert [again[i]["input_ids"].tolist() for i in range(5)] == [held[i]["input_ids"].tolist() for i in range(5)]
    prompts, refs = sft_rows_to_prompts(held)
    assert prompts == [e.prompt for e in held.examples] and refs == [r["output"] for r in want]


def test_eval_generate_of_such_a_run_decodes_its_heldout_split(tmp_path, fake_asset, tiny_tokenizer):
    """tailkd eval --generate builds its examples through setup_sft_rows, so builtin:instruct needs nothing there."""
    from tailkd.command_config import EvalConfig
    from tailkd.commands import generation_examples

    cfg = EvalConfig(data=sft_config(tmp_path))
    held, template = generation_examples(cfg, tiny_tokenizer)
    assert template is None and [e.reference for e in held.examples] == \
        [r["output"] for r in instructdata.split_and_filter(fake_asset, heldout=5, max_words=0)[1]]


def test_heldout_files_replace_the_builtin_split(tmp_path, fake_asset, tiny_tokenizer):
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"prompt": "Name thing number 0.\n", "response": "zero"}) + "\n")
    train, held, info = setup_sft_rows(sft_config(tmp_path, heldout_paths=[str(mine)]), tiny_tokenizer,
                                       tmp_path / "cache")
    assert [e.response for e in held.examples] == ["zero"]
    assert "Name thing number 0.\n" not in {e.prompt for e in train.examples}


def test_unknown_builtin_and_pretrain_use_are_one_line_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(TailkdError, match="unknown built-in data 'builtin:nope'.*builtin:instruct"):
        setup_sft_rows(DataConfig(task="sft", paths=["builtin:nope"]), tiny_tokenizer, tmp_path)
    with pytest.raises(TailkdError, match="builtin:instruct is prompt/response data, read only with data.task sft"):
        DataConfig(paths=["builtin:instruct"]).check_builtin_paths()
    DataConfig(paths=["builtin:instruct"], task="sft").check_builtin_paths()
    DataConfig(paths=["builtin:math"]).check_builtin_paths()
    # constructing one is no error: lm-eval omits data.task and reads a run's data section on its own
    from tailkd.command_config import LmEvalConfig
    from tailkd.config import from_dict

    assert from_dict(LmEvalConfig, {"data": {"paths": ["builtin:instruct"]}}).data.paths == ["builtin:instruct"]


def test_not_installed_names_the_install_command(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setattr(assets, "assets_dir", lambda: tmp_path / "empty")
    monkeypatch.setattr(assets, "_in_package", lambda asset: None)
    with pytest.raises(TailkdError, match=r"python -m tailkd\.install.*alpaca-eval==0\.6\.6"):
        setup_sft_rows(sft_config(tmp_path), tiny_tokenizer, tmp_path / "cache")


def test_the_real_asset_gives_the_documented_counts(tmp_path):
    """With the real outputs.json installed (scripts/setup.sh, `python -m tailkd.install instruct`): 805 pairs, 734
    kept by the default filter, 645 for training and 89 held out."""
    try:
        source = assets.find("instruct")[0]
    except TailkdError:
        pytest.skip("the instruct asset is not installed (python -m tailkd.install instruct)")
    assert hashlib.sha256(source.read_bytes()).hexdigest() == assets.ASSETS["instruct"].sha256[0]
    files = instructdata.default_instruct_dataset(tmp_path)
    meta = json.loads((files.train.parent / "meta.json").read_text())
    assert (meta["pairs"], meta["kept"], meta["train"], meta["heldout"]) == (
        805, 734, {"kept": 645, "dropped": 60}, {"kept": 89, "dropped": 11})
    held = [json.loads(x) for x in files.heldout.read_text().splitlines()]
    assert len(held) == 89 and all(x["prompt"].endswith("\n") and x["response"] for x in held)


def test_builtin_math_names_the_default_sft_set_and_mixes_with_instruct(tmp_path, fake_asset, tiny_tokenizer):
    """`--task sft --data builtin:math` is the set an SFT run without --data uses; built-in sets combine, each
    bringing its held-out split."""
    pytest.importorskip("reasoning_gym", reason="builtin:math needs reasoning-gym")
    common = dict(task="sft", cache_dir=str(tmp_path / "cache"), seq_len=2048, math_train=12, math_heldout=3)
    none = setup_sft_rows(DataConfig(**common), tiny_tokenizer, tmp_path / "cache")
    named = setup_sft_rows(DataConfig(paths=["builtin:math"], **common), tiny_tokenizer, tmp_path / "cache")
    assert [e.prompt for e in named[1].examples] == [e.prompt for e in none[1].examples] and len(named[1]) == 3
    both = setup_sft_rows(DataConfig(paths=["builtin:math", "builtin:instruct"], instruct_heldout=5,
                                     instruct_max_words=0, **common), tiny_tokenizer, tmp_path / "cache")
    assert (len(both[0].examples), len(both[1].examples)) == (12 + 25, 3 + 5)


def test_distill_refuses_builtin_instruct_for_pretraining_before_loading_anything(tmp_path, capsys):
    from tailkd.cli import main

    run = tmp_path / "run"
    assert main(["distill", "--data", "builtin:instruct", "--teacher", str(tmp_path / "no-teacher"),
                 "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "read only with data.task sft" in err[0] and not run.exists()
