"""Writes every `<model>/<task>_<method>.yaml` recipe from one table, so the files cannot drift apart.

    python recipes/configs/generate.py            # rewrite the files (tests/test_configs.py checks they are current)

A recipe is: model block + data block (per task) + method block (per method) + training block (per model size).
Edit the tables here, not the YAML files. Each file stays a plain TrlParser config (no includes), so a user can copy
one and edit it by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = ("instruct", "math", "code")
METHODS = ("taso", "qlora", "lora_r1", "sparta", "droplora", "smoa", "talos")

GPU_MODELS = {"llama-3.1-8b": "meta-llama/Llama-3.1-8B", "qwen2.5-7b": "Qwen/Qwen2.5-7B"}
# Where each task is evaluated after training (recipes/evaluate.py / recipes/compare.py): not a TrlParser field, so
# it is written as a comment into the recipe.
GPU_EVAL = {"instruct": "held-out alpaca-cleaned rows: answer NLL (+ a judge hook)",
            "math": "openai/gsm8k, config main, split test (format gsm8k): strict + flexible exact match",
            "code": "mbpp (test) and openai/openai_humaneval (test): pass@1 in the sandbox"}
GPU_DATA = {
    "instruct": dict(dataset_name="yahma/alpaca-cleaned", dataset_format="alpaca", validation_size=500),
    "math": dict(dataset_name="meta-math/MetaMathQA", dataset_format="metamath", validation_size=500),
    "code": dict(dataset_name="ise-uiuc/Magicoder-OSS-Instruct-75K", dataset_format="magicoder", validation_size=500),
}
TINY_DATA = {  # instruct: the bundled mixed set (the embedded default); math/code: generated files committed here
    "instruct": dict(dataset_name="taso-tiny", validation_size=0.05),
    "math": dict(dataset_name="recipes/configs/tiny/data/math.jsonl", dataset_format="prompt_completion",
                 validation_size=0.05),
    "code": dict(dataset_name="recipes/configs/tiny/data/code.jsonl", dataset_format="prompt_completion",
                 validation_size=0.05),
}
TINY_DATA_ROWS = {"math": (400, 0), "code": (400, 0)}  # rows, seed of taso_llm.proxy.write_task_data

LORA = dict(lora_target_modules=PROJECTIONS, lora_dropout=0.05)
SPARTA = dict(target_modules=["v_proj", "o_proj"], sparta_density=0.01, sparta_sampling="exact")
DROPLORA = dict(target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], droplora_r=32,
                droplora_alpha=64.0, droplora_p=0.5, droplora_mode="step")
SMOA = dict(target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], smoa_rank=8, smoa_subspaces=2,
            smoa_alpha=8.0)
TALOS = dict(talos_rounds=4, talos_damping=0.1)
GPU_METHODS = {
    # TASO: the rank-1 budgets of all 7 projections spread model-wide by importance mass, rank-4 blocks; sqrt LR
    # scaling multiplies learning_rate (≈ x2.4). The model-wide budget wanted a ~3x lower rate than the per-matrix
    # one on the proxy (docs/comparison.md), hence 2e-4 where the per-matrix recipe had 5e-4.
    "taso": dict(method="taso", target_modules=PROJECTIONS, budget="rank1", budget_scope="model",
                 calibration_samples=256, calibration_batch_size=4, taso_structure="lora_block", taso_adapter_rank=4,
                 taso_importance_abs="per_batch", taso_lr_scaling="sqrt", learning_rate=2.0e-4),
    # QLoRA as peers publish it: nf4 + double quant, bf16 compute (= the bf16 load dtype), r16/a32/d0.05, lr 2e-4.
    "qlora": dict(method="lora", load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
                  lora_r=16, lora_alpha=32, **LORA, learning_rate=2.0e-4),
    # LoRA r=1: exactly TASO's rank-1 budget (d_in + d_out per matrix); narrow adapters want a larger LR.
    "lora_r1": dict(method="lora", lora_r=1, lora_alpha=2, **LORA, learning_rate=5.0e-4),
    # SpaRTA as its authors ran it: random entries of V and O only, density 0.01 (their code's example; LR ours).
    "sparta": dict(method="sparta", **SPARTA, learning_rate=1.0e-4),
    # DropLoRA as its authors ran it: q, k, v, up, down; r32/a64 (r64/a128 for math: GPU_TASK_METHODS); p 0.5; lr 3e-4.
    "droplora": dict(method="droplora", **DROPLORA, learning_rate=3.0e-4),
    # SMoA as its authors ran it: K=2, r=8, alpha=8, lr 1e-3 on q, k, v, up, down: (r/K)(d_in + d_out) params per
    # matrix (a rank-4 LoRA's count); the frozen diagonal blocks hold about half of those weights again.
    "smoa": dict(method="smoa", **SMOA, learning_rate=1.0e-3),
    # TaLoS: 1% of the projections' weights (the lowest sampled-label Fisher, 4 rounds, damping 0.1); density, LR ours.
    "talos": dict(method="talos", target_modules=PROJECTIONS, **TALOS, talos_density=0.01, calibration_samples=256,
                  calibration_batch_size=4, learning_rate=1.0e-4),
}
GPU_TASK_METHODS = {("math", "droplora"): dict(droplora_r=64, droplora_alpha=128.0)}  # per task, over GPU_METHODS
TINY_METHODS = {
    # budget_scope left to the method's default (model for taso): this is also the embedded default of
    # recipes/sft_taso.py, which users run with `--method lora|droplora|...`, and those keep their own (matrix).
    "taso": dict(method="taso", budget="rank1", calibration_samples=128,
                 calibration_batch_size=16, taso_structure="lora_block", taso_adapter_rank=4, taso_lr_scaling="sqrt",
                 learning_rate=3.0e-3),
    "qlora": dict(method="lora", load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
                  lora_r=16, lora_alpha=32, **LORA, learning_rate=2.0e-3),
    "lora_r1": dict(method="lora", lora_r=1, lora_alpha=2, **LORA, learning_rate=3.0e-3),
    "sparta": dict(method="sparta", **SPARTA, learning_rate=1.0e-2),
    "droplora": dict(method="droplora", **DROPLORA, learning_rate=1.0e-3),
    "smoa": dict(method="smoa", **SMOA, learning_rate=3.0e-2),  # ΔW = (B A) ⊙ W: small random weights, larger LR
    # The rank-1 budget (2.5% of the tiny weights, the least sensitive ones) moved nothing measurable in 100 CPU steps;
    # 20% does (tests/test_task_arithmetic.py).
    "talos": dict(method="talos", **TALOS, talos_density=0.2, calibration_samples=128, calibration_batch_size=16,
                  learning_rate=3.0e-3),
    # Reference only (every weight trainable): the proxy comparison's upper line; no GPU recipe (needs ZeRO-3).
    "full": dict(method="full", learning_rate=3.0e-4),
}
GPU_TRAINING = dict(
    bf16=True, max_length=2048, per_device_train_batch_size=4, gradient_accumulation_steps=4,
    gradient_checkpointing=True, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, logging_steps=10,
    eval_strategy="steps", eval_steps=500, save_strategy="steps", save_steps=500, save_total_limit=3, report_to="none",
    seed=42)
GPU_EPOCHS = {"instruct": 3, "math": 1, "code": 2}  # MetaMathQA is 395k rows: one epoch is ~3k steps on 8 GPUs
TINY_TRAINING = dict(
    bf16=False, max_length=256, num_train_epochs=3, per_device_train_batch_size=16, per_device_eval_batch_size=32,
    lr_scheduler_type="cosine", warmup_steps=5, logging_steps=5, save_strategy="steps", save_steps=50,
    save_total_limit=2, eval_strategy="no", report_to="none", seed=42, dataloader_num_workers=0,
    dataloader_pin_memory=False)  # CPU: no pinned memory (and no warning per epoch)


class _Dumper(yaml.SafeDumper):
    """Block mappings (one field per line, as hand-written recipes are) with lists kept on one line."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _block(values: dict) -> str:
    return yaml.dump(values, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)


