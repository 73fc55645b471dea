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

gpu_count() {
    # What torch will see: CUDA_VISIBLE_DEVICES narrows the GPUs nvidia-smi lists.
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        local devices
        IFS=, read -ra devices <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#devices[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        # grep -c prints 0 and exits 1 when nothing matches: that is a valid answer here.
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

if [[ -z ${NPROC:-} ]]; then
    NPROC=$(gpu_count)
    # Without GPUs, 2 CPU workers (gloo): enough to exercise DDP on any machine.
    ((NPROC > 0)) || NPROC=2
fi

cmd=("${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc-per-node="$NPROC"
     -m ddp_train "$@")
printf '+' >&2
printf ' %q' "${cmd[@]}" >&2
echo >&2
if [[ ${DRY_RUN:-0} != 0 ]]; then
    exit 0
fi
exec "${cmd[@]}"
