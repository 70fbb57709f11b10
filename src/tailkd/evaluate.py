"""Held-out evaluation of a student against a teacher, streamed over batches (``tailkd eval``: its entry point is
`tailkd.commands.evaluate`).

Every metric is a sum over valid held-out positions (labels != -100) accumulated batch by batch
in float64 and divided once at the end, so results do not depend on the batch size. Nothing of
size N×V is ever stored: each batch's ``[N, V]`` logits are reduced chunk by chunk to per-token
values and per-bin sums. Notation per valid position i: teacher distribution p_i, student q_i,
next token y_i, N valid positions, V the shared vocabulary, M calibration bins (formulas.md §5):

- ``kl``        = (1/N) Σ_i KL(p_i‖q_i) = (1/N) Σ_i Σ_v p_iv (log p_iv − log q_iv)     [nats/token]
- ``rkl``       = (1/N) Σ_i KL(q_i‖p_i)                                                 [nats/token]
- ``student_clm`` = (1/N) Σ_i −log q_iy;  ``student_ppl`` = exp(student_clm)  (teacher_* likewise)
- ``agreement`` = (1/N) Σ_i 1[argmax q_i = argmax p_i]
- ``student_acc`` = (1/N) Σ_i 1[argmax q_i = y_i]  (``teacher_acc`` = 1 − the teacher's mode mismatch rate)
- ``*_full_ece`` (Liu et al. 2024): every (i, v) pair is a sample with confidence q_iv; bin m holds the
  pairs with m/M ≤ q_iv < (m+1)/M (the last bin includes 1);
  Full-ECE = (1/N) Σ_m |Σ_{(i,v)∈m} (1[y_i = v] − q_iv)|.
- ``*_ece``: standard top-1 ECE = (1/N) Σ_m |Σ_{i∈m} (1[argmax q_i = y_i] − max_v q_iv)|, binned by max_v q_iv.

Both ECEs are fractions in [0, 2] (Full-ECE) and [0, 1] (ECE); a perfectly calibrated model scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from tailkd.data import IGNORE_INDEX, model_inputs
from tailkd.errors import TailkdError

CHUNK_ELEMENTS = 1 << 23  # positions per chunk = CHUNK_ELEMENTS // V: ~8M probabilities (32 MB) at a time


def forward_logits(model, input_ids: torch.Tensor, vocab_size: int, *, autocast_dtype=None, **extra) -> torch.Tensor:
    """Run ``model`` and return its logits sliced to the shared vocabulary (the first ``vocab_size`` columns);
    ``extra``: the rows' other inputs (`tailkd.documents.model_inputs`: packed documents' position ids)."""
    device_type = input_ids.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(input_ids=input_ids, use_cache=False, **extra)
    return out.logits[..., :vocab_size]  # (B, T, V) <- the big tensor


# --------------------------------------------------------------------------- per-chunk sums


def _bin_index(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin m such that m/M <= x < (m+1)/M, with x = 1 in the last bin; int32, same shape as ``x``.

    The edges m/M are the floats nearest m/M in ``x``'s dtype (a linspace's j/M can be an ulp off them)."""
    # m / M correctly rounded in float64, then once to x's dtype: the nearest float (a float64 on a float32 midpoint,
    # the one case of double rounding, needs M >= 2^28)
    edges = (torch.arange(1, bins, dtype=torch.float64) / bins).to(x.dtype).to(x.device)  # (M-1,) interior edges
    return torch.bucketize(x, edges, right=True, out_int32=True)


