#!/usr/bin/env python3
"""Stand-ins for `srun`, `scancel` and `scontrol` in tests (tests/test_multinode.py): a batch job of SLURM_NNODES
nodes with one task per node, all on this machine. The command is the name this file is called by (the others are
links to it); FAKE_SLURM_DIR holds the step's task ids and what was asked of scontrol.

  srun [options] COMMAND...   task i runs COMMAND with SLURM_NODEID = SLURM_PROCID = i, SLURM_LOCALID = 0.
                              --kill-on-bad-exit=1: a task that exits non-zero gets every task killed (SIGKILL to
                              each process). SIGTERM to srun itself: SIGKILL to the tasks ("forcing job
                              termination"), as the real srun does. Exit status: the worst task's (128+N for one
                              killed by signal N). Tasks i > 0 start once FAKE_SRUN_WAIT_PORT accepts connections:
                              on one machine node 1's agent could otherwise host the rendezvous store on node 0's
                              port first, and accelerate on machine rank 0 refuses a port in use (on a cluster node
                              1 reaches node 0's address and hosts nothing).
  scancel --signal=SIG JOBID  SIG to every process of every task (slurmstepd signals the whole step), not to srun.
  scontrol show hostnames L   one host a line (comma-separated lists only).
  scontrol requeue JOBID      "requeue JOBID" appended to FAKE_SLURM_DIR/requeue.log.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "."))
TASKS = STATE / "step.tasks"  # one task's root pid a line, written by srun


def signal_tasks(pids, sig) -> None:
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in tree:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass


def wait_for_port(port: int, tasks, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and all(t.poll() is None for t in tasks):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)


def srun(args: list[str]) -> int:
    kill_on_bad_exit = False
    while args and args[0].startswith("-"):
        kill_on_bad_exit |= args.pop(0) in ("--kill-on-bad-exit", "--kill-on-bad-exit=1", "-K", "-K1")
    tasks = []

    def force_termination(sig, frame):
        print("srun: forcing job termination", file=sys.stderr)
        signal_tasks([t.pid for t in tasks], signal.SIGKILL)

    signal.signal(signal.SIGTERM, force_termination)
    TASKS.write_text("")  # a new step
    for node in range(int(os.environ["SLURM_NNODES"])):
        if node and os.environ.get("FAKE_SRUN_WAIT_PORT"):
            wait_for_port(int(os.environ["FAKE_SRUN_WAIT_PORT"]), tasks)
        env = {**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURM_LOCALID": "0"}
        tasks.append(subprocess.Popen(args, env=env, start_new_session=True))
        with open(TASKS, "a") as f:
            f.write(f"{tasks[-1].pid}\n")
    status, running = 0, list(tasks)
    while running:
        for t in [t for t in running if t.poll() is not None]:
            running.remove(t)
            code = t.returncode if t.returncode >= 0 else 128 - t.returncode
            status = max(status, code)
            if code and kill_on_bad_exit and running:
                print(f"srun: task {tasks.index(t)} exited with {code}: killing the step", file=sys.stderr)
                signal_tasks([r.pid for r in running], signal.SIGKILL)
        time.sleep(0.1)
    return status


def scancel(args: list[str]) -> int:
    sig = next((a.split("=", 1)[1] for a in args if a.startswith("--signal=")), "KILL")
    signal_tasks([int(pid) for pid in TASKS.read_text().split()], getattr(signal, f"SIG{sig}"))
    return 0


def scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"]:
        os.write(1, ("\n".join(args[2].split(",")) + "\n").encode())  # one write, as the real one: `| head -n 1`
    elif args[:1] == ["requeue"]:
        with open(STATE / "requeue.log", "a") as f:
            f.write(f"requeue {args[1]}\n")
    else:
        print(f"fake scontrol: not supported: {args}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit({"srun": srun, "scancel": scancel, "scontrol": scontrol}[Path(sys.argv[0]).name](sys.argv[1:]))
