"""Data parallelism on the CPU with two gloo processes: the same global batch gives the same gradients,
weights and held-out metrics as one process (DDP and FSDP2), and checkpoints move between world sizes."""

import json
import types
from pathlib import Path

import bounds as B
import loss_bounds as LB
import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_lm
from launch import as_a_plain_process, free_port, join_gloo, run_cli, spawn
from safetensors.torch import load_file
from tiny import make_teacher_dir, read_metrics, write_corpus

from tailkd import distributed as dist
from tailkd import fused, prepare, train
from tailkd.config import DistillConfig
from tailkd.errors import TailkdError
from tailkd.objective import count_valid_tokens, objective
from tailkd.teacher import OnlineTeacher

# --------------------------------------------------------------------------- gradients of one step


def _problem():
    """A seeded student/teacher pair and 2 micro-batches of 4 rows whose valid tokens are very uneven:
    rows 0 and 2 (rank 0's share with 2 ranks) keep 3 labels each, rows 1 and 3 all 16."""
    cfg = DistillConfig()
    cfg.loss.k = 5
    student = make_tiny_lm(seed=0, num_hidden_layers=2).train()
    teacher = make_tiny_lm(seed=1).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(2):
        ids = torch.randint(0, TINY_VOCAB, (4, 17), generator=g)
        labels = ids[:, 1:].clone()  # (4, 16)
        labels[0::2, 3:] = -100
        micro.append({"input_ids": ids[:, :-1], "labels": labels, "segment_ids": torch.zeros(4, 16, dtype=torch.long)})
    return cfg, teacher, student, micro


def _full_grads(model) -> dict:
    grads = {}
    for name, p in dist.unwrap(model).named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads


def _online(teacher, fused_path: bool):
    return OnlineTeacher(teacher, TINY_VOCAB, fused_path=fused_path)


def _rank_step(problem, parallel: str, fused_path: bool, rank, world, device, **kwargs):
    """One optimizer step's forward + backward of this rank's rows (r::W) of ``problem`` = (cfg, teacher, student,
    micro-batches): the wrapped model (its gradients), the loss summed over ranks and this rank's valid tokens."""
    cfg, teacher, student, micro = problem
    model = dist.wrap_student(student, parallel, device)
    mine = [{k: v[rank::world] for k, v in mb.items()} for mb in micro]
    terms, n_valid = train.forward_backward(model, _online(teacher, fused_path), mine, cfg=cfg, vocab=TINY_VOCAB,
                                            device=device, ac=None, fused_path=fused_path, **kwargs)
    (loss,) = dist.sum_over_ranks([terms["loss"]], device)
    return model, loss, n_valid


def _grad_worker(rank, world, port, out_path):
    device = join_gloo(rank, world, port)
    results = {}
    try:
        assert dist.world() == world and dist.rank() == rank
        incoming, real = [], fused._scale_  # the fused layer's backward: (incoming gradient, the one it expected)
        fused._scale_ = lambda g, g_total, expected: incoming.append((float(g_total), expected)) or real(
            g, g_total, expected)
        for parallel, fused_path in (("ddp", False), ("fsdp", False), ("ddp", True)):
            model, loss, _ = _rank_step(_problem(), parallel, fused_path, rank, world, device)
            grads = _full_grads(model)
            key = parallel + ("+fused" if fused_path else "")
            results[key] = {"grads": grads, "loss": loss, "norm": train.clip_and_norm(model, 0.0)}
        fused._scale_ = real
        results["incoming"] = incoming
        with pytest.raises(TailkdError, match="split evenly"):
            prepare.check_batch_split(3)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.shutdown()


