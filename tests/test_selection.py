"""MiniPLM difference sampling (`tailkd.selection`, ``tailkd select-data``): windows, scores against a float64
reference, exact top-fraction selection, the command end to end and its bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import make_teacher_dir, make_tokenizer, write_corpus
from transformers import LlamaConfig, LlamaForCausalLM

from tailkd import selection
from tailkd.cli import main
from tailkd.errors import TailkdError


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    return {"teacher": make_teacher_dir(root / "teacher"),
            "reference": make_teacher_dir(root / "reference", layers=1, hidden=32, seed=1, train_steps=20),
            "corpus": write_corpus(root / "corpus.txt", n_docs=30), "cache": root / "cache"}


def test_windows_score_every_token_but_the_first_once():
    ids = list(range(20))
    for seq_len in (1, 3, 8, 19, 20, 50):
        ws = list(selection.windows(ids, seq_len))
        assert all(2 <= len(w) <= seq_len + 1 for w in ws)
        assert [t for w in ws for t in w[1:]] == ids[1:]  # each token scored once, in order
        assert all(w[0] == ws[i - 1][-1] for i, w in enumerate(ws) if i)  # context: the previous window's last
    assert list(selection.windows([7], 4)) == [] and list(selection.windows([], 4)) == []


@pytest.mark.parametrize("n, keep, want", [(10, 0.5, 5), (7, 0.5, 4), (5, 0.3, 2), (3, 0.01, 1), (4, 1.0, 4),
                                           (50, 0.29, 15), (100, 0.285, 29), (10, 0.25, 3), (6, 0.25, 2)])
def test_kept_count(n, keep, want):
    """keep · n rounded half up, exactly: 0.29 · 50 = 14.5 -> 15 although the float product is 14.4999...; halves
    round up, not to even (2.5 -> 3)."""
    assert selection.kept_count(n, keep) == want


def test_kept_count_is_exact_half_up_for_every_decimal_fraction():
    for n in (1, 2, 3, 7, 10, 50, 99, 200, 1000):
        for thousandths in range(1, 1001):
            want = max(1, (2 * thousandths * n + 1000) // 2000)  # floor(t/1000 · n + 1/2) in integers
            assert selection.kept_count(n, thousandths / 1000) == want, (n, thousandths)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan")])
def test_keep_outside_0_1_is_refused(keep):
    with pytest.raises(TailkdError, match="select.keep"):
        selection.kept_count(10, keep)


def test_select_top_keeps_exactly_the_top_fraction_in_corpus_order():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(101, generator=g).tolist()
    kept = selection.select_top(scores, 0.3)
    assert len(kept) == 30 and kept == sorted(kept)
    assert min(scores[i] for i in kept) > max(scores[i] for i in range(101) if i not in kept)
    # ties go to the earlier document; documents without a scored token (-inf) rank last
    assert selection.select_top([1.0, 2.0, 2.0, 2.0, float("-inf")], 0.4) == [1, 2]
    assert selection.select_top([float("-inf"), 0.0], 0.5) == [1]
    assert selection.select_top(scores, 0.3) == kept  # deterministic


def _model(vocab, layers, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _reference_score(teacher, reference, ids, seq_len):
    """Plain float64 sums: for each window, log p(x_t | window prefix) of both models, one token at a time."""
    total, n = 0.0, 0
    for start in range(0, max(1, len(ids) - 1), seq_len):
        w = ids[start:start + seq_len + 1]
        for t in range(1, len(w)):
            ctx = torch.tensor([w[:t]])
            for sign, model in ((1.0, teacher), (-1.0, reference)):
                with torch.no_grad():
                    z = model(input_ids=ctx).logits[0, -1].double()
                total += sign * float(z[w[t]] - torch.logsumexp(z, 0))
            n += 1
    return total / n


def test_scores_equal_a_float64_reference():
    """Models in float64, so only the float32 log-softmax of `token_logprob_sums` differs from the reference: per
    token |error| <= ~4 eps32 (|z|max + log V) ~ 4 * 6e-8 * (10 + 5) < 1e-5, and a mean of such errors too."""
    teacher, reference = _model(97, 2, 0).double(), _model(97, 1, 1).double()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (1, 2, 5, 9, 23)]
    got = selection.document_scores(teacher, reference, docs, 97, seq_len=8, batch_size=3, device="cpu", pad_id=0)
    assert got[0] == float("-inf")
    for doc, score in zip(docs[1:], got[1:]):
        assert score == pytest.approx(_reference_score(teacher, reference, doc, 8), abs=1e-5)
    # batching and padding change nothing: one window per forward gives the same scores
    one = selection.document_scores(teacher, reference, docs, 97, seq_len=8, batch_size=1, device="cpu", pad_id=0)
    assert one[1:] == pytest.approx(got[1:], abs=1e-5)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tailkd.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _args(assets, out, *extra):
    return ["select-data", "--teacher", str(assets["teacher"]), "--reference", str(assets["reference"]), "--data",
            str(assets["corpus"]), "--cache-dir", str(assets["cache"]), "--seq-len", "16", "--out", str(out), *extra]


def test_select_data_end_to_end_then_the_clm_baseline(assets, tmp_path):
    out = tmp_path / "sel"
    assert main(_args(assets, out, "--keep", "0.4")) == 0
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    selected = [json.loads(line)["text"] for line in (out / "selected.jsonl").read_text().splitlines()]
    meta = json.loads((out / "selection.json").read_text())
    docs = [d for d in assets["corpus"].read_text().split("\n\n") if d.strip()]
    assert len(scores) == len(docs) == 30 and meta["kept"] == len(selected) == 12
    kept = [s["doc"] for s in scores if s["kept"]]
    assert kept == selection.select_top([s["score"] for s in scores], 0.4)
    assert selected == [docs[i].strip() for i in kept]
    assert meta["flops"]["total"] > meta["flops"]["teacher"] > meta["flops"]["reference"] > 0
    # deterministic: a second selection, into its own previous output (which it replaces), is the same file
    first = (out / "selected.jsonl").read_bytes()
    assert main(_args(assets, out, "--keep", "0.4")) == 0
    assert (out / "selected.jsonl").read_bytes() == first
    # the MiniPLM baseline: a CLM run on the kept documents
    run = tmp_path / "clm"
    assert main(["distill", "--teacher", str(assets["teacher"]), "--loss", "clm", "--data", str(out / "selected.jsonl"),
                 "--data.cache_dir", str(assets["cache"]), "--student-layers", "1", "--seq-len", "16", "--steps", "2",
                 "--batch-size", "2", "--out", str(run)]) == 0
    assert (run / "final" / "config.json").is_file()


def test_bad_input_is_one_line(assets, tmp_path):
    other = tmp_path / "other_tok"
    tok = make_tokenizer(vocab_size=280)
    _model(len(tok), 1, 0).save_pretrained(other)
    tok.save_pretrained(other)
    short = tmp_path / "short_context"  # the teacher's tokenizer, 64 positions (the teacher has 128)
    tok = make_tokenizer()
    _model(len(tok), 1, 0).save_pretrained(short)
    tok.save_pretrained(short)
    for extra, needle in (([], "another tokenizer"), (["--keep", "0"], "select.keep"),
                          (["--keep", "1.5"], "select.keep"),
                          (["--reference", str(short), "--seq-len", "100"],
                           f"--seq-len 100 exceeds the model's maximum context of 64 tokens; use --seq-len 64 or less "
                           f"(the reference {short})"),
                          (["--seq-len", "200"], "maximum context of 128 tokens; use --seq-len 128 or less (the "
                                                 "teacher")):
        args = _args(assets, tmp_path / "out", *extra)
        if not extra:
            args[args.index("--reference") + 1] = str(other)
        proc = _cli(*args)
        last = proc.stderr.strip().splitlines()[-1]  # after the model loaders' progress bars, if any
        assert proc.returncode == 2 and last.startswith("tailkd: error:") and needle in last, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = _cli("select-data", "--teacher", str(assets["teacher"]))
    assert proc.returncode == 2 and "--reference" in proc.stderr


def test_out_that_is_not_a_selection_is_never_replaced(assets, tmp_path):
    """--out is replaced as a whole: a folder of the user's (no selection.json), or a file, is refused before any
    model is loaded, and left as it was."""
    mine = tmp_path / "corpus"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine too")
    for out in (mine, a_file):
        proc = _cli(*_args(assets, out))
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert last == (f"tailkd: error: refusing to replace {out}: it exists and is not a tailkd select-data output "
                        "(no selection.json); choose a new or empty folder for --out")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and a_file.read_text() == "mine too"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_args(assets, empty, "--max-docs", "3")) == 0
    assert json.loads((empty / "selection.json").read_text())["documents"] == 3
