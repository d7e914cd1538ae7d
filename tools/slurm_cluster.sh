#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm` (tests/core/test_slurm.py):
#
#     tools/slurm_cluster.sh start|stop|status      (as root)
#
# start installs Debian's slurm-wlm and munge when slurmctld is missing, creates the munge key if
# there is none, writes /etc/slurm/slurm.conf (this host as its one node, its CPUs and memory, one
# partition, no job accounting: sacct answers with an error, as on many small clusters), starts
# munged, slurmctld and slurmd and waits until the node is idle. Idempotent: what runs is left
# running, and a slurm.conf this script did not write is never replaced. Jobs run as root.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons, where a non-login PATH leaves them out

STATE=${SLURM_CLUSTER_STATE:-/var/lib/clbench-slurm}  # spool, state, logs and pid files
CONF=/etc/slurm/slurm.conf
MARK="# Written by clbench's tools/slurm_cluster.sh: a one-node test cluster."
HOST=$(hostname -s)
WAIT_S=60

say() { echo "slurm_cluster: $*"; }
die() { echo "slurm_cluster: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || die "slurmctld is missing and installing it needs root"
  say "installing slurm-wlm and munge (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed (run apt-get update first?)"
}

config() {
  # The node as slurmd measures it (CPUs, sockets, cores, threads, RealMemory), named as this host.
  local node
  node=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$HOST/")
  cat <<EOF
$MARK
ClusterName=clbench
SlurmctldHost=$HOST
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
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Seconds, not minutes, for a test: finished jobs leave squeue after 5 s, a requeued job may start
# again 5 s later (cred_expire, 120 s by default) and the scheduler looks at pending jobs every 2 s
# (60 s by default).
MinJobAge=5
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2
$node
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1; }

start() {
  install
  mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
  local new
  new=$(config)
  if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
    say "keeping $CONF (not written by this script)"
  elif [ "$(cat "$CONF" 2>/dev/null)" != "$new" ]; then
    alive "$STATE/slurmctld.pid" && stop_slurm  # the daemons read slurm.conf when they start
    echo "$new" >"$CONF"
    say "wrote $CONF"
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge
  chown munge:munge /run/munge
  alive /run/munge/munged.pid || runuser -u munge -- munged
  alive "$STATE/slurmctld.pid" || slurmctld
  alive "$STATE/slurmd.pid" || slurmd
  local deadline=$((SECONDS + WAIT_S)) state
  while state=$(node_state); [ "${state%[*~#]}" != idle ] && [ "${state%[*~#]}" != mixed ] \
      && [ "${state%[*~#]}" != allocated ]; do
    case $state in
      down* | drain* | fail*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    [ $SECONDS -lt $deadline ] || die "node $HOST is '${state:-no answer}' after ${WAIT_S} s; see $STATE/*.log"
    sleep 1
  done
  say "node $HOST is $state"
}

stop_slurm() {
  scontrol shutdown >/dev/null 2>&1 || true
  local deadline=$((SECONDS + 30))
  while { alive "$STATE/slurmctld.pid" || alive "$STATE/slurmd.pid"; } && [ $SECONDS -lt $deadline ]; do
    sleep 0.5
  done
}

stop() {
  stop_slurm
  alive /run/munge/munged.pid && munged --stop >/dev/null
  say "stopped"
}

status() {
  for pid in /run/munge/munged.pid "$STATE/slurmctld.pid" "$STATE/slurmd.pid"; do
    alive "$pid" && say "$(basename "$pid" .pid) running (process $(cat "$pid"))" \
      || say "$(basename "$pid" .pid) not running"
  done
  sinfo -N 2>/dev/null || { say "no answer from slurmctld"; return 1; }
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: tools/slurm_cluster.sh start|stop|status" ;;
esac
