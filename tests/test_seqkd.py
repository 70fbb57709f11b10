"""tailkd seqkd-data: the teacher's responses to prompts (SeqKD data), against an independent greedy decoder, and the
distillation run that trains on them."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_sft_distill import assets, sft_args  # noqa: F401 - the module fixture (tiny teacher, prompt/response pairs)
from tiny import read_metrics
from transformers import AutoModelForCausalLM, AutoTokenizer

from tailkd.cli import main

PLAIN = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" \
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"


def _prompts(path, n=6):
    """n plain prompts (some with a response, which is replaced), the fixture's prompt style."""
    lines = [{"prompt": f"Q{i}: the cat sat on the", **({"response": " mat"} if i % 2 else {})} for i in range(n)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def _greedy(model, ids: list[int], eos: int, max_new: int) -> tuple[list[int], bool]:
    """Greedy decoding as plain sums: the whole sequence through the model at each step (no cache, no padding, no
    batch), argmax of the last position; (new ids without EOS, whether EOS ended it). Each argmax must beat the
    runner-up by far more than float32 rounding of these logits (~1e-5 here), or batching could flip it."""
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids + new])).logits[0, -1].double()
            top = torch.topk(logits, 2)
            assert float(top.values[0] - top.values[1]) > 1e-3, "a near tie: the comparison would not be meaningful"
            token = int(top.indices[0])
            if token == eos:
                return new, True
            new.append(token)
    return new, False


def _lines(out):
    return [json.loads(x) for x in (out / "responses.jsonl").read_text(encoding="utf-8").splitlines()]


def test_greedy_responses_are_the_teachers_own_and_unfinished_ones_are_dropped(assets, tmp_path, capsys):  # noqa: F811
    """Greedy (the default): each response is the teacher's argmax continuation of the prompt's tokens, decoded
    without its EOS; one that reaches --max-new-tokens without EOS is dropped (counted) unless --keep-unfinished;
    plain examples stay plain pairs whose response replaces theirs."""
    prompts = _prompts(tmp_path / "p.jsonl")
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    examples = [json.loads(x) for x in prompts.read_text().splitlines()]
    want = [_greedy(teacher, tok(x["prompt"], add_special_tokens=False)["input_ids"], tok.eos_token_id, 24)
            for x in examples]
    finished = [tok.decode(ids) for ids, stopped in want if stopped]
    for keep in (True, False):
        out = tmp_path / f"out-{keep}"
        code = main(["seqkd-data", "--teacher", str(assets["teacher"]), "--data", str(prompts), "--out", str(out),
                     "--max-new-tokens", "24", "--keep-unfinished", str(keep).lower(), "--batch-size", "4"])
        if not keep and not finished:
            assert code == 2 and "raise --max-new-tokens" in capsys.readouterr().err
            continue
        assert code == 0
        lines = _lines(out)
        kept = [(x, tok.decode(ids)) for x, (ids, stopped) in zip(examples, want) if keep or stopped]
        assert lines == [{"prompt": x["prompt"], "response": text} for x, text in kept]
        summary = json.loads((out / "seqkd.json").read_text())
        assert summary["prompts"] == 6 and summary["responses"] == len(kept)
        assert summary["unfinished"] == sum(not stopped for _, stopped in want)
        assert summary["generated_tokens"] == sum(len(ids) + stopped for ids, stopped in want)
    assert any(not stopped for _, stopped in want)  # the fixture exercises the dropping


def test_chat_prompts_are_rendered_as_training_renders_them_and_the_student_trains_on_them(assets, tmp_path):  # noqa: F811
    """A chat's turns before its last assistant one are the prompt, rendered with --data.chat_template (a template
    file, as distill takes it) and answered; the line ends in the teacher's assistant turn, and `tailkd distill
    --task sft --loss clm` trains on the file with the same template (SeqKD as published)."""
    template = tmp_path / "plain.jinja"
    template.write_text(PLAIN, encoding="utf-8")
    chats = [{"messages": [{"role": "user", "content": f"Q{i}: the dog"},
                           *([{"role": "assistant", "content": "old"}] if i % 2 else [])]} for i in range(24)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["seqkd-data", "--teacher", str(assets["teacher"]), "--data", str(data), "--out", str(out),
                 "--data.chat_template", str(template), "--max-new-tokens", "12", "--keep-unfinished", "true"]) == 0
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    lines = _lines(out)
    assert len(lines) == 24
    for chat, line in zip(chats[:4], lines):  # with and without an assistant turn; ties grow likelier with more
        user = chat["messages"][0]
        rendered = f"user: {user['content']}\nassistant:"
        ids, _ = _greedy(teacher, tok(rendered, add_special_tokens=False)["input_ids"], tok.eos_token_id, 12)
        assert line == {"messages": [user, {"role": "assistant", "content": tok.decode(ids)}]}
    assert [x["messages"][0] for x in lines] == [c["messages"][0] for c in chats]
    run = tmp_path / "run"
    assert main(sft_args(assets, run, "--data", str(out / "responses.jsonl"), "--data.chat_template", str(template),
                         "--loss", "clm", "--steps", "2", "--train.eval_every", "0")) == 0
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2]


