"""The objective: one denominator (the global valid-token count) makes micro-batching exact."""

import pytest
import torch
import torch.nn.functional as F

from tailkd import baselines, losses
from tailkd.config import LossConfig
from tailkd.objective import IGNORE_INDEX, count_valid_tokens, objective, step_terms
from tailkd.registry import LOSSES

LOSS_NAMES = list(LOSSES)  # every row of the registry


def _batch(B=4, T=7, V=50, seed=0, masked_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < masked_frac] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX  # one row with nothing to learn
    return s, t, labels


def _hidden_and_heads(seed: int):
    """Student and teacher final hidden states [3, 6, 8] / [3, 6, 12] and LM-head weights [40, 8] / [40, 12]."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64)
                 for shape in ((3, 6, 8), (3, 6, 12), (40, 8), (40, 12)))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_micro_batches_give_the_big_batch_gradient(name):
    s, t, labels = _batch()
    cfg = LossConfig(name=name, k=5, cosine_weight=0.0)
    n = count_valid_tokens(labels)

    big = s.clone().requires_grad_(True)
    objective(big, labels, n, cfg=cfg, teacher_logits=t).loss.backward()

    small = s.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):  # uneven micro-batches, one fully masked
        part = objective(small[rows], labels[rows], n, cfg=cfg, teacher_logits=t[rows])
        part.loss.backward()
        total += float(part.loss.detach())
    torch.testing.assert_close(small.grad, big.grad, rtol=1e-12, atol=1e-12)
    assert total == pytest.approx(float(objective(s, labels, n, cfg=cfg, teacher_logits=t).loss), rel=1e-12)


def test_value_is_paper_eq4_sum_over_valid_tokens_divided_once():
    s, t, labels = _batch(seed=3)
    cfg = LossConfig(name="tad", k=4, beta=2.0)
    mask = labels != IGNORE_INDEX
    n = int(mask.sum())
    got = objective(s, labels, n, cfg=cfg, teacher_logits=t)
    V = s.shape[-1]
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    div = losses.tad(s, t, mask, k=4, beta=2.0)[mask].sum()
    assert float(got.loss) == pytest.approx(float((ce + div) / n), rel=1e-12)
    assert float(got.clm) == pytest.approx(float(ce / n), rel=1e-12)
    assert float(got.div) == pytest.approx(float(div / n), rel=1e-12)


def test_weights_and_global_denominator():
    s, t, labels = _batch(seed=4)
    n_local = count_valid_tokens(labels)
    base = objective(s, labels, n_local, cfg=LossConfig(name="kd"), teacher_logits=t)
    # A larger global count (other ranks / micro-batches) scales the local contribution down exactly.
    scaled = objective(s, labels, 3 * n_local, cfg=LossConfig(name="kd"), teacher_logits=t)
    assert float(scaled.loss) == pytest.approx(float(base.loss) / 3, rel=1e-12)
    only_div = objective(s, labels, n_local, cfg=LossConfig(name="kd", clm_weight=0.0), teacher_logits=t)
    assert float(only_div.loss) == pytest.approx(float(base.div), rel=1e-12)


def test_masked_positions_get_no_gradient():
    s, t, labels = _batch(seed=5)
    x = s.clone().requires_grad_(True)
    objective(x, labels, count_valid_tokens(labels), cfg=LossConfig(name="tad", k=3), teacher_logits=t).loss.backward()
    masked = labels == IGNORE_INDEX
    assert torch.all(x.grad[masked] == 0)
    assert torch.all(x.grad[~masked].abs().sum(-1) > 0)


def test_all_masked_batch_is_zero_with_finite_gradient():
    s, t, labels = _batch(seed=6)
    labels[:] = IGNORE_INDEX
    x = s.clone().requires_grad_(True)
    out = objective(x, labels, 0, cfg=LossConfig(name="tad"), teacher_logits=t)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("count", [0, torch.tensor(0), torch.tensor(0.0)])
def test_a_step_without_valid_tokens_is_zero_whatever_the_type_of_its_count(count):
    """The count may be a Python int or a tensor (a device count, e.g. summed over ranks by all_reduce): a step whose
    global count is 0 (every label -100) gives loss 0 and zero gradients on the dense and the chunked path, not
    0 / 0 = NaN; the denominator is clamped to 1 for both kinds (`objective._normalised`)."""
    from tailkd.head import Head, HeadSpec
    from tailkd.objective import chunked_objective

    s, t, labels = _batch(B=3, T=6, V=40, seed=6)
    hs, ht, w_s, w_t = _hidden_and_heads(6)
    labels[:] = IGNORE_INDEX
    x, h = s.clone().requires_grad_(True), hs.clone().requires_grad_(True)
    dense = objective(x, labels, count, cfg=LossConfig(name="tad", k=5), teacher_logits=t)
    chunked = chunked_objective(h, Head(w_s, None, HeadSpec(40)), labels, count, cfg=LossConfig(name="tad", k=5),
                                teacher_hidden=ht, teacher_head=Head(w_t, None, HeadSpec(40)), chunk_size=4)
    (dense.loss + chunked.loss).backward()
    for out in (dense, chunked):
        assert [float(out.loss.detach()), float(out.clm), float(out.div), float(out.cos)] == [0.0] * 4
    assert torch.all(x.grad == 0) and torch.all(h.grad == 0)


def test_cosine_term_and_missing_teacher_errors():
    s, t, labels = _batch(seed=7)
    hs, ht = torch.randn(4, 7, 8, dtype=torch.float64), torch.randn(4, 7, 12, dtype=torch.float64)
    mask = labels != IGNORE_INDEX
    n = int(mask.sum())
    with_cos = objective(s, labels, n, cfg=LossConfig(name="kd", cosine_weight=0.5), teacher_logits=t,
                         student_hidden=hs, teacher_hidden=ht)
    without = objective(s, labels, n, cfg=LossConfig(name="kd"), teacher_logits=t)
    expect = 0.5 * losses.hidden_cosine(hs, ht, mask).sum() / n
    assert float(with_cos.loss - without.loss) == pytest.approx(float(expect), rel=1e-10)
    with pytest.raises(ValueError, match="teacher_logits"):
        objective(s, labels, n, cfg=LossConfig(name="kd"))
    with pytest.raises(ValueError, match="student_hidden"):
        objective(s, labels, n, cfg=LossConfig(name="kd", cosine_weight=1.0), teacher_logits=t)


def test_cache_tad_uses_segment_ids_only_per_document():
    """TAD against a top-K cache with tail points on full logits (`registry.Divergence.sparse_per_token`): β(X)
    averages α^T over each row unless loss.per_document, so segment ids given with per_document false change
    nothing (bit-identical: the same operations on the same values), and with per_document true they do (the
    documents' ᾱ differ here), as on the chunked path. (Without tail points the cache loss is D_KL1, free of β(X).)"""
    from tailkd.divergences import SparseTeacher
    from tailkd.registry import bind

    s, t, labels = _batch(B=3, T=6, V=40, seed=13)
    mask = labels != IGNORE_INDEX
    seg = torch.tensor([0, 0, 1, 1, 1, 2]).expand(3, 6)
    lp = torch.log_softmax(t, -1)
    ranked = lp.topk(40, -1)  # every id: the top 5, then the tail as exact support points (weights p_i)
    ids, vals = ranked.indices, ranked.values
    cache = SparseTeacher(ids[..., :5], vals[..., :5], vals[..., 5:].logsumexp(-1), ids[..., 5:], vals[..., 5:],
                          vals[..., 5:])  # with tail points (log w_i = log p_i): β(X) weighs the tail term
    per_row = bind(LossConfig(name="tad", k=5)).sparse_per_token(s, cache, mask)
    ignored = bind(LossConfig(name="tad", k=5, per_document=False)).sparse_per_token(s, cache, mask, seg)
    per_doc = bind(LossConfig(name="tad", k=5, per_document=True)).sparse_per_token(s, cache, mask, seg)
    assert torch.equal(ignored, per_row)
    assert (per_doc - per_row).abs().max() > 1e-3


def test_chunked_cosine_term_carries_its_weight():
    """The chunked path adds cosine_weight · Σ (1 − cos) / N, as the dense path: with cosine_weight 0.5 the loss
    rises by half the cosine sum over N, and the reported cos term is the unweighted Σ (1 − cos) / N. float64, the
    same operations on both sides plus one product and one sum: rel 1e-10 (u64 ~ 1e-16 times a few dozen terms)."""
    from tailkd.head import Head, HeadSpec
    from tailkd.objective import chunked_objective

    _, _, labels = _batch(B=3, T=6, V=40, seed=11)
    hs, ht, w_s, w_t = _hidden_and_heads(11)
    n = count_valid_tokens(labels)

    def run(weight):
        return chunked_objective(hs, Head(w_s, None, HeadSpec(40)), labels, n,
                                 cfg=LossConfig(name="kd", cosine_weight=weight), teacher_hidden=ht,
                                 teacher_head=Head(w_t, None, HeadSpec(40)), chunk_size=4)

    with_cos, without = run(0.5), run(0.0)
    cos = losses.hidden_cosine(hs, ht, labels != IGNORE_INDEX).sum() / n
    assert float(cos) > 0.1  # the term is there to be seen
    assert float(with_cos.loss - without.loss) == pytest.approx(0.5 * float(cos), rel=1e-10)
    assert float(with_cos.cos) == pytest.approx(float(cos), rel=1e-10)


@pytest.mark.parametrize("name", sorted(n for n, spec in LOSSES.items() if spec.needs_teacher))
def test_every_knob_of_the_registry_row_reaches_the_loss(name):
    """The objective's divergence is the registry's per-token function with the row's knobs (temperature included:
    DRKL once silently ignored τ): a non-default value of each knob changes the loss, and the divergence term
    equals the per-token function called with the same knobs."""
    s, t, labels = _batch(seed=3)
    mask = labels != IGNORE_INDEX
    n = count_valid_tokens(labels)
    odd = {"temperature": 1.7, "k": 3, "beta": 0.5, "per_document": True, "jsd_beta": 0.2, "dkd_alpha": 0.3,
           "dkd_beta": 2.0, "gamma": 0.9, "drkl_anchor": "teacher_argmax", "skew_alpha": 0.3, "akl_mu": 0.8,
           "ab_alpha": 0.9, "ab_beta": 0.2}
    base = objective(s, labels, n, cfg=LossConfig(name=name), teacher_logits=t).div
    for knob in LOSSES[name].knobs:
        cfg = LossConfig(name=name, **{knob: odd[knob]})
        seg = torch.zeros_like(labels).index_fill_(1, torch.tensor([4, 5, 6]), 1) if knob == "per_document" else None
        got = objective(s, labels, n, cfg=cfg, teacher_logits=t, segment_ids=seg).div
        assert got != base, knob
        c = {k: v for k, v in vars(cfg).items() if k in LOSSES[name].knobs}
        direct = {"tad": lambda: losses.tad(s, t, mask, k=c["k"], beta=c["beta"], temperature=c["temperature"],
                                            segment_ids=seg if c["per_document"] else None),
                  "kd": lambda: losses.forward_kl(s, t, temperature=c["temperature"]),
                  "rkl": lambda: losses.reverse_kl(s, t, temperature=c["temperature"]),
                  "jsd": lambda: losses.jsd(s, t, beta=c["jsd_beta"], temperature=c["temperature"]),
                  "dkd": lambda: losses.dkd(s, t, labels, alpha=c["dkd_alpha"], beta=c["dkd_beta"],
                                            temperature=c["temperature"]),
                  "drkl": lambda: losses.drkl(s, t, labels, gamma=c["gamma"], anchor=c["drkl_anchor"],
                                              temperature=c["temperature"]),
                  "tvd": lambda: baselines.tvd(s, t, temperature=c["temperature"]),
                  "sym_kl": lambda: baselines.symmetric_kl(s, t, temperature=c["temperature"]),
                  "skew_kl": lambda: baselines.skew_forward_kl(s, t, alpha=c["skew_alpha"],
                                                               temperature=c["temperature"]),
                  "skew_rkl": lambda: baselines.skew_reverse_kl(s, t, alpha=c["skew_alpha"],
                                                                temperature=c["temperature"]),
                  "akl": lambda: baselines.akl(s, t, mu=c["akl_mu"], temperature=c["temperature"]),
                  "alpha_beta": lambda: baselines.ab_divergence(s, t, alpha=c["ab_alpha"], beta=c["ab_beta"],
                                                                temperature=c["temperature"])}[name]()
        want = torch.where(mask, direct, 0.0).sum() / n
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if LOSSES[n].needs_teacher])
def test_non_finite_teacher_rows_at_masked_positions_beside_a_clean_student(name):
    """Only the teacher has NaN rows at the masked positions (its padding rows; the student's are finite): the
    value and the student's gradient are exactly those of a clean teacher, 0 at the masked rows. (The test below
    spoils both sides at once, where the student's own masking zeroes the gradient: it cannot see a teacher-side
    0·NaN in a divergence's backward, e.g. kd's cd·p at a masked row.)"""
    s, t, labels = _batch(B=3, T=6, V=40, seed=9)
    masked = labels == IGNORE_INDEX
    n = count_valid_tokens(labels)
    cfg = LossConfig(name=name, k=5)

    def run(teacher):
        x = s.clone().requires_grad_(True)
        out = objective(x, labels, n, cfg=cfg, teacher_logits=teacher)
        out.loss.backward()
        return out.loss, x.grad

    clean, spoilt = run(t), run(t.masked_fill(masked[..., None], float("nan")))
    assert torch.equal(spoilt[0], clean[0])
    assert torch.equal(spoilt[1], clean[1]) and (spoilt[1][masked] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_non_finite_rows_at_masked_positions_change_nothing(name, bad):
    """Models can put NaN or ±inf at positions the loss ignores (e.g. fully masked left-padding rows of some attention
    implementations). In every row of the student's and the teacher's logits and final hidden states whose label is
    -100 they leave the value and the gradients at the valid positions exactly as they were, and the gradient there
    is 0 — on the dense path (CLM, the divergence, the hidden cosine; a top-K cache teacher too) and on the chunked one.
    The dense path gave NaN gradients there (0·NaN in the backward of the cross-entropy and of every divergence
    not masked inside its kernel; of the cosine on both paths): a single such row made the step's gradient NaN."""
    from tailkd.divergences import SparseTeacher
    from tailkd.head import Head, HeadSpec
    from tailkd.objective import chunked_objective

    s, t, labels = _batch(B=3, T=6, V=40, seed=9)
    hs, ht, w_s, w_t = _hidden_and_heads(10)
    masked = labels == IGNORE_INDEX
    n = count_valid_tokens(labels)
    cfg = LossConfig(name=name, k=5, cosine_weight=0.5 if LOSSES[name].needs_teacher else 0.0)
    lp = torch.log_softmax(t, -1)
    top = lp.topk(5, -1)  # a top-K cache of the teacher

    def spoil(x):
        return x.masked_fill(masked if x.shape == masked.shape else masked[..., None], bad)

    def dense(s, t, hs, ht, cache=None):
        x, h = s.clone().requires_grad_(True), hs.clone().requires_grad_(True)
        out = objective(x, labels, n, cfg=cfg, teacher_logits=t if cache is None else None, student_hidden=h,
                        teacher_hidden=ht, sparse_teacher=cache)
        out.loss.backward()
        return out.loss, x.grad, h.grad

    def chunked(hs, ht):
        h, w = hs.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        out = chunked_objective(h, Head(w, None, HeadSpec(40)), labels, n, cfg=cfg, teacher_hidden=ht,
                                teacher_head=Head(w_t, None, HeadSpec(40)), chunk_size=4)
        out.loss.backward()
        return out.loss, h.grad, w.grad

    def cached(s, hs, ht, top_lp, log_alpha):
        return dense(s, None, hs, ht, SparseTeacher(top.indices, top_lp, log_alpha))

    runs = [(dense, (s, t, hs, ht)), (chunked, (hs, ht))]
    if LOSSES[name].sparse:
        runs.append((cached, (s, hs, ht, top.values, lp.scatter(-1, top.indices, float("-inf")).logsumexp(-1))))
    for run, inputs in runs:
        clean = run(*inputs)
        spoilt = run(*(spoil(x) for x in inputs))
        assert torch.equal(spoilt[0], clean[0]), run
        for got, want in zip(spoilt[1:], clean[1:]):
            if want is None:  # no hidden-state term (loss clm)
                assert got is None
            elif got.shape[:2] == masked.shape:  # per position: exactly the clean gradient, 0 where masked
                assert torch.equal(got[~masked], want[~masked]) and (got[masked] == 0).all(), run
            else:  # the student head's weight
                assert torch.equal(got, want), run


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if LOSSES[n].needs_teacher])
def test_a_divergence_of_weight_zero_leaves_the_teacher_out(name):
    """loss.div_weight = 0: the teacher does not enter the step. A teacher with NaN logits (a NaN in its weights) made
    the loss NaN through 0·NaN on every path, and the step was skipped although the divergence was unused. With
    div_weight = 0 the divergence is not computed: value and gradients are bit-identical to loss clm's whatever the
    teacher (its logits, hidden states or top-K cache all NaN, cosine_weight 0: its hidden states unused too), and
    equal a float64 plain sum of the CLM. ``div`` then reads 0."""
    from tailkd.divergences import SparseTeacher
    from tailkd.head import Head, HeadSpec
    from tailkd.objective import chunked_objective

    s, t, labels = _batch(B=3, T=6, V=40, seed=11)
    hs, ht, w_s, w_t = _hidden_and_heads(12)
    n = count_valid_tokens(labels)
    nan = float("nan")
    ids = torch.randint(0, 40, (3, 6, 5), generator=torch.Generator().manual_seed(13))
    cache = SparseTeacher(ids, torch.full((3, 6, 5), nan, dtype=torch.float64), torch.full((3, 6), nan,
                                                                                          dtype=torch.float64))

    def dense(cfg, teacher, sparse=None):
        x = s.clone().requires_grad_(True)
        out = objective(x, labels, n, cfg=cfg, teacher_logits=teacher, sparse_teacher=sparse,
                        student_hidden=hs, teacher_hidden=torch.full_like(ht, nan))
        out.loss.backward()
        return out, (x.grad,)

    def chunked(cfg, teacher_hidden):
        h, w = hs.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        out = chunked_objective(h, Head(w, None, HeadSpec(40)), labels, n, cfg=cfg, teacher_hidden=teacher_hidden,
                                teacher_head=Head(w_t, None, HeadSpec(40)), chunk_size=4)
        out.loss.backward()
        return out, (h.grad, w.grad)

    zero, clm = LossConfig(name=name, k=5, div_weight=0.0), LossConfig(name="clm")
    runs = [(dense(zero, torch.full_like(t, nan)), dense(clm, None)),
            (chunked(zero, torch.full_like(ht, nan)), chunked(clm, None))]
    if LOSSES[name].sparse:
        runs.append((dense(zero, None, cache), dense(clm, None)))
    y = labels.clamp_min(0)
    want = -sum(float(torch.log_softmax(s[b, i], -1)[y[b, i]]) for b in range(3) for i in range(6)
                if labels[b, i] != IGNORE_INDEX) / n  # float64 plain sum of <= 18 terms: ~1e-15 relative
    for (got, got_grads), (ref, ref_grads) in runs:
        assert torch.equal(got.loss, ref.loss) and float(got.div) == 0.0, name
        assert all(torch.equal(a, b) for a, b in zip(got_grads, ref_grads)), name
    assert float(runs[0][0][0].loss.detach()) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name,knobs,match", [("kd", {"temperature": 2.0}, "temperature must be 1"),
                                              ("rkl", {}, "cannot be computed from a top-K teacher cache")])
