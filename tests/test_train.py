"""The training loop's own logic (`tailkd.train`) at unit level, on a tiny model and stand-ins for a run: each rank's
share of a micro-batch, what forward_backward gives each micro-batch and sums, the checks that skip a step, which
steps are logged, evaluated and saved, and how the loop ends. tests/test_distill.py, test_faults.py and
test_optimizer.py run the whole loop through the CLI; these take a few seconds in all (the first tiny model also
imports transformers' model code)."""

import contextlib
import random
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_lm
from launch import as_a_plain_process

from tailkd import distributed as dist
from tailkd import runs, train
from tailkd.config import DistillConfig
from tailkd.data import RowSampler
from tailkd.errors import TailkdError

# --------------------------------------------------------------------------- the schedule


def test_the_learning_rate_stays_at_its_floor_past_the_last_step():
    """lr_lambda decays to ``min_ratio`` at ``total`` and stays there after it (progress is clamped at 1; the cosine
    would climb back to the peak by 2·total): a checkpoint resumed with a lower --steps trains nothing more, but its
    optimizer's lr is set from this factor (`prepare.use_optimizer_settings`). The floor is 0.1 + 0.9 · 0.5 · (1 +
    cos π) = 0.1 to rounding (1e-16)."""
    for step in (10, 11, 15, 19, 100):
        assert train.lr_lambda(step, warmup=2, total=10, min_ratio=0.1) == pytest.approx(0.1, rel=0, abs=1e-15)


def test_the_seed_fixes_pythons_numpys_and_torchs_random_draws():
    """seed_everything(train.seed) seeds the three generators a run may draw from (a loss of the user's module may use
    numpy's; a checkpoint saves all three, `runs.set_rng_state`): the same seed gives the same draws."""
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    train.seed_everything(5)
    first = draws()
    train.seed_everything(5)
    assert draws() == first


