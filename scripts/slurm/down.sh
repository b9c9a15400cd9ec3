#!/usr/bin/env bash
# Stops the cluster that scripts/slurm/up.sh started (by the PIDs it recorded) and removes its state
# and the configuration files it wrote. Safe to run when nothing is running.
set -euo pipefail

STATE=${MONOSCOPE_SLURM_STATE:-/var/tmp/monoscope-slurm}
MARK="# written by monoscope scripts/slurm/up.sh; removed by scripts/slurm/down.sh"

stop() {
    local pidfile=$STATE/$1.pid
    [[ -s $pidfile ]] || return 0
    local pid
    pid=$(cat "$pidfile")
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

for conf in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if [[ -e $conf ]] && grep -qF "$MARK" "$conf"; then rm -f "$conf"; fi
done
rm -rf "$STATE"
