#!/usr/bin/env bash
# A data-parallel mocod job in the background: what `mocod -d` is for one process.
#
#   scripts/mocod-mpi.sh LOG [MPIRUN OPTIONS]... -- [MOCOD OPTIONS]...
#   scripts/mocod-mpi.sh run/mpirun.log -np 4 -- -c config/default.json
#
# mpirun must stay the parent of its ranks, so mocod cannot detach under it (`-d` is refused there);
# instead mpirun itself goes to the background: in a session of its own (setsid: no terminal, outside
# the caller's process group, so a closed shell or a ^C does not reach it), stdin from /dev/null, its
# output and every rank's stderr appended to LOG. The script returns once rank 0 answers `status` on
# its control socket (service.socket of the same options), printing mpirun's pid: exit 0, the job is
# up. If the job ends first (a bad config, a rank that cannot start) it prints LOG's tail: exit 1.
# MOCOD (default build/bin/mocod next to this script's repository) and MOCOCTL name the binaries;
# MOCOD_MPI_START_TIMEOUT (seconds, default 600) bounds the wait for a job that neither answers nor ends.
# Stop the job with `mococtl stop` (a final checkpoint), as any mocod.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 LOG [MPIRUN OPTIONS]... -- [MOCOD OPTIONS]..." >&2; exit 2; }
log=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
mocod=${MOCOD:-$root/build/bin/mocod}
mococtl=${MOCOCTL:-$root/build/bin/mococtl}
# Split the arguments at "--": mpirun's before, mocod's after (left in "$@").
mpi=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  mpi+=("$1")
  shift
done
[ $# -gt 0 ] || { echo "$0: no -- between mpirun's options and mocod's" >&2; exit 2; }
shift
for a in "$@"; do
  case $a in -d|--daemon) echo "$0: leave -d out: this script is the background start" >&2; exit 2 ;; esac
done
# The socket rank 0 will open: the config's service.socket with the same options.
conf=$("$mocod" "$@" --print-config) || exit 2 # mocod has said why on stderr
sock=$(printf '%s\n' "$conf" | sed -n 's/^ *"socket": "\(.*\)",\{0,1\}$/\1/p' | head -n 1)
[ -n "$sock" ] || { echo "$0: the config has no service.socket" >&2; exit 2; }
mkdir -p "$(dirname "$log")"
# A subshell that execs setsid, which (not a process group leader) execs mpirun: $! is mpirun's pid.
(exec setsid mpirun "${mpi[@]}" "$mocod" "$@") </dev/null >>"$log" 2>&1 &
pid=$!
limit=$(( ${MOCOD_MPI_START_TIMEOUT:-600} * 5 ))
i=0
while :; do
  if "$mococtl" -s "$sock" status >/dev/null 2>&1; then
    echo "$pid"
    exit 0
  fi
  # mpirun is this shell's child until the script ends: once it exits it is a zombie, not gone.
  state=$(ps -o stat= -p "$pid" 2>/dev/null || true)
  if [ -z "$state" ] || [ "${state#Z}" != "$state" ]; then
    echo "$0: the job ended before it answered on $sock; the end of $log:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  i=$((i + 1))
  [ $i -lt $limit ] || { echo "$0: no answer on $sock after ${MOCOD_MPI_START_TIMEOUT:-600} s; mpirun (pid $pid) left running" >&2; exit 1; }
  sleep 0.2
done
