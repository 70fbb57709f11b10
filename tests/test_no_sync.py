"""The training step asks the device nothing per micro-batch (issue 12): the fused layer plans its chunks from the
host's labels, the teacher runs in its own dtype, the loss terms are read once per step.

On the CPU the `meta` device stands in for an accelerator: a meta tensor has a shape and no data, so anything that
reads device data on the host (``.item()``, ``bool()``, ``nonzero``, ``.tolist()``) raises on it. A plan computed
from host labels for meta hidden states therefore proves that the plan reads no device data. On CUDA,
``torch.cuda.set_sync_debug_mode("error")`` checks the whole fused step (skipped without a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

from tailkd import fused
from tailkd.config import LossConfig
from tailkd.divergences import SparseTeacher
from tailkd.head import Head, HeadSpec
from tailkd.objective import IGNORE_INDEX
from tailkd.registry import bind

V, D = 37, 8


def _labels_and_segments(B=3, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = IGNORE_INDEX
    labels[1, :4] = IGNORE_INDEX
    seg = (torch.rand(B, T, generator=g) < 0.25).long().cumsum(1)  # packed documents
    return labels, seg


def _plan(cfg, labels, seg, device, chunk, sparse_k=None):
    """`fused._prepare` with hidden states, heads (and a top-K teacher) on ``device``; labels as given."""
    B, T = labels.shape
    g = torch.Generator().manual_seed(1)
    hs, ht = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    w = torch.randn(V, D, generator=g)
    head = Head(w.to(device), None, HeadSpec(V))
    sparse = None
    if sparse_k:
        ids = torch.stack([torch.randperm(V, generator=g)[:sparse_k] for _ in range(B * T)]).view(B, T, sparse_k)
        lp = torch.log_softmax(torch.randn(B, T, sparse_k + 1, generator=g), -1)
        sparse = SparseTeacher(ids.to(device), lp[..., :-1].to(device), lp[..., -1].to(device))
        return fused._prepare(hs.to(device), head, labels, bind(cfg), None, None, sparse, seg, None, chunk, None)[1]
    return fused._prepare(hs.to(device), head, labels, bind(cfg), ht.to(device), head, None, seg, None, chunk,
                          None)[1]


@pytest.mark.parametrize("cfg,chunk", [
    (LossConfig(name="kd"), 4),
    (LossConfig(name="tad", k=4), 9),  # every row whole in one chunk: ᾱ inside the chunks
    (LossConfig(name="tad", k=4, per_document=True), 9),  # packed documents
    (LossConfig(name="jsd"), 7),
])
def test_plan_from_host_labels_reads_no_device_data(cfg, chunk):
    """The plan of meta hidden states from host labels: no device read, and the same chunks, chunk-local sequences
    and ᾱ layout as the plan of the same inputs all on the CPU."""
    labels, seg = _labels_and_segments()
    host = _plan(cfg, labels, seg, "cpu", chunk)  # (sequences cut by chunks need the statistics pass, which reads
    # teacher rows: on CUDA by the Triton kernel, checked by test_cuda_fused_step_never_synchronises)
    meta = _plan(cfg, labels, seg, "meta", chunk)
    assert meta.chunks == host.chunks and len(meta.chunks) > 1
    assert meta.labels.device.type == "meta" and torch.equal(host.labels, labels[labels != IGNORE_INDEX])
    assert {a: n for a, (_, n) in meta.local.items()} == {a: n for a, (_, n) in host.local.items()}
    for a, (local, _) in meta.local.items():
        assert local.device.type == "meta" and local.shape == host.local[a][0].shape
    if cfg.name == "tad":
        assert meta.log_abar.device.type == "meta" and torch.isnan(host.log_abar).all()
        # chunk-local sequence ids: equal tokens share an id exactly when they share a sequence
        seq_of = (torch.arange(labels.shape[0])[:, None] * 100 + (seg if cfg.per_document else 0))
        seq_of = seq_of.expand_as(labels)[labels != IGNORE_INDEX]
        for a, b in host.chunks:
            local = host.local[a][0]
            assert torch.equal(local[:, None] == local[None], seq_of[a:b, None] == seq_of[None, a:b])


def test_sparse_plan_from_host_labels_reads_no_device_data():
    """A top-K cache's teacher on the device, labels on the host: ᾱ from the cached α^T without a device read."""
    labels, seg = _labels_and_segments()
    cfg = LossConfig(name="tad", k=3, per_document=True)
    host = _plan(cfg, labels, seg, "cpu", 4, sparse_k=3)
    meta = _plan(cfg, labels, seg, "meta", 4, sparse_k=3)
    assert meta.chunks == host.chunks and meta.log_abar.device.type == "meta" and not torch.isnan(host.log_abar).any()


