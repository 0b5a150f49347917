"""taso_llm.data: formats from local files, errors, mixtures, splits, length policy, TrlParser round trip.

Synthetic generators and the bundled set are covered in test_data_synthetic.py.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from taso_llm.data import DataArguments, DataFormatError, apply_length_policy, load_sft_splits
from taso_llm.data.convert import detect_format
from taso_llm.data.formats import mbpp_entry_point
from taso_llm.data.mixture import mixture_counts
from taso_llm.io import atomic_path, write_text

EXTENSIONS = ["jsonl", "json", "parquet"]


def write_rows(path, rows):
    """Write rows as JSONL, a JSON list or Parquet, chosen by the file extension."""
    if path.suffix == ".jsonl":
        write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        write_text(path, json.dumps(rows))
    else:
        from datasets import Dataset

        with atomic_path(path) as tmp:
            Dataset.from_list(rows).to_parquet(str(tmp))
    return path


def load_all(path, fmt="auto", **kwargs):
    """All rows of a file, in order (no held-out split)."""
    args = DataArguments(dataset_name=str(path), dataset_format=fmt, validation_size=0, **kwargs)
    return load_sft_splits(args)["train"]


def user(text):
    return {"role": "user", "content": text}


def sys(text):
    return {"role": "system", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


HUMANEVAL_TEST = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-3) == -2\n"

# format -> (raw row, expected converted row). Meta columns not given are expected to be "".
CASES = {
    "alpaca": ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"prompt": [user("Add the numbers.\n\n2 and 3")], "completion": [bot("5")], "task": "instruct"}),
    "messages": ({"messages": [sys("Be brief."), user("Hi"), bot("Hello"), user("2+2?"), bot("4")]},
                 {"prompt": [sys("Be brief."), user("Hi"), bot("Hello"), user("2+2?")], "completion": [bot("4")],
                  "task": "instruct"}),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hello"}]},
                 {"prompt": [sys("Be brief."), user("Hi")], "completion": [bot("Hello")], "task": "instruct"}),
    "gsm8k": ({"question": "Sam has 1,200 coins and finds 34. How many?",
               "answer": "1200 + 34 = <<1200+34=1234>>1234\n#### 1,234"},
              {"prompt": [user("Sam has 1,200 coins and finds 34. How many?")],
               "completion": [bot("1200 + 34 = <<1200+34=1234>>1234\n#### 1,234")], "task": "math", "answer": "1234"}),
    "metamath": ({"query": "What is 6 * 7?", "response": "6 * 7 = 42.\nThe answer is: 42", "type": "GSM_Rephrased"},
                 {"prompt": [user("What is 6 * 7?")], "completion": [bot("6 * 7 = 42.\nThe answer is: 42")],
                  "task": "math", "answer": "42"}),
    "codealpaca": ({"instruction": "Write a function that doubles x.", "input": "",
                    "output": "def f(x):\n    return 2 * x"},
                   {"prompt": [user("Write a function that doubles x.")],
                    "completion": [bot("def f(x):\n    return 2 * x")], "task": "code"}),
    "magicoder": ({"problem": "Reverse a string s.", "solution": "def rev(s):\n    return s[::-1]", "lang": "python"},
                  {"prompt": [user("Reverse a string s.")], "completion": [bot("def rev(s):\n    return s[::-1]")],
                   "task": "code"}),
    "mbpp": ({"task_id": 2, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
              "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]},
             {"prompt": [user("Write a function to add two numbers.\nYour code should pass these tests:\n"
                              "assert add(1, 2) == 3\nassert add(0, 0) == 0\n")],
              "completion": [bot("def add(a, b):\n    return a + b")], "task": "code",
              "tests": "assert add(1, 2) == 3\nassert add(0, 0) == 0\n", "entry_point": "add"}),
    "humaneval": ({"task_id": "HumanEval/0", "prompt": 'def inc(x):\n    """Return x + 1."""\n',
                   "canonical_solution": "    return x + 1\n", "test": HUMANEVAL_TEST, "entry_point": "inc"},
                  {"prompt": [user('def inc(x):\n    """Return x + 1."""\n')],
                   "completion": [bot('def inc(x):\n    """Return x + 1."""\n    return x + 1\n')],
                   "task": "code", "tests": HUMANEVAL_TEST + "\ncheck(inc)\n", "entry_point": "inc"}),
    "prompt_completion": ({"prompt": "Say hi.", "completion": "hi"},
                          {"prompt": [user("Say hi.")], "completion": [bot("hi")], "task": "instruct"}),
}


def expected_row(expected):
    return {"answer": "", "tests": "", "entry_point": "", **expected}


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("fmt", sorted(CASES))
def test_format_converts_exactly(tmp_path, fmt, ext):
    raw, expected = CASES[fmt]
    rows = load_all(write_rows(tmp_path / f"data.{ext}", [raw, raw]), fmt)
    assert len(rows) == 2
    assert rows[0] == expected_row(expected)


@pytest.mark.parametrize("fmt", sorted(set(CASES) - {"codealpaca"}))
def test_auto_detects_format(tmp_path, fmt):
    raw, expected = CASES[fmt]
    assert detect_format(list(raw), "auto", "x") == fmt
    assert load_all(write_rows(tmp_path / "data.jsonl", [raw]))[0] == expected_row(expected)


def test_codealpaca_columns_auto_detect_as_alpaca():
    # Identical columns: only an explicit dataset_format can tag them as code.
    assert detect_format(list(CASES["codealpaca"][0]), "auto", "x") == "alpaca"


def test_variants():
    from taso_llm.data.formats import alpaca, magicoder, mbpp

    assert alpaca({"instruction": "Do it.", "input": None, "output": "done"})["prompt"] == [user("Do it.")]
    assert magicoder({"instruction": "Q", "response": "A"})["completion"] == [bot("A")]
    sanitized = {"prompt": "Add.", "code": "def add(a, b):\n    return a + b", "test_list": ["assert add(1, 1) == 2"],
                 "test_imports": ["import math"]}
    assert mbpp(sanitized)["tests"] == "import math\nassert add(1, 1) == 2\n"
    assert mbpp_entry_point("assert math.isclose(area(2), 12.5, rel_tol=0.001)", "def area(r):\n    ...") == "area"


def test_humaneval_reference_passes_its_tests(tmp_path):
    row = load_all(write_rows(tmp_path / "he.jsonl", [CASES["humaneval"][0]]))[0]
    namespace = {}
    exec(row["completion"][0]["content"] + row["tests"], namespace)  # trusted fixture: runs check(inc)
    assert namespace["inc"](41) == 42


def test_detection_errors_list_columns(tmp_path):
    path = write_rows(tmp_path / "odd.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(DataFormatError, match=r"odd\.jsonl, field 'dataset_format': "
                                              r"cannot detect the format from columns \['foo', 'bar'\]"):
        load_all(path)
    with pytest.raises(DataFormatError, match=r"ambiguous.*\['alpaca', 'magicoder'\]"):
        detect_format(["instruction", "output", "response"], "auto", "x")
    gsm = write_rows(tmp_path / "alpaca.jsonl", [CASES["alpaca"][0]])
    with pytest.raises(DataFormatError, match=r"alpaca\.jsonl.*'gsm8k' needs columns.*'instruction'"):
        load_all(gsm, "gsm8k")


def good(fmt):
    return CASES[fmt][0]


# (format, bad row placed at index 1 after a good one, field named in the error, message fragment)
MALFORMED = [
    ("alpaca", {"instruction": "x"}, "output", "missing field"),
    ("alpaca", {"instruction": "x", "input": "", "output": "  "}, "output", "empty string"),
    ("messages", {"messages": [user("Hi"), bot("Hello"), user("again?")]}, "messages", "last message must be"),
    ("messages", {"messages": [user("Hi"), {"role": "robot", "content": "x"}]}, "messages[1].role", "unknown role"),
    ("messages", {"messages": [user("Hi"), bot("")]}, "messages[1].content", "empty completion"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}]}, "conversations", "last message"),
    ("gsm8k", {"question": "q", "answer": "the answer is 4"}, "answer", "no '#### <number>'"),
    ("gsm8k", {"question": "q", "answer": "#### four"}, "answer", "not a number"),
    ("mbpp", {"text": "t", "code": "def f(): pass", "test_list": []}, "test_list", "non-empty list"),
    ("prompt_completion", {"prompt": "p", "completion": ""}, "completion", "empty string"),
    ("humaneval", {**good("humaneval"), "entry_point": None}, "entry_point", "missing field"),
]


@pytest.mark.parametrize("fmt,bad,field,fragment", MALFORMED, ids=[f"{m[0]}-{m[2]}" for m in MALFORMED])
def test_malformed_row_names_file_row_field(tmp_path, fmt, bad, field, fragment):
    path = write_rows(tmp_path / f"bad_{fmt}.jsonl", [good(fmt), bad])
    with pytest.raises(DataFormatError) as info:
        load_all(path, fmt)
    err = info.value
    assert (err.source, err.row, err.field) == (str(path), 1, field)
    assert str(path) in str(err) and "row 1" in str(err) and f"'{field}'" in str(err) and fragment in str(err)


def test_wrong_type_names_row_and_field(tmp_path):
    # Numbers are text (test_data_files.py); a list where text belongs is still refused, by file, row and field.
    path = write_rows(tmp_path / "lists.jsonl", [{"instruction": "a", "output": ["x"]},
                                                 {"instruction": "b", "output": ["y"]}])
    with pytest.raises(DataFormatError,
                       match=r"lists\.jsonl, row 0 \(0-based\), field 'output': expected a string, got list"):
        load_all(path, "alpaca")


def test_missing_file_and_split(tmp_path):
    with pytest.raises(DataFormatError, match="nope.jsonl.*file not found"):
        load_all(tmp_path / "nope.jsonl")
    path = write_rows(tmp_path / "d.jsonl", [good("alpaca")])
    with pytest.raises(DataFormatError, match=r"no split 'test'; available splits: \['train'\]"):
        load_all(path, dataset_train_split="test")


# ------------------------------------------------------------------------------------------ mixtures and splits
def numbered(tmp_path, name, fmt, n):
    """n rows of one format whose prompts carry their index, so rows can be identified after mixing/splitting."""
    make = {
        "gsm8k": lambda i: {"question": f"{name} {i}: what is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"},
        "alpaca": lambda i: {"instruction": f"{name} {i}: say ok", "output": "ok"},
        "mbpp": lambda i: {"text": f"{name} {i}: return {i}", "code": f"def f{i}():\n    return {i}",
                           "test_list": [f"assert f{i}() == {i}"]},
    }[fmt]
    return str(write_rows(tmp_path / f"{name}.jsonl", [make(i) for i in range(n)]))


def prompt_texts(ds):
    return [row["prompt"][-1]["content"] for row in ds]


def test_mixture_counts_largest_remainder():
    assert mixture_counts({"a": 50, "b": 40, "c": 100}, {"a": 2, "b": 1, "c": 1}) == {"a": 50, "b": 25, "c": 25}
    # T = floor(10 / 0.3) = 33 -> raw 9.9 / 23.1 -> floors 9 / 23, the spare row goes to the larger remainder.
    assert mixture_counts({"a": 10, "b": 100}, {"a": 0.3, "b": 0.7}) == {"a": 10, "b": 23}
    assert mixture_counts({"a": 7, "b": 100, "c": 100}, {"a": 1, "b": 1, "c": 0}) == {"a": 7, "b": 7, "c": 0}


@pytest.fixture
def mixture(tmp_path):
    return {"math": {"path": numbered(tmp_path, "math", "gsm8k", 50), "weight": 2},
            "code": {"path": numbered(tmp_path, "code", "mbpp", 40), "format": "mbpp", "weight": 1},
            "chat": {"dataset_name": numbered(tmp_path, "chat", "alpaca", 100), "weight": 1.0}}


def test_mixture_weights_give_exact_counts_and_are_deterministic(mixture):
    def load(seed):
        return load_sft_splits(DataArguments(dataset_mixture=mixture, validation_size=0), seed=seed)["train"]

    first, again, other = load(0), load(0), load(1)
    assert Counter(first["task"]) == {"math": 50, "code": 25, "instruct": 25}
    assert prompt_texts(first) == prompt_texts(again)
    assert prompt_texts(first) != prompt_texts(other)
    assert len(set(prompt_texts(first))) == 100  # no row drawn twice


def test_validation_split_deterministic_disjoint_and_sized(tmp_path):
    path = numbered(tmp_path, "rows", "alpaca", 200)
    split = load_sft_splits(DataArguments(dataset_name=path, validation_size=0.1), seed=3)
    train, val = prompt_texts(split["train"]), prompt_texts(split["validation"])
    assert (len(train), len(val)) == (180, 20)
    assert not set(train) & set(val) and len(set(train) | set(val)) == 200
    def validation(seed):
        args = DataArguments(dataset_name=path, validation_size=0.1)
        return prompt_texts(load_sft_splits(args, seed=seed)["validation"])

    assert validation(3) == val and validation(4) != val
    assert len(load_sft_splits(DataArguments(dataset_name=path, validation_size=7))["validation"]) == 7
    with pytest.raises(DataFormatError, match="validation_size=200 leaves no training rows out of 200"):
        load_sft_splits(DataArguments(dataset_name=path, validation_size=200))


def test_test_split_and_max_train_samples(tmp_path):
    numbered(tmp_path / "ds", "train", "alpaca", 30)
    numbered(tmp_path / "ds", "test", "alpaca", 5)
    split = load_sft_splits(DataArguments(dataset_name=str(tmp_path / "ds"), dataset_test_split="test",
                                          max_train_samples=12), seed=0)
    assert prompt_texts(split["validation"]) == [f"test {i}: say ok" for i in range(5)]
    train = prompt_texts(split["train"])
    assert len(train) == 12 and all(t.startswith("train ") for t in train)
    again = load_sft_splits(DataArguments(dataset_name=str(tmp_path / "ds"), dataset_test_split="test",
                                          max_train_samples=12), seed=0)
    assert prompt_texts(again["train"]) == train


def test_system_prompt_prepended_unless_present(tmp_path):
    both = write_rows(tmp_path / "pc.jsonl", [{"prompt": [sys("Own.")], "completion": [bot("x")]},
                                              {"prompt": "Plain?", "completion": "y"}])
    rows = load_all(both, system_prompt="Answer carefully.")
    assert rows[0]["prompt"] == [sys("Own.")]
    assert rows[1]["prompt"] == [sys("Answer carefully."), user("Plain?")]


# ------------------------------------------------------------------------------------------------- length policy
def hand_count(tokenizer, messages, add_generation_prompt):
    """Token count by a second route: render the template to text, then tokenize the text."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def length_rows(tmp_path):
    rows = [{"prompt": "Say hi.", "completion": "hi"},
            {"prompt": "Count.", "completion": "1, 2, 3, 4, 5"},
            {"prompt": "Talk.", "completion": "word " * 60},
            {"prompt": "word " * 80, "completion": "ok"}]
    return load_all(write_rows(tmp_path / "len.jsonl", rows))


