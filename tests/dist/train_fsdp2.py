"""FSDP2 training of sparse adapters, 2 CPU ranks over gloo.

    train_fsdp2.py <base_dir> <masks> <out_dir>                 TASO regions from a masks file
    train_fsdp2.py <base_dir> - <out_dir> sparta|droplora|smoa  the method's own prepare (no calibration needed)

Why a script and not the recipe: accelerate ignores its FSDP plugin on CPU (the model is never wrapped), so this
does what the plugin does on GPUs with launch/fsdp2.yaml, by hand: attach the adapters FIRST (so they are
sharded with their layer), `fully_shard` every LlamaDecoderLayer and then the root on a CPU device mesh, train
with a plain loop, gather the adapter with the library's `gathered_adapter_state` and write it from rank 0 (the
method's own save for the others). A method's TrainerCallbacks (DropLoRA's per-step rank mask) get the step's
begin and end as the Trainer would call them.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from train_recipe import probe_ids  # noqa: E402

from taso_llm.adapters import attach_updates  # noqa: E402
from taso_llm.adapters.io import save_adapter  # noqa: E402
from taso_llm.distributed import finish_distributed, process_group_timeout  # noqa: E402
from taso_llm.sparse.masks import load_masks  # noqa: E402
from taso_llm.adapters.io import gathered_adapter_state  # noqa: E402


def attach_taso(model, masks: str) -> None:
    regions, _ = load_masks(masks)
    attach_updates(model, regions, alpha=4.0)
    torch.manual_seed(1)  # lora_A init must be identical on every rank before sharding
    for _, m in model.named_modules():
        if hasattr(m, "lora_A"):
            torch.nn.init.normal_(m.lora_A, std=0.1)


def prepare_method(model, name: str, base: str, out: str, rank: int):
    """The method's prepare on every rank (seeded: the same adapter everywhere), before sharding as the recipe does."""
    from taso_llm.config import MethodArguments
    from taso_llm.methods import RunContext, get_method

    method = get_method(name)
    shared = MethodArguments(method=name, target_modules=["q_proj", "v_proj", "down_proj"], budget="rank2")
    own = method.args_class() if method.args_class else None
    method.prepare(model, shared, own, RunContext(output_dir=Path(out), model_id=base, is_main=rank == 0, seed=0,
                                                  show_progress=False))
    return method, shared, own, method.callbacks(model, shared, own)


def main(base: str, masks: str, out: str, method_name: str = "taso") -> None:
    dist.init_process_group("gloo", timeout=process_group_timeout())
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    method, callbacks = None, []
    if method_name == "taso":
        attach_taso(model, masks)
    else:
        method, shared, own, callbacks = prepare_method(model, method_name, base, out, rank)

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    emb = model.model.embed_tokens.weight
    assert isinstance(emb, DTensor) and emb.to_local().shape[0] < emb.shape[0], "FSDP2 did not shard"
    local = sum(p.to_local().numel() for p in model.parameters())
    full = sum(p.numel() for p in model.parameters())
    print(f"rank {rank}: holds {local} of {full} parameters", flush=True)

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-2)
    g = torch.Generator().manual_seed(123)
    data = torch.randint(10, 250, (world * 4, 24), generator=g)
    mine = data[rank::world]  # each rank its own part of the global batch
    losses = []
    for step in range(8):
        for cb in callbacks:
            cb.on_step_begin(None, SimpleNamespace(global_step=step), None)
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        for cb in callbacks:
            cb.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_ids()).logits.float()
    state = gathered_adapter_state(model)  # collective: full_tensor() of every adapter DTensor
    if rank == 0:
        print("losses", losses, flush=True)
        assert losses[-1] < losses[0], losses
        if method is None:
            save_adapter(model, out, base_model=base, state=state)
        else:
            method.save(model, Path(out), shared, own, base, state)
        torch.save({"logits": logits, "losses": losses, "local": local, "full": full},
                   Path(out) / "probe.pt")
    finish_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:5])
