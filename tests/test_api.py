"""The public API for one's own training loop: the README's HF `Trainer` example runs, and `tailkd.distill_loss`
equals `tailkd distill`'s loss on the same batch."""

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_lm

import tailkd
from tailkd.config import LossConfig
from tailkd.objective import count_valid_tokens, step_terms
from tailkd.teacher import OnlineTeacher

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The README's python block that holds ``# tailkd: trainer-example``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    (block,) = [b for b in blocks if "# tailkd: trainer-example" in b]
    return block


def _models():
    teacher = make_tiny_lm("llama", seed=1).double()
    student = make_tiny_lm("llama", seed=2, num_hidden_layers=2).double()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY_VOCAB, (3, 12), generator=g)
    return teacher, student, ids


@pytest.mark.parametrize("loss,knobs", [("tad", {"k": 5, "beta": 2.0}), ("kd", {}), ("jsd", {"jsd_beta": 0.3}),
                                        ("drkl", {"gamma": 0.4}), ("tad", {"k": 3, "clm_weight": 0.0})])
def test_readme_trainer_example_equals_tailkd_distill_loss(tmp_path, loss, knobs):
    from transformers import TrainingArguments

    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102 - our own README's example
    teacher, student, ids = _models()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=3)
    trainer = namespace["DistillTrainer"](model=student, args=args, teacher=teacher, loss=loss, loss_knobs=knobs)
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
