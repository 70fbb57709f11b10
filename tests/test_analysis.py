"""tailkd.analysis and `tailkd analyze-teacher`: tail mass α_K, mode mismatch, the two-panel figure."""

import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import pytest
import torch
from bounds import SAFETY, U32
from hypothesis import given, settings
from hypothesis import strategies as st
from test_evaluate import TableLM, from_probs, one_batch, one_line_error
from tiny import corpus_text, make_teacher_dir, make_tokenizer, no_model_loads, write_corpus
from transformers import AutoTokenizer

from tailkd.analysis import format_summary, tail_mass, teacher_statistics
from tailkd.cli import main
from tailkd.errors import TailkdError
from tailkd.vocab import real_vocab_size

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes, (path, len(data))
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas


def reference_tail(logits: torch.Tensor, K: int) -> torch.Tensor:
    """Σ of the sorted probabilities after the K-th, summed directly from the tail (float64)."""
    p = logits.double().softmax(-1).sort(-1, descending=True).values
    return p[:, K:].sum(-1)


def test_tail_mass_matches_the_direct_tail_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 50, generator=g) * 3
    alpha = tail_mass(logits, kmax=100)
    assert alpha.shape == (20, 100) and alpha.dtype == torch.float64
    for K in (1, 2, 10, 49):
        torch.testing.assert_close(alpha[:, K - 1], reference_tail(logits, K), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(alpha[:, 0], 1 - logits.double().softmax(-1).max(-1).values, rtol=1e-12, atol=1e-15)


def test_tail_mass_is_non_increasing_and_zero_at_V():
    g = torch.Generator().manual_seed(1)
    V = 37
    logits = torch.randn(64, V, generator=g) * 4
    alpha = tail_mass(logits, kmax=100)
    assert bool((alpha[:, 1:] <= alpha[:, :-1]).all())
    assert bool((alpha[:, V - 1:] == 0).all())  # K = V .. 100: nothing left
    assert bool((alpha[:, : V - 1] > 0).all())
    assert bool((alpha <= 1).all())


def test_tail_mass_of_a_peaked_teacher_keeps_its_precision():
    # the top token holds all but ~6e-13 of the mass: 1 − p_max would cancel to garbage in float32/float64. The
    # float64 log-softmax of logits up to 35 gives each exp(log p) a relative error ≲ 35 · 2^-52 ≈ 8e-15: rel 1e-12,
    # and abs=0 (pytest.approx's default absolute 1e-12 would accept 0 for 6e-13)
    logits = torch.zeros(1, 1000)
    logits[0, 0] = 35.0
    alpha = tail_mass(logits, kmax=5)
    exact = torch.tensor(999.0, dtype=torch.float64) / (999 + torch.tensor(35.0, dtype=torch.float64).exp())
    assert float(alpha[0, 0]) == pytest.approx(float(exact), rel=1e-12, abs=0)
    assert float(alpha[0, 1]) == pytest.approx(float(exact) * 998 / 999, rel=1e-12, abs=0)


def test_statistics_closed_form():
    # row 0: p = (0.5, 0.3, 0.2) -> α_1 = 0.5, α_2 = 0.2; row 1: p = (0.1, 0.1, 0.8) -> α_1 = 0.2, α_2 = 0.1
    teacher = from_probs([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    batches = one_batch([0, 0, 1, 1], [0, 1, 2, -100])  # mode 0 vs label 0, 1; mode 2 vs label 2
    stats = teacher_statistics(teacher, batches, 3, kmax=4)
    assert stats["tokens"] == 3
    assert stats["mismatch_rate"] == pytest.approx(1 / 3)
    assert stats["alpha_mean"][0] == pytest.approx((0.5 + 0.5 + 0.2) / 3, rel=1e-12)
    assert stats["alpha_mean"][1] == pytest.approx((0.2 + 0.2 + 0.1) / 3, rel=1e-12)
    assert stats["alpha_mean"][2:] == [0.0, 0.0]
    # the quartiles interpolate per-position α kept as float32: one rounding (u relative) of float64 values
    rel = SAFETY * U32
    assert stats["alpha_median"][0] == pytest.approx(0.5, rel=rel)
    assert stats["alpha_q25"][0] == pytest.approx(0.35, rel=rel)  # linear interpolation between 0.2 and 0.5
    assert stats["alpha_q75"][1] == pytest.approx(0.2, rel=rel)


def test_statistics_teacher_clm_is_the_mean_negative_log_probability_of_the_label():
    """teacher_clm = (1/N) Σ_i −log p_iy over valid positions: here −(log 0.5 + log 0.3 + log 0.8)/3 (the ignored
    position left out); float64 log-softmax of float64 log-probabilities, a few ulps of ~0.69, far below 1e-12."""
    teacher = from_probs([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    stats = teacher_statistics(teacher, one_batch([0, 0, 1, 1], [0, 1, 2, -100]), 3, kmax=2)
    want = -(math.log(0.5) + math.log(0.3) + math.log(0.8)) / 3
    assert stats["teacher_clm"] == pytest.approx(want, rel=1e-12, abs=0)


def test_summary_prints_the_mean_tail_mass_of_each_k_under_its_column():
    """format_summary: columns α_K for K = 1, 5, 10, 20, 50, 100 up to kmax (K = kmax included), each holding
    alpha_mean[K − 1] (lists are indexed from K = 1), then the mismatch rate and N."""
    kmax = 20
    results = {"teacher": {"k": list(range(1, kmax + 1)), "alpha_mean": [k / 100 for k in range(1, kmax + 1)],
                           "mismatch_rate": 0.25, "tokens": 8}}
    head, rule, row = format_summary(results).splitlines()
    assert head.split() == ["teacher", "α_1", "α_5", "α_10", "α_20", "mismatch", "tokens"]
    assert row.split() == ["teacher", "0.0100", "0.0500", "0.1000", "0.2000", "25.00%", "8"]
    # a teacher named by a long path keeps its last 28 characters (the model's folder), in a column of 28
    long = "/models/checkpoints/teachers/qwen2-1.5b-instruct"
    row = format_summary({long: results["teacher"]}).splitlines()[2]
    assert row.startswith("teachers/qwen2-1.5b-instruct ")


def test_statistics_do_not_depend_on_batch_size():
    g = torch.Generator().manual_seed(2)
    V = 120
    teacher = TableLM(torch.randn(V, V, generator=g) * 3)
    ids = torch.randint(0, V, (9, 12), generator=g)
    labels = torch.randint(0, V, (9, 12), generator=g)
    labels[::2, -3:] = -100

    def batches(bs):
        for i in range(0, 9, bs):
            yield {"input_ids": ids[i:i + bs], "labels": labels[i:i + bs]}

    a, b = teacher_statistics(teacher, batches(1), V), teacher_statistics(teacher, batches(8), V)
    assert a["tokens"] == b["tokens"] == int((labels != -100).sum())
    assert a["mismatch_rate"] == b["mismatch_rate"]
    assert a["alpha_median"] == b["alpha_median"] and a["alpha_q25"] == b["alpha_q25"]
    assert b["alpha_mean"] == pytest.approx(a["alpha_mean"], rel=1e-12)


def test_statistics_in_chunks_of_positions_equal_one_chunk(monkeypatch):
    """Valid positions are scored in chunks of CHUNK_ELEMENTS // V (a large V's logits never in float64 at once):
    chunks of 5 positions give the one-chunk counts, mismatch rate and quartiles exactly, and the mean tail masses
    and teacher_clm up to the order of their float64 sums (≤ 30 terms of at most 1 and ~5 nats: a few ulps, far
    below 1e-12 relative)."""
    from tailkd import evaluate

    g = torch.Generator().manual_seed(5)
    V = 40
    teacher = TableLM(torch.randn(V, V, generator=g) * 3)
    ids = torch.randint(0, V, (3, 12), generator=g)
    labels = torch.randint(0, V, (3, 12), generator=g)
    labels[1, :6] = -100
    batches = [{"input_ids": ids, "labels": labels}]
    whole = teacher_statistics(teacher, batches, V, kmax=8)
    monkeypatch.setattr(evaluate, "CHUNK_ELEMENTS", 5 * V)
    chunked = teacher_statistics(teacher, batches, V, kmax=8)
    assert chunked["tokens"] == whole["tokens"] == 30
    for key in ("mismatch_rate", "alpha_q25", "alpha_median", "alpha_q75"):
        assert chunked[key] == whole[key], key
    assert chunked["alpha_mean"] == pytest.approx(whole["alpha_mean"], rel=1e-12, abs=0)
    assert chunked["teacher_clm"] == pytest.approx(whole["teacher_clm"], rel=1e-12, abs=0)


def test_statistics_skip_a_batch_without_labels_and_refuse_none_at_all():
    """A batch whose positions are all ignored costs no teacher forward and changes nothing; no valid position in
    any batch is one line, not a failed concatenation of nothing; kmax below 1 is refused."""
    teacher = from_probs([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    forwards = []
    real = teacher.forward
    teacher.forward = lambda input_ids, **kw: forwards.append(1) or real(input_ids, **kw)
    masked, valid = one_batch([0, 1], [-100, -100]), one_batch([0, 1, 1], [0, 2, -100])
    assert teacher_statistics(teacher, masked + valid, 3, kmax=2) == teacher_statistics(teacher, valid, 3, kmax=2)
    assert len(forwards) == 2  # one per call: the masked batch was not run
    with pytest.raises(TailkdError, match=r"^no valid positions to analyse; give more data \(--data\) or a shorter "
                                          r"--seq-len$"):
        teacher_statistics(teacher, masked, 3, kmax=2)
    with pytest.raises(ValueError, match=r"^kmax=0 must be >= 1$"):
        tail_mass(torch.zeros(1, 3), 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_teacher_without_a_softmax_at_a_position_is_one_line_not_nan_statistics(bad):
    """analyze-teacher printed and saved NaN tail masses and quartiles (written as NaN: not JSON) for a teacher whose
    logits are NaN or +inf at some position; now a TailkdError says where. NaN at an ignored position (label -100)
    changes nothing."""
    clean = [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]]
    teacher = from_probs(clean)
    with torch.no_grad():
        teacher.table[2, 0] = bad
    with pytest.raises(TailkdError, match=r"the teacher's logits are not finite \(NaN or \+inf: no softmax\) at 1 of "
                                          r"the 3 held-out positions of row 1:"):
        teacher_statistics(teacher, one_batch([0, 1, 0], [0, 1, 2]) + one_batch([0, 2, 1], [0, 1, 2]), 3, kmax=2)
    masked = one_batch([0, 2, 1], [0, -100, 2])
    assert teacher_statistics(teacher, masked, 3, kmax=2) == teacher_statistics(from_probs(clean), masked, 3, kmax=2)


def test_analyze_teacher_of_a_nan_teacher_is_one_line_and_writes_nothing(tmp_path, capsys):
    from test_evaluate import nan_model_dir

    teacher = nan_model_dir(make_teacher_dir(tmp_path / "t", train_steps=0), tmp_path / "nan-teacher")
    out = tmp_path / "analysis"
    assert main(["analyze-teacher", "--teacher", str(teacher), "--data", str(write_corpus(tmp_path / "corpus.txt")),
                 "--seq-len", "32", "--max-rows", "2", "--kmax", "5", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, "the teacher's logits are not finite (NaN or +inf: no softmax) at 64 of "
                                            "the 64 held-out positions of rows 0-1")
    assert not out.exists()


def test_every_teacher_is_found_and_its_vocabulary_checked_before_any_is_analysed(tmp_path, capsys, monkeypatch):
    """With several teachers, a later one that does not exist, or whose vocabulary is below --kmax, is refused before
    the first is analysed (minutes each for real teachers): it was refused only once the earlier ones were done."""
    import tailkd.analysis

    teacher = make_teacher_dir(tmp_path / "t", train_steps=0)
    vocab = real_vocab_size(AutoTokenizer.from_pretrained(teacher))

    def analysed(*args, **kwargs):
        raise AssertionError("a teacher was analysed before every teacher was checked")

    monkeypatch.setattr(tailkd.analysis, "teacher_statistics", analysed)
    args = ["analyze-teacher", "--data", str(write_corpus(tmp_path / "corpus.txt")), "--seq-len", "32",
            "--max-rows", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "a")]
    assert main([*args, "--teacher", str(teacher), str(tmp_path / "missing"), "--kmax", "5"]) == 2
    one_line_error(capsys.readouterr().err, f"model '{tmp_path / 'missing'}' not found")
    small = tmp_path / "small"  # the same model with a smaller tokenizer (a head with more rows is fine)
    shutil.copytree(teacher, small)
    make_tokenizer(vocab_size=290).save_pretrained(small)
    small_vocab = real_vocab_size(AutoTokenizer.from_pretrained(small))
    assert small_vocab < vocab
    assert main([*args, "--teacher", str(teacher), str(small), "--kmax", str(vocab)]) == 2
    one_line_error(capsys.readouterr().err, f"analyze.kmax={vocab} is more than the vocabulary of {small} "
                                            f"({small_vocab} tokens)")
    assert not (tmp_path / "a").exists()


def test_analyze_teacher_kmax_beyond_the_vocabulary_is_one_line(tmp_path, capsys):
    """--kmax above the teacher's vocabulary is refused once the vocabulary is known (the curves are [N, kmax] and
    zero beyond V: --kmax 10**9 filled the memory); --kmax V itself is accepted and α_V = 0."""
    teacher = make_teacher_dir(tmp_path / "t", train_steps=0)
    vocab = real_vocab_size(AutoTokenizer.from_pretrained(teacher))  # the vocabulary distilled over (check_vocab)
    args = ["analyze-teacher", "--teacher", str(teacher), "--data", str(write_corpus(tmp_path / "corpus.txt")),
            "--seq-len", "32", "--max-rows", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "a")]
    assert main([*args, "--kmax", str(10**9)]) == 2
    one_line_error(capsys.readouterr().err, f"analyze.kmax=1000000000 is more than the vocabulary of {teacher} "
                                            f"({vocab} tokens), where α_K = 0 for every K >= V; give --kmax {vocab} "
                                            f"or less")
    assert not (tmp_path / "a").exists()
    assert main([*args, "--kmax", str(vocab)]) == 0
    r = json.loads((tmp_path / "a" / "teacher_analysis.json").read_text())[str(teacher)]
    assert len(r["alpha_mean"]) == vocab and r["alpha_mean"][-1] == 0 and r["alpha_q75"][-1] == 0


def test_analyze_teacher_cli_writes_json_and_png(tmp_path, capsys):
    t1 = make_teacher_dir(tmp_path / "t1", train_steps=0)  # random weights suffice here
    t2 = make_teacher_dir(tmp_path / "t2", layers=2, seed=3, train_steps=0)
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "analysis"
    args = ["analyze-teacher", "--teacher", str(t1), str(t2), "--data", str(corpus), "--split", "all",
            "--seq-len", "32", "--max-rows", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "mismatch" in printed and "α_10" in printed
    assert captured.err.count("analyze-teacher: 100%") == 2 and "4/4 [" in captured.err  # a bar per teacher, rows
    results = json.loads((out / "teacher_analysis.json").read_text())
    assert set(results) == {str(t1), str(t2)}
    for r in results.values():
        assert r["tokens"] == 4 * 32 and len(r["alpha_mean"]) == 100 and 0 <= r["mismatch_rate"] <= 1
        assert all(a >= b for a, b in zip(r["alpha_mean"], r["alpha_mean"][1:]))
        assert all(lo <= med <= hi for lo, med, hi in zip(r["alpha_q25"], r["alpha_median"], r["alpha_q75"]))
    assert_png(out / "teacher_tail_mass.png")


def test_analyze_teacher_json_names_the_heldout_files_it_read(tmp_path):
    """With `--heldout-data` the held-out rows are those files' (the reproduction's Fig. 2 is of builtin:pydoc);
    teacher_analysis.json named only the training data (``data``: "built-in" in docs/reproduction's)."""
    teacher = make_teacher_dir(tmp_path / "t", train_steps=0)
    corpus, other = write_corpus(tmp_path / "corpus.txt"), tmp_path / "other.txt"
    other.write_text(corpus_text(30, seed=7))
    out = tmp_path / "analysis"
    assert main(["analyze-teacher", "--teacher", str(teacher), "--data", str(corpus), "--heldout-data", str(other),
                 "--seq-len", "32", "--max-rows", "2", "--kmax", "5", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out)]) == 0
    r = json.loads((out / "teacher_analysis.json").read_text())[str(teacher)]
    assert r["data"] == [str(corpus)] and r["heldout_data"] == [str(other)]


def test_analyze_teacher_split_train_analyses_the_training_rows(tmp_path):
    """``--split`` picks the rows analysed and teacher_analysis.json says which: with held-out files of their own the
    two splits are different text, so the mean tail mass differs; analysing the training rows for every split, and a
    JSON without its ``split``, survived (mutation audit)."""
    teacher = make_teacher_dir(tmp_path / "t", train_steps=0)
    corpus, other = write_corpus(tmp_path / "corpus.txt"), tmp_path / "other.txt"
    other.write_text(corpus_text(30, seed=7))
    r = {}
    for split in ("heldout", "train"):
        out = tmp_path / split
        assert main(["analyze-teacher", "--teacher", str(teacher), "--data", str(corpus), "--heldout-data", str(other),
                     "--split", split, "--seq-len", "32", "--max-rows", "2", "--kmax", "5", "--cache-dir",
                     str(tmp_path / "cache"), "--out", str(out)]) == 0
        r[split] = json.loads((out / "teacher_analysis.json").read_text())[str(teacher)]
        assert r[split]["split"] == split
    assert r["train"]["alpha_mean"] != r["heldout"]["alpha_mean"]


@pytest.mark.parametrize("stopped_at", ["teacher_tail_mass.png", "teacher_analysis.json"])
def test_analyze_teacher_stopped_while_writing_never_leaves_a_mismatched_pair(tmp_path, monkeypatch, stopped_at):
    """analyze-teacher wrote teacher_analysis.json, then its PNG: Ctrl-C / SIGTERM between the two left the new JSON
    beside the PNG of the earlier analysis in the same --out. The JSON is now removed first and written last, the
    PNG (drawn before anything on disk changes) in between: a stop at either write leaves the earlier pair
    untouched or no JSON at all (not done: `tailkd reproduce` makes it again), never a JSON beside another's PNG."""
    from tailkd import checkpoint as ckpt

    teacher = make_teacher_dir(tmp_path / "t", train_steps=0)
    corpus, out = write_corpus(tmp_path / "corpus.txt"), tmp_path / "analysis"

    def analyze(rows):
        return main(["analyze-teacher", "--teacher", str(teacher), "--data", str(corpus), "--split", "all",
                     "--seq-len", "32", "--max-rows", str(rows), "--kmax", "5", "--cache-dir", str(tmp_path / "c"),
                     "--out", str(out)])

    assert analyze(1) == 0
    old = {name: (out / name).read_bytes() for name in ("teacher_analysis.json", "teacher_tail_mass.png")}
    real_write = ckpt.atomic_write_file

    def stopped(final, write, **kw):
        if Path(final).name == stopped_at:
            raise KeyboardInterrupt
        return real_write(final, write, **kw)

    monkeypatch.setattr(ckpt, "atomic_write_file", stopped)
    assert analyze(4) == 130
    monkeypatch.setattr(ckpt, "atomic_write_file", real_write)
    left = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "teacher_analysis.json" not in left or left == old
    assert set(left) <= set(old)
    assert analyze(4) == 0
    new = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(new) == set(old) and all(new[name] != old[name] for name in old)


def test_analyze_teacher_errors_are_one_line(tmp_path, capsys):
    assert main(["analyze-teacher", "--teacher", "/nonexistent/teacher", "--out", str(tmp_path / "a")]) == 2
    one_line_error(capsys.readouterr().err, "/nonexistent/teacher")
    assert not (tmp_path / "a").exists()


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 6), vocab=st.integers(1, 140), scale=st.floats(0.0, 60.0), kmax=st.integers(1, 120),
       seed=st.integers(0, 2**16))
def test_tail_mass_properties(n, vocab, scale, kmax, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * scale
    alpha = tail_mass(logits, kmax=kmax)
    assert alpha.shape == (n, kmax)
    assert bool((alpha[:, 1:] <= alpha[:, :-1]).all()) and bool((alpha >= 0).all()) and bool((alpha <= 1 + 1e-12).all())
    if kmax >= vocab:
        assert bool((alpha[:, vocab - 1:] == 0).all())
    K = min(kmax, vocab)
    # both sides are float64 sums of exp(z − max) terms, each within ~|z − max| · 2^-52 ≲ 500 · 2.2e-16 relative
    # (tails reach ~1e-28 here, far above float64's underflow): relative, atol 0 (1e-12 accepted any tiny tail)
    torch.testing.assert_close(alpha[:, K - 1], reference_tail(logits, K), rtol=1e-9, atol=0)


def test_analyze_teacher_refuses_a_later_teachers_config_before_any_model_loads(tmp_path, capsys):
    """Every teacher's folder is checked before the first is analysed (minutes each), its config as loading it would:
    a second teacher that is not a causal LM was found only when its turn came, after the first had loaded and run,
    and one whose config.json is not JSON was blamed on its tokenizer ("unusable tokenizer ...")."""
    teacher = make_teacher_dir(tmp_path / "t", train_steps=0)
    args = ["analyze-teacher", "--data", str(write_corpus(tmp_path / "corpus.txt")), "--seq-len", "32",
            "--max-rows", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "a")]
    encoder, broken = tmp_path / "encoder", tmp_path / "broken"  # the same tokenizer, another config
    for folder in (encoder, broken):
        shutil.copytree(teacher, folder)
    config = json.loads((teacher / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    (broken / "config.json").write_text("{not json")
    for folder, line in ((encoder, f"{encoder} holds a BertModel, not a causal language model"),
                         (broken, f"cannot read the model config in {broken}")):
        with no_model_loads("every teacher's config was read"):
            assert main([*args, "--teacher", str(teacher), str(folder)]) == 2
        one_line_error(capsys.readouterr().err, line)
        assert not (tmp_path / "a").exists()
