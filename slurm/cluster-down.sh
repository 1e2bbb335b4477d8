#!/usr/bin/env bash
# Stop the SLURM cluster started by cluster-up.sh (every virtual node's slurmd).
# Kills only the daemons listed in its pid files under $SLURM_BASE (and munged only if cluster-up.sh
# started it), plus step daemons left over from this cluster's jobs. Safe to call when nothing runs.
# State and logs stay in $SLURM_BASE for post-mortems; the next cluster-up.sh wipes them.
# Env: SLURM_BASE (default /tmp/hpc-mto-slurm)
#      SLURM_WIPE=1   also delete $SLURM_BASE afterwards
# No `set -e`: a failed step must not stop the others from being shut down.
set -uo pipefail
BASE=${SLURM_BASE:-/tmp/hpc-mto-slurm}
log() { echo "[cluster-down $(date +%T.%3N)] $*"; }
t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || { echo "[cluster-down] ERROR: run as root" >&2; exit 1; }

# TERM the pid of each pid file given, wait for all of them (up to 15 s), then KILL what is left.
# Several at once, because each daemon takes a second or more to shut down.
stop() {  # name=pidfile ...
  local arg name pf pid pids=() names=() i
  for arg in "$@"; do
    name=${arg%%=*} pf=${arg#*=}
    [ -s "$pf" ] || continue
    pid=$(cat "$pf")
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping $name (pid $pid)"; kill -TERM "$pid"; pids+=("$pid"); names+=("$name")
    else
      log "$name: pid $pid not running"
    fi
    rm -f "$pf"
  done
  for ((i = 0; i < 150; i++)); do
    local left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ $left = 0 ] && return 0
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null && { log "${names[$i]} still alive after 15 s: SIGKILL"; kill -KILL "${pids[$i]}"; }
  done
  return 0
}

# Cancel every job first, while slurmctld and slurmd still run: slurmd then kills each job's
# processes (proctrack/linuxproc) and the jobs end up CANCELLED in the accounting database.
if alive "$BASE/slurmctld.pid"; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    echo "$jobs" | xargs -r scancel --quiet 2>/dev/null || true
    # TERM, then KILL after KillWait=5 s: give it a little more than that
    for ((i = 0; i < 80; i++)); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi

# every slurmd-<node>.pid (one per virtual node), and slurmd.pid of clusters started by older versions
slurmds=()
for pf in "$BASE"/slurmd-*.pid "$BASE/slurmd.pid"; do [ -e "$pf" ] && { n=${pf##*/}; slurmds+=("${n%.pid}=$pf"); }; done
stop "${slurmds[@]}" slurmctld="$BASE/slurmctld.pid"
# A slurmstepd outlives slurmd; one still here belongs to a job step of this cluster that did not end
# in time, and it would keep that step's processes (and e.g. MPI ports, GPU memory) alive.
# Kill it together with all its descendants (the job's processes), which would otherwise be orphaned.
descendants() {  # pid... -> those pids and all their descendants
  ps -e -o pid=,ppid= | awk -v roots="$*" '
    { parent[$1] = $2 }
    END { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1
          do { grew = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 } } while (grew)
          for (p in keep) print p }'
}
steps=$(pgrep -x slurmstepd || true)
if [ -n "$steps" ]; then
  victims=$(descendants $steps)
  log "killing leftover slurmstepd and their job processes: $(echo $victims)"
  kill -KILL $victims 2>/dev/null || true
fi
# slurmctld flushes pending accounting records to slurmdbd (authenticated by munge) while it shuts
# down, so these go after it. Among themselves order does not matter (the next cluster-up.sh starts
# from an empty database), and stopping them together saves ~4 s.
last=(slurmdbd="$BASE/slurmdbd.pid" mariadbd="$BASE/mysqlrun/mariadb.pid")
[ -e "$BASE/munged.ours" ] && last+=(munged=/run/munge/munged.pid)
stop "${last[@]}"
rm -f "$BASE/munged.ours"
if [ "${SLURM_WIPE:-0}" = 1 ]; then log "wiping $BASE"; rm -rf "$BASE"; fi
log "done in $(elapsed)s"
