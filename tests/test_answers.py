"""tailkd.answers: the final answer of a worked solution (#### N, phrases, the last number), strict and flexible
exact match."""

from __future__ import annotations

import pytest

from tailkd.answers import answers_match, exact_match, extract_answer, normalize_number


@pytest.mark.parametrize("text, want", [
    ("#### 42", "42"),
    ("1,234 + 1 = 1,235\n#### 1,235", "1235"),
    ("#### $1,000.50", "1000.5"),
    ("#### -5", "-5"),
    ("#### -$5", "-5"),
    ("#### -0", "0"),
    ("#### 3.0", "3"),
    ("#### 3.", "3"),
    ("#### 12 apples", "12"),
    ("#### 7\nwait, no\n#### 8", "8"),  # the last ####
    ("first #### 2 then #### 3.", "3"),
    ("#### 5\nso 9 + 1 = 10", "5"),  # #### beats later numbers
    ("The answer is 5. Check: 5 + 1 = 6", "5"),  # the phrase beats the last number
    ("The answer is $-4.50", "-4.5"),
    ("The answer is -$4.50", "-4.5"),  # the sign before "$" (the phrase's own sign group)
    ("The answer is 3. No: the answer is 5, as 2 + 3 = 5", "5"),  # the LAST phrase
    ("ANSWER: 12 (from 3 x 4)", "12"),  # phrases are case-insensitive
    ("Final answer: 1,001", "1001"),
    ("so it is \\boxed{12}", "12"),
    ("3 apples and 4 pears, total 7", "7"),  # fallback: the last number
    ("10 - 3 = 7", "7"),  # subtraction, not a negative number
    ("Total: \u22123", "-3"),  # unicode minus
    ("#### \u20135", "-5"),  # an en dash for a minus
    ("#### \u20145", "-5"),  # an em dash for a minus
    ("#### $5 (it was 7 before)", "5"),  # "$" after the marker: still the #### answer, not the last number
    ("see section 2.3.1", "2.3"),  # the digits after a decimal's second point are not a number of their own
    ("The loss was -$5", "-5"),  # the last number keeps its sign before "$", as #### and the phrases do
    ("it cost $12, i.e. 20-$8", "8"),  # subtraction, not a negative amount
    ("1,2,3", "3"),  # a list, not 123
    ("about .5 of it", "0.5"),
    ("#### \nbut 5 later", "5"),  # a #### without a number is skipped
    ("no numbers here", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("text, want", [
    ("1,234.50", "1234.5"), ("+3", "3"), ("-0.0", "0"), ("$7.", "7"), ("100", "100"), ("0.10", "0.1"),
    ("-12.340", "-12.34"), ("abc", None), ("1.2.3", None), ("", None), ("-", None),
    ("7..", "7"),  # the trailing period of a sentence after a number's own: "7." then "."
    ("- 5", "-5"), ("$ 12", "12"),  # spaces between sign, "$" and digits (as after "####" and in the phrases)
])
def test_normalize_number(text, want):
    assert normalize_number(text) == want


def test_strict_extraction_needs_the_marker():
    assert extract_answer("#### 5\nthen 6", strict=True) == "5"
    assert extract_answer("#### $5", strict=True) == "5"  # "$" after the marker is still the marker's number
    assert extract_answer("The answer is 5", strict=True) is None and extract_answer("7", strict=True) is None
    refs = ["#### 2", "2"]
    assert exact_match(["1 page, 2", "#### 2"], refs) == 1.0
    assert exact_match(["1 page, 2", "#### 2"], refs, strict=True) == 0.5


def test_exact_match_compares_numbers():
    refs = ["x\n#### 3", "#### 1,000", "#### -2"]
    assert exact_match(["#### 3.0", "The answer is 1000.", "-2"], refs) == 1.0
    assert exact_match(["#### 4", "no idea", "#### 2"], refs) == 0.0
    assert exact_match(["#### 3", "#### 7", "#### 7"], refs) == pytest.approx(1 / 3)
    assert not answers_match("nothing", "nothing either")  # two missing answers are not a match
    with pytest.raises(ValueError):
        exact_match(["1"], ["1", "2"])
    with pytest.raises(ValueError):
        exact_match([], [])


def test_long_numbers_are_kept_exactly():
    """Every digit counts: Decimal.normalize() rounds to the context's 28 digits, which made two 30-digit answers that
    differ in the last digit "equal" and returned a number that was not in the text."""
    big = "123456789012345678901234567891"  # 30 digits
    assert normalize_number(big) == big and normalize_number(big + ".500") == big + ".5"
    assert normalize_number("1" + "0" * 40) == "1" + "0" * 40
    assert not answers_match(f"#### {big}", f"#### {big[:-1]}2")
