#!/usr/bin/env bash
# Start a throwaway two-node SLURM cluster (slurmctld + slurmd "n1" and "n2") on this machine.
#
#   bash tests/slurm/start.sh SCRATCH     # then: export SLURM_CONF=SCRATCH/slurm.conf
#   bash tests/slurm/stop.sh SCRATCH
#
# Everything (config, state, spool, logs, pid files) lives under SCRATCH, which must be fresh
# or empty. Ports: CTLD_PORT, N1_PORT, N2_PORT from the environment, else free ones are picked.
# Needs Debian's slurm-wlm (slurmctld, slurmd, sinfo); runs as root on CI.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRATCH=${1:?usage: start.sh SCRATCH}
mkdir -p "$SCRATCH"
SCRATCH=$(cd "$SCRATCH" && pwd)
export PATH=$PATH:/usr/sbin:/sbin  # Debian installs the daemons there
for tool in slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null || { echo "start.sh: $tool not found (apt-get install slurm-wlm)" >&2; exit 2; }
done
if [ -e "$SCRATCH/slurm.conf" ]; then
  echo "start.sh: $SCRATCH already holds a cluster; stop it and use a fresh folder" >&2
  exit 2
fi

free_ports() {  # N distinct TCP ports that were free a moment ago
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
read -r p1 p2 p3 < <(free_ports 3)
CTLD_PORT=${CTLD_PORT:-$p1} N1_PORT=${N1_PORT:-$p2} N2_PORT=${N2_PORT:-$p3}
FIRST_JOB_ID=$(( (RANDOM * 32768 + RANDOM) % 1000000 + 1000 ))

mkdir -p "$SCRATCH"/{state,spool,log}
sed -e "s|@SCRATCH@|$SCRATCH|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
    -e "s|@N1_PORT@|$N1_PORT|g" -e "s|@N2_PORT@|$N2_PORT|g" -e "s|@FIRST_JOB_ID@|$FIRST_JOB_ID|g" \
    "$HERE/slurm.conf.in" > "$SCRATCH/slurm.conf"
export SLURM_CONF=$SCRATCH/slurm.conf

# -D: stay in the foreground (we keep the pid), -i: ignore any saved state.
setsid slurmctld -D -i >"$SCRATCH/log/slurmctld.out" 2>&1 < /dev/null &
echo $! > "$SCRATCH/slurmctld.launch.pid"
for node in n1 n2; do
  setsid slurmd -D -N "$node" >"$SCRATCH/log/slurmd.$node.out" 2>&1 < /dev/null &
  echo $! > "$SCRATCH/slurmd.$node.launch.pid"
done

deadline=$((SECONDS + ${START_TIMEOUT:-30}))
until [ "$(sinfo -h -o '%T' 2>/dev/null | sort -u | tr -d '\n')" = "idle" ]; do
  if [ $SECONDS -ge $deadline ]; then
    echo "start.sh: nodes not idle after ${START_TIMEOUT:-30} s (sinfo: $(sinfo -h -o '%N %T' 2>&1 | tr '\n' ' '))" >&2
    tail -n 20 "$SCRATCH"/log/*.log "$SCRATCH"/log/*.out >&2 || true
    exit 1
  fi
  sleep 0.2
done
echo "SLURM_CONF=$SLURM_CONF"
