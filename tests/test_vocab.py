"""tailkd.vocab: one shared vocabulary, a teacher vocabulary extending the student's (distillation over the shared
ids with the teacher renormalised over them), and everything else refused."""

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import TINY_MERGES, TINY_SPECIALS, TINY_VOCAB, build_tiny_tokenizer, make_tiny_lm
from tiny import no_model_loads

from tailkd.errors import TailkdError
from tailkd.losses import forward_kl
from tailkd.vocab import check_vocab, outside_mass, relation, tokenizer_fingerprint


def test_check_vocab_same_tokenizer(tiny_tokenizer):
    teacher, student = make_tiny_lm("llama"), make_tiny_lm("gpt2", seed=1)
    assert check_vocab(tiny_tokenizer, build_tiny_tokenizer(), teacher, student) == TINY_VOCAB == len(tiny_tokenizer)


def test_check_vocab_padded_head_and_slicing(tiny_tokenizer):
    teacher = make_tiny_lm("qwen2", vocab_size=TINY_VOCAB + 10)  # head padded past the real vocabulary
    student = make_tiny_lm("llama")
    vocab = check_vocab(tiny_tokenizer, tiny_tokenizer, teacher, student)
    assert vocab == TINY_VOCAB
    ids = torch.tensor([tiny_tokenizer("in the thin").input_ids])
    with torch.no_grad():
        teacher_logits, student_logits = teacher(ids).logits, student(ids).logits
    assert teacher_logits.shape[-1] == TINY_VOCAB + 10
    assert teacher_logits[..., :vocab].shape == student_logits[..., :vocab].shape == (*ids.shape, TINY_VOCAB)


@pytest.mark.parametrize("short", [1, 6])  # one row short: the last token could not be scored
def test_check_vocab_head_too_small(tiny_tokenizer, short):
    small = make_tiny_lm("llama", vocab_size=TINY_VOCAB - short)
    with pytest.raises(TailkdError, match=rf"student's LM head has {TINY_VOCAB - short} rows .* {TINY_VOCAB} tokens"):
        check_vocab(tiny_tokenizer, tiny_tokenizer, make_tiny_lm("llama"), small)


def test_check_vocab_teacher_head_too_small(tiny_tokenizer):
    """The teacher's LM head is checked as the student's is: one row short, it could not score the last token."""
    small = make_tiny_lm("llama", vocab_size=TINY_VOCAB - 1)
    with pytest.raises(TailkdError, match=rf"^the teacher's LM head has {TINY_VOCAB - 1} rows .* {TINY_VOCAB} tokens"):
        check_vocab(tiny_tokenizer, tiny_tokenizer, small, make_tiny_lm("llama"))


def test_check_vocab_input_embedding_too_small(tiny_tokenizer):
    """An input embedding with fewer rows than the vocabulary (its LM head full) cannot read every token."""
    small = make_tiny_lm("llama", tie_word_embeddings=False)
    small.set_input_embeddings(torch.nn.Embedding(TINY_VOCAB - 2, small.config.hidden_size))
    with pytest.raises(TailkdError, match=rf"^the student's input embedding has {TINY_VOCAB - 2} rows but the "
                                          rf"tokenizer has {TINY_VOCAB} tokens"):
        check_vocab(tiny_tokenizer, tiny_tokenizer, make_tiny_lm("llama"), small)


def test_check_vocab_names_the_second_model_by_its_role(tiny_tokenizer):
    """select-data's reference model is named as the reference, not as a student."""
    small = make_tiny_lm("llama", vocab_size=TINY_VOCAB - 1)
    with pytest.raises(TailkdError, match=r"^the reference's LM head has"):
        check_vocab(tiny_tokenizer, tiny_tokenizer, make_tiny_lm("llama"), small, student_role="reference")


def test_check_vocab_different_tokenizers(tiny_tokenizer):
    other = build_tiny_tokenizer(merges=[*TINY_MERGES[:-1], ("o", "n")])  # 'in' (259) became 'on'
    model = make_tiny_lm("llama")
    with pytest.raises(TailkdError, match=r"tokenizers differ \(the student's token 'on' \(id 259\) is not in "
                                          r"the teacher's vocabulary\)"):
        check_vocab(tiny_tokenizer, other, model, model)


def test_check_vocab_different_special_tokens(tmp_path, tiny_tokenizer):
    other = build_tiny_tokenizer()
    other.pad_token = other.eos_token  # same token -> id map, different pad token
    model = make_tiny_lm("llama")
    with pytest.raises(TailkdError, match=r"tokenizers differ \(special tokens"):
        check_vocab(tiny_tokenizer, other, model, model)


@pytest.mark.parametrize("role", ["pad_token", "bos_token"])
def test_another_named_special_token_over_one_set_of_special_tokens_is_refused(tiny_tokenizer, role):
    """The same token -> id map and the same set of special tokens, but another token in the bos or pad role (the
    tiny tokenizer's bos is <|endoftext|>, its pad <|pad|>; here the two trade one role): refused, naming the special
    tokens."""
    eos, pad = TINY_SPECIALS
    other = build_tiny_tokenizer()
    other.add_special_tokens({"additional_special_tokens": [pad]})  # <|pad|> stays special either way
    setattr(other, role, eos if role == "pad_token" else pad)
    assert sorted(other.all_special_tokens) == sorted(tiny_tokenizer.all_special_tokens)
    model = make_tiny_lm("llama")
    with pytest.raises(TailkdError, match=r"tokenizers differ \(special tokens"):
        check_vocab(tiny_tokenizer, other, model, model)


