"""On-policy (student-generated) supervised distillation, `tailkd.onpolicy` and ``train.on_policy``: rows carry
labels only on generated tokens, λ = 0 leaves the supervised run untouched, λ = 1 generates every micro-batch, a
stopped and resumed run ends identical to an uninterrupted one, and bad settings end in one line."""

import dataclasses
import json
import math

import pytest
import torch
from test_sft_distill import assets, sft_args  # noqa: F401 - the module fixture (tiny teacher, prompt/response pairs)
from tiny import read_metrics

from tailkd import onpolicy as op
from tailkd.cli import main
from tailkd.data import IGNORE_INDEX

PAD, EOS = 0, 2


def test_build_row_labels_only_the_response():
    row = op.build_row([5, 6, 7], [8, 9, EOS], seq_len=8, pad_id=PAD)
    # x = 5 6 7 | 8 9 E: inputs x[:-1], labels x[1:] where x[t + 1] is generated
    assert row["input_ids"].tolist() == [5, 6, 7, 8, 9, PAD, PAD, PAD]
    assert row["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, EOS] + [IGNORE_INDEX] * 3
    assert row["segment_ids"].tolist() == [0] * 5 + [1] * 3
    assert row["attention_mask"].tolist() == [1] * 5 + [0] * 3  # the padding's 0, as SFT rows'
    # a row never grows past seq_len: prompt + response is cut to seq_len + 1 tokens
    row = op.build_row([5, 6], [7, 8, 9, 10], seq_len=4, pad_id=PAD)
    assert row["input_ids"].tolist() == [5, 6, 7, 8] and row["labels"].tolist() == [IGNORE_INDEX, 7, 8, 9]
    # an empty response leaves no label
    assert (op.build_row([5, 6], [], seq_len=4, pad_id=PAD)["labels"] == IGNORE_INDEX).all()
    assert op.build_row([5, 6], [7], seq_len=4, pad_id=9)["input_ids"].tolist() == [5, 6, 9, 9]  # padded with pad_id
    assert op.build_row([5, 6], [7, 8, 9, 10], seq_len=4, pad_id=PAD)["attention_mask"].tolist() == [1] * 4  # full


def test_prompt_lengths_from_the_first_label():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 4, 5], [IGNORE_INDEX] * 4, [3, 4, IGNORE_INDEX, IGNORE_INDEX]])
    assert op.prompt_lengths(labels) == [3, 0, 1]
    # a row without a label holds a prompt alone: its real tokens (the attention mask's ones); none: nothing
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert op.prompt_lengths(labels, mask) == [3, 2, 1]
    assert op.prompt_lengths(labels, torch.tensor([[1] * 4, [0] * 4, [1] * 4])) == [3, 0, 1]


def prompt_alone_row(prompt: list[int], seq_len: int) -> dict[str, torch.Tensor]:
    """A row of a prompt alone as `tailkd.sft.SFTRows` lays it out: all its tokens, no label, then padding."""
    n = len(prompt)
    return {"input_ids": torch.tensor(prompt + [PAD] * (seq_len - n)),
            "labels": torch.full((seq_len,), IGNORE_INDEX), "segment_ids": torch.tensor([0] * n + [1] * (seq_len - n)),
            "attention_mask": torch.tensor([1] * n + [0] * (seq_len - n))}


def test_a_prompt_alone_is_answered_as_its_answered_row(tiny_lm):
    """Rows of a prompt alone (train.on_policy 1's prompt-only data) come back as the same prompts with a dataset
    response do, bit for bit under the same seed: the same prompt answered, labels on the sampled tokens alone."""
    model, T = tiny_lm(), 24
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25], list(range(50, 74))]  # the last fills the row: room for 1 token
    stack = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    answered = stack([op.build_row(p, [40, 41, EOS], T, PAD) for p in prompts[:2]] +
                     [op.build_row(prompts[2], [40], T, PAD)])
    alone = stack([prompt_alone_row(p, T) for p in prompts])
    policy = op.OnPolicy(1.0, 1.0, 1.0, 6, 0, (EOS,), PAD)
    new, tokens = policy.generate_batch(model, alone, seed=5)
    want, want_tokens = policy.generate_batch(model, answered, seed=5)
    assert all(torch.equal(new[k], want[k]) for k in want) and tokens == want_tokens
    assert (new["labels"][:2] != IGNORE_INDEX).sum().item() >= 2 and (new["labels"][2] != IGNORE_INDEX).sum() == 1