def test_sampled_responses_are_seeded(assets, tmp_path):  # noqa: F811
    """--temperature > 0 samples --samples responses per prompt (lines grouped by prompt, in order); the same seed
    gives the same file."""
    prompts = _prompts(tmp_path / "p.jsonl", n=3)
    args = ["seqkd-data", "--teacher", str(assets["teacher"]), "--data", str(prompts), "--max-new-tokens", "12",
            "--temperature", "1", "--samples", "3", "--keep-unfinished", "true", "--seed", "5"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--out", str(a)]) == 0 and main([*args, "--out", str(b)]) == 0
    assert (a / "responses.jsonl").read_bytes() == (b / "responses.jsonl").read_bytes()
    lines = _lines(a)
    assert [x["prompt"] for x in lines] == [f"Q{i}: the cat sat on the" for i in range(3) for _ in range(3)]
    assert json.loads((a / "seqkd.json").read_text())["decoding"] == "sampled (temperature 1.0, top-p 1.0, seed 5)"


@pytest.mark.parametrize("extra, message", [
    (("--samples", "2"), r"seqkd\.samples=2 needs sampling: greedy decoding \(seqkd\.temperature 0\) gives one "),
    (("--data", "builtin:math"), r"seqkd-data reads prompt JSONL files, not builtin:math"),
    (("--data", "missing.jsonl"), r"SFT data missing\.jsonl does not exist; fix the path"),
    (("--max-new-tokens", "0"), r"seqkd\.max_new_tokens=0 must be >= 1"),
    (("--temperature", "-1"), r"seqkd\.temperature"),
    (("--data.chat_template", "none", "--data", "CHATS"), r"chats\.jsonl:1: chat messages need a chat template"),
    (("--out", "TAKEN"), r"refusing to replace .*taken: it exists and is not a tailkd seqkd-data output"),
])
def test_bad_settings_are_one_line(assets, tmp_path, capsys, monkeypatch, extra, message):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    prompts = _prompts(tmp_path / "p.jsonl", n=2)
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    extra = [{"CHATS": "chats.jsonl", "TAKEN": "taken"}.get(x, x) for x in extra]
    args = ["seqkd-data", "--teacher", str(assets["teacher"]), "--data", str(prompts), "--out", "out"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_chat_history_ending_in_a_user_turn_is_answered():
    """A chat's last assistant turn is replaced; a history ending in a user turn asks that turn (it answered the
    first question and dropped the second); earlier assistant turns stay as they are."""
    from tailkd.seqkd import seqkd_line, seqkd_prompt
    from tailkd.sft import SFTExample

    q1, a1, q2 = ({"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                  {"role": "user", "content": "Q2"})
    asks = SFTExample("f:1", messages=(q1, a1, q2))
    replies = SFTExample("f:2", messages=(q1, a1, q2, {"role": "assistant", "content": "A2"}))
    for example in (asks, replies):
        assert seqkd_prompt(example, True) == [q1, a1, q2]
        assert seqkd_line(example, "new") == {"messages": [q1, a1, q2, {"role": "assistant", "content": "new"}]}
    pair = SFTExample("f:3", prompt="Q", response="old")
    assert seqkd_prompt(pair, True) == [{"role": "user", "content": "Q"}] and seqkd_prompt(pair, False) == "Q"
    assert seqkd_line(pair, "new") == {"prompt": "Q", "response": "new"}


def test_empty_and_unfinished_responses_are_dropped_and_counted(assets, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A response whose text is empty or blank (the teacher stopped at once) is dropped, always, and counted: distill
    refuses an empty response, so one such line made the whole file unusable; an unfinished one is dropped unless
    --keep-unfinished. (The decoder is replaced here by fixed outputs: the bookkeeping alone.)"""
    from tailkd import generation

    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    word = tok(" mat", add_special_tokens=False)["input_ids"]
    space = tok(" ", add_special_tokens=False)["input_ids"]
    fixed = [[([], True)], [(space, True)], [(word, True)], [(word * 3, False)]]
    monkeypatch.setattr(generation, "generate_tokens", lambda *a, **k: fixed)
    prompts = _prompts(tmp_path / "p.jsonl", n=4)
    for keep, kept in ((False, [" mat"]), (True, [" mat", " mat mat mat"])):
        out = tmp_path / f"out-{keep}"
        assert main(["seqkd-data", "--teacher", str(assets["teacher"]), "--data", str(prompts), "--out", str(out),
                     "--keep-unfinished", str(keep).lower()]) == 0
        assert [x["response"] for x in _lines(out)] == kept
        summary = json.loads((out / "seqkd.json").read_text())
        assert (summary["empty"], summary["unfinished"], summary["responses"]) == (2, 1, len(kept))
        assert summary["generated_tokens"] == 0 + 1 + len(space) + 1 + len(word) + 1 + 3 * len(word)
    fixed[:] = [[([], True)]] * 4
    assert main(["seqkd-data", "--teacher", str(assets["teacher"]), "--data", str(prompts), "--out",
                 str(tmp_path / "none")]) == 2
    assert "no response to keep: 4 empty, 0 reached" in capsys.readouterr().err


def test_a_padded_heads_rows_past_the_tokenizer_are_never_generated(assets):  # noqa: F811
    """Rows of an LM head past the tokenizer's ids are no tokens: with ``vocab`` they are suppressed (the fast
    tokenizer's decode dropped such an id without a word, so the text was not what the teacher generated). Here they
    are made the argmax, so that without ``vocab`` greedy decoding picks them."""
    from tailkd.generation import generate_tokens

    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    model = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32).eval()
    v = len(tok)
    model.resize_token_embeddings(v + 8)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0][0, -1]))
    with torch.no_grad():
        model(tok("The team won", return_tensors="pt")["input_ids"])
        head, h = model.get_output_embeddings().weight, seen[-1]
        # the prompt's last state scores the padded rows 10x above any real row's largest possible logit
        head[v:] = h * (10 * head[:v].norm(dim=1).max() / h.norm())
    args = dict(max_new_tokens=4, progress=False)
    plain = generate_tokens(model, tok, ["The team won"], **args)[0][0][0]
    assert plain[0] >= v  # the premise: a padded row wins unsuppressed
    kept = generate_tokens(model, tok, ["The team won"], vocab=v, **args)[0][0][0]
    assert kept and all(t < v for t in kept)
