"""A loss of the user's own in the registry: a row that is malformed fails in one clear line, never silently."""

from typing import NamedTuple

import pytest
import torch

from tailkd import divergences as dv
from tailkd.config import LossConfig
from tailkd.head import Head, HeadSpec
from tailkd.losses import check_logits, check_temperature, scaled_pair
from tailkd.objective import IGNORE_INDEX, chunked_objective, count_valid_tokens, objective
from tailkd.registry import LOSSES, LossSpec

V = 37


def hellinger(student_logits, teacher_logits, *, temperature=1.0):
    """Squared Hellinger distance ½ Σ_i (√p_i − √q_i)² per token, by plain autograd (the user's per-token function)."""
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    s, t = scaled_pair(student_logits, teacher_logits, temperature)
    sqrt_p, sqrt_q = torch.exp(0.5 * torch.log_softmax(t, -1)), torch.exp(0.5 * torch.log_softmax(s, -1))
    return 0.5 * (sqrt_p - sqrt_q).square().sum(-1)


class _SqrtP(NamedTuple):
    sqrt_p: torch.Tensor


def _h_teacher(t):
    return _SqrtP(torch.log_softmax(t, -1).mul_(0.5).exp_())


def _h_forward(s, logq, teacher, w=None):
    sq = logq.mul_(0.5).exp_()
    value = 0.5 * (teacher.sqrt_p - sq).square().sum(-1)
    return value, (sq, teacher.sqrt_p, value)


def _h_backward(state, cd, cq, inplace=True):
    """∂H²/∂s_j = ½ (q_j (1 − H²) − √(p_j q_j))."""
    sq, sp, value = state
    q = sq * sq
    g = q * (0.5 * cd * (1 - value))[:, None] - 0.5 * cd[:, None] * sp * sq
    return g if cq is None else g + cq[:, None] * q


HELLINGER = dv.RowKernel(_h_teacher, _h_forward, _h_backward)


def _per_token(d, s, t, labels, mask, seg):
    return hellinger(s, t, temperature=d.cfg.temperature)


@pytest.fixture
def restore_losses():
    """The registry as it was after the test: a row added here must not reach other tests."""
    saved = dict(LOSSES)
    yield
    LOSSES.clear()
    LOSSES.update(saved)


def _inputs(seed=0, B=2, T=6, d=5):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    h_t = torch.randn(B, T, d, generator=g, dtype=torch.float64) * 2
    w_s = torch.randn(V, d, generator=g, dtype=torch.float64)
    w_t = torch.randn(V, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE_INDEX  # masked positions: a whole-batch mean would count them
    return h_s, w_s, h_t, w_t, labels


def _dense(name, h_s, w_s, h_t, w_t, labels):
    return objective(h_s @ w_s.T, labels, count_valid_tokens(labels), cfg=LossConfig(name=name),
                     teacher_logits=h_t @ w_t.T)


def _chunked(name, h_s, w_s, h_t, w_t, labels, chunk_size=4):
    return chunked_objective(h_s, Head(w_s, None, HeadSpec(V)), labels, count_valid_tokens(labels),
                             cfg=LossConfig(name=name), teacher_hidden=h_t, teacher_head=Head(w_t, None, HeadSpec(V)),
                             chunk_size=chunk_size)


def _one_line(exc_info, *parts):
    text = str(exc_info.value)
    assert "\n" not in text and all(p in text for p in parts), text


@pytest.mark.parametrize("bad, shape", [
    (lambda d, s, t, labels, mask, seg: hellinger(s, t).mean(), "()"),  # a mean instead of one value per token
    (lambda d, s, t, labels, mask, seg: 0.5 * (torch.softmax(t, -1).sqrt() - torch.softmax(s, -1).sqrt()).square(),
     "V"),  # the sum over the vocabulary forgotten
])
@pytest.mark.parametrize("path", [_dense, _chunked])
def test_a_per_token_function_of_the_wrong_shape_is_refused(restore_losses, bad, shape, path):
    """A per-token function that returns a batch mean broadcast silently over the masked tokens on the dense path (the
    loss then counted positions without a label) and one that forgets the sum over V failed with torch's broadcast
    message; both are now a ValueError naming the loss and the shape it must return."""
    LOSSES["mine"] = LossSpec("mine", "", "", bad)
    with pytest.raises(ValueError) as exc:
        path("mine", *_inputs())
    _one_line(exc, "'mine'", "per_token", "one value per token")


def test_a_row_kernel_whose_value_is_not_one_per_row_is_refused(restore_losses):
    """A kernel whose forward sums its rows was broadcast into every row of the chunk (a loss several times too
    large, silently); now a ValueError naming the loss."""
    def summed(s, logq, teacher, w=None):
        value, state = _h_forward(s, logq, teacher, w)
        return value.sum(), state

    LOSSES["mine"] = LossSpec("mine", "", "", _per_token, kernel=lambda c: dv.RowKernel(_h_teacher, summed,
                                                                                          _h_backward))
    with pytest.raises(ValueError) as exc:
        _chunked("mine", *_inputs())
    _one_line(exc, "'mine'", "forward", "one value per row")


@pytest.mark.parametrize("kernel", [
    HELLINGER,  # the kernel itself where the row takes a function of the LossConfig that makes it
    lambda c: dv.RowKernel(_h_teacher, _h_forward, None),  # no gradient
    lambda c: (_h_teacher, _h_forward, _h_backward),  # a plain tuple
])
def test_a_malformed_kernel_row_is_refused_in_one_line(restore_losses, kernel):
    """Each was a bare TypeError ("'NoneType' object is not callable", "'RowKernel' object is not callable") from
    inside the chunked layer, or an AttributeError; now one ValueError naming the loss and what the row needs."""
    LOSSES["mine"] = LossSpec("mine", "", "", _per_token, kernel=kernel)
    with pytest.raises(ValueError) as exc:
        _chunked("mine", *_inputs())
    _one_line(exc, "'mine'", "RowKernel")
