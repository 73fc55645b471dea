#!/usr/bin/env bash
# Usage: tests/slurm_cluster.sh start|stop|status
#
# A one-node Slurm cluster on this machine, for the tests of slurm/*.sbatch.
#   start    install what is missing, start munged, slurmctld, slurmd
#   stop     stop the daemons that 'start' started (by their PIDs)
#   status   print SLURM_CONF=... and exit 0 when jobs can run
#
# Needs root (the daemons) and, when Slurm or munge is not installed yet, apt-get.
# Idempotent: 'start' on a running cluster only checks it. Everything (slurm.conf, state,
# logs, PID files) lives in $DDP_TRAIN_SLURM_DIR (default /tmp/ddp_train_slurm). Client
# commands need SLURM_CONF=$DDP_TRAIN_SLURM_DIR/slurm.conf in their environment.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

DIR=${DDP_TRAIN_SLURM_DIR:-/tmp/ddp_train_slurm}
CONF=$DIR/slurm.conf
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)

log() { echo "slurm_cluster: $*" >&2; }

# Client commands find the cluster through SLURM_CONF only (no /etc/slurm/slurm.conf).
export SLURM_CONF=$CONF

cluster_up() {
    # The controller answers and the node accepts jobs (idle, mixed or allocated).
    scontrol ping >/dev/null 2>&1 &&
        sinfo --noheader --responding --states=idle,mixed,allocated --format=%n 2>/dev/null | grep -q .
}

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        dpkg-query --show --showformat='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' ||
            missing+=("$package")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    # The package scripts try to start the services; without systemd that fails harmlessly.
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already serving (ours from an earlier start, or the system's)
    fi
    # munged refuses to run as root and checks that its directories belong to its user.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$DIR/munged.pid"  # ours to stop
}

write_conf() {
    local host cpus
    host=$(hostname -s)
    # Jobs find their first node by name (the rendezvous host), as on a real cluster.
    if ! getent hosts "$host" >/dev/null; then
        log "adding $host to /etc/hosts: jobs resolve their node names"
        echo "127.0.1.1 $host" >>/etc/hosts
    fi
    # At least 2 CPUs, so that the 2-rank tests fit on a 1-core runner too; config_overrides
    # lets slurmd accept more CPUs than it finds.
    cpus=$(nproc)
    ((cpus >= 2)) || cpus=2
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF" <<EOF
ClusterName=ddptrain
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No systemd and no cgroup setup: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
# Jobs may be requeued (scontrol requeue from the batch script after a preemption).
JobRequeue=1
ReturnToService=2
# Quick scheduling for short test jobs: a requeued job may start again after cred_expire
# (default 120 s), and a pending job waits for the next scheduler pass (default 60 s).
AuthInfo=cred_expire=5
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
# Without accounting, scontrol is the only record of a finished job: keep it 10 minutes.
MinJobAge=600
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    if ((EUID != 0)); then
        log "needs root: the Slurm daemons run as root and munged as the munge user"
        exit 1
    fi
    mkdir -p "$DIR"
    if cluster_up; then
        log "already running ($CONF)"
    else
        stop_daemons
        if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
            install_packages
        fi
        start_munge
        write_conf
        # Daemon mode: each writes its PID file, which 'stop' uses. slurmd registers with
        # the controller when it starts: started before the controller listens, the node
        # would only come up at the controller's next node ping, a minute later.
        # -c: a clean start, so that no job left over from an earlier session runs again.
        slurmctld -c -f "$CONF"
        wait_for "the controller" scontrol ping
        slurmd -f "$CONF"
        wait_for "the node" cluster_up
        log "running ($CONF)"
    fi
}

wait_for() {  # wait_for WHAT COMMAND...: up to 30 s for COMMAND to succeed
    local what=$1 deadline=$((SECONDS + 30))
    shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            log "$what did not come up in 30 s; see $DIR/*.log"
            tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
}

stop_daemons() {
    local name pids=()
    for name in slurmd slurmctld munged; do
        if [[ -s $DIR/$name.pid ]]; then
            pids+=("$(<"$DIR/$name.pid")")
            rm -f "$DIR/$name.pid"
        fi
    done
    ((${#pids[@]} > 0)) || return 0
    kill "${pids[@]}" 2>/dev/null || true
    # Wait for them to go (about 2 s), so that a following start can bind the same ports.
    for _ in {1..100}; do
        kill -0 "${pids[@]}" 2>/dev/null || return 0
        sleep 0.1
    done
}

case ${1:-} in
    start) start ;;
    stop) stop_daemons ;;
    status) cluster_up && echo "SLURM_CONF=$CONF" ;;
    -h | --help) usage ;;
    *) usage >&2; exit 2 ;;
esac
