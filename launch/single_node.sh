#!/usr/bin/env bash
# Usage: launch/single_node.sh [DDP_TRAIN ARGS...]
#
# Trains on this machine with torchrun --standalone, one worker per GPU (or 2 workers on
# a machine without GPUs). Every argument goes to ddp_train as is, e.g.
#   launch/single_node.sh --config my.yaml train.max_steps=1000
#   NPROC=4 launch/single_node.sh model.name=cnn
#
# Environment:
#   NPROC      workers (default: the GPUs CUDA_VISIBLE_DEVICES or nvidia-smi shows, else 2)
#   PYTHON     the Python that has ddp_train installed (default: python3)
#   DRY_RUN=1  print the command and exit
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
    echo "ddp_train's own options: python3 -m ddp_train --help"
    exit 0
fi

# shellcheck source=launch/torchrun_command.bash
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/torchrun_command.bash"

NPROC=${NPROC:-$(default_nproc)}

cmd=("${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc-per-node="$NPROC"
     -m ddp_train "$@")
run_command "${cmd[@]}"
