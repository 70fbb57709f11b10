"""The public API for one's own training loop: the README's HF `Trainer` example runs, and `tailkd.distill_loss`
equals `tailkd distill`'s loss on the same batch."""

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_lm

import tailkd
from tailkd.config import FUSED_MODES, LossConfig
from tailkd.objective import count_valid_tokens, step_terms
from tailkd.teacher import OnlineTeacher

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The README's python block that holds ``# tailkd: trainer-example``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    (block,) = [b for b in blocks if "# tailkd: trainer-example" in b]
    return block


def _models(pad: int = 0):
    """float64 tiny teacher and student; ``pad`` extra head rows beyond the TINY_VOCAB ids (as Qwen pads its head)."""
    teacher = make_tiny_lm("llama", seed=1, vocab_size=TINY_VOCAB + pad).double()
    student = make_tiny_lm("llama", seed=2, num_hidden_layers=2, vocab_size=TINY_VOCAB + pad).double()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY_VOCAB, (3, 12), generator=g)
    return teacher, student, ids


def _trainer_class():
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102 - our own README's example
    return namespace["DistillTrainer"]


@pytest.mark.parametrize("loss,knobs,pad", [("tad", {"k": 5, "beta": 2.0}, 0), ("kd", {}, 0),
                                            ("jsd", {"jsd_beta": 0.3}, 0), ("drkl", {"gamma": 0.4}, 0),
                                            ("tad", {"k": 3, "clm_weight": 0.0}, 0), ("tad", {"k": 5}, 6)])
def test_readme_trainer_example_equals_tailkd_distill_loss(tmp_path, loss, knobs, pad):
    """pad: heads of TINY_VOCAB + 6 rows; the example's model_head(model, V) keeps the padding out of the softmax."""
    from transformers import TrainingArguments

    teacher, student, ids = _models(pad)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=3)
    trainer = _trainer_class()(model=student, args=args, teacher=teacher, vocab_size=TINY_VOCAB, loss=loss,
                               loss_knobs=knobs)
    got = trainer.compute_loss(student, {"input_ids": ids, "labels": ids.clone()})

    # tailkd distill on the same batch: labels shifted once by the data pipeline, the online teacher, the same
    # objective (dense path here: a different code path from the example's chunked one)
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    batch = {"input_ids": ids, "labels": labels}
    cfg = LossConfig(name=loss, **knobs)
    signal = OnlineTeacher(teacher, TINY_VOCAB, fused_path=False)(batch)
    want = step_terms(student, batch, signal, count_valid_tokens(labels), cfg, vocab_size=TINY_VOCAB,
                      fused_path=False)
    torch.testing.assert_close(got, want.loss, rtol=1e-10, atol=1e-12)  # float64 models: two exact paths agree
    got.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters() if p.requires_grad)


def test_distill_loss_normalises_by_the_count_it_is_given():
    teacher, student, ids = _models()
    from tailkd.head import final_hidden

    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    h_s, h_t = final_hidden(student, ids), final_hidden(teacher, ids)
    w_s, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    own = tailkd.distill_loss(h_s, w_s, h_t, w_t, labels, loss="kd")
    n = count_valid_tokens(labels)
    global_count = tailkd.distill_loss(h_s, w_s, h_t, w_t, labels, loss="kd", num_valid_tokens=4 * n)
    torch.testing.assert_close(global_count.loss * 4, own.loss, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="shared vocabulary"):
        tailkd.distill_loss(h_s, w_s, h_t, w_t[:-1], labels)


def test_distill_loss_normalises_tad_per_document_of_its_segment_ids():
    """distill_loss passes ``segment_ids`` on to the chunked layer: with ``per_document=True`` TAD's β(X) averages over
    each document of a packed row, as the dense objective does on the same logits (two float64 paths of one sum:
    rtol 1e-10), which differs from the per-row loss; without ``per_document`` the segment ids change nothing."""
    from tailkd.head import final_hidden
    from tailkd.objective import objective

    teacher, student, ids = _models()
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    seg = (torch.arange(ids.shape[1]) >= 5).long().expand_as(ids)  # two documents per row: tokens 0-4 and 5-11
    h_s, h_t = final_hidden(student, ids), final_hidden(teacher, ids)
    w_s, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    knobs = {"k": 4, "beta": 0.5, "per_document": True}
    got = tailkd.distill_loss(h_s, w_s, h_t, w_t, labels, loss="tad", segment_ids=seg, chunk_size=7, **knobs)
    n = count_valid_tokens(labels)
    want = objective(h_s @ w_s.T, labels, n, cfg=LossConfig(name="tad", **knobs), teacher_logits=h_t @ w_t.T,
                     segment_ids=seg)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-10, atol=0)
    rows = tailkd.distill_loss(h_s, w_s, h_t, w_t, labels, loss="tad", chunk_size=7, **knobs)
    assert not torch.allclose(rows.div, got.div, rtol=1e-6, atol=0)
    plain = {**knobs, "per_document": False}
    with_ids = tailkd.distill_loss(h_s, w_s, h_t, w_t, labels, loss="tad", segment_ids=seg, **plain)
    torch.testing.assert_close(with_ids.loss, tailkd.distill_loss(h_s, w_s, h_t, w_t, labels, loss="tad",
                                                                  **plain).loss, rtol=0, atol=0)


