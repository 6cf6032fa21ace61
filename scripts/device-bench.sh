#!/bin/bash
# Many-core speed of the default step (issue 15), for a machine with more cores than the 2-core
# development one and no package registry: it runs only prebuilt binaries, in about 3 minutes.
#
# Prepare (on the development machine, from the repository root):
#   make MARCH=-march=x86-64-v3 build/bin/bench_speed build/bin/mocod   # the new step; mocod is what
#                                                     # scripts/torch_reference.py reads the config with
#   scripts/device-bench.sh --prepare-old c7b7070     # the old step (main before issue 15) -> build-old/
#                                                     # (MARCH=-march=native for a run on this machine)
#   scripts/device-bench.sh --prepare-libs            # the shared libraries (ldd) -> devlibs/
# then carry build/bin/bench_speed, build/bin/mocod, build-old and devlibs (about 53 MB) with the
# worktree and run
#   scripts/device-bench.sh [THREADS]                 # THREADS: default 1,2,4,8,16 (up to the CPUs)
#
# Prints, per thread count: bench_speed of the old and the new step alternated (ROUNDS rounds, each
# count the median of 5 repetitions; MOCOD_BENCH_SECONDS per count, default 1.5), the new step's
# phase split and per-layer times, then one run of the new step against PyTorch at 1, 2 and the
# largest count where /usr/bin/python3 imports torch. The summary lines to read are "old/new".
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare-old" ]; then
  # main at the given commit with only the benchmark's own code of this tree (tests/bench/bench_speed.c
  # and the per-layer timer in net.c/net.h that it reads), built the same way.
  rev=${2:?usage: --prepare-old COMMIT}
  src=$(mktemp -d)
  git archive "$rev" | tar -x -C "$src" || exit 1
  cp tests/bench/bench_speed.c "$src/tests/bench/"
  # The timer hook: the same lines as this tree's net.c/net.h, applied to old sources that lack it
  # (main before c7b7070's successors; later commits have it).
  grep -q 'double \*prof' "$src/include/core/net.h" || python3 - "$src" <<'EOF' || exit 1
import sys, re
src = sys.argv[1]
h = open(src + "/include/core/net.h").read()
h = h.replace("  uint64_t arch_hash;", "  double *prof;\n  uint64_t arch_hash;", 1)
h = h.replace("size_t net_num_params(const net *n);",
              "size_t net_num_params(const net *n);\nconst char *net_kind_name(layer_kind k);", 1)
open(src + "/include/core/net.h", "w").write(h)
c = open(src + "/src/core/net.c").read()
c = c.replace('#include "core/err.h"', '#include "core/clock.h"\n#include "core/err.h"', 1)
c = c.replace("    layer_forward(n, &n->layers[i], h, B);",
              "    double t0 = n->prof ? clock_now() : 0.0;\n    layer_forward(n, &n->layers[i], h, B);\n"
              "    if (n->prof) n->prof[2 * i] += clock_now() - t0;", 1)
c = c.replace("    layer_backward(n, &n->layers[i], din, dy, x, B);",
              "    double t0 = n->prof ? clock_now() : 0.0;\n    layer_backward(n, &n->layers[i], din, dy, x, B);\n"
              "    if (n->prof) n->prof[2 * i + 1] += clock_now() - t0;", 1)
c += '\nconst char *net_kind_name(layer_kind k) { return kind_name((uint32_t)k); }\n'
open(src + "/src/core/net.c", "w").write(c)
EOF
  # MARCH as the new build's (make's default is -march=native; a binary for another machine: x86-64-v3)
  march=${MARCH:--march=x86-64-v3}
  make -C "$src" -j"$(nproc)" MARCH="$march" build/bin/bench_speed >/dev/null || exit 1
  mkdir -p build-old && cp "$src/build/bin/bench_speed" build-old/ && rm -rf "$src"
  echo "build-old/bench_speed: main at $rev, built with $march"
  exit 0
fi

if [ "${1:-}" = "--prepare-libs" ]; then
  # Every shared library of the binaries except the C library and the loader, which any Linux has.
  mkdir -p devlibs
  ldd build/bin/bench_speed build/bin/mocod build-old/bench_speed 2>/dev/null | awk '/=> \//{print $3}' |
    sort -u | grep -Ev '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" devlibs/ && echo "devlibs/$(basename "$lib")"; done
  du -sh devlibs
  exit 0
fi

