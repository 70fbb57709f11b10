"""tailkd.generation: diversity metrics, batched decoding, generation_eval (answers: test_answers.py)."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_tokenizer, make_tiny_lm
from test_onpolicy import _fixed_lm as fixed_distribution_lm
from test_sft import CHATML, IM_END, IM_START, chatml_tokenizer

from tailkd.errors import TailkdError
from tailkd.generation import (
    answer_scores,
    check_references,
    distinct_n,
    diversity,
    generate,
    generate_tokens,
    generation_eval,
    rouge_l,
    self_bleu,
    sentence_bleu,
)
from tailkd.sft import SFTExample, prepare_sft, render_chat

# --------------------------------------------------------------------------- diversity, closed form


def test_distinct_n_closed_form():
    same = ["a b c d"] * 4
    assert [distinct_n(same, n) for n in (1, 2, 3, 4)] == [4 / 16, 3 / 12, 2 / 8, 1 / 4]
    disjoint = ["a b c d", "e f g h", "i j k l"]
    assert [distinct_n(disjoint, n) for n in (1, 2, 3, 4)] == [1.0] * 4
    assert distinct_n(["a a a b"], 1) == 2 / 4 and distinct_n(["a a a b"], 2) == 2 / 3
    assert distinct_n(["a b"], 3) == 0.0  # no trigram at all
    with pytest.raises(ValueError):
        distinct_n(same, 0)


def test_distinct_n_of_k_copies_is_one_over_k_only_with_an_n_gram():
    """The docstring's claims, exactly: k copies of a text with at least n words and no repeated n-gram score 1/k
    (u/(k·u) and 1/k are the same correctly rounded quotient); shorter than n, the copies have no n-gram and score
    0, as any set without one does (the docstring said 1/k for any text without internal repeats)."""
    for text in ("a", "a b", "a b c d", "a a b", "x y x z"):
        words = text.split()
        for n in (1, 2, 3, 4):
            repeats = len(set(zip(*(words[i:] for i in range(n))))) < len(words) - n + 1
            for k in (1, 2, 3, 7):
                got = distinct_n([text] * k, n)
                if len(words) < n:
                    assert got == 0.0, (text, n, k)
                elif not repeats:
                    assert got == 1 / k, (text, n, k)
    assert distinct_n([], 1) == 0.0 and distinct_n(["a b", "c"], 3) == 0.0


def test_sentence_bleu_by_hand():
    # p1 = 3/4, p2 = (2+1)/(3+1), p3 = (1+1)/(2+1), p4 = (0+1)/(1+1), BP = 1 (same length)
    want = (3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert sentence_bleu("a b c d", ["a b c e"]) == pytest.approx(want, abs=1e-12)
    # brevity penalty: hypothesis 2 words, closest reference 4 words -> exp(1 - 4/2); clipped counts
    want = math.exp(1 - 2) * ((2 / 2) * ((1 + 1) / (1 + 1)) * (1 / 1) * (1 / 1)) ** 0.25
    assert sentence_bleu("a b", ["a b c d", "x y z w v u"]) == pytest.approx(want, abs=1e-12)
    assert sentence_bleu("the the the the", ["the cat"]) < sentence_bleu("the cat", ["the cat"]) == 1.0
    assert sentence_bleu("", ["a"]) == 0.0 and sentence_bleu("a", [""]) == 0.0
    assert sentence_bleu("", ["a", " "]) == 1.0  # identical (empty) hypothesis and reference
    for hyp in ("", "a"):
        with pytest.raises(ValueError, match="at least one reference"):
            sentence_bleu(hyp, [])


def test_sentence_bleu_averages_over_max_order_precisions():
    """BLEU = BP · exp((1/N) Σ_{n≤N} log p_n) with N = max_order: "a b c" vs "a b d" has p_1 = 2/3,
    p_2 = (1 + 1)/(2 + 1) (add-one for n ≥ 2), BP = 1 (equal lengths); N = 1 and N = 2 give 2/3, N = 3 adds
    p_3 = (0 + 1)/(1 + 1). A handful of float64 operations: within 1e-15 relative."""
    assert sentence_bleu("a b c", ["a b d"], max_order=1) == pytest.approx(2 / 3, rel=1e-15)
    assert sentence_bleu("a b c", ["a b d"], max_order=2) == pytest.approx(2 / 3, rel=1e-15)
    want = (2 / 3 * 2 / 3 * 1 / 2) ** (1 / 3)
    assert sentence_bleu("a b c", ["a b d"], max_order=3) == pytest.approx(want, rel=1e-15)


def test_identical_empty_samples_are_not_read_as_diverse():
    """A student that ends every sample at once: Self-BLEU 1 (all samples identical), as Distinct-n says (0),
    not 0, which would rank it the most diverse."""
    assert self_bleu(["", "", ""]) == 1.0 and distinct_n(["", "", ""], 1) == 0.0
    assert self_bleu(["", "a b"]) == 0.0  # nothing shared
    assert diversity([["", ""], ["a b", "c d"]])["self_bleu"] == 0.5


def test_self_bleu_closed_form():
    assert self_bleu(["a b c d e"] * 3) == 1.0
    assert self_bleu(["a b c d", "e f g h", "i j k l"]) == 0.0
    mixed = ["a b c d", "a b c e", "x y z w"]
    want = (sentence_bleu(mixed[0], mixed[1:]) + sentence_bleu(mixed[1], [mixed[0], mixed[2]])
            + sentence_bleu(mixed[2], mixed[:2])) / 3
    assert self_bleu(mixed) == pytest.approx(want) and 0 < want < 1
    with pytest.raises(ValueError, match="at least 2 samples"):
        self_bleu(["only one"])
    with pytest.raises(ValueError, match="at least one group"):
        diversity([])
    d = diversity([["a b c d"] * 2, ["a b c d", "e f g h"]])
    assert d["self_bleu"] == pytest.approx(0.5) and d["distinct_1"] == pytest.approx((4 / 8 + 1.0) / 2)


def test_sentence_bleu_equals_sacrebleu_add_one():
    sacrebleu = pytest.importorskip("sacrebleu")
    from sacrebleu.metrics import BLEU

    ref_impl = BLEU(smooth_method="add-k", smooth_value=1, tokenize="none", effective_order=False)
    rng = random.Random(0)
    words = ["a", "b", "c", "d", "e", "f", "g"]
    for _ in range(200):
        hyp = " ".join(rng.choices(words, k=rng.randint(4, 12)))
        refs = [" ".join(rng.choices(words, k=rng.randint(4, 12))) for _ in range(rng.randint(1, 3))]
        want = ref_impl.sentence_score(hyp, refs).score / 100
        assert sentence_bleu(hyp, refs) == pytest.approx(want, abs=1e-9), (hyp, refs, sacrebleu.__version__)


# --------------------------------------------------------------------------- fidelity: ROUGE-L, by hand


def test_rouge_l_by_hand():
    pytest.importorskip("rouge_score")
    # reference "the cat sat on the mat" (6 words), candidate "the cat on the mat" (5 words):
    # LCS = "the cat on the mat" = 5, P = 5/5, R = 5/6, F = 2PR/(P+R) = (10/6)/(11/6) = 10/11
    assert rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(10 / 11, abs=1e-12)
    # stemming: "cats" -> "cat", "mats" -> "mat" (Porter, words of 4+ letters), so the texts are the same words:
    # LCS = 6, P = R = F = 1. Unstemmed the LCS would be "the sat on the" = 4, F = 4/6.
    assert rouge_l(["The cats sat on the mats."], ["the cat sat on the mat"]) == pytest.approx(1.0, abs=1e-12)
    # word order: reference "a b c d", candidate "d c b a": the LCS is one word, P = R = 1/4, F = 1/4
    assert rouge_l(["d c b a"], ["a b c d"]) == pytest.approx(0.25, abs=1e-12)
    # no shared word: LCS = 0, F = 0; an empty completion: no word, F = 0
    assert rouge_l(["dogs bark loudly"], ["the cat sat on the mat"]) == 0.0
    assert rouge_l([""], ["the cat sat"]) == 0.0
    # the mean over pairs: (10/11 + 0 + 1) / 3
    mean = rouge_l(["the cat on the mat", "x y", "#### 12"], ["the cat sat on the mat", "a b", "12"])
    assert mean == pytest.approx((10 / 11 + 0 + 1) / 3, abs=1e-12)  # "#### 12": punctuation is no word
    with pytest.raises(ValueError, match="references"):
        rouge_l(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="references"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        rouge_l([], [])


def test_rouge_l_missing_package_and_missing_references(monkeypatch):
    check_references(["a", " b "])
    with pytest.raises(TailkdError, match=r"2 of 3 held-out examples have an empty reference \(first: example 2\)"):
        check_references(["a", "  ", ""])
    with pytest.raises(TailkdError, match=r"first: d\.jsonl:7"):
        check_references(["a", ""], ["d.jsonl:3", "d.jsonl:7"])
    with pytest.raises(TailkdError, match=r"first: d\.jsonl:1\)"):
        check_references(["", "a", " "], ["d.jsonl:1", "d.jsonl:2", "d.jsonl:3"])
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # as if not installed
    with pytest.raises(TailkdError, match=r"pip install rouge-score"):
        rouge_l(["a"], ["a"])
    model = ScriptedLM(build_tiny_tokenizer(), lambda p: "#### 0")
    with pytest.raises(TailkdError, match=r"pip install rouge-score"):
        generation_eval(model, None, model.tok, [("Q1\n", "#### 2")], max_new_tokens=8, progress=False)
    assert model.prompts == []  # reported before any decoding


# --------------------------------------------------------------------------- generate on a real tiny HF model


PROMPTS = ["The quick", "A", "Rain is expected across the", "The team won"]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_lm(seed=1), build_tiny_tokenizer()


def manual_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Independent reference: one prompt, no padding, no cache, argmax of a full forward per step."""
    ids = tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            t = int(logits.argmax())
            if t == tokenizer.eos_token_id:
                break
            new.append(t)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_generate_matches_a_manual_unpadded_decode(tiny):
    model, tok = tiny
    out = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    assert len(out) == len(PROMPTS) and all(len(o) == 1 for o in out)
    assert [o[0] for o in out] == [manual_greedy(model, tok, p, 6) for p in PROMPTS]
    again = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=1, progress=False)
    assert again == out  # left padding does not change greedy results; deterministic


