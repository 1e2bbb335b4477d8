#!/usr/bin/env bash
# Start a SLURM cluster for tests and CI on this host: munged, mariadbd + slurmdbd, slurmctld, and one
# slurmd per virtual node (SLURM_NODES, default 1; CI uses 2: Debian's build runs several slurmd on
# one host, each with its own name, port, spool, pid file and log).
# Run as root on Debian (12, Slurm 22.05) without systemd: every daemon is started by hand and
# tracked through a pid file under $SLURM_BASE, so cluster-down.sh stops exactly what this started.
#
# Safe to call again:
#   - cluster already up, healthy, and started with the same configuration -> prints a message and
#     exits 0 without touching it (running jobs survive; the common "make test twice" case);
#   - partly up, unhealthy, or started with different settings (say another SLURM_CPUS) -> runs
#     cluster-down.sh and starts again from a clean state.
#
# Env:
#   SLURM_BASE=/tmp/hpc-mto-slurm  state, spool, logs, pid files, database (wiped at each fresh start;
#                                  kept by cluster-down.sh so the logs can be read after a failure)
#   SLURM_NODES=1         virtual nodes: 1 is this host under its own name; N > 1 are n1..nN
#   SLURM_CPUS=8          CPUs each node advertises; empty (SLURM_CPUS=) = the real count.  submitit always
#                         sends --ntasks-per-node, which Slurm rejects above the node's CPU count, so
#                         on a 2-core box jobs with up to 8 tasks need the node to claim 8 CPUs.
#   SLURM_CRED_EXPIRE=5   AuthInfo=cred_expire (seconds); see the comment in slurm.conf below.
#   SLURM_INSTALL=1       apt-get install missing packages (0: fail instead).
#   SLURM_DB_PORT=3307    port of the private mariadbd.
#   SLURMCTLD_DEBUG / SLURMD_DEBUG   log levels (default info).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${SLURM_BASE:-/tmp/hpc-mto-slurm}
CPUS=${SLURM_CPUS-8}          # "-" not ":-": an explicitly empty SLURM_CPUS means "use the real count"
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-5}
DB_PORT=${SLURM_DB_PORT:-3307}   # not 3306, so it cannot clash with a distro mariadb
DB_SOCK=$BASE/mysqlrun/mysqld.sock
NODE=$(hostname -s)
CLUSTER=ci
NODES=${SLURM_NODES:-1}
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { echo "[cluster-up] ERROR: SLURM_NODES must be 1..99, got '$NODES'" >&2; exit 1; }
if [ "$NODES" = 1 ]; then VNODES=("$NODE"); else VNODES=($(seq -f 'n%g' 1 "$NODES")); fi
NODELIST=$(IFS=,; echo "${VNODES[*]}")
BASEPORT=${SLURM_BASEPORT:-17001}

