"""The optimizer and its schedule against the ecosystem's: transformers' cosine-with-min-lr schedule, HF Trainer's
weight-decay groups, and a plain PyTorch loop (accumulate, clip once, AdamW step) over the same micro-batches."""

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tiny import make_teacher_dir, write_corpus

from tailkd.cli import main
from tailkd.config import DistillConfig
from tailkd.prepare import make_optimizer
from tailkd.train import lr_lambda


@pytest.mark.parametrize("total, warmup, floor", [(40, 5, 0.1), (7, 0, 0.0), (5, 2, 0.2), (3, 10, 0.1), (1, 1, 0.5)])
def test_schedule_is_transformers_cosine_with_min_lr_after_a_warm_up_one_step_ahead(total, warmup, floor):
    """After the warm-up, lr = transformers' ``cosine_with_min_lr`` (``min_lr_rate`` = train.min_lr_ratio) at every
    step: the same float64 formula, so equal to rounding (1e-15 of the peak). In the warm-up, step s runs at
    lr·(s+1)/warmup (Megatron's and nanoGPT's convention) where transformers' runs at lr·s/warmup (its first step
    has lr 0): exactly one warm-up increment ahead."""
    peak = 1e-3
    p = torch.nn.Parameter(torch.zeros(1))
    ours = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW([p], lr=peak), lambda s: lr_lambda(
        s, warmup=warmup, total=total, min_ratio=floor))
    theirs = transformers.get_scheduler("cosine_with_min_lr", torch.optim.AdamW([p], lr=peak), num_warmup_steps=warmup,
                                        num_training_steps=total, scheduler_specific_kwargs={"min_lr_rate": floor})
    for step in range(total):
        a, b = ours.get_last_lr()[0], theirs.get_last_lr()[0]
        expected = b + peak / warmup if step < warmup else b
        assert a == pytest.approx(expected, rel=0, abs=1e-15 * peak), step
        ours.optimizer.step(), ours.step(), theirs.optimizer.step(), theirs.step()


SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)
FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),  # q/k/v biases
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=8),  # sandwich norms, tied head
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=8),  # per-head q/k norms
    "phi": lambda: transformers.PhiConfig(**{**SMALL, "num_key_value_heads": 4}, qk_layernorm=True),  # LayerNorm
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_weight_decay_groups_are_hf_trainers(family):
    """AdamW decays exactly the parameters HF Trainer decays (``get_decay_parameter_names``: not biases, not
    norm weights; embeddings and LM heads are decayed), and a frozen parameter is in no group."""
    model = transformers.AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family]())
    model.get_input_embeddings().weight.requires_grad_(False)
    hf = set(transformers.Trainer.get_decay_parameter_names(None, model))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = make_optimizer(model, DistillConfig()).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {names[id(p)] for p in decay["params"]} == hf & trainable
    assert {names[id(p)] for p in no_decay["params"]} == trainable - hf