def test_generate_batches_prompts_of_similar_length(tiny, monkeypatch):
    """Prompts are decoded in order of length, ``batch_size`` at a time, so a batch pads
    its prompts to the nearest lengths; the completions come back in the prompts' order."""
    import tailkd.generation as generation

    model, tok = tiny
    batches, real = [], generation.generate_ids

    def recording(model, prompts, **kwargs):
        batches.append([len(p) for p in prompts])
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_ids", recording)
    prompts = [*PROMPTS, "Rain", "The quick brown fox jumps"]
    lengths = [len(tok(p, add_special_tokens=False, split_special_tokens=True)["input_ids"]) for p in prompts]
    out = generate(model, tok, prompts, max_new_tokens=3, batch_size=2, progress=False)
    assert [n for batch in batches for n in batch] == sorted(lengths) and [len(b) for b in batches] == [2, 2, 2]
    assert out == [[manual_greedy(model, tok, p, 3)] for p in prompts]


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(tiny):
    model, tok = tiny
    model.train()
    state = torch.get_rng_state()
    kw = {"max_new_tokens": 8, "batch_size": 2, "do_sample": True, "num_return_sequences": 3, "progress": False}
    a = generate(model, tok, PROMPTS, seed=5, **kw)
    assert torch.equal(torch.get_rng_state(), state) and model.training  # RNG and train mode restored
    b = generate(model, tok, PROMPTS, seed=5, **kw)
    c = generate(model, tok, PROMPTS, seed=6, **kw)
    assert a == b and a != c
    assert len(a) == 4 and all(len(g) == 3 for g in a)
    assert len({s for g in a for s in g}) > 4  # random tiny model at T=1: samples differ


