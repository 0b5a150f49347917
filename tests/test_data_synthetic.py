"""Synthetic tasks are correct (recomputed independently), deterministic, and the bundled file matches its generator."""

from __future__ import annotations

import ast
import re
from collections import Counter

import pytest

from taso_llm.data import DataArguments, load_sft_splits
from taso_llm.data.bundled_set import BUNDLED_PATH, bundled_rows, write_bundled
from taso_llm.data.synthetic import (check_instruct, code_tasks, composed_word_problems, instruct_tasks,
                                     math_word_problems, pretraining_text)


def prompt_of(row):
    return row["prompt"][-1]["content"]


def completion_of(row):
    return row["completion"][0]["content"]


# Question phrases -> how they change the count; parsed from the text, not taken from the generator.
MATH_PHRASES = [(r"buys (\d+) bags with (\d+) in each", lambda t, a, b: t + a * b),
                (r"buys (\d+) more", lambda t, k: t + k),
                (r"finds (\d+) more", lambda t, k: t + k),
                (r"gives (\d+) away", lambda t, k: t - k)]


def solve_word_problem(question: str) -> tuple[int, int]:
    """(final count, number of steps) recomputed from the question sentences."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    total = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    steps = 0
    for sentence in sentences[1:-1]:
        for pattern, apply in MATH_PHRASES:
            match = re.search(pattern, sentence)
            if match:
                total, steps = apply(total, *map(int, match.groups())), steps + 1
                break
        else:
            raise AssertionError(f"unparsed sentence {sentence!r}")
    return total, steps


def test_math_answers_recompute():
    rows = math_word_problems(300, seed=5)
    for row in rows:
        total, steps = solve_word_problem(prompt_of(row))
        assert row["answer"] == str(total) and total >= 1 and 1 <= steps <= 3
        assert completion_of(row).endswith(f"#### {total}") and row["task"] == "math"
        for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", completion_of(row)):
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
    assert {solve_word_problem(prompt_of(r))[1] for r in math_word_problems(20, 0, steps=(3, 3))} == {3}
    assert math_word_problems(30, seed=5) == rows[:30]
    assert math_word_problems(30, seed=6) != rows[:30]


def test_code_references_pass_their_tests_and_wrong_code_fails():
    rows = code_tasks(200, seed=1)
    assert len({row["entry_point"] for row in rows}) >= 8
    for row in rows:
        namespace = {}
        exec(completion_of(row) + row["tests"], namespace)  # trusted: our own reference solutions
        assert callable(namespace[row["entry_point"]]) and row["entry_point"] in prompt_of(row)
        assert row["tests"].count("assert ") == 3 and row["task"] == "code"
        with pytest.raises(AssertionError):  # the tests can fail: a stub returning a constant does not pass
            exec(f"def {row['entry_point']}(*args):\n    return 'wrong'\n" + row["tests"], {})
    assert code_tasks(20, seed=1) == rows[:20]


def expected_instruct(instruction: str) -> tuple[int, str]:
    """(family index, the correct response), recomputed from the instruction text."""
    rules = [
        (r"Reply with the word (\w+) in uppercase", lambda w: w.upper()),
        (r"Write the word (\w+) in lowercase", lambda w: w.lower()),
        (r"List the numbers from (\d+) to (\d+)", lambda a, b: ", ".join(map(str, range(int(a), int(b) + 1)))),
        (r"Write 'yes' if (\d+) is even", lambda n: "no" if int(n) % 2 else "yes"),
        (r"Repeat the word (\w+) (\d+) times", lambda w, k: " ".join([w] * int(k))),
        (r"sentence: '([^']*)'", lambda s: str(len(s.split()))),
        (r'key "(\w+)" set to "(\w+)"', lambda k, v: '{"%s": "%s"}' % (k, v)),
        (r"Write the words (.*) as a bulleted list", lambda ws: "\n".join(f"- {w}" for w in ws.split(", "))),
    ]
    for family, (pattern, rule) in enumerate(rules):
        match = re.search(pattern, instruction)
        if match:
            return family, rule(*match.groups())
    raise AssertionError(f"unknown instruction {instruction!r}")


def test_instruct_responses_and_checker():
    rows = instruct_tasks(300, seed=2)
    families = set()
    for row in rows:
        family, response = expected_instruct(prompt_of(row))
        families.add(family)
        assert completion_of(row) == row["answer"] == response
        assert check_instruct(row, f"  {completion_of(row)}\n")
        assert not check_instruct(row, completion_of(row) + " extra")
    assert families == set(range(8))
    assert instruct_tasks(25, seed=2) == rows[:25]


def check_equations(text: str) -> int:
    """Every `a op b = c` in the text is right; returns how many there were."""
    equations = re.findall(r"(\d+) ([-+]) (\d+) = (\d+)", text)
    for a, op, b, c in equations:
        assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c), (a, op, b, c)
    return len(equations)


def solve_composed(question: str) -> tuple[str, int]:
    """(template, answer) of a composed problem, recomputed from the question's own sentences."""
    counts = [int(x) for x in re.findall(r"has (\d+) ", question)]
    if "How many more" in question:
        return "how_many_more", counts[0] - counts[1]
    if "together" in question:
        k = int(re.search(r"has (\d+) more \w+ than", question).group(1))
        return "more_than_together", counts[0] + counts[0] + k
    total = counts[0]
    for verb, k in re.findall(r"(buys|finds|gives) (\d+)", question):
        total += -int(k) if verb == "gives" else int(k)
    return "two_changes", total


