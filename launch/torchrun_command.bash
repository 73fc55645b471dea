# shellcheck shell=bash
# Sourced by launch/single_node.sh and launch/multi_node.sh: the worker count they default
# to, and how they hand over to torchrun.

# The GPUs torch will see (CUDA_VISIBLE_DEVICES narrows those nvidia-smi lists), or 2 CPU
# workers (gloo) without GPUs: enough to exercise DDP on any machine.
default_nproc() {
    local count=0 devices
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -ra devices <<<"$CUDA_VISIBLE_DEVICES"
        count=${#devices[@]}
    elif command -v nvidia-smi >/dev/null 2>&1; then
        # grep -c prints 0 and exits 1 when nothing matches: that is a valid answer here.
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if ((count > 0)); then
        echo "$count"
    else
        echo 2
    fi
}

# Print the command, shell-quoted, to stderr; then run it in this process, unless DRY_RUN
# is set to anything but 0.
run_command() {
    printf '+' >&2
    printf ' %q' "$@" >&2
    echo >&2
    if [[ ${DRY_RUN:-0} != 0 ]]; then
        exit 0
    fi
    exec "$@"
}
