"""tailkd.evaluate and `tailkd eval`: closed-form metrics, streaming invariance, the CLI, the real teacher."""

import itertools
import json
import math
import re
import shutil
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import bounds as B
import loss_bounds as LB
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import corpus_text, make_teacher_dir, write_corpus

from tailkd import evaluate
from tailkd.cli import main
from tailkd.errors import TailkdError
from tailkd.evaluate import IGNORE_INDEX, add_sums, finalize, heldout_metrics, token_sums


class TableLM(torch.nn.Module):
    """A "language model" whose logits at a position depend only on the input token: ``table[input_id]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone(), requires_grad=False)

    def forward(self, input_ids, output_hidden_states=False, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids], hidden_states=None)


def from_probs(rows) -> TableLM:
    return TableLM(torch.tensor(rows, dtype=torch.float64).log())


def one_batch(input_ids, labels):
    return [{"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels])}]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def one_line_error(stderr: str, needle: str) -> None:
    """The error is ONE line ``tailkd: error: ...`` (progress bars of model loading may come before it)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("tailkd:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("tailkd: error:"), lines
    assert "Traceback" not in stderr and needle in errors[0], errors[0]


def test_ignore_index_matches_objective():
    from tailkd import data

    assert IGNORE_INDEX == data.IGNORE_INDEX == -100


def test_hand_built_categoricals():
    p = [[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]]  # teacher rows for input tokens 0, 1
    q = [[0.25, 0.5, 0.25], [0.2, 0.5, 0.3]]  # student rows
    teacher, student = from_probs(p), from_probs(q)
    # positions: token 0 -> label 2, token 1 -> label 0, token 1 -> label 1, one ignored position
    m = heldout_metrics(student, teacher, one_batch([0, 1, 1, 0], [2, 0, 1, IGNORE_INDEX]), 3)
    rows = [0, 1, 1]
    labels = [2, 0, 1]
    assert m["tokens"] == 3
    assert m["kl"] == pytest.approx(sum(kl(p[r], q[r]) for r in rows) / 3, rel=1e-12)
    assert m["rkl"] == pytest.approx(sum(kl(q[r], p[r]) for r in rows) / 3, rel=1e-12)
    assert m["kl"] == pytest.approx((0.25 * math.log(2) + 2 * kl(p[1], q[1])) / 3, rel=1e-12)
    clm_s = sum(-math.log(q[r][y]) for r, y in zip(rows, labels)) / 3
    clm_t = sum(-math.log(p[r][y]) for r, y in zip(rows, labels)) / 3
    assert m["student_clm"] == pytest.approx(clm_s, rel=1e-12)
    assert m["teacher_clm"] == pytest.approx(clm_t, rel=1e-12)
    assert m["student_ppl"] == pytest.approx(math.exp(clm_s), rel=1e-12)
    assert m["teacher_ppl"] == pytest.approx(math.exp(clm_t), rel=1e-12)
    # argmax p = 0, 0, 0; argmax q = 1, 1, 1 -> no agreement; accuracy vs labels 2, 0, 1
    assert m["agreement"] == 0.0
    assert m["teacher_acc"] == pytest.approx(1 / 3)  # teacher right at the label-0 position only
    assert m["student_acc"] == pytest.approx(1 / 3)  # student right at the label-1 position only


def test_teacher_vs_itself_and_no_teacher():
    model = from_probs([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    batches = one_batch([0, 1, 0, 1], [0, 2, 1, 1])
    m = heldout_metrics(model, model, batches, 3, bins=10)
    assert m["kl"] == 0.0 and m["rkl"] == 0.0 and m["agreement"] == 1.0
    assert m["student_full_ece"] == m["teacher_full_ece"] and m["student_ece"] == m["teacher_ece"]
    alone = heldout_metrics(model, None, batches, 3)
    assert "kl" not in alone and alone["student_clm"] == pytest.approx(m["student_clm"], rel=1e-15)


def test_logits_past_the_shared_vocabulary_are_not_scored():
    """Models whose heads are wider than the shared vocabulary (embeddings padded to a multiple of 64, a teacher
    vocabulary extending the student's) are scored on the first V columns only: columns past V holding the largest
    logits change nothing."""
    student = from_probs([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    teacher = from_probs([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    wide_student, wide_teacher = (TableLM(torch.cat([m.table, torch.full((2, 3), 10.0, dtype=m.table.dtype)], -1))
                                  for m in (student, teacher))
    batches = one_batch([0, 1, 0, 1], [0, 2, 1, 1])
    assert heldout_metrics(wide_student, wide_teacher, batches, 3, bins=10) == heldout_metrics(student, teacher,
                                                                                                batches, 3, bins=10)


def test_forward_logits_runs_under_the_autocast_asked_for():
    """``autocast_dtype`` (bf16 where the hardware has it natively): the model's matrix products run in it, so its
    logits come out in bf16; None: float32 as the weights are."""

    class LinearLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(4, 8), torch.nn.Linear(8, 5, bias=False)

        def forward(self, input_ids, use_cache=False):
            return SimpleNamespace(logits=self.head(self.embed(input_ids)))

    ids = torch.tensor([[0, 1, 2]])
    assert evaluate.forward_logits(LinearLM(), ids, 3, autocast_dtype=torch.bfloat16).dtype == torch.bfloat16
    logits = evaluate.forward_logits(LinearLM(), ids, 3)
    assert logits.dtype == torch.float32 and logits.shape == (1, 3, 3)


def test_a_nan_teacher_is_not_reported_as_kl_zero():
    from tailkd.evaluate import token_sums

    s = torch.tensor([[0.0, 1.0, 2.0]])
    t = torch.tensor([[float("nan"), 0.0, 0.0]])
    sums = token_sums(s, t, torch.tensor([1]))
    assert torch.isnan(sums["kl"]) and torch.isnan(sums["rkl"])
    # exact zeros of p (masked vocabulary, −inf logits) still count as 0·log 0 = 0
    t = torch.tensor([[float("-inf"), 0.0, 0.0]])
    assert torch.isfinite(token_sums(s, t, torch.tensor([1]))["kl"])


def test_a_float64_teachers_prediction_is_its_own_argmax_not_after_the_float32_cast():
    """With a float32 student the sums are computed in float32, but the teacher's argmax (its hits, the agreement,
    its top-1 ECE hits) is taken from its own float64 logits: 1 and 1 + 1e-12 both round to 1.0f, and the
    argmax of the cast picked id 0 — a right prediction (y = 1) counted wrong, and the agreement with a student
    that predicts 1 counted as a disagreement."""
    s = torch.tensor([[0.0, 1.0, -1.0]])  # float32 student, predicts 1
    t = torch.tensor([[1.0, 1.0 + 1e-12, -3.0]], dtype=torch.float64)
    sums = token_sums(s, t, torch.tensor([1]), bins=10)
    assert sums["teacher_hits"] == 1.0 and sums["agree"] == 1.0 and sums["teacher_top1_hits"].sum() == 1.0


def test_a_nan_clm_has_a_nan_perplexity_not_an_infinite_one():
    """distill's held-out rows (metrics.jsonl, which keeps NaN sums) showed teacher_ppl Infinity for a NaN teacher:
    exp of a NaN CLM is NaN; a CLM past float64's exp range is still inf."""
    s = torch.tensor([[0.0, 1.0, 2.0]])
    sums = token_sums(s, torch.tensor([[float("nan"), 0.0, 0.0]]), torch.tensor([1]))
    out = finalize(sums)
    assert math.isnan(out["teacher_clm"]) and math.isnan(out["teacher_ppl"])
    assert out["student_ppl"] == pytest.approx(math.exp(out["student_clm"]), rel=1e-15)
    from tailkd.evaluate import _exp

    assert _exp(710.0) == math.inf and _exp(-1.0) == math.exp(-1.0)


def test_perplexity_is_finite_wherever_float64_holds_it():
    """_exp's rule: exp of the mean CLM, inf only past float64's range (exp(x) > DBL_MAX for x > ln DBL_MAX ≈ 709.78).
    A CLM of 700 or 709 (a diverged student) gave inf although exp(700) ≈ 1.0e304 and exp(709) ≈ 8.2e307 are
    floats; math.exp is correctly rounded to within an ulp, and _exp must be that value."""
    from tailkd.evaluate import _exp

    for x in (100.0, 700.0, 709.0, 709.78):
        assert _exp(x) == math.exp(x) and math.isfinite(_exp(x)), x
    assert _exp(709.79) == math.inf and _exp(math.inf) == math.inf and math.isnan(_exp(math.nan))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bins", [1, 2, 4, 10, 15, 20, 30, 100])
def test_bin_edges_are_the_floats_nearest_m_over_m_and_belong_to_the_upper_bin(bins, dtype):
    """The binning rule of Full-ECE and ECE: bin m holds m/M <= q < (m+1)/M and q = 1 the last bin, m/M being the
    float nearest it in q's dtype: a probability exactly on an edge (0.5, 0.25: uniform over 2 or 4 tokens; 0.1
    in float32) counts in the bin above it, the float just below it in the bin below. The edges were a
    torch.linspace, whose j/M differs from the float nearest m/M by an ulp for some m (M = 15, 20, 30, 100 in float32,
    10, 15, 20, 30, 100 in float64): q = fl(m/M) then fell in bin m - 1, or fl(m/M) - 1 ulp in bin m."""
    exact = [Fraction(m, bins) for m in range(bins + 1)]
    # Python's int / int is the correctly rounded float64; rounding that to float32 is the float32 nearest m/M (a
    # second rounding can only err when the float64 lies on a float32 midpoint, impossible for M < 2^28) -- checked
    # here against both float neighbours, exactly, so the reference does not rest on that argument
    edges = torch.tensor([m / bins for m in range(bins + 1)], dtype=torch.float64).to(dtype)
    for e, r in zip(edges, exact):
        up, down = torch.nextafter(e, e.new_tensor(2.0)), torch.nextafter(e, e.new_tensor(-1.0))
        assert abs(Fraction(float(e)) - r) <= min(abs(Fraction(float(up)) - r), abs(Fraction(float(down)) - r))
    want = list(range(bins)) + [bins - 1]
    assert evaluate._bin_index(edges, bins).tolist() == want  # on an edge: the bin above (1: the last bin)
    below = torch.nextafter(edges[1:], torch.zeros_like(edges[1:]))  # 1 ulp under each edge m = 1..M: bin m - 1
    assert evaluate._bin_index(below, bins).tolist() == want[:-1]
    inside = (edges[:-1] + edges[1:]) / 2  # mid-bin values: bin m
    assert evaluate._bin_index(inside, bins).tolist() == want[:-1]
    assert evaluate._bin_index(edges, bins).dtype == torch.int32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accuracy_agreement_and_top1_hits_take_the_argmax_of_the_logits(dtype):
    """argmax q_i is the argmax of the logits (q is monotone in them). log_softmax rounds two logits one ulp apart
    to the same log-probability when that ulp is below half an ulp of the log-normaliser (here 1e-3 and the next
    float, normaliser ~0.86): argmax of the log-probs then took the first of the tie, the smaller logit, and
    accuracy, agreement and top-1 ECE hits counted a right prediction as wrong."""
    a = torch.tensor(1e-3, dtype=dtype)
    tied = torch.stack([a, torch.nextafter(a, a.new_tensor(1.0)), a.new_tensor(-1.0)])[None]  # [1, 3]
    assert tied.argmax(-1).tolist() == [1]  # token 1 is the mode, by one ulp
    logq = torch.log_softmax(tied, dim=-1)
    assert logq[0, 0] == logq[0, 1] and logq.argmax(-1).tolist() == [0]  # rounded into a tie: not vacuous
    clear = torch.tensor([[0.0, 5.0, 0.0]], dtype=dtype)  # mode 1 by far
    y = torch.tensor([1])
    s = token_sums(tied, clear, y, bins=10)
    assert (float(s["student_hits"]), float(s["agree"]), float(s["student_top1_hits"].sum())) == (1.0, 1.0, 1.0)
    t = token_sums(clear, tied, y, bins=10)
    assert (float(t["teacher_hits"]), float(t["agree"]), float(t["teacher_top1_hits"].sum())) == (1.0, 1.0, 1.0)
    # the top-1 confidence stays max_v q_iv: both tied probabilities are that value
    assert float(s["student_top1_conf"].sum()) == float(logq.exp().max())


def test_calibrated_predictions_have_zero_ece():
    # q = (0.75, 0.25) at every position, label 0 three times out of four: calibrated in every bin
    model = from_probs([[0.75, 0.25]])
    m = heldout_metrics(model, None, one_batch([0, 0, 0, 0], [0, 0, 1, 0]), 2, bins=10)
    assert m["student_full_ece"] == pytest.approx(0.0, abs=1e-7)
    assert m["student_ece"] == pytest.approx(0.0, abs=1e-7)
    # uniform predictions are calibrated for Full-ECE whatever the labels (one bin, Σ_v (1[y=v] − 1/V) = 0)
    uniform = from_probs([[0.25] * 4])
    m = heldout_metrics(uniform, None, one_batch([0] * 5, [0, 3, 3, 1, 2]), 4, bins=20)
    assert m["student_full_ece"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("bins", [10, 20])
def test_overconfident_predictions(bins):
    # one-hot predictions, always wrong: Full-ECE = 2 (bin 1: N pairs q=1 no hit; bin 0: N hits at q=0), ECE = 1
    V = 5
    logits = torch.full((1, V), -40.0, dtype=torch.float64)
    logits[0, 0] = 40.0
    m = heldout_metrics(TableLM(logits), None, one_batch([0] * 6, [1, 2, 3, 4, 1, 2]), V, bins=bins)
    assert m["student_full_ece"] == pytest.approx(2.0, abs=1e-9)
    assert m["student_ece"] == pytest.approx(1.0, abs=1e-9)
    # q = (0.9, 0.1), label always 1: Full-ECE = 0.9 + 0.9 = 1.8, ECE = 0.9
    m = heldout_metrics(from_probs([[0.9, 0.1]]), None, one_batch([0] * 7, [1] * 7), 2, bins=bins)
    assert m["student_full_ece"] == pytest.approx(1.8, abs=1e-6)
    assert m["student_ece"] == pytest.approx(0.9, abs=1e-6)
    cal = m["calibration"]["student"]
    assert sum(cal["full_count"]) == 7 * 2 and sum(cal["top1_count"]) == 7 and sum(cal["full_hits"]) == 7


def test_a_bin_holding_a_single_pair_counts_in_both_eces():
    """One position, q = (0.9, 0.1), label 1: bin 9 holds the one pair (q 0.9, no hit), bin 1 the other (q 0.1, hit),
    each bin a single pair: Full-ECE = |0 − 0.9| + |1 − 0.1| = 1.8 and ECE = |0 − 0.9| = 0.9 (the empty-bin rule
    skips bins without pairs only). float64 throughout: a few ulps of 1.8, far below 1e-12."""
    m = heldout_metrics(from_probs([[0.9, 0.1]]), None, one_batch([0], [1]), 2, bins=10)
    assert m["tokens"] == 1
    assert m["student_full_ece"] == pytest.approx(1.8, abs=1e-12)
    assert m["student_ece"] == pytest.approx(0.9, abs=1e-12)


def test_no_valid_held_out_token_is_a_tailkd_error():
    """Every label -100: no metric is defined (a division by N = 0); one line saying so, not a ZeroDivisionError."""
    model = from_probs([[0.5, 0.5]])
    with pytest.raises(TailkdError, match="no valid held-out tokens to evaluate"):
        heldout_metrics(model, model, one_batch([0, 0], [IGNORE_INDEX, IGNORE_INDEX]), 2, bins=10)
    with pytest.raises(TailkdError, match="no valid held-out tokens to evaluate"):
        finalize({})


def test_a_batch_without_a_valid_token_still_runs_both_forwards():
    """heldout_sums' rule: every batch runs the student's and the teacher's forward, also one whose labels are all
    -100 (a data-parallel rank out of rows keeps its collectives in step); the sums are those of the valid batches."""
    calls = {"student": 0, "teacher": 0}

    class Counting(TableLM):
        def __init__(self, table, who):
            super().__init__(table)
            self.who = who

        def forward(self, input_ids, **kw):
            calls[self.who] += 1
            return super().forward(input_ids, **kw)

    student = Counting(torch.tensor([[0.1, 0.2], [0.3, -0.4]]), "student")
    teacher = Counting(torch.tensor([[1.0, -1.0], [0.5, 0.0]]), "teacher")
    batches = one_batch([0, 1], [IGNORE_INDEX, IGNORE_INDEX]) + one_batch([0, 1], [1, 0])
    sums = evaluate.heldout_sums(student, teacher, batches, 2)
    assert calls == {"student": 2, "teacher": 2}
    assert float(sums["tokens"]) == 2


def test_full_ece_matches_a_dense_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 7, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 7, (40,), generator=g)
    out = finalize(token_sums(logits, None, labels, bins=10), bins=10)
    q = logits.softmax(-1)
    onehot = torch.nn.functional.one_hot(labels, 7).double()
    b = torch.clamp((q * 10).floor().long(), max=9)  # reference binning, written independently
    full = sum(abs(float((onehot - q)[b == m].sum())) for m in range(10)) / 40
    conf, pred = q.max(-1)
    bc = torch.clamp((conf * 10).floor().long(), max=9)
    hit = (pred == labels).double()
    top1 = sum(abs(float((hit - conf)[bc == m].sum())) for m in range(10)) / 40
    assert out["student_full_ece"] == pytest.approx(full, abs=1e-12)
    assert out["student_ece"] == pytest.approx(top1, abs=1e-12)


def test_kl_agrees_with_the_training_losses():
    """Held-out KL/RKL (computed here from one log-softmax per side) equal tailkd.losses' per-token values."""
    from tailkd import losses

    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(50, 30, generator=g) * 2, torch.randn(50, 30, generator=g) * 4
    labels = torch.randint(0, 30, (50,), generator=g)
    sums = token_sums(s, t, labels)
    # two float32 evaluations of the same 50 per-token values (each within loss_bounds'), summed in float64
    B.assert_within(sums["kl"], losses.forward_kl(s, t).double().sum(), 2 * LB.forward_kl(s, t)[0].sum(), msg="kl")
    B.assert_within(sums["rkl"], losses.reverse_kl(s, t).double().sum(), 2 * LB.reverse_kl(s, t)[0].sum(), msg="rkl")


def _rows(n_rows, seq, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_rows):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        labels = torch.randint(0, vocab, (seq,), generator=g)
        labels[seq - i % seq:] = IGNORE_INDEX  # rows with different numbers of valid tokens
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _batches(rows, bs):
    for i in range(0, len(rows), bs):
        chunk = rows[i:i + bs]
        yield {k: torch.stack([r[k] for r in chunk]) for k in chunk[0]}


def test_batch_size_does_not_change_results_table_lm():
    g = torch.Generator().manual_seed(1)
    V = 11
    student, teacher = TableLM(torch.randn(V, V, generator=g)), TableLM(3 * torch.randn(V, V, generator=g))
    rows = _rows(13, 9, V, seed=2)
    a = heldout_metrics(student, teacher, _batches(rows, 1), V, bins=10)
    b = heldout_metrics(student, teacher, _batches(rows, 8), V, bins=10)
    assert a["tokens"] == b["tokens"] == sum(int((r["labels"] != IGNORE_INDEX).sum()) for r in rows)
    for key, value in a.items():
        if key == "calibration":
            assert value["student"]["full_count"] == b[key]["student"]["full_count"]
            assert value["teacher"]["top1_count"] == b[key]["teacher"]["top1_count"]
        elif isinstance(value, float):
            assert b[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_batch_size_does_not_change_results_llama(tiny_lm):
    from conftest import TINY_VOCAB

    student, teacher = tiny_lm(seed=1, num_hidden_layers=2), tiny_lm(seed=2)
    rows = _rows(8, 16, TINY_VOCAB, seed=3)
    a = heldout_metrics(student, teacher, _batches(rows, 1), TINY_VOCAB, bins=10)
    b = heldout_metrics(student, teacher, _batches(rows, 8), TINY_VOCAB, bins=10)
    bound = LB.two_forwards_heldout_bounds(student, teacher, next(_batches(rows, 8)), TINY_VOCAB)
    for key in ("kl", "rkl", "student_clm", "teacher_clm", "agreement", "student_full_ece", "teacher_ece"):
        B.assert_within(b[key], a[key], bound[key], msg=key)
    assert a["tokens"] == b["tokens"]
    assert student.training is False


def test_chunking_does_not_change_results(monkeypatch):
    import tailkd.evaluate as ev

    g = torch.Generator().manual_seed(4)
    V = 13
    student, teacher = TableLM(torch.randn(V, V, generator=g)), TableLM(torch.randn(V, V, generator=g))
    rows = _rows(6, 10, V, seed=5)
    whole = heldout_metrics(student, teacher, _batches(rows, 6), V, bins=10)
    # two positions per chunk; then fewer elements than one row holds (a vocabulary past CHUNK_ELEMENTS): one position
    for elements in (2 * V, V - 1):
        monkeypatch.setattr(ev, "CHUNK_ELEMENTS", elements)
        chunked = heldout_metrics(student, teacher, _batches(rows, 6), V, bins=10)
        assert chunked["tokens"] == whole["tokens"]
        for key in ("kl", "rkl", "student_clm", "student_full_ece", "teacher_full_ece", "student_ece"):
            assert chunked[key] == pytest.approx(whole[key], rel=1e-12), key


def test_a_model_without_a_softmax_is_named_with_the_rows_of_its_batch():
    """refuse_broken names the held-out row, or the first and last rows of a batch of several."""
    with pytest.raises(TailkdError, match=r"at 1 of the 5 held-out positions of row 3: "):
        evaluate.refuse_broken("student", 1.0, 5, 3, 1)
    with pytest.raises(TailkdError, match=r"^the teacher's logits are not finite \(NaN or \+inf: no softmax\) at 2 "
                                          r"of the 9 held-out positions of rows 4-5: "):
        evaluate.refuse_broken("teacher", 2.0, 9, 4, 2)
    evaluate.refuse_broken("student", 0.0, 9, 4, 2)  # none broken: nothing to say


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_assets")
    return {"teacher": make_teacher_dir(root / "teacher", train_steps=0),  # random weights: plumbing, not learning
            "student": make_teacher_dir(root / "student", layers=2, seed=1, train_steps=0),
            "corpus": write_corpus(root / "corpus.txt"), "cache": root / "cache"}


def eval_args(assets, out, *extra):
    return ["eval", "--student", str(assets["student"]), "--teacher", str(assets["teacher"]), "--data",
            str(assets["corpus"]), "--seq-len", "32", "--cache-dir", str(assets["cache"]), "--out", str(out), *extra]


def test_eval_cli_writes_json_and_table(assets, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(eval_args(assets, out, "--batch-size", "3", "--max-rows", "6")) == 0
    printed = capsys.readouterr().out
    assert "Full-ECE (M=10)" in printed and "KL(teacher‖student)" in printed and "top-1 agreement" in printed
    result = json.loads(out.read_text())
    assert result["rows"] == 6 and result["tokens"] == 6 * 32 and result["split"] == "heldout"
    for key in ("kl", "rkl", "student_ppl", "teacher_ppl", "agreement", "student_full_ece", "teacher_full_ece",
                "student_ece", "teacher_ece"):
        assert math.isfinite(result[key]), key
    assert result["kl"] > 0
    # batch size 1 gives the same numbers
    out1 = tmp_path / "eval1.json"
    assert main(eval_args(assets, out1, "--batch-size", "1", "--max-rows", "6")) == 0
    again = json.loads(out1.read_text())
    from transformers import AutoModelForCausalLM

    from tailkd.commands import eval_rows
    from tailkd.config import DataConfig
    from tailkd.models import load_teacher

    teacher, tok = load_teacher(str(assets["teacher"]), device="cpu", dtype="fp32")
    student = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float32).eval()
    data = DataConfig(paths=[str(assets["corpus"])], seq_len=32, cache_dir=str(assets["cache"]))
    rows = eval_rows(tok, data, max_rows=6)
    bound = LB.two_forwards_heldout_bounds(student, teacher, next(_batches(rows, 6)), len(tok))
    for key in ("kl", "rkl", "student_clm", "student_full_ece", "teacher_ece"):
        B.assert_within(again[key], result[key], bound[key], msg=key)


def test_eval_teacher_against_itself(assets, tmp_path, capsys):
    out = tmp_path / "self.json"
    args = eval_args(assets, out, "--max-rows", "4")
    args[args.index("--student") + 1] = str(assets["teacher"])
    assert main(args) == 0
    assert "eval: 100%" in capsys.readouterr().err  # its progress bar (rows/s, ETA) reached the end
    r = json.loads(out.read_text())
    assert r["kl"] == 0.0 and r["rkl"] == 0.0 and r["agreement"] == 1.0
    assert r["student_full_ece"] == r["teacher_full_ece"]


def nan_model_dir(src: Path, dst: Path) -> Path:
    """A copy of the model folder ``src`` with one NaN in layer 1's MLP: its logits are NaN at every position."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all -inf"])
def test_logits_without_a_softmax_at_held_out_positions_are_one_line_not_nan_results(bad):
    """A model whose logits at a held-out position are NaN or +inf (or all −inf) has no distribution there: eval
    printed and saved NaN (and teacher_ppl Infinity) as its KL, CLM and ECE, and json.dumps wrote them as NaN (not
    JSON). Now a TailkdError says which model and where; −inf on some tokens (a masked vocabulary) is still a
    distribution, and NaN at ignored positions (padding: labels -100) never reaches the sums."""
    clean = [[0.5, 0.25, 0.25], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]]
    broken = from_probs(clean)
    with torch.no_grad():
        if bad == "all -inf":
            broken.table[2] = float("-inf")
        else:
            broken.table[2, 1] = bad  # input token 2: no softmax
    good = from_probs([[0.25, 0.5, 0.25], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    batches = one_batch([0, 1, 2, 0], [2, 0, 1, 1]) * 2  # token 2 at a valid position, in both batches
    with pytest.raises(TailkdError, match=r"the teacher's logits are not finite \(NaN or \+inf: no softmax\) at 1 "
                                          r"of the 4 held-out positions of row 0:"):
        heldout_metrics(good, broken, batches, 3, bins=10)
    with pytest.raises(TailkdError, match=r"the student's logits are not finite .* at 1 of the 4 held-out positions"):
        heldout_metrics(broken, good, batches, 3)
    # the NaN position ignored (label -100): exactly the metrics of the clean model
    masked = one_batch([0, 1, 2, 0], [2, 0, IGNORE_INDEX, 1])
    assert heldout_metrics(good, broken, masked, 3, bins=10) == heldout_metrics(good, from_probs(clean), masked, 3,
                                                                                bins=10)
    # −inf on one token of the teacher: a distribution with p = 0 there (KL finite, reverse KL +inf)
    banned = from_probs(clean)
    with torch.no_grad():
        banned.table[2, 1] = float("-inf")
    m = heldout_metrics(good, banned, batches, 3)
    assert math.isfinite(m["kl"]) and m["rkl"] == math.inf


def test_eval_of_a_nan_model_is_one_line_and_writes_nothing(assets, tmp_path, capsys):
    out = tmp_path / "eval.json"
    teacher = nan_model_dir(assets["teacher"], tmp_path / "nan-teacher")
    assert main(eval_args(assets, out, "--teacher", str(teacher), "--max-rows", "2")) == 2
    one_line_error(capsys.readouterr().err, "the teacher's logits are not finite (NaN or +inf: no softmax) at 64 of "
                                            "the 64 held-out positions of rows 0-1")
    assert not out.exists()


def test_batched_reports_each_batch_once_it_is_consumed():
    """``batched(rows, n, progress)``: progress(rows of the batch) once the consumer asks for the next one, so a bar
    counts rows done, not rows handed out."""
    from tailkd.evaluate import batched

    rows = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([2, 3, -100])} for _ in range(5)]
    seen = []
    for batch in batched(rows, 2, seen.append):
        seen.append(("batch", len(batch["input_ids"])))
    assert seen == [("batch", 2), 2, ("batch", 2), 2, ("batch", 1), 1]
    with pytest.raises(TailkdError, match=r"^--batch-size 0 must be >= 1$"):
        next(batched(rows, 0))


def test_the_printed_table_has_the_rows_of_the_metrics_it_was_given():
    """`format_table`: without a teacher no KL / agreement rows and "—" in the teacher column, without bins no ECE
    rows; each value in its row's format."""
    from tailkd.evaluate import format_table

    model = from_probs([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    alone = heldout_metrics(model, None, one_batch([0, 1, 0], [0, 2, 1]), 3)
    lines = format_table({**alone, "rows": 1, "seq_len": 3}).splitlines()
    assert [ln.split("  ")[0] for ln in lines[2:-1]] == ["CLM loss [nats/token]", "perplexity",
                                                         "top-1 accuracy (next token)"]
    assert lines[2].split()[-2:] == [format(alone["student_clm"], ".4f"), "—"]
    assert lines[-1] == "3 held-out tokens (1 rows of 3)"
    for split, scored in (("heldout", "3 held-out tokens"), ("train", "3 training tokens"), ("all", "3 tokens")):
        table = format_table({**alone, "rows": 1, "seq_len": 3, "split": split})
        assert table.splitlines()[-1] == f"{scored} (1 rows of 3)"
    both = heldout_metrics(model, model, one_batch([0, 1, 0], [0, 2, 1]), 3, bins=10)
    names = [ln.split("  ")[0] for ln in format_table(both).splitlines()[2:-1]]
    assert names == ["CLM loss [nats/token]", "perplexity", "top-1 accuracy (next token)", "Full-ECE (M=10)",
                     "top-1 ECE (M=10)", "KL(teacher‖student) [nats/token]", "KL(student‖teacher) [nats/token]",
                     "top-1 agreement"]


def test_eval_defaults_from_the_run_config(assets, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(assets["student"], run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "teacher": {"path": str(assets["teacher"])},
        "data": {"paths": [str(assets["corpus"])], "seq_len": 16, "cache_dir": str(assets["cache"])}}))
    out = tmp_path / "e.json"
    assert main(["eval", "--student", str(run / "final"), "--max-rows", "3", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["teacher"] == str(assets["teacher"]) and r["seq_len"] == 16 and r["tokens"] == 48


def test_eval_json_names_the_heldout_files_it_scored(assets, tmp_path):
    """With held-out files of their own (`--heldout-data`, a run's data.heldout_paths: the reproduction's
    builtin:pydoc), --split heldout scores their rows, not the training data's; eval.json named only the training
    data (``data``: "built-in" in every eval.json of docs/reproduction, scored on Python's documentation)."""
    other = tmp_path / "other.txt"
    other.write_text(corpus_text(30, seed=7))
    for split, named in (("heldout", True), ("all", True), ("train", False)):
        out = tmp_path / f"{split}.json"
        assert main(eval_args(assets, out, "--heldout-data", str(other), "--split", split, "--max-rows", "2")) == 0
        r = json.loads(out.read_text())
        assert r["data"] == [str(assets["corpus"])], split
        assert r.get("heldout_data") == ([str(other)] if named else None), split
    out = tmp_path / "plain.json"
    assert main(eval_args(assets, out, "--max-rows", "2")) == 0
    assert "heldout_data" not in json.loads(out.read_text())


def _row_ids(assets, split, max_rows=None, **data):
    """The input ids of `commands.eval_rows`' rows of ``split`` for the assets' corpus at seq_len 32 (``data``: more
    DataConfig settings), tokenised with the student's tokenizer."""
    from tailkd.commands import eval_rows
    from tailkd.config import DataConfig
    from tailkd.models import read_tokenizer

    data = {"paths": [str(assets["corpus"])], **data}
    cfg = DataConfig(seq_len=32, cache_dir=str(assets["cache"]), **data)
    rows = eval_rows(read_tokenizer(str(assets["student"])), cfg, split=split, max_rows=max_rows)
    return [list(r["input_ids"]) for r in rows]


def test_eval_split_train_scores_the_training_rows_not_the_heldout_ones(assets, tmp_path):
    """``--split train`` scores the rows distill trains on: with held-out files of their own the two splits are
    different text, so the student's per-token loss differs (the mean of different tokens' losses); scoring the
    held-out rows for every split survived (mutation audit)."""
    other = tmp_path / "other.txt"
    other.write_text(corpus_text(30, seed=7))
    r = {}
    for split in ("train", "heldout"):
        out = tmp_path / f"{split}.json"
        assert main(eval_args(assets, out, "--heldout-data", str(other), "--split", split, "--max-rows", "2")) == 0
        r[split] = json.loads(out.read_text())
    ids = {split: _row_ids(assets, split, max_rows=2, heldout_paths=[str(other)]) for split in r}
    assert ids["train"] != ids["heldout"]
    assert r["train"]["split"] == "train" and r["train"]["student_clm"] != r["heldout"]["student_clm"]


def test_eval_of_a_run_trained_on_builtin_math(assets, tmp_path, capsys):
    """A pretraining run on `--data builtin:math` (the built-in math corpus): `tailkd eval --student RUN/final`
    evaluates on that run's held-out rows of the math corpus (it used to take 'builtin:math' for a file path), and
    `--generate --prompts` decodes those prompts (the run's data.paths are not prompt files; without --prompts the
    built-in math problems' held-out set is decoded: tests/test_config.py checks that choice, as the tiny models here
    cannot take its prompts)."""
    pytest.importorskip("reasoning_gym", reason="builtin:math needs reasoning-gym")
    from tailkd.mathdata import default_math_dataset

    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["distill", "--teacher", str(assets["teacher"]), "--data", "builtin:math", "--data.math_train", "40",
                 "--data.math_heldout", "4", "--data.cache_dir", str(cache), "--student-layers", "1", "--seq-len", "32",
                 "--batch-size", "2", "--steps", "1", "--data.eval_rows", "2", "--train.precision", "fp32",
                 "--device", "cpu", "--out", str(run)]) == 0
    out = tmp_path / "e.json"
    assert main(["eval", "--student", str(run / "final"), "--max-rows", "3", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["data"] == ["builtin:math"] and r["teacher"] == str(assets["teacher"]) and r["seq_len"] == 32
    assert r["rows"] == 3 and r["tokens"] == 3 * 32 and math.isfinite(r["kl"])
    # the rows are text of the math corpus (worked solutions), held out as tailkd distill held them out
    from transformers import AutoTokenizer

    from tailkd.commands import eval_rows
    from tailkd.config import DataConfig

    tok = AutoTokenizer.from_pretrained(run / "final")
    rows = eval_rows(tok, DataConfig(paths=["builtin:math"], seq_len=32, cache_dir=str(cache), math_train=40,
                                     math_heldout=4), max_rows=3)
    corpus = default_math_dataset(cache, n_train=40, n_heldout=4).corpus.read_text()
    assert tok.decode(rows[0]["input_ids"][1:-1]).strip() in corpus
    capsys.readouterr()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} plus 2?", "response": f"#### {i + 2}"}) + "\n"
                               for i in range(3)))
    gen = tmp_path / "g.json"
    assert main(["eval", "--student", str(run / "final"), "--generate", "--prompts", str(prompts),
                 "--max-new-tokens", "4", "--gen-limit", "0", "--out", str(gen)]) == 0
    g = json.loads(gen.read_text())
    assert g["mode"] == "generate" and g["examples"] == 3 and 0 <= g["student_exact_match"] <= 1


def test_eval_of_an_sft_run_scores_its_heldout_responses(assets, tmp_path):
    """An SFT run's student: eval takes the run's data section (task sft, its held-out fraction) and scores the
    response tokens of the held-out examples, the trainer's own held-out rows: the same KL as its last evaluation."""
    from tiny import SENTENCES, read_metrics
    from transformers import AutoModelForCausalLM

    from tailkd.commands import eval_rows
    from tailkd.config import DataConfig
    from tailkd.data import collate
    from tailkd.models import load_teacher

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i % 7}: {SENTENCES[i % 8]}\n",
                                         "response": f" {SENTENCES[(3 * i + 1) % 8]}"}) + "\n" for i in range(60)))
    run = tmp_path / "run"
    assert main(["distill", "--task", "sft", "--teacher", str(assets["teacher"]), "--data", str(pairs),
                 "--data.cache_dir", str(assets["cache"]), "--student-layers", "1", "--seq-len", "96",
                 "--batch-size", "4", "--steps", "1", "--data.eval_rows", "6", "--data.heldout_fraction", "0.2",
                 "--train.precision", "fp32", "--device", "cpu", "--out", str(run)]) == 0
    out = tmp_path / "e.json"
    assert main(["eval", "--student", str(run / "final"), "--max-rows", "6", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    trainer = [m for m in read_metrics(run) if m["split"] == "heldout"][-1]
    assert r["rows"] == 6 and r["tokens"] == trainer["eval_tokens"] < 6 * 96 / 2  # response tokens only
    teacher, tok = load_teacher(str(assets["teacher"]), device="cpu", dtype="fp32")
    student = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    data = DataConfig(task="sft", paths=[str(pairs)], seq_len=96, heldout_fraction=0.2, cache_dir=str(assets["cache"]))
    bound = LB.two_forwards_heldout_bounds(student, teacher, collate(eval_rows(tok, data, max_rows=6)), len(tok))
    B.assert_within(r["kl"], trainer["kl"], bound["kl"], msg="kl")


def test_eval_from_a_yaml_config(assets, tmp_path):
    """`tailkd eval --config YAML`: the same sections as the flags (here all of them from the file)."""
    import yaml

    out = tmp_path / "y.json"
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": {"path": str(assets["teacher"]), "dtype": "fp32"},
                                   "data": {"paths": [str(assets["corpus"])], "seq_len": 16,
                                            "cache_dir": str(assets["cache"])},
                                   "eval": {"student": str(assets["student"]), "max_rows": 2, "bins": 4,
                                            "out": str(out)}}))
    assert main(["eval", "--config", str(cfg)]) == 0
    r = json.loads(out.read_text())
    assert (r["rows"], r["tokens"], r["bins"], r["seq_len"]) == (2, 32, 4, 16)


@pytest.mark.parametrize(
    "change, needle",
    [
        (["--student", "/nonexistent/student"], "/nonexistent/student"),
        (["--teacher", "/nonexistent/teacher"], "/nonexistent/teacher"),
        (["--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
        (["--seq-len", "4096"], "seq-len"),
    ],
)
def test_eval_errors_are_one_line(assets, tmp_path, capsys, change, needle):
    out = tmp_path / "eval.json"
    assert main(eval_args(assets, out, *change)) == 2
    one_line_error(capsys.readouterr().err, needle)
    assert not out.exists()


def test_eval_of_a_student_that_is_a_file_is_one_line(assets, tmp_path, capsys):
    """--student naming a file (a weights file, as `from_pretrained` users sometimes pass) is refused, naming it,
    before a tokenizer or model is read."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a folder")
    out = tmp_path / "eval.json"
    assert main(eval_args(assets, out, "--student", str(weights))) == 2
    one_line_error(capsys.readouterr().err, f"--student {weights} is not a folder; pass a saved student")
    assert not out.exists()


def test_eval_vocabulary_mismatch_is_one_line(assets, tmp_path, capsys, tiny_lm, tiny_tokenizer):
    """A student of another tokenizer is refused with `vocab.relation`'s line before either model loads (the two
    tokenizers read alone: minutes saved for a large teacher)."""
    from tiny import no_model_loads

    other = tmp_path / "other"
    tiny_lm().save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    args = eval_args(assets, tmp_path / "e.json")
    args[args.index("--student") + 1] = str(other)
    with no_model_loads("the tokenizers were checked"):
        assert main(args) == 2
    one_line_error(capsys.readouterr().err, "tokenizers differ")
    assert not (tmp_path / "e.json").exists()


def test_eval_generate_of_a_pretraining_run_takes_its_seq_len(assets):
    """The built-in math problems `eval --generate` decodes for a pretraining student were always prepared at the
    default 128 tokens, whatever --seq-len said (the warning then asked to raise --seq-len): now at data.seq_len,
    so a longer limit keeps more held-out problems whole."""
    import warnings

    from tailkd import models
    from tailkd.command_config import EvalConfig
    from tailkd.commands import generation_examples

    tokenizer = models.load_tokenizer(assets["teacher"])
    kept = {}
    for seq_len in (256, 1024):
        cfg = EvalConfig()
        cfg.generate.enabled, cfg.data.seq_len, cfg.data.cache_dir = True, seq_len, str(assets["cache"])
        with warnings.catch_warnings():  # the count of examples cut to --seq-len: not what is checked here
            warnings.simplefilter("ignore")
            rows, _ = generation_examples(cfg, tokenizer)
        kept[seq_len] = len(rows)
    assert 0 < kept[256] < kept[1024], kept


def write_prompts(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def generate_args(assets, prompts, out, *extra):
    return ["eval", "--student", str(assets["student"]), "--teacher", str(assets["teacher"]), "--generate",
            "--prompts", str(prompts), "--max-new-tokens", "4", "--gen-limit", "0", "--out", str(out), *extra]


def test_eval_generate_reports_rouge_l_in_json_and_table(assets, tmp_path, capsys):
    """A tiny `tailkd eval --generate` run: ROUGE-L of student and teacher (greedy and sampled) beside exact match,
    Distinct-n and Self-BLEU, in the JSON and the printed table; `--generate.rouge false` leaves it out."""
    pytest.importorskip("rouge_score")
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": f"The team won {i}", "response": "the final match"}
                                                   for i in range(3)])
    out = tmp_path / "g.json"
    assert main(generate_args(assets, prompts, out, "--samples", "2")) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "generate" and r["examples"] == 3
    for key in ("rougeL", "sample_rougeL", "exact_match", "distinct_2", "self_bleu"):
        for side in ("student", "teacher"):
            assert 0 <= r[f"{side}_{key}"] <= 1, (side, key)
    table = capsys.readouterr().out
    assert any(line.split()[:1] == ["rougeL"] for line in table.splitlines()), table
    off = tmp_path / "off.json"
    assert main(generate_args(assets, prompts, off, "--generate.rouge", "false")) == 0
    assert not any("rouge" in k for k in json.loads(off.read_text()))
    alone = tmp_path / "alone.json"  # --generate.teacher false: the student's numbers, the same as above
    assert main(generate_args(assets, prompts, alone, "--samples", "2", "--generate.teacher", "false")) == 0
    s = json.loads(alone.read_text())
    assert not any(k.startswith("teacher_") for k in s)
    assert {k: v for k, v in r.items() if k.startswith("student_")} == {k: v for k, v in s.items()
                                                                         if k.startswith("student_")}


def test_eval_generate_decodes_prompts_without_references(assets, tmp_path, capsys):
    """`--prompts` lines may hold no reference (a prompt alone, a chat ending before an assistant turn): with
    `--generate.rouge false` both are decoded (a ChatML template given); with ROUGE-L on, the run is refused in one
    line naming the first."""
    from test_sft import CHATML

    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "The team won"},
                                                   {"messages": [{"role": "user", "content": "The team won"}]}])
    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHATML)
    out = tmp_path / "g.json"
    assert main(generate_args(assets, prompts, out, "--generate.rouge", "false", "--data.chat_template",
                              str(jinja))) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "generate" and r["examples"] == 2
    assert not any("rouge" in k for k in r) and 0 <= r["student_exact_match"] <= 1
    # no reference needed for the teacher's view of each model's greedy answers (`generation.answer_scores`)
    for side in ("student", "teacher"):
        assert r[f"{side}_answer_tokens"] >= 2 and r[f"{side}_answers_teacher_nll"] > 0
        assert r[f"{side}_answers_kl"] > 0 and r[f"{side}_answers_rkl"] > 0  # two different random models
    table = capsys.readouterr().out
    assert any(line.split()[:1] == ["answers_rkl"] for line in table.splitlines()), table
    counts = [line.split()[1:] for line in table.splitlines() if line.split()[:1] == ["answer_tokens"]]
    assert counts == [[str(r["student_answer_tokens"]), str(r["teacher_answer_tokens"])]], table  # counts as such
    assert main(generate_args(assets, prompts, tmp_path / "rouge.json", "--data.chat_template", str(jinja))) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tailkd") or "Traceback" in line]
    assert len(err) == 1 and re.search(r"ROUGE-L needs a reference response for every prompt, but 2 of 2 held-out "
                                       r"examples have an empty reference \(first: .*p\.jsonl:1\)", err[0]), err
    assert not (tmp_path / "rouge.json").exists()


def test_eval_generate_prompts_are_rendered_as_the_runs_rows(tmp_path):
    """`--prompts` files are rendered with data.chat_template (the run's, or the flag): `none` gives plain prompts
    even when the tokenizer has a template, a .jinja file its own template; `auto` the tokenizer's."""
    from test_sft import CHATML, chatml_tokenizer

    from tailkd.command_config import EvalConfig
    from tailkd.commands import generation_examples
    from tailkd.generation import _prompts_and_references

    tok = chatml_tokenizer(template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHATML)
    prompts_file = write_prompts(tmp_path / "p.jsonl", [{"prompt": "What is 1 plus 2?", "response": "#### 3"}])
    for setting, want in (("none", None), ("auto", tok.chat_template), (str(jinja), CHATML)):
        cfg = EvalConfig()
        cfg.generate.enabled, cfg.generate.prompts, cfg.data.chat_template = True, [str(prompts_file)], setting
        examples, template = generation_examples(cfg, tok)
        assert template == want, setting
        prompts, refs, sources, _ = _prompts_and_references(examples, template)  # as generation_eval renders them
        assert prompts == ["What is 1 plus 2?" if want is None else [{"role": "user", "content": "What is 1 plus 2?"}]]
        assert refs == ["#### 3"] and sources == [f"{prompts_file}:1"]


def test_eval_generate_without_references_is_one_line(assets, tmp_path, capsys, monkeypatch):
    """ROUGE-L asked for (the default) on data with an example without a reference response: one line, exit 2,
    no JSON; the same for a missing rouge-score package (said before any model is loaded)."""
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "A", "response": "B"}, chat])
    out = tmp_path / "g.json"
    assert main(generate_args(assets, prompts, out)) == 2
    one_line_error(capsys.readouterr().err, "ROUGE-L needs a reference response for every prompt")
    assert not out.exists()
    import sys

    monkeypatch.setitem(sys.modules, "rouge_score", None)  # as if not installed
    assert main(generate_args(assets, write_prompts(tmp_path / "q.jsonl", [{"prompt": "A", "response": "B"}]),
                              out)) == 2
    one_line_error(capsys.readouterr().err, "pip install rouge-score")
    assert not out.exists()


# --------------------------------------------------------------------------- the real teacher


@pytest.mark.slow
def test_real_smollm2_teacher_and_six_layer_student():
    from tailkd import models
    from tailkd.analysis import teacher_statistics
    from tailkd.commands import eval_rows
    from tailkd.config import DataConfig
    from tailkd.evaluate import batched
    from tailkd.student import build_student
    from tailkd.vocab import check_vocab

    teacher, tok = models.load_teacher("smollm2", device="cpu", dtype="fp32")
    student, _ = build_student(teacher, num_layers=6)
    student.eval()
    vocab = check_vocab(tok, tok, teacher, student)
    rows = eval_rows(tok, DataConfig(seq_len=64), split="heldout", max_rows=8)
    assert len(rows) == 8
    m = heldout_metrics(student, teacher, batched(rows, 4), vocab, bins=10)
    assert m["tokens"] == 8 * 64
    for key in ("kl", "rkl", "student_clm", "teacher_clm", "student_full_ece", "teacher_full_ece", "student_ece",
                "teacher_ece", "agreement"):
        assert math.isfinite(m[key]), key
    assert m["kl"] > 0 and m["teacher_ppl"] < m["student_ppl"]
    assert 0 < m["teacher_full_ece"] < 2 and 0 <= m["teacher_ece"] <= 1
    same = heldout_metrics(teacher, teacher, batched(rows, 4), vocab, bins=10)
    assert same["kl"] == 0.0 and same["agreement"] == 1.0
    # paper Fig. 2 on the real teacher: a tail that shrinks with K, a sizeable mode mismatch
    stats = teacher_statistics(teacher, batched(rows, 4), vocab)
    alpha = stats["alpha_mean"]
    assert all(a >= b for a, b in itertools.pairwise(alpha)) and 0 < alpha[99] < alpha[9] < alpha[0] < 1
    assert 0.2 < stats["mismatch_rate"] < 0.9


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 12), vocab=st.integers(2, 9), scale=st.floats(0.1, 30.0), cut=st.integers(0, 12),
       bins=st.integers(1, 25), seed=st.integers(0, 2**16))
