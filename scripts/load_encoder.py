#!/usr/bin/env python3
"""Load an encoder mocod exported as safetensors (`mocod --export-model`, `mococtl export-model`) into PyTorch.

    import sys; sys.path.insert(0, "scripts")
    from load_encoder import load_encoder
    model, meta = load_encoder("encoder.safetensors")        # an nn.Module in eval mode
    x = model.preprocess(images_uint8)                       # [B, C, H, W] (or [B, D]): /255, mean, std
    z = model(x)                                             # [B, embed_dim], L2-normalised embeddings
    f = model(x, features=True)                              # [B, feature_dim], backbone features

Command line:
    load_encoder.py MODEL.safetensors --check-layout         # standard library only: header, dtypes,
                                                             # shapes, offsets, metadata; no torch needed
    load_encoder.py MODEL.safetensors                        # build the module, print it
    load_encoder.py MODEL.safetensors --embed IN.npy OUT.npy [--features]

The file layout (include/train/encoder.h): u64 little-endian header length, a JSON header naming each
tensor `layers.<i>.<weight|bias|running_mean|running_var>` (dtype F32, shape, data_offsets) and a
`__metadata__` of strings, among them `layers`, the resolved layer list (type, hyperparameters,
in_shape / out_shape) the module is rebuilt from, `mean` / `std` / `input` for the preprocessing and
`backbone_layers` for where the features are taken. The reader here needs nothing beyond the standard
library and torch (no `safetensors` package).
"""
import argparse
import json
import os
import struct
import sys

FORMAT = "mocod-encoder"


class LayoutError(Exception):
    pass


def read_header(path):
    """(header dict, byte offset of the data, file size), checking the framing."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LayoutError(f"{path}: {size} bytes, too short for the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise LayoutError(f"{path}: header length {n} beyond the file's {size} bytes")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"{path}: offset 8: the header is not JSON: {e}")
    if not isinstance(header, dict):
        raise LayoutError(f"{path}: offset 8: the header is not a JSON object")
    return header, 8 + n, size


def expected_tensors(layers):
    """{name: shape} of every parameter and BatchNorm buffer the layer list implies."""
    want = {}
    for i, L in enumerate(layers):
        c = L["in_shape"][0]
        if L["type"] == "linear":
            want[f"layers.{i}.weight"] = [L["out"], c]
        elif L["type"] == "conv2d":
            want[f"layers.{i}.weight"] = [L["out"], c, L["kernel"], L["kernel"]]
        elif L["type"] == "batchnorm":
            for k in ("weight", "bias", "running_mean", "running_var"):
                want[f"layers.{i}.{k}"] = [c]
        if L["type"] in ("linear", "conv2d") and L["bias"]:
            want[f"layers.{i}.bias"] = [L["out"]]
    return want


def check_layout(path):
    """Every check a reader relies on, standard library only; returns (metadata, tensor entries)."""
    header, data_off, size = read_header(path)
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise LayoutError(f"{path}: __metadata__ missing or not a map of strings")
    if meta.get("format") != FORMAT or meta.get("format_version") != "1":
        raise LayoutError(f"{path}: __metadata__ format {meta.get('format')!r} version "
                          f"{meta.get('format_version')!r}, expected {FORMAT!r} '1'")
    layers = json.loads(meta["layers"])
    shape = json.loads(meta["input_shape"])
    if not layers or layers[0]["in_shape"] != shape:
        raise LayoutError(f"{path}: metadata layers do not start at input_shape {shape}")
    for a, b in zip(layers, layers[1:]):
        if a["out_shape"] != b["in_shape"]:
            raise LayoutError(f"{path}: metadata layers: {a['type']} gives {a['out_shape']}, "
                              f"{b['type']} takes {b['in_shape']}")
    nb = int(meta["backbone_layers"])
    if not 1 <= nb <= len(layers):
        raise LayoutError(f"{path}: backbone_layers {nb} outside 1..{len(layers)}")
    mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    if len(mean) != len(std) or len(mean) not in (0, shape[0]) or any(s <= 0 for s in std):
        raise LayoutError(f"{path}: mean/std: {len(mean)}/{len(std)} values for {shape[0]} channels")
    want = expected_tensors(layers)
    if set(want) != set(header):
        raise LayoutError(f"{path}: tensors {sorted(set(header) ^ set(want))} differ from what the layers imply")
    at = 0
    for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = t["data_offsets"]
        count = 1
        for d in t["shape"]:
            count *= d
        if t["dtype"] != "F32":
            raise LayoutError(f"{path}: {name}: dtype {t['dtype']}, expected F32")
        if t["shape"] != want[name]:
            raise LayoutError(f"{path}: {name}: shape {t['shape']}, the layers imply {want[name]}")
        if begin != at or end - begin != 4 * count:
            raise LayoutError(f"{path}: {name}: data_offsets [{begin}, {end}] for {count} floats after "
                              f"byte {at} (tensors must follow each other without gaps)")
        at = end
    if data_off + at != size:
        raise LayoutError(f"{path}: the tensors end at byte {data_off + at}, the file at {size}")
    if data_off % 8:
        raise LayoutError(f"{path}: data starts at byte {data_off}, not 8-byte aligned")
    return meta, header


def build_module(meta):
    """The nn.Module the metadata describes, with uninitialised weights."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class L2Norm(nn.Module):
        def forward(self, x):
            return F.normalize(x, dim=1, eps=1e-12)

    def make(L):
        t, c, hw = L["type"], L["in_shape"][0], L["in_shape"][1] * L["in_shape"][2]
        if t == "linear":
            return nn.Linear(c, L["out"], bias=L["bias"])
        if t == "conv2d":
            return nn.Conv2d(c, L["out"], L["kernel"], L["stride"], L["pad"], bias=L["bias"])
        if t == "batchnorm":
            return (nn.BatchNorm2d if hw > 1 else nn.BatchNorm1d)(c, eps=L["eps"])
        if t == "relu":
            return nn.ReLU()
        if t == "maxpool":
            return nn.MaxPool2d(L["kernel"], L["stride"], L["pad"])
        if t == "avgpool":
            return nn.AdaptiveAvgPool2d(1)
        if t == "flatten":
            return nn.Flatten()
        if t == "l2norm":
            return L2Norm()
        raise ValueError(f"unknown layer type {t!r}")

    class Encoder(nn.Module):
        """mocod's encoder: layers[0 .. backbone_layers) give the features, the rest the embedding.
        A vector is (D, 1, 1) to mocod; here layers that take vectors see [B, D]."""

        def __init__(self, meta):
            super().__init__()
            self.meta = meta
            specs = json.loads(meta["layers"])
            self.layers = nn.Sequential(*[make(L) for L in specs])
            self.vector_in = [L["in_shape"][1] * L["in_shape"][2] == 1 for L in specs]
            self.backbone_layers = int(meta["backbone_layers"])
            mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
            shape = json.loads(meta["input_shape"])
            self.input_shape = tuple(shape)
            self.scale = 1.0 / 255.0 if meta["input"] == "u8" else 1.0
            self.register_buffer("mean", torch.tensor(mean or [0.0], dtype=torch.float32))
            self.register_buffer("std", torch.tensor(std or [1.0], dtype=torch.float32))

        def preprocess(self, x):
            """Stored samples (uint8 pixels or float32) to the network's input, as mocod's loader does:
            u8 / 255, then (x - mean) / std per channel (per feature for vectors)."""
            x = torch.as_tensor(x).to(torch.float32) * self.scale
            c = self.input_shape[0]
            x = x.reshape(x.shape[0], *self.input_shape)
            m = self.mean.expand(c) if self.mean.numel() == 1 else self.mean
            s = self.std.expand(c) if self.std.numel() == 1 else self.std
            x = (x - m.view(1, c, 1, 1)) / s.view(1, c, 1, 1)
            return x.flatten(1) if self.vector_in[0] else x

        def forward(self, x, features=False):
            stop = self.backbone_layers if features else len(self.layers)
            for i in range(stop):
                if self.vector_in[i] and x.dim() > 2:
                    x = x.flatten(1)
                x = self.layers[i](x)
            return x.flatten(1)

    return Encoder(meta)


