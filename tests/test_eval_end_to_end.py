import json

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from taso_llm.eval import evaluate_instruct, run_evaluation, select_task
from taso_llm.tiny import tiny_model_path


def row(task, user, completion, answer="", tests="", entry_point=""):
    return {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": completion}],
            "task": task, "answer": answer, "tests": tests, "entry_point": entry_point}


ROWS = [
    row("math", "Anna has 20 pencils. She finds 4 more. How many?", "20 + 4 = 24.\n#### 24", answer="24"),
    row("math", "Tom has 7 books and sells 2. How many left?", "7 - 2 = 5.\n#### 5", answer="5"),
    row("math", "What is 3 times 4?", "3 * 4 = 12.\n#### 12", answer="12"),
    row("code", "Write a function add(a, b).", "def add(a, b):\n    return a + b\n",
        tests="assert add(1, 2) == 3\n", entry_point="add"),
    row("code", "Write a function square(x).", "def square(x):\n    return x * x\n",
        tests="assert square(3) == 9\n", entry_point="square"),
    row("code", "Write a function neg(x).", "def neg(x):\n    return -x\n", tests="assert neg(1) == -1\n",
        entry_point="neg"),
    row("instruct", "Say hello.", "Hello!"),
    row("instruct", "List two colours.", "- red\n- blue"),
    row("instruct", "Reply with yes.", "yes"),
]


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("task, metric_keys, record_keys, opts", [
    ("math", {"strict_match", "flexible_match", "n", "answer_nll"},
     {"prompt", "generated", "gold", "strict_pred", "flexible_pred", "strict_correct", "flexible_correct"},
     {"with_nll": True}),
    ("code", {"pass@1", "n", "status_counts"},
     {"prompt", "generated", "code", "passed", "status", "stderr_tail", "seconds"}, {}),
    ("instruct", {"loss", "perplexity", "n_tokens", "n"}, {"prompt", "reference", "nll", "n_tokens"}, {}),
])
def test_run_evaluation_writes_json(tiny, tmp_path, task, metric_keys, record_keys, opts):
    model, tok = tiny
    if task != "instruct":
        opts = {**opts, "max_new_tokens": 8}
    out = tmp_path / "sub" / f"{task}.json"
    result = run_evaluation(model, tok, Dataset.from_list(ROWS), task, out, batch_size=2, **opts)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["task"] == task and set(saved) == {"task", "metrics", "records"}
    assert metric_keys <= set(saved["metrics"])
    assert saved["metrics"]["n"] == 3 and len(saved["records"]) == 3  # only this task's rows
    for record in saved["records"]:
        assert record_keys <= set(record)
    assert not list(tmp_path.glob("sub/.*.tmp"))  # atomic write left no temp file


def test_math_scores_are_consistent_with_records(tiny):
    model, tok = tiny
    result = run_evaluation(model, tok, Dataset.from_list(ROWS), "math", limit=2, max_new_tokens=4,
                            fewshot=[("What is 1 + 1?", "1 + 1 = 2.\n#### 2")])
    assert result["metrics"]["n"] == 2 and result["metrics"]["num_fewshot"] == 1
    assert result["metrics"]["strict_match"] == sum(r["strict_correct"] for r in result["records"]) / 2
    assert [m["role"] for m in result["records"][0]["prompt"]] == ["user", "assistant", "user"]


def test_judge_hook(tiny):
    model, tok = tiny
    calls = []

    def judge(prompt, response):
        calls.append((prompt, response))
        return 1.0 if len(calls) == 1 else 0.0

    ds = select_task(Dataset.from_list(ROWS), "instruct")
    result = evaluate_instruct(model, tok, ds, batch_size=2, judge=judge, max_new_tokens=4)
    assert len(calls) == 3 and calls[0][0] == ROWS[6]["prompt"]
    assert result["metrics"]["judge_mean"] == pytest.approx(1 / 3)
    assert all("generated" in r and "judge_score" in r for r in result["records"])
    with pytest.raises(ValueError, match="judge must return a number"):
        evaluate_instruct(model, tok, ds, judge=lambda p, r: "good", max_new_tokens=2)


def test_clear_errors(tiny):
    model, tok = tiny
    ds = Dataset.from_list(ROWS)
    with pytest.raises(ValueError, match="unknown task"):
        run_evaluation(model, tok, ds, "poetry")
    with pytest.raises(ValueError, match="no rows with task"):
        run_evaluation(model, tok, ds.filter(lambda r: r["task"] != "code"), "code")
    with pytest.raises(ValueError, match="lacks columns"):
        run_evaluation(model, tok, ds.remove_columns("answer"), "math")


@pytest.mark.parametrize("task", ["math", "code", "instruct"])
def test_standard_rows_are_prompted_as_trained(tiny, task):
    """A run trained on plain-text rows (prompt_format: standard) is prompted with the row's prompt string exactly:
    no chat template and no "Question:" frame; greedy output equals generating from that string directly."""
    import torch

    model, tok = tiny
    rows = [{**r, "prompt": r["prompt"][0]["content"] + "\n", "completion": r["completion"][0]["content"]}
            for r in ROWS if r["task"] == task]
    opts = {} if task == "instruct" else {"max_new_tokens": 6}
    result = run_evaluation(model, tok, Dataset.from_list(rows), task, batch_size=2, use_chat_template=False, **opts)
    assert [r["prompt"] for r in result["records"]] == [r["prompt"] for r in rows]
    if task == "instruct":
        return
    ids = tok(rows[0]["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert result["records"][0]["generated"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split(
        "Question:")[0]
