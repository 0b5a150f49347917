"""Synthetic tasks on which a tiny model's learning is visible: short, checkable, deterministic given a seed.

Four families, all in the common row schema (see schema.py):
  * math_word_problems: multi-step arithmetic stories, worked solution ending in `#### n`, `answer` = n (the bundled
    default set and the tiny recipes).
  * composed_word_problems: the proxy comparison's math task: compositions of sub-skills the proxy base learned in
    pretraining (`pretraining_text`) that it never saw composed: two-step changes, "how many more than", "more than
    ... together"; same `#### n` layout.
  * code_tasks: small Python functions; completion = reference solution, `tests` = asserts, `entry_point` = name.
  * instruct_tasks: format-following instructions with one correct response; `answer` = that response, and
    `check_instruct` is the checker (exact match after stripping surrounding whitespace).

`pretraining_text` is the proxy base's corpus (taso_llm/proxy.py). `python -m taso_llm.data.bundled_set`
regenerates the bundled default set.
"""

from __future__ import annotations

import json
import operator
import random

from taso_llm.data.schema import user_row

NAMES = [("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Maya", "She"), ("Leo", "He"), ("Sara", "She"),
         ("Omar", "He"), ("Lina", "She")]
ITEMS = ["apples", "books", "marbles", "stickers", "cookies", "pencils", "cards", "shells"]
WORDS = ["apple", "river", "green", "house", "music", "table", "light", "stone", "cloud", "paper", "tiger", "bread"]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


# ----------------------------------------------------------------------------------------------------------- math
# Each step: (sentence template, solution template, function new_total(total, a, b)). Sentences are fixed phrases so a
# test can parse the numbers back out of the question and recompute the answer independently.
def _step_buy(rng, total):
    k = rng.randint(2, 20)
    return f"buys {k} more", f"{total} + {k} = {total + k}", total + k


def _step_find(rng, total):
    k = rng.randint(2, 20)
    return f"finds {k} more", f"{total} + {k} = {total + k}", total + k


def _step_give(rng, total):
    k = rng.randint(1, total - 1)  # keep at least one: the story must stay sensible (callers ensure total >= 2)
    return f"gives {k} away", f"{total} - {k} = {total - k}", total - k


def _step_bags(rng, total):
    a, b = rng.randint(2, 5), rng.randint(2, 6)
    return (f"buys {a} bags with {b} in each", f"{a} * {b} = {a * b}, and {total} + {a * b} = {total + a * b}",
            total + a * b)


MATH_STEPS = [_step_buy, _step_find, _step_give, _step_bags]


def math_word_problem(rng: random.Random, steps: tuple[int, int] = (1, 3)) -> dict:
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    total = rng.randint(3, 30)
    question = [f"{name} has {total} {item}."]
    solution = [f"{name} starts with {total} {item}."]
    for _ in range(rng.randint(*steps)):
        allowed = MATH_STEPS if total >= 2 else [s for s in MATH_STEPS if s is not _step_give]
        phrase, work, total = rng.choice(allowed)(rng, total)
        question.append(f"{pronoun} {phrase}.")
        solution.append(f"{pronoun} {phrase}: {work}.")
    question.append(f"How many {item} does {name} have now?")
    solution.append(f"#### {total}")
    return user_row(" ".join(question), "\n".join(solution), "math", answer=str(total))


def math_word_problems(n: int, seed: int, steps: tuple[int, int] = (1, 3)) -> list[dict]:
    rng = random.Random(f"math-{seed}")
    return [math_word_problem(rng, steps) for _ in range(n)]


