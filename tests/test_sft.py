"""tailkd.sft: prompt/response JSONL -> rows whose labels cover exactly the response tokens."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from bounds import assert_within
from conftest import build_tiny_tokenizer, make_tiny_lm
from loss_bounds import lm_logits_err

from tailkd.config import DataConfig
from tailkd.data import RowSampler, collate, collate_rows
from tailkd.errors import TailkdError
from tailkd.sft import (
    IGNORE_INDEX,
    SFTExample,
    SFTRows,
    encode_example,
    encode_prompt,
    prepare_sft,
    read_sft_examples,
    render_chat,
    setup_sft_rows,
    sft_rows_to_prompts,
    stop_token_ids,
)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML with a default system prompt when none is given (like SmolLM2's template).
CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nBe brief<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chatml_tokenizer(template: str | None = CHATML):
    """The tiny byte-level tokenizer (conftest) + ChatML special tokens (ids 262, 263) + a chat template."""
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.chat_template = template
    return tok


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer()


def byte_ids(tok, text: str) -> list[int]:
    """One id per byte: the words used in these tests avoid the tiny tokenizer's merges (Ġt, he, in)."""
    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(ids) == len(text.encode()), f"{text!r} hit a merge; choose other words"
    return ids


def expected_row(tok, parts):
    """Hand-built (input_ids, labels) from ``parts`` = [(ids, is_response)], shifted once."""
    x = [t for ids, _ in parts for t in ids]
    m = [r for ids, r in parts for _ in ids]
    return x[:-1], [x[j] if m[j] else IGNORE_INDEX for j in range(1, len(x))]


def as_lists(row, n):
    return row["input_ids"][:n].tolist(), row["labels"][:n].tolist()


# --------------------------------------------------------------------------- masks, token by token


def test_plain_pair_masks_exactly(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 2+2?\n", "response": "A: 4"}] * 2)
    train, held, info = prepare_sft([f], tok, seq_len=32, chat_template=None, heldout_fraction=0)
    assert info["rendering"] == "plain" and len(held) == 0 and len(train) == 2
    want_in, want_lab = expected_row(tok, [(byte_ids(tok, "Q: 2+2?\n"), False), (byte_ids(tok, "A: 4"), True),
                                           ([tok.eos_token_id], True)])
    row = train[0]
    n = len(want_in)
    assert as_lists(row, n) == (want_in, want_lab)
    # labels shifted exactly once: each label is the NEXT input token; the last label is EOS
    assert want_lab[-1] == tok.eos_token_id and want_lab[-5] == byte_ids(tok, "A")[0]
    assert (row["labels"][n:] == IGNORE_INDEX).all() and (row["input_ids"][n:] == tok.pad_token_id).all()
    assert row["segment_ids"][:n].tolist() == [0] * n and (row["segment_ids"][n:] == 1).all()
    assert row["attention_mask"].tolist() == [1] * n + [0] * (32 - n)  # the padding's 0: for a router's statistics
    assert set(row) == {"input_ids", "labels", "segment_ids", "attention_mask"}  # no position ids: 0..T-1 itself
    assert {k: (v.dtype, v.shape) for k, v in row.items()} == {k: (torch.int64, (32,)) for k in row}


def test_rows_digest_follows_tokens_and_labels(tok, tmp_path):
    pairs = [{"prompt": f"Q: {i}+{i}?\n", "response": f"A: {2 * i}"} for i in range(6)]
    f = write_jsonl(tmp_path / "d.jsonl", pairs)
    g = write_jsonl(tmp_path / "e.jsonl", pairs[:5] + [{"prompt": "Q: 5+5?\n", "response": "A: 11"}])
    h = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "Q: 0+0?\nA", "response": ": 0"}] + pairs[1:])
    build = dict(seq_len=32, chat_template=None, heldout_fraction=0)
    one, two = prepare_sft([f], tok, **build)[0], prepare_sft([f], tok, **build)[0]
    other_response = prepare_sft([g], tok, **build)[0]
    other_mask = prepare_sft([h], tok, **build)[0]  # the same tokens, one fewer labelled
    assert [r["input_ids"].tolist() for r in other_mask] == [r["input_ids"].tolist() for r in one]
    assert one.digest == two.digest and len(one.digest) == 64
    assert len({one.digest, other_response.digest, other_mask.digest,
                prepare_sft([f], tok, **build | {"mode": "pack"})[0].digest}) == 4


def test_rows_digest_follows_the_pad_id(tmp_path):
    """The same examples padded with another id are other rows (their inputs differ at the padding): another
    digest, so a checkpoint does not resume onto them."""
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES[:2])
    other_pad = chatml_tokenizer()
    other_pad.pad_token = other_pad.eos_token
    a, b = (prepare_sft([f], t, seq_len=40, chat_template=None, heldout_fraction=0)[0]
            for t in (chatml_tokenizer(), other_pad))
    assert a.inputs[0].tolist() == b.inputs[0].tolist() and a[0]["input_ids"][-1] != b[0]["input_ids"][-1]
    assert a.digest != b.digest


def test_plain_text_that_spells_a_special_token_stays_text(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x<|endoftext|>", "response": "y"}])
    train, _, _ = prepare_sft([f], tok, seq_len=64, chat_template=None, heldout_fraction=0)
    ids = train[0]["input_ids"].tolist()
    assert ids.count(tok.eos_token_id) == 0  # the real EOS is only the (never input) last token


def test_chat_masks_exactly_single_turn(tok, tmp_path):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo 42"}]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    train, _, info = prepare_sft([f], tok, seq_len=64, heldout_fraction=0)  # chat_template="auto"
    assert info["rendering"] == "chat"
    s, e = tok.convert_tokens_to_ids([IM_START, IM_END])
    nl = byte_ids(tok, "\n")
    parts = [([s], False), (byte_ids(tok, "system\nBe brief"), False), ([e], False), (nl, False),
             ([s], False), (byte_ids(tok, "user\nHi"), False), ([e], False), (nl, False),
             ([s], False), (byte_ids(tok, "assistant\n"), False),
             (byte_ids(tok, "Yo 42"), True), ([e], True),  # content + the end-of-turn token
             (nl, False)]  # the newline after <|im_end|> is scaffolding
    want_in, want_lab = expected_row(tok, parts)
    assert as_lists(train[0], len(want_in)) == (want_in, want_lab)
    assert tok.decode([t for t in want_lab if t != IGNORE_INDEX]) == "Yo 42" + IM_END


def test_chat_masks_exactly_multi_turn_with_system(tok, tmp_path):
    msgs = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "A?"},
            {"role": "assistant", "content": "B."}, {"role": "user", "content": "C?"},
            {"role": "assistant", "content": "D!"}]
    ids, mask = encode_example(tok, read_sft_examples([write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])])[0],
                               CHATML)
    s, e = tok.convert_tokens_to_ids([IM_START, IM_END])
    nl = byte_ids(tok, "\n")
    parts = [([s], False), (byte_ids(tok, "system\nSys"), False), ([e], False), (nl, False),
             ([s], False), (byte_ids(tok, "user\nA?"), False), ([e], False), (nl, False),
             ([s], False), (byte_ids(tok, "assistant\n"), False), (byte_ids(tok, "B."), True), ([e], True), (nl, False),
             ([s], False), (byte_ids(tok, "user\nC?"), False), ([e], False), (nl, False),
             ([s], False), (byte_ids(tok, "assistant\n"), False), (byte_ids(tok, "D!"), True), ([e], True), (nl, False)]
    assert ids.tolist() == [t for p, _ in parts for t in p]
    assert mask.tolist() == [r for p, r in parts for _ in p]


