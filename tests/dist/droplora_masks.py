"""One rank of `torchrun --nproc_per_node 2 tests/dist/droplora_masks.py OUT` (tests/test_distributed_training.py).

Each rank prepares DropLoRA on the cached tiny model as run.py does, lets the method's callback open optimizer steps
0-3, runs the same batch in training mode inside each step, and saves what the updates really applied (the masks
the schedule cached in forward) and the logits to OUT/rank{r}.pt. Nothing is shared between the ranks: equal files
mean every rank drew the same masks on its own.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist


def main(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from taso_llm.config import MethodArguments
    from taso_llm.methods import RunContext, get_method
    from taso_llm.tiny import tiny_model_path

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1000 + rank)  # a rank-dependent global RNG: the masks must not depend on it
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    method = get_method("droplora")
    shared, own = MethodArguments(method="droplora"), method.args_class(droplora_r=8, droplora_alpha=16.0)
    method.prepare(model, shared, own, RunContext(output_dir=out, model_id="taso-tiny", seed=3, is_main=rank == 0,
                                                  show_progress=False))
    (callback,) = method.callbacks(model, shared, own)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:  # B: non-zero, so masks show in the logits
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = (torch.arange(32).reshape(2, 16) * 37) % 250 + 10
    record = {"logits": [], "masks": []}
    model.train()
    for step in range(4):
        callback.on_step_begin(None, SimpleNamespace(global_step=step), None)
        with torch.no_grad():
            record["logits"].append(model(input_ids=ids).logits)
        record["masks"].append({name: m.clone() for (name, _), m in callback.schedule._masks.items()})
        callback.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
    torch.save(record, out / f"rank{rank}.pt")
    from taso_llm.distributed import finish_distributed

    finish_distributed()  # barrier, let gloo drain, tear down


if __name__ == "__main__":
    main(Path(sys.argv[1]))
