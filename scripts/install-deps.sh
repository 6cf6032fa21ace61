#!/usr/bin/env bash
# Installs what mocod needs to build, test and train on its default data set.
# Idempotent: when every package is already present it does nothing.
set -euo pipefail

PACKAGES=(build-essential pkg-config libuv1-dev libopenblas-dev libjansson-dev check
          zlib1g-dev libmicrohttpd-dev dataset-fashion-mnist openmpi-bin libopenmpi-dev python3
          libpng-dev libjpeg62-turbo-dev procps)
# The fuzzers (make fuzz), only with MOCOD_FUZZ=1 (CI): clang and its libFuzzer runtime.
if [ "${MOCOD_FUZZ:-0}" = 1 ]; then
  PACKAGES+=(clang libfuzzer-14-dev)
fi
# Optional extras, only with MOCOD_EXTRAS=1: plotting and the PyTorch reference.
if [ "${MOCOD_EXTRAS:-0}" = 1 ]; then
  PACKAGES+=(gnuplot-nox python3-torch python3-numpy)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run as root (or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