def test_pairs_rendered_with_template_equal_the_chat_form(tok, tmp_path):
    pair = {"prompt": "Hi", "response": "Yo"}
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    a, b = read_sft_examples([write_jsonl(tmp_path / "d.jsonl", [pair, chat])])
    ia, ma = encode_example(tok, a, CHATML)
    ib, mb = encode_example(tok, b, CHATML)
    assert ia.tolist() == ib.tolist() and ma.tolist() == mb.tolist()


def test_explicit_template_string_and_no_template(tmp_path):
    plain_tok = chatml_tokenizer(template=None)
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Yo"}]}])
    with pytest.raises(TailkdError, match="chat template"):
        prepare_sft([f], plain_tok, seq_len=64, heldout_fraction=0)  # auto: no template on this tokenizer
    train, _, info = prepare_sft([f], plain_tok, seq_len=64, heldout_fraction=0, chat_template=CHATML)
    assert info["chat_template"] == CHATML and train.chat_template == CHATML
    g = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "response": "Yo"}])
    _, _, info = prepare_sft([g], plain_tok, seq_len=64, heldout_fraction=0)  # auto without template: plain
    assert info["rendering"] == "plain"


def test_an_empty_tokenizer_template_is_none_and_a_blank_one_passed_is_refused(tmp_path):
    """"auto" with a tokenizer whose chat_template is "" renders plain (it has no template); a template passed that
    is empty or only whitespace is refused, not taken as a template (which would render every turn as nothing)."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?\n", "response": "zzzz"}])
    tok = chatml_tokenizer(template="")
    _, _, info = prepare_sft([f], tok, seq_len=16, heldout_fraction=0)
    assert (info["rendering"], info["chat_template"]) == ("plain", None)
    for blank in ("", " \n"):
        with pytest.raises(TailkdError, match="chat_template must be None, 'auto' or a Jinja template string"):
            prepare_sft([f], tok, seq_len=16, heldout_fraction=0, chat_template=blank)


def test_a_template_passed_wins_over_the_tokenizers(tmp_path):
    """An explicit chat_template renders the rows and finds the stop tokens even when the tokenizer has a template
    of its own (here one with neither headers nor end-of-turn tokens)."""
    tok = chatml_tokenizer(template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "response": "Yo"}])
    train, _, _ = prepare_sft([f], tok, seq_len=64, heldout_fraction=0, chat_template=CHATML)
    ids, _ = encode_example(chatml_tokenizer(), SFTExample("x", prompt="Hi", response="Yo"), CHATML)
    assert train[0]["input_ids"][:len(ids) - 1].tolist() == ids[:-1].tolist()
    assert stop_token_ids(tok, chat=True, chat_template=CHATML) == [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)]


def test_a_tokenizer_without_eos_is_a_tailkd_error(tmp_path):
    """Plain pairs end with EOS and plain generation stops only there: without one, both are one-line errors (not
    int(None)'s TypeError, nor generation that can never stop early)."""
    tok = build_tiny_tokenizer()
    tok.eos_token = None
    assert tok.eos_token_id is None
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?\n", "response": "zzzz"}])
    with pytest.raises(TailkdError, match="has no EOS token to end responses; set tokenizer.eos_token"):
        prepare_sft([f], tok, seq_len=16, heldout_fraction=0, chat_template=None)
    with pytest.raises(TailkdError, match="could never stop early"):
        stop_token_ids(tok, chat=False)


# --------------------------------------------------------------------------- templates that cannot be masked


def test_template_that_rewrites_history_is_refused(tmp_path):
    # renders every earlier assistant turn as "..." once a later turn exists: not append-only
    tmpl = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
            "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}"
            "{{ '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    tok = chatml_tokenizer(tmpl)
    msgs = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
            {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    with pytest.raises(TailkdError, match=r"d\.jsonl:1: .*renders assistant turn 1 differently"):
        prepare_sft([f], tok, seq_len=64, heldout_fraction=0)


def test_token_merge_across_the_boundary_is_refused(tmp_path):
    # generation prompt ends with a space; content "the" -> " the" merges into one token (Ġthe)
    tmpl = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = chatml_tokenizer(tmpl)
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "response": "the"}])
    with pytest.raises(TailkdError, match=r"d\.jsonl:1: .*not a prefix"):
        prepare_sft([f], tok, seq_len=64, heldout_fraction=0)


def test_header_outside_the_generation_prompt_is_refused(tmp_path):
    # add_generation_prompt emits nothing, so the role header would land in the response span
    tmpl = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}")
    tok = chatml_tokenizer(tmpl)
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "response": "Yes"}])
    with pytest.raises(TailkdError, match="scaffolding"):
        prepare_sft([f], tok, seq_len=64, heldout_fraction=0)


def test_template_errors_become_tailkd_errors(tmp_path):
    tok = chatml_tokenizer("{% if messages[0]['role'] == 'user' %}{{ raise_exception('roles must alternate') }}"
                           "{% endif %}")
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "response": "A"}])
    with pytest.raises(TailkdError, match=r"d\.jsonl:1: the chat template failed \(roles must alternate\)"):
        prepare_sft([f], tok, seq_len=64, heldout_fraction=0)