def test_two_ranks_give_the_gradient_of_one_big_batch(tmp_path):
    """DDP and FSDP2 over 2 gloo ranks with very uneven valid-token counts per rank: the gradient equals
    one process accumulating the same micro-batches, and one big batch normalised by its token count."""
    out = tmp_path / "grads.pt"
    spawn(_grad_worker, (2, free_port(), str(out)), 2)
    results = torch.load(out)
    # the fused run's layer computed its gradients at the one its total received (the world size declared as
    # `chunked_objective`'s loss_scale; 2 / n, exact in float32 as 2 · fl(1/n)): its backward scaled nothing
    incoming = results.pop("incoming")
    assert len(incoming) == 2 * 2 and all(g == e for g, e in incoming), incoming  # 2 micro-batches: ∂h, ∂W

    # One process, the same two micro-batches accumulated ...
    cfg, teacher, student, micro = _problem()
    terms, n_valid = train.forward_backward(student, _online(teacher, False), micro, cfg=cfg, vocab=TINY_VOCAB,
                                            device="cpu", ac=None, fused_path=False)
    assert n_valid == sum(int((mb["labels"] != -100).sum()) for mb in micro)
    accumulated = _full_grads(student)
    # ... the same on the fused, chunked loss layer (chunks of 5 tokens: rows split across chunks) ...
    cfg, teacher, student, micro = _problem()
    cfg.train.loss_chunk_size = 5
    train.forward_backward(student, _online(teacher, True), micro, cfg=cfg, vocab=TINY_VOCAB, device="cpu", ac=None,
                           fused_path=True)
    accumulated_fused = _full_grads(student)
    # ... and one big batch of all 8 rows, loss = Σ_tokens L / N (the definition).
    _, teacher, big, micro = _problem()
    batch = {k: torch.cat([mb[k] for mb in micro]) for k in micro[0]}
    s_logits = big(input_ids=batch["input_ids"]).logits  # (8, 16, V)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"]).logits
    n = count_valid_tokens(batch["labels"])
    objective(s_logits, batch["labels"], n, cfg=cfg.loss, teacher_logits=t_logits,
              segment_ids=batch["segment_ids"]).loss.backward()
    reference = _full_grads(big)

    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in reference.values()])))
    # Whole-network gradients (forward, loss, backward, token sums, all-reduce) in float32, in other orders: no tight
    # a-priori bound per entry (a gradient entry is a sum over 128 tokens that may cancel). The model of
    # bounds.f32_forward_rel (random-walk roundings, unit-condition layers) over the forward + backward path
    # (2 × decoder_fan_in) and the token sums gives each evaluation a relative error ~`rel` of the size of what is
    # summed; the tolerances below are that model's, taken relative to the entries (atol 1% of it for the entries that
    # cancel), and 10x for the fused path, whose loss layer adds its own bound (loss_bounds.head_objective: up to
    # ~10x the network part for these logits: closed-form gradients, chunked sums, its own TAD statistics pass).
    fan_in = 2 * B.decoder_fan_in(big.config, 16) + count_valid_tokens(batch["labels"])
    rel = 2 * B.f32_forward_rel(fan_in)  # two float32 evaluations
    for name, g in reference.items():
        torch.testing.assert_close(accumulated[name], g, rtol=rel, atol=0.01 * rel)
        torch.testing.assert_close(accumulated_fused[name], g, rtol=10 * rel, atol=0.1 * rel)
    assert set(results) == {"ddp", "fsdp", "ddp+fused"}
    for parallel, got in results.items():
        tol = 10 * rel if "fused" in parallel else rel
        assert got["loss"] == pytest.approx(terms["loss"], rel=tol), parallel
        assert got["norm"] == pytest.approx(norm, rel=tol), parallel
        for name, g in reference.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=tol, atol=tol * 0.01, msg=f"{parallel} {name}")

    # The comparison is sharp enough to catch the classic bug: each rank normalising by its own token count.
    cfg, teacher, wrong, micro = _problem()
    for r in range(2):
        mine = [{k: v[r::2] for k, v in mb.items()} for mb in micro]
        n_local = sum(count_valid_tokens(mb["labels"]) for mb in mine)
        for mb in mine:
            s = wrong(input_ids=mb["input_ids"]).logits
            with torch.no_grad():
                t = teacher(input_ids=mb["input_ids"]).logits
            (objective(s, mb["labels"], n_local, cfg=cfg.loss, teacher_logits=t).loss / 2).backward()
    bad = _full_grads(wrong)
    # the bug rescales each rank's share by N/N_local (here ~0.2-1.8): 100x beyond the tolerance above
    assert not torch.allclose(bad["model.norm.weight"], reference["model.norm.weight"], rtol=100 * rel)


def _masked_problem(loss: str, case: str):
    """Float64 student/teacher and 2 micro-batches of 4 rows (rank r's share with 2 ranks: rows r::2) whose masks are
    as uneven as masks get. ``one_label``: rank 0's micro-batch 0 fully masked, rank 1's micro-batch 1 a single label
    (one row fully masked, one with 1 label). ``rank_empty``: rank 0 has no label in the whole step."""
    cfg = DistillConfig()
    cfg.loss.name, cfg.loss.k = loss, 5
    student = make_tiny_lm(seed=0, num_hidden_layers=2).double().train()
    teacher = make_tiny_lm(seed=1).double().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    micro = []
    for m in range(2):
        ids = torch.randint(0, TINY_VOCAB, (4, 17), generator=g)
        labels = ids[:, 1:].clone()  # (4, 16)
        if case == "one_label":
            if m == 0:
                labels[0::2] = -100
            else:
                labels[1::2] = -100
                labels[1, 7] = ids[1, 8]
                labels[0, :5] = -100
        else:
            labels[0::2] = -100
            labels[1, :10] = -100
        micro.append({"input_ids": ids[:, :-1], "labels": labels, "segment_ids": torch.zeros(4, 16, dtype=torch.long)})
    return cfg, teacher, student, micro


MASKED = [(loss, case) for loss in ("kd", "tad") for case in ("one_label", "rank_empty")]
MODES = (("ddp", False), ("fsdp", False), ("ddp", True))  # (train.parallel, fused loss layer)


def _masked_worker(rank, world, port, out_path):
    device = join_gloo(rank, world, port)
    results = {}
    try:
        for loss, case in MASKED:
            for parallel, fused_path in MODES:
                model, loss_value, n_valid = _rank_step(_masked_problem(loss, case), parallel, fused_path, rank,
                                                        world, device, chunk=5)  # chunks split rows
                results[loss, case, parallel, fused_path] = (_full_grads(model), loss_value, n_valid)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.shutdown()