def test_generate_argument_errors(tiny):
    model, tok = tiny
    with pytest.raises(TailkdError, match="positions"):
        generate(model, tok, ["x" * 100], max_new_tokens=64, progress=False)  # 128 positions
    with pytest.raises(TailkdError, match="max-new-tokens"):
        generate(model, tok, PROMPTS, max_new_tokens=0, progress=False)
    with pytest.raises(ValueError, match="do_sample"):
        generate(model, tok, PROMPTS, max_new_tokens=2, num_return_sequences=2, progress=False)
    with pytest.raises(TailkdError, match="empty"):
        generate(model, tok, [""], max_new_tokens=2, progress=False)
    with pytest.raises(TailkdError, match="batch-size"):
        generate(model, tok, PROMPTS, max_new_tokens=2, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate(model, tok, PROMPTS, max_new_tokens=2, num_return_sequences=0, do_sample=True, progress=False)
    for temperature, top_p in ((0.0, 1.0), (1.0, 0.0), (1.0, 1.5)):
        with pytest.raises(TailkdError, match="sampling needs"):
            generate(model, tok, PROMPTS, max_new_tokens=2, do_sample=True, temperature=temperature, top_p=top_p,
                     progress=False)
    assert generate(model, tok, [], max_new_tokens=2) == []


def test_a_prompt_may_fill_the_models_positions_exactly():
    """A prompt of L tokens with max_new_tokens N needs L + N positions: L + N = 128 (the tiny model's positions) is
    decoded, L + N = 129 refused before decoding."""
    model, tok = make_tiny_lm(seed=1), build_tiny_tokenizer()
    prompt = "The quick " * 12
    n = 128 - len(tok(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    assert len(generate(model, tok, [prompt], max_new_tokens=n, progress=False)) == 1
    with pytest.raises(TailkdError, match="positions"):
        generate(model, tok, [prompt], max_new_tokens=n + 1, progress=False)


def test_generate_with_a_tokenizer_without_a_pad_token(tiny):
    """A tokenizer without a pad token (Llama's) pads with its first stop token: the completions are those of a
    tokenizer that has one (padding is masked)."""
    model, tok = tiny
    bare = build_tiny_tokenizer()
    bare.pad_token = None
    assert bare.pad_token_id is None
    assert generate(model, bare, PROMPTS, max_new_tokens=4, batch_size=4, progress=False) == \
        generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=4, progress=False)


def test_decoding_ignores_the_checkpoints_generation_config():
    """A checkpoint's generation_config (Qwen2.5-Instruct's sets repetition_penalty 1.05, others num_beams) does not
    change generate's decoding: greedy stays the argmax of each step (the manual unpadded decode)."""
    model, tok = make_tiny_lm(seed=1), build_tiny_tokenizer()
    model.generation_config.num_beams = 4
    model.generation_config.repetition_penalty = 10.0
    out = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4, progress=False)
    assert [o[0] for o in out] == [manual_greedy(model, tok, p, 6) for p in PROMPTS]


def _fixed_lm(tok, probs: dict[str, float]) -> torch.nn.Module:
    """tests/test_onpolicy.py's LM of one next-token distribution at every position, ``probs`` mapping one-token texts
    to their probabilities, every other id 1e-12."""
    p = torch.full((TINY_VOCAB,), 1e-12)
    for text, q in probs.items():
        (i,) = tok(text, add_special_tokens=False)["input_ids"]
        p[i] = q
    return fixed_distribution_lm(make_tiny_lm, p)


LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _samples(model, tok, n: int, **sampling) -> list[str]:
    """``n`` sampled one-token completions of one prompt."""
    return generate(model, tok, ["Q"], max_new_tokens=1, do_sample=True, num_return_sequences=n, progress=False,
                    **sampling)[0]


def test_sampling_settings_reach_the_sampler():
    """generate's sampling: temperature, nucleus top_p and no top-k cut, each observable on a fixed distribution.

    - top_p 0.8 of p(a) = 0.6, p(b) = 0.3, 0.1 over the other 60 letters keeps {a, b}: without it each of 200 draws
      falls outside with probability 0.1 (all inside: 0.9^200 < 1e-9).
    - temperature 0.05 of p(a) = 0.6, 0.4 over the other 61: each other letter weighs (0.4 / 61 / 0.6)^20 < 1e-39
      against a, so 200 draws are all a (at temperature 1: probability 0.6^200 < 1e-44).
    - no top-k: 400 draws from p_i ∝ exp(−i/1000) over 62 letters (distinct probabilities: a top-k cut keeps exactly
      k of them, none tied with the k-th; each p_i ≥ 0.0156) show more than 50 letters, where transformers' default
      top-k 50 allows 50 at most. Fewer would need some 12 letters all missed: below C(62, 12)·(1 − 12·0.0156)^400
      < 2e-24."""
    tok = build_tiny_tokenizer()
    rest = [c for c in LETTERS if c not in "ab"]
    nucleus = _fixed_lm(tok, {"a": 0.6, "b": 0.3} | {c: 0.1 / len(rest) for c in rest})
    assert set(_samples(nucleus, tok, 200, top_p=0.8)) == {"a", "b"}
    peaked = _fixed_lm(tok, {"a": 0.6} | {c: 0.4 / (len(LETTERS) - 1) for c in LETTERS[1:]})
    assert set(_samples(peaked, tok, 200, temperature=0.05)) == {"a"}
    weights = [math.exp(-i / 1000) for i in range(len(LETTERS))]
    spread = _fixed_lm(tok, {c: w / sum(weights) for c, w in zip(LETTERS, weights)})
    assert len(set(_samples(spread, tok, 400))) > 50


# --------------------------------------------------------------------------- scripted stand-ins at the HF interface


class ScriptedLM(torch.nn.Module):
    """Stands in for an HF causal LM at ``generate``: answers each (decoded) prompt with ``reply(prompt)``,
    then a stop token, then junk that must never reach the output, then padding. Checks left padding."""

    def __init__(self, tokenizer, reply):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.tok, self.reply, self.prompts, self.stops = tokenizer, reply, [], None

    def generate(self, input_ids, attention_mask, max_new_tokens, num_return_sequences, eos_token_id, pad_token_id,
                 **kw):
        self.stops = list(eos_token_id)
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            n = sum(mask)
            assert mask == [0] * (len(mask) - n) + [1] * n and ids[:len(ids) - n] == [pad_token_id] * (len(ids) - n)
            prompt = self.tok.decode(ids[len(ids) - n:])
            self.prompts.append(prompt)
            new = self.tok(self.reply(prompt), add_special_tokens=False)["input_ids"]
            new = (new + [eos_token_id[-1]] + self.tok("#### 999", add_special_tokens=False)["input_ids"])
            rows += [ids + new[:max_new_tokens]] * num_return_sequences
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def math_rows(tmp_path, tok, n=6, template=None):
    objs = [{"prompt": f"Q{i}: {i}+{i}?\n", "response": f"{i} plus {i} makes {2 * i}.\n#### {2 * i}"} for i in range(n)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(o) + "\n" for o in objs))
    _, held, _ = prepare_sft([f], tok, seq_len=128, chat_template=template, heldout_fraction=0.5)
    return held


