#!/usr/bin/env bash
# Stops the cluster that scripts/slurm/up.sh started (by the PIDs it recorded) and removes its state
# and the configuration files it wrote. Safe to run when nothing is running.
set -euo pipefail

STATE=${MONOSCOPE_SLURM_STATE:-/var/tmp/monoscope-slurm}
MARK="# written by monoscope scripts/slurm/up.sh; removed by scripts/slurm/down.sh"
# up.sh writes this file into the state directory it creates; only such a directory is removed here.
STATE_MARK=.monoscope-slurm-state

# A pidfile outlives its process (a reboot, a crash, a /var/tmp that persists), and its number may
# since have been given to any other process: act on it only while it still names the daemon.
is_daemon() {
    local pid=$1 name=$2
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]
}

stop() {
    local pidfile=$STATE/$1.pid
    [[ -s $pidfile ]] || return 0
    local pid
    pid=$(head -c 32 "$pidfile" | tr -d '[:space:]')
    if ! is_daemon "$pid" "$1"; then
        if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
            echo "slurm: $pidfile names PID $pid, which is not $1 now; left alone" >&2
        fi
        return 0
    fi
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
        echo "slurm: stopped $1 ($pid)"
    fi
}

# The node first, so that it does not outlive its controller; munge last, the others need it to stop cleanly.
stop slurmd
stop slurmctld
stop munged

# Only the configuration of this cluster: written by up.sh (the mark) for this state directory
# (slurm.conf names it; gres.conf goes with it), not one that another state path's cluster uses.
if [[ -e /etc/slurm/slurm.conf ]] && grep -qF "$MARK" /etc/slurm/slurm.conf \
    && grep -qxF "StateSaveLocation=$STATE/ctld" /etc/slurm/slurm.conf; then
    rm -f /etc/slurm/slurm.conf
    if [[ -e /etc/slurm/gres.conf ]] && grep -qF "$MARK" /etc/slurm/gres.conf; then rm -f /etc/slurm/gres.conf; fi
fi

if [[ -L $STATE ]]; then
    echo "scripts/slurm/down.sh: $STATE is a symbolic link; refusing to remove it or what it points to" >&2
    exit 1
elif [[ -d $STATE ]]; then
    if [[ -f $STATE/$STATE_MARK ]]; then
        rm -rf -- "$STATE"
    elif [[ -z $(ls -A -- "$STATE") ]]; then
        rmdir -- "$STATE"
    else
        echo "scripts/slurm/down.sh: $STATE was not made by scripts/slurm/up.sh (no $STATE_MARK in it); refusing to remove it" >&2
        exit 1
    fi
elif [[ -e $STATE ]]; then
    echo "scripts/slurm/down.sh: $STATE is not a directory; refusing to remove it" >&2
    exit 1
fi