def test_a_cache_teacher_refuses_what_it_cannot_give_on_both_paths(name, knobs, match):
    """A top-K cache holds log-probs at τ = 1 and only the top-K form of kd / tad: the dense objective refuses another
    temperature or loss as the chunked one does (one check, `registry.Divergence.check_sparse`); the dense path
    computed τ = 1 silently for a loss.temperature of 2."""
    from tailkd.divergences import SparseTeacher
    from tailkd.errors import TailkdError
    from tailkd.head import Head, HeadSpec
    from tailkd.objective import chunked_objective

    s, t, labels = _batch(B=2, T=5, V=30, seed=3)
    top = torch.log_softmax(t, -1).topk(4, -1)
    cache = SparseTeacher(top.indices, top.values, torch.full(labels.shape, -3.0))
    cfg = LossConfig(name=name, k=4, **knobs)
    n = count_valid_tokens(labels)
    with pytest.raises(TailkdError, match=match):
        objective(s, labels, n, cfg=cfg, sparse_teacher=cache)
    with pytest.raises(TailkdError, match=match):
        chunked_objective(torch.randn(2, 5, 6), Head(torch.randn(30, 6), None, HeadSpec(30)), labels, n, cfg=cfg,
                          sparse_teacher=cache)


def test_step_terms_refuses_the_cosine_term_without_the_teachers_hidden_states():
    """A dense teacher signal with logits but without hidden states (an `OnlineTeacher` built through the API
    without want_hidden) and loss.cosine_weight > 0: step_terms' TailkdError naming the fix, not objective's plain
    ValueError after the student's forward (its check refused only a signal with neither)."""
    from conftest import TINY_VOCAB, make_tiny_lm

    from tailkd.errors import TailkdError
    from tailkd.teacher import OnlineTeacher

    student, teacher = make_tiny_lm(seed=0, num_hidden_layers=2), make_tiny_lm(seed=1)
    ids = torch.randint(0, TINY_VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()}
    signal = OnlineTeacher(teacher, TINY_VOCAB, fused_path=False)(batch)
    assert signal.logits is not None and signal.hidden is None
    with pytest.raises(TailkdError, match=r"^loss\.cosine_weight > 0 needs the teacher's hidden states"):
        step_terms(student, batch, signal, count_valid_tokens(batch["labels"]),
                   LossConfig(name="kd", cosine_weight=0.5), vocab_size=TINY_VOCAB, fused_path=False)