def test_sums_split_anywhere_and_ece_bounds(n, vocab, scale, cut, bins, seed):
    """Splitting positions into two chunks gives the same sums; 0 <= Full-ECE <= 2 and 0 <= ECE <= 1."""
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, vocab, generator=g) * scale, torch.randn(n, vocab, generator=g) * scale
    y = torch.randint(0, vocab, (n,), generator=g)
    whole = finalize(token_sums(s, t, y, bins=bins), bins=bins)
    cut = min(cut, n)
    parts: dict = {}
    for sl in (slice(0, cut), slice(cut, n)):
        if sl.stop > sl.start:
            add_sums(parts, token_sums(s[sl], t[sl], y[sl], bins=bins))
    split = finalize(parts, bins=bins)
    for key in ("kl", "rkl", "student_clm", "agreement", "student_full_ece", "teacher_ece"):
        assert split[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), key
    # Full-ECE <= (1/N) Σ_i Σ_k (1[y_i = k] + q_ik) = 1 + mean_i Σ_k q_ik and ECE <= max(accuracy, confidence): the
    # float32 probabilities sum to 1 within Σ_k q_k·(κ_V + u + 2u|log q_k|) <= κ_V + u + 2u·ln V (the entropy
    # bounds Σ q|log q|), times SAFETY; both metrics are sums of absolute values, so >= 0 exactly.
    excess = B.SAFETY * (B.lse_kappa(vocab) + B.U32 * (1 + 2 * math.log(vocab)))
    for who in ("student", "teacher"):
        assert 0 <= whole[f"{who}_full_ece"] <= 2 + excess and 0 <= whole[f"{who}_ece"] <= 1 + excess
    assert whole["kl"] >= -1e-6 and whole["rkl"] >= -1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_lm):
    from conftest import TINY_VOCAB

    student, teacher = tiny_lm(seed=1, num_hidden_layers=2), tiny_lm(seed=2)
    rows = _rows(4, 16, TINY_VOCAB, seed=3)
    cpu = heldout_metrics(student, teacher, _batches(rows, 2), TINY_VOCAB, bins=10)
    # float32 matmuls (no TF32)
    bound = LB.two_forwards_heldout_bounds(student, teacher, next(_batches(rows, 4)), TINY_VOCAB)
    gpu = heldout_metrics(student.cuda(), teacher.cuda(), _batches(rows, 2), TINY_VOCAB, device="cuda", bins=10)
    for key in ("kl", "rkl", "student_clm", "agreement", "student_full_ece", "teacher_ece"):
        B.assert_within(gpu[key], cpu[key], bound[key], msg=key)