def calibration_sums(probs: torch.Tensor, labels: torch.Tensor, bins: int, *, pred: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """Per-bin sums for Full-ECE and top-1 ECE of one chunk, float64 ``[M]`` each.

    ``probs`` ``[N, V]`` (rows sum to 1), ``labels`` ``[N]`` (all valid), ``pred`` ``[N]`` argmax q_i, taken from
    the logits (rounding can tie probabilities whose logits differ). Returns
    ``full_count`` (pairs per bin), ``full_conf`` (Σ q_iv per bin), ``full_hits`` (Σ 1[y_i = v] per bin),
    ``top1_count``, ``top1_conf`` (Σ max_v q_iv), ``top1_hits`` (Σ 1[argmax q_i = y_i]).
    """
    flat_bins = _bin_index(probs, bins).reshape(-1)  # (N*V,) int32
    label_prob = probs.gather(-1, labels[:, None]).squeeze(-1)  # (N,) q_iy
    conf = probs.amax(dim=-1)  # (N,)
    hit = (pred == labels).double()
    top1_bins = _bin_index(conf, bins)
    return {
        "full_count": torch.bincount(flat_bins, minlength=bins).double(),
        "full_conf": torch.bincount(flat_bins, weights=probs.reshape(-1).double(), minlength=bins),
        # exactly one pair per position has v = y_i: it lies in the bin of q_iy
        "full_hits": torch.bincount(_bin_index(label_prob, bins), minlength=bins).double(),
        "top1_count": torch.bincount(top1_bins, minlength=bins).double(),
        "top1_conf": torch.bincount(top1_bins, weights=conf.double(), minlength=bins),
        "top1_hits": torch.bincount(top1_bins, weights=hit, minlength=bins),
    }


def _plogp_diff(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row from log-probabilities ``[N, V]`` (0·log 0 = 0), float64 ``[N]``."""
    p = logp.exp()
    terms = torch.where(p == 0, torch.zeros_like(p), p * (logp - logq))  # NaN stays NaN (a broken model shows)
    return terms.sum(-1).double()


def token_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
               *, bins: int | None = None) -> dict[str, torch.Tensor]:
    """Sums over the N positions of one chunk (all valid), float64 scalars or ``[M]`` per-bin tensors.

    ``student_logits``, ``teacher_logits``: ``[N, V]``; ``labels``: ``[N]``. Computed in float32
    (float64 stays float64), accumulated in float64; each model's prediction is the argmax of its own logits.
    Keys: ``tokens``, ``student_nll``, ``student_hits``, ``student_broken`` (positions whose logits have no
    softmax: NaN or +inf), and with a teacher ``teacher_nll``, ``teacher_hits``, ``teacher_broken``, ``kl``, ``rkl``,
    ``agree``; with ``bins`` the ``calibration_sums`` of both models prefixed ``student_`` / ``teacher_``.
    """
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    student_logits = student_logits.to(dtype)
    logq = torch.log_softmax(student_logits, dim=-1)  # (N, V)
    # argmax q_i from the logits: q is monotone in them, but log_softmax can round two of them into a tie
    student_pred = student_logits.argmax(-1)  # (N,)
    student_y = logq.gather(-1, labels[:, None])  # (N, 1) log q_iy; NaN where the row has no softmax (NaN, +inf)
    out = {
        "tokens": torch.tensor(float(labels.numel()), dtype=torch.float64),
        "student_nll": -student_y.double().sum(),
        "student_hits": (student_pred == labels).double().sum(),
        "student_broken": student_y.isnan().double().sum(),
    }
    if bins:
        calibration = calibration_sums(logq.exp(), labels, bins, pred=student_pred)
        out.update({f"student_{k}": v for k, v in calibration.items()})
    if teacher_logits is not None:
        teacher_pred = teacher_logits.argmax(-1)  # (N,) from its own logits: a float64 teacher's cast can tie two
        teacher_logits = teacher_logits.to(dtype)
        logp = torch.log_softmax(teacher_logits, dim=-1)  # (N, V)
        teacher_y = logp.gather(-1, labels[:, None])  # (N, 1)
        out["teacher_nll"] = -teacher_y.double().sum()
        out["teacher_broken"] = teacher_y.isnan().double().sum()
        out["teacher_hits"] = (teacher_pred == labels).double().sum()
        out["kl"] = _plogp_diff(logp, logq).sum()
        out["rkl"] = _plogp_diff(logq, logp).sum()
        out["agree"] = (student_pred == teacher_pred).double().sum()
        if bins:
            calibration = calibration_sums(logp.exp(), labels, bins, pred=teacher_pred)
            out.update({f"teacher_{k}": v for k, v in calibration.items()})
    return out


def add_sums(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``total += part`` key by key (float64, on the CPU); returns ``total``."""
    for key, value in part.items():
        value = value.detach().to("cpu", torch.float64)
        total[key] = total[key] + value if key in total else value.clone()
    return total


def _ece(count: torch.Tensor, conf: torch.Tensor, hits: torch.Tensor, n: float) -> float:
    """(1/N) Σ_m |hits_m − conf_m|; ``count`` is only used to skip empty bins (it does not change the value)."""
    gap = (hits - conf).abs()
    return float(gap[count > 0].sum() / n)


def _exp(x: float) -> float:
    """Perplexity from a mean CLM: inf past float64's range, NaN for a NaN CLM (a model with NaN logits: not inf)."""
    try:
        return math.exp(x)  # exp(NaN) is NaN
    except OverflowError:  # x > ln(DBL_MAX) ≈ 709.78
        return math.inf


def finalize(sums: dict[str, torch.Tensor], *, bins: int | None = None) -> dict:
    """Turn accumulated sums into metrics: one division per metric, at the end."""
    n = float(sums["tokens"]) if "tokens" in sums else 0.0
    if n == 0:
        raise TailkdError("no valid held-out tokens to evaluate; give more data (--data) or a shorter --seq-len")
    out: dict = {"tokens": int(n), "student_clm": float(sums["student_nll"]) / n}
    out["student_ppl"] = _exp(out["student_clm"])
    out["student_acc"] = float(sums["student_hits"]) / n
    if "kl" in sums:
        out.update(kl=float(sums["kl"]) / n, rkl=float(sums["rkl"]) / n, teacher_clm=float(sums["teacher_nll"]) / n,
                   agreement=float(sums["agree"]) / n, teacher_acc=float(sums["teacher_hits"]) / n)
        out["teacher_ppl"] = _exp(out["teacher_clm"])
    if bins:
        out["bins"] = bins
        calibration = {}
        for who in ("student", "teacher"):
            if f"{who}_full_count" not in sums:
                continue
            s = {k: sums[f"{who}_{k}"] for k in ("full_count", "full_conf", "full_hits", "top1_count", "top1_conf",
                                                  "top1_hits")}
            out[f"{who}_full_ece"] = _ece(s["full_count"], s["full_conf"], s["full_hits"], n)
            out[f"{who}_ece"] = _ece(s["top1_count"], s["top1_conf"], s["top1_hits"], n)
            calibration[who] = {k: v.tolist() for k, v in s.items()}  # reliability diagrams can be drawn from these
        out["calibration"] = calibration
    return out


# --------------------------------------------------------------------------- streaming over models


def _chunks(n: int, vocab: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def refuse_broken(who: str, broken: float, positions: int, first_row: int, rows: int) -> None:
    """TailkdError if ``broken`` of the ``positions`` valid positions of held-out rows ``first_row`` ..
    ``first_row + rows - 1`` have logits of ``who`` (student, teacher) without a softmax (NaN or +inf): every metric
    would be NaN."""
    if broken:
        where = f"row {first_row}" if rows == 1 else f"rows {first_row}-{first_row + rows - 1}"
        raise TailkdError(f"the {who}'s logits are not finite (NaN or +inf: no softmax) at {int(broken)} of the "
                          f"{positions} held-out positions of {where}: its weights or its forward produce them (e.g. a "
                          "NaN in the checkpoint), and its metrics would be NaN; check the model")


@torch.no_grad()
def heldout_sums(student, teacher, batches: Iterable[dict], vocab_size: int, *, device="cpu", autocast_dtype=None,
                 bins: int | None = None, refuse_non_finite: bool = False) -> dict[str, torch.Tensor]:
    """The per-token sums behind `heldout_metrics` (`token_sums`, added over batches), not yet divided: sums of
    several processes add up (`tailkd.distributed.gather_sums`) before the one division (`finalize`).

    Every batch runs both forwards, also one without a valid token: data-parallel ranks then stay in lockstep
    (FSDP's forward is a collective), and a rank with no rows left passes a batch whose labels are all -100.
    ``refuse_non_finite``: a TailkdError (`refuse_broken`) at the first batch where a model's logits have no softmax
    at a valid position (otherwise their sums are NaN)."""
    sums: dict[str, torch.Tensor] = {}
    was_training = student.training
    student.eval()
    first_row = 0
    try:
        for batch in batches:
            first_row += batch["input_ids"].shape[0]
            input_ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            mask = labels != IGNORE_INDEX  # (B, T)
            extra = model_inputs(batch, device)
            s_logits = forward_logits(student, input_ids, vocab_size, autocast_dtype=autocast_dtype, **extra)
            t_logits = None  # s_logits: (B, T, V)
            if teacher is not None:
                t_logits = forward_logits(teacher, input_ids, vocab_size, autocast_dtype=autocast_dtype, **extra)
            if not bool(mask.any()):
                continue
            s_logits, y = s_logits[mask], labels[mask]  # (N, V), (N,) valid positions only
            t_logits = None if t_logits is None else t_logits[mask]  # (N, V)
            part: dict[str, torch.Tensor] = {}
            for sl in _chunks(y.numel(), s_logits.shape[-1]):
                add_sums(part, token_sums(s_logits[sl], None if t_logits is None else t_logits[sl], y[sl], bins=bins))
            if refuse_non_finite:
                rows = input_ids.shape[0]
                for who in ("student", "teacher"):
                    refuse_broken(who, float(part.get(f"{who}_broken", 0)), y.numel(), first_row - rows, rows)
            add_sums(sums, part)
    finally:
        student.train(was_training)
    return sums


def heldout_metrics(student, teacher, batches: Iterable[dict], vocab_size: int, *, device="cpu",
                    autocast_dtype=None, bins: int | None = None) -> dict:
    """KL(teacher‖student), reverse KL, CLM loss / perplexity / top-1 accuracy of both, agreement.

    ``batches`` yield ``{"input_ids", "labels"}`` ``[B, T]`` (labels already shifted, -100 = ignore).
    ``teacher`` may be None (then only the student's metrics). With ``bins`` (M), also Full-ECE and
    top-1 ECE of both models and their per-bin sums (key ``calibration``). Sums over all valid tokens,
    one division at the end (see the module docstring for every formula). A model whose logits have no softmax
    (NaN or +inf) at a valid position is a TailkdError (`refuse_broken`), not NaN metrics.
    """
    sums = heldout_sums(student, teacher, batches, vocab_size, device=device, autocast_dtype=autocast_dtype, bins=bins,
                        refuse_non_finite=True)
    return finalize(sums, bins=bins)


# --------------------------------------------------------------------------- batches and the printed table


def batched(rows: list[dict], batch_size: int, progress=None) -> Iterator[dict]:
    """``rows`` (e.g. `tailkd.commands.eval_rows`) in order, collated ``batch_size`` at a time; the last batch may be
    smaller. ``progress(n)`` (e.g. a progress bar's ``update``) is called with a batch's row count once the consumer
    has done with it (asks for the next)."""
    from tailkd import data as data_mod

    if batch_size < 1:
        raise TailkdError(f"--batch-size {batch_size} must be >= 1")
    for i in range(0, len(rows), batch_size):
        yield data_mod.collate(rows[i:i + batch_size])
        if progress is not None:
            progress(len(rows[i:i + batch_size]))


def format_table(result: dict) -> str:
    """The printed table of ``tailkd eval``: one row per metric, student and teacher side by side."""
    if result.get("mode") == "generate":
        keys = sorted({k.split("_", 1)[1] for k in result if k.startswith(("student_", "teacher_"))
                       and isinstance(result[k], (int, float))})
        lines = [f"{'metric':<34} {'student':>12} {'teacher':>12}", "-" * 60]
        for key in keys:
            cells = [("—" if f"{side}_{key}" not in result else str(result[f"{side}_{key}"])
                      if isinstance(result[f"{side}_{key}"], int) else format(result[f"{side}_{key}"], ".4f"))
                     for side in ("student", "teacher")]  # counts (answer_tokens) as they are
            lines.append(f"{key:<34} {cells[0]:>12} {cells[1]:>12}")
        lines.append(f"{result.get('examples', '?')} held-out prompts, up to {result.get('max_new_tokens')} new tokens")
        return "\n".join(lines)
    rows = [("CLM loss [nats/token]", "student_clm", "teacher_clm", ".4f"),
            ("perplexity", "student_ppl", "teacher_ppl", ".3f"),
            ("top-1 accuracy (next token)", "student_acc", "teacher_acc", ".4f"),
            (f"Full-ECE (M={result.get('bins')})", "student_full_ece", "teacher_full_ece", ".4f"),
            (f"top-1 ECE (M={result.get('bins')})", "student_ece", "teacher_ece", ".4f")]
    lines = [f"{'metric':<34} {'student':>12} {'teacher':>12}", "-" * 60]
    for name, sk, tk, fmt in rows:
        if sk not in result:
            continue
        t = format(result[tk], fmt) if tk in result else "—"
        lines.append(f"{name:<34} {format(result[sk], fmt):>12} {t:>12}")
    for name, key in (("KL(teacher‖student) [nats/token]", "kl"), ("KL(student‖teacher) [nats/token]", "rkl"),
                      ("top-1 agreement", "agreement")):
        if key in result:
            lines.append(f"{name:<34} {result[key]:>12.4f}")
    which = {"heldout": "held-out ", "train": "training ", "all": ""}[result.get("split", "heldout")]  # `eval --split`
    lines.append(f"{result['tokens']} {which}tokens ({result.get('rows', '?')} rows of {result.get('seq_len', '?')})")
    return "\n".join(lines)