def _definition_grads(loss: str, case: str):
    """The gradient of one process over the whole global batch (8 rows), from the definitions written out here
    (formulas.md §1-2) in float64: Σ over valid tokens of CE + KL(p‖q) (kd) or CE + D_KL1 + β(X)(KL − D_KL1) with
    β(X) = β / ᾱ(row) (tad), divided by the batch's number of valid tokens."""
    cfg, teacher, student, micro = _masked_problem(loss, case)
    ids = torch.cat([mb["input_ids"] for mb in micro])
    labels = torch.cat([mb["labels"] for mb in micro])
    log_q = torch.log_softmax(student(input_ids=ids).logits, -1)
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(input_ids=ids).logits, -1)
    p, q = log_p.exp(), log_q.exp()
    valid = labels != -100
    total = torch.zeros((), dtype=torch.float64)
    for b in range(ids.shape[0]):
        positions = valid[b].nonzero().flatten().tolist()
        tops = [torch.topk(p[b, t], cfg.loss.k).indices for t in positions]
        alpha_t = [1 - p[b, t, top].sum() for t, top in zip(positions, tops)]
        abar = sum(alpha_t) / max(1, len(positions))
        for t, top, a_t in zip(positions, tops, alpha_t):
            kl = (p[b, t] * (log_p[b, t] - log_q[b, t])).sum()
            div = kl
            if loss == "tad":
                a_s = 1 - q[b, t, top].sum()
                kl1 = (p[b, t, top] * (log_p[b, t, top] - log_q[b, t, top])).sum() + a_t * torch.log(a_t / a_s)
                div = kl1 + cfg.loss.beta / abar * (kl - kl1)
            total = total - log_q[b, t, labels[b, t]] + div
    n = int(valid.sum())
    (total / n).backward()
    return {name: prm.grad for name, prm in student.named_parameters()}, total.item() / n, n


def _hung_worker(rank, world, port, folder):
    """Rank 1 joins the group and then hangs (alive, never in the collective) until rank 0 has written how long its
    all-reduce waited, or 60 s; rank 0's group was set up with a 2 s timeout (`distributed.setup`'s ``timeout_s``).
    The ranks meet through files first: the 2 s also bound the rendezvous, which a rank slower to start (imports on
    a loaded machine) would otherwise miss."""
    import time
    from pathlib import Path

    (Path(folder) / f"ready{rank}").touch()
    end = time.monotonic() + 60
    while not all((Path(folder) / f"ready{r}").exists() for r in range(world)) and time.monotonic() < end:
        time.sleep(0.01)
    join_gloo(rank, world, port, timeout_s=2)
    done = Path(folder) / "waited"
    if rank == 1:
        end = time.monotonic() + 60
        while not done.exists() and time.monotonic() < end:
            time.sleep(0.05)
        return
    start = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1))
        message = "no error"
    except RuntimeError as exc:  # gloo: "Timed out waiting 2000ms for recv operation to complete"
        message = str(exc)
    (Path(folder) / "message").write_text(message)
    done.write_text(str(time.monotonic() - start))


def test_a_hung_rank_fails_the_others_after_the_timeout(tmp_path):
    """`train.ddp_timeout` (`distributed.setup`'s ``timeout_s``) is the process group's: a collective that a hung rank
    never joins fails after it (2 s here), not after the 30-minute default; without the setting rank 0 would wait
    until rank 1 gave up (60 s) and left."""
    spawn(_hung_worker, (2, free_port(), str(tmp_path)), 2)
    waited = float((tmp_path / "waited").read_text())
    assert "timed out" in (tmp_path / "message").read_text().lower()
    assert 2 <= waited < 30, waited


def test_two_ranks_give_the_defined_gradient_in_float64_with_empty_micro_batches(tmp_path):
    """2 gloo ranks x 2 micro-batches in float64, a fully masked micro-batch on a rank, a micro-batch with one label,
    or a rank without any label in the step: DDP, FSDP2 and the fused layer (DDP) give, for kd and tad, the gradient
    of the definitions over the whole global batch (`_definition_grads`, tailkd's code not used), far more sharply
    than the float32 test above can (a wrong count or a wrong β(X) on a masked row would show at ~1e-2)."""
    out = tmp_path / "grads.pt"
    spawn(_masked_worker, (2, free_port(), str(out)), 2)
    results = torch.load(out)
    assert set(results) == {(*m, *mode) for m in MASKED for mode in MODES}
    # Float64 through the same paths: the random-walk model of bounds.f32_forward_rel with u = 2^-53, over the
    # forward + backward path and the token sums, two evaluations: ~1e-13, 1000x above float64's rounding of these
    # sums, 1e10x below any error of the normalisation.
    _, _, student, _ = _masked_problem("kd", "one_label")
    fan_in = 2 * B.decoder_fan_in(student.config, 16) + 8 * 16
    rel = 2 * B.SAFETY * B.gamma_rw(fan_in, u=2.0**-53)
    for loss, case in MASKED:
        reference, ref_loss, n = _definition_grads(loss, case)
        for parallel, fused_path in MODES:
            grads, loss_value, n_valid = results[loss, case, parallel, fused_path]
            what = f"{loss} {case} {parallel}{' fused' if fused_path else ''}"
            assert n_valid == n, what
            assert loss_value == pytest.approx(ref_loss, rel=rel), what
            for name, g in reference.items():
                torch.testing.assert_close(grads[name], g, rtol=rel, atol=0.01 * rel, msg=f"{what} {name}")


# --------------------------------------------------------------------------- end to end through the CLI


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"teacher": make_teacher_dir(root / "teacher"), "corpus": write_corpus(root / "corpus.txt"),
            "cache": root / "cache"}