def test_on_policy_draws_are_counter_based_with_rate_lambda():
    assert not any(op.is_on_policy(0.0, 0, s, m) for s in range(50) for m in range(2))
    assert all(op.is_on_policy(1.0, 0, s, m) for s in range(50) for m in range(2))
    draws = [op.is_on_policy(0.3, 7, s, m) for s in range(2000) for m in range(2)]
    assert draws == [op.is_on_policy(0.3, 7, s, m) for s in range(2000) for m in range(2)]  # a function of its key
    # 4000 Bernoulli(0.3) draws: the mean is within 5 standard deviations (sqrt(0.21 / 4000) = 0.0072) of 0.3
    assert abs(sum(draws) / len(draws) - 0.3) < 5 * math.sqrt(0.3 * 0.7 / len(draws))
    assert draws != [op.is_on_policy(0.3, 8, s, m) for s in range(2000) for m in range(2)]  # the seed matters


def test_each_micro_batch_of_a_step_draws_on_its_own():
    """Whether a micro-batch is on-policy is drawn per (seed, step, micro-batch): the micro-batches of one step are
    independent Bernoulli(λ) draws, so with λ = 0.5 the two of a step differ in about half of the steps (expected
    2λ(1 − λ) = 0.5 of 2000 steps; standard deviation sqrt(0.25 / 2000) = 0.011), not never."""
    differ = [op.is_on_policy(0.5, 3, s, 0) != op.is_on_policy(0.5, 3, s, 1) for s in range(2000)]
    assert abs(sum(differ) / len(differ) - 0.5) < 5 * math.sqrt(0.25 / len(differ))


def test_generate_batch_keeps_prompts_and_labels_only_generated_tokens(tiny_lm):
    model, T = tiny_lm(), 24
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25], [31]]
    rows = [op.build_row(p, [40, 41, EOS], T, PAD) for p in prompts]  # dataset rows: a response after each prompt
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]} | {"row_index": torch.tensor([4, 9, 1])}
    empty = {k: v[:1].clone() for k, v in batch.items()}
    empty["labels"][:], empty["input_ids"][:], empty["attention_mask"][:] = IGNORE_INDEX, PAD, 0
    batch = {k: torch.cat([batch[k], empty[k]]) for k in batch}  # a 4th row without any token
    policy = op.OnPolicy(1.0, 1.0, 1.0, 6, 0, (EOS,), PAD)
    new, tokens = policy.generate_batch(model, batch, seed=3)
    assert torch.equal(new["row_index"], batch["row_index"])
    assert torch.equal(new["labels"][3], batch["labels"][3]) and torch.equal(new["input_ids"][3], batch["input_ids"][3])
    n_labels = 0
    for i, p in enumerate(prompts):
        x, y = new["input_ids"][i], new["labels"][i]
        assert x[:len(p)].tolist() == p  # the prompt is kept as it is
        assert (y[:len(p) - 1] == IGNORE_INDEX).all()  # no label on a prompt token
        valid = (y != IGNORE_INDEX).nonzero().flatten().tolist()
        assert valid == list(range(len(p) - 1, len(p) - 1 + len(valid)))  # labels: one run right after the prompt
        assert 1 <= len(valid) <= 6
        assert y[valid[:-1]].tolist() == x[len(p):len(p) + len(valid) - 1].tolist()  # labels: next inputs
        assert EOS not in y[valid[:-1]].tolist()  # generation stops at the first EOS (kept, labelled)
        n_labels += len(valid)
    assert tokens == n_labels
    again, _ = policy.generate_batch(model, batch, seed=3)
    assert all(torch.equal(again[k], new[k]) for k in new)  # the seed fixes the samples


