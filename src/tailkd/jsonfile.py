"""The JSON of every file tailkd writes: strict JSON (RFC 8259), which ``jq``, JavaScript and other readers parse.

Python's ``json`` writes a non-finite float as ``NaN`` / ``Infinity`` / ``-Infinity``, which is not JSON. A tailkd
output can hold one for a real reason: the held-out reverse KL against a teacher that gives a token probability 0
(a banned token: −inf logit) is +inf, so is the perplexity of an infinite CLM loss; a skipped training step's loss
is NaN. `dumps` — the one encoder of tailkd's JSON and JSONL files — writes such a value as ``null`` and records what
it was in the object that holds it, under ``"non_finite"``: ``{"rkl": null, ..., "non_finite": {"rkl": "inf"}}``
(the value ``"inf"``, ``"-inf"`` or ``"nan"``; a list element is named with its index, ``"alpha_mean[3]"``,
``"curve[1][0]"``). A value outside every object (a bare top-level list) is ``null`` with no record. `loads` — what
tailkd's readers use — puts the floats back and drops the record, and reads the files written before this rule
(``NaN`` / ``Infinity`` as Python's ``json`` wrote them) as they were.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

NON_FINITE = "non_finite"  # the key of the record in an object that held a non-finite float
_PATH = re.compile(r"^(.*?)((?:\[\d+\])*)$")  # "key[1][0]" -> "key", "[1][0]"


def _name(x: float) -> str:
    return "nan" if math.isnan(x) else "inf" if x > 0 else "-inf"


def _strict(value, record: dict, path: str):
    """``value`` with its non-finite floats replaced by None; those outside a nested object recorded as
    ``record[path] = "inf"`` (path: the key in the enclosing object, with list indices)."""
    if isinstance(value, float) and not math.isfinite(value):
        record[path] = _name(value)
        return None
    if isinstance(value, dict):
        inner: dict = {}
        out = {k: _strict(v, inner, str(k)) for k, v in value.items()}
        if inner:
            if NON_FINITE in value:
                raise ValueError(f"an object with a key {NON_FINITE!r} of its own cannot record its non-finite values")
            out[NON_FINITE] = inner
        return out
    if isinstance(value, (list, tuple)):
        return [_strict(v, record, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def strict(obj):
    """``obj`` (dicts, lists, tuples, scalars) with every non-finite float ``null`` and recorded (module docstring)."""
    return _strict(obj, {}, "")


def dumps(obj, **kwargs) -> str:
    """Strict JSON of ``obj`` (`strict`, then ``json.dumps(..., allow_nan=False)``); ``kwargs`` as ``json.dumps``'s
    (``indent``, ``default``, ...)."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def _put(obj: dict, path: str, value: float) -> None:
    key, indices = _PATH.match(path).groups()
    if key not in obj:
        return
    holder, at = obj, key
    for i in (int(n) for n in re.findall(r"\d+", indices)):
        inner = holder[at]
        if not isinstance(inner, list) or i >= len(inner):
            return
        holder, at = inner, i
    if holder[at] is None:  # only what `dumps` replaced
        holder[at] = value


def restore(value):
    """The inverse of `strict`: each object's ``non_finite`` record put back as floats, the record dropped."""
    if isinstance(value, dict):
        marks = value.get(NON_FINITE)
        marks = marks if isinstance(marks, dict) and all(m in ("nan", "inf", "-inf") for m in marks.values()) else None
        out = {k: restore(v) for k, v in value.items() if not (marks is not None and k == NON_FINITE)}
        for path, mark in (marks or {}).items():
            _put(out, path, float(mark))
        return out
    if isinstance(value, list):
        return [restore(v) for v in value]
    return value


def kind(value) -> str:
    """The type of a parsed JSON value with its article, for messages about a file of the wrong shape: "a list",
    "an int", "a str"."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


class Damaged(ValueError):
    """A file that does not hold a JSON object (`read_object`); its text says what is wrong."""


def read_object(path) -> dict:
    """The JSON object of tailkd's file ``path`` (`loads`); `Damaged` saying what is wrong where it holds none — "not
    UTF-8 text: ...", "not valid JSON: ...", "nested too deeply to read" (past Python's parser), "not a JSON object:
    a list" — for the caller's one-line error (an OSError of reading is the caller's too)."""
    try:
        obj = loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Damaged(f"not UTF-8 text: {exc.reason}") from None
    except json.JSONDecodeError as exc:
        raise Damaged(f"not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise Damaged("nested too deeply to read") from None
    if not isinstance(obj, dict):
        raise Damaged(f"not a JSON object: {kind(obj)}")
    return obj


def loads(text: str):
    """A tailkd JSON file's content: `restore` of ``json.loads`` (which also reads the ``NaN`` / ``Infinity`` of files
    written before `dumps` was the rule)."""
    return restore(json.loads(text))