# ------------------------------------------------------------------------------------------ composed math (proxy)
# Compositions of the pretraining sub-skills (one-step stories copied into an equation, facts up to FACT_MAX, chains) that
# pretraining never shows: two steps on one count, "how many more than" (a difference of two people's counts), and
# "k more than ... together". Each template returns (question, equation lines, answer); the solution is the equations,
# one per line, then `#### answer`. Every equation stays inside the fact table the base learns (FACT_MAX).
def _composed_two_changes(rng, name, pronoun, other, item):
    start = rng.randint(5, 10)
    lines, total, sentences = [], start, []
    for _ in range(2):
        if rng.random() < 0.5 or total < 12:
            k = rng.randint(2, 10)
            sentences.append(f"{pronoun} {rng.choice(['buys', 'finds'])} {k} more.")
            lines.append(f"{total} + {k} = {total + k}")
            total += k
        else:
            k = rng.randint(2, total - 2)
            sentences.append(f"{pronoun} gives {k} away.")
            lines.append(f"{total} - {k} = {total - k}")
            total -= k
    sentences[1] = "Then " + sentences[1][0].lower() + sentences[1][1:]
    question = f"{name} has {start} {item}. {' '.join(sentences)} How many {item} does {name} have now?"
    return question, lines, total


def _composed_how_many_more(rng, name, pronoun, other, item):
    b = rng.randint(2, 15)
    a = b + rng.randint(2, 15)
    question = f"{name} has {a} {item}. {other} has {b} {item}. How many more {item} does {name} have than {other}?"
    return question, [f"{a} - {b} = {a - b}"], a - b


def _composed_more_than_together(rng, name, pronoun, other, item):
    a, k = rng.randint(3, 10), rng.randint(2, 10)
    question = (f"{name} has {a} {item}. {other} has {k} more {item} than {name}. "
                f"How many {item} do they have together?")
    return question, [f"{a} + {k} = {a + k}", f"{a} + {a + k} = {a + a + k}"], a + a + k


COMPOSED_TEMPLATES = [_composed_two_changes, _composed_how_many_more, _composed_more_than_together]


def composed_word_problem(rng: random.Random) -> dict:
    (name, pronoun), (other, _) = rng.sample(NAMES, 2)
    question, lines, answer = rng.choice(COMPOSED_TEMPLATES)(rng, name, pronoun, other, rng.choice(ITEMS))
    return user_row(question, "\n".join([*lines, f"#### {answer}"]), "math", answer=str(answer))