def test_the_data_read_is_always_a_list_of_paths():
    """eval.json, teacher_analysis.json and selection.json named the built-in corpus as the string "built-in" and
    any other data as a list of paths: a reader iterating ``data`` got the letters of "built-in". Now always a list,
    ``data.paths`` as config.yaml writes it: empty for the built-in corpus."""
    from tailkd.command_config import EvalConfig
    from tailkd.commands import generation_data, scored_data
    from tailkd.config import DataConfig

    assert scored_data(DataConfig(), "heldout") == {"data": []}
    assert scored_data(DataConfig(paths=["a.txt"], heldout_paths=["b.txt"]), "heldout") == {
        "data": ["a.txt"], "heldout_data": ["b.txt"]}
    cfg = EvalConfig()
    assert generation_data(cfg) == {"data": ["builtin:math"], "split": "heldout"}  # no --prompts, no SFT data
    cfg.generate.prompts = ["p.jsonl"]
    assert generation_data(cfg) == {"data": ["p.jsonl"], "split": "all"}
    cfg.generate.prompts, cfg.data.task, cfg.data.paths, cfg.data.heldout_paths = [], "sft", ["x.jsonl"], ["y.jsonl"]
    assert generation_data(cfg) == {"data": ["x.jsonl"], "heldout_data": ["y.jsonl"], "split": "heldout"}
    cfg.data.paths, cfg.data.heldout_paths = [], []
    assert generation_data(cfg) == {"data": ["builtin:math"], "split": "heldout"}


