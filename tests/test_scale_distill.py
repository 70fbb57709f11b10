"""`tailkd distill` on the fused loss layer and from an offline teacher cache, end to end through the CLI."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_teacher_dir, read_metrics, write_corpus

from tailkd.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    teacher = make_teacher_dir(root / "teacher", layers=2, hidden=48, train_steps=30)
    corpus = write_corpus(root / "corpus.txt", n_docs=40)
    return {"teacher": teacher, "corpus": corpus, "cache": root / "tok", "root": root}


def distill_args(assets, out, *extra, steps=4):
    return ["distill", "--teacher", str(assets["teacher"]), "--data", str(assets["corpus"]),
            "--data.cache_dir", str(assets["cache"]), "--student-layers", "1", "--seq-len", "32",
            "--batch-size", "4", "--lr", "3e-3", "--train.warmup_steps", "1", "--data.eval_rows", "4",
            "--train.precision", "fp32", "--steps", str(steps), "--out", str(out), *extra]


def cache_args(assets, out, *extra):
    return ["cache-teacher", "--teacher", str(assets["teacher"]), "--data", str(assets["corpus"]),
            "--cache-dir", str(assets["cache"]), "--seq-len", "32", "--device", "cpu", "--dtype", "fp32",
            "--rows-per-shard", "8", "--out", str(out), *extra]


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if r["split"] == "train"]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("loss", ["tad", "kd", "jsd"])
def test_fused_loss_layer_trains_like_full_logits(assets, tmp_path, capsys, loss):
    """Same run, full logits vs the fused chunked layer (chunks of 24 tokens: rows cut across chunks, so TAD's
    β(X) needs its statistics pass): the same losses step by step and the same student."""
    dense, chunked = tmp_path / "dense", tmp_path / "fused"
    extra = ("--loss", loss, "--k", "5")
    assert main(distill_args(assets, dense, *extra, "--fused-loss", "off")) == 0
    assert "loss layer: full logits" in capsys.readouterr().out
    assert main(distill_args(assets, chunked, *extra, "--fused-loss", "on", "--train.loss_chunk_size", "24")) == 0
    assert "loss layer: fused (LM heads + loss in chunks of 24 tokens, torch row maths)" in capsys.readouterr().out
    a, b = train_losses(dense), train_losses(chunked)
    assert len(a) == len(b) == 4
    # Whole runs (no tight a-priori bound). Step 1: the same weights and batch, the same network forward; only the
    # loss layer differs: two float32 evaluations, each within loss_bounds.head_objective, evaluated here on a
    # representative batch of the same models and corpus (the run's own batch is drawn inside the trainer).
    # Steps 2-4: the weights differ by AdamW's response to those gradient differences (~2δ·lr per step per weight, δ
    # the relative gradient difference), so the later losses drift: rel 1e-3 after 3 more steps; the weights: rtol
    # 1e-3, atol 1e-4 (~lr·δ·n plus the near-zero entries), against a training movement of ~lr per step (3e-3), so
    # the check stays meaningful.
    assert a[0] == pytest.approx(b[0], rel=_loss_layer_rel(assets, loss))
    assert a == pytest.approx(b, rel=1e-3)
    assert summary(dense)["loss_layer"] == "full logits" and summary(chunked)["loss_layer"] == "fused"
    wa = load_file(str(dense / "final" / "model.safetensors"))
    wb = load_file(str(chunked / "final" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-4, msg=name)


def _loss_layer_rel(assets, loss):
    """2 × loss_bounds.head_objective's loss bound / the loss, for the run's initial student (1 layer of the teacher,
    seed 0) and teacher on the corpus' first 4 rows of 32 tokens: the relative difference dense vs fused allows."""
    from loss_bounds import head_objective

    from tailkd import head as head_mod
    from tailkd import models
    from tailkd.config import LossConfig
    from tailkd.objective import objective
    from tailkd.student import build_student

    teacher, tok = models.load_teacher(str(assets["teacher"]), device="cpu", dtype="fp32")
    student = build_student(teacher, num_layers=1, seed=0)[0].eval()
    ids = torch.tensor(tok(assets["corpus"].read_text())["input_ids"][: 4 * 33]).view(4, 33)
    inp, labels = ids[:, :-1], ids[:, 1:]
    vocab = len(tok)
    with torch.no_grad():
        h_s, h_t = head_mod.final_hidden(student, inp), head_mod.final_hidden(teacher, inp)
    head_s, head_t = head_mod.model_head(student, vocab), head_mod.model_head(teacher, vocab)
    cfg = LossConfig(name=loss, k=5)
    bound = head_objective(cfg, h_s, head_s.weight, head_s.bias, head_s.spec, h_t, head_t, labels)["loss"]
    with torch.no_grad():
        value = objective(head_mod.apply_head(h_s, head_s), labels, labels.numel(), cfg=cfg,
                          teacher_logits=head_mod.apply_head(h_t, head_t)).loss
    return float(2 * bound / value)


