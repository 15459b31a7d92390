#!/usr/bin/env bash
# Train with FSDP2 on several GPUs, on one node or many, through torchrun.
#
# Usage: ./multitrain_llama3.sh [extra flags for `python -m llama3 multitrain`]
#
# The model, data and optimisation settings are those of train_llama3.sh (edit them there or set
# them in the environment). This script adds where the processes run; on each node, run it with
# the same MASTER_ADDR/MASTER_PORT and that node's NODE_RANK:
#   NPROC_PER_NODE   processes (GPUs) on this node
#   NNODES           nodes in the job
#   NODE_RANK        this node's index, 0 .. NNODES-1
#   MASTER_ADDR      address of node 0
#   MASTER_PORT      a free TCP port on node 0
#   PREFETCHING      FSDP blocks to prefetch ahead in forward and backward (0 = none)
# BATCH_SIZE in train_llama3.sh is per process: the global batch is BATCH_SIZE × processes.
set -euo pipefail
NPROC_PER_NODE="${NPROC_PER_NODE:-}"  # default: the number of GPUs on this node (1 without any)
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
PREFETCHING="${PREFETCHING:-1}"

cd "$(dirname "$0")"
source scripts/common.sh
handle_help "$@"
python_bin="$(pick_python)"
if [[ -z "$NPROC_PER_NODE" ]]; then
  NPROC_PER_NODE="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi

LAUNCHER="$python_bin -m torch.distributed.run --nproc_per_node $NPROC_PER_NODE --nnodes $NNODES \
--node_rank $NODE_RANK --master_addr $MASTER_ADDR --master_port $MASTER_PORT" \
SUBCOMMAND=multitrain exec ./train_llama3.sh --prefetching "$PREFETCHING" "$@"