def test_each_row_gets_its_own_room_not_the_longest_prompts(tiny_lm):
    """A long prompt in the micro-batch does not shorten the other rows' responses: each row may grow to
    min(max_new_tokens, seq_len + 1 - its prompt length) tokens, as it would on its own."""
    model, T = tiny_lm(), 24
    short, long = [11, 12, 13], list(range(50, 70))  # rooms: 22 and 5 tokens
    rows = [op.build_row(p, [40, 41, EOS], T, PAD) for p in (short, long)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    policy = op.OnPolicy(1.0, 1.0, 1.0, 10, 0, (EOS,), PAD)
    new, tokens = policy.generate_batch(model, batch, seed=0)
    # seed 0: neither row samples EOS, so each runs to its limit: 10 new tokens, and the long row fills its 5
    assert (new["labels"] != IGNORE_INDEX).sum(1).tolist() == [10, 5] and tokens == 15
    assert new["input_ids"][1, :len(long)].tolist() == long and (new["labels"][1, len(long) - 1:] != IGNORE_INDEX).all()


def test_a_padded_lm_head_samples_only_the_tokenizers_ids(tiny_lm, tiny_tokenizer):
    """A student whose LM head has rows past its tokenizer's ids (padded: 151936 rows for Qwen2.5's 151665 tokens, or
    built from such a teacher) samples only the tokenizer's V ids: the rows past V are no tokens, and the loss, which
    runs over the V ids, cannot score a label there (it crashed the run: "Target 302 is out of bounds"). The padded
    rows here are scaled to take almost all the mass, so an unrestricted sampler picks them nearly every time."""
    from types import SimpleNamespace

    from tailkd.config import DistillConfig

    vocab = len(tiny_tokenizer)
    model = tiny_lm(vocab_size=vocab + 40)
    with torch.no_grad():
        model.lm_head.weight[vocab:] *= 50
    cfg = DistillConfig()
    cfg.train.on_policy, cfg.train.on_policy_max_new_tokens = 1.0, 6
    pad = tiny_tokenizer.pad_token_id
    policy = op.on_policy_from_config(cfg, tiny_tokenizer, SimpleNamespace(chat_template=None, pad_id=pad), None)
    rows = [op.build_row(p, [40, 41], 24, pad) for p in ([11, 12, 13], [21, 22])]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    new, tokens = policy.generate_batch(model, batch, seed=0)
    labels = new["labels"][new["labels"] != IGNORE_INDEX]
    assert tokens == labels.numel() > 0 and int(labels.max()) < vocab


def test_generation_restores_the_training_mode_and_rng(tiny_lm):
    model = tiny_lm().train()
    state = torch.get_rng_state()
    op.sample_responses(model, [[5, 6], [7]], max_new_tokens=3, temperature=1.0, top_p=0.9, stops=[EOS],
                        pad_id=PAD, seed=1)
    assert model.training and torch.equal(torch.get_rng_state(), state)
    op.sample_responses(model.eval(), [[5, 6]], max_new_tokens=3, temperature=1.0, top_p=0.9, stops=[EOS], pad_id=PAD,
                        seed=1)
    assert not model.training  # an eval-mode model stays in eval mode


def _fixed_lm(tiny_lm, probs: torch.Tensor):
    """A tiny LM whose next-token distribution is ``probs`` [V] at every position, whatever the prompt: its LM head
    is a zero weight plus a bias of log ``probs``."""
    model = tiny_lm(vocab_size=probs.numel())
    head = torch.nn.Linear(model.config.hidden_size, probs.numel(), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(probs.log())
    model.lm_head = head
    return model.eval()


def _first_tokens(model, n: int, **sampling) -> list[int]:
    """The first sampled token of each of ``n`` one-token prompts, as the on-policy step samples them."""
    policy = op.OnPolicy(1.0, **{"temperature": 1.0, "top_p": 1.0} | sampling, max_new_tokens=1, seed=0,
                         stops=(EOS,), pad_id=PAD)
    rows = [op.build_row([5], [6], 4, PAD) for _ in range(n)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    new, _ = policy.generate_batch(model, batch, seed=1)
    return new["labels"][:, 0].tolist()


def test_sampling_is_nucleus_top_p_of_the_students_distribution(tiny_lm):
    """train.on_policy_top_p reaches the sampler: with p(7) = 0.6, p(8) = 0.3 and the other 0.1 spread over the rest,
    the nucleus of top-p 0.8 is {7, 8}, so no sample falls outside it; without the cut each of 200 draws would
    fall outside with probability 0.1 (all 200 inside: 0.9^200 < 1e-9)."""
    V = 64
    probs = torch.full((V,), 0.1 / (V - 2))
    probs[7], probs[8] = 0.6, 0.3
    drawn = _first_tokens(_fixed_lm(tiny_lm, probs), 200, top_p=0.8)
    assert set(drawn) == {7, 8}


def test_sampling_applies_no_top_k(tiny_lm):
    """No top-k cut (the module docstring): from a near-uniform distribution over V = 262 ids (p_i ∝ exp(−i/1000):
    no ties, which a top-k cut would keep whole), 200 draws hit far more than the 50 ids that transformers' default
    top-k would leave (expected distinct ids about 262 (1 − (261/262)^200) ≈ 140, standard deviation about 5)."""
    V = 262
    drawn = _first_tokens(_fixed_lm(tiny_lm, torch.softmax(-torch.arange(V) / 1000.0, 0)), 200)
    assert len(set(drawn)) > 100


def test_sampling_temperature_reaches_the_sampler(tiny_lm):
    """train.on_policy_temperature reaches the sampler: with p(7) = 0.6 and 0.4 spread evenly over the other 63 ids,
    temperature 0.05 gives each other id the weight (p_i / p_7)^20 = (0.4 / 63 / 0.6)^20 < 1e-39 against 7's, so 200
    draws are all 7 but for a chance below 200 * 63 * 1e-39; at temperature 1 all 200 are 7 with probability
    0.6^200 < 1e-44."""
    V = 64
    probs = torch.full((V,), 0.4 / (V - 1))
    probs[7] = 0.6
    assert set(_first_tokens(_fixed_lm(tiny_lm, probs), 200, temperature=0.05)) == {7}


def test_generation_runs_under_the_runs_autocast_only(tiny_lm):
    """The student samples under the run's autocast (train.dtype's ``ac``) with its dtype, and without autocast when
    the run has none: every forward of `generate` sees the autocast state the run trains in."""
    model = tiny_lm()
    seen = []
    model.model.register_forward_pre_hook(lambda module, args: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    rows = [op.build_row([5, 6], [7], 8, PAD)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    for ac in (None, torch.float16):
        seen.clear()
        op.OnPolicy(1.0, 1.0, 1.0, 3, 0, (EOS,), PAD, autocast_dtype=ac).generate_batch(model, batch, seed=0)
        want = (False,) if ac is None else (True, ac)
        assert seen and all(s[:len(want)] == want for s in seen), (ac, seen)


def test_a_micro_batch_without_any_token_is_returned_as_it_is(tiny_lm):
    """Rows without any token (no label, attention mask all 0) have no prompt to answer: a micro-batch of only such
    rows comes back as it is, with 0 tokens generated, and the student is not run."""
    model = tiny_lm()
    model.forward = None  # a call of the student fails
    rows = [op.build_row([5, 6], [7], 8, PAD) for _ in range(2)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["labels"][:], batch["attention_mask"][:] = IGNORE_INDEX, 0
    new, tokens = op.OnPolicy(1.0, 1.0, 1.0, 3, 0, (EOS,), PAD).generate_batch(model, batch, seed=0)
    assert new is batch and tokens == 0


def test_draw_keys_do_not_collide():
    """The counter-based keys are the parts joined with a separator, so different (step, micro-batch) pairs never share
    a seed by concatenating to the same text (step 1 micro-batch 23 and step 12 micro-batch 3 did without one): 10^4
    keys give 10^4 seeds (two 63-bit hashes of distinct texts agree with probability 2^-63)."""
    assert len({op._seed("on-policy", 0, s, m) for s in range(100) for m in range(100)}) == 100 * 100


def test_on_policy_from_config_carries_the_runs_settings():
    """Every sampling setting of the config reaches the sampler's OnPolicy, with the run's seed and autocast dtype."""
    from types import SimpleNamespace

    from test_sft import chatml_tokenizer

    from tailkd.config import DistillConfig

    tok = chatml_tokenizer()
    cfg = DistillConfig()
    t = cfg.train
    t.on_policy, t.on_policy_temperature, t.on_policy_top_p, t.on_policy_max_new_tokens, t.seed = 0.5, 0.7, 0.9, 5, 3
    policy = op.on_policy_from_config(cfg, tok, SimpleNamespace(chat_template=None, pad_id=1), torch.bfloat16)
    assert (policy.temperature, policy.top_p, policy.max_new_tokens, policy.seed, policy.pad_id,
            policy.autocast_dtype) == (0.7, 0.9, 5, 3, 1, torch.bfloat16)


def test_a_sampled_stop_token_is_kept_and_labelled(tiny_lm):
    """Generation stops at the first stop token, which is kept and labelled as the dataset's EOS is: with p(EOS) = 0.5
    at every position and at most 6 new tokens, each of 20 rows ends with its label EOS unless it drew no EOS in 6
    draws (probability 1/64 per row; that no row stops at all: 64^-20); EOS is never labelled before a row's end."""
    V = 64
    probs = torch.full((V,), 0.5 / (V - 1))
    probs[EOS] = 0.5
    model = _fixed_lm(tiny_lm, probs)
    policy = op.OnPolicy(1.0, 1.0, 1.0, 6, 0, (EOS,), PAD)
    rows = [op.build_row([5], [6], 12, PAD) for _ in range(20)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    new, tokens = policy.generate_batch(model, batch, seed=1)
    stopped = 0
    for y in new["labels"]:
        valid = y[y != IGNORE_INDEX].tolist()
        assert EOS not in valid[:-1] and (valid[-1] == EOS or len(valid) == 6)
        stopped += valid[-1] == EOS
    assert stopped > 0 and tokens == int((new["labels"] != IGNORE_INDEX).sum())


def test_samples_are_keyed_by_step_micro_batch_and_rank(tiny_lm):
    """A generated micro-batch's samples come from (seed, step, micro-batch, rank): the same key gives the same
    tokens, and another step, micro-batch or rank other ones (from a uniform distribution over 64 ids, 3 rows of 4
    tokens: two keys agree by chance with probability about 64^-12)."""
    V = 64
    model = _fixed_lm(tiny_lm, torch.full((V,), 1.0 / V))
    policy = op.OnPolicy(1.0, 1.0, 1.0, 4, 0, (EOS,), PAD)
    rows = [op.build_row(p, [6], 12, PAD) for p in ([5], [7, 8], [9])]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def labels(step, rank):
        micro, n, _ = policy.apply(model, [batch, batch], step=step, rank=rank)
        assert n == 2
        return [mb["labels"] for mb in micro]

    (a, b), (again, _) = labels(3, 0), labels(3, 0)
    assert torch.equal(a, again) and not torch.equal(a, b)  # micro-batches 0 and 1 of step 3
    assert not torch.equal(a, labels(4, 0)[0]) and not torch.equal(a, labels(3, 1)[0])  # another step, rank
    policy = dataclasses.replace(policy, seed=1)
    assert not torch.equal(a, labels(3, 0)[0])  # another run seed


def test_apply_generates_exactly_the_micro_batches_drawn_on_policy(tiny_lm):
    """`OnPolicy.apply` with λ = 0.5 replaces micro-batch m of step s exactly when is_on_policy(λ, seed, s, m): the
    others pass through as they are. Over 20 steps of 2 micro-batches the two draws of a step differ somewhere
    (all 20 steps alike: probability 2^-20)."""
    model = _fixed_lm(tiny_lm, torch.full((64,), 1.0 / 64))
    policy = op.OnPolicy(0.5, 1.0, 1.0, 1, 7, (EOS,), PAD)
    rows = [op.build_row([5], [6], 4, PAD)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    mixed = 0
    for step in range(20):
        want = [op.is_on_policy(0.5, 7, step, m) for m in range(2)]
        out, n, _ = policy.apply(model, [batch, batch], step=step, rank=0)
        assert [mb is not batch for mb in out] == want and n == sum(want)
        mixed += want[0] != want[1]
    assert mixed > 0


def test_a_chat_run_stops_at_the_end_of_turn_token_too():
    """Rows rendered with a chat template end their responses with its end-of-turn token (ChatML's <|im_end|>), so
    the on-policy sampler stops there as well as at EOS (`sft.stop_token_ids`); plain rows stop at EOS alone."""
    from types import SimpleNamespace

    from test_sft import CHATML, IM_END, chatml_tokenizer

    from tailkd.config import DistillConfig

    tok = chatml_tokenizer()
    cfg = DistillConfig()
    cfg.train.on_policy = 0.5
    chat = op.on_policy_from_config(cfg, tok, SimpleNamespace(chat_template=CHATML, pad_id=tok.pad_token_id), None)
    plain = op.on_policy_from_config(cfg, tok, SimpleNamespace(chat_template=None, pad_id=tok.pad_token_id), None)
    assert chat.stops == (tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)) and plain.stops == (tok.eos_token_id,)
    assert (chat.rate, chat.pad_id, chat.vocab) == (0.5, tok.pad_token_id, len(tok))


def final_weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def test_lambda_one_generates_every_micro_batch(assets, tmp_path):  # noqa: F811
    run = tmp_path / "on"
    assert main(sft_args(assets, run, "--loss", "rkl", "--steps", "3", "--train.grad_accum", "2",
                         "--train.on_policy", "1", "--train.on_policy_max_new_tokens", "8")) == 0
    train = [r for r in read_metrics(run) if r["split"] == "train"]
    assert [r["on_policy_batches"] for r in train] == [2, 4, 6]
    assert all(0 < r["generated_tokens"] <= 2 * 4 * 8 for r in train)  # 2 micro-batches x 4 rows x <= 8 tokens
    summary = json.loads((run / "summary.json").read_text())
    assert summary["on_policy"]["batches"] == 6
    assert summary["on_policy"]["generated_tokens"] == sum(r["generated_tokens"] for r in train)


def test_lambda_zero_is_the_supervised_run(assets, tmp_path):  # noqa: F811
    """λ = 0 draws nothing and generates nothing: the sampling knobs then change no bit of the result."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(sft_args(assets, a, "--loss", "kd", "--steps", "3")) == 0
    assert main(sft_args(assets, b, "--loss", "kd", "--steps", "3", "--train.on_policy", "0",
                         "--train.on_policy_temperature", "0.3", "--train.on_policy_max_new_tokens", "2")) == 0
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any("generated_tokens" in r for r in read_metrics(b))


def test_stopped_and_resumed_on_policy_run_is_bit_identical(assets, tmp_path):  # noqa: F811
    common = ("--loss", "tad", "--k", "3", "--steps", "6", "--train.on_policy", "0.5",
              "--train.on_policy_max_new_tokens", "6", "--train.save_every", "3", "--train.deterministic", "true")
    full, parted = tmp_path / "full", tmp_path / "parted"
    assert main(sft_args(assets, full, *common)) == 0
    assert main(sft_args(assets, parted, *common, "--train.stop_after", "3")) == 0
    assert main(sft_args(assets, parted, *common, "--resume")) == 0
    wa, wb = final_weights(full), final_weights(parted)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [r for r in read_metrics(full) if r["split"] == "train"]
    lb = [r for r in read_metrics(parted) if r["split"] == "train"]
    assert [(r["loss"], r["generated_tokens"], r["on_policy_batches"]) for r in la] == \
        [(r["loss"], r["generated_tokens"], r["on_policy_batches"]) for r in lb]
    assert 0 < la[-1]["on_policy_batches"] < 6  # λ = 0.5 over 6 micro-batches: some of each kind (seed 0)


def prompts_and_pairs(assets, tmp_path):  # noqa: F811
    """The fixture's pairs split into held-out pairs (the first 16) and training pairs, and those training prompts
    alone (no "response"): (prompt-only data, pair data, held-out file). 16 of the 64 training prompts are also
    held-out ones (the fixture's prompts repeat): dropped from training alike."""
    lines = [json.loads(x) for x in assets["pairs"].read_text().splitlines()]
    write = lambda name, objs: (tmp_path / name).write_text("".join(json.dumps(o) + "\n" for o in objs)) \
        and tmp_path / name  # noqa: E731
    return (write("prompts.jsonl", [{"prompt": o["prompt"]} for o in lines[16:]]), write("pairs.jsonl", lines[16:]),
            write("held.jsonl", lines[:16]))


def test_lambda_one_trains_on_prompts_alone_as_on_their_pairs(assets, tmp_path, capsys):  # noqa: F811
    """Fully on-policy (λ = 1) every response is the student's: a run on the training prompts alone (no "response")
    is the run on the same prompts with their responses, bit for bit — losses, generated tokens, held-out metrics and
    final weights — held-out responses given by --heldout-data."""
    prompts, pairs, held = prompts_and_pairs(assets, tmp_path)
    common = ("--loss", "rkl", "--steps", "3", "--train.on_policy", "1", "--train.on_policy_max_new_tokens", "6",
              "--heldout-data", str(held))
    a, b = tmp_path / "prompts", tmp_path / "pairs"
    assert main(sft_args({**assets, "pairs": prompts}, a, *common)) == 0
    assert main(sft_args({**assets, "pairs": pairs}, b, *common)) == 0
    wa, wb = final_weights(a), final_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    drop = {"time", "elapsed_s", "tokens_per_s", "gen_tokens_per_s", "generation_seconds", "wall_s", "eta_s"}
    ma = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(a)]
    mb = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(b)]
    train = [r for r in ma if r["split"] == "train"]
    assert ma == mb and any(r["split"] == "heldout" for r in ma) and len(train) == 3
    assert all(r["generated_tokens"] > 0 and r["on_policy_batches"] == r["step"] for r in train)
    # `tailkd eval` of the run: the held-out rows score; its training rows, prompts alone, have nothing to score
    held_out, every = tmp_path / "heldout.json", tmp_path / "all.json"
    assert main(["eval", "--student", str(a / "final"), "--out", str(held_out)]) == 0
    assert main(["eval", "--student", str(a / "final"), "--split", "all", "--out", str(every)]) == 0
    h, e = json.loads(held_out.read_text()), json.loads(every.read_text())
    assert e["rows"] == h["rows"] > 0 and e["tokens"] == h["tokens"] and e["kl"] == h["kl"]  # the prompt rows left out
    capsys.readouterr()
    assert main(["eval", "--student", str(a / "final"), "--split", "train", "--out", str(tmp_path / "t.json")]) == 2
    assert "tailkd: error: the train split holds prompts alone (48 rows: a fully on-policy run's data), no response " \
        "to score; use --split heldout" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle, early", [
    (["--train.on_policy", "0.5", "--heldout-data", "HELD"],
     'prompts.jsonl:1: no "response" field (found keys [\'prompt\']); every line needs "prompt" and "response", or '
     '"messages" (prompts alone train fully on-policy: --train.on_policy 1)', True),
    (["--train.on_policy", "0", "--heldout-data", "HELD"], 'prompts.jsonl:1: no "response" field', True),
    (["--train.on_policy", "1"], "the SFT held-out split holds prompts alone (13), which the held-out metrics cannot "
                                 "score; pass --heldout-data FILE with responses", False),
])
def test_prompts_alone_refused_where_they_cannot_train(assets, tmp_path, capsys, extra, needle, early):  # noqa: F811
    """Below λ = 1 a prompt alone is refused in one line naming file and line, before any model loads (the data
    files are read first); at λ = 1 a held-out split of prompts alone is refused once the rows are made."""
    prompts, _, held = prompts_and_pairs(assets, tmp_path)
    run = tmp_path / "run"
    extra = [str(held) if x == "HELD" else x for x in extra]
    assert main(sft_args({**assets, "pairs": prompts}, run, "--loss", "rkl", *extra)) == 2
    out = capsys.readouterr().err
    err = [x for x in out.splitlines() if x.startswith("tailkd: error: ")]
    assert len(err) == 1 and needle in err[0] and "Traceback" not in out, err
    assert ("Loading weights" not in out) == early  # the teacher loaded or not
    assert not run.exists()


def test_below_lambda_one_a_held_out_line_without_a_response_is_refused(assets, tmp_path, capsys):  # noqa: F811
    """A supervised run (λ = 0) refuses a line whose response is blank wherever the held-out split puts it (a first
    version of prompt-only reading dropped it with a warning when it was held out)."""
    lines = [json.loads(x) for x in assets["pairs"].read_text().splitlines()]
    for i in (0, 40, 79):
        data = tmp_path / f"d{i}.jsonl"
        data.write_text("".join(json.dumps({**o, "response": " "} if j == i else o) + "\n"
                                for j, o in enumerate(lines)))
        assert main(sft_args({**assets, "pairs": data}, tmp_path / f"run{i}", "--loss", "kd", "--steps", "1")) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("tailkd: error: ")]
        assert len(err) == 1 and f'd{i}.jsonl:{i + 1}: "response" is empty' in err[0], err


@pytest.mark.parametrize("extra, needle", [
    (["--train.on_policy", "1.5"], "train.on_policy=1.5 must be a finite number in [0, 1]"),
    (["--train.on_policy", "nan"], "train.on_policy=nan must be a finite number in [0, 1]"),
    (["--train.on_policy", "0.5", "--train.on_policy_max_new_tokens", "0"],
     "train.on_policy_max_new_tokens=0 must be >= 1"),
    (["--train.on_policy", "0.5", "--train.on_policy_top_p", "0"], "train.on_policy_top_p=0.0 must be a finite"),
    (["--train.on_policy", "0.5", "--train.on_policy_top_p", "1.5"], "train.on_policy_top_p=1.5 must be a finite"),
    (["--train.on_policy", "0.5", "--train.on_policy_temperature", "0"], "train.on_policy_temperature=0.0 must be a"),
    (["--train.on_policy", "0.5", "--train.parallel", "fsdp"], "use --train.parallel ddp"),
    (["--train.on_policy", "1", "--task", "pretrain"], "train.on_policy=1.0 cannot be used here"),
    (["--train.on_policy", "0.5", "--teacher-cache", "somewhere"],
     "a teacher cache cannot score tokens the student generates"),
    (["--train.on_policy", "0.5", "--loss", "clm"], "has no teacher to score the generated tokens"),
    (["--train.on_policy", "0.5", "--data.sft_mode", "pack"], "use --data.sft_mode pad"),
    (["--train.on_policy", "0.5", "--task", "pretrain"], "use --task sft"),
])
def test_bad_on_policy_settings(assets, tmp_path, capsys, extra, needle):  # noqa: F811
    run = tmp_path / "run"
    assert main(sft_args(assets, run, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tailkd: error: ") and needle in err[0], err
    assert not run.exists()


def test_generation_seconds_time_only_the_generation(monkeypatch):
    """A step's generation_seconds (its metrics' gen_tokens_per_s) time the student's sampling alone: not the drawing
    and collating of the micro-batches before it (imitated: 0.3 s to draw, generation instant), nor the step after."""
    import time
    from types import SimpleNamespace

    from tailkd import runs, train
    from tailkd.config import DistillConfig

    monkeypatch.setattr(train, "next_micro_batches", lambda *a: time.sleep(0.3) or [])
    monkeypatch.setattr(train, "forward_backward", lambda *a, **k: (dict.fromkeys(train.TERMS, 0.0), 1))
    on_policy = SimpleNamespace(apply=lambda model, micro, step, rank: (micro, 1, 7))
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = SimpleNamespace(progress=runs.Progress(), on_policy=on_policy, model=model, cfg=DistillConfig(),
                          train_rows=None, sampler=None, signal_of=None, vocab=2, device=torch.device("cpu"),
                          ac=None, fused_path=False, loss_chunk=None, optimizer=optimizer,
                          scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    report = train.train_step(run, [])
    assert report.generated == 7 and report.seconds >= 0.3
    assert report.generation_seconds < 0.1  # generation returns at once; its timer must not hold the 0.3 s
