"""Teacher cache: round trip, exact losses from it, the tail-sample estimator, mismatches, corruption, resume."""

import json
import math
import os
import re
import sys
from pathlib import Path

import bounds as B
import loss_bounds as LB
import pytest
import torch

from tailkd import cache, losses, registry
from tailkd import corpus as corpus_mod
from tailkd import data as data_mod
from tailkd import head as head_mod
from tailkd.config import LossConfig
from tailkd.divergences import SparseTeacher
from tailkd.errors import TailkdError
from tailkd.head import Head, HeadSpec
from tailkd.objective import chunked_objective, objective, step_terms

sys.path.insert(0, str(Path(__file__).parent))
from tiny import dead_pid, make_tokenizer, no_model_loads, write_corpus

SEQ_LEN = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama teacher (peaked head), its tokenizer, and packed rows of a small corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cache")
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # a peaked teacher with a real tail
    corpus = write_corpus(root / "corpus.txt", n_docs=30)
    info = corpus_mod.prepare_corpus([corpus], tok, root / "tokens")
    rows = data_mod.PackedRows(info.train_bin, SEQ_LEN)
    ident = {"fingerprint": info.fingerprint, "split": "train", "eos_id": info.eos_id,
             "settings": {"doc_sep": "auto", "heldout_fraction": 0.05}}
    return model, tok, rows, ident, root


def _write(setup, name, tmp=None, **kw):
    """The setup teacher's cache of its first 10 rows (K = 8, 4 rows per shard) in ``name`` under ``tmp`` (default:
    the module's folder, shared by the tests that reuse a cache)."""
    model, tok, rows, ident, root = setup
    kw = {"k": 8, "rows_per_shard": 4, "max_rows": 10, "batch_size": 3, "log": lambda *_: None, **kw}
    out = Path(tmp or root) / name
    return cache.write_cache(model, tok, rows, out, corpus=ident, **kw), out


def _online(setup, idx):
    model, tok, rows, _, _ = setup
    batch = data_mod.collate([rows[i] for i in idx])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[..., : len(tok)]
    return batch, logits


def test_round_trip_matches_the_online_teacher(setup):
    meta, path = _write(setup, "full", hidden_states=True, hidden_dtype="fp32", tail_samples=3)
    reader = cache.open_cache(path, tokenizer=setup[1], corpus_fingerprint=setup[3]["fingerprint"], seq_len=SEQ_LEN)
    idx = [9, 0, 5]  # three different shards, out of order
    batch, logits = _online(setup, idx)
    got = reader.rows(idx, input_ids=batch["input_ids"])
    top = torch.topk(logits, 8, dim=-1)
    assert got["topk_ids"].dtype == torch.int32 and torch.equal(got["topk_ids"].long(), top.indices)
    # The cached hidden states vs the online forward of the same rows (the cache ran them in other batches): two
    # float32 forwards, each within LB.lm_logits_err's forward-error model (random-walk roundings along the path)
    _, d_hidden, _ = LB.lm_logits_err(setup[0], batch["input_ids"], len(setup[1]))
    with torch.no_grad():
        B.assert_within(got["hidden"], head_mod.final_hidden(setup[0], batch["input_ids"]), 2 * d_hidden[..., None],
                        msg="hidden states")
    # The cached log-probs vs the log-probs of those stored (fp32, exact) hidden states: the head's 33-term dot
    # products in two blockings (each γ_33|h||W|, LB.head_logits; log-softmax is 2-Lipschitz) and the cache's
    # z − lse(z) (κ + u|lse| + u|log p|) vs log_softmax's (κ + 2u|log p|)
    head = reader.head()
    own = head_mod.apply_head(got["hidden"], head).float()
    own_logp = torch.log_softmax(own, dim=-1)
    dz = LB.head_logits(got["hidden"], head.weight, head.bias, head.spec)[1]
    kappa, lse = B.lse_kappa(own.shape[-1]), torch.logsumexp(own.double(), dim=-1)

    def logprob_bound(lp):
        return B.SAFETY * (2 * kappa + B.U32 * (lse[..., None].abs() + 3 * lp.double().abs()) + 4 * dz[..., None])

    want_top = own_logp.gather(-1, top.indices)
    B.assert_within(got["topk_logprobs"], want_top, logprob_bound(want_top), msg="top-K log-probs")
    alpha = 1 - want_top.exp().sum(-1).double()
    # cache: exp(lse(tail) − lse) (two log-sum-exps, 4dz); reference: 1 − Σ_𝒦 exp(log p) of the bounded log-probs
    alpha_bound = (alpha * B.SAFETY * (2 * kappa + B.U32 * (2 * lse.abs() + alpha.log().abs() + 1) + 4 * dz)
                   + (want_top.double().exp() * logprob_bound(want_top)).sum(-1))
    B.assert_within(got["log_tail_mass"].double().exp(), alpha, alpha_bound, msg="tail mass")
    assert got["tail_ids"].shape == (3, SEQ_LEN, 3)
    assert not bool((got["tail_ids"].long()[..., :, None] == top.indices[..., None, :]).any())  # never in 𝒦
    want_tail = own_logp.gather(-1, got["tail_ids"].long())
    B.assert_within(got["tail_logprobs"], want_tail, logprob_bound(want_tail), msg="tail log-probs")
    assert meta["bytes_per_token"] == 8 * 8 + 4 + 32 * 4 + 8 * 3
    with pytest.raises(TailkdError, match="not aligned"):
        reader.rows(idx, input_ids=batch["input_ids"].flip(0))


def _poisoned(setup):
    """A copy of the setup teacher with a NaN embedding row of a token that some (not all) of the first 10 rows hold:
    every position of those rows has NaN logits (causal attention spreads them: 0·NaN), the others are untouched."""
    import copy

    model, _, rows, _, _ = setup
    ids = torch.stack([rows[i]["input_ids"] for i in range(10)])  # [10, T]
    counts = torch.stack([torch.bincount(r, minlength=ids.max() + 1) > 0 for r in ids]).sum(0)  # rows holding each id
    token = int(torch.where(counts > 0, counts, 99).argmin())  # held by the fewest rows
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.embed_tokens.weight[token] = float("nan")
    return bad, (ids == token).any(1)  # [10] the rows whose teacher logits are NaN


def test_a_teacher_with_nan_rows_is_cached_as_nan_there_and_training_skips_their_steps(setup, capsys):
    """The teacher's logits are NaN on some rows. tail_samples made torch.multinomial raise a bare RuntimeError
    ('invalid multinomial distribution'); now every such position's log-probs, tail mass and tail log-probs are
    cached as NaN (what the online teacher's log-softmax gives there: a step drawing that row has a non-finite loss
    and is skipped and counted, train.max_bad_steps), its ids stay in the vocabulary, the other rows are exactly
    those of the clean teacher's cache, and the run log says how many positions."""
    model, tok, rows, ident, root = setup
    bad, nan_rows = _poisoned(setup)
    assert 0 < int(nan_rows.sum()) < 10
    kw = {"k": 8, "rows_per_shard": 4, "max_rows": 10, "batch_size": 3, "tail_samples": 3}
    cache.write_cache(bad, tok, rows, root / "nan_rows", corpus=ident, log=lambda *_: None, **kw)
    err = capsys.readouterr().err
    cache.write_cache(model, tok, rows, root / "clean_rows", corpus=ident, log=lambda *_: None, **kw)
    got = cache.CacheReader(root / "nan_rows").rows(range(10))
    clean = cache.CacheReader(root / "clean_rows").rows(range(10))
    for name in ("topk_logprobs", "log_tail_mass", "tail_logprobs"):
        assert bool(got[name][nan_rows].isnan().all()), name
    for name in clean:
        assert torch.equal(got[name][~nan_rows], clean[name][~nan_rows]), name
    V = len(tok)
    for name in ("topk_ids", "tail_ids"):
        assert bool(((got[name] >= 0) & (got[name] < V)).all()), name
    n_bad = int(nan_rows.sum()) * SEQ_LEN
    assert f"tailkd: warning: the teacher's logits are not finite (NaN or inf) at {n_bad} of {10 * SEQ_LEN} " \
           f"positions ({int(nan_rows.sum())} rows)" in err, err
    # a training step from this cache: a batch with one of those rows has a NaN loss (skipped), one without is finite
    reader = cache.CacheReader(root / "nan_rows", k=8)
    first_bad, first_good = int(nan_rows.nonzero()[0]), int((~nan_rows).nonzero()[0])
    for idx, finite in (([first_good, first_bad], False), ([first_good], True)):
        batch = data_mod.collate([rows[i] for i in idx])
        with torch.no_grad():
            student_logits = model(input_ids=batch["input_ids"]).logits[..., :V]
        sparse = reader.sparse_teacher(idx, input_ids=batch["input_ids"])
        terms = objective(student_logits, batch["labels"], batch["labels"].numel(), cfg=LossConfig(name="kd"),
                          sparse_teacher=sparse)
        assert bool(torch.isfinite(terms.loss)) == finite, idx