# --------------------------------------------------------------------------- a step's micro-batches


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_keeps_every_world_th_row_of_the_global_micro_batch(monkeypatch, world):
    """Rank r of W keeps rows r, r+W, r+2W, ... of every global micro-batch (the module's global-batch semantics):
    the shares are disjoint and together the one-process micro-batch, and every rank's sampler ends at the same
    state (rank 0 alone saves it)."""
    as_a_plain_process(monkeypatch)
    rows = [{"input_ids": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(40)]
    cfg = DistillConfig()
    cfg.train.batch_size, cfg.train.grad_accum = 8, 2
    whole = [mb["row_index"].tolist() for mb in train.next_micro_batches(rows, RowSampler(40, seed=0), cfg)]
    monkeypatch.setattr(dist, "world", lambda: world)
    for r in range(world):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        sampler = RowSampler(40, seed=0)
        mine = [mb["row_index"].tolist() for mb in train.next_micro_batches(rows, sampler, cfg)]
        assert mine == [rows_of_step[r::world] for rows_of_step in whole], r
        order = RowSampler(40, seed=0)
        for _ in range(2 * 8):  # the step's 16 rows drawn: the next row is the same on every rank
            next(order)
        assert next(sampler) == next(order)


# --------------------------------------------------------------------------- forward_backward


def _micro_batches(n: int, seed: int = 0) -> list[dict]:
    """``n`` micro-batches of 2 rows x 12 tokens with uneven valid-token counts (row 0 keeps 4 labels, row 1 all)."""
    g = torch.Generator().manual_seed(seed)
    micro = []
    for _ in range(n):
        ids = torch.randint(0, TINY_VOCAB, (2, 13), generator=g)
        labels = ids[:, 1:].clone()
        labels[0, 4:] = -100
        micro.append({"input_ids": ids[:, :-1], "labels": labels})
    return micro


def _clm_config() -> DistillConfig:
    cfg = DistillConfig()
    cfg.loss.name = "clm"
    return cfg


def test_the_step_loss_is_the_cross_entropy_of_every_micro_batch_over_the_steps_valid_tokens():
    """forward_backward's loss is Σ over ALL micro-batches' valid tokens of the cross-entropy, divided once by their
    number (not the last micro-batch's part, not a mean of means). The reference takes the same float32 logits and
    sums in float64: the two differ by the objective's float32 sums of <= 48 terms, ~48 · 6e-8 < 3e-6 relative."""
    model = make_tiny_lm(num_hidden_layers=1).train()
    micro = _micro_batches(3)
    terms, n_valid = train.forward_backward(model, None, micro, cfg=_clm_config(), vocab=TINY_VOCAB, device="cpu",
                                            ac=None, fused_path=False)
    assert n_valid == 3 * (4 + 12)
    with torch.no_grad():
        total = sum(torch.nn.functional.cross_entropy(model(input_ids=mb["input_ids"]).logits.flatten(0, 1).double(),
                                                      mb["labels"].flatten(), ignore_index=-100, reduction="sum")
                    for mb in micro)
    assert terms["loss"] == pytest.approx(float(total) / n_valid, rel=1e-5)
    assert terms["clm"] == pytest.approx(terms["loss"], rel=1e-5) and terms["div"] == terms["cos"] == 0.0


def test_a_step_without_a_valid_token_runs_no_forward_and_leaves_no_gradient():
    """Every label -100 in every micro-batch: no forward at all (the loss would divide by 0 valid tokens), the terms
    are 0, no parameter gets a gradient, and the count says 0 (train_step then skips the step as empty)."""
    model = make_tiny_lm(num_hidden_layers=1).train()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    micro = _micro_batches(2)
    for mb in micro:
        mb["labels"] = torch.full_like(mb["labels"], -100)
    terms, n_valid = train.forward_backward(model, None, micro, cfg=_clm_config(), vocab=TINY_VOCAB, device="cpu",
                                            ac=None, fused_path=False)
    assert (terms, n_valid) == (dict.fromkeys(train.TERMS, 0.0), 0)
    assert not forwards and all(p.grad is None for p in model.parameters())


def test_each_micro_batch_syncs_gradients_on_the_last_only_and_gets_the_runs_chunk_size(monkeypatch):
    """Gradients are reduced over ranks on the step's last micro-batch only (``grad_sync(sync=False)`` before:
    DDP's no_sync, one all-reduce per step, not per micro-batch); each micro-batch's loss gets the run's fixed chunk
    size, else ``train.loss_chunk_size``, and the ranks' loss scale."""
    model = make_tiny_lm(num_hidden_layers=1).train()
    syncs, chunks, real = [], [], train.step_terms
    monkeypatch.setattr(train.dist, "grad_sync", lambda model, sync: syncs.append(sync) or contextlib.nullcontext())
    monkeypatch.setattr(train, "step_terms", lambda *a, **k: chunks.append((k["chunk_size"], k["loss_scale"]))
                        or real(*a, **k))
    cfg = _clm_config()
    cfg.train.loss_chunk_size = 5
    for chunk, expect in ((None, 5), (7, 7)):
        syncs.clear(), chunks.clear()
        train.forward_backward(model, None, _micro_batches(3), cfg=cfg, vocab=TINY_VOCAB, device="cpu", ac=None,
                               fused_path=False, chunk=chunk)
        assert syncs == [False, False, True]
        assert chunks == [(expect, 1.0)] * 3


def test_the_heldout_metrics_score_the_first_eval_rows_rows_only():
    """data.eval_rows = 2 of 6 held-out rows: the trainer's held-out pass scores exactly the first two rows (their
    valid tokens, and their metrics as `evaluate.heldout_metrics` gives them on those rows), not every row."""
    from tailkd.data import collate
    from tailkd.evaluate import heldout_metrics

    cfg = DistillConfig()
    cfg.data.seq_len, cfg.data.eval_rows, cfg.train.batch_size = 12, 2, 4
    rows = [{k: v[r] for k, v in mb.items()} for mb in _micro_batches(3, seed=1) for r in range(2)]  # 4, 12, 4, ...
    student, teacher = make_tiny_lm(seed=0, num_hidden_layers=1), make_tiny_lm(seed=1, num_hidden_layers=1)
    got = train.heldout(student, teacher, rows, cfg, TINY_VOCAB, "cpu", None)
    assert got["tokens"] == 12 + 4
    expected = heldout_metrics(student, teacher, [collate(rows[:2])], TINY_VOCAB)
    assert got["kl"] == pytest.approx(expected["kl"], rel=1e-5)  # the same rows, one forward each: float32 sums


# --------------------------------------------------------------------------- train_step, log_step


def _stand_in_run(**fields) -> SimpleNamespace:
    """What train_step and log_step read of a `train.Run`, on a 1-parameter model with plain SGD."""
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = SimpleNamespace(progress=runs.Progress(), on_policy=None, model=model, cfg=DistillConfig(),
                          train_rows=None, sampler=None, signal_of=None, vocab=2, device=torch.device("cpu"), ac=None,
                          fused_path=False, loss_chunk=None, optimizer=optimizer,
                          scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1)))
    return SimpleNamespace(**{**vars(run), **fields})


