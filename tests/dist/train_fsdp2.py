"""FSDP2 training of TASO adapters, 2 CPU ranks over gloo. Usage: train_fsdp2.py <base_dir> <masks> <out_dir>.

Why a script and not the recipe: accelerate ignores its FSDP plugin on CPU (the model is never wrapped), so this
does what the plugin does on GPUs with launch/fsdp2.yaml, by hand: attach the adapters FIRST (so they are
sharded with their layer), `fully_shard` every LlamaDecoderLayer and then the root on a CPU device mesh, train
with a plain loop, gather the adapter with the library's `gathered_adapter_state` and write it from rank 0.
"""

import sys
from pathlib import Path

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


def main(base: str, masks: str, out: str) -> None:
    dist.init_process_group("gloo", timeout=process_group_timeout())
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    regions, _ = load_masks(masks)
    attach_updates(model, regions, alpha=4.0)
    torch.manual_seed(1)  # lora_A init must be identical on every rank before sharding
    for _, m in model.named_modules():
        if hasattr(m, "lora_A"):
            torch.nn.init.normal_(m.lora_A, std=0.1)

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
    for _ in range(8):
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
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
        save_adapter(model, out, base_model=base, state=state)
        torch.save({"logits": logits, "losses": losses, "local": local, "full": full},
                   Path(out) / "probe.pt")
    finish_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
