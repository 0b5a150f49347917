"""Standard (non-conversational) prompt-completion training for a base model without a chat template (issue 11 §5).

The reference is TRL's rule for standard rows, written out independently here: the input is tokenizer(prompt +
completion + eos), the labels are -100 over tokenizer(prompt) and the token ids after it.
"""

from __future__ import annotations

import shutil

import pytest
from datasets import Value
from test_data import load_all, write_rows
from transformers import AutoTokenizer
from trl import ModelConfig, SFTConfig

from taso_llm.data import DataArguments, DataFormatError, apply_length_policy, load_sft_splits
from taso_llm.loading import load_model_and_tokenizer, load_tokenizer

ROWS = [{"prompt": "Q: 2+3?\nA:", "completion": " 5"}, {"prompt": "Name a color.", "completion": "Red, like a rose."}]


@pytest.fixture(scope="session")
def base_path(tiny_path, tmp_path_factory):
    """The tiny model as a base model: same weights and vocabulary, no chat template."""
    path = tmp_path_factory.mktemp("base") / "tiny-base"
    shutil.copytree(tiny_path, path)
    (path / "chat_template.jinja").unlink()
    return path


@pytest.fixture(scope="session")
def base_tokenizer(base_path):
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(base_path)))
    assert not tokenizer.chat_template
    return tokenizer


def load(path, tokenizer, **kwargs):
    return load_sft_splits(DataArguments(dataset_name=str(path), validation_size=0, **kwargs), tokenizer=tokenizer)


def test_rows_without_chat_template_are_plain_text(tmp_path, base_tokenizer):
    plain = load(write_rows(tmp_path / "pc.jsonl", ROWS), base_tokenizer)["train"]
    assert isinstance(plain.features["prompt"], Value) and isinstance(plain.features["completion"], Value)
    assert [(r["prompt"], r["completion"]) for r in plain] == [(r["prompt"], r["completion"]) for r in ROWS]
    # Other formats: the user turn then a newline, as the evaluation prompts a base model.
    alpaca = load(write_rows(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "2 and 3", "output": "5"}]),
                  base_tokenizer)["train"]
    assert (alpaca[0]["prompt"], alpaca[0]["completion"]) == ("Add.\n\n2 and 3\n", "5")


def test_prompt_format_choices(tmp_path, tiny_tokenizer, base_tokenizer):
    path = write_rows(tmp_path / "pc.jsonl", ROWS)
    assert load(path, tiny_tokenizer)["train"][0]["prompt"] == [{"role": "user", "content": ROWS[0]["prompt"]}]
    assert load(path, tiny_tokenizer, prompt_format="standard")["train"][0]["prompt"] == ROWS[0]["prompt"]
    with pytest.raises(ValueError, match="prompt_format='conversational'.*no chat template.*chat_template_path"):
        load(path, base_tokenizer, prompt_format="conversational")
    with pytest.raises(ValueError, match="prompt_format: expected one of"):
        DataArguments(prompt_format="chatml")


def test_conversations_without_template_are_refused_by_row(tmp_path, base_tokenizer):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rows = [{"messages": turns}, {"messages": [{"role": "system", "content": "Be brief."}, *turns]}]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"chat\.jsonl, row 1 \(0-based\), field 'messages': the prompt has "
                                              r"turns \['system', 'user'\].*chat_template_path"):
        load(path, base_tokenizer)
    # A system prompt has no plain form either: refused before any file is read.
    with pytest.raises(ValueError, match="system_prompt: standard"):
        load(tmp_path / "missing.jsonl", base_tokenizer, system_prompt="Be brief.")


def test_length_policy_counts_standard_rows_as_trl_tokenizes_them(tmp_path, base_tokenizer):
    rows = load(write_rows(tmp_path / "pc.jsonl", ROWS), base_tokenizer)["train"]
    eos = base_tokenizer.eos_token
    totals = [len(base_tokenizer(r["prompt"] + r["completion"] + eos)["input_ids"]) for r in ROWS]
    limit = min(totals)
    kept, stats = apply_length_policy(rows, base_tokenizer, limit, "drop")
    assert (stats["over_max_length"], stats["kept"], stats["prompt_not_prefix"]) == (1, 1, 0)
    assert kept[0]["completion"] == ROWS[totals.index(limit)]["completion"]


def test_conversational_rows_need_a_template_to_measure(tmp_path, base_tokenizer):
    rows = load_all(write_rows(tmp_path / "pc.jsonl", ROWS))  # loaded without the tokenizer: conversational
    with pytest.raises(ValueError, match="conversational but the tokenizer .* has no chat template"):
        apply_length_policy(rows, base_tokenizer, 64)


def test_base_model_trains_on_completion_and_eos_only(tmp_path, base_path, base_tokenizer):
    from taso_llm.train import build_trainer

    model_args = ModelConfig(model_name_or_path=str(base_path))
    splits = load(write_rows(tmp_path / "pc.jsonl", ROWS * 2), base_tokenizer)
    model, tokenizer = load_model_and_tokenizer(model_args, tokenizer=base_tokenizer)
    train, _ = apply_length_policy(splits["train"], tokenizer, 64)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                     report_to=[], save_strategy="no", max_length=64, bf16=False)
    trainer = build_trainer(model, tokenizer, train, None, args, base_model_id=str(base_path))
    for i, row in enumerate(ROWS):
        example = trainer.train_dataset[i]
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full_ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        assert example["input_ids"] == full_ids
        labels = trainer.data_collator([example])["labels"][0].tolist()
        assert labels == [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
        assert tokenizer.decode(full_ids[len(prompt_ids):]) == row["completion"] + tokenizer.eos_token
    assert trainer.train().training_loss > 0


def test_chat_template_path_makes_a_base_model_conversational(tmp_path, tiny_path, base_path):
    from taso_llm.train import build_trainer

    template = tmp_path / "template.jinja"
    template.write_text(AutoTokenizer.from_pretrained(tiny_path).chat_template)
    for source in (str(template), str(tiny_path)):  # a Jinja file, or a tokenizer to copy the template from
        model_args = ModelConfig(model_name_or_path=str(base_path))
        tokenizer = load_tokenizer(model_args, chat_template_path=source)
        assert tokenizer.chat_template == template.read_text()
        rows = load(write_rows(tmp_path / "pc.jsonl", ROWS), tokenizer)["train"]
        assert rows[0]["prompt"] == [{"role": "user", "content": ROWS[0]["prompt"]}]
        model, tokenizer = load_model_and_tokenizer(model_args, chat_template_path=source, tokenizer=tokenizer)
        vocab, embeddings = len(tokenizer), model.get_input_embeddings().num_embeddings
        assert embeddings >= vocab
        # SFTTrainer applies SFTConfig.chat_template_path again: a no-op on what was already applied.
        args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_length=64, bf16=False,
                         chat_template_path=source)
        trainer = build_trainer(model, tokenizer, rows, None, args, base_model_id=str(base_path))
        assert (len(trainer.processing_class), model.get_input_embeddings().num_embeddings) == (vocab, embeddings)
        assert trainer.processing_class.chat_template == template.read_text()
