#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests and for trying profiles/slurm by hand.
#
#   sudo bash scripts/slurm/up.sh      # installs (Debian), configures, starts, waits until the node is idle
#   sudo bash scripts/slurm/down.sh    # stops the daemons by PID and removes their state
#
# The node offers SLURM_NODE_CPUS CPUs (default: all of them; more lets short jobs overlap),
# SLURM_NODE_MEM_MB of memory (default: 90 % of it; more lets jobs that ask for more than they use
# overlap) and SLURM_FAKE_GPUS (default 1) fake GPUs (gres "gpu" backed by /dev/null), so rules that
# ask for `gpu` are scheduled exactly as on a GPU cluster and then run on the CPU. There is no accounting daemon: query job states with squeue
# (`--slurm-status-command squeue`), as sacct has nothing to ask.
# No systemd is needed: munged, slurmctld and slurmd are started directly and their PIDs kept in
# $MONOSCOPE_SLURM_STATE. Running this script again while the cluster is up does nothing.
set -euo pipefail

STATE=${MONOSCOPE_SLURM_STATE:-/var/tmp/monoscope-slurm}
FAKE_GPUS=${SLURM_FAKE_GPUS:-1}
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
CONF_DIR=/etc/slurm
MARK="# written by monoscope scripts/slurm/up.sh; removed by scripts/slurm/down.sh"
HERE=$(cd "$(dirname "$0")" && pwd)

if [[ $EUID -ne 0 ]]; then
    echo "scripts/slurm/up.sh: run as root (it installs packages and starts system daemons)" >&2
    exit 1
fi

STATE_MARK=.monoscope-slurm-state  # down.sh removes only a state directory that holds it

# Whether a pidfile still names the daemon: its number may have been reused by another process.
running() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(head -c 32 "$1" | tr -d '[:space:]')
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]
}

if running "$STATE/slurmctld.pid" slurmctld && running "$STATE/slurmd.pid" slurmd \
    && [[ $(sinfo -h -N -o %t 2>/dev/null) == idle* || $(sinfo -h -N -o %t 2>/dev/null) == mix* ]]; then
    echo "slurm: already up ($(sinfo -h -N -o '%N %t %G'))"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
fi

if [[ -L $STATE || ( -e $STATE && ! -d $STATE ) ]] || { [[ -d $STATE && ! -f $STATE/$STATE_MARK ]] && [[ -n $(ls -A -- "$STATE") ]]; }; then
    echo "scripts/slurm/up.sh: $STATE exists and was not made by this script; set MONOSCOPE_SLURM_STATE to a new path" >&2
    exit 1
fi

# A previous run that died half-way leaves PIDs and spool files behind: clear them first.
bash "$HERE/down.sh" >/dev/null

for conf in "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"; do
    if [[ -e $conf ]] && ! grep -qF "$MARK" "$conf"; then
        echo "scripts/slurm/up.sh: $conf exists and was not written by this script; refusing to replace it" >&2
        exit 1
    fi
done

mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/munge" "$CONF_DIR"
echo "$MARK" > "$STATE/$STATE_MARK"
HOST=$(hostname -s)
MEM_MB=${SLURM_NODE_MEM_MB:-$(($(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10))}

# munge: authentication between the daemons and the client commands.
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key "$STATE/munge"
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
runuser -u munge -- /usr/sbin/munged --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log"
cp "$STATE/munge/munged.pid" "$STATE/munged.pid"

cat > "$CONF_DIR/slurm.conf" <<CONF
$MARK
ClusterName=monoscope
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Trust the CPU and memory counts below even where they exceed the hardware (SLURM_NODE_CPUS, SLURM_NODE_MEM_MB).
SlurmdParameters=config_overrides
# No cgroups here (containers, CI): track processes by parent PID.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job that names no memory is given the whole node and everything else waits.
DefMemPerCPU=1000
# squeue is the status command here, and the tests ask the controller about every job of a run:
# keep finished jobs visible for an hour (the default, 300 s, is shorter than a slow CI run).
MinJobAge=3600
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# Slurm refuses two GPUs with one device file: GPU i is a link to /dev/null under its own name.
mkdir -p "$STATE/gpu"
{
    echo "$MARK"
    for i in $(seq 0 $((FAKE_GPUS - 1))); do
        gpu=/dev/null
        if ((i > 0)); then gpu=$STATE/gpu/$i && ln -sf /dev/null "$gpu"; fi
        echo "NodeName=$HOST Name=gpu File=$gpu"
    done
} > "$CONF_DIR/gres.conf"

for daemon in slurmctld slurmd; do
    if ! "$daemon"; then
        echo "scripts/slurm/up.sh: $daemon did not start; last log lines:" >&2
        tail -n 20 "$STATE/$daemon.log" >&2 || true
        exit 1
    fi
done

for _ in $(seq 120); do
    state=$(sinfo -h -N -o %t 2>/dev/null || true)
    if [[ $state == idle ]]; then
        echo "slurm: up ($(sinfo -h -N -o '%N %c CPUs %m MB %G'), state in $STATE)"
        exit 0
    fi
    sleep 0.5
done
echo "scripts/slurm/up.sh: the node is not idle after 60 s (state: '${state:-none}'); last log lines:" >&2
tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
exit 1