def test_int32_ids_beyond_65535_round_trip(setup, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok, rows, ident, _ = setup
    vocab = 70_000
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[66_000:66_010] *= 50.0  # the most probable ids sit above 65535
    cache.write_cache(model, tok, rows, tmp_path / "big", corpus=ident, k=4, max_rows=2, vocab_size=vocab,
                      log=lambda *_: None)
    got = cache.CacheReader(tmp_path / "big").rows([0, 1])
    batch = data_mod.collate([rows[0], rows[1]])
    with torch.no_grad():
        ref = torch.topk(model(input_ids=batch["input_ids"]).logits, 4, dim=-1).indices
    assert int(got["topk_ids"].max()) > 65535 and torch.equal(got["topk_ids"].long(), ref)


@pytest.mark.parametrize("k_run", [8, 5])
def test_dkl1_from_cache_equals_tad_decompose_of_online_logits(setup, k_run):
    _, path = _write(setup, "topk")
    reader = cache.CacheReader(path, k=k_run)
    idx = [1, 7]
    batch, t_logits = _online(setup, idx)
    sparse = reader.sparse_teacher(idx, input_ids=batch["input_ids"])
    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(t_logits.shape, generator=g) * 3
    mask = torch.ones(batch["labels"].shape, dtype=torch.bool)
    got = registry.bind(LossConfig(name="tad", k=k_run)).sparse_per_token(s_logits, sparse, mask)
    ref = losses.tad_decompose(s_logits, t_logits, k=k_run)[0]
    # float32 D_KL1 from the cached values (LB.topk_bucket_kl) and from the online logits (LB.tad_decompose), plus the
    # cached values' own error against the online logits (another forward: 4dz; log p = z − lse; α^T from two
    # log-sum-exps, and for K_run < K_cache a float64 logaddexp of float32 values) moving D_KL1 (LB.topk_input_shift)
    _, _, dz = LB.lm_logits_err(setup[0], batch["input_ids"], t_logits.shape[-1])
    kappa, lse = B.lse_kappa(t_logits.shape[-1]), torch.logsumexp(t_logits.double(), dim=-1)
    lp, alpha = sparse.topk_logprobs.double(), sparse.log_tail_mass.double().exp()
    d_lp = B.SAFETY * (2 * kappa + B.U32 * (lse[..., None].abs() + 3 * lp.abs())) + 4 * dz[..., None]
    d_alpha = alpha * (B.SAFETY * (3 * kappa + B.U32 * (2 * lse.abs() + alpha.log().abs() + 2)) + 4 * dz)
    ids = sparse.topk_ids.long()
    bound = (LB.topk_bucket_kl(s_logits, ids, sparse.topk_logprobs, tail_mass=alpha)[0]
             + LB.tad_decompose(s_logits, t_logits, k_run)[0][0]
             + LB.topk_input_shift(s_logits, ids, lp, d_lp, d_alpha)[0])
    B.assert_within(got, ref, bound, msg="D_KL1")
    # the fused path from the same cache gives the same values and gradients as the dense one
    d, V = 6, t_logits.shape[-1]
    h = torch.randn(2, SEQ_LEN, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    cfg = LossConfig(name="tad", k=k_run)
    n = batch["labels"].numel()
    logits = head_mod.apply_head(h, Head(w, None, HeadSpec(V)))
    ref_terms = objective(logits, batch["labels"], n, cfg=cfg, sparse_teacher=sparse)
    ref_terms.loss.backward()
    ref_h, ref_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got_terms = chunked_objective(h, Head(w, None, HeadSpec(V)), batch["labels"], n, cfg=cfg,
                                  sparse_teacher=sparse, chunk_size=7)
    got_terms.loss.backward()
    torch.testing.assert_close(got_terms.loss, ref_terms.loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(h.grad, ref_h, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(w.grad, ref_w, rtol=1e-6, atol=1e-8)


def test_exact_tad_from_cached_hidden_states_equals_online_tad(setup):
    _, path = _write(setup, "hidden32", hidden_states=True, hidden_dtype="fp32")
    reader = cache.CacheReader(path)
    idx = [2, 3, 8]
    batch, t_logits = _online(setup, idx)
    g = torch.Generator().manual_seed(2)
    s_logits = torch.randn(t_logits.shape, generator=g) * 2
    cfg = LossConfig(name="tad", k=6, per_document=True)
    n = batch["labels"].numel()
    online = objective(s_logits, batch["labels"], n, cfg=cfg, teacher_logits=t_logits,
                       segment_ids=batch["segment_ids"])
    cached_logits = head_mod.apply_head(reader.teacher_hidden(idx, input_ids=batch["input_ids"]), reader.head())
    offline = objective(s_logits, batch["labels"], n, cfg=cfg, teacher_logits=cached_logits,
                        segment_ids=batch["segment_ids"])
    # the student side (logits, CE) is the same computation on the same tensor; the teacher logits come from two
    # float32 forwards of the same rows (each within dz of the exact ones, LB.lm_logits_err): each float32 TAD within
    # LB.tad with that logit error, summed over the tokens and divided by n
    h, _, dz = LB.lm_logits_err(setup[0], batch["input_ids"], t_logits.shape[-1])
    mask, seg = batch["labels"] != -100, batch["segment_ids"]

    def loss_bound(dz_teacher):
        per_token = LB.tad(s_logits, t_logits, mask, 6, 2.0, segment_ids=seg, dz_t=dz_teacher)[0]
        return float(per_token.sum() + B.f32_sum_tol(n, per_token.sum())) / n

    B.assert_within(offline.loss, online.loss, 2 * loss_bound(dz), msg="loss from cached fp32 hidden states")
    # bf16 hidden states: the same loss up to their rounding. Each h_i is rounded independently (|δh_i| <= u_bf16|h_i|,
    # mean zero), so to first order ΔL = Σ_i (∂L/∂h_i) δh_i, and Hoeffding bounds it by λ u_bf16 ‖h ⊙ ∂L/∂h‖₂ with
    # probability >= 1 − 2exp(−λ²/2) (λ = 7); the worst case u_bf16 Σ|h ∂L/∂h| would be ~√(B·T·d) times larger
    _, path16 = _write(setup, "hidden16", hidden_states=True, hidden_dtype="bf16")
    r16 = cache.CacheReader(path16)
    approx = objective(s_logits, batch["labels"], n, cfg=cfg, segment_ids=batch["segment_ids"],
                       teacher_logits=head_mod.apply_head(r16.teacher_hidden(idx).float(), r16.head()))
    sens = LB.tad_teacher_sensitivity(s_logits, h, r16.head(), mask, 6, 2.0, seg, n)
    rounding = B.SAFETY * B.LAMBDA * B.U_BF16 * float((h.double() * sens).norm())
    B.assert_within(approx.loss, online.loss, rounding + 2 * loss_bound(dz), msg="loss, bf16 hidden states")


@pytest.mark.parametrize("k_run", [8, 5])
def test_tail_support_weights_sum_to_the_tail_mass(setup, k_run):
    """The reader's tail support points carry weights with Σ_j w_j = α^T_{K_run} (`divergences.SparseTeacher`: what
    makes Σ_j w_j f(id_j) an unbiased estimate of Σ_{i∉𝒦} p_i f(i)), as their logs: M samples of α^T_{K_cache}/M
    each, plus the ranks K_run..K_cache−1 with weights p_i. Bound: the log weights and log α^T are float32 roundings
    of float64 values (each within u|x|: exp of it within u|x| relative), so the two sides differ by at most
    SAFETY·u(max_j |log w_j| + |log α^T| + 2) relative."""
    _, path = _write(setup, "weight_sums", tail_samples=3)
    reader = cache.CacheReader(path, k=k_run)
    sparse = reader.sparse_teacher([0, 4])
    alpha = sparse.log_tail_mass.double().exp()  # [B, T] α^T_{K_run}
    log_weights = sparse.tail_log_weights.double()  # [B, T, (8 − K_run) + 3]
    assert log_weights.shape[-1] == 8 - k_run + 3
    samples = log_weights[..., -3:]
    assert torch.equal(samples, samples[..., :1].expand_as(samples))  # the M samples weigh alike
    ref = sparse.log_tail_mass.double()[..., None] - math.log(3)  # log(α^T_{K_cache}/M) when K_run = K_cache
    if k_run == 8:
        B.assert_within(samples, ref.expand_as(samples), B.SAFETY * B.U32 * ref.abs(), msg="log(α^T/M)")
    rel = B.SAFETY * B.U32 * (log_weights.abs().amax(-1) + sparse.log_tail_mass.double().abs() + 2)
    B.assert_within(log_weights.exp().sum(-1), alpha, rel * alpha, msg="Σ_j w_j = α^T")


def _cache_loss_sums(s64, sp, log_w):
    """The cache loss of `divergences.SparseTeacher` as plain float64 sums of its definition, from the float64 values
    of ``sp``'s entries: Σ_𝒦 p (log p − log q) + α^T log(α^T/α^S) + w·(Σ_j w_j (log p_j − log q_j) − α^T log(α^T/α^S)),
    w = exp(``log_w``) [n], a term of weight 0 taken as 0 (a row without tail: α^T = 0, its w_j and log p_j −inf; a
    row weight w = 0, log_w = −inf, whatever its tail sum); rows [n, V]."""
    logq = torch.log_softmax(s64, -1)
    ids, tids = sp.topk_ids.long(), sp.tail_ids.long()
    lp, la = sp.topk_logprobs.double(), sp.log_tail_mass.double()
    alpha = la.exp()
    alpha_s = logq.exp().scatter(-1, ids, 0.0).sum(-1)
    bucket = torch.where(alpha > 0, alpha * (la - alpha_s.log()), 0.0)
    d_kl1 = (lp.exp() * (lp - logq.gather(-1, ids))).sum(-1) + bucket
    w = sp.tail_log_weights.double().exp()
    tail = torch.where(w > 0, w * (sp.tail_logprobs.double() - logq.gather(-1, tids)), 0.0).sum(-1)
    return d_kl1 + torch.where(log_w > -math.inf, log_w.exp() * (tail - bucket), 0.0)


@pytest.mark.parametrize("name", ["tad", "kd"])
def test_cache_teacher_keeps_tails_below_float32(name):
    """A top-K cache teacher whose tails lie 110-160 nats below 𝒦 (α^T and the tail weights below float32's range,
    ~1e-45) keeps TAD's tail term. With exact tail points (every tail id, w_i = p_i: the estimate is the exact
    α^T·D_KL2) the cache loss is the dense TAD (KL for kd) of the same teacher: checked in float64 (plain sums of the
    cache loss's definition vs `losses.tad` / `losses.forward_kl`, within V·u64 times the sum of the terms'
    magnitudes, 8 operations each). Then `Divergence.sparse_per_token` in float32 against those plain sums of its
    float32 inputs, value and gradient, within `loss_bounds.cache_tad`. The tail weights were linear float32 (0
    there), so β(X)·α^T·D_KL2 — comparable to D_KL1, since β(X) = β/ᾱ — was lost: the total was about half."""
    g = torch.Generator().manual_seed(5)
    n, vocab, k = 6, 40, 4
    s = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    t[:, k:] -= torch.linspace(110, 160, n, dtype=torch.float64)[:, None]  # the tail 110-160 nats below 𝒦 = ids < k
    logp = torch.log_softmax(t, -1)
    ids, tail_ids = torch.arange(k).expand(n, k), torch.arange(k, vocab).expand(n, vocab - k)
    log_alpha = logp[:, k:].logsumexp(-1)
    assert bool((log_alpha < -103).all())  # below float32's smallest sub-normal
    exact = SparseTeacher(ids, logp[:, :k], log_alpha, tail_ids, logp[:, k:], logp[:, k:])  # float64 entries
    mask = torch.ones(1, n, dtype=torch.bool)
    if name == "tad":
        log_w = math.log(2.0) - (log_alpha.logsumexp(-1) - math.log(n))  # log β(X), ᾱ over the one sequence
        dense = losses.tad(s[None], t[None], mask, k=k, beta=2.0)[0]
        d_kl1 = losses.tad_decompose(s, t, k=k)[0]
        assert float((dense - d_kl1).sum()) > 0.3 * float(dense.sum())  # the tail term: a real part of TAD here
    else:
        log_w, dense = torch.tensor(0.0, dtype=torch.float64), losses.forward_kl(s, t)
    log_w = log_w.expand(n)
    sums = _cache_loss_sums(s, exact, log_w)
    logq = torch.log_softmax(s, -1)
    mag = ((logp.exp() * (logp - logq).abs()).sum(-1) + log_w.exp() * logp[:, k:].exp().sum(-1)
           * (logp[:, k:] - logq[:, k:]).abs().amax(-1) + logq.abs().amax(-1))
    B.assert_within(sums, dense, 8 * vocab * 2.0 ** -53 * mag, msg="float64 cache loss with exact tail = dense")
    cached = SparseTeacher(*(x.float() if x.is_floating_point() else x for x in exact))  # as the cache holds it
    leaf = s.float()[None].requires_grad_(True)
    cfg = LossConfig(name=name, k=k, beta=2.0) if name == "tad" else LossConfig(name=name)
    got = registry.bind(cfg).sparse_per_token(leaf, SparseTeacher(*(x[None] for x in cached)), mask)[0]
    (grad,) = torch.autograd.grad(got.sum(), leaf)
    s64 = s.float().double().requires_grad_(True)
    ref = _cache_loss_sums(s64, cached, log_w if name == "kd" else
                           math.log(2.0) - (cached.log_tail_mass.double().logsumexp(-1) - math.log(n)).expand(n))
    (ref_g,) = torch.autograd.grad(ref.sum(), s64)
    vb, gb = LB.cache_tad(s.float()[None], SparseTeacher(*(x[None] for x in cached)), mask, loss=name, beta=2.0)
    B.assert_within(got.detach(), ref.detach(), vb[0] + B.REF64_ATOL, msg="cache loss value")
    B.assert_within(grad[0], ref_g, gb[0] + B.REF64_ATOL, msg="cache loss gradient")


def _sampled_cache(t, k, m, seed):
    """The rows of a top-K cache with ``m`` tail samples of teacher logits ``t`` [n, V] (float64) as the cache reader
    gives them: 𝒦 = the top ``k``, float32 log-probs and log α^T, the draws' log p and log weights log(α^T/m)."""
    logp = torch.log_softmax(t, -1)
    ids = torch.topk(t, k, dim=-1).indices
    log_alpha = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    draw, draw_lp = cache.sample_tail(t, ids, torch.logsumexp(t, -1), m, torch.Generator().manual_seed(seed))
    return SparseTeacher(ids, logp.gather(-1, ids).float(), log_alpha.float(), draw, draw_lp.float(),
                         (log_alpha[:, None] - math.log(m)).expand(*draw.shape).float())


def _assert_cache_loss(s, cached, cfg, log_w, rows=slice(None)):
    """`Divergence.sparse_per_token` of ``cfg`` on the float32 student logits ``s`` [n, V] (float64 values exact in
    float32) against the cache rows ``cached`` [n, ...] (one sequence) within `loss_bounds.cache_tad` of the float64
    plain sums of its float32 inputs (`_cache_loss_sums`, row weights ``log_w`` [n] as logs), value and gradient, on
    ``rows``; returns the values [n]."""
    n = s.shape[0]
    mask = torch.ones(1, n, dtype=torch.bool)
    sparse = SparseTeacher(*(x[None] for x in cached))
    leaf = s.float()[None].requires_grad_(True)
    got = registry.bind(cfg).sparse_per_token(leaf, sparse, mask)[0]
    (grad,) = torch.autograd.grad(got[rows].sum(), leaf)
    s64 = s.clone().requires_grad_(True)
    ref = _cache_loss_sums(s64, cached, log_w)
    (ref_g,) = torch.autograd.grad(ref[rows].sum(), s64)
    vb, gb = LB.cache_tad(s.float()[None], sparse, mask, loss=cfg.name, beta=cfg.beta)
    B.assert_within(got.detach()[rows], ref.detach()[rows], vb[0, rows] + B.REF64_ATOL, msg="cache loss value")
    B.assert_within(grad[0, rows], ref_g[rows], gb[0, rows] + B.REF64_ATOL, msg="cache loss gradient")
    return got.detach()


def _log_beta_x(cached, beta):
    """log β(X) = log β − log ᾱ [n] of the cache rows ``cached`` [n, ...] as one sequence, float64."""
    n = cached.log_tail_mass.shape[0]
    return (math.log(beta) - (cached.log_tail_mass.double().logsumexp(-1) - math.log(n))).expand(n)


def test_cache_teacher_gradient_at_logits_offset_by_1e4():
    """TAD from a top-K cache with tail samples, student rows offset by ±1e4: the gradient's tail term (W − α^T)·q̃
    takes q̃ = q/α^S as (s − m) − log S over the tail, log_softmax's formula, so `Divergence.sparse_per_token` is
    within `loss_bounds.cache_tad` (q̃'s relative error κ + u|log q̃| + 3u, a log-sum-exp backward's) of the float64
    plain sums of its float32 inputs, value and gradient. `divergences._sparse_backward` formed s − (m + log S),
    whose rounding u·1e4 ≈ 6e-4 it carried into q̃: the gradient was ~9 times that bound off (KD, whose W = α^T,
    does not read q̃; the Triton kernel forms (s − m) − log S)."""
    g = torch.Generator().manual_seed(11)
    n, vocab, k, m = 6, 40, 4, 4
    s = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    s = (s + torch.tensor([1e4, -1e4, 0.0, 1e4, -1e4, 0.0], dtype=torch.float64)[:, None]).float().double()
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    cached = _sampled_cache(t, k, m, seed=12)
    _assert_cache_loss(s, cached, LossConfig(name="tad", k=k, beta=2.0), _log_beta_x(cached, 2.0))


@pytest.mark.parametrize("name", ["tad", "kd"])
def test_cache_loss_with_tail_samples_on_a_row_without_teacher_or_student_tail(name):
    """A cache with tail samples, one row whose teacher has no tail (α^T = 0: its samples drawn uniformly, their
    log p and log weights −inf) and one whose student has none (α^S = 0). The first's loss is D_KL1 with its
    gradient (no tail term: `divergences.sparse_tail_points` gives W = 0 and ŵ = 0 there, not exp(−inf + inf), a NaN
    in the gradient's W(Σ_j ŵ_j − 1) term), the second's +inf as D_KL1 is (the tail term 0 where log(α^T/α^S) is
    not finite, not −inf, which made it NaN); the other rows as the float64 plain sums of the float32 inputs, value
    and gradient, within `loss_bounds.cache_tad`."""
    g = torch.Generator().manual_seed(13)
    n, vocab, k, m = 4, 40, 4, 4
    s = torch.randn(n, vocab, generator=g, dtype=torch.float64).float().double() * 2
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    top = torch.zeros_like(t, dtype=torch.bool).scatter(-1, torch.topk(t, k, dim=-1).indices, True)
    t[0] = t[0].masked_fill(~top[0], -math.inf)  # the teacher's row 0: no tail
    s[1] = s[1].masked_fill(~top[1], -math.inf)  # the student's row 1: no tail
    cached = _sampled_cache(t, k, m, seed=14)
    cfg = LossConfig(name=name, k=k, beta=2.0) if name == "tad" else LossConfig(name=name)
    log_w = _log_beta_x(cached, 2.0) if name == "tad" else torch.zeros(n, dtype=torch.float64)  # kd: w = 1
    got = _assert_cache_loss(s, cached, cfg, log_w, rows=[0, 2, 3])
    assert float(got[1]) == math.inf


def test_cache_tad_with_beta_0_is_d_kl1():
    """TAD with β = 0 from a cache with tail samples has no tail term (`losses.tail_log_weight`: log β(X) = −inf, so
    W = 0): `Divergence.sparse_per_token` is D_KL1, value and gradient, within `loss_bounds.cache_tad` (β = 0) of the
    float64 plain sums of its float32 inputs (their tail term of weight 0)."""
    g = torch.Generator().manual_seed(17)
    n, vocab, k, m = 6, 40, 4, 4
    s = torch.randn(n, vocab, generator=g, dtype=torch.float64).float().double() * 2
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    cached = _sampled_cache(t, k, m, seed=18)
    no_tail_term = torch.full((n,), -math.inf, dtype=torch.float64)  # log w = −inf: the plain sums are D_KL1
    _assert_cache_loss(s, cached, LossConfig(name="tad", k=k, beta=0.0), no_tail_term)


def test_cache_tad_with_beta_0_is_d_kl1_where_the_student_is_minus_inf_at_a_tail_sample():
    """As `test_cache_tad_with_beta_0_is_d_kl1`, row 0's student −inf at its first tail sample: the tail estimate
    Σ_j ŵ_j log(p_j/q_j) is +inf there while D_KL1 is finite (α^S > 0), and the tail term of weight W = 0 is 0
    (`divergences.sparse_value` adds W·tail only where W > 0), not 0·inf = NaN, as the dense path's (test_losses'
    test_tad_at_beta_zero_is_d_kl1_where_the_student_has_minus_inf_on_the_teacher_tail). Value and gradient within
    `loss_bounds.cache_tad` of the cache without tail points (D_KL1's bound: W = 0 adds nothing) of the float64 plain
    sums of its float32 inputs (their tail term of weight 0)."""
    g = torch.Generator().manual_seed(17)
    n, vocab, k, m = 6, 40, 4, 4
    s = torch.randn(n, vocab, generator=g, dtype=torch.float64).float().double() * 2
    t = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    cached = _sampled_cache(t, k, m, seed=18)
    s[0, cached.tail_ids[0, 0]] = -math.inf
    mask = torch.ones(1, n, dtype=torch.bool)
    leaf = s.float()[None].requires_grad_(True)
    got = registry.bind(LossConfig(name="tad", k=k, beta=0.0)).sparse_per_token(
        leaf, SparseTeacher(*(x[None] for x in cached)), mask)[0]
    (grad,) = torch.autograd.grad(got.sum(), leaf)
    s64 = s.clone().requires_grad_(True)
    no_tail_term = torch.full((n,), -math.inf, dtype=torch.float64)
    ref = _cache_loss_sums(s64, cached, no_tail_term)
    (ref_g,) = torch.autograd.grad(ref.sum(), s64)
    assert math.isinf(float(_cache_loss_sums(s, cached, torch.zeros(n, dtype=torch.float64))[0]))  # the case meant
    d_kl1_only = SparseTeacher(*(x[None] for x in cached[:3]))
    vb, gb = LB.cache_tad(s.float()[None], d_kl1_only, mask, loss="tad", beta=0.0)
    B.assert_within(got.detach(), ref.detach(), vb[0] + B.REF64_ATOL, msg="cache loss value")
    B.assert_within(grad[0], ref_g, gb[0] + B.REF64_ATOL, msg="cache loss gradient")


def test_tail_samples_follow_the_tail_below_float32():
    """`cache.sample_tail` draws from the renormalised tail p̃ = p/α^T also where the teacher's tail lies 110-160 nats
    below 𝒦 (float32 logits, as the cache writer has them: every p_i of the tail below float32's range). Since the
    cache loss counts such rows' samples (W·Σ_j ŵ_j log(p_j/q_j), `divergences.sparse_tail_points`), the mean over M
    draws of log(p̃_j/q̃_j) must estimate D_KL2 = KL(p̃‖q̃) without bias: within 5 standard errors of the mean (the
    float64 p̃, q̃ of the same float32 logits; their rounding, ~1e-5 absolute here, is far below 5 se). It drew
    uniformly from the tail there (p/α^T formed as exp(log p), which underflowed to 0: taken for a row without tail
    mass), an estimate off by about a nat here."""
    g = torch.Generator().manual_seed(3)
    n, V, K, M = 4, 40, 4, 4000
    t = torch.randn(n, V, generator=g, dtype=torch.float64) * 1.5
    s = torch.randn(n, V, generator=g, dtype=torch.float64)
    ids = torch.topk(t, K, dim=-1).indices
    top = torch.zeros_like(t, dtype=torch.bool).scatter(-1, ids, True)
    t = torch.where(top, t, t - torch.linspace(110, 160, n, dtype=torch.float64)[:, None]).float()  # as written
    lse = torch.logsumexp(t, dim=-1)
    draw, draw_lp = cache.sample_tail(t, ids, lse, M, torch.Generator().manual_seed(4))
    t64 = t.double()
    log_pt = torch.log_softmax(t64.masked_fill(top, -math.inf), -1)  # [n, V] log p̃, −inf on 𝒦
    log_qt = torch.log_softmax(s.masked_fill(top, -math.inf), -1)
    assert bool((torch.logsumexp(t64.masked_fill(top, -math.inf), -1) - lse.double() < -103).all())  # p_i < 1e-45
    exact = torch.where(top, 0.0, log_pt.exp() * (log_pt - log_qt)).sum(-1)  # [n] D_KL2
    terms = log_pt.gather(-1, draw) - log_qt.gather(-1, draw)  # [n, M]
    mean, se = terms.mean(-1), terms.std(-1) / M ** 0.5
    assert bool((se > 0).all())  # a real random estimate
    assert bool(((mean - exact).abs() < 5 * se).all()), (mean, exact, se)
    # their log p: one float32 subtraction of the given inputs, t_j − lse (u|log p_j|)
    B.assert_within(draw_lp.double(), t64.gather(-1, draw) - lse.double()[:, None], B.U32 * draw_lp.double().abs(),
                    msg="log p of the draws")


def test_tail_samples_of_a_row_without_tail_mass_or_distribution_are_uniform_on_the_tail():
    """`cache.sample_tail`'s rows without tail mass (every tail logit −inf: α^T = 0, its weights α^T/M are 0) and
    without a distribution (a NaN or a +inf logit) draw uniformly from the tail, never from 𝒦, and the latter's log p
    are NaN (a +inf row's t_j − lse is −inf, taken for a true log p). Uniform: each of the V − K tail ids drawn
    within 5 binomial standard deviations of M/(V − K) (the draws are seeded: a check of the rule, not a flaky one);
    a normal row keeps its true log p."""
    V, K, M = 40, 4, 3600
    t = torch.randn(4, V, generator=torch.Generator().manual_seed(8))
    ids = torch.topk(t, K, dim=-1).indices
    top = torch.zeros_like(t, dtype=torch.bool).scatter(-1, ids, True)
    t[0] = t[0].masked_fill(~top[0], -math.inf)  # one-hot-like: no tail mass
    t[1, (~top[1]).nonzero()[0, 0]] = math.nan  # a NaN logit on the tail
    t[2, ids[2, 0]] = math.inf  # a +inf logit in 𝒦
    draw, draw_lp = cache.sample_tail(t, ids, torch.logsumexp(t, -1), M, torch.Generator().manual_seed(9))
    assert not bool(top.gather(-1, draw).any())  # from the tail only
    counts = torch.zeros(4, V).scatter_add_(-1, draw, torch.ones(4, M))[~top].view(4, V - K)[:3]
    mean, sd = M / (V - K), (M / (V - K) * (1 - 1 / (V - K))) ** 0.5
    assert bool(((counts - mean).abs() < 5 * sd).all()), counts
    assert bool(draw_lp[0].eq(-math.inf).all()) and bool(draw_lp[1:3].isnan().all())
    assert bool(draw_lp[3].isfinite().all())


def test_a_cache_of_tail_samples_drawn_by_an_older_tailkd_is_refused(setup):
    """Tail samples written before `cache.sample_tail` formed p̃ in log space were uniform draws where the teacher's
    tail lies ~104+ nats below 𝒦, rows whose sampled term now counts (W·ŵ form): a cache with tail samples and no
    cache.json "tail_sampler" (an older tailkd's) is refused when opened, and its unfinished folder is not resumed
    by the new sampler; a top-K-only cache of the same age (no tail samples, no key) is read as before."""
    _, path = _write(setup, "old_sampler", tail_samples=3)
    meta = json.loads((path / "cache.json").read_text())
    assert meta["tail_sampler"] == cache.TAIL_SAMPLER
    del meta["tail_sampler"]
    (path / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(TailkdError, match=r"holds tail samples drawn by an older tailkd .* delete it and run the same "
                                          r"tailkd cache-teacher command again$"):
        cache.CacheReader(path)
    with pytest.raises(TailkdError, match=r"holds a teacher cache whose tail samples an older tailkd drew; delete it "
                                          r"and run this command again, or choose another --out$"):
        _write(setup, "old_sampler", tail_samples=3)  # not "resume with the same arguments": none resumes it
    _, topk = _write(setup, "old_topk")
    meta = json.loads((topk / "cache.json").read_text())
    assert meta["tail_sampler"] is None
    del meta["tail_sampler"]
    (topk / "cache.json").write_text(json.dumps(meta))
    assert cache.CacheReader(topk).sparse_teacher([0]).tail_ids is None
    _write(setup, "old_topk")  # resumed: complete, nothing differs


def test_tail_sample_estimator_is_unbiased():
    """Mean over 4000 independent draws of the estimated tail term (and its gradient) → the exact α^T·D_KL2."""
    g = torch.Generator().manual_seed(0)
    n, V, K, M, S = 5, 30, 4, 2, 4000
    t = torch.randn(n, V, generator=g, dtype=torch.float64) * 1.5
    s = torch.randn(n, V, generator=g, dtype=torch.float64)
    d1, d2, alpha = losses.tad_decompose(s, t, k=K)
    exact = alpha * d2  # [n]
    ids = torch.topk(t, K, dim=-1).indices
    lse = torch.logsumexp(t, dim=-1)
    def rep(x):  # S independent copies of every token
        return x.repeat(S, *[1] * (x.dim() - 1))

    draw, draw_lp = cache.sample_tail(rep(t), rep(ids), rep(lse), M, torch.Generator().manual_seed(123))
    log_a = torch.log(alpha)
    sparse = SparseTeacher(rep(ids)[None], rep(t.gather(-1, ids) - lse[:, None])[None], rep(log_a)[None],
                           draw[None], draw_lp[None], (rep(log_a)[:, None] - math.log(M)).expand(-1, M)[None])
    s_rep = rep(s)[None].clone().requires_grad_(True)
    mask = torch.ones(1, n * S, dtype=torch.bool)
    est = registry.bind(LossConfig(name="kd")).sparse_per_token(s_rep, sparse, mask)[0].view(S, n) - d1  # [S, n]
    mean, se = est.mean(0), est.std(0) / S ** 0.5
    assert bool((se > 0).all())  # a real random estimate
    assert bool(((mean - exact).abs() < 5 * se + 1e-9).all()), (mean, exact, se)
    # a biased alternative (D_KL2 of the renormalised tail, without the α^T weight) is rejected by the same bound
    assert not bool(((mean - d2).abs() < 5 * se + 1e-9).all())
    est.sum().backward()  # the gradient of D_KL1 + estimated tail term (kd: KL in expectation)
    grad = s_rep.grad[0].view(S, n, V)
    s_ref = s.clone().requires_grad_(True)
    d1r, d2r, ar = losses.tad_decompose(s_ref, t, k=K)
    (d1r + ar * d2r).sum().backward()
    g_mean, g_se = grad.mean(0), grad.std(0) / S ** 0.5
    assert bool(((g_mean - s_ref.grad).abs() < 5 * g_se + 1e-9).all())


def test_mismatches_are_clear_errors(setup):
    _, path = _write(setup, "topk")
    with pytest.raises(TailkdError, match="tokenizer"):
        cache.open_cache(path, tokenizer=make_tokenizer(vocab_size=290))
    with pytest.raises(TailkdError, match="corpus"):
        cache.CacheReader(path, corpus_fingerprint="0" * 64)
    with pytest.raises(TailkdError, match="seq_len"):
        cache.CacheReader(path, seq_len=SEQ_LEN + 1)
    with pytest.raises(TailkdError, match=r"its split is 'train', the run's is 'heldout'"):
        cache.CacheReader(path, split="heldout")
    with pytest.raises(TailkdError, match="K=9"):
        cache.CacheReader(path, k=9)
    assert cache.CacheReader(path, k=3).sparse_teacher([0]).topk_ids.shape[-1] == 3  # K_run < K_cache: truncated
    with pytest.raises(TailkdError, match="teacher weights"):
        cache.CacheReader(path, teacher_weights_sha256="f" * 64)
    with pytest.raises(TailkdError, match="not in teacher cache"):
        cache.CacheReader(path).rows([10])
    with pytest.raises(TailkdError, match="other settings"):
        _write(setup, "topk", k=6)


def test_a_cache_of_another_format_is_refused(setup, tmp_path):
    """cache.json's format number names the layout of the shards: a cache of another one is refused, naming both."""
    import shutil

    _, path = _write(setup, "topk")
    other = shutil.copytree(path, tmp_path / "other")
    meta = json.loads((other / "cache.json").read_text())
    (other / "cache.json").write_text(json.dumps({**meta, "format": "tailkd-cache-v0"}))
    with pytest.raises(TailkdError, match=rf"has cache format 'tailkd-cache-v0', this tailkd reads {cache.FORMAT}"):
        cache.CacheReader(other)


def test_write_cache_refuses_bad_k_and_tail_samples_and_caps_max_rows(setup, tmp_path):
    """write_cache's own checks (the API; the command line checks first): K in [1, V) — K = V leaves no tail —,
    tail samples >= 0; a --max-rows beyond the rows caches all of them."""
    model, tok, rows, ident, _ = setup
    for bad in (0, len(tok)):
        with pytest.raises(TailkdError, match=rf"--k {bad} must lie in \[1, {len(tok)}\)"):
            cache.write_cache(model, tok, rows, tmp_path / "k", k=bad, corpus=ident, log=lambda *_: None)
    with pytest.raises(TailkdError, match="--tail-samples -1 must be >= 0"):
        cache.write_cache(model, tok, rows, tmp_path / "m", k=4, tail_samples=-1, corpus=ident, log=lambda *_: None)
    assert not (tmp_path / "k").exists() and not (tmp_path / "m").exists()
    meta = cache.write_cache(model, tok, rows, tmp_path / "all", k=2, corpus=ident, max_rows=len(rows) + 5,
                             batch_size=16, log=lambda *_: None)
    assert meta["num_rows"] == len(rows) and cache.CacheReader(tmp_path / "all", rows=len(rows)).num_rows == len(rows)


def test_the_default_shard_holds_at_most_shard_bytes(setup, tmp_path, monkeypatch):
    """Without --rows-per-shard a shard holds as many rows as fit SHARD_BYTES at the cache's bytes per token and
    seq_len: here room for 3 rows and a bit, so 10 rows are 4 shards of 3, 3, 3, 1 rows."""
    per_row = cache.bytes_per_token(8) * SEQ_LEN
    monkeypatch.setattr(cache, "SHARD_BYTES", 3 * per_row + per_row // 2)
    meta, path = _write(setup, "sized", rows_per_shard=None, tmp=tmp_path)
    assert (meta["rows_per_shard"], meta["num_shards"]) == (3, 4)
    sizes = [cache.verify_shard(path / f"shard_{i:06d}.safetensors")["row_hash"].shape[0] for i in range(4)]
    assert sizes == [3, 3, 3, 1]


def test_a_resumed_cache_keeps_its_cache_json(setup, tmp_path):
    """cache.json is written once, by the first run on the folder: a resume (here spelling the teacher otherwise)
    leaves it byte for byte, its creation time and first name included."""
    _write(setup, "once", teacher_name="teacher", tmp=tmp_path)
    first = (tmp_path / "once" / "cache.json").read_bytes()
    _write(setup, "once", teacher_name="./teacher/", tmp=tmp_path)
    assert (tmp_path / "once" / "cache.json").read_bytes() == first


def test_a_hidden_states_cache_stores_the_heads_vocabulary_rows_and_bias(setup, tmp_path):
    """A teacher whose LM head has padded rows past the vocabulary and a bias (Phi's): the cached head is its first V
    rows and its bias, so the teacher logits re-computed from the cache are the model's own."""
    import copy

    model, tok, rows, ident, _ = setup
    V, d = len(tok), model.config.hidden_size
    teacher = copy.deepcopy(model)
    head = torch.nn.Linear(d, V + 6, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V + 6, d, generator=torch.Generator().manual_seed(3)) * 3)
        head.bias.copy_(torch.randn(V + 6, generator=torch.Generator().manual_seed(4)))
    teacher.lm_head = head
    cache.write_cache(teacher, tok, rows, tmp_path / "biased", k=4, corpus=ident, max_rows=2, hidden_states=True,
                      hidden_dtype="fp32", vocab_size=V, log=lambda *_: None)
    stored = cache.CacheReader(tmp_path / "biased").head()
    assert torch.equal(stored.weight, head.weight[:V].detach()) and torch.equal(stored.bias, head.bias[:V].detach())


def test_positions_with_plus_inf_logits_are_cached_as_nan():
    """A position whose teacher logits hold +inf has no distribution (its log-softmax is NaN online): every top-K
    log-prob, the tail mass and the tail samples' log-probs are cached as NaN there — not the −inf that finite
    logits minus an infinite log-sum-exp give."""
    g = torch.Generator().manual_seed(0)
    V, d = 40, 8
    bias = torch.zeros(V)
    bias[5] = math.inf
    head = Head(torch.randn(V, d, generator=g), bias, HeadSpec(vocab_size=V))
    hidden = torch.randn(1, 3, d, generator=g)
    got = cache._teacher_rows(hidden, head, k=4, tail_samples=2, generator=torch.Generator().manual_seed(1),
                              chunk=64, want_hidden=False)
    assert bool(got["broken"].all())
    for name in ("topk_logprobs", "log_tail_mass", "tail_logprobs"):
        assert bool(got[name].isnan().all()), name


@pytest.mark.parametrize("bad", [-1, "V"])
def test_cached_ids_outside_the_vocabulary_are_refused(setup, tmp_path, bad):
    """A shard whose top-K ids leave [0, V) (its checksums made to match: damage the sha256 cannot see) is refused
    on the host when read, before a gather on a device would assert."""
    import shutil

    _, path = _write(setup, "topk")
    other = shutil.copytree(path, tmp_path / "other")
    V = json.loads((other / "cache.json").read_text())["vocab_size"]
    shard = other / "shard_000000.safetensors"
    tensors = cache.verify_shard(shard)
    tensors["topk_ids"][0, 0, 0] = V if bad == "V" else bad
    cache._save_shard(shard, tensors)
    with pytest.raises(TailkdError, match=rf"topk_ids outside the vocabulary \[0, {V}\); the cache is damaged"):
        cache.CacheReader(other).sparse_teacher([0])


def test_a_cache_one_row_short_of_the_run_is_refused(setup):
    """The run reads every one of its training rows: a cache of 10 rows serves a run of 10, and refuses one of 11
    (the boundary: one row short)."""
    _, path = _write(setup, "topk")
    assert cache.CacheReader(path, rows=10).num_rows == 10
    with pytest.raises(TailkdError, match="holds 10 of the run's 11 training rows"):
        cache.CacheReader(path, rows=11)


def test_a_resume_with_another_seed_is_refused(setup):
    """The seed draws the tail samples (per shard): a cache-teacher resumed with another --seed would mix shards of
    two seeds under one cache.json; it is refused, naming the seed."""
    _write(setup, "seeded", tail_samples=2, seed=0)
    with pytest.raises(TailkdError, match=r"other settings \(seed: 0 vs 1\)"):
        _write(setup, "seeded", tail_samples=2, seed=1)


def test_a_cached_teacher_checks_the_batch_rows_against_the_cache(setup):
    """The trainer's CachedTeacher reads a batch's rows by their row_index and checks their tokens against the
    cached row hashes: a batch whose tokens are other rows' is refused (verify_rows=False alone skips it)."""
    from tailkd import teacher as teacher_mod

    _, _, rows, _, _ = setup
    _, path = _write(setup, "topk")
    batch = data_mod.collate_rows(rows, [0, 1])
    assert teacher_mod.CachedTeacher(cache.CacheReader(path))(batch).sparse.topk_ids.shape[0] == 2
    batch["row_index"] = torch.tensor([1, 0])  # the tokens of rows 0, 1 under indices 1, 0
    with pytest.raises(TailkdError, match="row hash mismatch"):
        teacher_mod.CachedTeacher(cache.CacheReader(path))(batch)
    assert teacher_mod.CachedTeacher(cache.CacheReader(path), verify_rows=False)(batch).sparse is not None


def test_a_cached_teacher_reads_the_host_batch_and_names_a_missing_row_index(setup, tmp_path):
    """CachedTeacher: a top-K cache's signal is sparse and its ``sparse`` says so (the run log's loss-layer line
    reads it); a cache with hidden states gives hidden states and a head, not sparse. Given ``host_batch``, the row
    indices and tokens are read from it, never from the device batch (no device synchronisation per micro-batch:
    meta tensors, which cannot be read, stand in for a device's here). A batch without row_index is one line."""
    from tailkd import teacher as teacher_mod

    _, _, rows, _, _ = setup
    _, topk = _write(setup, "topk", tmp_path)
    _, hidden = _write(setup, "hidden", tmp_path, hidden_states=True)
    host = data_mod.collate_rows(rows, [0, 1])
    device = {key: torch.empty_like(value, device="meta") for key, value in host.items()}
    sparse_teacher = teacher_mod.CachedTeacher(cache.CacheReader(topk))
    assert sparse_teacher.sparse and sparse_teacher(device, host_batch=host).sparse.topk_ids.shape[0] == 2
    hidden_teacher = teacher_mod.CachedTeacher(cache.CacheReader(hidden))
    signal = hidden_teacher(device, host_batch=host)
    assert not hidden_teacher.sparse and signal.sparse is None and signal.head is not None
    assert signal.hidden.shape[:2] == host["input_ids"].shape
    del host["row_index"]
    with pytest.raises(TailkdError, match="^a cached teacher needs the row index of every batch row; draw batches"):
        sparse_teacher(host)


def test_an_online_teacher_gives_logits_over_the_run_vocabulary_only(setup):
    """A teacher whose head has more rows than the run's vocabulary (padded embeddings): its dense signal is its
    logits over the first ``vocab_size`` ids, those of the model's own forward."""
    from tailkd import teacher as teacher_mod

    model, tok, rows, _, _ = setup
    ids = data_mod.collate([rows[0]])["input_ids"]
    v = len(tok) - 7
    signal = teacher_mod.OnlineTeacher(model, v, fused_path=False)({"input_ids": ids})
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert signal.logits.shape == (*ids.shape, v) and torch.equal(signal.logits, full[..., :v])


@pytest.mark.parametrize("damage, why", [
    (lambda text: b"\xff" + text.encode(), "not UTF-8"),
    (lambda text: text[: len(text) // 2].encode(), "not valid JSON"),
    (lambda text: b"[" * 100_000 + b"]" * 100_000, "nested too deeply to read"),
    (lambda text: b"[1]", "not a JSON object"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "corpus"}).encode(), "no 'corpus'"),
    (lambda text: json.dumps({**json.loads(text), "num_rows": "ten"}).encode(), "'num_rows'"),
    # the fields of a cache with tail samples / hidden states: a ValueError, a TypeError at the run's first lines
    (lambda text: json.dumps({**json.loads(text), "tail_samples": "ten"}).encode(), "'tail_samples'"),
    (lambda text: json.dumps({**json.loads(text), "hidden_states": "bf16"}).encode(), "'hidden_states'"),
    (lambda text: json.dumps({**(m := json.loads(text)), "hidden_states": {"dtype": "bf16", "size": 32},
                              "teacher": {**m["teacher"], "head": "x"}}).encode(), "'head'"),
    (lambda text: json.dumps({**(m := json.loads(text)), "hidden_states": {"dtype": "bf16", "size": 32},
                              "teacher": {**m["teacher"], "head": {"scale": 1.0}}}).encode(), "'head' object with"),
    (lambda text: json.dumps({**json.loads(text), "k": True}).encode(), "'k' is True, not an integer"),  # JSON true
])
def test_a_damaged_cache_json_is_one_line_naming_it(setup, damage, why):
    """A cache.json that is not UTF-8, cut short, nested too deeply, not an object, or missing / mistyping a field
    is one line naming it, read by a run and by a resumed cache-teacher alike: a UnicodeDecodeError, JSONDecodeError,
    RecursionError, KeyError, ValueError or TypeError traceback before."""
    _, path = _write(setup, "damaged")
    meta = path / "cache.json"
    good = meta.read_text()
    meta.write_bytes(damage(good))
    try:
        with pytest.raises(TailkdError, match=rf"teacher cache {path}: cache\.json is damaged \(.*{why}.*\); "):
            cache.CacheReader(path)
        with pytest.raises(TailkdError, match=rf"teacher cache {path}: cache\.json is damaged \(.*{why}.*\); "):
            cache.open_cache(path, teacher_model=setup[0])
        if why.startswith(("not ", "nested")):  # a readable object is compared with the new settings
            with pytest.raises(TailkdError, match=rf"teacher cache {path}: cache\.json is damaged"):
                _write(setup, "damaged")
    finally:
        meta.write_text(good)


def test_rows_whose_tokens_differ_from_the_cached_ones_are_refused(setup):
    """The run's tokens of rows 0, 1 read against cached rows 1, 0: the row hashes differ, a one-line TailkdError."""
    _, tok, rows, _, _ = setup
    _, path = _write(setup, "topk")
    reader = cache.CacheReader(path)
    ids = data_mod.collate([rows[0], rows[1]])["input_ids"]
    assert set(reader.rows([0, 1], input_ids=ids)) >= {"row_hash", "topk_ids"}  # the aligned rows are read
    with pytest.raises(TailkdError) as info:
        reader.sparse_teacher([1, 0], input_ids=ids)
    assert str(info.value) == (f"the rows read from teacher cache {path} do not hold the run's tokens (row hash "
                               "mismatch): the cache and the training data are not aligned; rebuild the cache")


def test_a_cache_of_another_teacher_is_refused_when_the_run_loads_it_in_another_dtype(setup):
    """The cache was written by an fp32 teacher; a run loading its teacher in bf16 (a GPU's default) cannot compare
    the fp32 weights hash, so it compares both sides' weights rounded to bf16: the same teacher passes, another one
    (same tokenizer and shapes) is refused."""
    import copy

    model, tok, *_ = setup
    _, path = _write(setup, "dtypes")
    same = copy.deepcopy(model).to(torch.bfloat16)
    assert cache.open_cache(path, tokenizer=tok, teacher_model=same).num_rows == 10
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(-1.0)
    with pytest.raises(TailkdError, match="teacher weights"):
        cache.open_cache(path, tokenizer=tok, teacher_model=other.to(torch.bfloat16))


def test_corrupted_shard_is_detected_named_and_rewritten(setup):
    _, path = _write(setup, "corrupt")
    shard = path / "shard_000001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the tensor data
    shard.write_bytes(bytes(raw))
    reader = cache.CacheReader(path)
    reader.rows([0])  # other shards still read
    with pytest.raises(TailkdError, match="shard_000001.safetensors is corrupted"):
        reader.rows([5])
    (path / "shard_000002.safetensors").write_bytes(b"garbage")
    with pytest.raises(TailkdError, match="shard_000002.safetensors is unreadable"):
        cache.CacheReader(path).rows([9])
    logs = []
    _write(setup, "corrupt", log=logs.append)  # a rerun rewrites exactly the damaged shards
    assert sum("rewriting damaged shard" in line for line in logs) == 2
    cache.CacheReader(path).rows([5, 9])


def test_a_shard_whose_tensors_are_not_those_its_checksums_name_is_damaged(setup):
    """A shard without a tensor its checksums list (the checksums of the others hold), or with a tensor they do not
    list, is named as lacking it: every listed tensor is there and every tensor is checked, not only those listed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, path = _write(setup, "tensor-set")
    shard = path / "shard_000000.safetensors"
    with safe_open(str(shard), "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(shard))
    save_file({n: x for n, x in tensors.items() if n != "topk_ids"}, str(shard), metadata=metadata)
    with pytest.raises(TailkdError, match=r"shard_000000.safetensors lacks tensors \['topk_ids'\]"):
        cache.verify_shard(shard)
    save_file({**tensors, "extra": torch.zeros(2)}, str(shard), metadata=metadata)
    with pytest.raises(TailkdError, match=r"shard_000000.safetensors lacks tensors \['extra'\]"):
        cache.verify_shard(shard)


def test_a_second_cache_teacher_on_one_out_leaves_the_first_ones_shard_alone(setup, monkeypatch):
    """Two cache-teacher runs on one --out at once: the second's start-up deleted every .tmp-* file in the folder,
    the shard the first was writing at that moment among them, and the first then failed (exit 2, "could not write
    teacher cache shard ... (No such file or directory); free disk space", a wrong cause). Here the second run
    (another live process: writer tag of the parent process) runs whole while the first has written shard 1's
    temporary file: both finish and equal a fresh cache; the temporary files of a dead writer of this host and an
    untagged one of a dead pid (an older tailkd's) are still removed, a live writer's (tagged or not) is kept."""
    import socket
    import subprocess

    from tailkd import checkpoint as ckpt

    _, fresh = _write(setup, "fresh2")
    host = socket.gethostname()
    path = setup[4] / "shared"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    writer = {"tag": ckpt.writer_tag()}
    monkeypatch.setattr(ckpt, "writer_tag", lambda: writer["tag"])
    real_save, state = cache.save_safetensors, {"second": False}

    def second_run_starts_meanwhile(tensors, tmp, metadata=None):
        real_save(tensors, tmp, metadata)
        if tmp.name.startswith(".tmp-shard_000001") and not state["second"]:
            state["second"] = True
            path.joinpath(f".tmp-shard_000002.safetensors-{gone.pid}@{host}").write_bytes(b"killed")
            path.joinpath(f".tmp-shard_000002.safetensors-{gone.pid}").write_bytes(b"older tailkd, killed")
            older_live = path / f".tmp-shard_000003.safetensors-{os.getppid()}"
            older_live.write_bytes(b"older tailkd, live")  # (pid alive: kept, as a tagged live writer's)
            other = path / f".tmp-head.safetensors-{os.getppid()}@{host}"
            other.write_bytes(b"a third writer, live")  # (of a file the second run does not write)
            writer["tag"] = f"{os.getppid()}@{host}"  # another live process
            try:
                _write(setup, "shared")
            finally:
                writer["tag"] = f"{os.getpid()}@{host}"
            assert tmp.is_file() and other.is_file() and older_live.is_file()
            other.unlink()
            older_live.unlink()

    monkeypatch.setattr(cache, "save_safetensors", second_run_starts_meanwhile)
    _write(setup, "shared")
    assert state["second"]
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in fresh.iterdir())
    for shard in sorted(fresh.glob("shard_*")):
        assert (path / shard.name).read_bytes() == shard.read_bytes()


def test_resume_after_a_crash_skips_complete_shards_and_equals_a_fresh_cache(setup, monkeypatch):
    _, fresh = _write(setup, "fresh", tail_samples=2)
    real_save, calls = cache._save_shard, {"n": 0}

    def crashing_save(path, tensors):
        if path.name.startswith("shard_") and calls["n"] == 2:
            path.with_name(f".tmp-{path.name}-{dead_pid()}").write_bytes(b"half a shard")  # a killed older tailkd's
            raise KeyboardInterrupt("simulated crash")
        calls["n"] += path.name.startswith("shard_")
        real_save(path, tensors)

    monkeypatch.setattr(cache, "_save_shard", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        _write(setup, "resumed", tail_samples=2)
    monkeypatch.setattr(cache, "_save_shard", real_save)
    path = setup[4] / "resumed"
    assert sorted(p.name for p in path.glob("shard_*")) == ["shard_000000.safetensors", "shard_000001.safetensors"]
    with pytest.raises(TailkdError, match=r"lacks shard_000002.safetensors \(caching did not finish\)"):
        cache.CacheReader(path)  # refused when the run opens it, not at the first batch that reads a missing row
    forwards = {"n": 0}
    real_hidden = head_mod.final_hidden

    def counting_hidden(model, input_ids, **kw):
        forwards["n"] += input_ids.shape[0]
        return real_hidden(model, input_ids, **kw)

    monkeypatch.setattr(cache, "final_hidden", counting_hidden)  # the cache's rows
    monkeypatch.setattr(head_mod, "final_hidden", counting_hidden)  # verify_head's probe
    _write(setup, "resumed", tail_samples=2)
    assert forwards["n"] == 2 + 1  # only rows 8, 9 of the missing shard (+1 probe row of verify_head)
    assert not list(path.glob(".tmp-*"))
    a, b = cache.CacheReader(fresh).rows(range(10)), cache.CacheReader(path).rows(range(10))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for shard in sorted(fresh.glob("shard_*")):  # the files too, byte for byte (safetensors' header included)
        assert (path / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_cache_loss_descriptions_name_the_approximation(setup):
    meta, _ = _write(setup, "topk")
    assert "D_KL1 only" in cache.cache_loss_description(meta, "tad", k=4)
    assert "K=4" in cache.cache_loss_description(meta, "tad", k=4)
    assert "lower bound" in cache.cache_loss_description(meta, "kd")
    assert "NOT available" in cache.cache_loss_description(meta, "rkl")
    assert cache.cache_loss_description(meta, "clm") == "clm: no teacher; the teacher cache is not used"
    assert "unbiased 3-sample" in cache.cache_loss_description({**meta, "tail_samples": 3}, "tad")
    assert "exact" in cache.cache_loss_description({**meta, "hidden_states": {"dtype": "bf16", "size": 32}}, "jsd")
    reader = cache.CacheReader(setup[4] / "topk", k=4)
    assert "K=4" in reader.check_loss("tad")
    for bad in ({"loss_name": "jsd"}, {"loss_name": "kd", "temperature": 2.0},
                {"loss_name": "tad", "cosine_weight": 1.0}):
        with pytest.raises(TailkdError, match="--hidden-states"):
            reader.check_loss(**bad)


@pytest.mark.parametrize("cfg", [LossConfig(name="tad", k=5, per_document=True), LossConfig(name="kd", k=5)],
                         ids=["tad", "kd"])  # kd: the cache's tail estimate with row weight w = 1 (log w = 0)
def test_step_terms_dense_and_fused_agree_for_online_and_cached_teachers(setup, cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tailkd import teacher as teacher_mod

    model, tok, rows, _, _ = setup
    _, path = _write(setup, "topk_samples", tail_samples=4)
    torch.manual_seed(3)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           max_position_embeddings=64))
    sampler = data_mod.RowSampler(10, seed=0)
    batch = next(data_mod.batches(rows, sampler, 3))
    n = batch["labels"].numel()
    V = len(tok)
    sources = [teacher_mod.OnlineTeacher(model, V, fused_path=False),
               teacher_mod.OnlineTeacher(model, V, fused_path=True),
               teacher_mod.CachedTeacher(cache.CacheReader(path, k=5))]
    results = []
    for source in sources:
        for fused_path in (False, True):
            if source is sources[0] and fused_path or source is sources[1] and not fused_path:
                continue
            student.zero_grad()
            terms = step_terms(student, batch, source(batch), n, cfg, vocab_size=V,
                                           fused_path=fused_path, chunk_size=8)
            terms.loss.backward()
            results.append((float(terms.loss.detach()), student.lm_head.weight.grad.clone()))
    (l_dense, g_dense), (l_fused, g_fused), (c_dense, cg_dense), (c_fused, cg_fused) = results
    # Dense and fused read the same final hidden states (the same forward: deterministic); from there two float32
    # evaluations of the heads and the objective, each within LB.head_objective (dense teacher, or the cache's
    # sparse teacher with its tail samples, whose float32 values are exact inputs)
    with torch.no_grad():
        h_s, h_t = head_mod.final_hidden(student, batch["input_ids"]), head_mod.final_hidden(model, batch["input_ids"])
    head_s, head_t = head_mod.model_head(student, V), head_mod.model_head(model, V)
    common = (cfg, h_s, head_s.weight, head_s.bias, head_s.spec)
    online = LB.head_objective(*common, h_t, head_t, batch["labels"], batch["segment_ids"], n=n)
    cached = LB.head_objective(*common, None, None, batch["labels"], batch["segment_ids"], n=n,
                               sparse=sources[2](batch).sparse)
    B.assert_within(l_fused, l_dense, 2 * online["loss"], msg="loss, online teacher")
    B.assert_within(g_fused, g_dense, 2 * online["w"], msg="lm_head gradient, online teacher")
    B.assert_within(c_fused, c_dense, 2 * cached["loss"], msg="loss, cached teacher")
    B.assert_within(cg_fused, cg_dense, 2 * cached["w"], msg="lm_head gradient, cached teacher")


def test_cache_teacher_cli_end_to_end(tmp_path, capsys, monkeypatch):
    from tiny import make_teacher_dir

    from tailkd.cli import main

    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "tk"))
    teacher = make_teacher_dir(tmp_path / "teacher", layers=1, hidden=32, train_steps=0)
    corpus = write_corpus(tmp_path / "c.txt", n_docs=20)
    args = ["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "16", "--k", "4",
            "--out", str(tmp_path / "out"), "--max-rows", "3", "--tail-samples", "2", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out and "GB per 1B tokens" in out and "top-K + hidden states" in out
    meta = json.loads((tmp_path / "out" / "cache.json").read_text())
    assert meta["k"] == 4 and meta["num_rows"] == 3 and meta["corpus"]["seq_len"] == 16
    assert main(args) == 0  # rerun: everything complete, nothing recomputed
    assert "0 shard(s) written" in capsys.readouterr().out


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_cache_teacher_split_caches_the_rows_of_that_split(tmp_path, monkeypatch, split):
    """``--split`` picks the rows cached: all of them (no --max-rows), as many as `commands.eval_rows` gives for the
    same settings; the train and held-out counts differ here, so caching the other split's rows, which survived,
    fails (mutation audit)."""
    from tiny import make_teacher_dir

    from tailkd.cli import main
    from tailkd.commands import eval_rows
    from tailkd.config import DataConfig
    from tailkd.models import read_tokenizer

    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "tk"))
    teacher = make_teacher_dir(tmp_path / "teacher", layers=1, hidden=32, train_steps=0)
    corpus = write_corpus(tmp_path / "c.txt", n_docs=20)
    assert main(["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "16", "--k", "4",
                 "--out", str(tmp_path / "out"), "--split", split, "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "out" / "cache.json").read_text())
    data = DataConfig(paths=[str(corpus)], seq_len=16)
    counts = {s: len(eval_rows(read_tokenizer(str(teacher)), data, split=s)) for s in ("train", "heldout")}
    assert counts["train"] != counts["heldout"] and meta["num_rows"] == counts[split], counts


def test_a_run_on_a_cache_of_part_of_its_rows_is_refused_before_its_folder_is_made(tmp_path, capsys, monkeypatch):
    """A cache of the first rows only (cache-teacher --max-rows) failed at the first step that drew a row past them
    ('row i is not in teacher cache'), after the run folder and its config.yaml were made: the same command again
    then needed --overwrite. Now refused when the cache is opened, one line, exit 2, no run folder. What the line
    says then works: rerunning cache-teacher with --max-rows 0 on that folder is refused (a cache of other settings,
    the line saying to delete it), deleted first it writes every row and the run trains."""
    import shutil

    from tiny import make_teacher_dir

    from tailkd.cli import main

    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "tk"))
    teacher = make_teacher_dir(tmp_path / "teacher", layers=1, hidden=32, train_steps=0)
    corpus = write_corpus(tmp_path / "c.txt", n_docs=20)
    assert main(["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "16", "--k", "4",
                 "--out", str(tmp_path / "part"), "--max-rows", "2", "--device", "cpu"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    distill = ["distill", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "16", "--batch-size", "2",
               "--steps", "1", "--train.precision", "fp32", "--loss", "tad", "--k", "4", "--teacher-cache",
               str(tmp_path / "part"), "--student-layers", "1", "--out", str(run)]
    assert main(distill) == 2
    err = capsys.readouterr().err.strip().splitlines()
    part = re.escape(str(tmp_path / "part"))
    assert re.fullmatch(rf"tailkd: error: teacher cache {part} holds 2 of the run's \d+ training rows "
                        r"\(cache-teacher --max-rows\): a run reads every training row; cache them all: delete "
                        rf"{part} \(or choose another --out\) and run tailkd cache-teacher with --max-rows 0",
                        err[-1]), err
    assert not any("Traceback" in line for line in err) and not run.exists()
    whole = ["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "16", "--k", "4", "--out",
             str(tmp_path / "part"), "--max-rows", "0", "--device", "cpu"]
    assert main(whole) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(rf"tailkd: error: {part} holds a teacher cache written with other settings \(num_rows: 2 vs "
                        rf"\d+\); resume with the same arguments, or delete {part} \(or choose another --out\) to "
                        r"write this one", err[-1]), err
    shutil.rmtree(tmp_path / "part")
    assert main(whole) == 0 and main(distill) == 0


def test_a_cache_that_cannot_serve_the_run_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """What of a teacher cache needs no model — its seq_len, its K, whether it can give the loss — is checked before
    the teacher loads (minutes for a large one): the same one-line refusals, exit 2, no run folder, and
    `models.load_teacher` never called. They came only after the teacher and the student were loaded. A clm run,
    which reads no teacher signal, leaves the cache alone."""
    from tiny import make_teacher_dir

    from tailkd.cli import main

    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "tk"))
    teacher = make_teacher_dir(tmp_path / "teacher", layers=1, hidden=32, train_steps=0)
    corpus = write_corpus(tmp_path / "c.txt", n_docs=20)
    topk = tmp_path / "topk"
    assert main(["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "16", "--k", "4",
                 "--out", str(topk), "--device", "cpu"]) == 0
    capsys.readouterr()

    run = tmp_path / "run"
    base = ["distill", "--teacher", str(teacher), "--data", str(corpus), "--batch-size", "2", "--steps", "1",
            "--teacher-cache", str(topk), "--student-layers", "1", "--out", str(run)]
    cases = ((["--seq-len", "16", "--loss", "jsd"], "loss.name=jsd needs the teacher's full distribution"),
             (["--seq-len", "16", "--loss", "tad", "--k", "6"], "holds the top-4 teacher ids, the run needs K=6"),
             (["--seq-len", "32", "--loss", "kd"], "its seq_len is 16, the run's is 32"),
             (["--seq-len", "16", "--loss", "kd", "--loss.temperature", "2"], "temperature 1"))
    with no_model_loads("the cache was checked"):
        for extra, line in cases:
            assert main(base + extra) == 2, extra
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("tailkd: error: ") and line in err[0], err
            assert not run.exists()
    # clm reads no teacher signal: its teacher.cache is neither read nor refused (prepare.check_before_models); the
    # student is made from the teacher's layers; its log names the curves it has (no KL: no teacher)
    assert main(base + ["--seq-len", "32", "--loss", "clm", "--out", str(tmp_path / "clm")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"curves (held-out CLM, training loss): {tmp_path / 'clm' / 'curves.png'}" in out
    assert any(line.startswith("held-out student CLM: ") for line in out)


def test_a_cache_of_another_tokenizer_or_corpus_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """A cache of another tokenizer or of another corpus was refused only when `setup_teacher_signal` opened it,
    after the teacher and the student were loaded and the corpus tokenised (minutes for a large teacher). Now
    before any model loads, with the very line the reader gives there (`open_cache` with the run's data tokenizer
    and the fingerprint of the corpus `setup_data` prepares): exit 2, no run folder, no model loaded."""
    import shutil

    from tiny import make_teacher_dir

    from tailkd import models
    from tailkd.cli import main
    from tailkd.config import DistillConfig
    from tailkd.prepare import setup_data

    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "tk"))
    teacher = make_teacher_dir(tmp_path / "teacher", layers=1, hidden=32, train_steps=0)
    student = make_teacher_dir(tmp_path / "student", layers=1, hidden=32, seed=1, train_steps=0)  # same tokenizer
    other_tok = shutil.copytree(teacher, tmp_path / "other-tok")
    make_tokenizer(290).save_pretrained(other_tok)  # another vocabulary (its 300-row head still covers it)
    corpus = write_corpus(tmp_path / "c.txt", n_docs=20)
    other = write_corpus(tmp_path / "d.txt", n_docs=21)
    topk = tmp_path / "topk"
    assert main(["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "16", "--k", "4",
                 "--out", str(topk), "--device", "cpu"]) == 0
    capsys.readouterr()

    def reader_line(tokenizer_dir, paths, heldout_fraction=0.05):
        """The line `setup_teacher_signal`'s `open_cache` gives for that data tokenizer and corpus."""
        tok = models.load_tokenizer(tokenizer_dir)
        cfg = DistillConfig()
        cfg.data.paths, cfg.data.seq_len, cfg.data.heldout_fraction = paths, 16, heldout_fraction
        info, _, _ = setup_data(cfg, tok, None)
        with pytest.raises(TailkdError) as exc:
            cache.open_cache(topk, tokenizer=tok, corpus_fingerprint=info.fingerprint, split="train", seq_len=16, k=4)
        return f"tailkd: error: {exc.value}"

    built = ["--student-layers", "1"]
    cases = [(["--teacher", str(other_tok), *built, "--data", str(corpus)], reader_line(other_tok, [str(corpus)])),
             (["--teacher", str(teacher), *built, "--data", str(other)], reader_line(teacher, [str(other)])),
             (["--teacher", str(teacher), *built], reader_line(teacher, [])),  # the built-in news corpus
             (["--teacher", str(teacher), *built, "--data", str(corpus), "--data.heldout_fraction", "0.2"],
              reader_line(teacher, [str(corpus)], 0.2)),
             (["--teacher", str(teacher), "--student", str(student), "--data", str(other)],
              reader_line(student, [str(other)]))]
    assert "its tokenizer is" in cases[0][1] and all("its corpus is" in line for _, line in cases[1:])

    run = tmp_path / "run"
    args = ["--seq-len", "16", "--batch-size", "2", "--steps", "1", "--loss", "kd", "--teacher-cache", str(topk),
            "--out", str(run)]
    with no_model_loads("the cache was checked"):
        for extra, line in cases:
            assert main(["distill", *extra, *args]) == 2, extra
            assert capsys.readouterr().err.strip().splitlines() == [line], extra
            assert not run.exists()
    # the cache's own tokenizer and corpus still run: a loaded student (its tokenizer reads the data), a held-out
    # corpus of its own (the training corpus is prepared as without it)
    assert main(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(corpus),
                 "--heldout-data", str(other), "--train.precision", "fp32", *args]) == 0
    assert f"teacher signal: teacher cache {topk}" in capsys.readouterr().out


@pytest.mark.parametrize("data", [{}, {"paths": ["c.txt", "d.txt"]}, {"paths": ["d.txt", "c.txt"]},
                                  {"paths": ["c.txt"], "heldout_paths": ["d.txt"]},
                                  {"paths": ["c.txt", "builtin:pydoc"]},
                                  {"paths": ["c.txt"], "doc_sep": "line", "doc_eos": False, "heldout_fraction": 0.2},
                                  {"paths": ["c.txt"], "cache_dir": "own-cache"},
                                  {"task": "sft", "paths": ["p.jsonl"]},
                                  {"task": "sft", "paths": ["p.jsonl"], "sft_mode": "pack", "overlong": "drop"},
                                  {"task": "sft", "paths": ["p.jsonl"], "heldout_paths": ["h.jsonl"]}])
def test_the_corpus_fingerprint_a_cache_run_checks_first_is_the_one_setup_data_gives(tmp_path, monkeypatch, data):
    """`check_before_models` compares a cache's corpus before any model loads with `train_corpus_fingerprint`, of
    packed text not tokenising: it is the fingerprint of the training rows `setup_data` prepares (what the cache is
    compared with when the teacher signal opens it, `rows_fingerprint`) for the built-in news corpus, files in either
    order, a held-out corpus of its own, a built-in set, other settings and another data cache; of SFT rows (pad,
    pack, held-out files of their own: training examples sharing their prompts dropped) their digest."""
    from tailkd.config import DistillConfig
    from tailkd.prepare import rows_fingerprint, setup_data, train_corpus_fingerprint

    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "tk"))
    write_corpus(tmp_path / "c.txt", n_docs=20)
    write_corpus(tmp_path / "d.txt", n_docs=21)
    pairs = [json.dumps({"prompt": f"Q{i % 9}:", "response": f" {i}"}) + "\n" for i in range(30)]
    (tmp_path / "p.jsonl").write_text("".join(pairs))
    (tmp_path / "h.jsonl").write_text("".join(pairs[:2]))
    cfg = DistillConfig()
    cfg.data.seq_len = 16
    for key, value in data.items():
        rooted = [p if p.startswith("builtin:") else str(tmp_path / p) for p in value] if key.endswith("paths") else \
            str(tmp_path / value) if key == "cache_dir" else value
        setattr(cfg.data, key, rooted)
    tok = make_tokenizer()
    early = train_corpus_fingerprint(cfg, tok)
    info, train_rows, _ = setup_data(cfg, tok, None, prompt_only=False)
    assert early == rows_fingerprint(info, train_rows)
    if cfg.data.task == "sft":
        assert early == train_rows.input_digest
        if "heldout_paths" in data:  # the examples asking Q0: or Q1: held out
            assert len(train_rows.examples) == sum(i % 9 > 1 for i in range(30))
    else:
        assert early == info.fingerprint


def test_cache_teacher_progress_in_a_log_is_a_line_per_30_seconds_not_one_per_batch(tmp_path, capsys, monkeypatch):
    """stderr not a terminal (a CI log, a file): the bar refreshes at most every 30 s of its clock, so an hour's run
    leaves ~120 updates in the log, not one per batch (tqdm's default: up to 10 a second)."""
    import tqdm.std
    from tiny import make_teacher_dir

    from tailkd.cli import main

    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "tk"))
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    teacher = make_teacher_dir(tmp_path / "teacher", layers=1, hidden=32, train_steps=0)
    corpus = write_corpus(tmp_path / "c.txt", n_docs=20)
    clock = iter(range(10**9))  # every reading of tqdm's clock: 1 s later (40 batches take far more than 30 s)
    monkeypatch.setattr(tqdm.std, "time", lambda: float(next(clock)))
    assert main(["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "16", "--k", "4",
                 "--out", str(tmp_path / "out"), "--max-rows", "40", "--batch-size", "1", "--device", "cpu"]) == 0
    clock_end = next(clock)
    updates = [u for u in capsys.readouterr().err.split("\r") if u.startswith("cache-teacher:")]
    assert "tok/s" in updates[-1] and "100%" in updates[-1]
    assert len(updates) <= clock_end / 30 + 3, len(updates)  # first, last, and one per 30 s between


def test_cache_teacher_on_builtin_math_caches_the_rows_distill_trains_on(tmp_path, monkeypatch):
    """`--data builtin:math` is the built-in math corpus for cache-teacher as for distill (one resolution rule,
    `tailkd.prepare.setup_data`): the cache's corpus fingerprint is the one a distill run with that data checks."""
    pytest.importorskip("reasoning_gym", reason="builtin:math needs reasoning-gym")
    from tiny import make_teacher_dir

    from tailkd.cli import main
    from tailkd.config import DistillConfig
    from tailkd.models import load_teacher
    from tailkd.prepare import setup_data

    teacher = make_teacher_dir(tmp_path / "teacher", layers=1, hidden=32, train_steps=0)
    cache_dir, out = tmp_path / "tk", tmp_path / "out"
    assert main(["cache-teacher", "--teacher", str(teacher), "--data", "builtin:math", "--data.math_train", "40",
                 "--data.math_heldout", "4", "--cache-dir", str(cache_dir), "--seq-len", "16", "--k", "4",
                 "--out", str(out), "--max-rows", "2", "--device", "cpu"]) == 0
    cfg = DistillConfig()
    cfg.data.paths, cfg.data.math_train, cfg.data.math_heldout = ["builtin:math"], 40, 4
    cfg.data.cache_dir, cfg.data.seq_len = str(cache_dir), 16
    info, _, _ = setup_data(cfg, load_teacher(str(teacher), dtype="fp32")[1], None)
    meta = json.loads((out / "cache.json").read_text())
    assert meta["corpus"]["fingerprint"] == info.fingerprint and meta["num_rows"] == 2


def test_a_full_disk_while_caching_is_one_line_and_the_rerun_finishes(tmp_path, capsys, monkeypatch):
    """The third shard's write fails as safetensors reports a full disk: exit 2 with the documented line, the two
    complete shards stay; the same command again writes only the missing shard."""
    from safetensors import SafetensorError
    from tiny import make_teacher_dir

    from tailkd import checkpoint as ckpt
    from tailkd.cli import main

    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "tk"))
    teacher = make_teacher_dir(tmp_path / "teacher", layers=1, hidden=32, train_steps=0)
    corpus = write_corpus(tmp_path / "c.txt", n_docs=20)
    out = tmp_path / "out"
    args = ["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "16", "--k", "4",
            "--out", str(out), "--max-rows", "6", "--rows-per-shard", "2", "--device", "cpu"]
    real, writes = ckpt.save_file, []

    def full_at_third(tensors, filename, *a, **kw):
        writes.append(filename)
        if len(writes) == 3:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", full_at_third)
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"tailkd: error: could not write teacher cache shard {out / 'shard_000002.safetensors'} (No space "
                    "left on device); free disk space and rerun the same tailkd cache-teacher command: the complete "
                    "shards are kept")
    assert sorted(p.name for p in out.iterdir()) == ["cache.json", "shard_000000.safetensors",
                                                     "shard_000001.safetensors"]
    monkeypatch.undo()
    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "tk"))
    assert main(args) == 0
    assert "1 shard(s) written, 2 complete shard(s) kept" in capsys.readouterr().out