@pytest.mark.parametrize("fused_path", [False, True])
def test_step_terms_cosine_term_compares_the_last_hidden_states(fused_path):
    """A trainer step with loss.cosine_weight > 0 (online teacher with want_hidden, as `prepare` builds it) on either
    loss layer: the cos term is Σ over valid tokens of 1 − cos(h_S, h_T) between the two models' final hidden states
    (after the final norm), / the count, and the loss carries it with its weight. Reference: plain float64 dot
    products over the base models' last_hidden_state, token by token; float64 throughout (u ≈ 1.1e-16, 64-term dot
    products, ≤ 20 tokens, 1 − cos away from 0 for these random models): rel 1e-10 is far above the rounding."""
    from conftest import TINY_VOCAB, make_tiny_lm

    from tailkd.teacher import OnlineTeacher

    student = make_tiny_lm(seed=0, num_hidden_layers=2).double()
    teacher = make_tiny_lm(seed=1).double()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, TINY_VOCAB, (2, 11), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :3] = labels[1, 7:] = IGNORE_INDEX
    batch = {"input_ids": ids[:, :-1], "labels": labels}
    n = count_valid_tokens(labels)

    def run(weight):
        cfg = LossConfig(name="kd", cosine_weight=weight)
        signal = OnlineTeacher(teacher, TINY_VOCAB, fused_path=fused_path, want_hidden=weight > 0)(batch)
        return step_terms(student, batch, signal, n, cfg, vocab_size=TINY_VOCAB, fused_path=fused_path)

    with torch.no_grad():
        h_s = student.model(input_ids=batch["input_ids"]).last_hidden_state
        h_t = teacher.model(input_ids=batch["input_ids"]).last_hidden_state
    want = sum(1 - float(h_s[b, t] @ h_t[b, t]) / float(h_s[b, t].norm() * h_t[b, t].norm())
               for b in range(2) for t in range(10) if labels[b, t] != IGNORE_INDEX) / n
    with_cos, without = run(0.5), run(0.0)
    assert float(with_cos.cos) == pytest.approx(want, rel=1e-10)
    assert float(with_cos.loss.detach() - without.loss.detach()) == pytest.approx(0.5 * want, rel=1e-8)


