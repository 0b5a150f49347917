"""Evaluation: math exact match (gsm8k-style), code pass@1 in a sandbox, held-out completion NLL, optional judge."""

from taso_llm.eval.answers import exact_match, extract_flexible, extract_strict, normalize_number
from taso_llm.eval.evaluate import (answer_nll, evaluate_code, evaluate_instruct, evaluate_math, run_evaluation,
                                    select_task)
from taso_llm.eval.generate import build_math_prompt, generate_batched
from taso_llm.eval.sandbox import SandboxResult, pass_at_1, run_tests
from taso_llm.eval.scoring import extract_code, score_code, score_math

__all__ = [
    "SandboxResult", "answer_nll", "build_math_prompt", "evaluate_code", "evaluate_instruct", "evaluate_math",
    "exact_match", "extract_code", "extract_flexible", "extract_strict", "generate_batched", "normalize_number",
    "pass_at_1", "run_evaluation", "run_tests", "score_code", "score_math", "select_task",
]