def load_encoder(path):
    """(module in eval mode with the file's weights, metadata)."""
    import torch

    meta, header = check_layout(path)
    model = build_module(meta)
    _, data_off, _ = read_header(path)
    with open(path, "rb") as f:
        f.seek(data_off)
        blob = bytearray(f.read())
    state = {}
    for name, t in header.items():
        begin, end = t["data_offsets"]
        state[name] = torch.frombuffer(blob, dtype=torch.float32, count=(end - begin) // 4,
                                       offset=begin).reshape(t["shape"]).clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # mocod does not count BatchNorm batches; nothing else may be left out.
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and k not in ("mean", "std")]
    if missing or unexpected:
        raise LayoutError(f"{path}: missing {missing}, unexpected {unexpected}")
    return model.eval(), meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--check-layout", action="store_true", help="standard-library layout check only")
    ap.add_argument("--embed", nargs=2, metavar=("IN.npy", "OUT.npy"), help="embed a .npy of samples")
    ap.add_argument("--features", action="store_true", help="with --embed: backbone features")
    a = ap.parse_args()
    try:
        if a.check_layout:
            meta, header = check_layout(a.model)
            n = sum((t["data_offsets"][1] - t["data_offsets"][0]) // 4 for t in header.values())
            print(f"{a.model}: ok: {meta['encoder']} encoder of step {meta['step']}, {len(header)} tensors, "
                  f"{n} parameters and buffers, input {meta['input_shape']} {meta['input']}, "
                  f"features {meta['feature_dim']}, embeddings {meta['embed_dim']}")
            return 0
        import torch

        model, meta = load_encoder(a.model)
        if not a.embed:
            print(model)
            return 0
        import numpy as np

        x = np.load(a.embed[0], mmap_mode="r")
        out = []
        with torch.no_grad():
            for i in range(0, len(x), 256):
                out.append(model(model.preprocess(np.array(x[i:i + 256])), features=a.features).numpy())
        z = np.concatenate(out) if out else np.zeros((0, int(meta["embed_dim"])), np.float32)
        np.save(a.embed[1], z.astype(np.float32))
        print(f"{a.embed[1]}: {z.shape[0]} x {z.shape[1]} {'features' if a.features else 'embeddings'}")
    except LayoutError as e:
        print(f"load_encoder: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
