"""Distributed training with 2 CPU processes over gloo, through `accelerate launch` and the real recipe.

Every engine trains the tiny model and saves an adapter that, loaded onto a fresh base in ONE process, reproduces
the logits the trained (replicated or sharded) model gave at the end of training. ZeRO-2/ZeRO-3 adapters equal the
DDP adapter (same seed, data and masks). FSDP2 has its own script: accelerate ignores its FSDP plugin on CPU.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "dist" / "train_recipe.py"
COMMON = ["--max_steps", "6", "--logging_steps", "1", "--calibration_samples", "32", "--calibration_batch_size",
          "8", "--per_device_train_batch_size", "4", "--max_length", "128", "--validation_size", "0",
          "--export_peft", "false", "--learning_rate", "2e-2", "--warmup_steps", "0", "--save_steps", "1000",
          "--lr_scheduler_type", "constant", "--seed", "7"]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tiny_path, **extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TASO_LLM_CACHE": os.environ["TASO_LLM_CACHE"], **extra}
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def launch_cmd(config: str, script: Path, args: list[str], nproc: int = 2) -> list[str]:
    """DDP configs need ACCELERATE_USE_CPU (set by `_run`); DeepSpeed must not get it (it would be disabled)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / config),
           "--num_processes", str(nproc), "--main_process_port", str(_free_port()), "--mixed_precision", "no"]
    return [*cmd, str(script), *args]


def _run(config, out: Path, tiny_path, *extra, timeout=150, env_extra=None):
    env = _env(tiny_path, TASO_PROBE_LOGITS=str(out / "probe_logits.pt"), **(env_extra or {}))
    if config in ("multi_gpu.yaml", "single_gpu.yaml"):
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = launch_cmd(config, RECIPE, [*COMMON, "--output_dir", str(out), *extra])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "metrics.json").read_text())


def _logits_of_saved_adapter(tiny_path, adapter_dir: Path, **load_kwargs) -> torch.Tensor:
    """Load the adapter onto a fresh base in this (single) process and run the probe batch."""
    from transformers import AutoModelForCausalLM

    from taso_llm.adapters_io import load_adapter

    sys.path.insert(0, str(RECIPE.parent))
    from train_recipe import probe_ids

    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_path, **load_kwargs), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=probe_ids()).logits.float()


def _check_run(metrics: dict, out: Path, tiny_path, engine: str, stage=None, atol=1e-4, **load_kwargs):
    assert metrics["distributed_type"] == engine and metrics["world_size"] == 2
    assert metrics.get("zero_stage") == stage
    losses = [loss for _, loss in metrics["loss_curve"]]
    assert len(losses) == 6 and min(losses[-2:]) < losses[0], losses
    trained = torch.load(out / "probe_logits.pt")
    loaded = _logits_of_saved_adapter(tiny_path, out, **load_kwargs)
    torch.testing.assert_close(loaded, trained, atol=atol, rtol=1e-4)


def _assert_same_adapter(a: Path, b: Path, atol=2e-5):
    sa, sb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sa.keys() == sb.keys()
    for key in sa:
        if key.endswith((".rows", ".cols")):
            assert torch.equal(sa[key], sb[key]), key  # masks: bitwise
        else:
            torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=1e-3, msg=key)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("ddp")
    return out, _run("multi_gpu.yaml", out, tiny_path)


def test_ddp_trains_and_saved_adapter_reproduces_logits(ddp_run, tiny_path):
    out, metrics = ddp_run
    _check_run(metrics, out, tiny_path, "MULTI_CPU")
    assert "masks_reused_from" not in metrics  # importance really ran, sharded over the 2 ranks


@pytest.mark.parametrize("config, stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_deepspeed_zero_matches_ddp(ddp_run, tmp_path, tiny_path, config, stage):
    """ZeRO-2 / ZeRO-3 run DeepSpeed's engine for real (over gloo) and end with the DDP run's adapter. ZeRO-3 also
    estimates importance on partitioned weights and gathers the adapter to rank 0 when saving."""
    ddp_out, _ = ddp_run
    metrics = _run(config, tmp_path, tiny_path)
    _check_run(metrics, tmp_path, tiny_path, "DEEPSPEED", stage)
    _assert_same_adapter(ddp_out, tmp_path)


def test_zero3_cpu_offload_trains(tmp_path, tiny_path):
    """Parameters and optimizer state offloaded (DeepSpeedCPUAdam from ds_configs/zero3_offload.json)."""
    metrics = _run("zero3_offload.yaml", tmp_path, tiny_path, timeout=240)
    _check_run(metrics, tmp_path, tiny_path, "DEEPSPEED", 3)
