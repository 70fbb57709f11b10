"""tailkd.vocab: one shared vocabulary, a teacher vocabulary extending the student's (distillation over the shared
ids with the teacher renormalised over them), and everything else refused."""

import json
import math

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