def test_an_out_that_cannot_hold_a_cache_is_one_line(tmp_path, capsys, monkeypatch):
    """--out naming a file, or a disk full before the first shard (cache.json): exit 2 with one line naming --out,
    not an OSError's name and errno."""
    import errno
    import os

    from tiny import make_teacher_dir

    from tailkd.cli import main

    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "tk"))
    teacher = make_teacher_dir(tmp_path / "teacher", layers=1, hidden=32, train_steps=0)
    corpus = write_corpus(tmp_path / "c.txt", n_docs=20)

    def run(out):
        args = ["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "16", "--k", "4",
                "--out", str(out), "--max-rows", "2", "--device", "cpu"]
        assert main(args) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert run(afile) == f"tailkd: error: cache.out={afile} is a file; give a folder name"  # before the teacher loads
    assert run(afile / "cache") == f"tailkd: error: cache.out={afile}/cache: {afile} is a file, not a folder; give a " \
                                   "path in a folder"

    def full_disk(final, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache, "atomic_write_text", full_disk)
    out = tmp_path / "out"
    assert run(out) == (f"tailkd: error: could not write teacher cache {out} (No space left on device); free disk "
                        "space or choose another --out")


# --------------------------------------------------------------------------- an error on one rank of a sharded teacher


def _failing_rank_worker(rank, world, port, teacher, rows_spec, fingerprint, out, results):
    """One rank of a 2-rank gloo group (a short collective timeout, so that a rank left waiting fails in seconds
    rather than 30 minutes) writing a cache with a sharded teacher; rank 1's disk is full. Records what it raised."""
    import errno
    import os
    from datetime import timedelta

    import torch.distributed as tdist

    from tailkd.models import load_tokenizer
    from tailkd.sharded_teacher import load_sharded_teacher

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=20))
    outcome = {"raised": None, "message": None}
    try:
        model = load_sharded_teacher(str(teacher), device=torch.device("cpu"), dtype="fp32")
        if rank == 1:
            def full_disk(tensors, path, metadata=None):
                raise OSError(errno.ENOSPC, "No space left on device")

            cache.save_safetensors = full_disk
        try:
            cache.write_cache(model, load_tokenizer(teacher), data_mod.PackedRows(*rows_spec), out,
                              corpus={"fingerprint": fingerprint, "split": "train"}, k=4, batch_size=2,
                              rows_per_shard=3, max_rows=10, log=lambda *_: None)
        except Exception as exc:  # noqa: BLE001 - what each rank raised is the test's subject
            outcome = {"raised": type(exc).__name__, "message": str(exc)}
    finally:
        torch.save(outcome, Path(results) / f"rank{rank}.pt")
        tdist.destroy_process_group()
    from tailkd.distributed import leave

    leave(0)  # as the CLI's ranks end (no interpreter finalization, where a gloo worker thread can abort it)