def test_length_policy_matches_hand_count(tmp_path, tiny_tokenizer, caplog):
    ds = length_rows(tmp_path)
    prompt_len = [hand_count(tiny_tokenizer, row["prompt"], True) for row in ds]
    total_len = [hand_count(tiny_tokenizer, row["prompt"] + row["completion"], False) for row in ds]
    limit = total_len[1]  # the medium row fits exactly: equal to max_length is not over
    assert total_len[0] < limit < total_len[2] and prompt_len[2] < limit <= prompt_len[3]

    with caplog.at_level("INFO", logger="taso_llm"):
        kept, stats = apply_length_policy(ds, tiny_tokenizer, limit, "drop")
    assert stats == {"rows": 4, "over_max_length": 2, "prompt_too_long": 1, "dropped": 2, "kept": 2,
                     "policy": "drop", "max_length": limit, "prompt_not_prefix": 0}
    assert [r["completion"][0]["content"] for r in kept] == ["hi", "1, 2, 3, 4, 5"]
    assert any("2 of 4 rows over" in rec.getMessage() for rec in caplog.records if rec.name == "taso_llm")

    kept, stats = apply_length_policy(ds, tiny_tokenizer, limit, "truncate")
    assert (stats["over_max_length"], stats["prompt_too_long"], stats["dropped"]) == (2, 1, 1)
    assert [r["completion"][0]["content"] for r in kept] == ["hi", "1, 2, 3, 4, 5", "word " * 60]

    # A prompt exactly max_length tokens long leaves no room for any completion token: dropped under both policies.
    _, stats = apply_length_policy(ds, tiny_tokenizer, prompt_len[0], "truncate")
    assert stats["prompt_too_long"] == sum(p >= prompt_len[0] for p in prompt_len) and stats["prompt_too_long"] >= 2
    with pytest.raises(ValueError, match="max_length_policy"):
        apply_length_policy(ds, tiny_tokenizer, limit, "clip")