def test_content_spelling_a_template_token_is_refused(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q <|im_end|>", "response": "Yes"}])
    with pytest.raises(TailkdError, match=r"d\.jsonl:1: .*special token"):
        prepare_sft([f], tok, seq_len=64, heldout_fraction=0)


def flagged_tokenizer():
    """Turn markers added as special tokens (``AddedToken(special=True)``) without being named in the tokenizer's
    special-token lists (``all_special_tokens``), as SmolLM2's <file_sep> and 13 others: the tokenizer treats them as
    special (``split_special_tokens`` splits them)."""
    from tokenizers import AddedToken

    tok = build_tiny_tokenizer()
    tok.add_tokens([AddedToken(t, special=True) for t in ("<|user|>", "<|assistant|>", "<|end|>")])
    assert "<|end|>" not in tok.all_special_tokens
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    return tok


def test_special_tokens_the_tokenizer_flags_but_does_not_list():
    """Every special token counts: the end-of-turn (<|end|>) closes the labels and stops generation, and content
    spelling a turn marker is refused. Before, only ``all_special_tokens`` counted: the newline after <|end|> was
    labelled, generation stopped only at EOS, and "<|user|>" in a reply became the special id."""
    tok = flagged_tokenizer()
    end, user = tok.convert_tokens_to_ids(["<|end|>", "<|user|>"])
    chat = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"})
    ids, mask = encode_example(tok, SFTExample("f:1", messages=chat), tok.chat_template)
    assert tok.decode(ids[mask]) == "Yo<|end|>" and ids[-1] != end and not mask[-1]  # the final newline: scaffolding
    assert stop_token_ids(tok, chat=True) == [tok.eos_token_id, end]
    forged = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo <|user|> x"})
    with pytest.raises(TailkdError, match=r"f:2: a assistant message contains the special token '<\\|user\\|>'"):
        encode_example(tok, SFTExample("f:2", messages=forged), tok.chat_template)
    assert user not in encode_example(tok, SFTExample("f:3", prompt="<|user|>", response="x"), None)[0]  # plain: text


def test_an_added_token_that_is_not_special_is_content():
    """Only special tokens forge template structure: an added token NOT flagged special (a tokenizer's extra
    vocabulary) may appear in a message, and inside a response it is labelled like any other content token."""
    tok = chatml_tokenizer()
    tok.add_tokens(["<b>"])
    ids, mask = encode_example(tok, SFTExample("f:1", prompt="Q", response="x <b> y"), CHATML)
    assert tok.convert_tokens_to_ids("<b>") in ids[mask].tolist()
    assert tok.decode(ids[mask]) == "x <b> y" + IM_END


# --------------------------------------------------------------------------- other templates


def test_a_template_without_special_tokens_labels_through_the_turns_end():
    """With no end-of-turn token the labels run to the end of the rendered turn (here its newline), and generation
    stops at EOS alone."""
    tok = chatml_tokenizer()
    tmpl = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
    ids, mask = encode_example(tok, SFTExample("f:1", prompt="Q", response="Yo"), tmpl)
    assert tok.decode(ids) == "user: Q\nassistant: Yo\n" and tok.decode(ids[mask]) == "Yo\n"
    assert stop_token_ids(tok, chat=True, chat_template=tmpl) == [tok.eos_token_id]


def test_labels_run_through_the_last_special_token_of_a_turn():
    """A template closing an assistant turn with two special tokens (<|im_end|> then EOS): both are labelled, as the
    model must learn to emit the whole close; the newline after them is scaffolding."""
    tok = chatml_tokenizer()
    tmpl = CHATML.replace("'<|im_end|>\\n'", "'<|im_end|>' + (eos_token if m['role'] == 'assistant' else '') + '\\n'")
    assert tmpl != CHATML
    ids, mask = encode_example(tok, SFTExample("f:1", prompt="Q", response="Yo"), tmpl)
    assert tok.decode(ids[mask]) == "Yo<|im_end|><|endoftext|>" and not mask[-1]


def test_a_response_with_surrounding_whitespace_is_labelled_whole():
    """A response that starts with a space or ends with a newline is rendered and labelled as written (the check
    that no header precedes the content ignores the whitespace around it)."""
    tok = chatml_tokenizer()
    ids, mask = encode_example(tok, SFTExample("f:1", prompt="Q", response=" Yo\n"), CHATML)
    assert tok.decode(ids[mask]) == " Yo\n" + IM_END


def test_a_merge_after_an_assistant_turn_is_refused():
    """A template without separators: the turn "ah" followed by "ex" renders "ahex", whose tokens merge "h"+"e"
    across the turn's end, so the turn's tokens are no prefix of the conversation's (the turn's own tokens end with a
    lone "h"): refused, where a span to len(turn tokens) would label the next turn's first token."""
    tok = chatml_tokenizer()
    tmpl = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    msgs = ({"role": "user", "content": "Q"}, {"role": "assistant", "content": "ah"}, {"role": "user", "content": "ex"},
            {"role": "assistant", "content": "y"})
    with pytest.raises(TailkdError, match=r"f:1: the tokens of the conversation up to assistant turn 1 are not a "
                                          "prefix"):
        encode_example(tok, SFTExample("f:1", messages=msgs), tmpl)


def test_a_header_the_generation_prompt_does_not_render_is_named():
    """add_generation_prompt emits "<|im_start|>assistant\\n" but the turn renders "<|im_start|>bot\\n": the
    prompt a model is given is not the text it was trained after, told as such (not as a token merge)."""
    tok = chatml_tokenizer()
    tmpl = CHATML.replace("'<|im_start|>' + m['role'] + '\\n'", "'<|im_start|>' + ('bot' if m['role'] == "
                          "'assistant' else m['role']) + '\\n'")
    assert tmpl != CHATML
    with pytest.raises(TailkdError, match="f:1: the chat template renders assistant turn 1 differently"):
        encode_example(tok, SFTExample("f:1", prompt="Q", response="A"), tmpl)


def test_an_eos_that_ends_turns_is_one_stop_token():
    """SmolLM2's EOS is its <|im_end|>: the stop tokens list it once."""
    tok = chatml_tokenizer()
    tok.eos_token = IM_END
    assert stop_token_ids(tok, chat=True) == [tok.convert_tokens_to_ids(IM_END)]


# --------------------------------------------------------------------------- layout: padding and packing


EXAMPLES = [{"prompt": f"Q{i}: {'x' * i}?\n", "response": f"A{i} " + "y" * (2 * i)} for i in range(1, 9)]


def test_packing_keeps_examples_whole_with_their_own_segments(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    padded, _, _ = prepare_sft([f], tok, seq_len=40, chat_template=None, heldout_fraction=0, mode="pad")
    packed, _, info = prepare_sft([f], tok, seq_len=40, chat_template=None, heldout_fraction=0, mode="pack")
    assert len(padded) == 8 and len(packed) < 8 and info["train"]["truncated"] == 0
    assert sorted(k for r in packed.rows for k in r) == list(range(8))  # every example once, in order
    seen = []
    for i in range(len(packed)):
        row = packed[i]
        seg = row["segment_ids"]
        assert seg.shape == (40,) and (seg[1:] >= seg[:-1]).all()  # contiguous, increasing segments
        for s, k in enumerate(packed.rows[i]):
            sel = seg == s
            ref = padded[k]
            n = int(sel.sum())
            # the example's tokens and labels are exactly its padded row's, at its own segment id
            assert row["input_ids"][sel].tolist() == ref["input_ids"][:n].tolist()
            assert row["labels"][sel].tolist() == ref["labels"][:n].tolist()
            seen.append(k)
        tail = seg == len(packed.rows[i])
        assert (row["labels"][tail] == IGNORE_INDEX).all() and (row["input_ids"][tail] == tok.pad_token_id).all()
        assert torch.equal(row["attention_mask"], (~tail).long())  # 0 on the padding alone
    assert seen == list(range(8))
    assert info["train"]["fill"] > padded.stats()["fill"]


def test_packing_fills_a_row_exactly(tok, tmp_path):
    """Next-fit: an example that fits the current row's space exactly goes in it. Each example here is 8 tokens
    ("Q?\\n", 4 response bytes, EOS), so 7 positions: two fill a row of 14 to the last position, with no padding, and
    the third starts the next row."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?\n", "response": r} for r in ("zzzz", "yyyy", "xxxx")])
    packed, _, _ = prepare_sft([f], tok, seq_len=14, chat_template=None, heldout_fraction=0, mode="pack")
    assert packed.rows == [[0, 1], [2]]
    row = packed[0]
    assert row["segment_ids"].tolist() == [0] * 7 + [1] * 7
    first, _ = expected_row(tok, [(byte_ids(tok, "Q?\n"), False), (byte_ids(tok, "zzzz"), True),
                                  ([tok.eos_token_id], True)])
    second, _ = expected_row(tok, [(byte_ids(tok, "Q?\n"), False), (byte_ids(tok, "yyyy"), True),
                                   ([tok.eos_token_id], True)])
    assert row["input_ids"].tolist() == first + second
    assert row["attention_mask"].tolist() == [1] * 14  # a full row: no padding


def test_rows_work_with_the_trainer_collate_and_sampler(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    train, _, _ = prepare_sft([f], tok, seq_len=40, chat_template=None, heldout_fraction=0)
    sampler = RowSampler(len(train), seed=3)
    batch = collate([train[next(sampler)] for _ in range(3)])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (3, 40) for k in batch}


def test_stats_count_positions_labels_and_fill(tok, tmp_path):
    """info's per-split counts from their definitions: ``tokens`` the positions the examples take (an example of L
    tokens takes L - 1), ``response_tokens`` the positions with a label, ``fill`` tokens / (rows · seq_len). Two
    examples "Q?\\n" + 4 response bytes + EOS: 7 positions, 5 labels each (4 bytes and the EOS); padded into rows of
    10, packed into one row of 14."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?\n", "response": r} for r in ("zzzz", "yyyy")])
    for mode, seq_len, rows in (("pad", 10, 2), ("pack", 14, 1)):
        _, _, info = prepare_sft([f], tok, seq_len=seq_len, chat_template=None, heldout_fraction=0, mode=mode)
        stats = info["train"]
        assert (stats["examples"], stats["rows"], stats["tokens"], stats["response_tokens"]) == (2, rows, 14, 10)
        assert stats["fill"] == 14 / (rows * seq_len)


