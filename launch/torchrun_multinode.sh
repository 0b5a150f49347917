#!/bin/bash
# Run on EVERY node (same command, its own NODE_RANK), from the repository root, e.g. for 2 nodes x 8 GPUs:
#   node 0:  NNODES=2 NODE_RANK=0 MAIN_ADDR=node0.example MAIN_PORT=29500 launch/torchrun_multinode.sh --config ...
#   node 1:  NNODES=2 NODE_RANK=1 MAIN_ADDR=node0.example MAIN_PORT=29500 launch/torchrun_multinode.sh --config ...
# Without accelerate's config the recipe runs DDP; add --deepspeed ds_configs/zero3.json for ZeRO-3.
# SIGTERM to this script (or to every process of the node, as SLURM does) makes the ranks save a checkpoint at the
# next step end and exit 0 without final outputs; resume with --resume_from_checkpoint true (docs/distributed.md).
# RECIPE (default recipes/sft_taso.py) names the training script.
set -euo pipefail
: "${NNODES:?}" "${NODE_RANK:?}" "${MAIN_ADDR:?}"
MAIN_PORT=${MAIN_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
export TASO_DDP_TIMEOUT=${TASO_DDP_TIMEOUT:-1800}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# If torchrun's agent itself gets SIGTERM it kills the ranks after this many seconds: time for the last step + save.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

source "$(dirname "${BASH_SOURCE[0]}")/forward_sigterm.sh"
forward_sigterm children torchrun \
  --nnodes "$NNODES" \
  --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d \
  --rdzv_endpoint "$MAIN_ADDR:$MAIN_PORT" \
  --rdzv_id "${RDZV_ID:-taso-sft}" \
  --max_restarts 0 \
  "${RECIPE:-recipes/sft_taso.py}" "$@"
