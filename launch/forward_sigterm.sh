#!/bin/bash
# Pass SIGTERM (what SLURM sends on preemption and at the time limit) on to the training processes.
#
#   launch/forward_sigterm.sh accelerate launch --config_file launch/single_gpu.yaml recipes/sft_taso.py ...
#   source launch/forward_sigterm.sh; forward_sigterm children|job-steps COMMAND...   (from another script)
#
# Why: `accelerate launch` with one process dies on SIGTERM and leaves the trainer running, orphaned, without the
# signal; with several processes (torchrun's agent) it kills the ranks after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s)
# and exits 1 however they ended. Here the launcher keeps running: the ranks get SIGTERM, save a checkpoint at the
# next step end (taso_llm/preemption.py), exit, and the launcher reports their status.
#   children   to the processes COMMAND started: the ranks of `accelerate launch` / `torchrun` (not their process
#              groups: a DataLoader worker dies of a SIGTERM from anyone but its parent and fails the step);
#              to COMMAND itself while it has started none (nothing to save yet: stopping is what was asked)
#   job-steps  in a SLURM batch script around `srun`: `scancel --signal=TERM $SLURM_JOB_ID`, which signals every
#              process of the job's steps on every node, but not srun: srun answers a SIGTERM of its own by
#              killing its tasks (SIGKILL, "forcing job termination")
# Returns COMMAND's exit status.

_forward_sigterm_to() {
  local mode=$1 pid=$2 targets
  if [[ $mode == job-steps ]]; then
    echo "forward_sigterm: SIGTERM -> the steps of job $SLURM_JOB_ID" >&2
    scancel --signal=TERM "$SLURM_JOB_ID" || true
    return 0
  fi
  targets=$(pgrep -P "$pid" | tr '\n' ' ') || true  # none yet: pgrep fails, and `set -e` must not end the script
  echo "forward_sigterm: SIGTERM -> ${targets:-$pid}" >&2
  kill -TERM ${targets:-$pid} 2>/dev/null || true
}

forward_sigterm() {
  local mode=$1 pid rc
  shift
  if [[ $mode != children && $mode != job-steps ]]; then
    echo "forward_sigterm: the mode must be children or job-steps, not '$mode'" >&2
    return 2
  fi
  "$@" &
  pid=$!
  _forward_sigterm_trapped=0
  trap "_forward_sigterm_trapped=1; _forward_sigterm_to $mode $pid" TERM
  while :; do
    _forward_sigterm_trapped=0
    wait "$pid" && rc=0 || rc=$?
    # A trapped signal makes `wait` return 128+15 at once while COMMAND runs on: wait for it again.
    (( _forward_sigterm_trapped && rc > 128 )) || break
  done
  trap - TERM
  return "$rc"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then  # executed, not sourced
  forward_sigterm children "$@"
fi
