#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, from Debian's packages (slurmctld, slurmd,
# munge): `up` installs what is missing, writes a configuration under $STATE (nothing in /etc is
# changed but munge's key), starts munged, slurmctld and slurmd, and waits for the node to be
# idle; `down` stops them. Prints `export SLURM_CONF=...` for the shell that submits jobs.
# Usage: bash deploy/slurm/one-node-cluster.sh up|down   (STATE=/tmp/recap-slurm CPUS=4)
set -euo pipefail
STATE=${STATE:-/tmp/recap-slurm}
CPUS=${CPUS:-4}
cmd=${1:-up}
conf="$STATE/slurm.conf"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

down() {
  for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
    if [ -f "$pidfile" ]; then $SUDO kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; fi
  done
}

if [ "$cmd" = down ]; then down; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null 2>&1; } \
    || { echo "cannot install slurmctld/slurmd/munge from apt" >&2; exit 3; }
  # The packages may start their own daemons where systemd runs; ours use their own state.
  $SUDO systemctl stop slurmctld slurmd munge >/dev/null 2>&1 || true
fi

down
mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/munge"
# munge: a key (the package's, or a fresh one) and a daemon on our own socket.
if [ ! -s /etc/munge/munge.key ]; then
  $SUDO mkdir -p /etc/munge
  $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  $SUDO chmod 400 /etc/munge/munge.key
fi
$SUDO mkdir -p /run/munge /var/lib/munge /var/log/munge
$SUDO munged --force --pid-file="$STATE/munged.pid" --log-file="$STATE/munge/munged.log" \
  --seed-file="$STATE/munge/munged.seed" --socket=/run/munge/munge.socket.2 \
  || { echo "munged would not start (see $STATE/munge/munged.log)" >&2; exit 3; }

host=$(hostname -s)
cat > "$conf" <<CONF
ClusterName=recap
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-16817}
SlurmdPort=${SLURMD_PORT:-16818}
# No cgroups in a container: processes are tracked by parentage, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
# A requeued task starts again at once (no 60 s hold), as a test wants.
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF="$conf"
$SUDO env SLURM_CONF="$conf" slurmctld -c || { echo "slurmctld would not start (see $STATE/slurmctld.log)" >&2; exit 3; }
$SUDO env SLURM_CONF="$conf" slurmd -c || { echo "slurmd would not start (see $STATE/slurmd.log)" >&2; exit 3; }
for _ in $(seq 60); do
  state=$(sinfo -h -o %t 2>/dev/null | head -1 || true)
  case "$state" in idle|mix|alloc) break ;; esac
  sleep 1
done
if ! sinfo -h -o %t 2>/dev/null | grep -qE "idle|mix|alloc"; then
  echo "the node did not come up: sinfo says '$(sinfo -h -o %t 2>&1 | head -1)'" >&2
  tail -5 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  exit 3
fi
echo "export SLURM_CONF=$conf"
