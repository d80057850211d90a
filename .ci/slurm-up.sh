#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this machine (Debian, run as root, no systemd).
#
#   bash .ci/slurm-up.sh          # install if needed, configure, start, wait for the node
#   bash .ci/slurm-down.sh        # stop the daemons again
#
# What it does: installs slurmctld/slurmd/slurm-client/munge from Debian (skipped when they are
# installed), makes a munge key, starts munged as user munge, writes /etc/slurm/slurm.conf for
# one node named `hostname -s` with this machine's CPUs and memory at 127.0.0.1 (no cgroups:
# proctrack/linuxproc + task/none, so it also works inside containers), starts slurmctld and
# slurmd as daemons (pid files under /run/slurm*), then waits up to SLURM_UP_TIMEOUT (60) seconds
# for `sinfo` to show the node idle, printing the daemons' logs if it does not.
# It is idempotent: running it again on a live cluster restarts the daemons with the fresh config.
set -euo pipefail

TIMEOUT=${SLURM_UP_TIMEOUT:-60}
NODE=$(hostname -s)
CPUS=$(nproc)
LOG_DIR=/var/log/slurm
HERE=$(cd "$(dirname "$0")" && pwd)

log() { echo "slurm-up: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root"; exit 1
fi

# --- packages ------------------------------------------------------------------------------
need=()
for p in slurmctld slurmd slurm-client munge; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d (containers) or the lack of systemd keeps the packages from starting services.
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Daemons left over from an earlier start are stopped first, so the new config takes effect.
bash "$HERE/slurm-down.sh" --quiet || true

# --- munge ---------------------------------------------------------------------------------
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key --force
  else
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! runuser -u munge -- /usr/sbin/munged; then
  log "munged failed to start"; cat /var/log/munge/munged.log >&2 || true; exit 1
fi
for _ in $(seq 50); do
  munge -n </dev/null | unmunge >/dev/null 2>&1 && break
  sleep 0.1
done
munge -n </dev/null | unmunge >/dev/null || { log "munge does not work"; exit 1; }

# --- slurm.conf ----------------------------------------------------------------------------
mem_total=$(free -m | awk '/^Mem:/ {print $2}')
# Leave room for the OS: slurmd drains a node that reports less memory than configured.
real_mem=$(( mem_total - (mem_total / 20 > 512 ? mem_total / 20 : 512) ))
# Topology from slurmd itself when it agrees with nproc (avoids "CPUs mismatch" drains).
topo="CPUs=$CPUS"
hw=$(slurmd -C 2>/dev/null | head -n1 || true)
if [[ "$hw" == *"CPUs=$CPUS "* ]]; then
  topo=$(echo "$hw" | grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' | tr '\n' ' ')
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /run/slurmctld /run/slurmd "$LOG_DIR"
cat > /etc/slurm/slurm.conf <<EOF
# Written by .ci/slurm-up.sh: a single-node test cluster. Edit that script, not this file.
ClusterName=ivb-ci
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after cred_expire seconds (default 120): shorter for tests.
AuthInfo=cred_expire=30
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld/slurmctld.pid
SlurmdPidFile=/run/slurmd/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
DependencyParameters=kill_invalid_depend
MinJobAge=3600
ReturnToService=2
JobRequeue=1
PreemptMode=OFF
MpiDefault=none
SwitchType=switch/none
KillWait=30
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
NodeName=$NODE NodeAddr=127.0.0.1 $topo RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
# Not used by proctrack/linuxproc, but some builds read it at startup and complain if absent.
[ -f /etc/slurm/cgroup.conf ] || cat > /etc/slurm/cgroup.conf <<'EOF'
# Written by .ci/slurm-up.sh; cgroups are not used (ProctrackType=proctrack/linuxproc).
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF

# --- daemons -------------------------------------------------------------------------------
dump_logs() {
  for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
    [ -f "$f" ] && { echo "----- $f (tail)" >&2; tail -n 40 "$f" >&2; }
  done
  sinfo -N -l >&2 || true
}

# -i: ignore (possibly stale) saved state of an earlier run of this cluster.
slurmctld -i || { log "slurmctld failed to start"; dump_logs; exit 1; }
slurmd || { log "slurmd failed to start"; dump_logs; exit 1; }

deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
  state=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)
  case "$state" in
    idle|mixed|allocated) break ;;
    drain*|down*)
      # e.g. left drained by an earlier run: bring it back.
      scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  if [ "$(date +%s)" -ge "$deadline" ]; then
    log "node $NODE not idle after ${TIMEOUT}s (state: ${state:-none})"
    dump_logs; exit 1
  fi
  sleep 1
done
log "cluster up: node $NODE ($topo RealMemory=${real_mem}M) state=$state"
sinfo