def test_right_padding_after_the_last_response_changes_no_logit(tok, tmp_path):
    """Rows are right-padded to seq_len and batched as the trainer batches them (``collate_rows``); no attention
    mask is passed, which is exact: with causal attention no real token attends to the padding after it."""
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES[:3])
    train, _, _ = prepare_sft([f], tok, seq_len=48, chat_template=None, heldout_fraction=0)
    full = collate_rows(train, [0, 1, 2])
    assert full["row_index"].tolist() == [0, 1, 2]
    width = max(int((train[i]["labels"] != IGNORE_INDEX).nonzero().max()) + 1 for i in range(3))
    assert width < 48
    assert (full["labels"][:, width:] == IGNORE_INDEX).all()  # every position after the last response: no label
    model = make_tiny_lm(vocab_size=len(tok), max_position_embeddings=64)
    with torch.no_grad():
        a = model(input_ids=full["input_ids"]).logits[:, :width]
        b = model(input_ids=full["input_ids"][:, :width]).logits
    # equal in exact arithmetic (causal attention); two float32 forwards of other lengths, each within the
    # forward-error model of loss_bounds.lm_logits_err (taken at the longer length, the larger fan-in)
    dz = lm_logits_err(model, full["input_ids"], len(tok))[2][:, :width]
    assert_within(a, b, 2 * dz[..., None], msg="logits")


def test_truncation_and_drop_counts(tok, tmp_path):
    long = {"prompt": "Q?\n", "response": "z" * 30}
    prompt_too_long = {"prompt": "q" * 40, "response": "r"}
    f = write_jsonl(tmp_path / "d.jsonl", [long, prompt_too_long, EXAMPLES[0]])
    with pytest.warns(UserWarning, match="1 example.* truncated.*1 dropped with no response"):
        train, _, info = prepare_sft([f], tok, seq_len=16, chat_template=None, heldout_fraction=0)
    counts = info["train"]
    assert (counts["truncated"], counts["dropped_no_response"], counts["dropped_overlong"]) == (1, 1, 0)
    assert len(train) == 2
    row = train[0]  # the truncated one: all 16 positions used, labels on the kept response part only
    want_in, want_lab = expected_row(tok, [(byte_ids(tok, "Q?\n"), False), (byte_ids(tok, "z" * 14), True)])
    assert as_lists(row, 16) == (want_in, want_lab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, _, info = prepare_sft([f], tok, seq_len=16, chat_template=None, heldout_fraction=0, overlong="drop")
    assert len(train) == 1 and info["train"]["dropped_overlong"] == 2


@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("case", ["no_response", "overlong"])
def test_each_count_warns_from_either_split(tok, tmp_path, split, case):
    """The warning is given when any one count is non-zero, summed over both splits: here a single example dropped
    (as too long with overlong="drop", or with its prompt filling the row), in the training or the held-out files."""
    bad = {"prompt": "q" * 40, "response": "r"} if case == "no_response" else {"prompt": "Q?\n", "response": "z" * 30}
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES[:2] + [bad] * (split == "train"))
    g = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "new", "response": "one"}] + [bad] * (split == "heldout"))
    n_over, n_none = int(case == "overlong"), int(case == "no_response")
    with pytest.warns(UserWarning, match=f"SFT data: 0 example.* truncated .*, {n_over} dropped as too long, {n_none} "
                                         "dropped with no response token left"):
        _, _, info = prepare_sft([f], tok, seq_len=16, chat_template=None, heldout_paths=[g],
                                 overlong="drop" if case == "overlong" else "truncate")
    assert info[split][f"dropped_{case}"] == 1


def test_an_example_labelled_on_its_first_token_only_has_no_label(tok, tmp_path):
    """The first token is never a target (labels are shifted once), so an example whose only response token is its
    first has no label and is dropped. A template that renders the system message as nothing makes a one-token
    assistant turn the conversation's first token."""
    tmpl = "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    first = {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "y"},
                          {"role": "user", "content": "Q"}]}
    f = write_jsonl(tmp_path / "d.jsonl", [first, {"prompt": "Q", "response": "zz"}])
    _, mask = encode_example(tok, read_sft_examples([f])[0], tmpl)
    assert mask.tolist() == [True, False]
    with pytest.warns(UserWarning, match="0 dropped as too long, 1 dropped with no response token left"):
        train, _, info = prepare_sft([f], tok, seq_len=16, heldout_fraction=0, chat_template=tmpl)
    assert info["train"]["dropped_no_response"] == 1 and [e.source for e in train.examples] == [f"{f}:2"]


# --------------------------------------------------------------------------- held-out split and prompts