def test_a_full_disk_on_one_rank_of_a_sharded_teacher_ends_every_rank(tmp_path):
    """2 gloo ranks, a sharded teacher (forwards are collectives): shards 0, 2 are rank 0's (2 + 2 forwards), 1, 3
    rank 1's (2 + 1). Rank 1's first shard write fails after its 2nd forward; it keeps padding up to the common 4
    forwards, then both ranks raise: rank 1 its own one-line error, rank 0 a TailkdError naming it and rank 1.
    Without that, rank 0 waits in its 3rd forward's all-gather until the group's timeout (20 s here) ends it with
    a gloo error instead. Rank 0's own shards are written whole."""
    import time

    import torch.multiprocessing as mp
    from launch import free_port
    from tiny import make_teacher_dir

    from tailkd.models import load_tokenizer

    teacher = make_teacher_dir(tmp_path / "teacher", layers=2, hidden=32, train_steps=0)
    info = corpus_mod.prepare_corpus([write_corpus(tmp_path / "c.txt", n_docs=30)], load_tokenizer(teacher),
                                     tmp_path / "tokens")
    assert len(data_mod.PackedRows(info.train_bin, SEQ_LEN)) >= 10
    out, results = tmp_path / "cache", tmp_path / "results"
    results.mkdir()
    ctx = mp.start_processes(_failing_rank_worker, nprocs=2, join=False, start_method="spawn",
                             args=(2, free_port(), teacher, (str(info.train_bin), SEQ_LEN), info.fingerprint, out,
                                   results))
    deadline = time.monotonic() + 240  # far above the 20 s collective timeout: a run that ends at all ends by then
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise AssertionError("the ranks did not end")
    got = [torch.load(results / f"rank{r}.pt") for r in range(2)]
    shard1 = out / "shard_000001.safetensors"
    own = (f"could not write teacher cache shard {shard1} (No space left on device); free disk space and rerun the "
           "same tailkd cache-teacher command: the complete shards are kept")
    assert got[1] == {"raised": "TailkdError", "message": own}
    assert got[0] == {"raised": "TailkdError", "message": f"{own} (on rank 1)"}
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_000000.safetensors", "shard_000002.safetensors"]
    for name in ("shard_000000.safetensors", "shard_000002.safetensors"):
        cache.verify_shard(out / name)


