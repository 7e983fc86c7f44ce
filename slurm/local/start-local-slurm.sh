#!/usr/bin/env bash
# A real SLURM cluster on this one machine, to test the batch templates (sbatch, srun,
# multi-node, signals, requeue). Debian/Ubuntu packages; run as root. Idempotent.
#
#   sudo slurm/local/start-local-slurm.sh [start]    install if missing, configure, start, wait idle
#   sudo FAKE_NODES=2 slurm/local/start-local-slurm.sh   nodes n1, n2 (one slurmd each, same host)
#   sudo slurm/local/start-local-slurm.sh stop       cancel jobs, stop the daemons it started
#   slurm/local/start-local-slurm.sh status          exit 0 when the controller answers
#
# Reads: FAKE_NODES (nodes n1..nN, default 1), CRED_EXPIRE (job credential lifetime in s,
# also how long a requeued job waits before it runs again; default 20, SLURM's is 120),
# WAIT_TIMEOUT (s to wait for idle nodes, default 90).
#
# Every node claims all CPUs of the host (oversubscribed) and shares its filesystem, which
# is what a shared output_dir on a real cluster looks like. No cgroups, no accounting
# (no sacct: use `scontrol show job`). Logs: /var/log/slurm; state: /var/spool/slurm*.
set -euo pipefail

FAKE_NODES=${FAKE_NODES:-1}
CRED_EXPIRE=${CRED_EXPIRE:-20}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-90}

CONF=/etc/slurm/slurm.conf
RUN=/run/slurm-local          # our pid files; a daemon is only ever stopped through them
LOGS=/var/log/slurm
HEADER="# written by ddp_finetune slurm/local/start-local-slurm.sh"

say() { echo "[local-slurm] $*" >&2; }
die() { say "error: $*"; tail_logs; exit 1; }

tail_logs() {
    local f
    for f in "$LOGS"/*.log; do [[ -f $f ]] && { echo "--- $f" >&2; tail -n 8 "$f" >&2; }; done
    return 0
}

nodes() { seq -f 'n%g' 1 "$FAKE_NODES"; }

# alive PIDFILE -> 0 when the pid it names is a live (non-zombie) process
alive() {
    local pid state
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# stop PIDFILE: SIGTERM, wait up to 15 s, then SIGKILL
stop() {
    local f=$1 pid i
    alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do alive "$f" || break; sleep 0.5; done
    alive "$f" && kill -KILL "$pid" 2>/dev/null
    rm -f "$f"
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install it"
    say "installing munge and slurm packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null ||
        die "apt-get install of the slurm packages failed"
}

start_munge() {
    # munge authenticates every SLURM message; one key is enough on a single host.
    install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge /var/lib/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        head -c 1024 /dev/urandom >/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    say "starting munged"
    runuser -u munge -- munged
    local i
    for ((i = 0; i < 20; i++)); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$RUN/munged.pid" 2>/dev/null # ours: `stop` ends it too
            return 0
        fi
        sleep 0.5
    done
    die "munged does not answer"
}

# write_config: (re)write slurm.conf; sets CHANGED=1 when its content changed
write_config() {
    local cpus mem n i tmp
    # Socket/core layout as slurmd detects it, so the node is not rejected as "invalid".
    cpus=$(slurmd -C | grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' ||
        echo "CPUs=$(nproc)")
    # 3/4 of the RAM in whole GiB: stable from run to run, so the config only changes with
    # FAKE_NODES (memory is not enforced here anyway)
    mem=$(awk '/^MemTotal:/ {m = int($2 / 1024 * 0.75); print (m > 1024 ? int(m / 1024) * 1024 : m)}' /proc/meminfo)
    tmp=$(mktemp)
    {
        echo "$HEADER (FAKE_NODES=$FAKE_NODES)"
        cat <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=$CRED_EXPIRE
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
JobRequeue=1
EnforcePartLimits=ALL
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
EOF
        # All nodes live on this host: same address, one slurmd port each.
        i=0
        for n in $(nodes); do
            i=$((i + 1))
            echo "NodeName=$n NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$((17000 + i)) $cpus RealMemory=$mem State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$tmp"
    CHANGED=0
    if cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; return 0; fi
    if [[ -f $CONF ]] && ! grep -q "^$HEADER" "$CONF"; then
        say "keeping a copy of the existing $CONF as $CONF.orig"
        cp -n "$CONF" "$CONF.orig"
    fi
    install -D -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    CHANGED=1
}

stop_daemons() {
    local f
    for f in "$RUN"/slurmd-*.pid; do [[ -e $f ]] && stop "$f"; done
    stop "$RUN/slurmctld.pid"
}

all_idle() {
    local states
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u) || return 1
    [[ $(grep -c ' idle$' <<<"$states") == "$FAKE_NODES" && $(wc -l <<<"$states") == "$FAKE_NODES" ]]
}

cmd_start() {
    [[ $(id -u) == 0 ]] || die "run as root (it starts daemons and writes /etc/slurm)"
    [[ $FAKE_NODES =~ ^[1-9][0-9]*$ ]] || die "FAKE_NODES=$FAKE_NODES is not a positive integer"
    local t0=$SECONDS n i
    install_packages
    install -d -o slurm -g slurm -m 0755 "$RUN" "$LOGS" /var/spool/slurmctld
    start_munge
    write_config
    ((CHANGED)) && stop_daemons # a changed node list needs fresh daemons
    alive "$RUN/slurmctld.pid" || { say "starting slurmctld"; slurmctld || die "slurmctld did not start"; }
    for ((i = 0; i < 40; i++)); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
    scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer"
    for n in $(nodes); do
        install -d /var/spool/slurmd/"$n"
        alive "$RUN/slurmd-$n.pid" || { say "starting slurmd $n"; slurmd -N "$n" || die "slurmd $n did not start"; }
    done
    for ((i = 0; i < WAIT_TIMEOUT; i++)); do
        all_idle && break
        # a node left DOWN by an earlier session stays down until resumed
        ((i == 5)) && sinfo -h -N -o '%N %T' | awk '$2 ~ /down|drain|fail/ {print $1}' |
            xargs -r -I{} scontrol update NodeName={} State=RESUME
        sleep 1
    done
    all_idle || { squeue -h | grep -q . && { say "nodes busy with jobs; cluster is up"; return 0; }; die "nodes not idle after $WAIT_TIMEOUT s"; }
    say "ready in $((SECONDS - t0)) s: $(sinfo -h -o '%D nodes (%N), %c CPUs each')"
}

cmd_stop() {
    local i
    if alive "$RUN/slurmctld.pid"; then
        squeue -h -o %i | xargs -r scancel || true
        for ((i = 0; i < 60; i++)); do squeue -h -o %i 2>/dev/null | grep -q . || break; sleep 1; done
    fi
    stop_daemons
    stop "$RUN/munged.pid" # only when this script started it
    say "stopped"
}

case ${1:-start} in
start) cmd_start ;;
stop) cmd_stop ;;
status) scontrol ping 2>/dev/null | grep -q UP && sinfo && exit 0; echo "local slurm is not running" >&2; exit 1 ;;
*) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