def test_length_policy_reports_misaligned_prompt(tmp_path, tiny_tokenizer):
    # A completion starting with indentation merges with the template's trailing newline: the mask would be off.
    ds = load_all(write_rows(tmp_path / "ws.jsonl", [{"prompt": "Body?", "completion": "    return 1"},
                                                     {"prompt": "Say hi.", "completion": "hi"}]))
    assert apply_length_policy(ds, tiny_tokenizer, 64)[1]["prompt_not_prefix"] == 1


def test_rendered_prompt_is_token_prefix(tiny_tokenizer):
    rows = list(load_sft_splits(DataArguments(validation_size=0))["train"].select(range(60)))
    rows += [expected_row(expected) for _, expected in CASES.values()]
    for row in rows:
        prompt = tiny_tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)
        full = tiny_tokenizer.apply_chat_template(row["prompt"] + row["completion"], return_dict=True)
        n = len(prompt["input_ids"])
        assert full["input_ids"][:n] == prompt["input_ids"] and len(full["input_ids"]) > n


# --------------------------------------------------------------------------------------------------- arguments
def test_trl_parser_yaml_and_cli_round_trip(tmp_path, mixture):
    from trl import SFTConfig, TrlParser

    config = {"dataset_name": "taso-tiny", "validation_size": 10, "max_train_samples": 100,
              "dataset_mixture": mixture, "system_prompt": "Be exact.", "output_dir": str(tmp_path / "out"),
              "max_length": 256, "bf16": False, "use_cpu": True}
    write_text(tmp_path / "recipe.yaml", json.dumps(config))  # JSON is valid YAML
    parser = TrlParser((DataArguments, SFTConfig))
    data_args, sft = parser.parse_args_and_config(
        ["--config", str(tmp_path / "recipe.yaml"), "--max_train_samples", "50", "--max_length_policy", "drop"])
    assert data_args.dataset_mixture == mixture
    assert (data_args.validation_size, data_args.max_train_samples, data_args.max_length_policy) == (10, 50, "drop")
    assert (data_args.system_prompt, sft.max_length) == ("Be exact.", 256)
    splits = load_sft_splits(data_args)
    assert (len(splits["train"]), len(splits["validation"])) == (50, 10)
    assert splits["train"][0]["prompt"][0] == sys("Be exact.")

    (cli_args,) = TrlParser((DataArguments,)).parse_args_and_config(
        ["--dataset_mixture", json.dumps({"m": {"path": "x.jsonl", "weight": 0.5}}), "--validation_size", "0.2"])
    assert cli_args.dataset_mixture == {"m": {"path": "x.jsonl", "weight": 0.5}} and cli_args.validation_size == 0.2


@pytest.mark.parametrize("kwargs,fragment", [
    ({"dataset_format": "csv"}, "dataset_format: unknown format 'csv'"),
    ({"max_length_policy": "clip"}, "max_length_policy"),
    ({"validation_size": 2.5}, "validation_size"),
    ({"dataset_mixture": {"a": {"path": "x", "wieght": 1}}}, r"\['a'\]: unknown keys \['wieght'\]"),
    ({"dataset_mixture": {"a": {"path": "x", "weight": -1}}}, r"\['a'\].weight"),
    ({"dataset_mixture": {"a": {"weight": 1}}}, "exactly one of 'path' or 'dataset_name'"),
    ({"dataset_mixture": "{not json"}, "not valid JSON"),
])
def test_data_arguments_reject_bad_values(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        DataArguments(**kwargs)