def test_training_steps_equal_a_plain_adamw_loop(tmp_path, monkeypatch):
    """`tailkd distill --loss clm` with 3 micro-batches per step, clipping at 0.5, warm-up 2 and cosine to 20%, equals
    a plain loop over the same micro-batches: the CLM summed over each step's valid tokens and divided by their
    number, backward per micro-batch, ``clip_grad_norm_`` over all parameters once per step, torch AdamW (eps 1e-8,
    HF Trainer's decay groups) at lr·factor(s). Logged lr and pre-clip gradient norm agree to 1e-5 relative (float32
    sums over ~1e4 terms: ~1e-6); the weights after 5 steps to 1e-5 (5 updates of at most lr = 2e-2 each, the
    update's relative error ≈ the gradient's), while they moved ~7e-2. Adam is blind to a constant gradient scale:
    the norm is what catches a wrong normalisation or a clip per micro-batch."""
    import tailkd.train as train

    student = make_teacher_dir(tmp_path / "student", layers=2, train_steps=0)
    corpus = write_corpus(tmp_path / "corpus.txt")
    recorded, draw = [], train.next_micro_batches
    monkeypatch.setattr(train, "next_micro_batches", lambda *a: recorded.append(draw(*a)) or recorded[-1])
    steps, lr, warmup, floor, clip, wd = 5, 2e-2, 2, 0.2, 0.5, 0.1
    run = tmp_path / "run"
    assert main(["distill", "--loss", "clm", "--student", str(student), "--teacher", str(student), "--data",
                 str(corpus), "--data.cache_dir", str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "2",
                 "--grad-accum", "3", "--steps", str(steps), "--lr", str(lr), "--train.warmup_steps", str(warmup),
                 "--train.min_lr_ratio", str(floor), "--train.grad_clip", str(clip), "--train.weight_decay", str(wd),
                 "--train.eval_every", "0", "--train.precision", "fp32", "--device", "cpu", "--fused-loss", "off",
                 "--out", str(run)]) == 0
    assert len(recorded) == steps and all(len(micro) == 3 for micro in recorded)

    model = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    decayed = set(transformers.Trainer.get_decay_parameter_names(None, model))
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in params.items() if n in decayed], "weight_decay": wd},
                             {"params": [p for n, p in params.items() if n not in decayed], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def factor(s):
        if s < warmup:
            return (s + 1) / warmup
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))

    lrs, norms = [], []
    for s, micro in enumerate(recorded):
        lrs.append(lr * factor(s))
        for group in opt.param_groups:
            group["lr"] = lrs[-1]
        n_valid = sum(int((mb["labels"] != -100).sum()) for mb in micro)
        for mb in micro:
            logits = model(input_ids=mb["input_ids"]).logits.float()
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=-100,
                                              reduction="sum").div(n_valid).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()

    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert [r["lr"] for r in logged] == pytest.approx(lrs, rel=1e-5)
    assert [r["grad_norm"] for r in logged] == pytest.approx(norms, rel=1e-5)
    assert [r["tokens"] for r in logged] == [(s + 1) * 2 * 3 * 32 for s in range(steps)]  # rows x micro x seq_len
    assert 0 < logged[0]["elapsed_s"] < logged[-1]["elapsed_s"]  # the seconds of the steps add up
    assert max(norms) > clip  # clipping acted
    got, start = load_file(str(run / "final" / "model.safetensors")), load_file(str(student / "model.safetensors"))
    assert max((got[n] - start[n]).abs().max().item() for n in got) > 1e-2
    for name, p in model.state_dict().items():
        if name in got:  # the tied head is saved once, as the input embeddings
            torch.testing.assert_close(got[name], p, rtol=0, atol=1e-5, msg=name)


def test_grad_clip_0_leaves_the_gradient_as_it_is():
    """train.grad_clip = 0 disables clipping: clip_and_norm returns the gradient's norm and leaves it unchanged
    (a max norm of 0 would scale it to 0); a positive one scales it to that norm."""
    from tailkd.train import clip_and_norm

    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_and_norm(torch.nn.ParameterList([p]), 0.0) == 5.0
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0]))
    assert clip_and_norm(torch.nn.ParameterList([p]), 1.0) == 5.0
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]))  # clip coefficient 1 / (5 + 1e-6): 2e-7 relative


def test_the_micro_batches_of_consecutive_steps_are_the_samplers_rows_in_order():
    """next_micro_batches draws grad_accum x batch_size rows per step from the shared sampler, in its order: no row
    is skipped or repeated across micro-batches and steps."""
    from tailkd.data import RowSampler
    from tailkd.train import next_micro_batches

    rows = [{"input_ids": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(10)]
    cfg = DistillConfig()
    cfg.train.batch_size, cfg.train.grad_accum = 2, 3
    sampler, order = RowSampler(10, seed=0), RowSampler(10, seed=0)
    drawn = [mb["row_index"].tolist() for _ in range(2) for mb in next_micro_batches(rows, sampler, cfg)]
    assert drawn == [[next(order), next(order)] for _ in range(6)]
