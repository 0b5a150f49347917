"""One importance run (1 process, or a rank of `torchrun --nproc_per_node N`) for tests/test_distributed_importance.py.

    python tests/dist/importance_run.py --engine single --out DIR
    torchrun --standalone --nproc_per_node 2 tests/dist/importance_run.py --engine {ddp,zero3,fsdp} --out DIR

The model is the cached tiny LLaMA (TASO_LLM_CACHE, built by the test before launching); data are the bundled SFT
rows, chat-templated, with completion-only labels. Engines: `ddp` a replicated model (what DDP scores: the Trainer
wraps it only later), `zero3` loaded under zero.Init (each rank holds a slice of every weight), `fsdp` FSDP2
`fully_shard` on a CPU mesh. For each case in CASES it writes under DIR/<case>/: masks.safetensors (rank 0, via
save_masks as the recipe does), regions_rank{r}.safetensors (the full set this rank ended with) and
stats_rank{r}.safetensors (row/col statistics of the matrices the rank owns; all of them on one process).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

# (calibration samples, batch size, structure, importance_abs): 6 batches, 5 batches (odd: rank 1 gets a padding
# batch), and a "full" case (|W⊙ΣG|, finalized by owners after a weight gather).
CASES = {  # samples, batch size, structure, importance_abs, budget_scope
    "even": (24, 4, "lora_block", "per_batch", "matrix"),
    "odd": (20, 4, "lora_block", "per_batch", "matrix"),
    "after_sum": (16, 4, "lora_block", "after_sum", "matrix"),
    "model_budget": (20, 4, "lora_block", "per_batch", "model"),
}


def tokenized_rows(tokenizer, n: int):
    """The first n bundled SFT rows as input_ids + labels (-100 on the prompt)."""
    from datasets import Dataset

    from taso_llm.data import DataArguments, load_sft_splits

    train = load_sft_splits(DataArguments(dataset_name="taso-tiny", validation_size=0.0))["train"]
    rows = {"input_ids": [], "labels": []}
    for ex in train.select(range(n)):
        texts = (tokenizer.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False),
                 tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=False))
        prompt, full = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
        assert full[:len(prompt)] == prompt
        full = full[:128]
        rows["input_ids"].append(full)
        rows["labels"].append([-100] * len(prompt) + full[len(prompt):])
    return Dataset.from_dict(rows)


def collate_fn(pad_id: int):
    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels[:, :width]}
    return collate


def setup_tiny_run(engine: str, n_rows: int):
    """On this rank: the process group (unless single), then the cached tiny model under `engine`, its tokenizer, the
    first n_rows tokenized SFT rows and the default target linears. Returns (rank, world, tokenizer, rows, model,
    targets)."""
    if engine != "single":
        dist.init_process_group("gloo")
    from transformers import AutoTokenizer

    from taso_llm.distributed import rank_and_world
    from taso_llm.targets import DEFAULT_TARGETS, find_targets
    from taso_llm.tiny import tiny_model_path

    rank, world = rank_and_world()
    path = str(tiny_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = tokenized_rows(tokenizer, n_rows)
    model = load_model(engine, path, world)
    return rank, world, tokenizer, rows, model, find_targets(model, DEFAULT_TARGETS)


def load_model(engine: str, path: str, world: int):
    from transformers import AutoModelForCausalLM

    if engine == "zero3":
        from transformers.integrations import HfDeepSpeedConfig

        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        keep_alive = HfDeepSpeedConfig(cfg)  # noqa: F841 (from_pretrained builds under zero.Init while it lives)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        w = model.model.layers[0].self_attn.q_proj.weight
        assert w.numel() == 0 and 0 < w.ds_tensor.numel() < w.ds_numel, "ZeRO-3 did not partition the weights"
        return model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if engine == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        w = model.model.layers[0].self_attn.q_proj.weight
        assert isinstance(w, DTensor) and 0 < w.to_local().numel() < w.numel(), "FSDP2 did not shard the weights"
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["single", "ddp", "zero3", "fsdp"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--then_train", action="store_true",
                        help="afterwards attach the adapters and take one optimizer step through a fresh DeepSpeed "
                             "engine (ZeRO-3: the temporary importance engine must leave the model usable)")
    a = parser.parse_args()
    rank, world, tokenizer, data, model, targets = setup_tiny_run(a.engine, max(c[0] for c in CASES.values()))
    from taso_llm.distributed import Backend
    from taso_llm.io import save_safetensors
    from taso_llm.methods.taso import TasoArguments
    from taso_llm.sparse.budget import BudgetPolicy
    from taso_llm.sparse.calibration import calibration_batches, num_calibration_batches
    from taso_llm.sparse.masks import save_masks
    from taso_llm.sparse.select import SelectionSpec, select_regions
    for case in a.cases:
        samples, bs, structure, abs_mode, scope = CASES[case]
        own = TasoArguments(taso_structure=structure, taso_importance_abs=abs_mode)
        spec = SelectionSpec(structure, rank=own.taso_adapter_rank, policy=BudgetPolicy(scope=scope))
        batches = calibration_batches(data, collate_fn(tokenizer.pad_token_id), samples, bs, rank, world)
        selection = select_regions(model, targets, own.statistic(), spec, batches,
                                   num_calibration_batches(len(data), samples, bs), Backend.for_model(model),
                                   show_progress=False, keep_stats=True)
        regions, report = selection.regions, selection.report
        out = Path(a.out) / case
        out.mkdir(parents=True, exist_ok=True)
        flat = {f"{n}.{k}": getattr(r, k).to(torch.int64) for n, r in regions.items() for k in ("rows", "cols")}
        save_safetensors(flat, out / f"regions_rank{rank}.safetensors")
        save_safetensors({f"{n}.{k}": getattr(s, k) for n, s in selection.stats.items() for k in ("row", "col")},
                         out / f"stats_rank{rank}.safetensors")
        if rank == 0:
            save_masks(out / "masks.safetensors", regions, "taso-tiny")
            (out / "report.json").write_text(json.dumps(report))
    if a.then_train:
        train_one_step(model, regions, collate_fn(tokenizer.pad_token_id)([data[i] for i in range(4)]))
    from taso_llm.distributed import finish_distributed

    finish_distributed()  # barrier, let gloo drain, tear down


def train_one_step(model, regions, batch):
    """What the Trainer does next, in small: adapters on, a new ZeRO-3 engine with an optimizer, one step."""
    import deepspeed

    from taso_llm.adapters import attach_updates, iter_adapters

    attach_updates(model, regions, alpha=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
           "zero_allow_untested_optimizer": True}  # plain SGD: no compiled DeepSpeed op needed
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                      optimizer=torch.optim.SGD(params, lr=0.5), config=cfg)
    name, wrapper = next(iter_adapters(model))
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters([wrapper.update.lora_B]):
        before = wrapper.update.lora_B.detach().clone()
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    with GatheredParameters([wrapper.update.lora_B]):
        after = wrapper.update.lora_B.detach().clone()
    assert torch.isfinite(loss) and not torch.equal(before, after), f"{name}: adapter did not train"
    print(f"rank {dist.get_rank()}: one ZeRO-3 step after importance, loss {float(loss.detach()):.4f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
