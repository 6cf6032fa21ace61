#!/usr/bin/env bash
# Data-parallel scaling figures on a many-core machine (docs/scale.md): bench_dist at N = 1, 2, 4, 8, 16
# ranks of one compute thread each, the default job's step. Under 3 minutes on 16 cores.
#
# Needs, from the repository root: build/bin/bench_dist (`make build/bin/bench_dist`), config/default.json
# (tracked), and where Open MPI is not installed (no mpirun, no libmpi.so.40) the runtime bundle built by
# scripts/device-bundle.sh: devcarry/bundle.tar.xz (Open MPI's tree at its own paths, the shared libraries
# under /devlib). Prints one line per N; judges nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# The same OpenBLAS kernel choice as device-bench.sh, so ranks and threads are compared on one kernel.
. scripts/blas-env.sh
echo "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-auto}"
if ! command -v mpirun >/dev/null 2>&1 || ! ldd build/bin/bench_dist | grep -q 'libmpi.so.40 => /'; then
  if [ ! -f devcarry/bundle.tar.xz ]; then
    echo "device-mpi: no Open MPI here and no devcarry/bundle.tar.xz: carry it (built by scripts/device-bundle.sh)" >&2
    exit 1
  fi
  tar -xJf devcarry/bundle.tar.xz -C /
  for f in /devlib-extra/*; do ldconfig -p | grep -q "$(basename "$f")" || cp "$f" /devlib/; done
  export LD_LIBRARY_PATH=/devlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PATH=/usr/bin:$PATH
fi
nproc
MOCOD_DIST_NP="${MOCOD_DIST_NP:-1 2 4 8 16}" timeout 170 build/bin/bench_dist config/default.json