def test_a_resume_may_spell_the_teacher_otherwise_another_teacher_is_refused(setup):
    """cache.json's teacher.name is --teacher as given, and it was compared on resume: the same cache-teacher command
    run again from another folder (--teacher w1/teacher for teacher), or with ./teacher/ or the absolute path, was
    refused ('written with other settings (teacher.name: ...)') although the shards would be the same. The teacher
    is told by its weights hash, class and head; its spelling is no setting. Another teacher (other weights) under
    the same name is still refused."""
    import copy

    model, tok, rows, ident, root = setup
    _write(setup, "spelled", teacher_name="teacher", max_rows=4)
    for name in ("./teacher/", "/abs/w1/teacher", "w1/teacher"):
        _write(setup, "spelled", teacher_name=name, max_rows=4)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(-1.0)
    with pytest.raises(TailkdError, match="other settings .teacher.weights_sha256"):
        cache.write_cache(other, tok, rows, root / "spelled", corpus=ident, teacher_name="teacher", k=8,
                          rows_per_shard=4, max_rows=4, batch_size=3, log=lambda *_: None)


def test_an_out_holding_other_files_is_refused_before_the_teacher_loads(tmp_path, capsys):
    """--out a folder of the user's (files, no cache.json) was refused only once the teacher had loaded and the data
    was tokenised (minutes for a large teacher); it is now refused when the config is read, as select-data's --out.
    The teacher here does not exist: its 'not found' would come first otherwise. The folder is left as it was; one
    holding only a killed writer's temporary file is a cache folder still to be written."""
    from tailkd.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["cache-teacher", "--teacher", str(tmp_path / "no_teacher"), "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tailkd: error: {mine} exists and is not a teacher cache; choose a new or empty --out"]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    started = tmp_path / "started"
    started.mkdir()
    (started / ".tmp-shard_000000.safetensors-1").write_text("")
    assert main(["cache-teacher", "--teacher", str(tmp_path / "no_teacher"), "--out", str(started)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "not a teacher cache" not in err


def test_cache_teacher_without_tail_samples_prints_what_16_would_cost(tmp_path, capsys, monkeypatch):
    """The size table printed after a cache without tail samples (the default 0) prices its tail-sample modes at 16
    samples, not 0: at 0 those rows would repeat the top-K-only and hidden-state ones (16 in their place survived the
    mutation audit)."""
    from tiny import make_teacher_dir

    from tailkd.cache import format_size_table
    from tailkd.cli import main

    monkeypatch.setenv("TAILKD_CACHE", str(tmp_path / "tk"))
    teacher = make_teacher_dir(tmp_path / "teacher", layers=1, hidden=32, train_steps=0)
    corpus = write_corpus(tmp_path / "c.txt", n_docs=20)
    assert main(["cache-teacher", "--teacher", str(teacher), "--data", str(corpus), "--seq-len", "16", "--k", "4",
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--max-rows", "2"]) == 0
    printed = capsys.readouterr().out
    assert format_size_table(4, hidden_size=32, hidden_dtype="bf16", tail_samples=16) in printed
    assert "top-K + 16 tail samples" in printed
