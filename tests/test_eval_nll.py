import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from taso_llm.eval import answer_nll
from taso_llm.eval.nll import _batch, completion_nll
from taso_llm.tiny import tiny_model_path

ROWS = [
    {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello there"}]},
    {"prompt": [{"role": "user", "content": "Anna has 20 pencils and buys 4 more. How many?"}],
     "completion": [{"role": "assistant", "content": "20 + 4 = 24.\n#### 24"}]},
    {"prompt": [{"role": "user", "content": "Write a function add(a, b)."}],
     "completion": [{"role": "assistant", "content": "def add(a, b):\n    return a + b\n"}]},
]


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def hand_nll(model, tok, rows, completion_only=True):
    """Independent reference: the template written out by hand, each row alone (no padding), explicit masking."""
    total, count = 0.0, 0
    for row in rows:
        prompt = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n{row['prompt'][0]['content']}<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n")
        answer = row["completion"][0]["content"] + "<|eot_id|>"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(prompt + answer, add_special_tokens=False)["input_ids"]
        assert ids[:len(p_ids)] == p_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        first = len(p_ids) if completion_only else 1
        for t in range(first, len(ids)):  # token t is predicted at position t - 1
            total -= logp[t - 1, ids[t]].item()
            count += 1
    return total / count, count


@pytest.mark.parametrize("batch_size", [1, 3])
def test_completion_nll_matches_hand_computation(tiny, batch_size):
    model, tok = tiny
    result = completion_nll(model, tok, Dataset.from_list(ROWS), batch_size=batch_size)
    expected, count = hand_nll(model, tok, ROWS)
    assert result["metrics"]["n_tokens"] == count
    assert result["metrics"]["nll"] == pytest.approx(expected, rel=1e-5)
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    # token-weighted: the per-row sums add up to the total, rows with more tokens weigh more
    per_row = result["per_row"]
    assert sum(r["n_tokens"] for r in per_row) == count
    assert sum(r["nll_sum"] for r in per_row) / count == pytest.approx(result["metrics"]["nll"])


def test_prompt_tokens_are_masked(tiny):
    model, tok = tiny
    all_tokens, _ = hand_nll(model, tok, ROWS, completion_only=False)
    got = answer_nll(model, tok, Dataset.from_list(ROWS))["metrics"]["nll"]
    # a random model is near-uniform, so the means are close; the match above holds to 1e-5, this gap is far larger
    assert abs(got - all_tokens) > 1e-4


def test_batch_labels_mask_prompt_and_padding():
    input_ids, attention, labels = _batch([([1, 2, 3, 4, 5], 3), ([6, 7, 8], 1)], pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 4, 5], [-100, 7, 8, -100, -100]]


def test_truncation_and_errors(tiny):
    model, tok = tiny
    result = completion_nll(model, tok, Dataset.from_list(ROWS), max_length=20)
    assert result["metrics"]["truncated_rows"] >= 1
    with pytest.raises(ValueError, match="empty"):
        completion_nll(model, tok, Dataset.from_list(ROWS).select([]))
    with pytest.raises(ValueError, match="no completion tokens"):
        completion_nll(model, tok, Dataset.from_list(ROWS), max_length=5)


def test_standard_rows_are_scored_as_trl_trains_them(tiny):
    """Plain-text rows (prompt_format: standard): prompt, then completion + eos, no template; only the completion and
    its eos are scored. Reference: the strings written out by hand, each row alone."""
    model, tok = tiny
    rows = [{"prompt": r["prompt"][0]["content"] + "\n", "completion": r["completion"][0]["content"]} for r in ROWS]
    total, count = 0.0, 0
    for row in rows:
        p_ids = tok(row["prompt"])["input_ids"]
        ids = tok(row["prompt"] + row["completion"] + "<|eot_id|>")["input_ids"]
        assert ids[:len(p_ids)] == p_ids and "<|start_header_id|>" not in tok.decode(ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        total -= sum(logp[t - 1, ids[t]].item() for t in range(len(p_ids), len(ids)))
        count += len(ids) - len(p_ids)
    result = completion_nll(model, tok, Dataset.from_list(rows), batch_size=2)
    assert result["metrics"]["n_tokens"] == count
    assert result["metrics"]["nll"] == pytest.approx(total / count, rel=1e-5)
    # the same answers after the chat template's rendering of the prompt score differently: the layout is honoured
    chat = completion_nll(model, tok, Dataset.from_list(ROWS))["metrics"]
    assert chat["n_tokens"] == count and abs(chat["nll"] - total / count) > 1e-4
