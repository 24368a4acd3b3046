#!/bin/bash
# Multi-node DDP with torchrun (no scheduler): start the same command on every node, NODE_RANK 0..NNODES-1.
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0's address> scripts/torchrun.sh CONFIG.yaml [overrides…]
# Variables (torchrun's static rendezvous; tests/test_multinode.py sets the same ones on 127.0.0.1):
#   NNODES (default 1), NODE_RANK (0), GPUS_PER_NODE (the GPUs nvidia-smi lists; processes per node),
#   MASTER_ADDR (127.0.0.1), MASTER_PORT (29500).
# data.batch_size is per process: the global batch is batch_size × GPUS_PER_NODE × NNODES.
set -euo pipefail
config=${1:?usage: scripts/torchrun.sh CONFIG.yaml [overrides…]}
shift
nnodes=${NNODES:-1}
gpus=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
if [ "$gpus" -lt 1 ]; then
    echo "scripts/torchrun.sh: no GPU found; set GPUS_PER_NODE (processes per node; on CPUs add --trainer.accelerator cpu)" >&2
    exit 2
fi
exec torchrun --nnodes "$nnodes" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$gpus" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    -m agentlit fit --config "$config" --trainer.num_nodes "$nnodes" --trainer.devices "$gpus" --trainer.strategy ddp "$@"
