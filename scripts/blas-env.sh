# Sourced by the scripts that run mocod. On virtual CPUs OpenBLAS may not recognise the processor and
# fall back to its SSE3 (Prescott) kernels, about 5x slower; when the environment does not choose a
# core type already, pick one from the CPU flags. A value set by the machine is left as it is.
if [ -z "${OPENBLAS_CORETYPE:-}" ]; then
  if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then export OPENBLAS_CORETYPE=SkylakeX
  elif grep -qw avx2 /proc/cpuinfo 2>/dev/null; then export OPENBLAS_CORETYPE=Haswell
  fi
fi
