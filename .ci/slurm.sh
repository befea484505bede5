#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm.py and CI.
#
#   .ci/slurm.sh start STATE_DIR   install (apt, as root) if needed, write /etc/slurm/slurm.conf,
#                                  start munged, slurmctld and slurmd, wait for the node to be idle
#   .ci/slurm.sh stop STATE_DIR    stop the daemons started above, by the PIDs kept in STATE_DIR
#
# Exit status 0: done; 3: SLURM cannot be set up here (not root, no apt-get, install failed, or an
# /etc/slurm/slurm.conf this script did not write) -- the test skips with this script's message;
# anything else: a real failure. Made for Debian bookworm (Slurm 22.05, munge 0.5.15).
#
# Choices that matter on a bare container: proctrack/linuxproc and task/none need no cgroups;
# select/cons_tres with CR_Core_Memory schedules cores and memory, so jobs really wait for each
# other; no slurmdbd, so callers must use `--slurm-status-command squeue` (sacct needs accounting).
# The config must be /etc/slurm/slurm.conf: the executor's job step drops SLURM_CONF.
set -euo pipefail
# the daemons and runuser live in the sbin folders, which a user's (or CI's) PATH of /usr/bin:/bin lacks
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

cmd=${1:-}
state=${2:-}
[[ -n $cmd && -n $state ]] || { echo "usage: $0 start|stop STATE_DIR" >&2; exit 2; }
conf=/etc/slurm/slurm.conf
marker="# written by rcm .ci/slurm.sh"

unavailable() { echo "slurm.sh: SLURM unavailable: $*" >&2; exit 3; }

stop_pid() {  # stop_pid NAME: TERM, then KILL after 10 s; only the PID we recorded
    local file=$state/$1.pid pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

if [[ $cmd == stop ]]; then
    stop_pid slurmd       # the node first, so the controller never sees it die under a job
    stop_pid slurmctld
    stop_pid munged
    # Without a controller, every `scontrol` (which the executor plugin runs whenever snakemake
    # starts, slurm or not) waits ~10 s for it; without a config it fails at once.
    if [[ -f $conf ]] && grep -qF "$marker" "$conf"; then rm -f "$conf"; fi
    exit 0
fi
[[ $cmd == start ]] || { echo "slurm.sh: unknown command '$cmd'" >&2; exit 2; }

mkdir -p "$state"
state=$(cd "$state" && pwd)

# ---------------------------------------------------------------------------------------- install
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    [[ $(id -u) == 0 ]] || unavailable "not installed, and installing needs root"
    command -v apt-get >/dev/null || unavailable "not installed, and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    pkgs=(slurmctld slurmd slurm-client munge)
    # a fresh image may have no package lists: update them only if the install needs it
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" > "$state/apt.log" 2>&1 || {
        apt-get update -q >> "$state/apt.log" 2>&1 &&
            apt-get install -y -q --no-install-recommends "${pkgs[@]}" >> "$state/apt.log" 2>&1
    } || unavailable "apt-get install ${pkgs[*]} failed (see $state/apt.log)"
fi
[[ $(id -u) == 0 ]] || unavailable "starting slurmd needs root"

if [[ -e $conf ]] && ! grep -qF "$marker" "$conf"; then
    unavailable "$conf exists and was not written by this script; not touching a real cluster"
fi

# ---------------------------------------------------------------------------------------- munge
[[ -s /etc/munge/munge.key ]] || {
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
}
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
runuser -u munge -- /usr/sbin/munged --foreground > "$state/munged.log" 2>&1 &
echo $! > "$state/munged.pid"
for _ in $(seq 50); do [[ -S /run/munge/munge.socket.2 ]] && break; sleep 0.1; done
munge -n | unmunge > /dev/null || { echo "slurm.sh: munge does not work (see $state/munged.log)" >&2; exit 1; }

# ---------------------------------------------------------------------------------------- config
host=$(hostname -s)
node=$(slurmd -C | head -n1)                      # NodeName=... CPUs=... RealMemory=...
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<< "$node")
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<< "$node")
mkdir -p /etc/slurm "$state/spool/ctld" "$state/spool/d"
cat > "$conf" <<EOF
$marker; state in $state
ClusterName=rcmci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/slurmctld.daemon.pid
SlurmdPidFile=$state/slurmd.daemon.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( mem / cpus ))
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# ---------------------------------------------------------------------------------------- daemons
slurmctld -D -i > "$state/slurmctld.out" 2>&1 &
echo $! > "$state/slurmctld.pid"
slurmd -D > "$state/slurmd.out" 2>&1 &
echo $! > "$state/slurmd.pid"
for _ in $(seq 150); do
    if [[ $(sinfo -h -N -o '%T' 2>/dev/null | head -n1) == idle ]]; then
        echo "slurm.sh: node $host idle ($cpus CPUs, ${mem} MB); state in $state"
        exit 0
    fi
    sleep 0.2
done
echo "slurm.sh: node did not become idle in 30 s:" >&2
sinfo -N -l >&2 || true
tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2 || true
exit 1