def test_device_labels_would_read_device_data():
    """The detector works: the same plan with the labels on the (meta) device must read them, and fails."""
    labels, seg = _labels_and_segments()
    with pytest.raises((RuntimeError, NotImplementedError)):
        _plan(LossConfig(name="kd"), labels.to("meta"), seg.to("meta"), "meta", 4)


@pytest.mark.parametrize("weights,expect_autocast", [(torch.bfloat16, False), (torch.float32, True)])
def test_online_teacher_in_the_autocast_dtype_runs_without_autocast(weights, expect_autocast):
    """A teacher whose weights are all bf16 runs its bf16 forward without autocast's dispatch; an fp32 teacher
    under bf16 autocast still autocasts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tailkd.teacher import OnlineTeacher

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2)).to(weights).eval()
    seen = []
    teacher.model.layers[0].register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    signal = OnlineTeacher(teacher, teacher.config.vocab_size, fused_path=True,
                           autocast_dtype=torch.bfloat16)({"input_ids": torch.tensor([[1, 2, 3, 4]])})
    assert seen == [expect_autocast]
    if weights == torch.bfloat16:
        assert signal.hidden.dtype == torch.bfloat16


# the Triton kernels run compiled on CUDA tensors, or interpreted on CPU ones (conftest sets TRITON_INTERPRET=1 only
# where no CUDA device is visible)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_teacher_tail_mass_by_the_statistics_kernel_equals_torch(triton_kernels):
    """log α^T of the statistics pass for cut sequences: the Triton statistics kernel (interpreter) equals the torch
    top-K split. Both are float32 log-sum-exps over V = 37 logits of size <= ~15: |Δ log α| <= ~10 roundings of
    2^-24 x 15 ~ 1e-5 each, 2e-5 apart."""
    kernels = triton_kernels
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(50, D, generator=g) * 1.5).to(KERNEL_DEVICE)
    head = Head(torch.randn(V, D, generator=g).to(KERNEL_DEVICE), torch.randn(V, generator=g).to(KERNEL_DEVICE),
                HeadSpec(V, softcap=15.0))
    cfg = LossConfig(name="tad", k=5)
    d = bind(cfg)
    ref = fused.teacher_log_tail_mass(h, head, d.kernel, chunk_size=16)
    got = fused.teacher_log_tail_mass(h, head, d.kernel, chunk_size=16, triton=kernels.losses_for(d))
    assert ref.dtype == got.dtype == torch.float64 and torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)


def test_teacher_tail_mass_reads_bf16_teacher_logits(triton_kernels, monkeypatch):
    """A bf16 teacher with a plain head (no bias, no transform, τ = 1): the statistics kernel reads its bf16 logits as
    the matmul wrote them (no float32 copy); they are exact in float32, so α^T equals the torch path's on the float32
    copy within the bound above (log α^T)."""
    kernels = triton_kernels
    g = torch.Generator().manual_seed(4)
    h = (torch.randn(50, D, generator=g) * 1.5).to(KERNEL_DEVICE, torch.bfloat16)
    head = Head(torch.randn(V, D, generator=g).to(KERNEL_DEVICE, torch.bfloat16), None, HeadSpec(V))
    d = bind(LossConfig(name="tad", k=5))
    seen, row_stats = [], kernels.row_stats
    monkeypatch.setattr(kernels, "row_stats", lambda s, t, k, **kw: seen.append(t.dtype) or row_stats(s, t, k, **kw))
    ref = fused.teacher_log_tail_mass(h, head, d.kernel, chunk_size=16)
    got = fused.teacher_log_tail_mass(h, head, d.kernel, chunk_size=16, triton=kernels.losses_for(d))
    assert seen and set(seen) == {torch.bfloat16}
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["kd", "tad"])
@pytest.mark.parametrize("cached", [False, True])
def test_cuda_fused_step_never_synchronises(name, cached):
    """Forward + backward of the fused layer on CUDA (Triton row kernels, TAD sequences cut by chunks; or a top-K
    cache teacher with tail points) from host labels: torch raises on any host-device synchronisation."""
    from tailkd.objective import chunked_objective

    labels, seg = _labels_and_segments(B=4, T=64)
    g = torch.Generator().manual_seed(2)
    hs = torch.randn(4, 64, D, generator=g).cuda().requires_grad_(True)
    ht = torch.randn(4, 64, D, generator=g).cuda()
    w = torch.randn(V, D, generator=g).cuda().requires_grad_(True)
    cfg = LossConfig(name=name, k=4, per_document=True)
    teacher = dict(teacher_hidden=ht, teacher_head=Head(w.detach(), None, HeadSpec(V)))
    if cached:
        perm = torch.stack([torch.randperm(V, generator=g)[:6] for _ in range(4 * 64)]).view(4, 64, 6)
        ids, tail = perm[..., :4], perm[..., 4:]  # 𝒦 and two tail points outside it
        lp = torch.log_softmax(torch.randn(4, 64, 5, generator=g), -1)
        tw = (lp[..., -1:].exp() / 2).expand(-1, -1, 2)  # α^T / J each
        teacher = dict(sparse_teacher=SparseTeacher(*(x.contiguous().cuda() for x in (
            ids, lp[..., :-1], lp[..., -1], tail, lp[..., -1:].expand(-1, -1, 2) - math.log(8), tw))))
    chunked_objective(hs, Head(w, None, HeadSpec(V)), labels, 100, cfg=cfg, segment_ids=seg, chunk_size=48,
                      **teacher)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = chunked_objective(hs, Head(w, None, HeadSpec(V)), labels, 100, cfg=cfg, segment_ids=seg,
                                  chunk_size=48, **teacher)
        terms.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(float(terms.loss))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["kd", "tad"])
def test_cuda_bf16_logits_step_never_synchronises(name):
    """The same with bf16 head matmuls and a bf16 teacher head, where the kernels read both sides' logits as the
    matmuls wrote them and G is written over the student's (`fused._low_logits`, training's path on a GPU)."""
    from tailkd.objective import chunked_objective

    labels, seg = _labels_and_segments(B=4, T=64)
    g = torch.Generator().manual_seed(2)
    hs = torch.randn(4, 64, D, generator=g).cuda().bfloat16().requires_grad_(True)
    ht = torch.randn(4, 64, D, generator=g).cuda().bfloat16()
    w = torch.randn(V, D, generator=g).cuda().requires_grad_(True)
    cfg = LossConfig(name=name, k=4, per_document=True)
    kw = dict(cfg=cfg, segment_ids=seg, chunk_size=48, teacher_hidden=ht, matmul_dtype=torch.bfloat16,
              teacher_head=Head(w.detach().bfloat16(), None, HeadSpec(V)))
    chunked_objective(hs, Head(w, None, HeadSpec(V)), labels, 100, **kw)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = chunked_objective(hs, Head(w, None, HeadSpec(V)), labels, 100, **kw)
        terms.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(float(terms.loss))