@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_an_example_of_exactly_seq_len_plus_one_tokens_is_whole(tok, tmp_path, overlong):
    """seq_len positions hold an example of seq_len + 1 tokens whole (only longer ones are overlong): it is neither
    truncated nor dropped, in either overlong mode, and no warning is given. Here "Q?\\n" + "zzzz" + EOS = 8 tokens
    in a row of 7 positions, labels through the EOS."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?\n", "response": "zzzz"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, _, info = prepare_sft([f], tok, seq_len=7, chat_template=None, heldout_fraction=0, overlong=overlong)
    counts = info["train"]
    assert (counts["truncated"], counts["dropped_overlong"], counts["dropped_no_response"]) == (0, 0, 0)
    want = expected_row(tok, [(byte_ids(tok, "Q?\n"), False), (byte_ids(tok, "zzzz"), True),
                              ([tok.eos_token_id], True)])
    assert len(train) == 1 and as_lists(train[0], 7) == want


def test_an_example_left_with_one_label_is_kept(tok, tmp_path):
    """Only an example left WITHOUT a label is dropped: a one-token prompt truncated to seq_len 1 keeps one position,
    whose label is the response's first token."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "response": "zzz"}, EXAMPLES[0]])
    with pytest.warns(UserWarning, match="truncated"):
        train, _, info = prepare_sft([f], tok, seq_len=1, chat_template=None, heldout_fraction=0)
    assert info["train"]["dropped_no_response"] == 1 and len(train) == 1  # EXAMPLES[0]: its prompt fills the row
    assert as_lists(train[0], 1) == (byte_ids(tok, "Q"), byte_ids(tok, "z"))


def test_heldout_split_is_deterministic_and_prompt_disjoint(tok, tmp_path):
    objs = [{"prompt": f"P{i % 30}", "response": f"R{i}"} for i in range(60)]  # each prompt twice
    f = write_jsonl(tmp_path / "d.jsonl", objs)
    tr1, he1, _ = prepare_sft([f], tok, seq_len=32, chat_template=None, heldout_fraction=0.2, seed=1)
    _, he2, _ = prepare_sft([f], tok, seq_len=32, chat_template=None, heldout_fraction=0.2, seed=1)
    _, he3, _ = prepare_sft([f], tok, seq_len=32, chat_template=None, heldout_fraction=0.2, seed=2)
    assert [e.source for e in he1.examples] == [e.source for e in he2.examples]
    assert {e.source for e in he1.examples} != {e.source for e in he3.examples}
    train_prompts = {e.prompt for e in tr1.examples}
    assert not train_prompts & {e.prompt for e in he1.examples}
    assert len(he1.examples) == 12 and len(tr1.examples) + len(he1.examples) == 60
    lines = [int(e.source.rsplit(":", 1)[1]) for e in tr1.examples]
    assert lines == sorted(lines)  # file order kept


def test_heldout_split_is_the_documented_hash(tok, tmp_path):
    """The held-out examples are those of the smallest sha256(f"{seed}\\n{prompt as canonical JSON}") (its first 8
    bytes, big-endian), computed here from that rule for pairs and chats with non-ASCII prompts: a run's split must
    not move between versions (its rows' digest, kept by a checkpoint, would no longer match)."""
    objs = [{"prompt": f"Frage {i}: wie?", "response": "R"} for i in range(10)] + [
        {"messages": [{"role": "user", "content": f"Grüß {i}"}, {"role": "assistant", "content": "R"}]}
        for i in range(10)]
    f = write_jsonl(tmp_path / "d.jsonl", objs)

    def key(obj, seed):
        prompt = obj["prompt"] if "prompt" in obj else obj["messages"][:1]
        blob = f"{seed}\n{json.dumps(prompt, sort_keys=True, ensure_ascii=False)}".encode()
        return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")

    for seed in (0, 7):
        _, held, _ = prepare_sft([f], tok, seq_len=64, heldout_fraction=0.25, seed=seed)
        want = sorted(range(20), key=lambda j: key(objs[j], seed))[:5]
        assert sorted(int(e.source.rsplit(":", 1)[1]) - 1 for e in held.examples) == sorted(want)


def test_a_large_heldout_fraction_leaves_one_example_for_training(tok, tmp_path):
    """At most n - 1 held out: 0.95 · 5 rounds to 5, so four of five are held out, not all five (which would be
    refused as if every example shared one prompt)."""
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES[:5])
    train, held, _ = prepare_sft([f], tok, seq_len=40, chat_template=None, heldout_fraction=0.95)
    assert (len(held.examples), len(train.examples)) == (4, 1)