def test_generation_eval_copy_model_scores_1_and_constant_model_0(tmp_path):
    tok = build_tiny_tokenizer()
    held = math_rows(tmp_path, tok)
    refs = {e.prompt: e.response for e in held.examples}
    copier = ScriptedLM(tok, lambda p: refs[p])
    constant = ScriptedLM(tok, lambda p: "I think\n#### 7")  # 7 is no reference answer (they are even)
    res = generation_eval(copier, constant, tok, held, max_new_tokens=40, batch_size=2, samples=3, progress=False,
                          return_outputs=True)
    assert res["examples"] == len(held.examples) == 3
    assert res["student_exact_match"] == 1.0 and res["teacher_exact_match"] == 0.0
    assert res["student_strict_exact_match"] == 1.0 and res["teacher_strict_exact_match"] == 0.0
    assert res["student_answer_rate"] == 1.0 == res["teacher_answer_rate"]
    assert res["student_sample_exact_match"] == 1.0 and res["teacher_sample_exact_match"] == 0.0
    assert res["student_self_bleu"] == 1.0  # three identical samples per prompt
    assert res["teacher_distinct_1"] == pytest.approx(3 / 9)  # "I think #### 7" three times
    # the output stops at the stop token: the "#### 999" after it never shows up
    assert res["outputs"]["student"] == [e.response for e in held.examples]
    assert sorted(set(copier.prompts)) == sorted(refs)