def test_another_set_of_special_tokens_over_one_vocabulary_is_refused(tiny_tokenizer):
    """A token of the shared vocabulary that only one tokenizer treats as special (never split, dropped by
    skip_special_tokens) tokenises text otherwise: the tokenizers are not one, though their token -> id maps and
    their bos/eos/unk/pad tokens are equal."""
    other = build_tiny_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["in"]})  # 'in' (id 259) is already in the vocabulary
    assert other.get_vocab() == tiny_tokenizer.get_vocab()
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tiny_tokenizer)
    with pytest.raises(TailkdError, match=r"tokenizers differ \(special tokens .*'all': \['<\|endoftext\|>', "
                                          r"'<\|pad\|>', 'in'\]\}\)"):
        relation(tiny_tokenizer, other)


def test_tokenizer_fingerprint(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    fp = tokenizer_fingerprint(tiny_tokenizer)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(reloaded)
    reloaded.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(reloaded) != fp


def _extended(extra=("<x1>", "<x2>", "<x3>")):
    tok = build_tiny_tokenizer()
    tok.add_tokens(list(extra))  # ids TINY_VOCAB.. after the student's
    return tok


def test_a_teacher_vocabulary_that_extends_the_students():
    teacher_tok, student_tok = _extended(), build_tiny_tokenizer()
    assert relation(teacher_tok, student_tok) == "extends" and relation(student_tok, student_tok) == "same"
    teacher = make_tiny_lm("llama", vocab_size=TINY_VOCAB + 3)
    assert check_vocab(teacher_tok, student_tok, teacher, make_tiny_lm("llama", seed=1)) == TINY_VOCAB
    with pytest.raises(TailkdError, match="tokenizers differ"):  # the student's vocabulary does not extend
        check_vocab(student_tok, teacher_tok, make_tiny_lm("llama"), teacher)


def test_other_differences_are_still_refused():
    other = build_tiny_tokenizer(merges=[*TINY_MERGES[:-1], ("o", "n")])  # a shared token with another id
    other.add_tokens(["<x1>"])
    with pytest.raises(TailkdError, match="tokenizers differ.*extends the student's"):
        relation(other, build_tiny_tokenizer())


def test_a_near_extension_names_the_first_difference():
    """A teacher vocabulary that would extend the student's but for one swapped pair of shared ids is refused with
    the first student token whose id differs, not just the sizes."""
    swapped = [TINY_MERGES[1], TINY_MERGES[0], *TINY_MERGES[2:]]  # 'Ġt' and 'he' trade ids 256 and 257
    teacher = build_tiny_tokenizer(merges=swapped)
    teacher.add_tokens(["<x1>"])
    with pytest.raises(TailkdError, match=r"^teacher and student tokenizers differ \(the student's token 'Ġt' has id "
                                          r"256, the teacher's id 257\): ") as err:
        relation(teacher, build_tiny_tokenizer())
    assert "\n" not in str(err.value)


def test_the_first_difference_is_the_lowest_student_id_whatever_the_vocabulary_order(tiny_tokenizer):
    """`get_vocab()` promises no order (the Rust backend's is random per process): the message names the student
    token of lowest id whose teacher id differs, here with the student's vocabulary handed out highest id first."""
    swapped = [TINY_MERGES[1], TINY_MERGES[0], *TINY_MERGES[2:]]  # 'Ġt' and 'he' trade ids 256 and 257
    teacher, student = build_tiny_tokenizer(merges=swapped), build_tiny_tokenizer()
    teacher.add_tokens(["<x1>"])
    vocab = student.get_vocab
    student.get_vocab = lambda: dict(sorted(vocab().items(), key=lambda kv: -kv[1]))
    with pytest.raises(TailkdError, match=r"\(the student's token 'Ġt' has id 256, the teacher's id 257\)"):
        relation(teacher, student)


def _gapped_tokenizer(merged: dict):
    """A byte-level BPE tokenizer with the 256 byte symbols, `merged` (token -> id, its merges in id order) and the
    special tokens at fixed ids 260, 261: ids the merges skip are holes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = {"Ġt": ("Ġ", "t"), "he": ("h", "e"), "Ġthe": ("Ġt", "he"), "in": ("i", "n")}
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({**merged, "<|endoftext|>": 260, "<|pad|>": 261})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[merges[t] for t in sorted(merged, key=merged.get)]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")


def test_an_extra_teacher_token_among_the_students_ids_is_named():
    """Every student token keeps its id, but the teacher's extra token fills a hole in the student's ids (258 < 262):
    not an extension (extras must come after the student's ids), and the message names that token."""
    student = _gapped_tokenizer({"Ġt": 256, "he": 257, "in": 259})
    teacher = _gapped_tokenizer({"Ġt": 256, "he": 257, "Ġthe": 258, "in": 259})
    assert all(teacher.get_vocab()[t] == i for t, i in student.get_vocab().items())
    with pytest.raises(TailkdError, match=r"^teacher and student tokenizers differ \(the teacher's token 'Ġthe' has id "
                                          r"258, which the student lacks, among the student's ids 0\.\.261\): "):
        relation(teacher, student)
    fewer = _gapped_tokenizer({"Ġt": 256, "in": 259})  # two teacher tokens among its ids: the lower one is named
    with pytest.raises(TailkdError, match=r"\(the teacher's token 'he' has id 257, which the student lacks"):
        relation(teacher, fewer)


def test_distilling_over_the_shared_ids_renormalises_the_teacher():
    """KL over the shared ids (the teacher's logits sliced to V_S, as every path does) equals KL(p̃‖q) with
    p̃_i = p_i / Σ_{j<V_S} p_j of the teacher's full softmax, as plain float64 sums; and the mass outside is
    1 − Σ_{j<V_S} p_j. float64 throughout: relative error ~ V·eps64 ≈ 1e-13."""
    g = torch.Generator().manual_seed(0)
    v_s, v_t = 50, 57
    t = torch.randn(3, 4, v_t + 5, generator=g, dtype=torch.float64) * 3  # 5 padded head rows past the tokenizer
    s = torch.randn(3, 4, v_s, generator=g, dtype=torch.float64) * 3
    got = forward_kl(s, t[..., :v_s])
    for b in range(3):
        for i in range(4):
            p = [float(x) for x in torch.exp(t[b, i, :v_t] - t[b, i, :v_t].max())]
            z = sum(p)
            p = [x / z for x in p]
            shared = sum(p[:v_s])
            q = [float(x) for x in torch.exp(s[b, i] - s[b, i].max())]
            zq = sum(q)
            want = sum(p[j] / shared * (math.log(p[j] / shared) - math.log(q[j] / zq)) for j in range(v_s))
            assert float(got[b, i]) == pytest.approx(want, rel=1e-11)
            assert float(outside_mass(t[b, i], v_s, v_t)) == pytest.approx(1 - shared, rel=1e-11)
    # a tiny mass outside keeps its relative precision (1 − Σ shared rounds 2e^-40 / 8 ≈ 1e-18 to 0), and a mass
    # near 1 likewise: exponents of magnitude ≤ 41 give a relative error below ~4 · 41 · 2^-52 ≈ 4e-14 (abs=0:
    # pytest.approx's default absolute 1e-12 would take 0 for 1e-18)
    z = torch.zeros(10, dtype=torch.float64)
    z[8:] = -40.0
    assert float(outside_mass(z, 8, 10)) == pytest.approx(2 * math.exp(-40.0) / (8 + 2 * math.exp(-40.0)), rel=1e-12,
                                                          abs=0)
    assert float(outside_mass(-z, 8, 10)) == pytest.approx(2 / (2 + 8 * math.exp(-40.0)), rel=1e-12, abs=0)


def _rows(n, length=13, seed=0):
    """n row dicts like the data's (labels shifted, -100 = no target): the first 3 positions of each unlabelled."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, TINY_VOCAB, (length,), generator=g)
        labels = torch.cat([ids[1:], torch.tensor([-100])])
        labels[:3] = -100
        rows.append({"input_ids": ids, "labels": labels, "segment_ids": torch.zeros(length, dtype=torch.long)})
    return rows


def _outside_mass_float64(teacher, rows, v_s, v_t):
    """Mean over the labelled positions of Σ_{i ≥ V_S} p_i, p the float64 softmax of each row's own forward."""
    masses = []
    for row in rows:
        with torch.no_grad():
            z = teacher(input_ids=row["input_ids"][None]).logits[0, :, :v_t].double()
        for t in torch.nonzero(row["labels"] != -100).flatten().tolist():
            e = [math.exp(x) for x in (z[t] - z[t].max()).tolist()]
            masses.append(math.fsum(e[v_s:]) / math.fsum(e))
    return math.fsum(masses) / len(masses), len(masses)


@pytest.mark.parametrize("held", [5, 0])
def test_the_shared_vocabulary_record_is_measured_on_the_initial_heldout_rows(held, capsys):
    """The mass outside the shared ids, over the labelled positions of the first data.eval_rows held-out rows (the
    rows of the initial held-out evaluation), or of the first training rows without held-out rows: equal to the
    float64 softmax sums of the same rows' forwards. One row per forward (batch_size 1), as the reference: the same
    float32 logits bit for bit, so the two differ only by float64 rounding (a few eps64 per term): rel 1e-12."""
    from tailkd.config import DistillConfig
    from tailkd.prepare import shared_vocab_summary

    teacher = make_tiny_lm("llama", vocab_size=TINY_VOCAB + 3)
    cfg = DistillConfig()
    cfg.data.eval_rows, cfg.train.batch_size = 3, 1
    train_rows, held_rows = _rows(6, seed=1), _rows(held, seed=2)
    record = shared_vocab_summary(cfg, teacher, held_rows, train_rows, TINY_VOCAB, TINY_VOCAB + 3, "cpu")
    want, tokens = _outside_mass_float64(teacher, (held_rows or train_rows)[:3], TINY_VOCAB, TINY_VOCAB + 3)
    words = "the first 3 held-out rows" if held else "the first 3 training rows (no held-out rows)"
    assert tokens == 3 * 9 and record["tokens"] == tokens and record["rows"] == words
    assert record["student_ids"] == TINY_VOCAB and record["teacher_ids"] == TINY_VOCAB + 3
    assert 0 < want < 1 and record["outside_mass"] == pytest.approx(want, rel=1e-12)
    line = capsys.readouterr().out.strip()
    assert line == (f"shared vocabulary: the student's {TINY_VOCAB} token ids of the teacher's {TINY_VOCAB + 3}, the "
                    f"teacher renormalised over them; its mass on its 3 other tokens: {want:.3g} (mean over {tokens} "
                    f"tokens of {words})")


def test_the_outside_mass_of_rows_without_a_label_is_unknown_not_zero():
    """No labelled position to average over: the mass is NaN over 0 tokens (the run log says nan), never a 0 that
    would claim the teacher puts nothing outside the shared ids."""
    from tailkd.prepare import shared_vocab_mass

    teacher = make_tiny_lm("llama", vocab_size=TINY_VOCAB + 3)
    rows = _rows(2, seed=1)
    for row in rows:
        row["labels"] = torch.full_like(row["labels"], -100)
    mass, tokens = shared_vocab_mass(teacher, rows, 2, TINY_VOCAB, TINY_VOCAB + 3, batch_size=2, device="cpu")
    assert tokens == 0 and math.isnan(mass)


# --------------------------------------------------------------------------- end to end: tailkd distill and eval


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny teacher T, the same teacher T+ with 2 extra tokens (ids after T's, own embedding/head rows), and a
    2-layer student built from T saved with T's tokenizer (a continued-pretraining student)."""
    from tiny import make_teacher_dir, write_corpus
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tailkd.student import build_student

    root = tmp_path_factory.mktemp("shared_vocab")
    teacher = make_teacher_dir(root / "teacher")
    model, tok = AutoModelForCausalLM.from_pretrained(teacher), AutoTokenizer.from_pretrained(teacher)
    student, _ = build_student(model, num_layers=2)
    student.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    tok.add_tokens(["<extra1>", "<extra2>"])
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(root / "teacher_plus")
    tok.save_pretrained(root / "teacher_plus")
    return {"teacher": teacher, "teacher_plus": root / "teacher_plus", "student": root / "student",
            "corpus": write_corpus(root / "corpus.txt"), "cache": root / "cache"}


@pytest.mark.parametrize("fused", ["off", "on"])
def test_shared_vocabulary_distillation_equals_plain_distillation(pair, tmp_path, capsys, fused):
    """Renormalised over the shared ids, T+ IS T (the same logits there), so the runs agree: the teacher logits
    come from GEMMs of another width (float32 dot products, ~1e-6 relative apart at most), so step 1's loss within
    1e-5; Adam's first steps move each weight by ≤ lr whatever the gradient's size, so later losses within 1e-3."""
    from tiny import read_metrics

    from tailkd.cli import main

    def run(teacher, out):
        assert main(["distill", "--teacher", str(teacher), "--student", str(pair["student"]), "--data",
                     str(pair["corpus"]), "--data.cache_dir", str(pair["cache"]), "--seq-len", "32", "--batch-size",
                     "4", "--steps", "3", "--train.precision", "fp32", "--fused-loss", fused, "--out", str(out)]) == 0
        return [r for r in read_metrics(out) if r["split"] == "train"], capsys.readouterr().out

    plain, _ = run(pair["teacher"], tmp_path / "plain")
    shared, log = run(pair["teacher_plus"], tmp_path / "shared")
    assert shared[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    assert [r["loss"] for r in shared] == pytest.approx([r["loss"] for r in plain], rel=1e-3)
    line = next(ln for ln in log.splitlines() if ln.startswith("shared vocabulary:"))
    assert "the student's 300 token ids of the teacher's 302" in line and "its mass on its 2 other tokens" in line
    mass = float(line.split("other tokens: ")[1].split()[0])
    assert 0 < mass < 1
    record = json.loads((tmp_path / "shared" / "summary.json").read_text())["shared_vocab"]
    assert record["student_ids"] == 300 and record["teacher_ids"] == 302 and record["tokens"] > 0
    assert f"{record['outside_mass']:.3g}" == f"{mass:.3g}"  # the logged number, kept in summary.json
    assert "shared_vocab" not in json.loads((tmp_path / "plain" / "summary.json").read_text())
    # the saved student keeps its own tokenizer (300 tokens), and tailkd eval reads the run's extended teacher
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "shared" / "final")) == 300
    assert main(["eval", "--student", str(tmp_path / "shared" / "final"), "--max-rows", "4", "--out",
                 str(tmp_path / "e.json")]) == 0


def test_a_teacher_cache_with_a_shared_vocabulary_is_refused_up_front(pair, tmp_path, capsys):
    """The cache tailkd cache-teacher writes for the extended teacher holds the teacher's tokenisation and its
    probabilities over all 302 ids: a run distilling over the student's 300 refuses it before its run folder is made
    and before any model loads (`prepare.check_before_models` reads the two tokenizers alone), saying so (not
    "rebuild it with tailkd cache-teacher", which would write the same cache)."""
    from tailkd.cli import main

    cache_dir = tmp_path / "tc"
    assert main(["cache-teacher", "--teacher", str(pair["teacher_plus"]), "--data", str(pair["corpus"]),
                 "--cache-dir", str(pair["cache"]), "--seq-len", "32", "--k", "4", "--max-rows", "4", "--out",
                 str(cache_dir), "--device", "cpu"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    with no_model_loads("the tokenizers were checked"):
        assert main(["distill", "--teacher", str(pair["teacher_plus"]), "--student", str(pair["student"]), "--data",
                     str(pair["corpus"]), "--data.cache_dir", str(pair["cache"]), "--seq-len", "32", "--batch-size",
                     "4", "--steps", "1", "--train.precision", "fp32", "--loss", "tad", "--k", "4", "--teacher-cache",
                     str(cache_dir), "--out", str(out)]) == 2  # the cache's K: a larger one is refused first
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("tailkd: error: teacher.cache does not combine with a teacher vocabulary extending the student's "
                    "(the student's 300 token ids of the teacher's 302): a cache holds the teacher's own tokenisation "
                    "and probabilities over all its ids; drop --teacher-cache to distil from the online teacher, "
                    "renormalised over the shared ids")
    assert not out.exists()


def test_a_student_of_another_tokenizer_is_refused_before_any_model_loads(pair, tmp_path, capsys):
    """`vocab.relation` refused a --student whose tokenizer is not the teacher's (nor extended by it) only after
    both models had loaded (minutes for a large teacher); `prepare.check_before_models` reads the two tokenizers
    alone first and gives the same line: here the student's vocabulary extends the teacher's, the wrong way round."""
    from tailkd.cli import main

    out = tmp_path / "run"
    with no_model_loads("the tokenizers were checked"):
        assert main(["distill", "--teacher", str(pair["student"]), "--student", str(pair["teacher_plus"]), "--data",
                     str(pair["corpus"]), "--data.cache_dir", str(pair["cache"]), "--seq-len", "32", "--batch-size",
                     "4", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tailkd: error: teacher and student tokenizers differ ("), err
    assert "extends the student's" in err[0] and not out.exists()


def test_real_vocab_size_is_the_largest_id_plus_one_or_the_tokenizers_length():
    """`vocab.real_vocab_size`: a vocabulary with an id gap (0, 1, 5: 3 tokens) can emit id 5, so 6 rows are needed,
    not len() = 3; a tokenizer whose get_vocab() leaves out tokens that len() counts (ids 0..2 listed, 5 tokens):
    len()."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from tailkd.vocab import real_vocab_size

    gappy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "b": 1, "c": 5}, unk_token="a")))
    assert len(gappy) == 3 and gappy.convert_tokens_to_ids("c") == 5
    assert real_vocab_size(gappy) == 6

    class Partial:  # get_vocab without two added tokens
        def get_vocab(self):
            return {"a": 0, "b": 1, "c": 2}

        def __len__(self):
            return 5

    assert real_vocab_size(Partial()) == 5


# --------------------------------------------------------------------------- a pruned LM head (Apertus 1.5)


def _apertus15(vocab, output_vocab=None, **overrides):
    """A tiny Apertus 1.5 text config (transformers after 5.17: skipped under an older one)."""
    import transformers

    if not hasattr(transformers, "Apertus1p5TextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Apertus 1.5")
    return transformers.Apertus1p5TextConfig(
        vocab_size=vocab, output_vocab_size=output_vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **overrides)


def test_a_pruned_head_scores_the_first_ids_of_its_vocabulary(tiny_tokenizer):
    """`head_ids`: Apertus 1.5's output_vocab_size below vocab_size prunes its head to ids 0..n-1; equal to it (the
    config keeps None) or unset, the head is whole, as any other config's. V is the smaller of the ids the two heads
    score (`scored_vocab`), whichever model is pruned; the input embeddings keep every row."""
    import transformers

    from tailkd.vocab import head_ids, scored_vocab

    assert head_ids(_apertus15(TINY_VOCAB + 24, TINY_VOCAB - 4)) == TINY_VOCAB - 4
    assert head_ids(_apertus15(TINY_VOCAB, TINY_VOCAB)) is None and head_ids(_apertus15(TINY_VOCAB)) is None
    assert head_ids(transformers.LlamaConfig(vocab_size=TINY_VOCAB)) is None
    torch.manual_seed(0)
    pruned = transformers.AutoModelForCausalLM.from_config(_apertus15(TINY_VOCAB, TINY_VOCAB - 4))
    assert pruned.lm_head.weight.shape[0] == TINY_VOCAB - 4 and pruned.model.embed_tokens.weight.shape[0] == TINY_VOCAB
    assert scored_vocab(tiny_tokenizer, pruned) == TINY_VOCAB - 4
    whole = make_tiny_lm("llama")
    assert scored_vocab(tiny_tokenizer, whole) == TINY_VOCAB
    assert check_vocab(tiny_tokenizer, tiny_tokenizer, pruned, whole) == TINY_VOCAB - 4
    assert check_vocab(tiny_tokenizer, tiny_tokenizer, whole, pruned) == TINY_VOCAB - 4
    short = make_tiny_lm("llama", vocab_size=TINY_VOCAB - 1)  # its head covers the V ids scored, not its inputs
    with pytest.raises(TailkdError, match=rf"^the teacher's input embedding has {TINY_VOCAB - 1} rows but the "
                                          rf"tokenizer has {TINY_VOCAB} tokens"):
        check_vocab(tiny_tokenizer, tiny_tokenizer, short, pruned)


def test_the_largest_label_of_rows_reads_labels_only(tmp_path):
    """`tailkd.data.max_label`: of packed rows, tokens 1..rows·T (row i's labels; the first token is an input only and
    the tokens past the last full row are in no row); of SFT rows, the targets (-100 where the prompt is); of a list
    of rows, their labels; of id lists, their ids; -100 where nothing has a target."""
    from tailkd.data import IGNORE_INDEX, PackedRows, max_label
    from tailkd.sft import SFTExample, SFTRows

    tokens = np.array([90, 3, 4, 5, 6, 7, 8, 80], dtype=np.uint32)  # T = 3: rows [90 3 4 | 5], [5 6 7 | 8]; 80 left
    (tmp_path / "train.bin").write_bytes(tokens.tobytes())
    (tmp_path / "meta.json").write_text(json.dumps({"eos_id": None}))
    rows = PackedRows(tmp_path / "train.bin", 3)
    assert len(rows) == 2 and max_label(rows) == 8 == max(int(rows[i]["labels"].max()) for i in range(2))
    examples = [SFTExample("p", "r"), SFTExample("q", "s")]
    encoded = [(np.array([50, 2, 9]), np.array([0, 0, 1])), (np.array([60, 70, 1]), np.array([0, 0, 1]))]
    sft = SFTRows(examples, encoded, seq_len=4, mode="pad", pad_id=0, chat_template=None)
    assert max_label(sft) == 9 == max(int(sft[i]["labels"].max()) for i in range(2))  # 50, 60, 70: prompt tokens
    assert max_label([sft[0], sft[1]]) == 9 and max_label([[4, 11], [], [2]]) == 11
    assert max_label([]) == max_label([[]]) == IGNORE_INDEX


def test_labels_a_pruned_head_cannot_score_are_refused_in_one_line(tiny_tokenizer):
    """`check_labels`: with V below the tokenizer's ids, a label ≥ V is named with its token; a label V - 1 passes;
    with V the tokenizer's own every label is a token below it, and nothing is read."""
    from tailkd.vocab import check_labels

    rows = [{"labels": torch.tensor([-100, 5, TINY_VOCAB - 3])}]
    check_labels(TINY_VOCAB - 2, tiny_tokenizer, {"training": rows})
    token = tiny_tokenizer.convert_ids_to_tokens(TINY_VOCAB - 3)
    with pytest.raises(TailkdError, match=rf"^the held-out rows hold the label {re.escape(repr(token))} \(id "
                                          rf"{TINY_VOCAB - 3}\), but the LM heads score ids 0\.\.{TINY_VOCAB - 4} "
                                          r"only"):
        check_labels(TINY_VOCAB - 3, tiny_tokenizer, {"training": [], "held-out": rows})

    class Unread:
        def max_label(self):
            raise AssertionError("read")

    check_labels(TINY_VOCAB, tiny_tokenizer, {"training": Unread()})


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """An Apertus 1.5 teacher P whose tokenizer is the tiny one (300 ids) with 24 tokens after them, its LM head
    pruned to the 300; the same teacher F with a whole head (P's 300 rows, then 24 drawn ones); a 2-layer Llama student
    with 324 embedding and head rows, saved with P's tokenizer and with the 300-token one."""
    import transformers
    from tiny import make_tokenizer, write_corpus

    root = tmp_path_factory.mktemp("pruned_head")
    text_tok, tok = make_tokenizer(), make_tokenizer()
    tok.add_tokens([f"<|visual token {i}|>" for i in range(24)])
    assert len(text_tok) == 300 and len(tok) == 324
    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(_apertus15(324, 300))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40)  # a peaked teacher (the initialisation's logits are nearly uniform)
    whole = transformers.AutoModelForCausalLM.from_config(_apertus15(324))
    state = teacher.state_dict()
    state["lm_head.weight"] = torch.cat([state["lm_head.weight"], torch.randn(24, 64)])
    whole.load_state_dict(state)
    student = make_tiny_lm("llama", vocab_size=324, num_hidden_layers=2)
    hot = copy.deepcopy(student)
    with torch.no_grad():
        hot.lm_head.weight[300:] *= 50  # its 24 extra rows take almost all the mass
    for name, model, tokenizer in (("P", teacher, tok), ("F", whole, tok), ("student", student, tok),
                                   ("student300", student, text_tok), ("hot", hot, tok)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {**{name: root / name for name in ("P", "F", "student", "student300", "hot")},
            "corpus": write_corpus(root / "corpus.txt"), "cache": root / "cache"}


@pytest.mark.parametrize("fused", ["off", "on"])
def test_a_pruned_head_teaches_as_the_whole_head_renormalised_over_its_ids(pruned, tmp_path, capsys, fused):
    """Distilling from P (its head pruned to ids 0..299) is distilling from F renormalised over those ids (a
    student of the 300 text tokens: shared-vocabulary distillation, `tailkd.vocab`): the same 300 teacher logits, from
    GEMMs of another width (float32 dot products ~1e-6 relative apart), the student's sliced to them in both, so step
    1's loss within 1e-5 and the next (Adam moves each weight by ≤ lr whatever the gradient's size) within 1e-3. P's
    run needs no renormalisation (no "shared vocabulary" line); a student built from P keeps the pruned head and
    loads with AutoModelForCausalLM; tailkd eval reads the run's teacher over the 300 ids."""
    from tiny import read_metrics
    from transformers import AutoModelForCausalLM

    from tailkd.cli import main

    def run(teacher, student, out, *more):
        student = ["--student", str(student)] if student else []
        assert main(["distill", "--teacher", str(teacher), *student, "--data", str(pruned["corpus"]),
                     "--data.cache_dir", str(pruned["cache"]), "--seq-len", "32", "--batch-size", "4", "--steps",
                     "3", "--train.precision", "fp32", "--fused-loss", fused, "--out", str(out), *more]) == 0
        return [r for r in read_metrics(out) if r["split"] == "train"], capsys.readouterr().out

    own, log = run(pruned["P"], pruned["student"], tmp_path / "pruned")
    assert "shared vocabulary:" not in log
    renormalised, log = run(pruned["F"], pruned["student300"], tmp_path / "whole")
    assert "the student's 300 token ids of the teacher's 324" in log
    assert own[0]["loss"] == pytest.approx(renormalised[0]["loss"], rel=1e-5)
    assert [r["loss"] for r in own] == pytest.approx([r["loss"] for r in renormalised], rel=1e-3)
    assert main(["eval", "--student", str(tmp_path / "pruned" / "final"), "--max-rows", "4", "--out",
                 str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["vocab"] == 300
    run(pruned["P"], None, tmp_path / "built", "--student.num_layers", "1", "--student.hidden_size", "32")
    built = AutoModelForCausalLM.from_pretrained(tmp_path / "built" / "final")
    assert built.lm_head.weight.shape == (300, 32) and built.model.embed_tokens.weight.shape == (324, 32)


def test_a_pruned_teachers_cache_is_over_the_ids_it_scores(pruned, tmp_path, capsys):
    """tailkd cache-teacher on P stores its top-K over the 300 ids its head scores, and a run reads it: the teacher
    scores no more ids than the student, so it is no teacher extending the student's vocabulary (refused with a
    cache)."""
    from tiny import read_metrics

    from tailkd.cli import main

    cache_dir = tmp_path / "tc"
    assert main(["cache-teacher", "--teacher", str(pruned["P"]), "--data", str(pruned["corpus"]), "--cache-dir",
                 str(pruned["cache"]), "--seq-len", "32", "--k", "4", "--out", str(cache_dir),
                 "--device", "cpu"]) == 0
    assert json.loads((cache_dir / "cache.json").read_text())["vocab_size"] == 300
    assert main(["distill", "--teacher", str(pruned["P"]), "--student", str(pruned["student"]), "--data",
                 str(pruned["corpus"]), "--data.cache_dir", str(pruned["cache"]), "--seq-len", "32", "--batch-size",
                 "4", "--steps", "2", "--train.precision", "fp32", "--loss", "tad", "--k", "4", "--teacher-cache",
                 str(cache_dir), "--out", str(tmp_path / "run")]) == 0
    steps = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)


def _spelling_corpus(pruned, path):
    """The corpus with three documents first spelling one of P's 24 extra tokens (added as plain tokens, so text
    holds them): in the training rows (the held-out fraction takes later documents)."""
    path.write_text("the <|visual token 3|> the end\n\n" * 3 + pruned["corpus"].read_text())
    return path


def test_a_cache_of_the_whole_head_with_a_pruned_student_is_refused(pruned, tmp_path, capsys):
    """F's cache holds its probabilities over its 324 ids; a student whose head scores the first 300 (P as the
    student: the same tokenizer) distils over those, F renormalised over them, which the cache's top-K cannot give:
    refused in one line saying so, before any step."""
    from tailkd.cli import main

    cache_dir = tmp_path / "tc"
    assert main(["cache-teacher", "--teacher", str(pruned["F"]), "--data", str(pruned["corpus"]), "--cache-dir",
                 str(pruned["cache"]), "--seq-len", "32", "--k", "4", "--out", str(cache_dir), "--device", "cpu"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(pruned["F"]), "--student", str(pruned["P"]), "--data",
                 str(pruned["corpus"]), "--data.cache_dir", str(pruned["cache"]), "--seq-len", "32", "--batch-size",
                 "4", "--steps", "1", "--loss", "tad", "--k", "4", "--teacher-cache", str(cache_dir), "--out",
                 str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tailkd: error: teacher.cache does not combine with a student whose LM head is pruned below the teacher's "
        "ids (the student's 300 token ids of the teacher's 324): a cache holds the teacher's own tokenisation and "
        "probabilities over all its ids; drop --teacher-cache to distil from the online teacher, renormalised over "
        "the shared ids")
    assert not out.exists()


def test_data_holding_a_token_the_pruned_head_drops_is_refused(pruned, tmp_path, capsys):
    """A corpus spelling one of P's 24 extra tokens gives a label the pruned head cannot score: refused in one line,
    exit 2, no run folder left."""
    from tailkd.cli import main

    corpus = _spelling_corpus(pruned, tmp_path / "corpus.txt")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(pruned["P"]), "--student", str(pruned["student"]), "--data",
                 str(corpus), "--data.cache_dir", str(pruned["cache"]), "--seq-len", "32", "--batch-size", "4",
                 "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("tailkd: error: the training rows hold the label '<|visual token 3|>' (id 303), but the LM "
                       "heads score ids 0..299 only (a head pruned to them: its config's output_vocab_size): give "
                       "data without such tokens (text tokenised as text holds none)"), err
    assert not out.exists()


def test_an_on_policy_student_samples_only_the_ids_the_pruned_teacher_scores(pruned, tmp_path):
    """On-policy distillation from P samples the student's responses over V = the 300 ids P's head scores (the run's
    V reaches the sampler: `on_policy_from_config`), though the student's head has 324 rows and its 24 extra ones
    take almost all the mass: an unrestricted sampler would label ids P cannot score, which the loss cannot take."""
    from tiny import SENTENCES, read_metrics

    from tailkd.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}: {SENTENCES[i % len(SENTENCES)]}\n",
                                         "response": f" {SENTENCES[(3 * i + 1) % len(SENTENCES)]}"}) + "\n"
                             for i in range(40)))
    run = tmp_path / "run"
    assert main(["distill", "--task", "sft", "--teacher", str(pruned["P"]), "--student", str(pruned["hot"]), "--data",
                 str(pairs), "--data.cache_dir", str(pruned["cache"]), "--seq-len", "96", "--batch-size", "4",
                 "--steps", "2", "--loss", "rkl", "--train.precision", "fp32", "--train.on_policy", "1",
                 "--train.on_policy_max_new_tokens", "6", "--out", str(run)]) == 0
    steps = [r for r in read_metrics(run) if r["split"] == "train"]
    assert len(steps) == 2 and all(r["generated_tokens"] > 0 and math.isfinite(r["loss"]) for r in steps)


@pytest.mark.parametrize("command", ["eval", "analyze-teacher", "cache-teacher", "select-data", "select-data-cross"])
def test_every_command_refuses_labels_the_pruned_head_cannot_score(pruned, tmp_path, capsys, command):
    """tailkd eval, analyze-teacher and cache-teacher read the training rows here (--split train; cache-teacher's
    default), select-data the documents (with a reference of another tokenizer, each model's own tokenization: P's
    holds the label): each refuses the label P cannot score in one line, exit 2, nothing written."""
    from tailkd.cli import main

    data = ["--data", str(_spelling_corpus(pruned, tmp_path / "corpus.txt")), "--cache-dir", str(pruned["cache"]),
            "--seq-len", "32"]
    out = tmp_path / "out"
    args = {"eval": ["--teacher", str(pruned["P"]), "--student", str(pruned["student"]), "--split", "train", "--out",
                     str(out / "eval.json")],
            "analyze-teacher": ["--teacher", str(pruned["P"]), "--split", "train", "--out", str(out)],
            "cache-teacher": ["--teacher", str(pruned["P"]), "--k", "4", "--out", str(out), "--device", "cpu"],
            "select-data": ["--teacher", str(pruned["P"]), "--reference", str(pruned["P"]), "--out", str(out)],
            "select-data-cross": ["--teacher", str(pruned["P"]), "--reference", str(pruned["student300"]), "--out",
                                  str(out)]}
    assert main([command.removesuffix("-cross"), *data, *args[command]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    rows = {"select-data": "documents'", "select-data-cross": "teacher's"}.get(command, "training")
    assert err[-1] == (f"tailkd: error: the {rows} rows hold the label '<|visual token 3|>' (id 303), but the LM heads "
                       "score ids 0..299 only (a head pruned to them: its config's output_vocab_size): give data "
                       "without such tokens (text tokenised as text holds none)"), err
    assert not out.exists()


def test_analyze_teacher_reads_a_pruned_teacher_over_the_ids_it_scores(pruned, tmp_path, capsys):
    """tailkd analyze-teacher on P: its statistics over the 300 ids its head scores (teacher_analysis.json's vocab),
    and a --kmax above them (below the tokenizer's 324) refused in one line."""
    from tailkd.cli import main

    args = ["analyze-teacher", "--teacher", str(pruned["P"]), "--data", str(pruned["corpus"]), "--cache-dir",
            str(pruned["cache"]), "--seq-len", "32", "--max-rows", "4"]
    assert main([*args, "--kmax", "310", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tailkd: error: analyze.kmax=310 is more than the vocabulary of {pruned['P']} (300 tokens), where α_K = 0 "
        "for every K >= V; give --kmax 300 or less")
    assert main([*args, "--kmax", "300", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "teacher_analysis.json").read_text())[str(pruned["P"])]["vocab"] == 300


def test_a_student_of_a_pruned_head_keeps_it_untied():
    """Tied to the input embeddings (every id), a student's head would no longer be the teacher's pruned one:
    --student.tie_embeddings true is refused in one line; the teacher's setting (untied) builds."""
    import transformers

    from tailkd.student import build_student

    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(_apertus15(TINY_VOCAB + 24, TINY_VOCAB))
    with pytest.raises(TailkdError, match=rf"^student\.tie_embeddings true, but the teacher's LM head scores its first "
                                          rf"{TINY_VOCAB} ids only \(output_vocab_size; its embeddings read "
                                          rf"{TINY_VOCAB + 24}\): "):
        build_student(teacher, num_layers=1, tie_embeddings=True)
    student, _ = build_student(teacher, num_layers=1)
    assert student.lm_head.weight.shape[0] == TINY_VOCAB and not student.config.tie_word_embeddings
