#!/usr/bin/env bash
# A single-node Slurm on this machine, from Debian's packages, for trying `--executor slurm` on a
# workstation and for the Slurm tests (CI starts it before the tests and stops it after).
#
#   sudo scripts/slurm-single-node.sh start    install (apt-get) if needed, configure, start
#   sudo scripts/slurm-single-node.sh status   sinfo; exit 0 when the cluster answers
#   sudo scripts/slurm-single-node.sh stop     cancel its jobs, stop slurmctld, slurmd and munged
#
# The cluster: one node "localhost" (127.0.0.1) with this machine's CPUs, munge authentication,
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no cgroups: works in containers),
# no accounting database. Partitions:
#   debug   default, MaxTime 30 min, preemptable: its jobs are requeued (PreemptMode=REQUEUE)
#           and told first with their --signal (preempt_send_user_signal), 20 s of grace
#   urgent  higher PriorityTier: a job here preempts debug's jobs (try the requeue path by hand)
# State, spool and daemon logs live in $CZSL_SLURM_STATE (default /var/lib/czsl-slurm); the
# config is /etc/slurm/slurm.conf, written only when absent or written by this script before.
set -euo pipefail

STATE=${CZSL_SLURM_STATE:-/var/lib/czsl-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by czsl-bench scripts/slurm-single-node.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "slurm-single-node: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons): sudo $0 $1"
}

install_packages() {
  local missing=()
  for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # a fresh machine has no package lists; an old list may name versions no longer served
  if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/tmp/czsl-slurm-apt.log 2>&1; then
    apt-get update -q >>/tmp/czsl-slurm-apt.log 2>&1 || die "apt-get update failed; see /tmp/czsl-slurm-apt.log"
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>/tmp/czsl-slurm-apt.log 2>&1 \
      || die "apt-get install ${PACKAGES[*]} failed; see /tmp/czsl-slurm-apt.log"
  fi
}

start_munge() {
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --force >/dev/null
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "munged did not start; see /var/log/munge/munged.log"
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; leaving it alone (move it away to use this cluster)"
  fi
  local cpus mem
  cpus=$(nproc)
  # 80% of the memory, in MB: what jobs may ask for with --mem
  mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
  cat >"$CONF" <<EOF
$MARK
ClusterName=czsl-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# requeue on preemption, with the job's --signal sent first (submitit's checkpoint signal)
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
KillWait=5
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=30 State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=urgent Nodes=localhost MaxTime=30 State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

cluster_answers() { sinfo -h -o %T >/dev/null 2>&1; }

start() {
  need_root start
  install_packages
  start_munge
  write_config
  if ! cluster_answers; then
    # -c: a clean controller state, so jobs of an earlier session never come back
    slurmctld -c
  fi
  if [ ! -f "$STATE/slurmd.pid" ] || ! kill -0 "$(cat "$STATE/slurmd.pid")" 2>/dev/null; then
    slurmd -N localhost
  fi
  local state=""
  for _ in $(seq 120); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -1 || true)
    case "$state" in
      idle*|mixed*|allocated*) echo "Slurm is up: $(sinfo -h -o '%P %a %l %D %T' | tr '\n' ';')"; return 0 ;;
      down*|drain*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  die "the node did not become idle (state: ${state:-no answer}); see $STATE/slurmctld.log and $STATE/slurmd.log"
}

stop_pid() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$file"
}

stop() {
  need_root stop
  if cluster_answers; then
    scancel --full --quiet --user=root 2>/dev/null || true
  fi
  stop_pid "$STATE/slurmd.pid"
  stop_pid "$STATE/slurmctld.pid"
  stop_pid /run/munge/munged.pid
  echo "Slurm stopped"
}

status() {
  if cluster_answers; then sinfo; else echo "Slurm is not running (start it: $0 start)"; exit 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