@pytest.fixture(scope="module")
def caches(assets):
    """A top-K cache (K=8) and one with fp32 hidden states, of the rows tailkd distill trains on."""
    topk, hidden = assets["root"] / "cache-topk", assets["root"] / "cache-hidden"
    assert main(cache_args(assets, topk, "--k", "8")) == 0
    assert main(cache_args(assets, hidden, "--k", "8", "--hidden-states", "--hidden-dtype", "fp32")) == 0
    return {"topk": topk, "hidden": hidden}


def test_cache_with_hidden_states_gives_the_online_run(assets, caches, tmp_path, capsys):
    """Exact TAD offline: teacher logits re-computed from cached fp32 hidden states + head = the online run."""
    online, cached = tmp_path / "online", tmp_path / "cached"
    assert main(distill_args(assets, online, "--loss", "tad", "--k", "5")) == 0
    capsys.readouterr()
    hidden_cache = str(caches["hidden"])
    assert main(distill_args(assets, cached, "--loss", "tad", "--k", "5", "--teacher-cache", hidden_cache)) == 0
    out = capsys.readouterr().out
    assert "teacher signal: teacher cache" in out and "exact" in out
    # Whole runs: the teacher logits from the cached fp32 hidden states + head vs the teacher's forward — two float32
    # evaluations of the same logits (test_cache bounds them: the forward-error model, and bit-identical in practice);
    # each step's TAD moves by the loss layer's Lipschitz bound (loss_bounds.tad with that logit error), and the
    # weights by AdamW's ~2δ·lr per step: rel 1e-4 over 4 steps.
    assert train_losses(cached) == pytest.approx(train_losses(online), rel=1e-4)
    assert "hidden states" in summary(cached)["teacher_signal"]
    assert summary(online)["teacher_signal"] == "tad: exact, online teacher"


@pytest.mark.parametrize("fused_mode", ["off", "on"])
def test_topk_cache_trains_on_the_k_plus_1_bucket_loss(assets, caches, tmp_path, capsys, fused_mode):
    """A top-K cache: the divergence is D_KL1 (TAD's tail term dropped), which the log and summary say; K_run=5 <
    K_cache=8 truncates exactly. The first step's divergence equals D_KL1 of the online teacher."""
    run, online = tmp_path / "cached", tmp_path / "online"
    assert main(distill_args(assets, run, "--loss", "tad", "--k", "5", "--teacher-cache", str(caches["topk"]),
                             "--fused-loss", fused_mode, steps=2)) == 0
    out = capsys.readouterr().out
    assert "D_KL1 only" in out and "K=5" in out and "DROPPED" in out
    assert "D_KL1 only" in summary(run)["teacher_signal"]
    # the online run with β = 0 has L_DIV = D_KL1 exactly: same first step (same weights, same rows)
    assert main(distill_args(assets, online, "--loss", "tad", "--k", "5", "--beta", "0", steps=2)) == 0
    first = next(r for r in read_metrics(run) if r["split"] == "train")
    ref = next(r for r in read_metrics(online) if r["split"] == "train")
    # step 1: the same weights and rows; D_KL1 from the cached top-K (float32 log-probs of another forward, α^T from
    # two log-sum-exps) vs from the online logits: test_cache's bound (topk_bucket_kl + tad_decompose + the cached
    # values' shift), ~1e-4 of D_KL1 for these logits
    assert first["div"] == pytest.approx(ref["div"], rel=1e-4)
    assert first["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    held = [r for r in read_metrics(run) if r["split"] == "heldout"]
    assert held[-1]["kl"] < held[0]["kl"]  # held-out KL against the real teacher falls


def _error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if "Loading weights" not in ln and "distill[" not in ln]
    assert "Traceback" not in err and lines[-1].startswith("tailkd: error:"), err  # one line, no traceback
    assert [ln for ln in lines if ln.strip()] == [lines[-1]], lines
    return lines[-1]