def test_a_fused_step_under_autocast_runs_the_head_matmuls_in_the_autocast_dtype():
    """step_terms on the fused path with ``autocast_dtype`` bf16 (a training step where the hardware has bf16): the
    chunked layer's head matmuls run in bf16, as the dense path's head does under autocast — the loss equals
    chunked_objective with ``matmul_dtype=bf16`` on the same final hidden states bit for bit (one computation), and
    differs from the float32 matmuls' (bf16 rounds the logits by up to 2^-9 relative)."""
    from tailkd.head import final_hidden, model_head
    from tailkd.objective import chunked_objective

    teacher, student, ids = _models()
    teacher, student = teacher.float(), student.float()
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    batch, cfg, n = {"input_ids": ids, "labels": labels}, LossConfig(name="kd"), count_valid_tokens(labels)
    signal = OnlineTeacher(teacher, TINY_VOCAB, fused_path=True)(batch)
    got = step_terms(student, batch, signal, n, cfg, vocab_size=TINY_VOCAB, fused_path=True,
                     autocast_dtype=torch.bfloat16, chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_s = final_hidden(student, ids)

    def layer(mm):
        return chunked_objective(h_s, model_head(student, TINY_VOCAB), labels, n, cfg=cfg, teacher_hidden=signal.hidden,
                                 teacher_head=signal.head, chunk_size=5, matmul_dtype=mm).loss

    assert torch.equal(got.loss, layer(torch.bfloat16))
    assert not torch.equal(got.loss, layer(None))


def test_distill_loss_adds_the_biases_given_beside_bare_weights():
    """``student_bias`` / ``teacher_bias`` beside bare weights enter the logits, z = h Wᵀ + b: the value equals plain
    float64 sums of CE(q_t, y_t) + KL(p_t‖q_t) over the valid tokens, / their count, from those logits. Error bound:
    float64 (u ≈ 1.1e-16) over dot products of 8–12 terms and sums of ≤ 30-term softmaxes and 8 tokens, values O(10):
    ≪ 1e-12 relative. The biases (scale 2) move the loss by far more than that."""
    g = torch.Generator().manual_seed(5)
    h_s, h_t = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 5, 12, generator=g,
                                                                                  dtype=torch.float64)
    w_s, w_t = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randn(30, 12, generator=g,
                                                                                dtype=torch.float64)
    b_s, b_t = 2 * torch.randn(30, generator=g, dtype=torch.float64), 2 * torch.randn(30, generator=g,
                                                                                      dtype=torch.float64)
    labels = torch.randint(0, 30, (2, 5), generator=g)
    labels[0, :2] = labels[1, 4] = -100
    got = tailkd.distill_loss(h_s, w_s, h_t, w_t, labels, loss="kd", student_bias=b_s, teacher_bias=b_t)
    total, n = 0.0, 0
    for b in range(2):
        for t in range(5):
            if labels[b, t] == -100:
                continue
            log_q = torch.log_softmax(h_s[b, t] @ w_s.T + b_s, -1)
            log_p = torch.log_softmax(h_t[b, t] @ w_t.T + b_t, -1)
            total += -float(log_q[labels[b, t]]) + float((log_p.exp() * (log_p - log_q)).sum())
            n += 1
    assert float(got.loss) == pytest.approx(total / n, rel=1e-12)
    unbiased = tailkd.distill_loss(h_s, w_s, h_t, w_t, labels, loss="kd")
    assert abs(float(unbiased.loss) - total / n) > 1e-2


