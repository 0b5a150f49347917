"""Final-answer extraction and exact match for math tasks, following lm-evaluation-harness's gsm8k task.

Two filters, as in lm-eval's gsm8k.yaml:
  * strict:   the number after the GSM8K answer marker `#### ` (the format the training completions use);
  * flexible: the last number anywhere in the text (gives credit to a model that solved it but broke format).
lm-eval compares after ignoring case, punctuation and commas/`$`; we normalize the number itself instead, which also
makes "7.0" equal "7" (lm-eval would count that as wrong; a fine-tuned model writing 7.0 did solve the problem).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def extract_strict(text: str) -> str | None:
    """The number after the first `#### `, or None when the model did not use the answer marker."""
    match = STRICT_RE.search(text)
    return match.group(1) if match else None


def extract_flexible(text: str) -> str | None:
    """The last number-like span in the text, or None. Spans without a digit (e.g. "..", "$,") are skipped."""
    spans = [a or b for a, b in FLEXIBLE_RE.findall(text)]
    spans = [s for s in spans if any(c.isdigit() for c in s)]
    return spans[-1] if spans else None


def normalize_number(value: str | None) -> str | None:
    """Canonical form of a numeric answer: no `$`, commas or trailing dot, and 7.0 / 7.00 / 007 -> 7.

    Non-numeric leftovers (e.g. "1.2.3") are returned stripped rather than dropped, so they can still match a gold
    answer written the same way but never equal a different number.
    """
    if value is None:
        return None
    text = value.strip().replace(",", "").replace("$", "").rstrip(".")
    if not text:
        return None
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text
    if number == number.to_integral_value():
        return str(int(number))  # int() also turns -0 into 0
    return format(number.normalize(), "f")


def exact_match(pred: str | None, gold: str | None) -> bool:
    """True when both normalize to the same number. A missing prediction or gold never matches."""
    p, g = normalize_number(pred), normalize_number(gold)
    return p is not None and g is not None and p == g