@pytest.mark.parametrize("short", ["student", "teacher"])
def test_eval_seq_len_beyond_either_models_context_is_one_line(assets, tmp_path, capsys, short):
    """Rows are cut to the shorter of the two models' contexts: a --seq-len past either model's
    max_position_embeddings is refused in one line, whichever of the two is the shorter (taking the longer
    survived: a rotary model scores positions past its context without an error)."""
    folder = tmp_path / short
    shutil.copytree(assets[short], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    args = eval_args({**assets, short: folder}, tmp_path / "eval.json")
    assert main(args) == 2
    one_line_error(capsys.readouterr().err, "--seq-len 32 exceeds the model's maximum context of 16 tokens")
    assert not (tmp_path / "eval.json").exists()


def test_eval_rows_all_is_the_heldout_rows_then_the_training_rows(assets, tmp_path):
    """``--split all`` takes the held-out rows first, then the training rows, so --max-rows cuts the training rows
    first."""
    ids = {split: _row_ids(assets, split) for split in ("heldout", "train")}
    assert ids["heldout"] and ids["train"]
    assert _row_ids(assets, "all") == ids["heldout"] + ids["train"]
    assert _row_ids(assets, "all", max_rows=len(ids["heldout"]) + 1) == ids["heldout"] + ids["train"][:1]


def test_eval_rows_of_a_split_without_a_row_is_one_line(monkeypatch):
    """A split with no row of ``seq_len`` tokens is a TailkdError naming the split and the length, not an empty
    list (eval would divide by zero tokens, analyze-teacher plot nothing); the other split is still given. Only the
    rows matter here, so setup_data is replaced by the rows it would build (dropping the check survived the
    mutation audit: every test's data fills both splits)."""
    from tailkd import prepare
    from tailkd.commands import eval_rows
    from tailkd.config import DataConfig

    row = {"input_ids": [1, 2, 3]}
    monkeypatch.setattr(prepare, "setup_data", lambda cfg, tok, model_max, **_: (None, [row], []))
    assert eval_rows(None, DataConfig(seq_len=32), split="train") == [row]
    with pytest.raises(TailkdError, match="the heldout split holds no row of 32 tokens"):
        eval_rows(None, DataConfig(seq_len=32), split="heldout")


def test_eval_generate_passes_the_decoding_settings_to_generation_eval(assets, tmp_path, monkeypatch):
    """`tailkd eval --generate` decodes with the settings given (seed, samples, temperature, top_p, limit, batch
    size, new tokens, rouge): generation_eval is replaced by one that records them, as every value would otherwise
    have to be inferred from sampled text (decoding with seed 0 whatever --generate.seed said survived the mutation
    audit)."""
    from transformers import AutoTokenizer

    from tailkd import generation

    seen = {}

    def record(student, teacher, tokenizer, examples, **kw):
        seen.update(kw, teacher=teacher is not None, examples=len(examples), judge=kw["judge"] is not None)
        return {"examples": len(examples)}

    monkeypatch.setattr(generation, "generation_eval", record)
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": f"The team won {i}", "response": "the final match"}
                                                   for i in range(3)])
    out = tmp_path / "g.json"
    assert main(generate_args(assets, prompts, out, "--samples", "3", "--generate.seed", "7", "--generate.temperature",
                              "0.5", "--generate.top_p", "0.8", "--batch-size", "2", "--generate.rouge", "false",
                              "--generate.teacher", "false")) == 0
    assert seen == {"chat_template": None, "max_new_tokens": 4, "batch_size": 2, "samples": 3, "temperature": 0.5,
                    "top_p": 0.8, "limit": None, "seed": 7, "rouge": False, "teacher": False, "examples": 3,
                    "judge": True, "vocab": len(AutoTokenizer.from_pretrained(assets["teacher"]))}  # scored by it
    assert json.loads(out.read_text())["mode"] == "generate"


def test_heldout_rows_of_files_of_their_own_do_not_read_the_training_data(assets, tmp_path):
    """With --heldout-data, --split heldout reads those files alone: a run's training files moved away since do not
    stop its evaluation (it failed: 'data path ... does not exist'), and the rows are the ones read with them."""
    other = tmp_path / "other.txt"
    other.write_text(corpus_text(30, seed=7))
    want = _row_ids(assets, "heldout", max_rows=3, heldout_paths=[str(other)])
    gone = tmp_path / "moved-away.txt"
    assert _row_ids(assets, "heldout", max_rows=3, heldout_paths=[str(other)], paths=[str(gone)]) == want
    from tailkd.errors import TailkdError

    with pytest.raises(TailkdError, match="does not exist"):  # the training split still needs them
        _row_ids(assets, "train", max_rows=3, heldout_paths=[str(other)], paths=[str(gone)])