def test_a_finite_loss_with_a_non_finite_gradient_norm_is_a_skipped_bad_step(monkeypatch):
    """A step whose loss is finite but whose gradient holds an inf (an overflow in the backward) changes nothing:
    no optimizer update, no schedule step; it is counted as a bad step (in a row) and its gradient is cleared."""
    run = _stand_in_run()
    weight = run.model.weight

    def backward_to_inf(model, *a, **k):
        model.weight.grad = torch.full_like(model.weight, float("inf"))
        return dict.fromkeys(train.TERMS, 0.5), 8

    monkeypatch.setattr(train, "next_micro_batches", lambda *a: [])
    monkeypatch.setattr(train, "forward_backward", backward_to_inf)
    before = weight.detach().clone()
    report = train.train_step(run, [])
    assert report.terms["loss"] == 0.5 and report.grad_norm == float("inf")
    assert not report.finite and report.skipped and not report.empty
    assert torch.equal(weight, before) and weight.grad is None
    assert run.scheduler.last_epoch == 0 and run.scheduler.get_last_lr() == [0.1]
    p = run.progress
    assert (p.step, p.bad_steps, p.bad_in_a_row, p.empty_steps) == (1, 1, 1, 0)


def test_a_stop_signal_on_another_rank_is_in_every_ranks_step_report(monkeypatch):
    """The signals of the step report are summed over ranks with its loss terms: a SIGTERM that reached only another
    rank stops this one after the same step (the ranks must leave the loop together, or the next collective hangs).
    The other rank is imitated by `dist.sum_over_ranks` adding its values: terms 0, one signal, nothing generated."""
    run = _stand_in_run()
    monkeypatch.setattr(train, "next_micro_batches", lambda *a: [])
    monkeypatch.setattr(train, "forward_backward", lambda *a, **k: (dict.fromkeys(train.TERMS, 0.25), 8))
    other_rank = [0.0] * len(train.TERMS) + [1, 0]
    monkeypatch.setattr(train.dist, "sum_over_ranks",
                        lambda values, device: [v + o for v, o in zip(values, other_rank, strict=True)])
    report = train.train_step(run, [])
    assert report.signals == 1 and report.terms == dict.fromkeys(train.TERMS, 0.25)


def test_generation_seconds_and_on_policy_batches_add_up_over_steps(monkeypatch):
    """The progress keeps the run's totals of on-policy micro-batches and generation seconds: each step adds its
    own (a resume and summary.json's ``on_policy`` read them)."""
    monkeypatch.setattr(train, "next_micro_batches", lambda *a: [])
    monkeypatch.setattr(train, "forward_backward", lambda *a, **k: (dict.fromkeys(train.TERMS, 0.0), 1))
    run = _stand_in_run(on_policy=SimpleNamespace(apply=lambda model, micro, step, rank: time.sleep(0.01) or
                                                  (micro, 2, 5)))
    reports = [train.train_step(run, []) for _ in range(2)]
    assert all(r.generation_seconds >= 0.01 and r.generated == 5 for r in reports)
    p = run.progress
    assert p.generation_seconds == reports[0].generation_seconds + reports[1].generation_seconds
    assert (p.on_policy_batches, p.generated_tokens) == (4, 10)


