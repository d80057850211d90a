#!/usr/bin/env bash
# Stop the single-node test cluster started by .ci/slurm-up.sh (slurmd, slurmctld, munged),
# by the pids in their pid files. Safe to run when nothing is running. --quiet: no messages.
set -uo pipefail

quiet=0
[ "${1:-}" = "--quiet" ] && quiet=1
log() { [ $quiet = 1 ] || echo "slurm-down: $*" >&2; }

stop() {  # stop NAME PIDFILE
  local name=$1 pidfile=$2 pid
  [ -f "$pidfile" ] || { log "$name: no pid file"; return 0; }
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    log "$name: not running"; rm -f "$pidfile"; return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name ($pid) ignored SIGTERM; killing"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  log "$name ($pid) stopped"
}

stop slurmd /run/slurmd/slurmd.pid
stop slurmctld /run/slurmctld/slurmctld.pid
stop munged /run/munge/munged.pid
exit 0