def test_cache_that_does_not_match_the_run_is_refused_before_the_run_starts(assets, caches, tmp_path, capsys):
    run = tmp_path / "run"
    cases = [
        (("--teacher-cache", str(caches["topk"]), "--seq-len", "16"), "seq_len is 32, the run's is 16"),
        (("--teacher-cache", str(caches["topk"]), "--loss", "tad", "--k", "9"), "use loss.k <= 8"),
        (("--teacher-cache", str(caches["topk"]), "--loss", "rkl"), "does not hold; rebuild it with --hidden-states"),
        (("--teacher-cache", str(caches["topk"]), "--k", "8", "--data.heldout_fraction", "0.2"), "its corpus is"),
        (("--teacher-cache", str(tmp_path / "nowhere")), "is not a teacher cache"),
        (("--teacher-cache", str(caches["topk"]), "--task", "sft", "--train.on_policy", "0.5"), "drop --teacher.cache"),
        (("--fused-loss", "on", "--loss", "dkd", "--teacher-cache", str(caches["topk"])), "rebuild it with --hidden"),
        (("--fused-loss", "sometimes",), "must be auto, on or off"),
    ]
    for extra, needle in cases:
        line = _error(capsys, distill_args(assets, run, *extra))
        assert needle in line, (extra, line)
        assert not run.exists(), extra  # nothing written


def test_corrupted_cache_shard_stops_the_run_naming_it(assets, caches, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad-cache"
    shutil.copytree(caches["topk"], bad)
    shards = sorted(bad.glob("shard_*.safetensors"))
    for shard in shards:  # every shard: whichever the first batch reads is damaged
        data = bytearray(shard.read_bytes())
        data[-20] ^= 0xFF  # flip bits inside the last tensor's bytes
        shard.write_bytes(bytes(data))
    run = tmp_path / "run"
    line = _error(capsys, distill_args(assets, run, "--teacher-cache", str(bad), "--k", "5", steps=6))
    assert any(s.name in line for s in shards) and ("corrupted" in line or "unreadable" in line), line


def test_heldout_rows_per_forward_shrink_for_large_logits_without_changing_metrics(monkeypatch):
    """Held-out evaluation caps each forward at ~AUTO_BYTES of float32 logits (1 row of 2048 x 151936 at paper
    scale instead of the micro-batch): fewer rows per forward, the same metrics."""
    from conftest import TINY_VOCAB, make_tiny_lm

    from tailkd import evaluate, fused, train
    from tailkd.config import DistillConfig

    cfg = DistillConfig()
    cfg.data.seq_len, cfg.data.eval_rows, cfg.train.batch_size = 16, 6, 4
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(6):
        ids = torch.randint(0, TINY_VOCAB, (17,), generator=g)
        rows.append({"input_ids": ids[:-1], "labels": ids[1:], "segment_ids": torch.zeros(16, dtype=torch.long)})
    student, teacher = make_tiny_lm(seed=0), make_tiny_lm(seed=1)
    seen = []
    real = evaluate.forward_logits

    def counting(model, input_ids, *a, **kw):
        seen.append(input_ids.shape[0])
        return real(model, input_ids, *a, **kw)

    monkeypatch.setattr(evaluate, "forward_logits", counting)  # the trainer's held-out pass is evaluate's
    full = train.heldout(student, teacher, rows, cfg, TINY_VOCAB, "cpu", None)
    assert max(seen) == 4
    seen.clear()
    monkeypatch.setattr(fused, "AUTO_BYTES", 4 * 16 * TINY_VOCAB)  # room for one row's logits
    small = train.heldout(student, teacher, rows, cfg, TINY_VOCAB, "cpu", None)
    assert set(seen) == {1}
    assert small.keys() == full.keys()
    # 4 rows per forward vs 1: two float32 forwards of the same rows (loss_bounds.two_forwards_heldout_bounds)
    from bounds import assert_within
    from loss_bounds import two_forwards_heldout_bounds

    from tailkd.data import collate

    bound = two_forwards_heldout_bounds(student, teacher, collate(rows), TINY_VOCAB, bins=None)
    for key in full:
        assert_within(small[key], full[key], bound[key], msg=key)
