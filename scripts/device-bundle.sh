#!/usr/bin/env bash
# Packs what a bare many-core machine without a package registry needs to run this checkout's prebuilt
# binaries under mpirun (scripts/device-mpi.sh, device-bench.sh, experiments.py), into devcarry/ (ignored):
#   devcarry/bundle.tar.xz  the binaries' shared libraries under /devlib; Open MPI's tree at its own paths;
#                           common system libraries under /devlib-extra, copied into /devlib there only when
#                           that machine lacks them (a newer system copy must win)
#   devcarry/fmnist/        the Fashion-MNIST files
# There: tar -xJf devcarry/bundle.tar.xz -C / ; then for each /devlib-extra library that `ldconfig -p` lacks,
# copy it into /devlib; export LD_LIBRARY_PATH=/devlib. Build first: make MARCH=-march=x86-64-v3 all ...
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
mkdir -p devcarry "$stage/devlib" "$stage/devlib-extra"
ompi=/usr/lib/x86_64-linux-gnu/openmpi
for f in build/bin/* /usr/bin/orterun /usr/bin/orted $ompi/lib/openmpi3/*.so; do ldd "$f" 2>/dev/null || true; done |
  awk '/=> \//{print $3}' | sort -u | grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux-x86-64|libresolv)\.so' |
  while read -r lib; do cp -L "$lib" "$stage/devlib/"; done
cp -L /usr/lib/x86_64-linux-gnu/libmpi.so.40 "$stage/devlib/"
for l in libgcc_s libz libudev libffi libidn2 libp11-kit libtasn1 libgnutls libunistring libnettle libhogweed libgmp libuuid; do
  mv "$stage"/devlib/$l.so* "$stage/devlib-extra/" 2>/dev/null || true
done
tar -C / -cf "$stage/b.tar" usr/lib/x86_64-linux-gnu/openmpi usr/share/openmpi etc/openmpi \
  usr/bin/orterun usr/bin/orted usr/bin/ompi_info usr/bin/mpirun usr/bin/mpiexec
tar -C "$stage" -rf "$stage/b.tar" devlib devlib-extra
xz -T2 -6 -c "$stage/b.tar" > devcarry/bundle.tar.xz
mkdir -p devcarry/fmnist && cp /usr/share/datasets/fashion-mnist/*.gz devcarry/fmnist/
du -sh devcarry/*