def test_max_bad_steps_in_a_row_stop_with_a_checkpoint_that_gives_a_resume_new_tries():
    """train.max_bad_steps = 3: two non-finite steps in a row go on; the third writes a checkpoint whose count of
    bad steps in a row is 0 (a --resume gets 3 new tries, not one), then stops with the one-line error naming the
    steps."""
    saved = []
    p = runs.Progress(step=7, bad_steps=2, bad_in_a_row=2)
    run = SimpleNamespace(progress=p, cfg=DistillConfig(),
                          checkpoint=lambda: saved.append(p.bad_in_a_row) or Path("run/checkpoints/step_00000008"))
    run.cfg.train.max_bad_steps = 3
    report = train.StepReport(dict.fromkeys(train.TERMS, float("nan")), float("nan"), 0.0, 1.0, False, False, 0)
    train.stop_for_bad_steps(run, report)
    assert saved == []
    p.step, p.bad_steps, p.bad_in_a_row = 8, 3, 3
    with pytest.raises(TailkdError, match=r"^stopped at step 8: 3 steps in a row \(6-8\) had a non-finite loss"):
        train.stop_for_bad_steps(run, report)
    assert saved == [0]


class _Bar:
    def set_postfix(self, **kw):
        pass

    def update(self, n):
        pass


def test_a_metrics_line_every_log_every_steps_at_the_last_step_and_at_every_skipped_one(capsys):
    """log_every 3 over 5 steps, step 2 without a valid token: lines for steps 2 (skipped: always logged), 3
    (log_every) and 5 (the last step, whatever log_every says)."""
    lines = []
    run = _stand_in_run(write_metrics=lines.append)
    run.cfg.train.log_every, run.cfg.train.max_steps = 3, 5
    for step in range(1, 6):
        run.progress.step = step
        empty = step == 2
        run.progress.empty_steps += empty
        report = train.StepReport(dict.fromkeys(train.TERMS, 1.0), 0.5, 1e-3, 0.01, empty, True, 0)
        train.log_step(run, report, _Bar())
    assert [(r["step"], r["skipped"], r["empty_steps"]) for r in lines] == [(2, True, 1), (3, False, 1),
                                                                           (5, False, 1)]
    assert "step 2: no valid token in the whole step" in capsys.readouterr().err


def test_the_on_policy_generation_rate_is_tokens_over_seconds_and_0_without_time():
    run = SimpleNamespace(on_policy=object(), progress=runs.Progress(on_policy_batches=3, generated_tokens=100))
    record = train.on_policy_record(run, train.StepReport({}, 0.0, 0.0, 1.0, False, True, 0, 50, 0.25))
    assert record == {"generated_tokens": 50, "gen_tokens_per_s": 200.0, "on_policy_batches": 3,
                      "generated_tokens_total": 100}
    assert train.on_policy_record(run, train.StepReport({}, 0.0, 0.0, 1.0, False, True, 0, 0, 0.0))[
        "gen_tokens_per_s"] == 0.0
    assert train.on_policy_record(SimpleNamespace(on_policy=None), None) == {}


def test_the_checkpoint_phase_seconds_add_up_over_checkpoints(monkeypatch, tmp_path):
    """`Run.seconds` (summary.json's phase_seconds) holds the invocation's total time per phase: two checkpoints of
    >= 20 ms each give >= 40 ms, not the last one's."""
    monkeypatch.setattr(train.runs, "save", lambda *a: time.sleep(0.02) or tmp_path)
    run = SimpleNamespace(out=tmp_path, model=None, optimizer=None, scheduler=None, sampler=None, progress=None,
                          cfg=DistillConfig(), seconds=dict.fromkeys(train.PHASES, 0.0))
    assert train.Run.checkpoint(run) == train.Run.checkpoint(run) == tmp_path
    assert run.seconds["checkpoints"] >= 0.04


# --------------------------------------------------------------------------- the loop


