#!/usr/bin/env bash
# Train with FSDP2 on several GPUs, on one node or many, through torchrun.
#
# Usage: ./multitrain_llama3.sh [extra flags for `python -m llama3 multitrain`]
#
# The model, data and optimisation settings are those of train_llama3.sh (edit them there or set
# them in the environment). This script adds where the processes run. Run it on every node with
# the same RDZV_ENDPOINT and RDZV_ID; the nodes find each other there (torchrun's c10d rendezvous)
# and number themselves:
#   NPROC_PER_NODE   processes (GPUs) on this node (default: its GPUs, 1 without any)
#   NNODES           nodes in the job, or MIN:MAX for a job that goes on with fewer
#   RDZV_ENDPOINT    HOST:PORT of the rendezvous, on one of the nodes (default 127.0.0.1:29500)
#   RDZV_ID          the job's name, the same on every node (default llama3)
#   NODE_ADDR        this node's address on the network the nodes share (default: what its
#                    hostname resolves to); set it where the hostname resolves elsewhere (e.g. a
#                    second network interface): the workers then reach the first node there, and
#                    the node whose NODE_ADDR is RDZV_ENDPOINT's host hosts the rendezvous. The
#                    processes' own connections need that interface's name too:
#                    GLOO_SOCKET_IFNAME (CPU), NCCL_SOCKET_IFNAME (GPU)
#   MAX_RESTARTS     how often torchrun restarts the workers when one fails (default 3); each
#                    restart continues every run from its newest checkpoint (--from_checkpoint
#                    auto, which train_llama3.sh passes unless RESUME="")
#   RDZV_BACKEND     c10d (default), or static for a fixed layout: then NODE_RANK (this node's
#                    index, 0 .. NNODES-1), MASTER_ADDR and MASTER_PORT (node 0's address and a
#                    free port on it) place the processes, as in earlier versions
#   PREFETCHING      FSDP blocks to prefetch ahead in forward and backward (0 = none)
# BATCH_SIZE in train_llama3.sh is per process: the global batch is BATCH_SIZE × processes.
set -euo pipefail
NPROC_PER_NODE="${NPROC_PER_NODE:-}"
NNODES="${NNODES:-1}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-127.0.0.1:29500}"
RDZV_ID="${RDZV_ID:-llama3}"
NODE_ADDR="${NODE_ADDR:-}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
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

launcher="$python_bin -m torch.distributed.run --nproc_per_node $NPROC_PER_NODE --nnodes $NNODES \
--max_restarts $MAX_RESTARTS"
case "$RDZV_BACKEND" in
  c10d)
    launcher+=" --rdzv_backend c10d --rdzv_endpoint $RDZV_ENDPOINT --rdzv_id $RDZV_ID"
    if [[ -n "$NODE_ADDR" ]]; then
      launcher+=" --local_addr $NODE_ADDR"
      # torchrun itself hosts the rendezvous on the node whose hostname has the endpoint's address
      [[ "${RDZV_ENDPOINT%:*}" != "$NODE_ADDR" ]] || launcher+=" --rdzv_conf is_host=1"
    fi
    ;;
  static) launcher+=" --node_rank $NODE_RANK --master_addr $MASTER_ADDR --master_port $MASTER_PORT" ;;
  *) die "RDZV_BACKEND must be c10d or static, got '$RDZV_BACKEND'" ;;
esac
# Each attempt (the first start and every restart) gets a rendezvous store of its own, hosted by
# its rank 0, instead of torchrun's store kept across attempts: nodes count their restarts alike
# only when all fail together, so a store shared by attempts cannot be split per attempt on every
# node the same way, and restarted workers would read what their predecessors left there.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
LAUNCHER="$launcher" SUBCOMMAND=multitrain exec ./train_llama3.sh --prefetching "$PREFETCHING" "$@"
