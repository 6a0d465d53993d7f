#!/usr/bin/env bash
# Stop the cluster that start.sh started in SCRATCH, in the order that leaves nothing behind:
# cancel every job, wait until the queue is empty, stop the daemons by their pids, and finally
# SIGKILL any process still carrying this cluster's SLURM_CONF in its environment (job
# processes or a slurmstepd left by a daemon that died under a running job); those are listed
# on stdout as "stray PID COMMAND", so a caller can tell a clean stop from a rescued one.
#
#   bash tests/slurm/stop.sh SCRATCH
#
# Safe to call twice, or on a half-started cluster. Do not run it with SLURM_CONF exported to
# this very cluster in your own shell's environment: the stray scan would count that shell.
set -uo pipefail
SCRATCH=${1:?usage: stop.sh SCRATCH}
SCRATCH=$(cd "$SCRATCH" 2>/dev/null && pwd) || { echo "stop.sh: no folder $1" >&2; exit 0; }
CONF=$SCRATCH/slurm.conf
MARKER="SLURM_CONF=$CONF"
[ -e "$CONF" ] || exit 0

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { cat "$SCRATCH/$1.launch.pid" 2>/dev/null; }

ctld=$(pid_of slurmctld)
if alive "$ctld"; then
  jobs=$(SLURM_CONF=$CONF squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    # shellcheck disable=SC2086
    SLURM_CONF=$CONF scancel $jobs 2>/dev/null
    deadline=$((SECONDS + ${STOP_TIMEOUT:-30}))
    while [ -n "$(SLURM_CONF=$CONF squeue -h -o '%A' 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do
      sleep 0.2
    done
  fi
fi

stop_pids() {  # TERM all, wait up to 10 s, then KILL what is left
  local pid left
  for pid in "$@"; do alive "$pid" && kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 50); do
    left=""
    for pid in "$@"; do alive "$pid" && left="$left $pid"; done
    [ -z "$left" ] && return 0
    sleep 0.2
  done
  for pid in $left; do kill -KILL "$pid" 2>/dev/null; done
}
# The node daemons first: slurmctld must outlive them to take their last messages.
stop_pids "$(pid_of slurmd.n1)" "$(pid_of slurmd.n2)"
stop_pids "$(pid_of slurmctld)"

# Anything still running with this cluster's configuration in its environment.
for env_file in /proc/[0-9]*/environ; do
  pid=${env_file#/proc/}; pid=${pid%/environ}
  [ "$pid" = "$$" ] && continue
  if { tr '\0' '\n' < "$env_file"; } 2>/dev/null | grep -qxF "$MARKER"; then
    echo "stray $pid $({ tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null)"
    kill -KILL "$pid" 2>/dev/null
  fi
done
exit 0
