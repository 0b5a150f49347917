"""SMoA's selection and frozen blocks on 1 process or as a rank of `torchrun --nproc_per_node N`, for
tests/test_smoa.py.

    python tests/dist/smoa_run.py --engine single --out DIR
    torchrun --standalone --nproc_per_node 2 tests/dist/smoa_run.py --engine {ddp,zero3,fsdp} --out DIR

The model is the cached tiny LLaMA loaded as tests/dist/importance_run.py loads it per engine (replicated, ZeRO-3
partitioned under zero.Init, FSDP2-sharded). Each SVD runs on its owner rank; the groups are shared; attach_updates
then reads every rank's frozen diagonal blocks through the gather. Writes under DIR: masks.safetensors (rank 0) and
rank{r}.safetensors (the index vectors and frozen blocks this rank ended with) and report{r}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from importance_run import load_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["single", "ddp", "zero3", "fsdp"], required=True)
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    if a.engine != "single":
        dist.init_process_group("gloo")
    from taso_llm.adapters import attach_updates, iter_adapters
    from taso_llm.distributed import Backend, rank_and_world
    from taso_llm.io import save_safetensors
    from taso_llm.sparse.masks import save_masks
    from taso_llm.sparse.svd_order import select_modulated_blocks
    from taso_llm.targets import DEFAULT_TARGETS, find_targets
    from taso_llm.tiny import tiny_model_path

    rank, world = rank_and_world()
    model = load_model(a.engine, str(tiny_model_path()), world)
    backend = Backend.for_model(model)
    assert backend.sharded == (a.engine in ("zero3", "fsdp"))
    regions, layers, report = select_modulated_blocks(model, find_targets(model, DEFAULT_TARGETS), groups=3, rank=6,
                                                      backend=backend, show_progress=False)
    attach_updates(model, regions, alpha=6.0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, wrapper in iter_adapters(model):
        for key, buffer in wrapper.update.named_buffers():
            tensors[f"{name}.{key}"] = buffer.detach().cpu().contiguous()
    save_safetensors(tensors, out / f"rank{rank}.safetensors")
    (out / f"report{rank}.json").write_text(json.dumps({"layers": layers, **report}))
    if rank == 0:
        save_masks(out / "masks.safetensors", regions, "taso-tiny")
    from taso_llm.distributed import finish_distributed

    finish_distributed()  # barrier, let gloo drain, tear down


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