def recipe(model_dir: str, task: str, method: str) -> str:
    tiny = model_dir == "tiny"
    name = f"{model_dir}/{task}_{method}.yaml"
    if tiny:
        header = (f"# {name}: CPU, offline, minutes on 2 cores. Written by recipes/configs/generate.py.\n"
                  f"#   python recipes/sft_taso.py --config recipes/configs/{name}\n")
        model = dict(model_name_or_path="taso-tiny", dtype="float32")
        data, training = TINY_DATA[task], TINY_TRAINING
        method_values = dict(TINY_METHODS[method])
    else:
        header = (f"# {name}: {GPU_MODELS[model_dir]}, 1 node x 8 GPUs. Written by recipes/configs/generate.py.\n"
                  f"#   accelerate launch --config_file launch/multi_gpu.yaml recipes/sft_taso.py \\\n"
                  f"#     --config recipes/configs/{name}\n"
                  f"# Evaluation: {GPU_EVAL[task]}.\n# Any field can be overridden on the command line.\n")
        model = dict(model_name_or_path=GPU_MODELS[model_dir], dtype="bfloat16", attn_implementation="sdpa")
        data = GPU_DATA[task]
        training = {**GPU_TRAINING, "num_train_epochs": GPU_EPOCHS[task]}
        method_values = {**GPU_METHODS[method], **GPU_TASK_METHODS.get((task, method), {})}
    lr = method_values.pop("learning_rate")
    training = {"output_dir": f"outputs/{model_dir}-{task}-{method}", **training, "learning_rate": lr}
    return "\n".join([header + _block(model), _block(data), _block(method_values), _block(training)])


def all_recipes() -> dict[Path, str]:
    out = {}
    for model_dir in [*GPU_MODELS, "tiny"]:
        methods = [*METHODS, "full"] if model_dir == "tiny" else METHODS
        for task in TASKS:
            for method in methods:
                out[HERE / model_dir / f"{task}_{method}.yaml"] = recipe(model_dir, task, method)
    return out


def tiny_data_files() -> dict[Path, tuple[str, int, int]]:
    return {HERE / "tiny" / "data" / f"{task}.jsonl": (task, n, seed) for task, (n, seed) in TINY_DATA_ROWS.items()}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from taso_llm.io import write_text
    from taso_llm.proxy import write_task_data

    for path, text in all_recipes().items():
        write_text(path, text)
    for path, (task, n, seed) in tiny_data_files().items():
        write_task_data(path, task, n, seed)
    print(f"wrote {len(all_recipes())} recipes and {len(tiny_data_files())} data files under {HERE}")


if __name__ == "__main__":
    main()