def test_generation_eval_teacher_optional_and_limit(tmp_path):
    tok = build_tiny_tokenizer()
    held = math_rows(tmp_path, tok, n=10)
    model = ScriptedLM(tok, lambda p: "#### 0")
    res = generation_eval(model, None, tok, held, max_new_tokens=8, limit=2, progress=False)
    assert res["examples"] == 2 and not any(k.startswith("teacher") for k in res)
    assert "student_self_bleu" not in res and "outputs" not in res  # no sampling, no outputs asked for
    pairs = [("Q: 1+1?\n", "#### 2"), ("Q: 2+2?\n", "4")]
    res = generation_eval(ScriptedLM(tok, lambda p: "so 2"), None, tok, pairs, max_new_tokens=8, progress=False)
    assert res["student_exact_match"] == 0.5 and res["student_strict_exact_match"] == 0.0
    with pytest.raises(TailkdError, match="no held-out"):
        generation_eval(model, None, tok, [], max_new_tokens=8, progress=False)


def test_answer_rate_counts_greedy_outputs_with_any_number():
    """answer_rate: the fraction of greedy outputs from which an answer is read at all, by the flexible rule (a
    last number counts, no #### needed): "so 2" is an answer (a wrong one here), "no idea" is not."""
    tok = build_tiny_tokenizer()
    pairs = [("Q1\n", "#### 4"), ("Q2\n", "#### 6")]
    replies = {"Q1\n": "so 2", "Q2\n": "no idea"}
    res = generation_eval(ScriptedLM(tok, lambda p: replies[p]), None, tok, pairs, max_new_tokens=8, progress=False,
                          rouge=False)
    assert res["student_answer_rate"] == 0.5 and res["student_exact_match"] == 0.0


def test_generation_eval_rouge_l_of_student_and_teacher(tmp_path):
    pytest.importorskip("rouge_score")
    tok = build_tiny_tokenizer()
    pairs = [("Q1\n", "one plus one makes two"), ("Q2\n", "the cat sat on the mat")]
    replies = {"Q1\n": "one plus one", "Q2\n": "the cat on the mat"}
    student = ScriptedLM(tok, lambda p: replies[p])
    teacher = ScriptedLM(tok, lambda p: "no idea")
    res = generation_eval(student, teacher, tok, pairs, max_new_tokens=40, samples=2, progress=False)
    # Q1: LCS = 3, P = 3/3, R = 3/5, F = 2·(3/5)/(8/5) = 3/4; Q2: F = 10/11 (test_rouge_l_by_hand); no overlap: 0
    want = (3 / 4 + 10 / 11) / 2
    assert res["student_rougeL"] == pytest.approx(want, abs=1e-12) and res["teacher_rougeL"] == 0.0
    assert res["student_sample_rougeL"] == pytest.approx(want, abs=1e-12)  # the scripted samples = greedy
    assert res["student_exact_match"] == 0.0  # exact match stays beside it
    assert res["student_self_bleu"] == 1.0  # two samples (identical here): their diversity is reported
    off = generation_eval(student, None, tok, pairs, max_new_tokens=40, progress=False, rouge=False)
    assert not any("rouge" in k for k in off)