def _padded_rows():
    """4 rows of 12 tokens, left-padded to different lengths (attention_mask 0 and label -100 on the padding): each
    micro-batch of 1 or 2 rows has its own count of valid labels."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for pad in (0, 7, 3, 9):
        ids = torch.randint(1, TINY_VOCAB, (12,), generator=g)
        mask = (torch.arange(12) >= pad).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})
    return rows


def test_readme_trainer_example_step_is_the_same_under_gradient_accumulation(tmp_path):
    """One SGD step (lr 1, no clipping, float64) over the same 4 rows as 1 × 4, 2 × 2 and 4 × 1 accumulated
    micro-batches: Trainer passes the step's count (num_items_in_batch) and the example normalises by it, so the
    updates agree to float64 rounding (a per-micro-batch mean would weigh the rows differently and, with Trainer
    not dividing a loss it takes as normalised, scale the update by the accumulation count)."""
    from transformers import TrainingArguments

    rows = _padded_rows()
    updated = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        teacher, student, _ = _models()
        before = [p.detach().clone() for p in student.parameters()]
        args = TrainingArguments(output_dir=str(tmp_path / f"b{batch}"), use_cpu=True, report_to=[], max_steps=1,
                                 per_device_train_batch_size=batch, gradient_accumulation_steps=accum, optim="sgd",
                                 learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0,
                                 max_grad_norm=0.0, save_strategy="no", logging_strategy="no", disable_tqdm=True)
        trainer = _trainer_class()(model=student, args=args, teacher=teacher, vocab_size=TINY_VOCAB,
                                   train_dataset=rows, loss="tad", loss_knobs={"k": 5})
        trainer.train()
        updated.append([p.detach() - b for p, b in zip(student.parameters(), before)])
    assert any(u.abs().max() > 1e-3 for u in updated[0])  # the step moved the weights
    for other in updated[1:]:
        for want, got in zip(updated[0], other):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)  # float64: summation order only


def test_readme_trainer_example_evaluates(tmp_path):
    """trainer.evaluate(): Trainer's prediction step takes compute_loss(..., return_outputs=True); eval_loss is the
    loss of the batch, normalised by its own count of valid labels."""
    from transformers import TrainingArguments

    teacher, student, _ = _models()
    rows = _padded_rows()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=4,
                             disable_tqdm=True)
    trainer = _trainer_class()(model=student, args=args, teacher=teacher, vocab_size=TINY_VOCAB, eval_dataset=rows)
    got = trainer.evaluate()["eval_loss"]
    batch = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
    with torch.no_grad():
        want = trainer.compute_loss(student, batch).item()
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("knobs,needle", [({"temperature": -1.0}, "temperature=-1.0"), ({"temperature": 0.0},
                                          "temperature=0.0"), ({"jsd_beta": 1.5}, "jsd_beta=1.5"),
                                          ({"beta": float("nan")}, "beta=nan"), ({"beta": -1.0}, "beta=-1.0"),
                                          ({"k": 5.0}, "k=5.0"), ({"k": 0}, "k=0"), ({"clm_weight": -1}, "clm_weight"),
                                          ({"div_weight": float("inf")}, "div_weight"),
                                          ({"drkl_anchor": "argmax"}, "drkl_anchor"), ({"K": 3}, "K: not a knob")])
def test_distill_loss_refuses_a_knob_out_of_range_as_the_dense_objective_does(knobs, needle):
    """The chunked path calls the row kernels directly: without LossConfig.check it ran on (temperature -1: a value,
    jsd_beta 1.5: NaN, temperature 0: ZeroDivisionError, k 5.0: topk's TypeError)."""
    from tailkd.objective import objective

    teacher, student, ids = _models()
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    h_s, h_t = tailkd.head.final_hidden(student, ids), tailkd.head.final_hidden(teacher, ids)
    w_s, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    loss = "jsd" if "jsd_beta" in knobs else "drkl" if "drkl_anchor" in knobs else "tad"
    with pytest.raises(ValueError, match=re.escape(needle)):
        tailkd.distill_loss(h_s, w_s, h_t, w_t, labels, loss=loss, **knobs)
    if "K" not in knobs:
        with pytest.raises(ValueError, match=re.escape(needle)):
            objective(h_s @ w_s.T, labels, count_valid_tokens(labels), cfg=LossConfig(name=loss, **knobs),
                      teacher_logits=h_t @ w_t.T)


@pytest.mark.parametrize("knobs,needle", [({"loss": "nonexistent"}, "not in the registry"), ({"k": 0}, "k=0"),
                                          ({"beta": -1.0}, "beta=-1.0"), ({"clm_weight": -1.0}, "clm_weight")])
def test_a_knob_out_of_range_is_refused_also_with_div_weight_0(knobs, needle):
    """div_weight 0 skips the divergence, not the checks: distill_loss's docstring promises a ValueError for a value
    out of its range (an unknown loss, k 0 and beta −1 were taken silently)."""
    from tailkd.objective import objective

    teacher, student, ids = _models()
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    h_s, h_t = tailkd.head.final_hidden(student, ids), tailkd.head.final_hidden(teacher, ids)
    w_s, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    knobs = {"loss": "tad", **knobs, "div_weight": 0.0}
    with pytest.raises(ValueError, match=re.escape(needle)):
        tailkd.distill_loss(h_s, w_s, h_t, w_t, labels, **knobs)
    with pytest.raises(ValueError, match=re.escape(needle)):
        objective(h_s @ w_s.T, labels, count_valid_tokens(labels), cfg=LossConfig(name=knobs.pop("loss"), **knobs))


def test_distill_loss_takes_a_models_head_with_its_soft_capping_and_padding():
    """A Head (model_head(model, V)) carries the logit soft-capping a bare weight does not: the value then equals the
    dense objective on the capped logits of the shared V ids; a transposed weight is named as such."""
    from tailkd.head import Head, HeadSpec
    from tailkd.objective import objective

    teacher, student, ids = _models(pad=5)
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    h_s, h_t = tailkd.head.final_hidden(student, ids), tailkd.head.final_hidden(teacher, ids)
    w_s, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    spec = HeadSpec(TINY_VOCAB, softcap=3.0)
    got = tailkd.distill_loss(h_s, Head(w_s, None, spec), h_t, Head(w_t, None, spec), labels, loss="tad", k=4)

    def capped(h, w):
        z = h @ w[:TINY_VOCAB].T
        return 3.0 * torch.tanh(z / 3.0)

    want = objective(capped(h_s, w_s), labels, count_valid_tokens(labels), cfg=LossConfig(name="tad", k=4),
                     teacher_logits=capped(h_t, w_t))
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=0)  # float64, two exact paths
    plain = tailkd.distill_loss(h_s, w_s[:TINY_VOCAB], h_t, w_t[:TINY_VOCAB], labels, loss="tad", k=4)
    assert abs(plain.loss.item() - want.loss.item()) > 1e-3  # the cap matters at these logits
    with pytest.raises(ValueError, match="a transpose"):
        tailkd.distill_loss(h_s, w_s.T, h_t, w_t, labels)
    with pytest.raises(ValueError, match="carries its own bias"):
        tailkd.distill_loss(h_s, Head(w_s, None, spec), h_t, Head(w_t, None, spec), labels,
                            student_bias=torch.zeros(TINY_VOCAB + 5, dtype=w_s.dtype))


