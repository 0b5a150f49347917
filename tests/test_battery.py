"""The bad-input battery, as a new user meets it: one bad thing per case, through the recipe's own parser and
`run_sft`, on the tiny default. Every case must stop with an error that names the culprit (field, value or file)
BEFORE the model's weights are loaded or any importance is scored (both are patched to fail loudly here).

The classes mirror the hardening issue's battery: configuration, training arguments, data files, saved files and
model sources, output directories. Cases that need a finished run or several processes live in test_outputs.py,
test_preemption.py and test_multinode.py; the sandbox's escapes in test_eval_sandbox_escapes.py.
"""

import json
from pathlib import Path

import pytest

from taso_llm.config import sft_parser
from taso_llm.io import save_safetensors

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = "recipes/configs/tiny/instruct_taso.yaml"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _truncated_masks(tmp_path):
    import torch

    path = tmp_path / "masks.safetensors"
    save_safetensors({"x.rows": torch.arange(4)}, path, metadata={"taso": "{}"})
    path.write_bytes(path.read_bytes()[:-3])
    return path


ROW = {"prompt": "What is 2 + 2?", "completion": "4"}
CASES = {
    # configuration
    "unknown target module": (lambda t: ["--target_modules", "q_proj", "qkv_proj"], "qkv_proj"),
    "budget below the structure's minimum": (lambda t: ["--budget", "3"], "budget='3'"),
    "unknown structure": (lambda t: ["--taso_structure", "diagonal"], "taso_structure='diagonal'"),
    "unknown method": (lambda t: ["--method", "dora"], "method='dora'"),
    "another method's option": (lambda t: ["--method", "lora", "--taso_adapter_rank", "8"],
                                "taso_adapter_rank=8 is an option of another method"),
    "unknown budget scope": (lambda t: ["--budget_scope", "layer"], "budget_scope='layer'"),
    "budget floor out of range": (lambda t: ["--budget_scope", "model", "--budget_floor", "2"], "budget_floor=2"),
    "merge asked of a PEFT baseline": (lambda t: ["--method", "lora", "--save_merged", "true"], "save_merged"),
    "zero rank": (lambda t: ["--taso_adapter_rank", "0"], "taso_adapter_rank=0"),
    "bad lr scaling": (lambda t: ["--taso_lr_scaling", "fast"], "taso_lr_scaling='fast'"),
    # training arguments (transformers checks some only when training starts, after importance)
    "negative learning rate": (lambda t: ["--learning_rate", "-1"], "learning_rate=-1"),
    "zero batch size": (lambda t: ["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0"),
    "zero epochs": (lambda t: ["--num_train_epochs", "0"], "num_train_epochs=0"),
    "max_length of one token": (lambda t: ["--max_length", "1"], "max_length=1"),
    # data files
    "row missing a field": (lambda t: ["--dataset_format", "alpaca", "--dataset_name", str(_jsonl(
        t / "a.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}]))], "field 'output'"),
    "empty data file": (lambda t: ["--dataset_name", str(_jsonl(t / "empty.jsonl", []))], "no rows"),
    "malformed JSON line": (lambda t: ["--dataset_name", str(_write(t / "bad.jsonl", json.dumps(ROW) + "\n{oops\n"))],
                            "bad.jsonl: line 2"),
    "non-UTF-8 bytes": (lambda t: ["--dataset_name", str(_write_bytes(t / "latin.jsonl",
                                                                      b'{"prompt": "caf\xe9", "completion": "x"}\n'))],
                        "not UTF-8"),
    "directory of mixed file types": (lambda t: ["--dataset_name", str(_mixed_dir(t))], "mixes file types"),
    "nonexistent data path": (lambda t: ["--dataset_name", str(t / "nowhere.jsonl")], "nowhere.jsonl"),
    # saved files and model sources
    "truncated masks file": (lambda t: ["--masks_path", str(_truncated_masks(t))], "masks file"),
    "missing masks file": (lambda t: ["--masks_path", str(t / "none.safetensors")], "none.safetensors"),
    "nonexistent model path": (lambda t: ["--model_name_or_path", str(t / "no-model")], "no such directory"),
    # output directory
    "overwrite and resume at once": (lambda t: ["--overwrite_output_dir", "true", "--resume_from_checkpoint", "true"],
                                     "overwrite_output_dir"),
}


def _write(path, text):
    path.write_text(text)
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _mixed_dir(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    _jsonl(d / "a.jsonl", [ROW])
    (d / "b.csv").write_text("prompt,completion\nx,y\n")
    return d


@pytest.fixture
def no_heavy_work(monkeypatch):
    import taso_llm.run as run
    import taso_llm.sparse.statistics as statistics

    def boom(*a, **k):
        raise AssertionError("heavy work started before the bad input was refused")

    monkeypatch.setattr(run, "load_model_and_tokenizer", boom)
    monkeypatch.setattr(statistics, "estimate_importance", boom)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_heavy_work_naming_it(case, tmp_path, no_heavy_work, monkeypatch):
    from taso_llm.run import run_sft

    monkeypatch.chdir(ROOT)  # the recipe's relative paths resolve from the repository root, as for a user
    extra, message = CASES[case]
    argv = ["--config", DEFAULT, "--output_dir", str(tmp_path / "out"), *extra(tmp_path)]
    args = sft_parser().parse_args_and_config(argv)
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[")):
        run_sft(*args)
    assert not (tmp_path / "out" / "masks.safetensors").exists() and not (tmp_path / "out" / "metrics.json").exists()
