"""The bundled default SFT set (`dataset_name: taso-tiny`): a fixed mix of the three synthetic families.

The file is committed so the default run needs no generation step, and a test checks it still equals
`bundled_rows()` (regenerate with `python -m taso_llm.data.bundled_set`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from taso_llm.data.synthetic import code_tasks, instruct_tasks, math_word_problems
from taso_llm.io import write_text

BUNDLED_ALIAS = "taso-tiny"
BUNDLED_PATH = Path(__file__).parent / "bundled" / "tiny_sft.jsonl"
BUNDLED_SEED = 0
ROWS_PER_FAMILY = 200


def bundled_rows() -> list[dict]:
    rows = (math_word_problems(ROWS_PER_FAMILY, BUNDLED_SEED) + code_tasks(ROWS_PER_FAMILY, BUNDLED_SEED)
            + instruct_tasks(ROWS_PER_FAMILY, BUNDLED_SEED))
    # Interleave the families so any prefix (e.g. max_train_samples) still has all three.
    random.Random(f"bundled-{BUNDLED_SEED}").shuffle(rows)
    return rows


def write_bundled(path: str | Path = BUNDLED_PATH) -> Path:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in bundled_rows()))
    return Path(path)


if __name__ == "__main__":
    print(write_bundled())