def test_chunked_kd_against_a_cache_with_every_tail_id_is_exact_kd():
    """KD against a top-K cache whose tail points are every id outside the top 5 with its true weight p_i is KL(p‖q)
    exactly (D_KL1 + 1·(Σ_j p_j log(p_j/q_j) − α^T log(α^T/α^S))): the chunked layer's KD row weight is log w = 0
    (w = 1) for the tail points, as the dense path's `sparse_per_token`, so its values and gradients equal the dense
    KD against the full teacher logits. float64, the same sums in another order: rel 1e-10 (u64 ~ 1e-16 times a few
    dozen terms). Dropping the row weight (the tail points ignored: D_KL1 alone) survived (mutation audit)."""
    from tailkd.divergences import SparseTeacher
    from tailkd.head import Head, HeadSpec
    from tailkd.objective import chunked_objective

    _, _, labels = _batch(B=3, T=6, V=40, seed=12)
    hs, ht, w_s, w_t = _hidden_and_heads(12)
    t = ht @ w_t.T
    ranked = torch.log_softmax(t, -1).topk(40, -1)
    ids, vals = ranked.indices, ranked.values
    cache = SparseTeacher(ids[..., :5], vals[..., :5], vals[..., 5:].logsumexp(-1), ids[..., 5:], vals[..., 5:],
                          vals[..., 5:])
    n, cfg = count_valid_tokens(labels), LossConfig(name="kd")
    x = hs.clone().requires_grad_(True)
    ref = objective(x @ w_s.T, labels, n, cfg=cfg, teacher_logits=t)
    ref.loss.backward()
    h = hs.clone().requires_grad_(True)
    got = chunked_objective(h, Head(w_s, None, HeadSpec(40)), labels, n, cfg=cfg, sparse_teacher=cache, chunk_size=4)
    got.loss.backward()
    for a, b in ((got.loss, ref.loss), (got.div, ref.div), (h.grad, x.grad)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- a mixture's router load-balancing term

def _mixture(seed=0, **config):
    """A tiny float64 Mixtral (4 experts, 2 per token) whose config asks for the router load-balancing loss."""
    import transformers

    cfg = transformers.MixtralConfig(**{
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True,
        "router_aux_loss_coef": 0.25, **config})
    torch.manual_seed(seed)
    # eager experts: torch's grouped matmul (transformers' default) takes no float64
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64,
                                                         experts_implementation="eager").train()