def test_composed_math_answers_recompute():
    rows = composed_word_problems(300, seed=4)
    templates = Counter()
    for row in rows:
        template, answer = solve_composed(prompt_of(row))
        templates[template] += 1
        assert row["answer"] == str(answer) and answer >= 0 and row["task"] == "math"
        lines = completion_of(row).split("\n")
        assert lines[-1] == f"#### {answer}" and check_equations(completion_of(row)) == len(lines) - 1
        assert lines[-2].endswith(f"= {answer}")  # the last equation gives the answer
    assert set(templates) == {"how_many_more", "more_than_together", "two_changes"} and min(templates.values()) > 60
    assert composed_word_problems(30, seed=4) == rows[:30] and composed_word_problems(30, seed=5) != rows[:30]
    assert not {prompt_of(r) for r in rows} & {prompt_of(r) for r in composed_word_problems(300, seed=2)}


def test_pretraining_text_teaches_sub_skills_but_not_the_task():
    docs = pretraining_text(300, seed=0)
    assert docs == pretraining_text(300, seed=0) and docs != pretraining_text(300, seed=1)
    text = "\n".join(docs)
    facts = re.findall(r"^(\d+) ([-+]) (\d+) = (\d+)\.$", text, flags=re.M)
    copies = re.findall(r"Copy the number (\d+): (\d+)\.", text)
    stories = re.findall(r"has (\d+) \w+\. \w+ (?:buys|finds) (\d+) more, so (\d+) \+ (\d+) =", text)
    chains = re.findall(r"Start with (\d+)\. \w+(?: \w+)? \d+: (\d+) [-+]", text)
    assert len(facts) > 100 and len(copies) > 20 and len(stories) > 20 and len(chains) > 20
    assert check_equations(text) > 500 and all(x == y for x, y in copies)
    assert all(a == c and k == d for a, k, c, d in stories)  # the sentence's numbers, copied into the equation
    assert all(start == first for start, first in chains)    # a running total starts from the stated number
    assert any("def " in doc for doc in docs) and any(doc.startswith("Instruction:") for doc in docs)
    # Never the fine-tuning layout or the composed questions: the base has to learn those from the SFT data.
    for unseen in ("####", "How many more", "more than", "have now", "have together", "Then ", "<|start_header_id|>"):
        assert unseen not in text, unseen


def test_synthetic_does_not_import_the_bundled_set():
    """bundled_set builds on synthetic, never the reverse (no import cycle)."""
    from taso_llm.data import synthetic

    tree = ast.parse(open(synthetic.__file__).read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any("bundled" in (name or "") for name in imported), imported


def test_bundled_file_loads_and_matches_generator(tmp_path):
    assert BUNDLED_PATH.stat().st_size < 300_000
    expected = bundled_rows()
    assert len(expected) == 600 and Counter(r["task"] for r in expected) == {"math": 200, "code": 200, "instruct": 200}
    assert write_bundled(tmp_path / "fresh.jsonl").read_bytes() == BUNDLED_PATH.read_bytes()
    loaded = load_sft_splits(DataArguments(dataset_name="taso-tiny", validation_size=0))["train"]
    assert list(loaded) == expected
    default = load_sft_splits(DataArguments())
    assert (len(default["train"]), len(default["validation"])) == (570, 30)
