#!/usr/bin/env bash
# Usage: NNODES=N NODE_RANK=I MASTER_ADDR=HOST [MASTER_PORT=P] launch/multi_node.sh [DDP_TRAIN ARGS...]
#
# Run the same command on every node (I = 0 .. N-1); the torchrun agents meet through a
# c10d rendezvous hosted by node 0 at MASTER_ADDR:MASTER_PORT, then each starts NPROC
# workers. Every argument goes to ddp_train as is, e.g. on two nodes:
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multi_node.sh --config my.yaml
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/multi_node.sh --config my.yaml
#
# Environment:
#   NNODES        number of nodes, or MIN:MAX for an elastic job (required)
#   NODE_RANK     this node's index; node 0 hosts the rendezvous (required)
#   MASTER_ADDR   node 0's address, reachable from every node (required)
#   MASTER_PORT   rendezvous port on node 0 (default 29500)
#   NPROC         workers per node (default: the GPUs CUDA_VISIBLE_DEVICES or nvidia-smi
#                 shows, else 2)
#   RDZV_ID       job id, the same on every node and unique per job (default ddp_train)
#   MAX_RESTARTS  times torchrun restarts the workers after a failure; each restart
#                 resumes from the newest checkpoint (default 0)
#   PYTHON        the Python that has ddp_train installed (default python3)
#   DRY_RUN=1     print the command and exit
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
    echo "ddp_train's own options: python3 -m ddp_train --help"
    exit 0
fi

: "${NNODES:?set NNODES (see $0 -h)}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"

# shellcheck source=launch/torchrun_command.bash
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/torchrun_command.bash"

NPROC=${NPROC:-$(default_nproc)}

# c10d picks the store host by matching MASTER_ADDR against this machine's names, which
# is ambiguous when several agents share a machine or MASTER_ADDR is a loopback or
# load-balanced address: say it outright, node 0 hosts.
is_host=false
if [[ $NODE_RANK == 0 ]]; then
    is_host=true
fi

cmd=("${PYTHON:-python3}" -m torch.distributed.run
     --nnodes="$NNODES" --nproc-per-node="$NPROC"
     --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
     --rdzv-id="${RDZV_ID:-ddp_train}" --rdzv-conf="is_host=$is_host"
     --max-restarts="${MAX_RESTARTS:-0}"
     -m ddp_train "$@")
run_command "${cmd[@]}"
