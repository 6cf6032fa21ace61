#!/usr/bin/env python3
"""Writes the small Fashion-MNIST sample the tests use (data/fmnist-*.gz): the first 2,000 training and
1,000 test images and labels of Debian's dataset-fashion-mnist, as gzip IDX files with the record count
in the header cut to match. Deterministic (gzip mtime 0), so rerunning it changes nothing.

    scripts/make-sample-data.py [SOURCE_DIR] [OUT_DIR]
"""
import gzip
import os
import struct
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
OUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "data")
SPLITS = {"train": 2000, "t10k": 1000}


def cut(src, dst, n):
    with gzip.open(src, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = list(struct.unpack(">%dI" % ndim, data[4:4 + 4 * ndim]))
    if dims[0] < n:
        sys.exit("%s: only %d records, %d wanted" % (src, dims[0], n))
    per = 1
    for d in dims[1:]:
        per *= d  # both files here are u8, one byte per element
    body = data[4 + 4 * ndim:4 + 4 * ndim + n * per]
    dims[0] = n
    with open(dst, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as g:
        g.write(data[:4] + struct.pack(">%dI" % ndim, *dims) + body)


os.makedirs(OUT, exist_ok=True)
for split, n in SPLITS.items():
    for kind in ("images-idx3", "labels-idx1"):
        name = "%s-%s-ubyte.gz" % (split, kind)
        cut(os.path.join(SRC, name), os.path.join(OUT, "fmnist-" + name), n)
        print("wrote", os.path.join(OUT, "fmnist-" + name))