def test_no_training_example_left_by_the_split_is_named(tok, tmp_path):
    """Examples that share one prompt go to one side: if that leaves none for training the message says why, for
    the fraction's split and for held-out files holding every training prompt."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "response": f"R{i}"} for i in range(4)])
    with pytest.raises(TailkdError, match="every SFT example shares one prompt, so none is left for training"):
        prepare_sft([f], tok, seq_len=40, chat_template=None, heldout_fraction=0.5)
    g = write_jsonl(tmp_path / "t.jsonl", EXAMPLES[:2])
    h = write_jsonl(tmp_path / "h.jsonl", EXAMPLES[:3])
    with pytest.raises(TailkdError, match="every training example's prompt is also in the held-out files"):
        prepare_sft([g], tok, seq_len=40, chat_template=None, heldout_paths=[h])


def test_a_small_heldout_fraction_holds_out_one_example(tok, tmp_path):
    """round(fraction · n) held out, at least 1: 0.05 · 5 rounds to 0, so one example of five is held out (not
    none, and not all five)."""
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES[:5])
    train, held, _ = prepare_sft([f], tok, seq_len=40, chat_template=None, heldout_fraction=0.05)
    assert (len(held.examples), len(train.examples)) == (1, 4)


def test_heldout_files_drop_overlapping_training_prompts(tok, tmp_path):
    """Training examples whose prompt a held-out file holds are dropped, and a warning says how many (the one data
    warning said '0 dropped' while a quarter of the examples went)."""
    f = write_jsonl(tmp_path / "train.jsonl", EXAMPLES)
    g = write_jsonl(tmp_path / "held.jsonl", EXAMPLES[:2] + [{"prompt": "new", "response": "one"}])
    with pytest.warns(UserWarning, match=r"^SFT data: 2 of 8 training example\(s\) dropped: their prompt is also in "
                                         r"the held-out files"):
        train, held, info = prepare_sft([f], tok, seq_len=40, chat_template=None, heldout_paths=[g])
    assert info["dropped_train_overlap"] == 2 and len(train.examples) == 6 and len(held.examples) == 3


def _asked(example):
    """The one user turn a pair or a one-turn chat asks, written out here from the data, not by the module."""
    return example.prompt if example.messages is None else example.messages[0]["content"]


@pytest.mark.parametrize("seed", range(6))
def test_a_prompt_given_as_a_pair_and_as_a_chat_is_on_one_side(tok, tmp_path, seed):
    """A data set mixing the formats can hold one question as a pair and as a one-turn chat: a chat template
    renders both prompts alike, so they are one prompt and must not be on both sides of the split (hashing each
    format's own JSON, as the split's hash does, puts some of the ten questions apart for each of these seeds)."""
    pairs = [{"prompt": f"Q{i}?", "response": f"A{i}"} for i in range(10)]
    chats = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"B{i}"}]}
             for i in range(10)]
    f = write_jsonl(tmp_path / "d.jsonl", pairs + chats)
    train, held, _ = prepare_sft([f], tok, seq_len=64, chat_template=CHATML, heldout_fraction=0.25, seed=seed)
    asked = {side: [_asked(e) for e in rows.examples] for side, rows in (("train", train), ("held", held))}
    assert not set(asked["train"]) & set(asked["held"])
    assert sorted(asked["train"] + asked["held"]) == sorted(2 * [f"Q{i}?" for i in range(10)])


def test_heldout_files_drop_a_training_pair_asked_there_as_a_chat(tok, tmp_path):
    """Held-out files in one format remove the same questions given for training in the other."""
    f = write_jsonl(tmp_path / "train.jsonl", EXAMPLES)
    g = write_jsonl(tmp_path / "held.jsonl", [{"messages": [{"role": "user", "content": e["prompt"]},
                                                            {"role": "assistant", "content": "R"}]}
                                              for e in EXAMPLES[:3]])
    train, held, info = prepare_sft([f], tok, seq_len=64, chat_template=CHATML, heldout_paths=[g])
    assert info["dropped_train_overlap"] == 3 and [e.prompt for e in train.examples] == [
        e["prompt"] for e in EXAMPLES[3:]]


@pytest.mark.parametrize("template", [None, CHATML])
def test_generation_prompts_render_exactly_as_training(tok, tmp_path, template):
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES[:4] + [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Done"}]}] * (template is not None))
    rows, _, _ = prepare_sft([f], tok, seq_len=128, chat_template=template, heldout_fraction=0)
    prompts, refs = sft_rows_to_prompts(rows)
    assert refs[:4] == [e["response"] for e in EXAMPLES[:4]]
    for k, (p, r) in enumerate(zip(prompts, refs)):
        assert isinstance(p, str) == (template is None)
        ids = encode_prompt(tok, p, chat_template=rows.chat_template)
        row = rows[k]
        last = int((row["labels"] != IGNORE_INDEX).nonzero().max())  # the last response turn ends here
        n = len(ids)
        # the prompt is the training row up to the first token of the LAST response, and the response follows
        assert row["input_ids"][:n].tolist() == ids
        assert tok.decode(row["labels"][n - 1:last + 1]).removesuffix(IM_END).removesuffix(tok.eos_token) == r


def test_stop_tokens(tok):
    assert stop_token_ids(tok, chat=False) == [tok.eos_token_id]
    assert stop_token_ids(tok, chat=True) == [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)]


def test_render_chat_matches_the_template(tok):
    msgs = [{"role": "user", "content": "Hi"}]
    text = render_chat(tok, msgs, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, match", [
    ('{"prompt": "a", "response": "b"}\nnot json\n', r"d\.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}\n', r'd\.jsonl:1: no "response" field'),
    ('\n{"question": "a", "response": "b"}\n', r'd\.jsonl:2: no "prompt" field'),
    ('{"prompt": "a", "response": 3}\n', r'd\.jsonl:1: "response" is a int'),
    ('{"prompt": "a", "response": "  "}\n', r'd\.jsonl:1: "response" is empty'),
    ('[1, 2]\n', r'd\.jsonl:1: a JSON list, not an object; write \{"prompt": \.\.\., "response": \.\.\.\} or'),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', r'd\.jsonl:1: no "assistant" message'),
    ('{"messages": [{"role": "user"}]}\n', r"d\.jsonl:1: message 0 is not"),
    ('{"messages": []}\n', r'd\.jsonl:1: "messages" must be a non-empty list'),
    ('{"question": "a"}\n', r'd\.jsonl:1: no "prompt" field'),  # the first missing one is named
    ('{"prompt": "a", "response": "b\\ud800"}\n', r'd\.jsonl:1: "response" holds \\ud800, half of a UTF-16 surrogate'),
    ('{"messages": [{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "b"}]}\n',
     r'd\.jsonl:1: message 0\'s "content" holds \\udfff, half of a UTF-16 surrogate pair'),
    ('{"messages": [{"role": "\\udfff", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     r'd\.jsonl:1: message 0\'s "role" holds \\udfff, half of a UTF-16 surrogate pair'),
    pytest.param('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n",  # a RecursionError in Python's parser
                 r"d\.jsonl:1: not valid JSON \(nested too deeply to read\)", id="nested too deep"),
    ("\n  \n", r'd\.jsonl holds no examples .*"response": \.\.\.\} or remove the file'),
    ("", r"d\.jsonl holds no examples"),
])
def test_bad_files_name_file_and_line(tok, tmp_path, content, match):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(TailkdError, match=match):
        prepare_sft([f], tok, seq_len=32)


def test_a_byte_order_mark_before_the_first_line_is_not_text(tok, tmp_path):
    """A file saved with a UTF-8 byte order mark (Windows editors) reads as without one: the mark is not part of the
    first line's JSON (json.loads refuses it) nor of its prompt."""
    line = json.dumps({"prompt": "Q?\n", "response": "zzzz"}) + "\n"
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + line.encode() + line.encode())
    (first, second) = read_sft_examples([f])
    assert first.prompt == second.prompt == "Q?\n" and first.source.endswith(":1")