def args(assets, out, *extra):
    # 5 held-out rows: 3 + 2 over two ranks (uneven on purpose); 2 micro-batches of 4 rows per step.
    return ["distill", "--teacher", str(assets["teacher"]), "--data", str(assets["corpus"]),
            "--data.cache_dir", str(assets["cache"]), "--student-layers", "2", "--seq-len", "32",
            "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--train.warmup_steps", "2",
            "--data.eval_rows", "5", "--steps", "6", "--train.eval_every", "3", "--train.save_every", "3",
            "--device", "cpu", "--train.precision", "fp32", "--out", str(out), *extra]  # fp32: compared to 1e-4


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    run_cli(args(assets, run))
    return run


def assert_same_run(one, many, step0_bound):
    """Whole runs, 1 vs 2 processes (+ resumes): no tight a-priori bound. Per step the two runs' gradients differ by
    the whole-network model of `test_two_ranks_give_the_gradient_of_one_big_batch` (relative ~1e-4 of what is summed);
    AdamW moves each weight by <= lr per step whatever the gradient's size, so a relative gradient change δ moves a
    weight by ~2δ·lr per step, and 6 steps at lr 3e-3 leave the weights within ~1e-5 relative (atol 1e-5 for the
    entries near 0) — far below how far training moved them (> 1e-2, asserted by the caller). The logged losses and
    metrics follow the weights smoothly: rel 1e-5. Step 0 (the held-out metrics of the same initial weights):
    two float32 forwards of the same rows, `step0_bound` (loss_bounds.two_forwards_heldout_bounds)."""
    a, b = load_file(str(one / "final" / "model.safetensors")), load_file(str(many / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    ra, rb = read_metrics(one), read_metrics(many)
    # Rank 0 alone writes: every (step, split) once, the same lines as one process.
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    for x, y in zip(ra, rb):
        keys = ["loss", "clm", "div", "grad_norm", "lr"] if x["split"] == "train" else \
            ["kl", "rkl", "student_clm", "teacher_clm", "agreement"]
        if x["split"] == "heldout":  # counts: the same training tokens so far and the same held-out tokens scored
            assert (y["tokens"], y["eval_tokens"]) == (x["tokens"], x["eval_tokens"]), x["step"]
        for key in keys:
            if x["step"] == 0:
                B.assert_within(y[key], x[key], step0_bound[key], msg=f"step 0 {key}")
            else:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
    return a, b


def step0_bound(assets):
    """loss_bounds.two_forwards_heldout_bounds of the initial student on the 5 held-out rows."""
    from tailkd import models
    from tailkd.data import PackedRows, collate

    teacher, tok = models.load_teacher(str(assets["teacher"]), device="cpu", dtype="fp32")
    corpus = next(p for p in (assets["cache"] / "corpora").iterdir() if (p / "heldout.bin").exists())
    held = PackedRows(corpus / "heldout.bin", 32)
    return LB.two_forwards_heldout_bounds(initial_student(assets), teacher, collate([held[i] for i in range(5)]),
                                          len(tok), bins=None)


def test_two_processes_equal_one_with_resumes_on_every_rank(assets, single, tmp_path):
    """DDP for steps 1-2, DDP again (resumed on both ranks) for 3-4, FSDP (resumed on both ranks) for 5-6."""
    run = tmp_path / "ddp"
    run_cli(args(assets, run, "--train.stop_after", "2"), nproc=2)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"] and not (run / "final").exists()
    run_cli(args(assets, run, "--resume", "--train.stop_after", "2"), nproc=2)
    assert (run / "checkpoints" / "step_00000004").is_dir()
    run_cli(args(assets, run, "--resume", "--train.parallel", "fsdp"), nproc=2)
    a, _ = assert_same_run(single, run, step0_bound(assets))
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    # Not trivially equal: training moved the weights far more than the tolerance.
    start = initial_student(assets).state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-2


def test_fsdp_two_processes_equal_one_and_the_checkpoint_resumes_in_one_process(assets, single, tmp_path):
    """Steps 1-3 on 2 FSDP2 ranks with activation checkpointing (recomputing sharded layers gathers them again),
    4-6 resumed in one process without it: the one-process run's result."""
    run = tmp_path / "fsdp"
    out, _ = run_cli(args(assets, run, "--train.parallel", "fsdp", "--train.stop_after", "3",
                          "--train.activation_checkpointing", "1"), nproc=2)
    assert "activation checkpointing: 2 of the student's 2 layers recompute" in out
    assert (run / "checkpoints" / "step_00000003").is_dir()
    run_cli(args(assets, run, "--resume"))  # the FSDP checkpoint holds full tensors: one process continues it
    assert_same_run(single, run, step0_bound(assets))


def initial_student(assets):
    from tailkd import models
    from tailkd.student import build_student

    teacher, _ = models.load_teacher(str(assets["teacher"]), device="cpu", dtype="fp32")
    return build_student(teacher, num_layers=2, seed=0)[0]


def test_trainer_heldout_metrics_equal_the_evaluation_module(assets, single):
    # 1 vs 2 processes is checked above (assert_same_run: step-0 metrics within rel 1e-9, the sums of rank 0's
    # and rank 1's rows); here the trainer's own held-out loop is checked against tailkd.evaluate.
    from tailkd import models
    from tailkd.data import PackedRows, collate
    from tailkd.evaluate import heldout_metrics

    cfg_rows = next(r for r in read_metrics(single) if r["split"] == "heldout" and r["step"] == 0)
    teacher, tok = models.load_teacher(str(assets["teacher"]), device="cpu", dtype="fp32")
    student = initial_student(assets)
    corpus = next(p for p in (assets["cache"] / "corpora").iterdir() if (p / "heldout.bin").exists())
    held = PackedRows(corpus / "heldout.bin", 32)
    rows = [held[i] for i in range(5)]
    expected = heldout_metrics(student, teacher, [collate(rows[:4]), collate(rows[4:])], len(tok))
    # the trainer's process (1 thread) and this one: two float32 forwards of the same rows and weights
    bound = LB.two_forwards_heldout_bounds(student, teacher, collate(rows), len(tok), bins=None)
    cfg_rows = {**cfg_rows, "tokens": cfg_rows["eval_tokens"]}  # a metrics line's "tokens" are TRAINING tokens
    for key in ("kl", "student_clm", "agreement", "tokens"):
        B.assert_within(cfg_rows[key], expected[key], bound[key], msg=key)


# --------------------------------------------------------------------------- the small collectives


def _collectives_worker(rank, world, port, folder):
    """Every small collective of `tailkd.distributed` on one of 2 gloo ranks; what this rank saw, saved for the
    parent to check (an assertion here would only show as the spawn's traceback)."""
    import contextlib
    import io
    import time

    folder = Path(folder)
    join_gloo(rank, world, port, timeout_s=60)
    seen = {"world": dist.world(), "rank": dist.rank(), "is_main": dist.is_main(), "loss_scale": dist.loss_scale()}
    try:
        # float64 sums: 2^24 + 1 has no float32 (it would come back as 2^24)
        seen["sum"] = dist.sum_over_ranks([2.0 ** 24, 0.5] if rank == 0 else [1.0, 0.25], torch.device("cpu"))
        seen["max"] = dist.max_over_ranks(10.0 * rank - 5.0, torch.device("cpu"))
        seen["broadcast"] = dist.broadcast({"from": rank})
        sums = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor([3.0], dtype=torch.float64)}
        seen["gather_sums"] = dist.gather_sums(sums if rank == 0 else {"a": torch.tensor([0.5, 0.25],
                                                                                          dtype=torch.float64),
                                                                       "c": torch.tensor([7.0], dtype=torch.float64)})
        # barrier: rank 0 passes it only once rank 1, which writes a file late, reached it
        if rank == 1:
            time.sleep(1.0)
            (folder / "before-barrier").write_text("1")
        dist.barrier()
        seen["after_barrier"] = (folder / "before-barrier").is_file()
        # raise_if_any: an error on one rank is raised on every rank, named with its rank, even without a message
        for bad_rank, error in ((1, ValueError()), (0, OSError("disk full"))):
            try:
                dist.raise_if_any(error if rank == bad_rank else None)
                seen[f"raised{bad_rank}"] = None
            except Exception as exc:  # noqa: BLE001 - what each rank raised is the subject
                seen[f"raised{bad_rank}"] = (type(exc).__name__, str(exc))

        # on_main_then_all: rank 0 first (its file is there when rank 1 runs), main_only runs on rank 0 alone
        def first():
            (folder / f"ran{rank}").write_text("1")
            return [rank, (folder / "ran0").is_file()]

        seen["main_then_all"] = dist.on_main_then_all(first)
        calls = []
        seen["main_only"] = dist.on_main_then_all(lambda: calls.append(rank) or "result", main_only=True)
        seen["main_only_calls"] = calls
        # say: rank 0 only, stdout or stderr
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            dist.say("to stdout")
            dist.say("to stderr", err=True)
        seen["say"] = (out.getvalue(), err.getvalue())
        real_peak = dist.peak_memory
        dist.peak_memory = lambda device: 1000 + rank  # each rank's own, gathered in rank order
        try:
            seen["peaks"] = dist.peak_memory_per_rank(torch.device("cpu"))
        finally:
            dist.peak_memory = real_peak
    finally:
        torch.save(seen, folder / f"seen{rank}.pt")
        dist.shutdown()


def test_the_small_collectives_on_two_ranks(tmp_path):
    """`sum_over_ranks` (float64), `max_over_ranks`, `broadcast` (rank 0's), `gather_sums` (key-wise, keys of any
    rank), `barrier`, `raise_if_any` (the error on every rank, named with its rank, also one without a message),
    `on_main_then_all` (rank 0 first; main_only: rank 0 alone), `say` (rank 0 only), `peak_memory_per_rank` (rank
    order) and `loss_scale` (the world size) on 2 gloo ranks."""
    spawn(_collectives_worker, (2, free_port(), str(tmp_path)), 2)
    seen = [torch.load(tmp_path / f"seen{r}.pt") for r in range(2)]
    for r, s in enumerate(seen):
        assert (s["world"], s["rank"], s["is_main"], s["loss_scale"]) == (2, r, r == 0, 2.0)
        assert s["sum"] == [2.0 ** 24 + 1, 0.75] and s["max"] == 5.0 and s["broadcast"] == {"from": 0}
        assert sorted(s["gather_sums"]) == ["a", "b", "c"]
        assert s["gather_sums"]["a"].tolist() == [1.5, 2.25]
        assert s["gather_sums"]["b"].tolist() == [3.0] and s["gather_sums"]["c"].tolist() == [7.0]
        assert s["after_barrier"]
        assert s["main_then_all"] == [r, True]
        assert s["main_only"] == ("result" if r == 0 else None) and s["main_only_calls"] == ([0] if r == 0 else [])
        assert s["peaks"] == [1000, 1001]
    assert seen[0]["raised1"] == ("TailkdError", "ValueError (on rank 1)") and seen[1]["raised1"] == ("ValueError", "")
    assert seen[0]["raised0"] == ("OSError", "disk full")
    assert seen[1]["raised0"] == ("TailkdError", "disk full (on rank 0)")
    assert seen[0]["say"] == ("to stdout\n", "to stderr\n") and seen[1]["say"] == ("", "")


def test_the_small_collectives_in_one_process():
    """In one process every collective is the identity and costs nothing: `on_main_then_all` runs its function once
    (main_only too) and an error raised in it comes out as it is; `raise_if_any` raises the error it is given."""
    cpu = torch.device("cpu")
    assert (dist.world(), dist.rank(), dist.is_main(), dist.loss_scale()) == (1, 0, True, 1.0)
    assert dist.sum_over_ranks([1, 2.5], cpu) == [1.0, 2.5] and dist.max_over_ranks(3, cpu) == 3.0
    obj = {"x": 1}
    assert dist.broadcast(obj) is obj
    calls = []
    assert dist.on_main_then_all(lambda: calls.append(1) or "r") == "r" and calls == [1]
    assert dist.on_main_then_all(lambda: calls.append(2) or "m", main_only=True) == "m" and calls == [1, 2]
    error = OSError("disk full")
    with pytest.raises(OSError) as info:
        dist.on_main_then_all(lambda: (_ for _ in ()).throw(error))
    assert info.value is error
    dist.raise_if_any(None)
    with pytest.raises(ValueError, match="^$"):
        dist.raise_if_any(ValueError())


def _wrap_worker(rank, world, port, folder):
    """One of 2 gloo ranks: a DDP and an FSDP2 student, two micro-batches of other rows per rank, the first under
    ``grad_sync(False)``; what the gradients look like after each, which modules FSDP2 made its units, and a
    checkpoint that only rank 0 holds loaded on every rank (`load_full_state`)."""
    from torch.distributed.fsdp import FSDPModule

    from tailkd.sharded_teacher import is_dtensor

    join_gloo(rank, world, port, timeout_s=120)
    seen = {}
    try:
        ids = torch.randint(0, TINY_VOCAB, (2, 2, 8), generator=torch.Generator().manual_seed(10 + rank))
        for parallel in ("ddp", "fsdp"):
            student = make_tiny_lm(seed=0, num_hidden_layers=2).train()
            model = dist.wrap_student(student, parallel, torch.device("cpu"))
            grads = []
            for micro, sync in ((0, False), (1, True)):
                with dist.grad_sync(model, sync):
                    model(input_ids=ids[micro], labels=ids[micro]).loss.backward()
                params = dict(dist.unwrap(model).named_parameters())
                if parallel == "ddp":
                    grads.append({n: p.grad.detach().clone() for n, p in params.items()})
                else:  # the sharded gradients (DTensors), or None before the first reduce-scatter
                    grads.append([p.grad is not None and is_dtensor(p.grad) for p in params.values()])
            seen[parallel] = grads
        seen["fsdp_units"] = [n for n, m in student.named_modules() if isinstance(m, FSDPModule)]
        # a checkpoint of rank 0's (the other ranks pass empty dicts) reaches every rank
        saved = make_tiny_lm(seed=5, num_hidden_layers=2)
        optimizer = torch.optim.AdamW(saved.parameters(), lr=1e-3)
        state = ({k: v.clone() for k, v in saved.state_dict().items()}, optimizer.state_dict())
        if rank != 0:
            state = ({}, {})
        student = make_tiny_lm(seed=6, num_hidden_layers=2).train()
        model = dist.wrap_student(student, "ddp", torch.device("cpu"))
        dist.load_full_state(model, torch.optim.AdamW(model.parameters(), lr=1e-3), *state, optimizer_stepped=False)
        seen["loaded"] = all(torch.equal(v, saved.state_dict()[k]) for k, v in dist.unwrap(model).state_dict().items())
    finally:
        torch.save(seen, Path(folder) / f"seen{rank}.pt")
        dist.shutdown()


def test_wrapped_students_reduce_gradients_on_the_synced_micro_batch_only(tmp_path):
    """2 gloo ranks, other rows per rank: under DDP the first micro-batch's backward (``grad_sync(False)``) leaves
    each rank its own gradient and the last one (sync) makes them equal; under FSDP2 the first leaves no sharded
    gradient at all and the last one gives every rank its shard; FSDP2's units are the decoder layers and the root
    (nothing else); a checkpoint only rank 0 holds is loaded on every rank (broadcast from rank 0)."""
    spawn(_wrap_worker, (2, free_port(), str(tmp_path)), 2)
    seen = [torch.load(tmp_path / f"seen{r}.pt") for r in range(2)]
    first, last = ([s["ddp"][i] for s in seen] for i in (0, 1))
    assert any(not torch.equal(first[0][n], first[1][n]) for n in first[0])  # accumulated locally
    assert all(torch.equal(last[0][n], last[1][n]) for n in last[0])  # reduced (the same average on both ranks)
    for s in seen:
        assert not any(s["fsdp"][0]) and all(s["fsdp"][1]), s["fsdp"]
        assert s["fsdp_units"] == ["", "model.layers.0", "model.layers.1"], s["fsdp_units"]
        assert s["loaded"]


def test_full_state_round_trip_in_one_process_keeps_an_unstepped_optimizer_empty_and_ties_one_tensor():
    """`full_state` of an optimizer that never stepped: no state (torch's get_state_dict would have made one by a
    zero-gradient step, AdamW step 1, and the next real update would differ from a run that saved nothing), in the
    returned dict and in the optimizer; tied weights are one tensor under both names (saved once). `load_full_state`
    restores the weights, leaves an unstepped optimizer empty and restores a stepped one's moments."""
    saved = make_tiny_lm(seed=0, num_hidden_layers=1, tie_word_embeddings=True)
    optimizer = torch.optim.AdamW(saved.parameters(), lr=1e-2)
    model_state, optim_state = dist.full_state(saved, optimizer)
    assert not optimizer.state and optim_state["state"] == {}
    assert model_state["lm_head.weight"] is model_state["model.embed_tokens.weight"]
    loaded = make_tiny_lm(seed=1, num_hidden_layers=1, tie_word_embeddings=True)
    loaded_opt = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    dist.load_full_state(loaded, loaded_opt, model_state, optim_state, optimizer_stepped=False)
    assert not loaded_opt.state
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in loaded.state_dict().items())

    saved(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()
    model_state, optim_state = dist.full_state(saved, optimizer)
    dist.load_full_state(loaded, loaded_opt, model_state, optim_state, optimizer_stepped=True)
    for p, q in zip(saved.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], loaded_opt.state[q][key]), key