def _loop(monkeypatch, tmp_path, *, max_steps, start=0, stop_after=0, eval_every=0, save_every=0, signals_at=None):
    """`train._distill` over a stand-in run whose steps only count: the events (held-out evaluation, step,
    checkpoint, finish, each with the step it happened at) and the loop's result. ``start`` > 0: a resumed run
    (its initial held-out metrics in the checkpoint); ``signals_at``: {step: signals received during it}."""
    events = []
    cfg = DistillConfig()
    t = cfg.train
    t.max_steps, t.stop_after, t.eval_every, t.save_every = max_steps, stop_after, eval_every, save_every
    p = runs.Progress(step=start, initial_heldout={"kl": 1.0} if start else None)
    run = SimpleNamespace(cfg=cfg, out=tmp_path, progress=p, model=torch.nn.Linear(1, 1), log=None,
                          seconds=dict.fromkeys(train.PHASES, 0.0), write_metrics=lambda record: None,
                          heldout=lambda: events.append(("heldout", p.step)) or {"kl": 0.5, "tokens": 1},
                          checkpoint=lambda: events.append(("checkpoint", p.step)) or tmp_path / f"step_{p.step}")

    def step(run, signals):
        p.step += 1
        events.append(("step", p.step))
        signals.extend((signals_at or {}).get(p.step, []))
        return train.StepReport(dict.fromkeys(train.TERMS, 0.0), 0.0, 0.0, 1e-3, False, True, len(signals))

    monkeypatch.setattr(train, "setup_run", lambda cfg, device: run)
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "log_step", lambda run, report, bar: None)
    monkeypatch.setattr(train, "finish", lambda run: events.append(("finish", p.step)) or {"finished": p.step})
    with contextlib.ExitStack() as cleanup:
        result = train._distill(cfg, torch.device("cpu"), cleanup)
    return result, events


def test_the_periodic_evaluations_and_checkpoints_leave_the_last_step_to_finish(monkeypatch, tmp_path):
    """eval_every = save_every = 2 over 4 steps: held-out metrics before the first step and after step 2, a
    checkpoint after step 2; step 4's evaluation and checkpoint are finish's (not twice)."""
    result, events = _loop(monkeypatch, tmp_path, max_steps=4, eval_every=2, save_every=2)
    assert result == {"finished": 4}
    assert events == [("heldout", 0), ("step", 1), ("step", 2), ("heldout", 2), ("checkpoint", 2), ("step", 3),
                      ("step", 4), ("finish", 4)]


def test_a_resume_neither_evaluates_again_nor_trains_past_max_steps_whatever_stop_after(monkeypatch, tmp_path):
    """A resume at step 8 of 10 with stop_after 5: its held-out metrics before training are the checkpoint's (no
    second step-0 evaluation), and it ends at max_steps (stop_after only ever stops earlier); with stop_after 1 it
    stops after step 9 with a checkpoint."""
    result, events = _loop(monkeypatch, tmp_path, max_steps=10, start=8, stop_after=5)
    assert (result, events) == ({"finished": 10}, [("step", 9), ("step", 10), ("finish", 10)])
    result, events = _loop(monkeypatch, tmp_path, max_steps=10, start=8, stop_after=1)
    assert result == {"run": str(tmp_path), "steps": 9, "stopped": True}
    assert events == [("step", 9), ("checkpoint", 9)]


def test_a_signal_stops_after_its_step_with_one_checkpoint_and_the_first_signals_exit_code(monkeypatch, tmp_path):
    """SIGTERM during step 2 (a checkpoint step): the loop returns after it with exit code 143 and the checkpoint it
    just wrote (not a second one). SIGINT then SIGTERM during step 3: the first signal names the stop (130)."""
    result, events = _loop(monkeypatch, tmp_path, max_steps=6, save_every=2, signals_at={2: [signal.SIGTERM]})
    assert events == [("heldout", 0), ("step", 1), ("step", 2), ("checkpoint", 2)]
    assert result == {"run": str(tmp_path), "steps": 2, "stopped": True, "signal": "SIGTERM", "exit_code": 143}
    result, events = _loop(monkeypatch, tmp_path, max_steps=6, signals_at={3: [signal.SIGINT, signal.SIGTERM]})
    assert events[-1] == ("checkpoint", 3)
    assert (result["signal"], result["exit_code"], result["steps"]) == ("SIGINT", 130, 3)


def test_a_signal_during_the_last_step_lets_the_run_finish(monkeypatch, tmp_path):
    """A signal received during the last step: there is nothing left to resume, so the run finishes (final
    metrics, the student saved) instead of stopping with a checkpoint."""
    result, events = _loop(monkeypatch, tmp_path, max_steps=3, signals_at={3: [signal.SIGTERM]})
    assert result == {"finished": 3}
    assert events == [("heldout", 0), ("step", 1), ("step", 2), ("step", 3), ("finish", 3)]
