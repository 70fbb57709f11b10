"""The final answer of a worked solution, and exact match on it (GSM8K conventions).

A leaf module (it imports nothing of tailkd), so that the data side (``tailkd.mathdata`` checks every
generated solution with it) and the evaluation side (``tailkd.generation`` scores decoded outputs with
it) share one definition without importing each other.

- ``normalize_number``: a number's canonical string (``"1,234.50" -> "1234.5"``).
- ``extract_answer``: the answer of a text — ``#### N``, else ``\\boxed{N}`` / "the answer is N" /
  "answer: N", else the last number; ``strict=True`` accepts ``#### N`` only.
- ``answers_match`` / ``exact_match``: two answers are equal numbers; the fraction of pairs that match.

``strict`` is modelled on lm-eval's GSM8K filters, not identical to them: ``strict=True`` is like its
"strict-match" but of several ``#### N`` the LAST counts (a solution that corrects itself; lm-eval takes the
first); the default is like its "flexible-extract" (the last number) but a ``#### N`` or an answer phrase wins
over later numbers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

# A number as written in text: optional sign, thousands separators ("1,234,567") or plain digits,
# optional decimals; or a bare decimal (".5"). "1,2,3" is three numbers, not 123.
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:-\$(?=\.?\d))?(?:{_NUMBER})")  # "-$5" is -5, as after "####" and in the phrases
# "#### N": the number right after the marker (a "$" and a sign may sit in between).
_HASH_RE = re.compile(rf"####\s*(-?)\s*\$?\s*({_NUMBER})")
# Tier-2 phrases: "\boxed{N}", "the (final) answer is N", "answer: N".
_PHRASE_RE = re.compile(
    rf"\\boxed\{{\s*\$?\s*({_NUMBER})\s*\}}|answer(?:\s+is)?\s*[:=]?\s*(-?)\s*\$?\s*({_NUMBER})",
    re.IGNORECASE,
)
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})  # unicode minus, en/em dash


def normalize_number(text: str) -> str | None:
    """A number's canonical string, or None if ``text`` is not a number.

    Strips surrounding whitespace, ``$``, thousands commas, a leading ``+`` and a trailing period; then
    writes the value in plain decimal without trailing zeros: ``"1,234.50" -> "1234.5"``,
    ``"3.0" -> "3"``, ``"-0" -> "0"``, ``".5" -> "0.5"``, ``"$-7." -> "-7"``.
    """
    s = text.strip().translate(_MINUS_SIGNS).replace("$", "").replace(",", "").replace(" ", "")
    s = s.removesuffix(".")
    if not s or not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        return None
    if value == 0:
        return "0"
    out = format(value, "f")  # exact at any length (normalize() would round to the context's 28 digits)
    return out.rstrip("0").rstrip(".") if "." in out else out


def extract_answer(text: str | None, *, strict: bool = False) -> str | None:
    """The final numeric answer of a worked solution, normalised (``normalize_number``), or None.

    In order of preference:

    1. the number after the LAST ``####`` that is followed by one (GSM8K's convention);
    2. else the last ``\\boxed{N}``, "the answer is N" or "answer: N" (case-insensitive);
    3. else the last number anywhere in the text;
    4. else None (no number at all).

    ``strict=True`` stops after step 1 (lm-eval's "strict-match" for GSM8K; the default is its
    "flexible-extract"). The fallbacks can credit a rambling output whose last number happens to be
    right, so ``tailkd.generation.generation_eval`` reports both.

    Commas, ``$``, a trailing period and ``+`` are dropped; ``-0`` is ``0`` and ``3.0`` is ``3``.
    Fractions ("1/2") and words ("three") are not read as numbers (``1/2`` yields ``2``).
    """
    if not text:
        return None
    text = text.translate(_MINUS_SIGNS)
    hashes = list(_HASH_RE.finditer(text))
    if hashes:
        sign, number = hashes[-1].groups()
        return normalize_number(sign + number)
    if strict:
        return None
    phrases = list(_PHRASE_RE.finditer(text))
    if phrases:
        boxed, sign, number = phrases[-1].groups()
        return normalize_number(boxed if boxed is not None else sign + number)
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def answers_match(prediction: str | None, reference: str | None, *, strict: bool = False) -> bool:
    """True iff both texts yield an answer and the two are the same number. ``strict`` applies to the
    prediction only (``extract_answer(prediction, strict=strict)``); the reference may be a bare number."""
    pred, ref = extract_answer(prediction, strict=strict), extract_answer(reference)
    return pred is not None and ref is not None and Decimal(pred) == Decimal(ref)


def exact_match(predictions: Sequence[str], references: Sequence[str], *, strict: bool = False) -> float:
    """Fraction of pairs whose extracted answers are equal numbers (``answers_match``), in [0, 1].

    A reference may be a full worked solution ("... #### 42") or the bare answer ("42"). A prediction
    without any number (with ``strict``: without ``#### N``) counts as wrong.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("exact_match needs at least one prediction")
    return sum(answers_match(p, r, strict=strict) for p, r in zip(predictions, references)) / len(predictions)
