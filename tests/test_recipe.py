"""The recipe end to end on the embedded default, and bad configs stopped before any heavy work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from taso_llm.adapters.io import load_adapter
from taso_llm.config import sft_parser

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sft_taso.py"
DEFAULT = ROOT / "recipes" / "configs" / "tiny" / "instruct_taso.yaml"


def _parse(argv):
    return sft_parser().parse_args_and_config(argv)


def test_yaml_and_cli_override_parse():
    data, taso, train, model, *method_args = _parse(["--config", str(DEFAULT), "--budget", "rank2",
                                                     "--taso_adapter_rank", "2", "--output_dir", "/tmp/x",
                                                     "--target_modules", "q_proj", "v_proj"])
    own = next(a for a in method_args if hasattr(a, "taso_structure"))
    assert taso.budget == "rank2" and own.taso_adapter_rank == 2 and own.taso_structure == "lora_block"
    assert taso.target_modules == ["q_proj", "v_proj"]
    assert model.model_name_or_path == "taso-tiny" and data.dataset_name == "taso-tiny"
    assert train.output_dir == "/tmp/x" and train.max_length == 256


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail loudly if a bad config got as far as loading weights or scoring importance."""
    import taso_llm.run as run
    import taso_llm.sparse.statistics as statistics

    def boom(*a, **k):
        raise AssertionError("heavy work started before the config was rejected")

    monkeypatch.setattr(run, "load_model_and_tokenizer", boom)
    monkeypatch.setattr(statistics, "estimate_importance", boom)


@pytest.mark.parametrize("override, message", [
    (["--target_modules", "q_proj", "qkv_proj"], "qkv_proj"),
    (["--budget", "3", "--taso_adapter_rank", "4"], "budget='3'"),
    (["--taso_structure", "diagonal"], "taso_structure='diagonal'"),
    (["--method", "lora", "--save_merged", "true"], "save_merged"),
    (["--method", "dora"], "method='dora'"),
    (["--method", "lora", "--taso_structure", "entries"], "taso_structure='entries' is an option of another"),
    (["--budget_scope", "layer"], "budget_scope='layer'"),
    (["--budget_scope", "model", "--budget_floor", "2"], "budget_floor=2"),
    (["--learning_rate", "-1"], "learning_rate=-1"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0"),
    (["--num_train_epochs", "0"], "num_train_epochs=0"),
    (["--dataset_name", "{missing}"], "output"),
])
def test_bad_config_stops_early_and_names_it(tmp_path, no_heavy_work, override, message):
    from taso_llm.run import run_sft

    if "{missing}" in override:  # a data file whose second row lacks the alpaca `output` field
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
        override = ["--dataset_name", str(bad), "--dataset_format", "alpaca"]
    args = _parse(["--config", str(DEFAULT), "--output_dir", str(tmp_path / "out"), *override])
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        run_sft(*args)
    assert not (tmp_path / "out" / "masks.safetensors").exists()


@pytest.mark.slow
def test_default_recipe_end_to_end(tmp_path, tiny_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(RECIPE), "--output_dir", str(out), "--num_train_epochs", "2",
           "--save_merged", "true", "--save_steps", "1000", "--eval_strategy", "no"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("trainable_params", "lora_r1_params", "first_train_loss", "last_train_loss", "importance_seconds",
                "train_seconds", "tokens_per_second", "peak_rss_bytes"):
        assert metrics[key] is not None, key
    assert metrics["trainable_params"] <= metrics["lora_r1_params"]
    assert metrics["last_train_loss"] < metrics["first_train_loss"] - 0.05  # it learns
    for name in ("adapter_config.json", "adapter_model.safetensors", "masks.safetensors", "training.png",
                 "peft_lora/adapter_config.json", "merged/config.json"):
        assert (out / name).is_file(), name

    # The three artifacts reproduce the same function of the fresh base.
    tok = AutoTokenizer.from_pretrained(tiny_path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        adapter = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_path), out)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_path)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")(ids).logits
        from peft import PeftModel

        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), out / "peft_lora")(ids).logits
    assert (adapter - base).abs().max() > 1e-4
    torch.testing.assert_close(merged, adapter, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(peft, adapter, rtol=1e-4, atol=1e-4)

    # Reusing the saved masks gives the same adapter structure without importance.
    out2 = tmp_path / "reuse"
    cmd = [sys.executable, str(RECIPE), "--output_dir", str(out2), "--max_steps", "2", "--export_peft", "false",
           "--masks_path", str(out / "masks.safetensors"), "--eval_strategy", "no"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["masks_reused_from"] == str(out / "masks.safetensors") and m2["importance_batches"] == 0
    a = json.loads((out / "adapter_config.json").read_text())["modules"]
    b = json.loads((out2 / "adapter_config.json").read_text())["modules"]
    assert a == b
    from safetensors.torch import load_file

    sa, sb = load_file(out / "adapter_model.safetensors"), load_file(out2 / "adapter_model.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.endswith((".rows", ".cols")))
