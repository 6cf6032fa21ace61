#!/usr/bin/env python3
"""Writes a small synthetic RGB image folder of PNG files, standard library only (zlib, struct).

    scripts/make-image-folder.py --classes 4 --per-class 64 data/shapes/train   # DIR/<class>/NNNN.png
    scripts/make-image-folder.py --flat 16 --seed 9 data/shapes/new             # DIR/NNNN.png, no classes
    scripts/make-image-folder.py --flat 16 --size 32 --npy data/shapes/new.npy  # one uint8 (N, 3, 32, 32) .npy

Each image is a coloured shape on a textured background: class k has its own shape (disc, square,
horizontal or vertical bar, ring, cross) and a hue near its own, with random position, size, colour
jitter, background and noise, so classes differ by colour and form and a contrastive encoder has
something to learn. For trying mocopack images / mocod on colour data without downloading any.
"""
import argparse
import colorsys
import os
import random
import struct
import zlib

SHAPES = ["disc", "square", "hbar", "vbar", "ring", "cross"]


def png_bytes(w, h, rows):
    """An 8-bit RGB PNG of `rows` (h lists of w (r, g, b) tuples)."""
    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in rows)

    def chunk(tag, data):
        c = struct.pack(">I", len(data)) + tag + data
        return c + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def inside(shape, dx, dy, r):
    d2 = dx * dx + dy * dy
    if shape == "disc":
        return d2 <= r * r
    if shape == "square":
        return abs(dx) <= r * 0.8 and abs(dy) <= r * 0.8
    if shape == "hbar":
        return abs(dx) <= r and abs(dy) <= r * 0.35
    if shape == "vbar":
        return abs(dy) <= r and abs(dx) <= r * 0.35
    if shape == "ring":
        return (r * 0.55) ** 2 <= d2 <= r * r
    return (abs(dx) <= r * 0.3 and abs(dy) <= r) or (abs(dy) <= r * 0.3 and abs(dx) <= r)


def image(rng, k, classes, size):
    hue = (k / max(classes, 1) + rng.uniform(-0.04, 0.04)) % 1.0
    fg = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    bg = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.1, 0.5))
    shape = SHAPES[k % len(SHAPES)]
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    stripe = rng.uniform(3, 9)
    rows = []
    for y in range(size):
        row = []
        for x in range(size):
            base = fg if inside(shape, x - cx, y - cy, r) else tuple(
                c * (0.8 + 0.2 * ((x + y) // stripe % 2)) for c in bg)
            row.append(tuple(max(0, min(255, int(255 * c + rng.gauss(0, 6)))) for c in base))
        rows.append(row)
    return rows


def npy_bytes(images, size):
    """A NumPy 1.0 file of uint8 shape (N, 3, size, size), C order: what mocod and numpy read."""
    head = "{'descr': '|u1', 'fortran_order': False, 'shape': (%d, 3, %d, %d), }" % (len(images), size, size)
    head += " " * (63 - (10 + len(head)) % 64) + "\n"
    planes = b"".join(bytes(px[c] for row in rows for px in row) for rows in images for c in range(3))
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head.encode() + planes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--classes", type=int, default=4, help="classes, one subfolder each (at most 6 shapes)")
    ap.add_argument("--per-class", type=int, default=32, help="images per class")
    ap.add_argument("--flat", type=int, default=0, metavar="N", help="N images straight in DIR, no classes")
    ap.add_argument("--size", type=int, default=40, help="side of the square images, pixels")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--npy", action="store_true", help="with --flat: DIR is one .npy file of all the images")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    if a.npy:
        images = [image(rng, rng.randrange(a.classes), a.classes, a.size) for _ in range(a.flat)]
        os.makedirs(os.path.dirname(a.dir) or ".", exist_ok=True)
        with open(a.dir, "wb") as f:
            f.write(npy_bytes(images, a.size))
        print(f"{a.dir}: {a.flat} images, uint8 ({a.flat}, 3, {a.size}, {a.size})")
        return
    os.makedirs(a.dir, exist_ok=True)
    if a.flat:
        for i in range(a.flat):
            with open(os.path.join(a.dir, f"{i:04d}.png"), "wb") as f:
                f.write(png_bytes(a.size, a.size, image(rng, rng.randrange(a.classes), a.classes, a.size)))
        print(f"{a.dir}: {a.flat} images, {a.size}x{a.size}")
        return
    for k in range(a.classes):
        sub = os.path.join(a.dir, f"{k}-{SHAPES[k % len(SHAPES)]}")
        os.makedirs(sub, exist_ok=True)
        for i in range(a.per_class):
            with open(os.path.join(sub, f"{i:04d}.png"), "wb") as f:
                f.write(png_bytes(a.size, a.size, image(rng, k, a.classes, a.size)))
    print(f"{a.dir}: {a.classes} classes x {a.per_class} images, {a.size}x{a.size}")


if __name__ == "__main__":
    main()
