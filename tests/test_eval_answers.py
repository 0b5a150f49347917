import pytest

from taso_llm.eval.answers import exact_match, extract_flexible, extract_strict, normalize_number


@pytest.mark.parametrize("text, strict, flexible", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
    ("Total 1,234 items.\n#### 1,234", "1,234", "1,234"),
    ("It costs $1,000.50 in all. #### $1,000.50", None, "$1,000.50"),  # strict regex has no `$`
    ("Down by 5 to -12.\n#### -12", "-12", "-12"),
    ("first 3, then 45, finally 678 left", None, "678"),
    ("So the answer is 42.", None, "42."),
    ("#### 5 and then some 9 more", "5", "9"),
    ("no number here at all", None, None),
    ("ellipsis ... and $, only", None, None),
    ("", None, None),
])
def test_extraction(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


@pytest.mark.parametrize("raw, norm", [
    ("1,234", "1234"), ("$1,000.50", "1000.5"), ("7.0", "7"), ("7.", "7"), ("-12", "-12"), ("-0.0", "0"),
    ("0.250", "0.25"), (" 18 ", "18"), ("1.2.3", "1.2.3"), (None, None), ("", None), ("$", None),
])
def test_normalize_number(raw, norm):
    assert normalize_number(raw) == norm


def test_exact_match():
    assert exact_match("7.0", "7")
    assert exact_match("$1,234.", "1234")
    assert exact_match("-3", "-3.00")
    assert not exact_match("-3", "3")
    assert not exact_match("72", "7")
    assert not exact_match(None, "7")
    assert not exact_match("7", None)
    assert not exact_match(None, None)  # a missing answer is never correct, even against a missing gold