def test_generation_eval_refuses_missing_references_before_decoding(tmp_path):
    tok = build_tiny_tokenizer()
    model = ScriptedLM(tok, lambda p: "#### 0")
    pairs = [("Q1\n", "#### 2"), ("Q2\n", "   ")]
    with pytest.raises(TailkdError, match=r"ROUGE-L needs a reference response .* example 2\).*--generate.rouge false"):
        generation_eval(model, None, tok, pairs, max_new_tokens=8, progress=False)
    assert model.prompts == []  # refused before any decoding
    res = generation_eval(model, None, tok, pairs, max_new_tokens=8, progress=False, rouge=False)
    assert res["student_strict_exact_match"] == 0.0 and "student_rougeL" not in res
    assert "student_rougeL" in generation_eval(model, None, tok, pairs, max_new_tokens=8, progress=False, limit=1)


def test_chat_prompts_are_rendered_with_the_template_and_stop_at_end_of_turn(tmp_path):
    tok = chatml_tokenizer()
    held = math_rows(tmp_path, tok, template="auto")
    assert held.chat_template == tok.chat_template
    model = ScriptedLM(tok, lambda p: "#### 0")
    generation_eval(model, None, tok, held, max_new_tokens=8, progress=False)
    want = {render_chat(tok, [{"role": "user", "content": e.prompt}], add_generation_prompt=True)
            for e in held.examples}
    assert set(model.prompts) == want
    assert model.stops == [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)]


def test_held_out_rows_are_prompted_with_their_own_template(tmp_path):
    """Held-out SFTRows rendered in training with a template other than the tokenizer's are prompted with that
    template (the one training used), not the tokenizer's: here ChatML whose default system prompt says "Be exact"
    where the tokenizer's says "Be brief"."""
    tok = chatml_tokenizer()
    own = CHATML.replace("Be brief", "Be exact")
    held = math_rows(tmp_path, tok, template=own)
    assert held.chat_template == own != tok.chat_template
    model = ScriptedLM(tok, lambda p: "#### 0")
    generation_eval(model, None, tok, held, max_new_tokens=8, progress=False, rouge=False)
    assert set(model.prompts) == {render_chat(tok, [{"role": "user", "content": e.prompt}], chat_template=own,
                                              add_generation_prompt=True) for e in held.examples}


def test_examples_are_prompted_as_chats_with_a_template_and_scored_against_the_last_assistant_turn():
    """A sequence of SFTExamples: with ``chat_template`` given, plain (prompt, response) examples are prompted as
    one-turn chats through it; a chat example's reference is the content of its last assistant turn (its
    ``response`` field is None)."""
    tok = chatml_tokenizer()
    own = CHATML.replace("Be brief", "Be exact")
    plain = [SFTExample("d.jsonl:1", prompt="Q: 1+1?\n", response="#### 2"),
             SFTExample("d.jsonl:2", prompt="Q: 2+2?\n", response="#### 4")]
    model = ScriptedLM(tok, lambda p: "#### 2")
    res = generation_eval(model, None, tok, plain, max_new_tokens=8, chat_template=own, progress=False, rouge=False)
    assert set(model.prompts) == {render_chat(tok, [{"role": "user", "content": e.prompt}], chat_template=own,
                                              add_generation_prompt=True) for e in plain}
    assert res["student_exact_match"] == 0.5
    turns = ({"role": "user", "content": "Q: 3+3?"}, {"role": "assistant", "content": "it is 6\n#### 6"},
             {"role": "user", "content": "and 4+4?"}, {"role": "assistant", "content": "#### 8"})
    chats = [SFTExample("c.jsonl:1", messages=turns)]
    assert chats[0].response is None
    res = generation_eval(ScriptedLM(tok, lambda p: "#### 8"), None, tok, chats, max_new_tokens=8, progress=False)
    assert res["student_strict_exact_match"] == 1.0 and res["student_rougeL"] == 1.0


def test_completions_are_decoded_without_special_tokens():
    """A special token the model emits before its stop (ChatML's <|im_start|> after a plain prompt, where only EOS
    stops) is left out of the text, as generate's docstring says."""
    tok = chatml_tokenizer()
    model = ScriptedLM(tok, lambda p: IM_START + "#### 4")
    assert generate(model, tok, ["Q\n"], max_new_tokens=8, progress=False) == [["#### 4"]]


def test_one_sample_per_prompt_reports_its_accuracy_not_its_diversity():
    """samples = 1: the sampled exact match is reported (diversity needs two samples per prompt, so not that), read
    by the flexible rule as the greedy one is: "so 2" matches "#### 2" (strictly it would not)."""
    tok = build_tiny_tokenizer()
    pairs = [("Q: 1+1?\n", "#### 2"), ("Q: 2+2?\n", "4")]
    res = generation_eval(ScriptedLM(tok, lambda p: "so 2"), None, tok, pairs, max_new_tokens=8, samples=1,
                          progress=False, rouge=False)
    assert res["student_sample_exact_match"] == 0.5 == res["student_exact_match"]
    assert res["student_strict_exact_match"] == 0.0
    assert not {"student_self_bleu", "student_distinct_1"} & set(res)


