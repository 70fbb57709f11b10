"""tailkd.jsonfile: every JSON / JSONL file tailkd writes is strict JSON (RFC 8259), non-finite floats included; its
readers get the floats back and still read the files written before (NaN / Infinity)."""

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny import corpus_text, make_teacher_dir, make_tokenizer, write_corpus

from tailkd import jsonfile
from tailkd.cli import main


def strict_loads(text: str):
    """What jq or JavaScript's JSON.parse accept: no NaN, Infinity, -Infinity."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def same(a, b) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_non_finite_floats_are_null_with_a_record_and_come_back():
    inf, nan = math.inf, math.nan
    obj = {"kl": 0.5, "rkl": inf, "steps": 3, "name": "x", "none": None,
           "heldout": {"teacher_ppl": inf, "student_ppl": 2.0, "loss": nan},
           "curve": [[0, 10], [1.0, -inf]], "alpha": (0.5, nan), "runs": [{"kl": nan}, {"kl": 1.0}]}
    text = jsonfile.dumps(obj, indent=1)
    parsed = strict_loads(text)
    assert parsed["rkl"] is None and parsed["heldout"]["loss"] is None and parsed["curve"][1][1] is None
    assert parsed["non_finite"] == {"rkl": "inf", "curve[1][1]": "-inf", "alpha[1]": "nan"}
    assert parsed["heldout"]["non_finite"] == {"teacher_ppl": "inf", "loss": "nan"}
    assert parsed["runs"][0] == {"kl": None, "non_finite": {"kl": "nan"}} and parsed["runs"][1] == {"kl": 1.0}
    assert parsed["none"] is None and "none" not in parsed["non_finite"]  # a None of the data stays None
    back = jsonfile.loads(text)
    assert same(back, {**obj, "alpha": [0.5, nan]})  # (a tuple reads back as a list, as with json)
    assert jsonfile.dumps({"kl": 1.0}) == json.dumps({"kl": 1.0})  # finite data: the bytes json wrote
    assert strict_loads(jsonfile.dumps([inf, 1.0])) == [None, 1.0]  # outside any object: null, no record
    with pytest.raises(ValueError, match="non_finite"):
        jsonfile.dumps({"non_finite": 1, "x": nan})
    with pytest.raises(ValueError, match="not JSON compliant"):  # a `default` hook's float is past `strict`: still
        jsonfile.dumps({"x": object()}, default=lambda _: nan)  # never written as NaN (json's allow_nan=False)


def test_files_written_before_with_nan_and_infinity_still_read():
    old = '{"kl": 0.5, "rkl": Infinity, "loss": NaN, "curve": [[0], [-Infinity]]}'
    back = jsonfile.loads(old)
    assert back["rkl"] == math.inf and math.isnan(back["loss"]) and back["curve"] == [[0], [-math.inf]]


def test_a_record_that_does_not_fit_its_object_is_left_as_it_is():
    """`loads` puts back only what `dumps` replaced: a record naming a key the object lacks, an index past a list or
    into a number, or a value that is not null (a file edited by hand, or another program's) puts nothing back and
    never fails the reader (a KeyError / IndexError / TypeError traceback); a "non_finite" key that is no record of
    marks (a number, an unknown mark) is the data's own and stays."""
    assert jsonfile.loads('{"a": 1, "non_finite": {"b": "inf"}}') == {"a": 1}
    assert jsonfile.loads('{"a": [null], "non_finite": {"a[3]": "inf"}}') == {"a": [None]}
    assert jsonfile.loads('{"a": 5, "non_finite": {"a[0]": "inf"}}') == {"a": 5}
    assert jsonfile.loads('{"a": 2.0, "non_finite": {"a": "inf"}}') == {"a": 2.0}
    assert jsonfile.loads('{"a": null, "non_finite": {"a": "big"}}') == {"a": None, "non_finite": {"a": "big"}}
    assert jsonfile.loads('{"non_finite": 3}') == {"non_finite": 3}
    back = jsonfile.loads('{"a": [[1.0, null]], "non_finite": {"a[0][1]": "-inf"}}')  # the one that fits: back
    assert back == {"a": [[1.0, -math.inf]]}
    assert jsonfile.loads(jsonfile.dumps({"a": [0.0] * 11 + [math.inf]}))["a"][11] == math.inf  # index of 2 digits


# --------------------------------------------------------------------------- real runs


def most_frequent_token(tokenizer) -> int:
    return Counter(tokenizer(corpus_text())["input_ids"]).most_common(1)[0][0]


def banning_teacher(path: Path) -> Path:
    """A tiny Phi teacher (its LM head has a bias) whose bias is −inf on the corpus's most frequent token: a
    distribution with p = 0 there, so held-out reverse KL, the teacher's CLM and perplexity, a select-data score
    and an rkl training loss are truly +inf (or −inf)."""
    from transformers import PhiConfig, PhiForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                    bos_token_id=tok.bos_token_id)
    model = PhiForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.bias[most_frequent_token(tok)] = float("-inf")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_every_output_of_runs_with_infinite_metrics_is_strict_json_and_compare_reads_it(tmp_path, capsys):
    """distill --loss rkl from a teacher that bans a token: its training losses are +inf (steps skipped) and its
    held-out reverse KL and teacher CLM / perplexity +inf; json wrote them as Infinity / NaN in metrics.jsonl,
    summary.json, eval.json, teacher_analysis.json and scores.jsonl, which jq and JSON.parse refuse."""
    student = make_teacher_dir(tmp_path / "student", layers=1, train_steps=0)
    teacher, corpus, cache = banning_teacher(tmp_path / "teacher"), write_corpus(tmp_path / "c.txt"), tmp_path / "cache"
    run = tmp_path / "run"
    data = ["--data", str(corpus), "--data.cache_dir", str(cache), "--seq-len", "32"]
    assert main(["distill", "--teacher", str(teacher), "--student", str(student), *data, "--batch-size", "4",
                 "--loss", "rkl", "--steps", "2", "--train.max_bad_steps", "5", "--data.eval_rows", "4",
                 "--out", str(run)]) == 0
    assert main(["eval", "--student", str(run / "final"), "--max-rows", "4", "--out", str(run / "eval.json")]) == 0
    assert main(["analyze-teacher", "--teacher", str(teacher), *data, "--max-rows", "2", "--kmax", "3",
                 "--out", str(tmp_path / "ana")]) == 0
    assert main(["select-data", "--teacher", str(teacher), "--reference", str(student), "--data", str(corpus),
                 "--cache-dir", str(cache), "--seq-len", "32", "--keep", "0.5", "--max-docs", "6",
                 "--out", str(tmp_path / "sel")]) == 0
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    capsys.readouterr()

    rows = [strict_loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["skipped"] for r in train] == [True, True] and all(r["loss"] is None for r in train)
    assert all(r["non_finite"]["loss"] in ("inf", "nan") for r in train)
    held = [r for r in rows if r["split"] == "heldout"]
    assert held and all(r["rkl"] is None and r["non_finite"]["rkl"] == "inf" for r in held)
    assert all(r["teacher_ppl"] is None and r["non_finite"]["teacher_ppl"] == "inf" for r in held)
    summary = strict_loads((run / "summary.json").read_text())
    assert summary["heldout_after"]["non_finite"]["rkl"] == "inf"
    ev = strict_loads((run / "eval.json").read_text())
    assert ev["rkl"] is None and ev["non_finite"] == {"rkl": "inf", "teacher_clm": "inf", "teacher_ppl": "inf"}
    assert math.isfinite(ev["kl"])
    analysis = strict_loads((tmp_path / "ana" / "teacher_analysis.json").read_text())
    assert next(iter(analysis.values()))["non_finite"] == {"teacher_clm": "inf"}
    scores = [strict_loads(line) for line in (tmp_path / "sel" / "scores.jsonl").read_text().splitlines()]
    assert all(s["score"] is None and s["non_finite"] == {"score": "-inf"} for s in scores)
    strict_loads((tmp_path / "sel" / "selection.json").read_text())
    record = strict_loads((tmp_path / "cmp" / "compare.json").read_text())[0]
    assert math.isfinite(record["kl"]) and record["ppl"] > 0  # kl and the student's perplexity: finite

    # every key of the run's files is documented in docs/outputs.md (nested: heldout_*'s as eval.json's)
    documented = (Path(__file__).parents[1] / "docs" / "outputs.md").read_text()
    keys = {k for r in rows for k in r} | set(summary) | {"non_finite"}
    assert not {k for k in keys if f"`{k}`" not in documented}

    from tailkd.compare import read_evals, read_metrics
    train_rows, held_rows = read_metrics(run)  # the readers get the floats back
    assert all(r["rkl"] == math.inf for r in held_rows) and all(not math.isfinite(r["loss"]) for r in train_rows)
    assert read_evals(run)[0]["teacher_ppl"] == math.inf


