import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from taso_llm.eval.generate import MATH_TEXT_STOP, build_math_prompt, generate_batched, truncate_at
from taso_llm.tiny import tiny_model_path

PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Anna has 20 pencils. She finds 4 more. She gives 5 away. How many pencils now?"}],
    [{"role": "system", "content": "Reply briefly."}, {"role": "user", "content": "Write a function add(a, b)."}],
]


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def manual_greedy(model, tok, messages, max_new_tokens):
    """Reference: one unpadded prompt, full forward pass per step (no cache), argmax, stop at EOS."""
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(new, skip_special_tokens=True)


def test_batched_equals_one_by_one_greedy(tiny):
    model, tok = tiny
    lengths = {len(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False))
               for p in PROMPTS}
    assert len(lengths) == len(PROMPTS)  # different lengths, so the batch really is padded
    batched = generate_batched(model, tok, PROMPTS, max_new_tokens=12, batch_size=3)
    expected = [manual_greedy(model, tok, p, 12) for p in PROMPTS]
    assert all(expected)  # non-empty, so the comparison means something
    assert batched == expected


def test_restores_model_and_tokenizer_state(tiny):
    model, tok = tiny
    model.train()
    side = tok.padding_side
    generate_batched(model, tok, PROMPTS[:1], max_new_tokens=2)
    assert model.training and tok.padding_side == side
    model.eval()


def test_plain_text_prompt_and_stop(tiny):
    model, tok = tiny
    text = build_math_prompt("What is 2 + 3?", [("What is 1 + 1?", "1 + 1 = 2. #### 2")], use_chat_template=False)
    [out] = generate_batched(model, tok, [text], max_new_tokens=4, stop=["zzz-never"])
    assert isinstance(out, str) and "<|" not in out


def test_build_math_prompt():
    shots = [("q1?", "a1 #### 1"), ("q2?", "a2 #### 2")]
    chat = build_math_prompt("q3?", shots)
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant", "user"]
    assert chat[1]["content"] == "a1 #### 1" and chat[-1]["content"] == "q3?"
    text = build_math_prompt("q3?", shots, use_chat_template=False)
    assert text == "Question: q1?\nAnswer: a1 #### 1\n\nQuestion: q2?\nAnswer: a2 #### 2\n\nQuestion: q3?\nAnswer:"
    assert build_math_prompt("q?", [], use_chat_template=False) == "Question: q?\nAnswer:"


def test_truncate_at():
    assert truncate_at(" 5 #### 5\n\nQuestion: next", MATH_TEXT_STOP) == " 5 #### 5\n\n"
    assert truncate_at("a STOP b END c", ["END", "STOP"]) == "a "
    assert truncate_at("nothing", ["x"]) == "nothing"


def test_message_prompt_without_template_is_a_clear_error(tiny):
    model, tok = tiny
    tok2 = AutoTokenizer.from_pretrained(tiny_model_path())
    tok2.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        generate_batched(model, tok2, PROMPTS[:1], max_new_tokens=2)