def _shifted(ids):
    """tailkd's labels (shifted once by the data pipeline): the next token, -100 after a row's last."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    return labels


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused_path", [True, False])
def test_router_term_is_the_models_own_loss_term(fused_path):
    """A student whose config sets output_router_logits: the CLM step's loss is transformers' own training loss
    (mean CE + router_aux_loss_coef * aux_loss), value and gradient, on the fused layer as on full logits.
    Reference: that formula written out in float64 from the model's own logits and aux_loss (the two differ by the
    order of a few hundred additions, ~1e-15 relative; 1e-10 is far above); and transformers' own loss, whose cross
    entropy runs in float32 (logits of |z| < 2 rounded to 2^-24: < 1e-6 on the mean; 1e-5 absolute)."""
    model = _mixture()
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, use_cache=False)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)) + 0.25 * out.aux_loss
    assert want.dtype == torch.float64
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        own = model(input_ids=ids, labels=ids, use_cache=False).loss  # shifts the labels itself
    labels = _shifted(ids)
    terms = step_terms(model, {"input_ids": ids, "labels": labels}, None, count_valid_tokens(labels),
                       LossConfig(name="clm"), vocab_size=64, fused_path=fused_path)
    terms.loss.backward()
    torch.testing.assert_close(terms.loss, want.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(terms.loss.float(), own, rtol=0, atol=1e-5)
    # transformers computes aux_loss in float32 (its softmax of the router logits), even for a float64 model
    torch.testing.assert_close(terms.aux, 0.25 * out.aux_loss.detach().double(), rtol=1e-10, atol=0)
    assert terms.aux > 0.1  # aux_loss = E * sum of routed fractions times mean probabilities: ~k = 2 when near uniform
    torch.testing.assert_close(terms.loss, terms.clm + terms.aux, rtol=1e-12, atol=0)
    got = _grads(model)
    assert got.keys() == want_grads.keys() and any("mlp.gate" in name for name in got)
    for name, g in want_grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12 * float(g.abs().max()), msg=name)


def test_router_term_of_micro_batches_is_weighted_by_their_valid_tokens():
    """Two micro-batches of one step: each adds coef * its aux_loss * its valid tokens / the step's valid tokens
    (one micro-batch: the model's own term); a student without the setting, or a dense one, adds nothing."""
    model = _mixture()
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(2))
    labels = _shifted(ids)
    labels[2:, :5] = IGNORE_INDEX  # the second micro-batch has fewer valid tokens
    n = count_valid_tokens(labels)
    parts = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]
    aux = []
    for part_ids, part_labels in parts:
        terms = step_terms(model, {"input_ids": part_ids, "labels": part_labels}, None, n, LossConfig(name="clm"),
                           vocab_size=64, fused_path=True)
        with torch.no_grad():
            own = model(input_ids=part_ids, use_cache=False).aux_loss
        torch.testing.assert_close(terms.aux, 0.25 * own.double() * count_valid_tokens(part_labels) / n, rtol=1e-10,
                                   atol=0)
        aux.append(float(terms.aux))
    assert count_valid_tokens(parts[1][1]) < count_valid_tokens(parts[0][1]) and aux[0] != aux[1]
    for off in (_mixture(output_router_logits=False), _mixture(router_aux_loss_coef=0.0)):
        terms = step_terms(off, {"input_ids": ids, "labels": labels}, None, n, LossConfig(name="clm"),
                           vocab_size=64, fused_path=True)
        assert float(terms.aux) == 0.0 and torch.equal(terms.loss, terms.clm)