def test_final_hidden_falls_back_by_signature_and_never_hides_a_forward_error():
    """A forward without ``logits_to_keep`` runs the base model (its states equal the model's own last hidden
    states, exactly: the same float64 operations); a TypeError raised INSIDE a forward that takes it is the model's
    error and propagates (it used to be caught as 'no logits_to_keep' and the forward run again without it); a
    DDP-style wrapper (``.module``) of such a model is refused, since running its inner base model would skip the
    wrapper's gradient synchronisation."""
    from tailkd.errors import TailkdError
    from tailkd.head import final_hidden

    _, student, ids = _models()
    want = student(input_ids=ids, output_hidden_states=True).hidden_states[-1]

    class Plain(torch.nn.Module):  # a causal LM whose forward names its arguments, without logits_to_keep
        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            self.base_model = lm.base_model

        def forward(self, input_ids, output_hidden_states=False, use_cache=False):
            return self.lm(input_ids=input_ids, output_hidden_states=output_hidden_states, use_cache=use_cache)

    assert torch.equal(final_hidden(Plain(student), ids), want)

    class Broken(torch.nn.Module):
        def forward(self, input_ids, logits_to_keep=0, **kwargs):
            raise TypeError("a bug inside the forward")

    with pytest.raises(TypeError, match="a bug inside the forward"):
        final_hidden(Broken(), ids)

    class Wrapper(torch.nn.Module):  # what DDP looks like from here
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    with pytest.raises(TailkdError, match="Plain.forward takes no logits_to_keep") as refused:
        final_hidden(Wrapper(Plain(student)), ids)
    # the fix it names is a value --train.fused_loss takes (it said 'false', which the flag refuses)
    (value,) = re.findall(r"use --train\.fused_loss (\w+)", str(refused.value))
    assert value in FUSED_MODES and value == "off"
