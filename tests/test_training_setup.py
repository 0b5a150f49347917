"""The trainer sees what TASO intends: completion-only labels in calibration batches, an optimizer over adapter
parameters only, and the learning-rate multiplier applied."""

import torch
from trl import SFTConfig

from taso_llm.sparse.calibration import calibration_batches
from taso_llm.config import MethodArguments
from taso_llm.data import DataArguments, load_sft_splits
from taso_llm.methods import RunContext, get_method
from taso_llm.methods.taso import TasoArguments
from taso_llm.train import build_trainer


def _trainer(model, tok, tmp_path):
    splits = load_sft_splits(DataArguments(dataset_name="taso-tiny", max_train_samples=48), seed=0)
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, max_length=128, report_to="none",
                     per_device_train_batch_size=8, max_steps=1, learning_rate=1e-3)
    return build_trainer(model, tok, splits["train"], None, args, base_model_id="taso-tiny")


def test_calibration_batches_mask_prompts(tiny_model, tiny_tokenizer, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, tmp_path)
    batches = list(calibration_batches(trainer.train_dataset, trainer.data_collator, samples=20, batch_size=8))
    assert [len(b["input_ids"]) for b in batches] == [8, 8, 4]
    first = trainer.train_dataset[0]
    labels = batches[0]["labels"][0]
    # Independent reference: the chat-rendered prompt's length; every token after it is a completion token.
    n_prompt = len(tiny_tokenizer.apply_chat_template(first["prompt"], add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
    n = len(first["input_ids"])
    assert n_prompt > 5 and (labels[:n_prompt] == -100).all()  # prompt tokens carry no loss
    assert torch.equal(labels[n_prompt:n], torch.tensor(first["input_ids"][n_prompt:]))
    # the same batches whatever the world size: rank r of w gets every w-th batch
    r0 = list(calibration_batches(trainer.train_dataset, trainer.data_collator, 20, 8, rank=0, world_size=2))
    assert torch.equal(r0[0]["input_ids"], batches[0]["input_ids"])


def test_optimizer_holds_adapter_params_only(tiny_model, tiny_tokenizer, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, tmp_path)
    shared = MethodArguments(calibration_samples=16, calibration_batch_size=8)
    ctx = RunContext(output_dir=tmp_path, model_id="taso-tiny", show_progress=False, num_calibration_batches=2,
                     calibration=lambda: calibration_batches(trainer.train_dataset, trainer.data_collator, 16, 8))
    report = get_method("taso").prepare(trainer.model, shared, TasoArguments(), ctx).to_metrics()
    optimizer = trainer.create_optimizer()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapter = {id(p) for n, p in trainer.model.named_parameters() if ".update." in n}
    assert in_optimizer == adapter
    assert sum(p.numel() for n, p in trainer.model.named_parameters() if ".update." in n) == report["trainable_params"]
    assert report["trainable_params"] <= report["lora_r1_params"]
    assert report["lr_multiplier"] > 1.0  # sqrt scaling: narrower than a rank-1 LoRA