log() { echo "[cluster-up $(date +%T.%3N)] $*"; }
die() { echo "[cluster-up] ERROR: $*" >&2; exit 1; }
t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# Wait until "$@" succeeds, polling every 0.1 s for at most $TRIES tries.
wait_for() { local i; for ((i = 0; i < TRIES; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
# Exact states only: a suffix means trouble ("idle*" = slurmd not responding, "idle~" = powered down).
node_ready1() { case "$(sinfo -h -N -n "$1" -o %T 2>/dev/null | sed -n 1p)" in idle|mixed|allocated|completing) return 0;; esac; return 1; }
node_ready() { local n; for n in "${VNODES[@]}"; do node_ready1 "$n" || return 1; done; }
# Daemons get a minimal environment: whatever the caller has (a venv's PATH, CI variables, a stray
# SLURM_* variable) must not leak into slurmd and from there into job prologs and steps.  Their
# stdout/stderr go to a file: a daemon that keeps the caller's stdout open makes `.ci/run | tee`
# (or any pipe reading this script's output) hang until the cluster is stopped.
daemon() {  # name cmd...
  local name=$1; shift
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@" </dev/null >>"$BASE/log/$name.stderr" 2>&1
}

[ "$(id -u)" = 0 ] || die "run as root (the daemons run as root/munge/mysql)"

# 1. packages (skipped when installed: dpkg-query is ~10 ms, apt-get update is ~10 s) ---------------
pkgs=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "${SLURM_INSTALL:-1}" = 1 ] || die "missing packages: ${missing[*]} (SLURM_INSTALL=0)"
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: recommends pull in mailx/postfix etc. that nothing here needs.
  # Package postinst scripts try to start services; without systemd/runlevels they are refused
  # ("policy-rc.d denied execution"), which is what we want: we start the daemons below.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. configuration (built first, so that a running cluster can be compared against it) -------------
# Hardware as slurmd detects it, e.g. "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2
# ThreadsPerCore=1 RealMemory=24105".
HW=$(slurmd -C | sed -n 1p | sed -e 's/^NodeName=[^ ]* //')
OVERRIDE=""
if [ -n "$CPUS" ]; then
  # Advertise CPUS cpus. Without config_overrides slurmd compares the configured node with the real
  # hardware and drains it ("Low socket*core*thread count").
  HW="CPUs=$CPUS $(echo "$HW" | grep -o 'RealMemory=[0-9]*')"
  OVERRIDE="SlurmdParameters=config_overrides"
fi
NODE_LINES=""
i=0
for n in "${VNODES[@]}"; do
  NODE_LINES+="NodeName=$n NodeHostname=$NODE NodeAddr=127.0.0.1 Port=$((BASEPORT + i)) $HW Gres=gpu:2 State=UNKNOWN"$'\n'
  i=$((i + 1))
done
NODE_LINES=${NODE_LINES%$'\n'}
SLURM_CONF_TEXT=$(cat <<EOF
# generated by hpc-mto slurm/cluster-up.sh; state in $BASE
ClusterName=$CLUSTER
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job must wait before it may start again (default 120 s,
# minimum 5; a smaller value is ignored and gives 120).  5 makes a submitit requeue take seconds.
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$BASE/ctld
# one slurmd per virtual node: %n (its -N name) gives each its own spool dir, pid file and log
SlurmdSpoolDir=$BASE/d/%n
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=${SLURMCTLD_DEBUG:-info}
SlurmdDebug=${SLURMD_DEBUG:-info}
# No cgroups in this container: linuxproc tracks steps by process tree; task/none binds nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
# no mail transport here; the default (/bin/mail) only logs "MailProg is invalid"
MailProg=/bin/true
# a node that went down (slurmd restart) comes back by itself when slurmd registers again
ReturnToService=2
# Schedule right away and every 2 s, so submitted and requeued jobs start within seconds.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
# submitit's Checkpointable requeues its own job (scontrol requeue) on USR2: requeue must be allowed.
JobRequeue=1
KillWait=5
# keep finished jobs in slurmctld for 10 min: squeue/scontrol still see them while tests inspect them
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
# submitit reads job state with sacct: without slurmdbd job.state is UNKNOWN and result() of a
# cancelled job never returns.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
$OVERRIDE
$NODE_LINES
PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODELIST Default=NO MaxTime=INFINITE State=UP
EOF
)
# Two fake GPUs. Slurm 22.05 drops GPU GRES that name no device file ("Removing file-less GPU"), so
# gres.conf points at two placeholder char devices (major/minor of /dev/null). That is enough for
# --gpus / --gpus-per-task / --gres=gpu:N to schedule, and Slurm sets CUDA_VISIBLE_DEVICES.
GRES_CONF_TEXT=$(cat <<EOF
AutoDetect=off
NodeName=$NODELIST Name=gpu File=$BASE/fakegpu/gpu[0-1]
EOF
)

# 3. already up? -------------------------------------------------------------------------------------
pidfiles=("$BASE/slurmctld.pid" $(for n in "${VNODES[@]}"; do echo "$BASE/slurmd-$n.pid"; done)
          "$BASE/slurmdbd.pid" "$BASE/mysqlrun/mariadb.pid")
n_alive=0
for pf in "${pidfiles[@]}"; do alive "$pf" && n_alive=$((n_alive + 1)); done
if [ "$n_alive" -gt 0 ]; then
  same_conf=0
  [ "$(grep -v '^FirstJobId=' /etc/slurm/slurm.conf 2>/dev/null)" = "$SLURM_CONF_TEXT" ] &&
    [ "$(cat /etc/slurm/gres.conf 2>/dev/null)" = "$GRES_CONF_TEXT" ] && same_conf=1
  if [ "$n_alive" = ${#pidfiles[@]} ] && [ $same_conf = 1 ] && munge_ok && ctld_up && node_ready &&
     sacctmgr -n show cluster >/dev/null 2>&1; then
    log "cluster already up and healthy (state in $BASE); nothing to do"
    sinfo -N -o "%N %T %c %G %P"
    exit 0
  fi
  if [ $same_conf = 1 ]; then why="partly up or unhealthy"; else why="running with a different configuration"; fi
  log "cluster $why: restarting it from a clean state"
  "$HERE/cluster-down.sh"
fi
# Daemons that this script did not start (another SLURM_BASE, a distro service) hold the ports and
# would make ours fail with confusing errors: refuse instead of killing what is not ours.
# (one pgrep per name: pgrep matches nothing at all for a pattern over 15 characters)
foreign=$(for d in slurmctld slurmd slurmdbd; do pgrep -x "$d"; done || true)
[ -z "$foreign" ] || die "slurm daemons not started from $BASE are running (pids: $(echo $foreign)); stop them first"

# 4. fresh state -------------------------------------------------------------------------------------
rm -rf "$BASE"
mkdir -p "$BASE/ctld" $(for n in "${VNODES[@]}"; do echo "$BASE/d/$n"; done) "$BASE/log" "$BASE/fakegpu" /etc/slurm
for g in 0 1; do mknod "$BASE/fakegpu/gpu$g" c 1 3 2>/dev/null || touch "$BASE/fakegpu/gpu$g"; done
# Job ids that no earlier start of this cluster used. MPICH names its node's shared-memory segment
# after the job and step id; a job killed by an earlier cluster left its segment in /dev/shm, and a new
# job with the same id attaches to it and fails in MPI_Init ("Out of memory", garbled PMI requests).
# Counting from the clock (one id per second) keeps the ids of successive starts apart.
printf '%s\nFirstJobId=%s\n' "$SLURM_CONF_TEXT" "$(( $(date +%s) % 60000000 + 1 ))" >/etc/slurm/slurm.conf
printf '%s\n' "$GRES_CONF_TEXT" >/etc/slurm/gres.conf

# 5. munge (authenticates every Slurm RPC) ------------------------------------------------------------
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
fi
TRIES=50
if ! munge_ok; then
  log "starting munged"
  daemon munged runuser -u munge -- /usr/sbin/munged
  # we started it, so cluster-down.sh may stop it (a munged that was already running is left alone)
  touch "$BASE/munged.ours"
  wait_for munge_ok || die "munged not working; see $BASE/log/munged.stderr"
fi

# 6. accounting: private mariadbd + slurmdbd -------------------------------------------------------
log "starting mariadbd"
mkdir -p "$BASE/mysql" "$BASE/mysqlrun" && touch "$BASE/log/mariadb.log"
# mariadbd runs as mysql and opens its files itself, after dropping root
chown mysql:mysql "$BASE/mysql" "$BASE/mysqlrun" "$BASE/log/mariadb.log"
mariadb-install-db --user=mysql --datadir="$BASE/mysql" --auth-root-authentication-method=socket \
  --skip-test-db >"$BASE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $BASE/log/mariadb-install.log"
# mariadbd does not daemonize: `setsid -f` forks it into its own session, detached from this shell,
# its terminal and its stdio, so the script returns while mariadbd keeps running.
# A small buffer pool keeps its memory and start time down; the lock timeout keeps slurmdbd's
# first-start table creation from failing on a slow disk.
daemon mariadbd setsid -f mariadbd --user=mysql --datadir="$BASE/mysql" --socket="$DB_SOCK" --port="$DB_PORT" \
  --bind-address=127.0.0.1 --pid-file="$BASE/mysqlrun/mariadb.pid" --log-error="$BASE/log/mariadb.log" \
  --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
TRIES=300
wait_for mariadb-admin --socket="$DB_SOCK" ping || { tail -20 "$BASE/log/mariadb.log" >&2; die "mariadbd not up"; }
mariadb --socket="$DB_SOCK" -e "
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
# slurmdbd refuses a config file readable by others (it holds the DB password): write it 0600.
( umask 077; cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
)
chmod 600 /etc/slurm/slurmdbd.conf
log "starting slurmdbd"
daemon slurmdbd slurmdbd
TRIES=300
wait_for sacctmgr -n show cluster || { tail -20 "$BASE/log/slurmdbd.log" >&2; die "slurmdbd not up"; }
# slurmctld only sends accounting for a cluster the database knows
sacctmgr -n show cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null

# 7. slurmctld + slurmd (both daemonize; logs in $BASE/log) ----------------------------------------
log "starting slurmctld"
daemon slurmctld slurmctld
wait_for ctld_up || { tail -30 "$BASE/log/slurmctld.log" >&2; die "slurmctld not up"; }
for n in "${VNODES[@]}"; do
  log "starting slurmd -N $n"
  daemon "slurmd-$n" slurmd -N "$n"
done
wait_for node_ready || {
  echo "node state: $(sinfo -h -N -o '%N %T %E')" >&2
  for n in "${VNODES[@]}"; do tail -15 "$BASE/log/slurmd-$n.log" >&2; done; die "nodes not ready"
}
cp /etc/slurm/slurm.conf /etc/slurm/gres.conf "$BASE/"
log "cluster of ${#VNODES[@]} node(s) up in $(elapsed)s (state and logs in $BASE)"
sinfo -N -o "%N %T %c %G %P"