[ -d devlibs ] && export LD_LIBRARY_PATH="$PWD/devlibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
. scripts/blas-env.sh
export MOCOD_BIN="$PWD/build/bin" MOCOD_BENCH_SECONDS="${MOCOD_BENCH_SECONDS:-1.5}"
NEW=build/bin/bench_speed OLD=build-old/bench_speed ROUNDS=${ROUNDS:-3}
cpus=$(nproc)
list=${1:-$(for t in 1 2 4 8 16; do [ "$t" -le "$cpus" ] && printf '%s,' "$t"; done | sed 's/,$//')}
top=${list##*,}
for b in "$NEW" "$OLD"; do
  if [ ! -x "$b" ] || ldd "$b" | grep -q 'not found'; then
    echo "$b: missing or lacks libraries (copy them into devlibs/, see --prepare-libs):"; ldd "$b"; exit 1
  fi
done

# The default job, with the training images this repository carries (the shape is all the step needs;
# /usr/share/datasets may not exist there).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/job.json" <<EOF
{"extends": "$PWD/config/default.json",
 "data": {"dir": "$PWD/data", "train": "fmnist-train-images-idx3-ubyte.gz",
          "eval": "fmnist-t10k-images-idx3-ubyte.gz"}}
EOF
echo "machine: $cpus CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), load $(cut -d' ' -f1 /proc/loadavg)"
echo "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-auto}, threads $list, $ROUNDS rounds, ${MOCOD_BENCH_SECONDS}s per count"
start=$(date +%s)
for r in $(seq "$ROUNDS"); do
  # The order alternates too, so a load that rises or falls through a round favours neither side.
  order="old new"; [ $((r % 2)) = 0 ] && order="new old"
  for side in $order; do
    bin=$OLD; [ "$side" = new ] && bin=$NEW
    timeout 120 "$bin" --threads "$list" --no-torch --no-rss "$tmp/job.json" > "$tmp/$side.$r" 2>&1 ||
      { echo "$side round $r failed:"; tail -5 "$tmp/$side.$r"; }
  done
done
# KEEP=DIR keeps every round's output there.
[ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$tmp"/old.* "$tmp"/new.* "$KEEP"/
# One line per thread count: medians over the rounds of ms/step and share of sgemm, old and new, the
# ratio of the medians, and the median of the rounds' own ratios (each round's pair ran minutes apart at
# most, so on a shared machine this is the figure to read).
echo "== old (main) and new step, medians of $ROUNDS alternated rounds"
printf '%8s %10s %8s %10s %8s %9s %9s\n' threads "old ms" "old/sg" "new ms" "new/sg" "old/new" "paired"
for t in ${list//,/ }; do
  for side in old new; do
    grep -h "^ *$t threads " "$tmp"/$side.* | awk '{print $3, $5}' | sort -n |
      awk '{a[NR]=$1; b[NR]=$2} END {m=int((NR+1)/2); print a[m], b[m]}' > "$tmp/med.$side"
  done
  pr=$(for r in $(seq "$ROUNDS"); do
         o=$(grep -h "^ *$t threads " "$tmp/old.$r" | awk '{print $3}')
         n=$(grep -h "^ *$t threads " "$tmp/new.$r" | awk '{print $3}')
         [ -n "$o" ] && [ -n "$n" ] && awk -v o="$o" -v n="$n" 'BEGIN {print o / n}'
       done | sort -n | awk '{a[NR]=$1} END {print NR ? a[int((NR+1)/2)] : 0}')
  read -r om os < "$tmp/med.old"; read -r nm ns < "$tmp/med.new"
  awk -v t="$t" -v om="$om" -v os="$os" -v nm="$nm" -v ns="$ns" -v pr="$pr" \
    'BEGIN {printf "%8d %10.1f %8.2f %10.1f %8.2f %8.2fx %8.2fx\n", t, om, os, nm, ns, (nm > 0 ? om / nm : 0), pr}'
done
echo "== new step, last round: phases and per-layer split"
grep -E "^-- [0-9]+ thread|phases" "$tmp/new.$ROUNDS"
sed -n '/^per layer/,$p' "$tmp/new.$ROUNDS"
echo "== old step, last round: phases and per-layer split"
grep -E "^-- [0-9]+ thread|phases" "$tmp/old.$ROUNDS"
sed -n '/^per layer/,$p' "$tmp/old.$ROUNDS"
tl=1; [ "$top" -ge 2 ] && tl=1,2; [ "$top" -gt 2 ] && tl=1,2,$top
echo "== new step against PyTorch ($tl threads)"
timeout 150 "$NEW" --threads "$tl" --no-rss "$tmp/job.json" 2>&1 | sed -n '/^-- 1 thread/,/^per layer/p' | grep -v '^per layer'
echo "device-bench: $(( $(date +%s) - start )) s"
