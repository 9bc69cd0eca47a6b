#!/usr/bin/env bash
# Bring up a throwaway one-node SLURM cluster on this machine (Debian 12, SLURM 22.05, as root):
# what CI and the SLURM sweep test run against. Idempotent: a cluster that already answers is kept.
#
#   ci/slurm/up.sh                    # installs slurmctld slurmd slurm-client munge if missing
#   export SLURM_CONF=/tmp/safe-slurm/etc/slurm.conf   # every client (sbatch, squeue, Python) needs it
#   ci/slurm/down.sh                  # stops the daemons by their recorded PIDs
#
# Environment: SLURM_ROOT (default /tmp/safe-slurm) holds config, state, logs and PIDs;
# SLURM_CPUS (default nproc) and SLURM_MEM_MB (default 90% of RAM) size the node.
# No slurmdbd (sacct would need MariaDB): finished jobs are listed one per line in
# $SLURM_ROOT/log/jobcomp.txt (jobcomp/filetxt) with their state, exit code and times.
set -euo pipefail
R=${SLURM_ROOT:-/tmp/safe-slurm}
export SLURM_CONF=$R/etc/slurm.conf
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

pkgs="slurmctld slurmd slurm-client munge"
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

if [ -f "$SLURM_CONF" ] && sinfo -h -o %t 2>/dev/null | grep -qx idle; then
  echo "SLURM already up (SLURM_CONF=$SLURM_CONF)"; exit 0
fi

mkdir -p "$R"/{etc,state,spool,log,run}
# slurmctld and slurmd must find themselves under `hostname -s`; NodeAddr=127.0.0.1 avoids DNS.
H=$(hostname -s)
CPUS=${SLURM_CPUS:-$(nproc)}
MEM=${SLURM_MEM_MB:-$(awk '/^MemTotal:/{print int($2/1024*0.9)}' /proc/meminfo)}  # no procps needed
cat > "$SLURM_CONF" <<CONF
ClusterName=safeci
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$R/state
SlurmdSpoolDir=$R/spool
SlurmctldPidFile=$R/run/slurmctld.pid
SlurmdPidFile=$R/run/slurmd.pid
SlurmctldLogFile=$R/log/slurmctld.log
SlurmdLogFile=$R/log/slurmd.log
# No systemd, no cgroups on a CI machine: track processes by parent PID, no task containment.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# Without it a job waits for the next scheduling pass (seconds); with it jobs start in under 3 s.
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$R/log/jobcomp.txt
JobRequeue=1
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmdTimeout=30
NodeName=${H} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${H} Default=YES MaxTime=INFINITE State=UP
CONF

waitfor() { for _ in $(seq 150); do eval "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "timeout: $1" >&2; return 1; }

# munge: the package's postinst makes /etc/munge/munge.key; /run/munge must exist and belong to munge.
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F </dev/null >"$R/log/munged.out" 2>&1 &
  echo $! > "$R/run/munged.fg.pid"
  waitfor '(munge -n | unmunge)'
fi

# Foreground daemons (-D) under setsid: no systemd needed, and down.sh stops them by these PIDs.
setsid /usr/sbin/slurmctld -D -f "$SLURM_CONF" </dev/null >"$R/log/slurmctld.out" 2>&1 &
echo $! > "$R/run/slurmctld.fg.pid"
waitfor "scontrol ping | grep -q UP"
setsid /usr/sbin/slurmd -D -f "$SLURM_CONF" </dev/null >"$R/log/slurmd.out" 2>&1 &
echo $! > "$R/run/slurmd.fg.pid"
waitfor "sinfo -h -o %t | grep -qx idle"
sinfo
echo "SLURM up: export SLURM_CONF=$SLURM_CONF"
