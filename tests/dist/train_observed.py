"""The real recipe (recipes/sft_taso.py), as the launch/ scripts run it, plus what the multi-node and preemption
tests must see from outside. Without the variables below it is exactly the recipe.

  TASO_WRITE_LOG      every file written through taso_llm.io (all of a run's outputs are) is appended to this
                      file as "<RANK> <path>": which process wrote the adapter, and how often.
  TASO_PAUSE_AT_STEP  rank 0 stops at the end of this optimizer step, writes TASO_PAUSED_FILE and waits until this
  TASO_PAUSED_FILE    process got SIGTERM, or the test deleted that file (at most 120 s): the test can signal or
                      kill at a known step instead of racing steps of a few milliseconds.
"""

import os
import runpy
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

import taso_llm.io as io
import taso_llm.run as run

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "sft_taso.py"
RANK = os.environ.get("RANK", "0")


def _log_writes(log_path: str) -> None:
    atomic_path = io.atomic_path

    @contextmanager
    def logged(path):
        with atomic_path(path) as tmp:
            yield tmp
        with open(log_path, "a") as f:  # one short O_APPEND write per line: lines of several ranks do not mix
            f.write(f"{RANK} {Path(path).resolve()}\n")

    io.atomic_path = logged


class PauseAt(TrainerCallback):
    def __init__(self, step: int, flag: Path, preemption):
        self.step, self.flag, self.preemption = step, flag, preemption

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step or RANK != "0":
            return
        self.flag.write_text(str(os.getpid()))
        deadline = time.time() + 120
        # Without a PreemptionCallback (code before it) SIGTERM simply ends the process here.
        while self.flag.exists() and time.time() < deadline:
            if self.preemption is not None and self.preemption.received is not None:
                return
            time.sleep(0.05)


def _with_pause(build):
    def build_trainer(*args, callbacks=None, **kwargs):
        from taso_llm.preemption import PreemptionCallback

        preemption = next((c for c in callbacks or [] if isinstance(c, PreemptionCallback)), None)
        pause = PauseAt(int(os.environ["TASO_PAUSE_AT_STEP"]), Path(os.environ["TASO_PAUSED_FILE"]), preemption)
        return build(*args, callbacks=[*(callbacks or []), pause], **kwargs)
    return build_trainer


if __name__ == "__main__":
    if os.environ.get("TASO_WRITE_LOG"):
        _log_writes(os.environ["TASO_WRITE_LOG"])
    if os.environ.get("TASO_PAUSE_AT_STEP"):
        run.build_trainer = _with_pause(run.build_trainer)
    sys.argv[0] = str(RECIPE)
    runpy.run_path(str(RECIPE), run_name="__main__")
