#!/usr/bin/python3
"""Recipe exploration for mocod's default job, in PyTorch on the CPU: how the default was chosen.

Trains MoCo v2-style (query encoder + momentum key encoder + queue, InfoNCE) on Fashion-MNIST with the
augmentations mocod implements (random resized crop with scale/ratio ranges, horizontal flip,
translation, brightness/contrast jitter, Gaussian noise, random erasing) and reports the weighted-kNN
monitor (cosine, k = 200, weights exp(s / 0.1), backbone features before the projection head, train set
as the memory bank, test set as queries) after given numbers of epochs, with the FLOPs spent.

    /usr/bin/python3 scripts/torch_recipe.py --epochs 8 --eval-at 1,2,4,8 --threads 1 --tag base

Each evaluation prints one JSON line (also appended to --out): epoch, samples seen, training GFLOP so far,
kNN accuracy, loss, instance accuracy, wall time. The learning rate follows linear warm-up then a cosine
decay to zero over --epochs, so an evaluation before the last epoch is taken at a higher learning rate
than a run of that length would end with: a lower bound on what a shorter schedule reaches.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import (MoCo, build_encoder, count_flops, load_fashion, make_optimizer,  # noqa: E402
                             split_bn)


def floats(s):
    return [float(v) for v in s.split(",")] if s else []


# ---------------------------------------------------------------------------------------------------
# Augmentations, batched. One affine map per sample does crop + flip + translation, as a resampling of
# the 28x28 image with bilinear interpolation and zero (background) fill: the same geometry as
# torchvision's RandomResizedCrop (area fraction ~ U(scale), log aspect ~ U(log ratio), uniform position).
def geometric(x, scale, ratio, flip_p, translate_px, gen):
    B, _, H, W = x.shape
    area = torch.empty(B).uniform_(scale[0], scale[1], generator=gen)
    logr = torch.empty(B).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)  # crop width as a fraction of the side
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(B, generator=gen) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(B, generator=gen) * 2 - 1) * (1 - h)
    if translate_px > 0:
        cx = cx + (torch.rand(B, generator=gen) * 2 - 1) * (2.0 * translate_px / W)
        cy = cy + (torch.rand(B, generator=gen) * 2 - 1) * (2.0 * translate_px / H)
    flip = torch.where(torch.rand(B, generator=gen) < flip_p, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def photometric(x, brightness, contrast, gen):
    """x * b, then contrast c about the image mean; b ~ U(1 - brightness, 1 + brightness), same for c."""
    B = x.shape[0]
    if brightness > 0:
        x = x * torch.empty(B, 1, 1, 1).uniform_(1 - brightness, 1 + brightness, generator=gen)
    if contrast > 0:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * torch.empty(B, 1, 1, 1).uniform_(1 - contrast, 1 + contrast, generator=gen) + m
    return x.clamp_(0.0, 1.0)


def noise(x, p, sigma, gen):
    if p <= 0 or sigma <= 0:
        return x
    on = (torch.rand(x.shape[0], 1, 1, 1, generator=gen) < p).float()
    return x + on * sigma * torch.randn(x.shape, generator=gen)


def erase(x, p, smin, smax, gen):
    """Random erasing (Zhong et al. 2020): a rectangle of area fraction ~ U(smin, smax), aspect in
    [0.3, 3.3], set to 0, with probability p."""
    if p <= 0:
        return x
    B, _, H, W = x.shape
    area = torch.empty(B).uniform_(smin, smax, generator=gen) * H * W
    r = torch.exp(torch.empty(B).uniform_(math.log(0.3), math.log(3.3), generator=gen))
    eh = torch.sqrt(area * r).round().clamp(1, H)
    ew = torch.sqrt(area / r).round().clamp(1, W)
    y0 = (torch.rand(B, generator=gen) * (H - eh + 1)).floor()
    x0 = (torch.rand(B, generator=gen) * (W - ew + 1)).floor()
    ys = torch.arange(H).view(1, H, 1)
    xs = torch.arange(W).view(1, 1, W)
    box = ((ys >= y0.view(B, 1, 1)) & (ys < (y0 + eh).view(B, 1, 1)) &
           (xs >= x0.view(B, 1, 1)) & (xs < (x0 + ew).view(B, 1, 1)))
    on = (torch.rand(B, generator=gen) < p).view(B, 1, 1)
    return x.masked_fill((box & on).unsqueeze(1), 0.0)


def augment(x, a, gen):
    x = geometric(x, a.crop_scale, a.crop_ratio, a.flip, a.translate, gen)
    x = photometric(x, a.brightness, a.contrast, gen)
    x = noise(x, a.noise_p, a.noise_sigma, gen)
    return erase(x, a.erase_p, a.erase_scale[0], a.erase_scale[1], gen)


# ---------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def features(encoder, x, bs=1000, flat=False):
    """Normalised backbone features; flat: the flattened conv map before the backbone's linear block
    (what the backbone would output if that block moved into the projection head)."""
    was = encoder.training
    encoder.eval()
    f = encoder.features
    if flat:
        cut = [i for i, m in enumerate(encoder.backbone) if isinstance(m, nn.Flatten)][-1] + 1
        f = encoder.backbone[:cut]
    out = torch.cat([F.normalize(f(x[i:i + bs]), dim=1) for i in range(0, len(x), bs)])
    encoder.train(was)
    return out


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, k=200, t=0.1, classes=10, bs=500):
    """Weighted kNN monitor (Wu et al. 2018): each of the k nearest train features votes exp(s / t)."""
    correct = 0
    for i in range(0, len(test_f), bs):
        s = test_f[i:i + bs] @ train_f.t()
        top, idx = s.topk(k, dim=1)
        votes = torch.zeros(len(top), classes).scatter_add_(1, train_y[idx], torch.exp(top / t))
        correct += int((votes.argmax(1) == test_y[i:i + bs]).sum())
    return correct / len(test_f)


def lr_at(step, total, warm, base):
    if step < warm:
        return base * (step + 1) / warm
    return 0.5 * base * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def summarize(path):
    """Markdown table of kNN accuracy (%) by run and epoch from the JSON lines of --out."""
    runs, epochs = {}, set()
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            runs.setdefault(r["tag"], {})[r["epoch"]] = r
            epochs.add(r["epoch"])
    epochs = sorted(epochs)
    print("| run | " + " | ".join("ep %g" % e for e in epochs) + " |")
    print("| --- |" + " --- |" * len(epochs))
    for tag, rs in runs.items():
        print("| %s | " % tag + " | ".join("%.1f" % (100 * rs[e]["knn_acc"]) if e in rs else "" for e in epochs)
              + " |")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--summarize", metavar="JSONL", help="print the kNN-by-epoch table of earlier runs, exit")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--out", default="", help="append the JSON result lines to this file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--eval-at", default="1,2,4,8", help="epochs after which to run the kNN monitor")
    ap.add_argument("--subset", type=int, default=0, help="train on the first N images only (screening)")
    # model
    ap.add_argument("--arch", choices=["mlp", "cnn"], default="cnn")
    ap.add_argument("--channels", default="32,64,128")
    ap.add_argument("--fc", type=int, default=0, help="cnn: flatten + linear(fc) backbone output, 0 = GAP")
    ap.add_argument("--pools", type=int, default=2, help="cnn: 2x2 max-pool after the first N conv blocks")
    ap.add_argument("--eval-encoder", choices=["query", "key"], default="query")
    ap.add_argument("--eval-flat", action="store_true",
                    help="also report kNN on the flattened conv map before the backbone's linear (cnn --fc)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bn-groups", type=int, default=1, help="split BN groups with shuffled keys (1 = off)")
    # contrast
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--momentum", type=float, default=0.99)
    ap.add_argument("--negatives", choices=["all", "hardest"], default="all")
    ap.add_argument("--hard-n", type=int, default=1024)
    # optimiser
    ap.add_argument("--lr", type=float, default=0.06)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--sgd-momentum", type=float, default=0.9)
    # augmentations
    ap.add_argument("--crop-scale", type=floats, default=[0.5, 1.0])
    ap.add_argument("--crop-ratio", type=floats, default=[0.75, 4 / 3])
    ap.add_argument("--flip", type=float, default=0.5)
    ap.add_argument("--translate", type=float, default=0.0, help="pixels, uniform +-")
    ap.add_argument("--brightness", type=float, default=0.4)
    ap.add_argument("--contrast", type=float, default=0.4)
    ap.add_argument("--noise-p", type=float, default=0.0)
    ap.add_argument("--noise-sigma", type=float, default=0.0)
    ap.add_argument("--erase-p", type=float, default=0.0)
    ap.add_argument("--erase-scale", type=floats, default=[0.02, 0.2])
    a = ap.parse_args()
    if a.summarize:
        return summarize(a.summarize)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed + 1)
    xtr, ytr = load_fashion("train")
    xte, yte = load_fashion("test")
    xs = xtr[:a.subset] if a.subset else xtr

    channels = tuple(int(c) for c in a.channels.split(","))
    enc = build_encoder(a.arch, a.hidden, a.dim, channels=channels, fc=a.fc, pools=a.pools)
    if a.bn_groups > 1:
        split_bn(enc, a.bn_groups)
    fwd = count_flops(enc, (1, 28, 28))
    # hardest-n queue negatives and shuffled split BN for the keys, as explored here
    model = MoCo(enc, a.queue, a.dim, a.momentum, a.temperature, shuffle_bn_groups=a.bn_groups,
                 hard_n=a.hard_n if a.negatives == "hardest" else 0)
    opt = make_optimizer(model, a.lr, a.sgd_momentum, a.wd)
    feat_fwd = count_flops(nn.Sequential(enc.backbone), (1, 28, 28))

    steps_per_epoch = len(xs) // a.batch
    total = int(round(a.epochs * steps_per_epoch))
    warm = int(a.warmup_epochs * steps_per_epoch)
    evals = sorted({int(round(float(e) * steps_per_epoch)) for e in a.eval_at.split(",") if e})
    # training GFLOP per step: query forward + backward (3x), key forward, queue similarities + gradient
    neg = a.queue
    step_gflop = (4 * fwd * a.batch + 4 * a.batch * a.dim * neg) / 1e9
    header = {"tag": a.tag, "config": vars(a), "fwd_mflop_per_sample": fwd / 1e6,
              "backbone_mflop_per_sample": feat_fwd / 1e6, "gflop_per_step": step_gflop,
              "gflop_per_epoch": step_gflop * steps_per_epoch, "steps_per_epoch": steps_per_epoch,
              "eval_gflop": feat_fwd * (len(xtr) + len(xte)) / 1e9}
    print(json.dumps(header), flush=True)

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")

    t_start = time.time()
    t_train = 0.0
    step, loss_sum, acc_sum, n_sum = 0, 0.0, 0.0, 0
    if 0 in evals:
        evals.remove(0)
        ev = model.encoder_q if a.eval_encoder == "query" else model.encoder_k
        acc = knn_accuracy(features(ev, xtr), ytr, features(ev, xte), yte)
        emit({"tag": a.tag, "epoch": 0, "samples": 0, "train_gflop": 0, "knn_acc": acc})
    while step < total:
        perm = torch.randperm(len(xs), generator=gen)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            t0 = time.time()
            x = xs[perm[b * a.batch:(b + 1) * a.batch]]
            x_q, x_k = augment(x, a, gen), augment(x, a, gen)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warm, a.lr)
            loss, logits, k = model(x_q, x_k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.enqueue(k)
            step += 1
            t_train += time.time() - t0
            loss_sum += float(loss)
            acc_sum += float((logits.argmax(1) == 0).float().mean())
            n_sum += 1
            if not math.isfinite(float(loss)):
                print("diverged at step %d" % step, file=sys.stderr)
                return 1
            if step in evals:
                t0 = time.time()
                ev = model.encoder_q if a.eval_encoder == "query" else model.encoder_k
                acc = knn_accuracy(features(ev, xtr), ytr, features(ev, xte), yte)
                extra = {}
                if a.eval_flat:
                    extra["knn_acc_flat"] = round(knn_accuracy(features(ev, xtr, flat=True), ytr,
                                                               features(ev, xte, flat=True), yte), 4)
                emit(dict(extra, **{"tag": a.tag, "epoch": round(step / steps_per_epoch, 3), "step": step,
                      "samples": step * a.batch, "train_gflop": round(step * step_gflop, 1),
                      "knn_acc": round(acc, 4), "loss": round(loss_sum / n_sum, 4),
                      "inst_acc": round(acc_sum / n_sum, 4), "train_s": round(t_train, 1),
                      "eval_s": round(time.time() - t0, 1), "wall_s": round(time.time() - t_start, 1)}))
                loss_sum, acc_sum, n_sum = 0.0, 0.0, 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