def test_other_keys_of_a_message_are_ignored(tmp_path):
    """A message's keys besides role and content ("name", ...) are dropped on reading: they reach neither the
    template nor the prompt's key, so the split does not depend on them."""
    named = [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Yo", "weight": 0}]
    plain = [{k: m[k] for k in ("role", "content")} for m in named]
    a, b = read_sft_examples([write_jsonl(tmp_path / "d.jsonl", [{"messages": named}, {"messages": plain}])])
    assert a.messages == b.messages == tuple(plain) and a.key() == b.key()


def test_references_optional_takes_an_empty_response(tmp_path):
    """Prompts to decode (tailkd eval --prompts) may come without a reference: an empty or blank response is kept
    as it is with references_optional, and refused without."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "A", "response": ""}, {"prompt": "B", "response": " "}])
    a, b = read_sft_examples([f], references_optional=True)
    assert (a.prompt, a.reference, b.prompt, b.reference) == ("A", "", "B", " ")
    with pytest.raises(TailkdError, match=r'd\.jsonl:1: "response" is empty'):
        read_sft_examples([f])


def test_references_optional_takes_prompts_without_a_reference(tmp_path):
    """Prompts to decode may leave the reference out: a prompt without "response" and a chat without an assistant
    turn (its prompt: all its messages) read as examples of an empty reference with references_optional; without
    it (training data) both are refused, naming what is missing."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "A"}, {"messages": chat}])
    a, b = read_sft_examples([f], references_optional=True)
    assert (a.prompt, a.reference, a.generation_prompt(chat=False)) == ("A", "", "A")
    assert (b.reference, b.generation_prompt(chat=True)) == ("", chat)
    with pytest.raises(TailkdError, match=r'^.*d\.jsonl:1: no "response" field \(found keys \[\'prompt\'\]\); every '
                                          r'line needs "prompt" and "response", or "messages"$'):
        read_sft_examples([f])
    g = write_jsonl(tmp_path / "g.jsonl", [{"messages": chat}])
    with pytest.raises(TailkdError, match=r'g\.jsonl:1: no "assistant" message, so nothing to train on'):
        read_sft_examples([g])
    h = write_jsonl(tmp_path / "h.jsonl", [{"question": "A"}])
    with pytest.raises(TailkdError, match=r'h\.jsonl:1: no "prompt" field \(found keys \[\'question\'\]\); every '
                                          r'line needs "prompt", or "messages"$'):
        read_sft_examples([h], references_optional=True)


# --------------------------------------------------------------------------- prompts alone (train.on_policy 1)


@pytest.mark.parametrize("template", ["auto", None])
def test_a_prompt_alone_is_the_prompt_its_answered_pair_trains_from(tok, tmp_path, template):
    """With prompt_only a prompt without a response (no "response", a blank one; a chat without an assistant turn)
    is kept for training as a row of its prompt alone: exactly the tokens the same prompt has before its first label
    when it comes with a response — the prompt on-policy sampling answers (`onpolicy.prompt_lengths`, given the
    attention mask) — and no label; the example with a response keeps the row it has without prompt_only."""
    objs = [{"prompt": "Hi\n", "response": "Yo"}, {"prompt": "Hi\n"}, {"prompt": "Hi\n", "response": " "}]
    objs += [{"messages": [{"role": "user", "content": "Hi\n"}]}] if template else []
    f = write_jsonl(tmp_path / "d.jsonl", objs)
    train, _, info = prepare_sft([f], tok, seq_len=64, chat_template=template, heldout_fraction=0, prompt_only=True)
    from tailkd.onpolicy import prompt_lengths

    batch = collate([train[i] for i in range(len(train))])
    lengths = prompt_lengths(batch["labels"], batch["attention_mask"])
    prompts = [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
    text = "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nHi\n<|im_end|>\n<|im_start|>assistant\n" \
        if template else "Hi\n"
    want = tok(text, add_special_tokens=False)["input_ids"] if template else byte_ids(tok, text)
    assert prompts == [want] * len(objs)
    assert (batch["labels"][0] != IGNORE_INDEX).any() and (batch["labels"][1:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1:].sum(1).tolist() == [len(want)] * (len(objs) - 1)  # the prompt, then padding
    g = write_jsonl(tmp_path / "g.jsonl", objs[:1])
    (alone, _, _), first = prepare_sft([g], tok, seq_len=64, chat_template=template, heldout_fraction=0), train[0]
    assert all(torch.equal(alone[0][k], first[k]) for k in first)
    assert (info["train"]["prompt_only"], info["train"]["examples"]) == (len(objs) - 1, len(objs))
    assert info["train"]["response_tokens"] == int((first["labels"] != IGNORE_INDEX).sum())


def test_a_prompt_alone_needs_room_for_one_answer_token(tok, tmp_path):
    """A prompt alone is never truncated: one of seq_len tokens fills its row (the student's first token is the label
    of its last position), one of seq_len + 1 is dropped and counted."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abcd"}, {"prompt": "abcde"}, {"prompt": "ab", "response": "c"}])
    train, _, info = prepare_sft([f], tok, seq_len=4, chat_template=None, heldout_fraction=0, prompt_only=True)
    assert [e.prompt for e in train.examples] == ["abcd", "ab"] and info["train"]["dropped_no_response"] == 1
    assert train[0]["input_ids"].tolist() == byte_ids(tok, "abcd") and train[0]["attention_mask"].tolist() == [1] * 4


def test_a_chat_prompt_alone_may_not_spell_special_tokens(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": f"a{IM_END}b"}]}])
    with pytest.raises(TailkdError, match=r"d\.jsonl:1: a user message contains the special token '<\|im_end\|>'"):
        prepare_sft([f], tok, seq_len=64, heldout_fraction=0, prompt_only=True)


def test_held_out_prompts_alone_are_dropped_counted_and_warned_of(tok, tmp_path):
    """Held out, a prompt alone has nothing to score: dropped and counted, with a warning; where the held-out split
    holds nothing else, `setup_sft_rows` refuses it in one line naming --heldout-data."""
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"P{i}\n", **({"response": f"R{i}"} if i % 2 else {})}
                                           for i in range(40)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, held, info = prepare_sft([f], tok, seq_len=32, chat_template=None, heldout_fraction=0.25, prompt_only=True)
    n = info["heldout"]["dropped_prompt_only"]
    assert 0 < n < 10 and len(held) == 10 - n and not any(e.prompt_only for e in held.examples)
    assert [str(w.message) for w in caught] == [f"SFT data: {n} held-out example(s) hold a prompt alone, which the "
                                                "held-out metrics cannot score: not used (--heldout-data FILE gives "
                                                "held-out responses)"]
    g = write_jsonl(tmp_path / "g.jsonl", [{"prompt": f"P{i}\n"} for i in range(40)])
    data = DataConfig(task="sft", paths=[str(g)], seq_len=32, chat_template="none", heldout_fraction=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TailkdError, match=r"^the SFT held-out split holds prompts alone \(10\), which the held-out "
                                              r"metrics cannot score; pass --heldout-data FILE with responses"):
            setup_sft_rows(data, tok, tmp_path / "cache")


def test_below_lambda_one_a_line_without_a_response_says_how_prompts_alone_train(tok, tmp_path):
    """Training files are read strictly unless prompt_only: a missing or blank response, or a chat without an
    assistant turn, is refused naming file and line, and the message says where prompts alone do train; held-out
    files (always strict) name no such option."""
    hint = r" \(prompts alone train fully on-policy: --train\.on_policy 1\)$"
    for line, why in (({"prompt": "a"}, r'no "response" field \(found keys \[\'prompt\'\]\); every line needs '
                                         r'"prompt" and "response", or "messages"'),
                      ({"prompt": "a", "response": " "}, r'"response" is empty; remove the line or give the reference '
                                                         r'answer'),
                      ({"messages": [{"role": "user", "content": "a"}]}, r'no "assistant" message, so nothing to train '
                                                                         r'on; add the assistant reply')):
        f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "b", "response": "c"}, line])
        with pytest.raises(TailkdError, match=rf"d\.jsonl:2: {why}{hint}"):
            prepare_sft([f], tok, seq_len=32, heldout_fraction=0)
        g = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "b", "response": "c"}] * 2)
        with pytest.raises(TailkdError, match=rf"d\.jsonl:2: {why}$"):
            prepare_sft([g], tok, seq_len=32, heldout_paths=[f])


def test_a_blank_prompt_alone_is_refused(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "  "}])
    with pytest.raises(TailkdError, match=r'd\.jsonl:2: the "prompt" is empty and there is no response: nothing to '
                                          r"answer; remove the line"):
        prepare_sft([f], tok, seq_len=32, chat_template=None, heldout_fraction=0, prompt_only=True)


def test_an_empty_file_after_another_is_refused(tmp_path):
    """Each file must hold an example, not only the first one read."""
    f = write_jsonl(tmp_path / "a.jsonl", EXAMPLES[:2])
    g = tmp_path / "b.jsonl"
    g.write_text("\n")
    with pytest.raises(TailkdError, match=r"b\.jsonl holds no examples"):
        read_sft_examples([f, g])


def test_bad_settings(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    for kwargs, match in (({"mode": "stack"}, "mode"), ({"overlong": "cut"}, "overlong"),
                          ({"seq_len": 0}, "seq-len"), ({"heldout_fraction": 1.0}, "heldout_fraction"),
                          # True is an int but no length (it would be rows of one position)
                          ({"seq_len": True}, "--seq-len must be a positive whole number of tokens, got True"),
                          ({"heldout_fraction": -0.1}, r"heldout_fraction=-0\.1 must lie in \[0, 1\)")):
        with pytest.raises(TailkdError, match=match):
            prepare_sft([f], tok, **{"seq_len": 32, **kwargs})
    missing = tmp_path / "missing.jsonl"
    for paths, held in (([missing], None), ([f], [missing])):  # the message named the news corpus as the fix
        with pytest.raises(TailkdError, match=r"SFT data \S*missing\.jsonl does not exist; fix the path$"):
            prepare_sft(paths, tok, seq_len=32, heldout_paths=held)


def test_a_single_example_names_a_fix_the_cli_takes(tok, tmp_path):
    """One example cannot be split; the fix named is --heldout-data (the CLI refuses data.heldout_fraction=0, which the
    message used to suggest, and an SFT run needs held-out rows)."""
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES[:1])
    with pytest.raises(TailkdError, match=r"only 1 SFT example.*--heldout-data FILE") as exc:
        prepare_sft([f], tok, seq_len=32)
    assert "heldout_fraction=0" not in str(exc.value)


def test_empty_heldout_rows_are_a_dataset(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES)
    _, held, _ = prepare_sft([f], tok, seq_len=128, heldout_fraction=0)
    assert isinstance(held, SFTRows) and len(held) == 0
    with pytest.raises(IndexError):
        held[0]


def test_rows_index_from_the_end_like_a_sequence(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", EXAMPLES[:3])
    train, _, _ = prepare_sft([f], tok, seq_len=40, chat_template=None, heldout_fraction=0)
    for i in (-1, -3):
        assert all(torch.equal(train[i][k], train[len(train) + i][k]) for k in train[i])
    for i in (3, -4):
        with pytest.raises(IndexError):
            train[i]


def test_setup_sft_rows_takes_the_data_settings(tok, tmp_path):
    """The trainer's entry point gives the rows prepare_sft gives with data.* as its arguments (sft_mode, seq_len,
    chat_template none, overlong, split_seed, heldout_fraction), each of which changes the rows here; an empty
    held-out split is refused."""
    from tailkd.config import DataConfig
    from tailkd.sft import setup_sft_rows

    objs = [{"prompt": f"Q{i}: {'x' * (i % 5)}?\n", "response": "y" * (3 * i + 1)} for i in range(12)]
    f = write_jsonl(tmp_path / "d.jsonl", objs)
    cfg = DataConfig(task="sft", paths=[str(f)], seq_len=24, sft_mode="pack", chat_template="none", overlong="drop",
                     split_seed=5, heldout_fraction=0.25)
    args = dict(seq_len=24, mode="pack", chat_template=None, overlong="drop", seed=5, heldout_fraction=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = setup_sft_rows(cfg, tok, tmp_path / "cache")
        want = prepare_sft([f], tok, **args)
        other_seed = prepare_sft([f], tok, **args | {"seed": 0})[1]
    assert [r.digest for r in got[:2]] == [r.digest for r in want[:2]] and got[2] == want[2]
    info = want[2]
    assert info["train"]["dropped_overlong"] > 0 and info["rendering"] == "plain"  # tok has a template: none is plain
    assert info["train"]["rows"] < info["train"]["examples"]  # packed
    assert {e.source for e in other_seed.examples} != {e.source for e in want[1].examples}
    cfg.heldout_fraction = 0
    with pytest.raises(TailkdError, match="the SFT held-out split is empty"), pytest.warns(UserWarning):
        setup_sft_rows(cfg, tok, tmp_path / "cache")


# --------------------------------------------------------------------------- the real SmolLM2 template


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from tailkd.models import load_causal_lm

    return load_causal_lm("smollm2")[1]


@pytest.mark.slow
def test_smollm2_template_masks(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    assert "{% generation %}" not in tok.chat_template  # why the incremental rendering is needed
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5\n#### 5"},
            {"role": "user", "content": "And 1,000 + 1?"}, {"role": "assistant", "content": "It is 1,001.\n#### 1001"}]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}, {"prompt": "Hi!", "response": "Hello."}])
    rows, _, info = prepare_sft([f], tok, seq_len=256, heldout_fraction=0)
    assert info["rendering"] == "chat"
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok, chat=True) == [end]  # SmolLM2's EOS is <|im_end|>
    row = rows[0]
    labels, inputs = row["labels"], row["input_ids"]
    on = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    # two label runs: each assistant content + <|im_end|>, nothing else
    runs, cur = [], [on[0]]
    for p in on[1:]:
        if p == cur[-1] + 1:
            cur.append(p)
        else:
            runs.append(cur)
            cur = [p]
    runs.append(cur)
    assert [tok.decode(labels[r]) for r in runs] == ["2+3 = 5\n#### 5<|im_end|>", "It is 1,001.\n#### 1001<|im_end|>"]
    # the inputs right before each run end with the assistant header, which itself has no label
    for r in runs:
        assert tok.decode(inputs[: r[0] + 1]).endswith("<|im_start|>assistant\n")
    text = tok.decode(inputs[: on[0] + 1])
    assert text == render_chat(tok, msgs[:1], add_generation_prompt=True)
    ids = encode_prompt(tok, sft_rows_to_prompts(rows)[0][1], chat_template=rows.chat_template)
    assert rows[1]["input_ids"][: len(ids)].tolist() == ids and int(rows[1]["labels"][len(ids) - 1]) != IGNORE_INDEX
    assert end in rows[1]["labels"].tolist()


@pytest.mark.parametrize("content, why", [
    (b"{{ messages }} caf\xe9 ", r"is not UTF-8 text \(line 1: invalid continuation byte\); save it as UTF-8"),
    (b"", "is empty; write a Jinja chat template in it, or pass auto or none"),
    (b" \n", "is empty; write a Jinja chat template in it, or pass auto or none"),
])
def test_a_chat_template_file_that_holds_no_template_is_one_line(tmp_path, content, why):
    """--data.chat_template naming a file that is not UTF-8 was 'UnicodeDecodeError: ...' (exit 1); an empty one
    "chat_template must be None, 'auto' or a Jinja template string, got ''", which does not name the file."""
    from tailkd.sft import chat_template_setting

    path = tmp_path / "t.jinja"
    path.write_bytes(content)
    with pytest.raises(TailkdError, match=rf"^data\.chat_template {path} {why}$"):
        chat_template_setting(str(path))
    path.write_bytes(b"{{ messages }}\r\n")  # read as read_text reads it: universal newlines
    assert chat_template_setting(str(path)) == "{{ messages }}\n"