def composed_word_problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(f"composed-math-{seed}")
    return [composed_word_problem(rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------- code
# Each family returns (instruction, function name, reference source, reference callable, list of argument tuples).
# The callable computes the expected test values; the source is written separately, so a test that runs the source
# against the asserts really checks the source.
def _code_add(rng):
    k = rng.randint(2, 10)
    name = f"add_{NUMBER_WORDS[k]}"
    return (f"Write a function {name}(x) that returns x + {k}.", name,
            f"def {name}(x):\n    return x + {k}\n", lambda x: x + k, [(rng.randint(-20, 50),) for _ in range(3)])


def _code_times(rng):
    k = rng.randint(2, 10)
    name = f"times_{NUMBER_WORDS[k]}"
    return (f"Write a function {name}(x) that returns x multiplied by {k}.", name,
            f"def {name}(x):\n    return x * {k}\n", lambda x: x * k, [(rng.randint(-10, 30),) for _ in range(3)])


def _int_lists(rng, k=3):
    return [([rng.randint(-9, 30) for _ in range(rng.randint(1, 6))],) for _ in range(k)]


def _code_sum(rng):
    name = rng.choice(["sum_list", "list_sum", "total"])
    return (f"Write a function {name}(nums) that returns the sum of a list of numbers.", name,
            f"def {name}(nums):\n    result = 0\n    for x in nums:\n        result += x\n    return result\n",
            sum, _int_lists(rng))


def _code_max(rng):
    name = rng.choice(["max_of_list", "largest", "list_max"])
    return (f"Write a function {name}(nums) that returns the largest number in a non-empty list.", name,
            f"def {name}(nums):\n    best = nums[0]\n    for x in nums:\n        if x > best:\n            best = x\n"
            f"    return best\n", max, _int_lists(rng))


def _code_reverse(rng):
    name = rng.choice(["reverse_string", "reverse_text"])
    return (f"Write a function {name}(s) that returns the string s reversed.", name,
            f"def {name}(s):\n    return s[::-1]\n", lambda s: s[::-1], [(w,) for w in rng.sample(WORDS, 3)])


def _code_count_even(rng):
    name = rng.choice(["count_even", "count_evens"])
    return (f"Write a function {name}(nums) that returns how many numbers in the list are even.", name,
            f"def {name}(nums):\n    return sum(1 for x in nums if x % 2 == 0)\n",
            lambda xs: sum(1 for x in xs if x % 2 == 0), _int_lists(rng))


def _code_is_even(rng):
    name = rng.choice(["is_even", "even"])
    return (f"Write a function {name}(n) that returns True if n is even and False otherwise.", name,
            f"def {name}(n):\n    return n % 2 == 0\n", lambda n: n % 2 == 0, [(rng.randint(0, 99),) for _ in range(3)])


def _code_square(rng):
    name = rng.choice(["square", "squared"])
    return (f"Write a function {name}(x) that returns x squared.", name,
            f"def {name}(x):\n    return x * x\n", lambda x: x * x, [(rng.randint(-12, 12),) for _ in range(3)])


CODE_FAMILIES = [_code_add, _code_times, _code_sum, _code_max, _code_reverse, _code_count_even, _code_is_even,
                 _code_square]


def code_task(rng: random.Random) -> dict:
    instruction, name, source, reference, cases = rng.choice(CODE_FAMILIES)(rng)
    tests = "".join(f"assert {name}({', '.join(map(repr, args))}) == {reference(*args)!r}\n" for args in cases)
    return user_row(instruction, source, "code", tests=tests, entry_point=name)


def code_tasks(n: int, seed: int) -> list[dict]:
    rng = random.Random(f"code-{seed}")
    return [code_task(rng) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------- instruct
# Each family returns (instruction, the one correct response).
def _ins_upper(rng):
    w = rng.choice(WORDS)
    return f"Reply with the word {w} in uppercase.", w.upper()


def _ins_lower(rng):
    w = rng.choice(WORDS).upper()
    return f"Write the word {w} in lowercase.", w.lower()


def _ins_range(rng):
    a = rng.randint(0, 20)
    b = a + rng.randint(2, 6)
    return f"List the numbers from {a} to {b} separated by commas.", ", ".join(str(i) for i in range(a, b + 1))


def _ins_even(rng):
    n = rng.randint(0, 99)
    return f"Write 'yes' if {n} is even, otherwise write 'no'.", "yes" if n % 2 == 0 else "no"


def _ins_repeat(rng):
    w, k = rng.choice(WORDS), rng.randint(2, 4)
    return f"Repeat the word {w} {k} times, separated by spaces.", " ".join([w] * k)


def _ins_count_words(rng):
    words = rng.sample(WORDS, rng.randint(2, 6))
    return (f"How many words are in this sentence: '{' '.join(words)}'? Reply with a number only.",
            str(len(words)))


def _ins_json(rng):
    key, value = rng.choice(["name", "color", "item", "word"]), rng.choice(WORDS)
    return f'Return a JSON object with the key "{key}" set to "{value}".', json.dumps({key: value})


def _ins_bullets(rng):
    words = rng.sample(WORDS, 3)
    return f"Write the words {', '.join(words)} as a bulleted list.", "\n".join(f"- {w}" for w in words)


INSTRUCT_FAMILIES = [_ins_upper, _ins_lower, _ins_range, _ins_even, _ins_repeat, _ins_count_words, _ins_json,
                     _ins_bullets]


def instruct_task(rng: random.Random) -> dict:
    instruction, response = rng.choice(INSTRUCT_FAMILIES)(rng)
    return user_row(instruction, response, "instruct", answer=response)


def instruct_tasks(n: int, seed: int) -> list[dict]:
    rng = random.Random(f"instruct-{seed}")
    return [instruct_task(rng) for _ in range(n)]


def check_instruct(row: dict, response: str) -> bool:
    """The instruct checker: every instruction has exactly one correct response, stored in `answer`."""
    return response.strip() == row["answer"].strip()


# ---------------------------------------------------------------------------------------------------- pretraining
# Plain-text documents for the proxy base (taso_llm/proxy.py). They teach the sub-skills the proxy's SFT tasks compose
# but never their layout (no chat turns, no `####` answers) nor the math compositions (composed_word_problems): the
# base must already read numbers out of a sentence, know the fact table and carry a result into the next equation, so
# that fine-tuning has something to compose, and how well a method composes it is what the comparison measures.
#
# The fact table is every a + b = c and c - a = b with 0 <= a, b and c <= FACT_MAX: ~500 facts per operation, few
# enough that a 5M-parameter model sees each one dozens of times in pretraining. With sums up to 99 + 99 it knew 7% of
# them after 1000 steps, with c <= 70 9%, and every method's exact match was capped by that, not by how well it
# composed. Stories, chains and the composed task stay inside the table.
ARITHMETIC = {"+": operator.add, "-": operator.sub}
FACT_MAX = 30


def arithmetic_fact(rng) -> tuple[int, str, int, int]:
    """(a, op, b, result) drawn uniformly over the fact table: result c of a sum, or the minuend of a difference."""
    c = rng.randint(0, FACT_MAX)
    a = rng.randint(0, c)
    return (a, "+", c - a, c) if rng.random() < 0.5 else (c, "-", a, c - a)


def _doc_arithmetic(rng):
    lines = []
    for _ in range(rng.randint(6, 10)):
        a, op, b, result = arithmetic_fact(rng)
        lines.append(f"{a} {op} {b} = {result}.")
    return "\n".join(lines)


def _doc_copy(rng):
    return "\n".join(f"Copy the number {n}: {n}." for n in (rng.randint(0, 9999) for _ in range(rng.randint(4, 8))))


def _story_sentence(rng):
    """One event copied into its equation: a change to one count, or two people's counts added."""
    (name, pronoun), (other, _) = rng.sample(NAMES, 2)
    item, a = rng.choice(ITEMS), rng.randint(5, 20)
    kind = rng.randrange(3)
    if kind == 0:
        k = rng.randint(2, 10)
        return f"{name} has {a} {item}. {pronoun} {rng.choice(['buys', 'finds'])} {k} more, so {a} + {k} = {a + k}."
    if kind == 1:
        k = rng.randint(2, a - 2)
        return f"{name} has {a} {item}. {pronoun} gives {k} away, so {a} - {k} = {a - k}."
    b = rng.randint(2, 10)
    return f"{name} has {a} {item} and {other} has {b} {item}. Together they have {a} + {b} = {a + b} {item}."


def _doc_stories(rng):
    return "\n".join(_story_sentence(rng) for _ in range(rng.randint(3, 6)))


def _doc_chain(rng):
    """A running total: each equation starts from the previous result (carrying a number forward)."""
    total = rng.randint(5, 20)
    parts = [f"Start with {total}."]
    for _ in range(rng.randint(2, 4)):
        if (rng.random() < 0.5 or total < 12) and total <= FACT_MAX - 10:
            k = rng.randint(2, 10)
            parts.append(f"Add {k}: {total} + {k} = {total + k}.")
            total += k
        else:
            k = rng.randint(2, total - 2)
            parts.append(f"Take away {k}: {total} - {k} = {total - k}.")
            total -= k
    return " ".join(parts)


def _doc_code(rng):
    row = code_task(rng)
    return f"# {row['prompt'][0]['content']}\n{row['completion'][0]['content']}{row['tests']}"


def _doc_format(rng):
    return "\n\n".join(f"Instruction: {row['prompt'][0]['content']}\nResponse: {row['completion'][0]['content']}"
                        for row in (instruct_task(rng) for _ in range(rng.randint(2, 4))))


# (document kind, share of the documents): mostly the math sub-skills, which need the most data to become reliable.
PRETRAINING_DOCS = [(_doc_arithmetic, 0.40), (_doc_copy, 0.04), (_doc_stories, 0.18), (_doc_chain, 0.15),
                    (_doc_code, 0.16), (_doc_format, 0.07)]


def pretraining_text(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(f"pretraining-{seed}")
    kinds, shares = zip(*PRETRAINING_DOCS)
    return [rng.choices(kinds, shares)[0](rng) for _ in range(n_docs)]