def _load_balancing_reference(router_logits, keep, top_k):
    """Mixtral's (Switch Transformer's) load-balancing loss over the kept positions, written as plain float64 sums:
    E * sum_e f_e * P_e, f_e = the share of (layer, kept token) pairs whose top-k holds expert e, P_e = the mean
    router probability of e over the same pairs."""
    probs = [torch.softmax(g.double(), dim=-1)[keep] for g in router_logits]  # per layer: (n_kept, E)
    n, num_experts = sum(p.shape[0] for p in probs), probs[0].shape[1]
    total = 0.0
    for e in range(num_experts):
        f_e = sum(float((p.topk(top_k, dim=-1).indices == e).any(-1).sum()) for p in probs) / n
        total = total + f_e * sum(p[:, e].sum() for p in probs) / n
    return num_experts * total


@pytest.mark.parametrize("fused_path", [True, False])
def test_router_term_of_padded_rows_keeps_the_padding_out(fused_path):
    """Right-padded rows (SFT, on-policy: ``attention_mask`` 0 on the padding): the router term's statistics are
    those of the real tokens alone, value and gradient; the real tokens' CE is unchanged (causal attention never
    sees the padding). Reference: the load-balancing formula as plain float64 sums over the real positions of an
    unmasked forward's router logits; transformers sums in float32 (n <= 2 layers x 33 tokens = 66 terms of
    each of its two sums: <= 66 x 2^-24 ~ 4e-6 relative each, ~8e-6 for their product: rtol 1e-5). Its gradient
    passes the float32 sums (1e-7 relative of the router part): atol 1e-6 x the largest entry."""
    model = _mixture()
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(4))
    real = torch.tensor([11, 7, 4])  # real tokens per row; the rest is padding
    mask = (torch.arange(11) < real[:, None]).long()
    labels = _shifted(ids)
    labels[mask == 0] = IGNORE_INDEX
    labels[torch.arange(3), real - 1] = IGNORE_INDEX  # a row's last real token has no next token
    labels[1, :2] = IGNORE_INDEX  # a prompt: real tokens without a label, routed all the same
    out = model(input_ids=ids, use_cache=False)  # no mask: the real tokens' outputs are the same
    keep = mask.reshape(-1).bool()
    aux_ref = _load_balancing_reference(out.router_logits, keep, top_k=2)
    valid = labels != IGNORE_INDEX
    want = F.cross_entropy(out.logits[valid], labels[valid]) + 0.25 * aux_ref
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    terms = step_terms(model, batch, None, count_valid_tokens(labels), LossConfig(name="clm"), vocab_size=64,
                       fused_path=fused_path)
    terms.loss.backward()
    torch.testing.assert_close(terms.aux, 0.25 * aux_ref.detach(), rtol=1e-5, atol=0)
    # over every position (the padding's routing included) the term would be another number
    assert abs(float(out.aux_loss.detach()) - float(aux_ref.detach())) > 1e-3 * float(aux_ref.detach())
    torch.testing.assert_close(terms.loss, want.detach(), rtol=1e-5, atol=0)
    got = _grads(model)
    assert got.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=1e-6 * float(g.abs().max()), msg=name)


def test_only_the_router_term_of_padded_rows_hands_the_student_a_mask():
    """The attention mask reaches the student's forward only where it matters: the router term on and a row padded.
    A dense student, a mixture without the term, or full rows keep the unmasked (causal) attention kernel."""
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    labels = _shifted(ids)
    padded = torch.ones_like(ids)
    padded[1, 6:] = 0
    labels[1, 5:] = IGNORE_INDEX
    for model, mask, handed in ((_mixture(), padded, True), (_mixture(), torch.ones_like(ids), False),
                                (_mixture(output_router_logits=False), padded, False),
                                (_mixture(router_aux_loss_coef=0.0), padded, False)):
        seen = []
        hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append("attention_mask" in kwargs),
                                               with_kwargs=True)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        for fused_path in (True, False):
            step_terms(model, batch, None, count_valid_tokens(labels), LossConfig(name="clm"), vocab_size=64,
                       fused_path=fused_path, host_batch={k: v.clone() for k, v in batch.items()})
        hook.remove()
        assert seen == [handed, handed]