def test_kind_names_a_parsed_values_type_with_its_article():
    assert [jsonfile.kind(v) for v in ([1], {}, "s", 5, 1.5, True, None)] == [
        "a list", "a dict", "a str", "an int", "a float", "a bool", "a NoneType"]


@pytest.mark.parametrize("content, why", [(b"\xff{}", "not UTF-8 text: invalid start byte"),
                                          (b'{"kl": ', "not valid JSON: Expecting value"),
                                          (b"[" * 100_000 + b"]" * 100_000, "nested too deeply to read"),
                                          (b"[1]", "not a JSON object: a list"), (b"5", "not a JSON object: an int")])
def test_read_object_says_what_is_damaged(tmp_path, content, why):
    """`read_object`'s `Damaged` is the reason its callers put in their one line (a cache.json, a reproduction's
    eval.json), as its docstring gives them, the type of a value that is not an object named."""
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(jsonfile.Damaged, match=f"^{re.escape(why)}$"):
        jsonfile.read_object(path)


def test_read_object_gives_the_non_finite_floats_back(tmp_path):
    """A tailkd file's object is read as `loads` reads it: an eval.json's +inf reverse KL (written null with its
    record) is +inf again, not None, for the reproduction's report that reads it."""
    path = tmp_path / "eval.json"
    path.write_text(jsonfile.dumps({"kl": 0.5, "rkl": math.inf, "curve": [1.0, math.nan]}))
    obj = jsonfile.read_object(path)
    assert obj["kl"] == 0.5 and obj["rkl"] == math.inf and math.isnan(obj["curve"][1]) and "non_finite" not in obj

