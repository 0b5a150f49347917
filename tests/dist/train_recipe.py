"""The real recipe (recipes/sft_taso.py) plus a probe for tests.

At the end of training every rank runs the trained model (DDP replica or ZeRO shard: all ranks must take part
under ZeRO-3) on a fixed batch, and rank 0 saves the logits to $TASO_PROBE_LOGITS. A test then loads the saved
adapter onto a fresh base in ONE process and checks it reproduces them. Everything else is the recipe as users
run it: `accelerate launch ... tests/dist/train_recipe.py <recipe args>`.
"""

import os
import runpy
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

import taso_llm.run as run

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "sft_taso.py"


def probe_ids() -> torch.Tensor:
    return (torch.arange(48).reshape(3, 16) * 37) % 250 + 10  # fixed ids, valid for any vocabulary of 260+


class LogitsProbe(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        # Train mode (the tiny LLaMA has no dropout) so a 4-bit base runs the same bitsandbytes kernel as in the
        # single-process check; eval mode switches to a repacked CPU inference kernel with other rounding.
        with torch.no_grad():
            logits = model(input_ids=probe_ids().to(args.device)).logits.float().cpu()
        if state.is_world_process_zero:
            torch.save(logits, os.environ["TASO_PROBE_LOGITS"])


_build_trainer = run.build_trainer


def _with_probe(*args, callbacks=None, **kwargs):
    return _build_trainer(*args, callbacks=[*(callbacks or []), LogitsProbe()], **kwargs)


if __name__ == "__main__":
    if os.environ.get("TASO_PROBE_LOGITS"):
        run.build_trainer = _with_probe
    sys.argv[0] = str(RECIPE)
    runpy.run_path(str(RECIPE), run_name="__main__")