def test_generate_on_chat_prompts_with_a_real_model(tmp_path):
    tok = chatml_tokenizer()
    model = make_tiny_lm(vocab_size=len(tok), max_position_embeddings=256)
    chats = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "What is 2+2?"}]]
    out = generate(model, tok, chats, max_new_tokens=5, batch_size=2, progress=False)
    ref = generate(model, tok, chats, max_new_tokens=5, batch_size=1, progress=False)
    assert out == ref and len(out) == 2 and all(isinstance(o[0], str) for o in out)
    assert TINY_VOCAB < len(tok)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2", None])
def test_ngram_orders_must_be_positive_integers(bad):
    """An n-gram order that is not an integer >= 1 is a ValueError naming it: True ran as n = 1 (Python counts it as
    1), 2.0 failed inside range() with a TypeError, sentence_bleu's max_order = 0 divided by zero."""
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        distinct_n(["a b c"], bad)
    with pytest.raises(ValueError, match="max_order must be an integer >= 1"):
        sentence_bleu("a b c", ["a b c"], max_order=bad)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        diversity([["a b", "c d"]], orders=(1, bad))


def test_ngram_orders_accept_numpy_integers():
    np = pytest.importorskip("numpy")
    assert distinct_n(["a b a b"], np.int64(2)) == distinct_n(["a b a b"], 2) == 2 / 3
    assert sentence_bleu("a b c", ["a b d"], max_order=np.int32(2)) == sentence_bleu("a b c", ["a b d"], max_order=2)


def test_diversity_counts_a_prompt_without_n_grams_as_zero():
    """The docstring's rule: a prompt whose samples are all shorter than n words is in the mean with distinct-n 0
    (a collapsed prompt lowers the score; averaging over the other prompts only would hide it)."""
    d = diversity([["a b c", "d e f"], ["", ""]])
    assert d["distinct_1"] == (1.0 + 0.0) / 2 and d["distinct_3"] == (1.0 + 0.0) / 2
    assert diversity([["a b", "c d"]])["distinct_3"] == 0.0


# --------------------------------------------------------------------------- the teacher's view of the answers


