"""Scoring one generated text against its reference, separate from generation so it can be tested on fixed strings."""

from __future__ import annotations

import re

from taso_llm.eval.answers import exact_match, extract_flexible, extract_strict
from taso_llm.eval.sandbox import run_tests

_FENCE_RE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}


def score_math(generated: str, gold: str) -> dict:
    """Strict (`#### N`) and flexible (last number) predictions and whether each matches the gold answer."""
    strict, flexible = extract_strict(generated), extract_flexible(generated)
    return {"strict_pred": strict, "flexible_pred": flexible,
            "strict_correct": exact_match(strict, gold), "flexible_correct": exact_match(flexible, gold)}


def extract_code(generated: str) -> str:
    """The first ```python (or ```py) fenced block, else the first untagged one, else the whole text.

    A python-tagged block wins over an earlier untagged or other-language one (often shell commands or output). An
    unterminated fence (the generation hit max_new_tokens) still yields its contents.
    """
    blocks = [(tag.strip().lower(), body) for tag, body in _FENCE_RE.findall(generated)]
    for wanted in (lambda tag: tag in _PYTHON_TAGS, lambda tag: tag == ""):
        for tag, body in blocks:
            if wanted(tag):
                return body
    return generated


def with_check_call(tests: str, entry_point: str) -> str:
    """HumanEval-style tests define `check(candidate)` and expect the harness to call it; add the call if missing."""
    defines_check = re.search(r"^def check\(", tests, re.MULTILINE)
    calls_check = re.search(r"^check\(", tests, re.MULTILINE)
    if entry_point and defines_check and not calls_check:
        return f"{tests}\ncheck({entry_point})\n"
    return tests


def score_code(generated: str, tests: str, entry_point: str = "", **sandbox_opts) -> dict:
    """Run the extracted code against the tests in the sandbox. sandbox_opts go to run_tests (timeout_s, ...)."""
    code = extract_code(generated)
    result = run_tests(code, with_check_call(tests, entry_point), **sandbox_opts)
    return {"code": code, "passed": result.passed, "status": result.status, "stderr_tail": result.stderr_tail,
            "seconds": round(result.seconds, 3)}
