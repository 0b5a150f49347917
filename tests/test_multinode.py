"""launch/torchrun_multinode.sh, launch/slurm_multinode.sbatch and launch/multi_node.yaml, run as two "nodes" of
one process each on this machine (node ranks 0 and 1, one c10d rendezvous), through the real recipe on CPU (gloo).

- torchrun script, ZeRO-3: the masks equal the one-process run's bit for bit; only rank 0 writes adapter files,
  each once (node-local rank 0 of node 1 writes nothing).
- SLURM script (multi_node.yaml, ZeRO-3), run without SLURM: `srun`, `scancel` and `scontrol` are stand-ins on
  PATH (tests/dist/fake_slurm; srun SIGKILLs its tasks on a SIGTERM of its own, as the real one does) and the
  SLURM_* variables are those of a 2-node allocation. SIGTERM to the batch script (what `--signal=B:TERM@300` does
  at the time limit) while rank 0 is held at step 2: both ranks stop after step 3 with checkpoint-3, no final
  outputs, the job asks to be requeued. The requeued job (SLURM_RESTART_COUNT=1)
  resumes and ends with the torchrun run's adapter, bit for bit.
- A node that dies (every process of it, SIGKILL) ends the other node's launch with a non-zero status, quickly.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dist_helpers import (FINAL_FILES, OBSERVED, ROOT, _free_port, assert_adapter_saved_once,  # noqa: E402
                          assert_same_adapter, assert_same_masks, finish, kill_tree, launch_env, one_process_run,
                          recipe_args, wait_for_file)

pytestmark = pytest.mark.slow
FAKE_SLURM = ROOT / "tests" / "dist" / "fake_slurm"
ZERO3 = ["--deepspeed", "ds_configs/zero3.json"]


def _torchrun_nodes(args: list[str], port: int, **env_extra) -> list[subprocess.Popen]:
    """launch/torchrun_multinode.sh once per node, as on two machines (own session: a node can die whole)."""
    nodes = []
    for rank in (0, 1):
        env = launch_env(NNODES="2", NODE_RANK=str(rank), MAIN_ADDR="127.0.0.1", MAIN_PORT=str(port),
                         NPROC_PER_NODE="1", RECIPE=str(OBSERVED), TASO_DDP_TIMEOUT="30", **env_extra)
        nodes.append(subprocess.Popen([str(ROOT / "launch" / "torchrun_multinode.sh"), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return nodes


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_path):
    """The reference: the recipe in one process, uninterrupted."""
    return one_process_run(tmp_path_factory.mktemp("one-process"))


@pytest.fixture(scope="module")
def torchrun_zero3(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("torchrun")
    # torchrun, not accelerate launch: the recipe itself sees --deepspeed and sets up a DeepSpeed state (no env hint)
    finish(_torchrun_nodes(recipe_args(out / "run", *ZERO3), _free_port(),
                            TASO_WRITE_LOG=str(out / "writes.log")))
    return out


def test_torchrun_two_nodes_masks_equal_one_process_adapter_saved_once(torchrun_zero3, one_process):
    metrics = json.loads((torchrun_zero3 / "run" / "metrics.json").read_text())
    assert (metrics["distributed_type"], metrics["zero_stage"], metrics["world_size"]) == ("DEEPSPEED", 3, 2)
    assert_same_masks(one_process, torchrun_zero3 / "run")
    assert_adapter_saved_once(torchrun_zero3 / "writes.log")


def _sbatch(tmp: Path, args: list[str], **env_extra) -> subprocess.Popen:
    """The batch script as SLURM runs it on the first node of a 2-node allocation (job 4242)."""
    port = _free_port()
    env = launch_env(SLURM_JOB_ID="4242", SLURM_JOB_NAME="taso-sft", SLURM_NNODES="2",
                     SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1", GPUS_PER_NODE="1", MAIN_PORT=str(port),
                     FAKE_SRUN_WAIT_PORT=str(port), FAKE_SLURM_DIR=str(tmp), RECIPE=str(OBSERVED),
                     TASO_PREEMPTED_FILE=str(tmp / "job.preempted"), TASO_DDP_TIMEOUT="60", **env_extra)
    env["PATH"] = f"{FAKE_SLURM}{os.pathsep}{env['PATH']}"
    return subprocess.Popen(["bash", str(ROOT / "launch" / "slurm_multinode.sbatch"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_slurm_sigterm_checkpoints_requeues_and_the_requeued_job_resumes_exactly(tmp_path, torchrun_zero3,
                                                                                 one_process):
    out, paused = tmp_path / "run", tmp_path / "paused"
    job = _sbatch(tmp_path, recipe_args(out), TASO_PAUSE_AT_STEP="2", TASO_PAUSED_FILE=str(paused))
    wait_for_file(paused, [job])
    job.send_signal(signal.SIGTERM)  # --signal=B:TERM: the batch shell only
    (output,) = finish([job])
    assert (tmp_path / "requeue.log").read_text() == "requeue 4242\n", output[-6000:]
    assert (tmp_path / "job.preempted").read_text().strip() == str(out / "checkpoint-3")
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert not any((out / name).exists() for name in FINAL_FILES)
    assert "SIGTERM: stopped after step 3" in output

    (output,) = finish([_sbatch(tmp_path, recipe_args(out), SLURM_RESTART_COUNT="1",
                                 TASO_WRITE_LOG=str(tmp_path / "writes.log"))])
    assert (tmp_path / "requeue.log").read_text() == "requeue 4242\n", "a finished job was requeued"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["distributed_type"], metrics["zero_stage"], metrics["world_size"]) == ("DEEPSPEED", 3, 2)
    assert_same_masks(one_process, out)
    assert_same_adapter(torchrun_zero3 / "run", out)
    assert_adapter_saved_once(tmp_path / "writes.log")


def test_a_dead_node_fails_the_other_node_quickly(tmp_path, tiny_path):
    """Node 1 dies whole (launcher, agent and rank: SIGKILL) at step 1: node 0's launch exits non-zero within 60 s
    instead of waiting in a collective."""
    paused = tmp_path / "paused"
    node0, node1 = _torchrun_nodes(recipe_args(tmp_path / "run", "--max_steps", "1000"), _free_port(),
                                   ACCELERATE_USE_CPU="true", TASO_PAUSE_AT_STEP="1", TASO_PAUSED_FILE=str(paused))
    try:
        wait_for_file(paused, [node0, node1])
        kill_tree(node1)
        killed_at = time.time()
        paused.unlink()  # rank 0 goes on into step 2, whose all-reduce has no peer
        output = node0.communicate(timeout=60)[0]
    finally:
        kill_tree(node0)
        kill_tree(node1)
    assert node0.returncode != 0, output[-4000:]
    assert time.time() - killed_at < 60