def test_setup_and_shutdown_own_only_the_group_they_started(monkeypatch):
    """`setup(process_group=True)` in a plain process starts a group of one and `shutdown` ends it; a group the caller
    started (a user's script that set up torch.distributed itself) is used as it is and left running by `shutdown`."""
    from datetime import timedelta

    as_a_plain_process(monkeypatch)
    assert not torch.distributed.is_initialized()
    try:
        assert dist.setup("cpu", process_group=True) == torch.device("cpu")
        assert torch.distributed.is_initialized() and dist.world() == 1
        dist.shutdown()
        assert not torch.distributed.is_initialized()
        assert dist.setup("cpu") == torch.device("cpu") and not torch.distributed.is_initialized()  # none needed
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1,
                                             timeout=timedelta(seconds=60))
        for process_group in (False, True):
            assert dist.setup("cpu", process_group=process_group) == torch.device("cpu")
            dist.shutdown()
            assert torch.distributed.is_initialized()  # the caller's
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_launcher_environment_refusals(monkeypatch):
    """WORLD_SIZE that is not a number, accelerate configs tailkd would silently ignore (DeepSpeed, FSDP, whatever
    the case of accelerate's "true") and, under a launcher, a device name that is none, are one-line errors;
    WORLD_SIZE unset is one process."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.launched_world_size() == 1
    for value in ("two", ""):
        monkeypatch.setenv("WORLD_SIZE", value)
        with pytest.raises(TailkdError, match=rf"^WORLD_SIZE='{value}' is not a number; launch with torchrun$"):
            dist.launched_world_size()
    monkeypatch.setenv("WORLD_SIZE", "1")
    for var, words in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed config is not supported"),
                       ("ACCELERATE_USE_FSDP", "FSDP config is not read by tailkd")):
        for value in ("true", "True", "TRUE"):
            monkeypatch.setenv(var, value)
            with pytest.raises(TailkdError, match=words):
                dist.setup("cpu")
        monkeypatch.setenv(var, "false")
        assert dist.setup("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: the device name is checked before any rendezvous
    with pytest.raises(TailkdError, match=r"^train\.device='gpu' is not a device"):
        dist.setup("gpu")
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads the RSS from /proc (Linux)")
def test_peak_memory_on_the_cpu_is_the_peak_rss_in_bytes():
    """On the CPU `peak_memory` is the process's peak resident set size in BYTES (Linux's ru_maxrss is in KiB): at
    least a buffer just touched, and the resident size now (/proc/self/statm, in pages) up to the kernel's counting
    slack: getrusage reads per-CPU batched RSS counters that can lag the exact sum by up to a batch of pages per CPU
    (here ~46 pages were seen); 16 MiB is far above that and 1024x below a size read in KiB as bytes."""
    import os

    buffer = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, every page written
    rss_now = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = dist.peak_memory(torch.device("cpu"))
    assert peak >= buffer.numel() * 4 and peak >= rss_now - 16 * 2 ** 20, (peak, rss_now)
    assert dist.memory_kind(torch.device("cpu")) == "peak RSS (VmHWM)"
    assert dist.memory_kind(torch.device("cuda", 0)) == "torch.cuda.max_memory_allocated"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_of_a_process_is_its_own_not_its_launcher_s():
    """A process started by one whose peak RSS is high (1 GiB touched here, as a test runner or a notebook holds)
    reports its own peak, not its launcher's: Linux carries getrusage's ru_maxrss across execve (the launcher's
    peak, here >= 1 GiB, was what a run launched so reported); VmHWM is the new process's own (a Python that
    imports torch: ~0.3-0.5 GB)."""
    import subprocess
    import sys

    buffer = torch.ones(2 ** 30 // 4)  # 1 GiB, every page written: the launcher's peak is at least that
    code = ("import resource, torch; from tailkd import distributed as d; "
            "print(d.peak_memory(torch.device('cpu')), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    del buffer
    own, carried = (int(x) for x in out.split())
    assert carried >= 2 ** 30  # the kernel's carried-over peak: what the test can tell apart
    assert 50e6 < own < 2 ** 30 * 0.9, own


# --------------------------------------------------------------------------- the end of a rank


def test_leave_flushes_and_ends_the_process_without_finalization(tmp_path):
    """`distributed.leave(code)`: the exit status is ``code``, output still buffered is written, and no exit handler
    runs (the interpreter does not finalize)."""
    import subprocess
    import sys

    code = ("import atexit, sys; atexit.register(lambda: print('finalized')); sys.stdout.write('a partial line'); "
            "from tailkd import distributed; distributed.leave(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == "a partial line", (proc.stdout, proc.stderr)


@pytest.mark.parametrize("world", [None, "1", "2"])
def test_a_rank_of_the_tailkd_command_leaves_once_main_returned(monkeypatch, world):
    """`cli.entry` under torchrun (WORLD_SIZE > 1) ends the process by `distributed.leave` with main's exit code; a
    plain process returns it."""
    from tailkd import cli

    left = []

    class Left(Exception):
        pass

    def record(code):
        left.append(code)
        raise Left

    monkeypatch.setattr(dist, "leave", record)
    monkeypatch.setattr(cli, "main", lambda argv=None, keep_host_memory=False: 5)
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    if world == "2":
        with pytest.raises(Left):
            cli.entry()
        assert left == [5]
    else:
        assert cli.entry() == 5 and left == []


def test_resolve_device_names_the_setting_and_the_visible_devices(monkeypatch):
    """A device setting is checked against the visible CUDA devices, the error naming the setting the user gave
    (eval --device cuda:0 on a CPU machine was an AssertionError from torch; eval --device cuda named
    train.device). The device count is patched: the same checks on any machine."""
    assert dist.resolve_device("cpu", "eval.device") == torch.device("cpu")
    with pytest.raises(TailkdError, match=r"^eval\.device='gpu' is not a device; use auto, cpu, cuda or cuda:N$"):
        dist.resolve_device("gpu", "eval.device")
    with pytest.raises(TailkdError, match=r"^train\.device='cuda:x' is not a device"):
        dist.resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(TailkdError, match=rf"^eval\.device={name} but no CUDA device is visible; use --device "
                                              "cpu$"):
            dist.resolve_device(name, "eval.device")
    assert dist.resolve_device("auto", "eval.device") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist.resolve_device("cuda:1", "analyze.device") == torch.device("cuda", 1)
    with pytest.raises(TailkdError, match=r"^analyze\.device=cuda:2 but only 2 CUDA device\(s\) are visible: use "
                                          r"cuda:0 to cuda:1$"):
        dist.resolve_device("cuda:2", "analyze.device")


def test_native_bf16_override_and_the_precision_it_gives(monkeypatch):
    """TAILKD_NATIVE_BF16: 0 or 1 (spaces around allowed) replaces the hardware detection, so precision auto takes
    fp32 (None) or bf16; anything else is a one-line error naming the variable; unset, the CPU probes decide.
    precision bf16 / fp32 do not read it."""
    cpu = torch.device("cpu")
    for value, native in (("0", False), ("1", True), (" 1 ", True)):
        monkeypatch.setenv(dist.NATIVE_BF16_ENV, value)
        assert dist.native_bf16(cpu) is native
        assert dist.autocast_dtype("auto", cpu) is (torch.bfloat16 if native else None)
        assert dist.autocast_dtype("bf16", cpu) is torch.bfloat16 and dist.autocast_dtype("fp32", cpu) is None
    for value in ("yes", "true", "2"):
        monkeypatch.setenv(dist.NATIVE_BF16_ENV, value)
        with pytest.raises(TailkdError, match=rf"^TAILKD_NATIVE_BF16='{value}' must be 0 \(no native bf16: fp32 by "
                                              r"default\) or 1; unset it to detect the hardware$"):
            dist.autocast_dtype("auto", cpu)
        assert dist.autocast_dtype("fp32", cpu) is None
    for value in (None, ""):  # unset or empty: the detection
        if value is None:
            monkeypatch.delenv(dist.NATIVE_BF16_ENV, raising=False)
        else:
            monkeypatch.setenv(dist.NATIVE_BF16_ENV, value)
        for probes, native in (((True, False), True), ((False, True), True), ((False, False), False)):
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda p=probes: p[0], raising=False)
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda p=probes: p[1], raising=False)
            assert dist.native_bf16(cpu) is native
            assert dist.autocast_dtype("auto", cpu) is (torch.bfloat16 if native else None)


def fake_cuda_capability(monkeypatch, major: int) -> None:
    """torch.cuda as on one CUDA card of compute capability ``major``.0 (bf16 tensors allowed: emulated below sm_80),
    without TAILKD_NATIVE_BF16."""
    monkeypatch.delenv(dist.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: types.SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (major, 0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d=None: True, raising=False)


@pytest.mark.parametrize("major,native", [(7, False), (8, True), (9, True)])
def test_native_bf16_on_cuda_is_sm80_or_newer_not_emulated_bf16(monkeypatch, major, native):
    """precision auto promises bf16 autocast where the hardware has native bf16: torch.cuda.is_bf16_supported() also
    says yes where bf16 is emulated (a V100, T4: sm_70/75), which took the slow emulated bf16 path there."""
    fake_cuda_capability(monkeypatch, major)
    cuda = torch.device("cuda", 0)
    assert dist.native_bf16(cuda) is native
    assert dist.autocast_dtype("auto", cuda) is (torch.bfloat16 if native else None)
