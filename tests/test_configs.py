"""Every recipe parses with the recipe's own TrlParser and names valid values; the files match their generator."""

import sys
from pathlib import Path

import pytest
import yaml
from taso_llm.config import sft_parser, validate_shared_args
from taso_llm.data.formats import FORMATS
from taso_llm.methods import METHODS, get_method
from taso_llm.run import method_options
from taso_llm.sparse.regions import parse_budget

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
sys.path.insert(0, str(CONFIGS))
import generate  # noqa: E402  (recipes/configs/generate.py: the table the recipes are written from)

RECIPES = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "compare")
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def parse(path: Path):
    argv = ["--config", str(path), "--output_dir", "/tmp/unused"]
    if yaml.safe_load(path.read_text()).get("bf16"):
        argv += ["--bf16", "false"]  # CPU: SFTConfig refuses bf16 without a bf16-capable device
    data, shared, train, model, *own = sft_parser().parse_args_and_config(argv)
    return data, shared, train, model, method_options(get_method(shared.method), own)


def test_every_model_task_method_exists():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    for model in ("llama-3.1-8b", "qwen2.5-7b", "tiny"):
        for task in ("instruct", "math", "code"):
            for method in ("taso", "qlora", "lora_r1", "sparta", "droplora", "smoa"):
                assert (model, f"{task}_{method}") in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_parses_and_fields_are_valid(path):
    data, taso, train, model, own = parse(path)
    assert taso.method in METHODS
    assert data.dataset_format == "auto" or data.dataset_format in FORMATS
    assert parse_budget(taso.budget, (64, 64)) > 0
    validate_shared_args(taso, {"probe": (4096, 4096)})
    get_method(taso.method).validate(taso, own, {"probe": (4096, 4096)}, model)  # structure, rank, lr_scaling, ...
    task, method = path.stem.rsplit("_", 1) if not path.stem.endswith("lora_r1") else (path.stem[:-8], "lora_r1")
    assert train.output_dir == "/tmp/unused" and train.learning_rate > 0
    if path.parent.name == "tiny":
        assert model.model_name_or_path == "taso-tiny" and not train.bf16
        source = data.dataset_name
        assert source == "taso-tiny" or (ROOT / source).is_file(), source  # bundled or committed generated data
    else:
        assert model.model_name_or_path in ("meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B")
        assert yaml.safe_load(path.read_text())["bf16"] is True
        expected = {"instruct": "yahma/alpaca-cleaned", "math": "meta-math/MetaMathQA",
                    "code": "ise-uiuc/Magicoder-OSS-Instruct-75K"}[task]
        assert data.dataset_name == expected
    if method == "qlora":
        assert model.load_in_4bit and model.bnb_4bit_quant_type == "nf4" and model.use_bnb_nested_quant
        assert (model.lora_r, model.lora_alpha, model.lora_dropout) == (16, 32, 0.05)
        assert set(model.lora_target_modules) == PROJECTIONS
        if path.parent.name != "tiny":
            assert train.learning_rate == 2e-4
            assert yaml.safe_load(path.read_text())["dtype"] == "bfloat16"  # = the 4-bit compute dtype
    if method == "lora_r1":
        assert taso.method == "lora" and model.lora_r == 1 and not model.load_in_4bit
        assert set(model.lora_target_modules) == PROJECTIONS
    if method == "taso":
        assert taso.method == "taso" and taso.budget == "rank1" and own.taso_structure == "lora_block"
        assert own.taso_adapter_rank == 4 and set(taso.target_modules) == PROJECTIONS
    if method == "sparta":  # the authors' layout: random entries of V and O at density 0.01
        assert taso.target_modules == ["v_proj", "o_proj"] and own.sparta_density == 0.01
    if method == "droplora":  # the authors' recipes: r32/a64 (r64/a128 for math on the GPU models), p 0.5
        r = 64 if task == "math" and path.parent.name != "tiny" else 32
        assert (own.droplora_r, own.droplora_alpha, own.droplora_p) == (r, 2.0 * r, 0.5)
        assert set(taso.target_modules) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    if method == "smoa":  # the authors' defaults: K=2, r=8, alpha=8 on q, k, v, up, down
        assert (own.smoa_subspaces, own.smoa_rank, own.smoa_alpha) == (2, 8, 8.0) and taso.budget == "rank1"
        assert set(taso.target_modules) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}


def test_recipes_and_data_match_the_generator(tmp_path):
    for path, text in generate.all_recipes().items():
        assert path.read_text() == text, f"{path} is stale: run python recipes/configs/generate.py"
    from taso_llm.proxy import write_task_data

    for path, (task, n, seed) in generate.tiny_data_files().items():
        fresh = write_task_data(tmp_path / path.name, task, n, seed)
        assert path.read_bytes() == fresh.read_bytes(), f"{path} is stale"


def test_gpu_eval_sources_are_stated():
    """The math recipes say where they are evaluated (GSM8K main test), the code ones MBPP / HumanEval."""
    for model in ("llama-3.1-8b", "qwen2.5-7b"):
        assert "openai/gsm8k, config main, split test" in (CONFIGS / model / "math_taso.yaml").read_text()
        assert "mbpp" in (CONFIGS / model / "code_qlora.yaml").read_text()


@pytest.mark.parametrize("path", sorted((CONFIGS / "compare").glob("*.yaml")), ids=lambda p: p.stem)
def test_compare_configs_parse_and_name_existing_recipes(path):
    from taso_llm.compare.config import check_recipes, load_compare_config

    config = load_compare_config(path)
    check_recipes(config, ROOT)
    assert len(config.seeds) >= 1 and all(m.lr_grid for m in config.methods.values())
