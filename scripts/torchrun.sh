#!/bin/bash
# Multi-node training with torchrun (no scheduler). Run the same command on every node:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 host> scripts/torchrun.sh CONFIG.yaml [overrides…]
set -euo pipefail
config=${1:?usage: scripts/torchrun.sh CONFIG.yaml [overrides…]}
shift
nnodes=${NNODES:-1}
gpus=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
exec torchrun --nnodes "$nnodes" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$gpus" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    -m agentlit fit --config "$config" --trainer.num_nodes "$nnodes" --trainer.devices "$gpus" --trainer.strategy ddp "$@"
