import pytest

from taso_llm.eval.scoring import extract_code, score_code, score_math, with_check_call

TESTS = "assert add(1, 2) == 3\nassert add(-4, 4) == 0\n"


def test_score_math_strict_and_flexible():
    s = score_math("20 + 4 = 24.\n#### 24", "24")
    assert s == {"strict_pred": "24", "flexible_pred": "24", "strict_correct": True, "flexible_correct": True}
    s = score_math("20 + 4 = 24, so the answer is 24.", "24")  # solved but no marker: flexible credit only
    assert (s["strict_pred"], s["strict_correct"], s["flexible_correct"]) == (None, False, True)
    s = score_math("#### 24 ... wait, 25", "24")  # strict takes the marker, flexible the last number
    assert (s["strict_correct"], s["flexible_correct"]) == (True, False)
    s = score_math("I do not know", "24")
    assert s == {"strict_pred": None, "flexible_pred": None, "strict_correct": False, "flexible_correct": False}
    assert score_math("#### 1,000.00", "1000")["strict_correct"]


@pytest.mark.parametrize("generated, code", [
    ("Sure:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```bash\npip install x\n```\n```py\nx = 1\n```", "x = 1\n"),
    ("Output:\n```\ny = 2\n```", "y = 2\n"),
    ("```python\ndef g():\n    return", "def g():\n    return"),  # cut off by max_new_tokens
    ("def h():\n    return 3\n", "def h():\n    return 3\n"),
])
def test_extract_code(generated, code):
    assert extract_code(generated) == code


def test_score_code_pass_and_fail():
    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a * b\n```"
    assert score_code(good, TESTS)["passed"]
    result = score_code(bad, TESTS)
    assert not result["passed"] and result["status"] == "failed"
    assert score_code("def add(a, b):\n    return a + b\n", TESTS)["passed"]  # no fence: the whole text
    assert score_code("I cannot write that.", TESTS)["status"] == "error"


def test_humaneval_style_check_is_called():
    tests = "def check(candidate):\n    assert candidate(2, 2) == 4\n"
    assert with_check_call(tests, "add").endswith("check(add)\n")
    assert with_check_call(tests + "check(add)\n", "add").count("check(add)") == 1
    assert with_check_call(TESTS, "add") == TESTS
    assert not score_code("def add(a, b):\n    return 0\n", tests, entry_point="add")["passed"]
    assert score_code("def add(a, b):\n    return a + b\n", tests, entry_point="add")["passed"]


def test_bundled_reference_answers_score_as_correct():
    """The reference completions of the bundled set must pass their own checks (scoring and data agree)."""
    bundled = pytest.importorskip("taso_llm.data.bundled_set")
    rows = bundled.bundled_rows()
    math_rows = [r for r in rows if r["task"] == "math"][:10]
    code_rows = [r for r in rows if r["task"] == "code"][:5]
    assert math_rows and code_rows
    for r in math_rows:
        assert score_math(r["completion"][0]["content"], r["answer"])["strict_correct"], r
    for r in code_rows:
        result = score_code(r["completion"][0]["content"], r["tests"], r["entry_point"])
        assert result["passed"], (r, result["stderr_tail"])