def test_answer_scores_are_plain_sums_over_the_answer_tokens():
    """answer_scores: over every answer token (an EOS ending an answer included), KL(p‖q), KL(q‖p) and the teacher's
    −log p of the token, summed over all answers and divided once by their count, equal a float64 reference of plain
    sums over one full forward of prompt + answer each (no padding, batching or masking), float64 models: ~1e-16
    relative per operation over sums of < 10^4 terms, checked at 1e-10."""
    tok = build_tiny_tokenizer()
    student, teacher = make_tiny_lm(seed=1).double(), make_tiny_lm(seed=2).double()
    eos = tok.eos_token_id
    answers = [[40, 41, eos], [7], [11, 12, 13, 14, 15], [eos]]  # any ids: the arithmetic, not the decoding
    got = answer_scores(student, teacher, tok, PROMPTS[:4], answers, name="student", vocab=TINY_VOCAB, batch_size=3)
    kl = rkl = nll = 0.0
    n = 0
    for prompt, answer in zip(PROMPTS[:4], answers):
        p_ids = tok(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids = p_ids + answer
        with torch.no_grad():
            zs = student(input_ids=torch.tensor([ids])).logits[0, :, :TINY_VOCAB]
            zt = teacher(input_ids=torch.tensor([ids])).logits[0, :, :TINY_VOCAB]
        for t in range(len(p_ids) - 1, len(ids) - 1):  # position t predicts ids[t + 1], an answer token
            lq, lp = torch.log_softmax(zs[t], 0), torch.log_softmax(zt[t], 0)
            kl += sum(float(lp[i].exp() * (lp[i] - lq[i])) for i in range(TINY_VOCAB))
            rkl += sum(float(lq[i].exp() * (lq[i] - lp[i])) for i in range(TINY_VOCAB))
            nll -= float(lp[ids[t + 1]])
            n += 1
    assert got["student_answer_tokens"] == n == sum(map(len, answers))
    for key, want in (("kl", kl / n), ("rkl", rkl / n), ("teacher_nll", nll / n)):
        assert math.isclose(got[f"student_answers_{key}"], want, rel_tol=1e-10), (key, got, want)


def test_generation_eval_scores_each_models_greedy_answers_with_their_stop_token(tmp_path):
    """With a judge, generation_eval scores each model's greedy answers — those it decodes, a stop token that ended
    one kept last (`generate_tokens(keep_stop=True)`: the ids without it plus the stop) — and no reference is needed;
    without a judge there are no such keys."""
    tok = build_tiny_tokenizer()
    student, teacher = make_tiny_lm(seed=1), make_tiny_lm(seed=2)
    scripted = ScriptedLM(tok, lambda p: "so 2")  # stops at once: its answers end with the stop token
    cut = generate_tokens(scripted, tok, PROMPTS[:3], max_new_tokens=8, progress=False)
    kept = generate_tokens(scripted, tok, PROMPTS[:3], max_new_tokens=8, progress=False, keep_stop=True)
    assert all(s for (_, s), in cut) and [k for (k, _), in kept] == [c + [tok.eos_token_id] for (c, _), in cut]
    pairs = [(p, "") for p in PROMPTS[:3]]  # no references: ROUGE off
    res = generation_eval(student, teacher, tok, pairs, max_new_tokens=6, progress=False, rouge=False, judge=teacher)
    for name, model in (("student", student), ("teacher", teacher)):
        answers = [o[0][0] for o in generate_tokens(model, tok, PROMPTS[:3], max_new_tokens=6, progress=False,
                                                    keep_stop=True)]
        want = answer_scores(student, teacher, tok, PROMPTS[:3], answers, name=name, vocab=TINY_VOCAB)
        assert {k: res[k] for k in want} == want
    assert res["teacher_answers_kl"] != res["student_answers_kl"]  # the two models' answers differ
    plain = generation_eval(student, teacher, tok, pairs, max_new_tokens=6, progress=False, rouge=False)
    assert not any("_answers_" in k or k.endswith("_answer_tokens") for k in plain)
    assert {k: v for k, v in res.items() if k in plain} == plain


def test_generation_eval_generates_and_scores_only_the_ids_both_heads_score():
    """``vocab``: a student whose LM head has rows past the tokenizer's ids (made to win here) decodes only the
    tokenizer's ids (its greedy answers checked here; sampling takes the same ``vocab``), and its answers are scored
    over them (a label past them would have no
    teacher probability)."""
    tok = build_tiny_tokenizer()
    student, teacher = make_tiny_lm(seed=1, vocab_size=TINY_VOCAB + 40), make_tiny_lm(seed=2)
    with torch.no_grad():
        student.lm_head.weight[TINY_VOCAB:] *= 50
    plain = generate_tokens(student, tok, PROMPTS, max_new_tokens=4, progress=False)
    assert any(t >= TINY_VOCAB for o in plain for t in o[0][0])  # the premise: unsuppressed, padded rows win
    pairs = [(p, "") for p in PROMPTS]
    res = generation_eval(student, None, tok, pairs, max_new_tokens=4, samples=2, progress=False, rouge=False,
                          judge=teacher, vocab=TINY_VOCAB, return_outputs=True)
    answers = [o[0][0] for o in generate_tokens(student, tok, PROMPTS, max_new_tokens=4, progress=False,
                                                vocab=TINY_VOCAB, keep_stop=True)]
    assert all(t < TINY_VOCAB for a in answers for t in a)
    assert res["outputs"]["student"] == [tok.decode(a, skip_special_tokens=True) for a in answers]
    assert res["student_answer_tokens"] == sum(map(len, answers))


def test_answers_are_scored_only_where_every_scoring_model_has_the_positions():
    """A judge of fewer positions than the decoding student: a prompt whose answers could outgrow them is refused in
    one line before any decoding (its learned positions raised an IndexError after decoding, RoPE ones were read past
    their range); without a judge nothing is checked beyond the decoding model's own positions."""
    tok = build_tiny_tokenizer()
    student, judge = make_tiny_lm(seed=1), make_tiny_lm(seed=2, max_position_embeddings=16)
    student.generate = None  # a decoding would fail otherwise: the refusal comes first
    pairs = [("The quick", ""), ("A", "")]
    with pytest.raises(TailkdError, match=r"^prompt 0 has 8 tokens; with --max-new-tokens 9 its answers exceed the 16 "
                                          r"positions the models scoring them take"):
        generation_eval(student, None, tok, pairs, max_new_tokens=9, progress=False, rouge=False, judge=judge)
    assert len(tok("The quick", add_special_tokens=False)["input_ids"]) == 8  # the premise: 8 + 9 > 16, 8 + 8 fits
    student = make_tiny_lm(seed=1)
    res = generation_eval(student, None, tok, pairs, max_new_tokens=8, progress=False, rouge=False, judge=judge)
    assert res["student_answer_tokens"] > 0


def test_a_judge_without_vocab_scores_over_the_tokenizers_ids():
    """With a judge and no ``vocab``, decoding too keeps to the tokenizer's ids (a padded head's rows would have no
    teacher probability: an IndexError in the judge's embedding)."""
    tok = build_tiny_tokenizer()
    student, teacher = make_tiny_lm(seed=1, vocab_size=TINY_VOCAB + 40), make_tiny_lm(seed=2)
    with torch.no_grad():
        student.lm_head.weight[TINY_VOCAB:] *= 50
    res = generation_eval(student, None, tok, [(p, "") for p in PROMPTS], max_new_tokens=4, progress=False,
                          rouge=False, judge=teacher)
    assert res["student_answer_tokens"] > 0
