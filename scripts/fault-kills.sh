#!/usr/bin/env bash
# The full SIGKILL fault run of issue 18: 50 kills at random moments (half within milliseconds of a
# `checkpoint` command), each followed by a restart with --resume that must start from the newest
# complete checkpoint, with the progress log valid JSON lines throughout. `make test` runs 10 of them.
#   scripts/fault-kills.sh [KILLS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
make -s all build/bin/mocod-tests
export MOCOD_FAULT_KILLS="${1:-50}"
[ -n "${2:-}" ] && export MOCOD_FAULT_SEED="$2"
# Only the kill test; check's per-test timeout scaled for the longer run.
CK_RUN_SUITE=faults CK_RUN_CASE=kills CK_TIMEOUT_MULTIPLIER=10 MOCOD_BIN=build/bin MOCOD_BUILD=build build/bin/mocod-tests
