"""One TaLoS selection (4 rounds, rank-1 budget) for tests/test_talos.py, on 1 process or a rank of torchrun.

    python tests/dist/talos_select_run.py --engine single --out DIR
    torchrun --standalone --nproc_per_node 2 tests/dist/talos_select_run.py --engine {ddp,zero3} --out DIR

Same model and data as importance_run.py (the cached tiny LLaMA, bundled SFT rows, 5 batches of 4: rank 1 gets a
padding batch). Rank 0 writes DIR/masks.safetensors and DIR/report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from importance_run import collate_fn, setup_tiny_run  # noqa: E402

SAMPLES, BATCH = 20, 4


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["single", "ddp", "zero3"], required=True)
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    rank, world, tokenizer, data, model, targets = setup_tiny_run(a.engine, SAMPLES)
    from taso_llm.distributed import Backend
    from taso_llm.sparse.calibration import calibration_batches, num_calibration_batches
    from taso_llm.sparse.localize import select_low_sensitivity
    from taso_llm.sparse.masks import save_masks
    from taso_llm.sparse.regions import lora_params
    from taso_llm.targets import layer_shape
    keep = sum(lora_params(layer_shape(m)) for m in targets.values())
    collate = collate_fn(tokenizer.pad_token_id)
    batches = lambda: calibration_batches(data, collate, SAMPLES, BATCH, rank, world)  # noqa: E731  (one per round)
    selection = select_low_sensitivity(model, targets, keep, batches,
                                       num_calibration_batches(len(data), SAMPLES, BATCH), Backend.for_model(model),
                                       seed=11, show_progress=False)
    if rank == 0:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        save_masks(out / "masks.safetensors", selection.regions, "taso-tiny")
        (out / "report.json").write_text(json.dumps(selection.report))
    from taso_llm.distributed import finish_distributed

    finish_distributed()  # barrier, let gloo drain, tear down


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
