import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from script_loader import load_script  # noqa: E402


@pytest.fixture(scope="module")
def cli():
    return load_script("recipes/evaluate.py", "evaluate_recipe")


def test_cli_math_with_fewshot(cli, tmp_path):
    out = tmp_path / "math.json"
    result = cli.main(["--task", "math", "--limit", "2", "--max_new_tokens", "4", "--num_fewshot", "1",
                       "--output", str(out)])
    saved = json.loads(out.read_text())
    assert saved["task"] == "math" and saved["metrics"]["n"] == 2 and saved["metrics"]["num_fewshot"] == 1
    assert saved["metrics"] == result["metrics"]


def test_cli_peft_adapter_changes_the_model(cli, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from taso_llm.tiny import tiny_model_path

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    # init_lora_weights=False: a non-zero update, so the adapter visibly changes the loss
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")

    args = ["--task", "instruct", "--limit", "2"]
    plain = cli.main(args + ["--output", str(tmp_path / "plain.json")])
    adapted = cli.main(args + ["--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "adapted.json")])
    assert adapted["metrics"]["n_tokens"] == plain["metrics"]["n_tokens"]
    assert adapted["metrics"]["loss"] != pytest.approx(plain["metrics"]["loss"], abs=1e-6)


def test_cli_errors(cli, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        cli.main(["--task", "instruct", "--limit", "1", "--adapter", str(tmp_path), "--output",
                  str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        cli.main(["--task", "code", "--num_fewshot", "2"])


def test_cli_taso_adapter_changes_the_model(cli, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from taso_llm.adapters import attach_updates, iter_adapters
    from taso_llm.adapters.io import save_adapter
    from taso_llm.sparse.regions import Region
    from taso_llm.tiny import tiny_model_path

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    region = Region("dense_block", (64, 64), torch.arange(16), torch.arange(16))
    attach_updates(model, {"model.layers.0.self_attn.q_proj": region})
    with torch.no_grad():
        for _, wrapper in iter_adapters(model):
            for p in wrapper.update.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    save_adapter(model, tmp_path / "adapter", base_model="taso-tiny")

    args = ["--task", "instruct", "--limit", "2"]
    plain = cli.main(args + ["--output", str(tmp_path / "plain.json")])
    adapted = cli.main(args + ["--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "adapted.json")])
    assert adapted["metrics"]["loss"] != pytest.approx(plain["metrics"]["loss"], abs=1e-6)
