#!/usr/bin/python3
"""PyTorch CPU reference of mocod's training step, for `make bench` (mocod steps/s / PyTorch steps/s).

The same job as a mocod configuration, written the way a PyTorch user would write MoCo v2
(He et al. 2020, Chen et al. 2020): an nn.Module query encoder + projection head, a deep-copied key
encoder updated in place by an exponential moving average under no_grad, shuffled split BatchNorm for
the keys, the queue as a registered buffer, InfoNCE as cross-entropy over [positive | queue] logits,
SGD with momentum and weight decay.

    /usr/bin/python3 scripts/torch_reference.py --config config/default.json
    /usr/bin/python3 scripts/torch_reference.py --config config/default.json --set contrast.queue_size=65536
    /usr/bin/python3 scripts/torch_reference.py --arch cnn --threads 2 --data fashion

With --config the encoder is built from the config's model.backbone + model.head + a linear to
model.embed_dim + L2 normalisation (mocod's trainer_encoder_spec), and batch size, queue size,
temperature, key momentum, shuffle-BN groups, optimizer, lr, weight decay and threads come from the
config; the flags below override single values. The config is read through mocod itself
(`mocod --print-config`, from $MOCOD_BIN or build/bin), so `extends`, defaults and checks are mocod's.
The input shape is the config's training data's (the IDX header), or --shape.

The loss is InfoNCE over the whole queue (strategy all) unless --strategy hardest is given; the
configured strategy is reported, not followed, as the C side of `make bench` compares strategy all.

The step is timed on ready-made views (random, or Fashion-MNIST images with a little noise): the data
pipeline is not part of the comparison. Output, one `key=value` per line, machine-readable:
    torch_steps_per_sec=NN.N  torch_ms_per_step_median=..  torch_gflop_per_step=..  torch_gflops=..
Use Debian's /usr/bin/python3 (python3-torch); other interpreters on PATH may lack torch.
"""
import argparse
import copy
import gzip
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mlp_encoder(in_dim=784, widths=(1024, 512)):
    """784 -> 1024 -> 512, BatchNorm1d and ReLU after each linear: mocod's early MLP backbone."""
    layers, d = [nn.Flatten()], in_dim
    for w in widths:
        layers += [nn.Linear(d, w), nn.BatchNorm1d(w), nn.ReLU(inplace=True)]
        d = w
    return nn.Sequential(*layers), d


def cnn_encoder(channels=(32, 64, 128), pools=2, fc=0, in_ch=1, side=28):
    """3x3 conv blocks with BatchNorm2d + ReLU, 2x2 max-pool after the first `pools` blocks, then a
    global average pool (fc == 0) or flatten + linear fc + BN + ReLU (fc > 0, keeps the spatial layout,
    which matters on small centred images such as Fashion-MNIST)."""
    layers, c, s = [], in_ch, side
    for i, w in enumerate(channels):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        if i < pools:
            layers.append(nn.MaxPool2d(2))
            s //= 2
        c = w
    if fc > 0:
        layers += [nn.Flatten(), nn.Linear(c * s * s, fc), nn.BatchNorm1d(fc), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers), fc
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c


def projection_head(in_dim, hidden=512, dim=128):
    """MoCo v2 head: linear, BN, ReLU, linear; the output is L2-normalised by the model."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim))


class L2Norm(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1)


def layers_from_spec(spec, shape, where="model"):
    """mocod's layer list (include/core/net.h: conv2d, batchnorm, relu, maxpool, avgpool, flatten,
    linear, l2norm with their keys and defaults) as torch modules for per-sample input shape (C, H, W).
    Returns (modules, output shape). Rows are flat [B, D] after flatten, avgpool and linear; mocod's
    batchnorm is BatchNorm1d there and per-channel (BatchNorm2d) on images."""
    mods, (c, h, w), flat = [], shape, False
    for i, layer in enumerate(spec):
        t, at = layer["type"], "%s[%d]" % (where, i)
        if t in ("conv2d", "maxpool") and flat:
            raise ValueError("%s: %s expects an image, got a vector of %d" % (at, t, c))
        if t == "conv2d":
            k, s, p = layer["kernel"], layer.get("stride", 1), layer.get("pad", 0)
            mods.append(nn.Conv2d(c, layer["out"], k, stride=s, padding=p, bias=layer.get("bias", True)))
            c, h, w = layer["out"], (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        elif t == "maxpool":
            k = layer["kernel"]
            s, p = layer.get("stride", k), layer.get("pad", 0)
            mods.append(nn.MaxPool2d(k, stride=s, padding=p))
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        elif t == "avgpool":
            mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            h, w, flat = 1, 1, True
        elif t == "flatten":
            mods.append(nn.Flatten())
            c, h, w, flat = c * h * w, 1, 1, True
        elif t == "linear":
            if not flat:
                if h * w != 1:
                    raise ValueError("%s: linear expects a vector input, got %dx%dx%d (add flatten)"
                                     % (at, c, h, w))
                mods.append(nn.Flatten())
                flat = True
            mods.append(nn.Linear(c, layer["out"], bias=layer.get("bias", True)))
            c = layer["out"]
        elif t == "batchnorm":
            bn = nn.BatchNorm1d if flat else nn.BatchNorm2d
            mods.append(bn(c, eps=layer.get("eps", 1e-5), momentum=layer.get("momentum", 0.1)))
        elif t == "relu":
            mods.append(nn.ReLU(inplace=True))
        elif t == "l2norm":
            mods.append(L2Norm())
        else:
            raise ValueError("%s: unknown layer type %r" % (at, t))
    return mods, (c, h, w)


class Encoder(nn.Module):
    """Backbone + head; forward returns L2-normalised embeddings, `features` the backbone output."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        return F.normalize(self.head(self.backbone(x)), dim=1)


def build_encoder(arch, hidden=512, dim=128, channels=(32, 64, 128), fc=0, pools=2):
    if arch == "mlp":
        bb, d = mlp_encoder()
    elif arch == "cnn":
        bb, d = cnn_encoder(channels, pools=pools, fc=fc)
    else:
        raise ValueError("arch: %r, allowed mlp|cnn" % arch)
    return Encoder(bb, projection_head(d, hidden, dim))


def encoder_from_config(cfg, shape):
    """The encoder mocod trains (train/trainer.h, trainer_encoder_spec): backbone, head, a linear to
    embed_dim, L2 normalisation (Encoder.forward)."""
    model = cfg["model"]
    bb, out = layers_from_spec(model["backbone"], shape, "model.backbone")
    head = model["head"] + [{"type": "linear", "out": model["embed_dim"]}]
    hd, _ = layers_from_spec(head, out, "model.head")
    return Encoder(nn.Sequential(*bb), nn.Sequential(*hd))


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm with statistics per group of B/groups consecutive samples: MoCo's shuffled BN on one
    device (the key batch is permuted across groups so a query and its key never share statistics)."""

    def __init__(self, num_features, groups):
        super().__init__(num_features)
        self.groups = groups

    def forward(self, x):
        shape = x.shape
        if x.dim() == 2:
            x = x.view(shape[0], shape[1], 1, 1)
        if not self.training or self.groups == 1:
            return super().forward(x).view(shape)
        B, C, H, W = x.shape
        g = self.groups
        y = x.view(g, B // g, C, H, W).transpose(0, 1).reshape(B // g, g * C, H, W)
        rm, rv = self.running_mean.repeat(g), self.running_var.repeat(g)
        y = F.batch_norm(y, rm, rv, self.weight.repeat(g), self.bias.repeat(g), True, self.momentum, self.eps)
        self.running_mean.copy_(rm.view(g, C).mean(0))
        self.running_var.copy_(rv.view(g, C).mean(0))
        return y.view(B // g, g, C, H, W).transpose(0, 1).reshape(shape)


def split_bn(module, groups):
    """Every BatchNorm of module becomes a SplitBatchNorm of `groups`, keeping its state."""
    for name, child in module.named_children():
        if isinstance(child, SplitBatchNorm):
            child.groups = groups
        elif isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            bn = SplitBatchNorm(child.num_features, groups)
            bn.eps, bn.momentum = child.eps, child.momentum
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            split_bn(child, groups)
    return module


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and a FIFO queue of K normalised keys. shuffle_bn_groups > 1:
    the keys are computed on a shuffled batch with BatchNorm statistics per group (mocod's
    contrast.shuffle_bn_groups); hard_n > 0: only the n most similar queue keys are negatives."""

    def __init__(self, encoder, queue_size=4096, dim=128, momentum=0.99, temperature=0.2,
                 shuffle_bn_groups=1, hard_n=0):
        super().__init__()
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        self.shuffle = shuffle_bn_groups > 1
        if self.shuffle:
            split_bn(self.encoder_k, shuffle_bn_groups)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.m, self.t, self.hard_n = momentum, temperature, hard_n
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.q_params = list(self.encoder_q.parameters())
        self.k_params = list(self.encoder_k.parameters())

    @torch.no_grad()
    def momentum_update(self):
        # theta_k <- m * theta_k + (1 - m) * theta_q, in place over all tensors at once
        torch._foreach_mul_(self.k_params, self.m)
        torch._foreach_add_(self.k_params, self.q_params, alpha=1.0 - self.m)

    @torch.no_grad()
    def enqueue(self, k):
        K, B, p = self.queue.shape[0], k.shape[0], int(self.queue_ptr)
        if p + B <= K:
            self.queue[p:p + B] = k
        else:  # wrap around
            n = K - p
            self.queue[p:] = k[:n]
            self.queue[:B - n] = k[n:]
        self.queue_ptr.fill_((p + B) % K)

    def forward(self, x_q, x_k):
        q = self.encoder_q(x_q)
        with torch.no_grad():
            self.momentum_update()
            if self.shuffle:
                perm = torch.randperm(x_k.shape[0])
                k = torch.empty_like(q)
                k[perm] = self.encoder_k(x_k[perm])
            else:
                k = self.encoder_k(x_k)
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ self.queue.t()
        if self.hard_n:
            with torch.no_grad():
                idx = l_neg.topk(self.hard_n, dim=1).indices
            l_neg = l_neg.gather(1, idx)
        logits = torch.cat([l_pos, l_neg], dim=1) / self.t
        labels = torch.zeros(q.shape[0], dtype=torch.long)
        loss = F.cross_entropy(logits, labels)
        return loss, logits, k


def make_optimizer(model, lr, momentum=0.9, weight_decay=5e-4, kind="sgd", nesterov=False,
                   decay_all=False, betas=(0.9, 0.999), eps=1e-8):
    """SGD or AdamW; like mocod's default, no weight decay on biases and BatchNorm parameters."""
    decay, no_decay = [], []
    for p in model.encoder_q.parameters():
        (no_decay if p.ndim <= 1 and not decay_all else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError("optim.optimizer: %r has no PyTorch counterpart here, allowed sgd|adamw" % kind)


def load_fashion(split="train", limit=None):
    """Fashion-MNIST IDX files (Debian's dataset-fashion-mnist) -> float tensor [N,1,28,28] in [0,1], labels."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(FASHION_DIR, prefix + "-images-idx3-ubyte.gz")) as f:
        raw = f.read()
    with gzip.open(os.path.join(FASHION_DIR, prefix + "-labels-idx1-ubyte.gz")) as f:
        lab = f.read()
    n = int.from_bytes(raw[4:8], "big")
    x = torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(n, 1, 28, 28)
    y = torch.frombuffer(bytearray(lab[8:]), dtype=torch.uint8).long()
    if limit:
        x, y = x[:limit], y[:limit]
    return x.float().div_(255.0), y


def load_config(path, sets=()):
    """The effective mocod config: `extends` applied, every default filled in, checked by mocod."""
    exe = os.path.join(os.environ.get("MOCOD_BIN") or os.path.join(REPO, "build", "bin"), "mocod")
    if not os.access(exe, os.X_OK):
        raise SystemExit("torch_reference: %s not found: build mocod first (make) or set MOCOD_BIN" % exe)
    cmd = [exe, "--config", path, "--print-config"] + ["--set=" + s for s in sets]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit("torch_reference: %s" % r.stderr.strip())
    return json.loads(r.stdout)


def data_shape(cfg):
    """(C, H, W) of one training sample from the header of the config's IDX training file (mocod's
    data/idx.h: 2 dimensions are a vector (D,1,1), 3 an image (1,H,W), 4 are (C,H,W))."""
    data = cfg["data"]
    path = data["train"] if os.path.isabs(data["train"]) else os.path.join(data["dir"], data["train"])
    if not os.path.isfile(path):
        raise SystemExit("torch_reference: data.train %s is not one file; give --shape C,H,W" % path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    with (gzip.open(path) if gz else open(path, "rb")) as f:
        head = f.read(4)
        ndim = head[3]
        if head[:2] != b"\0\0" or not 2 <= ndim <= 4:
            raise SystemExit("torch_reference: %s: not an IDX sample file; give --shape C,H,W" % path)
        dims = [int.from_bytes(f.read(4), "big") for _ in range(ndim)][1:]
    return {1: (dims[0], 1, 1), 2: (1, dims[0], dims[1]), 3: tuple(dims)}[len(dims)]


def layer_flops(encoder, shape):
    """Multiply-adds x 2 of each convolution and linear of one forward pass of one sample, in order."""
    flops = []

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            flops.append(2 * out[0].numel() * k)
        elif isinstance(mod, nn.Linear):
            flops.append(2 * mod.in_features * mod.out_features)

    hs = [m.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = encoder.training
    encoder.eval()
    with torch.no_grad():
        encoder(torch.zeros(1, *shape))
    encoder.train(was)
    for h in hs:
        h.remove()
    return flops


def count_flops(encoder, shape):
    """Forward FLOPs of one sample (layer_flops summed)."""
    return sum(layer_flops(encoder, shape))


def step_gflop(flops, batch, queue, dim):
    """The step's matrix-product work, the same formula as mocod's bench_speed: query forward F,
    backward 2F less the first layer's input gradient (nobody needs it, neither framework computes it),
    key forward F, queue similarities and their gradient 2 x 2·B·d·K. flops: layer_flops."""
    f = sum(flops)
    return ((4 * f - flops[0]) * batch + 2 * 2 * batch * dim * queue) / 1e9


# flag -> config path, for the values --config supplies (a flag given on the command line wins).
FROM_CONFIG = {
    "batch": "optim.batch_size",
    "queue": "contrast.queue_size",
    "temperature": "contrast.temperature",
    "momentum": "contrast.momentum",
    "shuffle_bn_groups": "contrast.shuffle_bn_groups",
    "num_negatives": "contrast.negatives.num_negatives",
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "sgd_momentum": "optim.momentum",
    "threads": "threads",
}
BUILTIN = {"batch": 256, "queue": 4096, "temperature": 0.2, "momentum": 0.99, "shuffle_bn_groups": 1,
           "num_negatives": 1024, "lr": 0.06, "weight_decay": 5e-4, "sgd_momentum": 0.9, "threads": 2}


def config_value(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="mocod config: model, sizes, optimizer and threads from it")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                    help="--config: override one option, as mocod --set; repeatable")
    ap.add_argument("--shape", help="C,H,W of one sample (default: the config's data, else 1,28,28)")
    ap.add_argument("--arch", choices=["mlp", "cnn"], help="built-in encoder (without --config; default mlp)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512, help="projection head hidden width")
    ap.add_argument("--channels", default="32,64,128", help="cnn: output channels of the 3x3 conv blocks")
    ap.add_argument("--pools", type=int, default=2, help="cnn: 2x2 max-pool after the first N conv blocks")
    ap.add_argument("--fc", type=int, default=0, help="cnn: flatten + linear of this width instead of GAP")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--queue", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--momentum", type=float, help="key encoder EMA momentum")
    ap.add_argument("--shuffle-bn-groups", type=int, help="key BatchNorm groups over a shuffled batch")
    ap.add_argument("--strategy", choices=["all", "hardest"], default="all",
                    help="negatives: the whole queue, or the --num-negatives most similar keys")
    ap.add_argument("--num-negatives", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--sgd-momentum", type=float)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--steps", type=int, default=0, help="steps per repetition (0: fit --budget)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions; the median is reported")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--budget", type=float, default=25.0, help="seconds of timed steps when --steps=0")
    ap.add_argument("--data", choices=["random", "fashion"], default="random")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.config and a.arch:
        ap.error("--arch builds a built-in encoder; --config takes the model from the config")
    if a.set and not a.config:
        ap.error("--set changes the --config file's values")
    cfg = load_config(a.config, a.set) if a.config else None
    for flag, path in FROM_CONFIG.items():
        if getattr(a, flag) is None:
            setattr(a, flag, config_value(cfg, path) if cfg else BUILTIN[flag])
    return a, cfg


def build(a, cfg):
    """(model, optimizer, per-sample shape, layer FLOPs, description) for the parsed arguments."""
    if a.shape:
        shape = tuple(int(v) for v in a.shape.split(","))
    else:
        shape = data_shape(cfg) if cfg else (1, 28, 28)
    if cfg:
        enc = encoder_from_config(cfg, shape)
        a.dim = cfg["model"]["embed_dim"]
        arch = "config"
        o = cfg["optim"]
        opt_kw = dict(kind=o["optimizer"], nesterov=o["nesterov"], decay_all=o["decay_all"],
                      betas=(o["beta1"], o["beta2"]), eps=o["eps"])
    else:
        enc = build_encoder(a.arch or "mlp", a.hidden, a.dim, tuple(int(c) for c in a.channels.split(",")),
                            fc=a.fc, pools=a.pools)
        arch = "mlp" if a.arch != "cnn" else "cnn[%s,pools:%d,fc:%d]" % (a.channels, a.pools, a.fc)
        opt_kw = {}
    flops = layer_flops(enc, shape)
    hard_n = min(a.num_negatives, a.queue) if a.strategy == "hardest" else 0
    model = MoCo(enc, a.queue, a.dim, a.momentum, a.temperature, a.shuffle_bn_groups, hard_n)
    opt = make_optimizer(model, a.lr, a.sgd_momentum, a.weight_decay, **opt_kw)
    return model, opt, shape, flops, arch


def main():
    a, cfg = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model, opt, shape, flops, arch = build(a, cfg)
    model.train()

    # A pool of ready views, cycled, so every step reads fresh memory as a real one would.
    pool = 4
    if a.data == "fashion":
        if shape != (1, 28, 28):
            raise SystemExit("torch_reference: --data fashion needs the 1x28x28 shape, got %s" % (shape,))
        x, _ = load_fashion("train", limit=pool * a.batch)
        views = [(x[i * a.batch:(i + 1) * a.batch] + 0.05 * torch.randn(a.batch, *shape),
                  x[i * a.batch:(i + 1) * a.batch] + 0.05 * torch.randn(a.batch, *shape)) for i in range(pool)]
    else:
        views = [(torch.randn(a.batch, *shape), torch.randn(a.batch, *shape)) for _ in range(pool)]

    it = [0]

    def step():
        xq, xk = views[it[0] % pool]
        it[0] += 1
        loss, _, k = model(xq, xk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.enqueue(k)
        return loss

    t0 = time.perf_counter()
    for _ in range(max(a.warmup, 1)):
        loss = step()
    per = (time.perf_counter() - t0) / max(a.warmup, 1)
    steps = a.steps or max(2, int(a.budget / a.reps / max(per, 1e-4)))
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        times.append((time.perf_counter() - t0) / steps)
    if not torch.isfinite(loss):
        print("torch_reference: loss is not finite", file=sys.stderr)
        return 1
    med = statistics.median(times)
    gf = step_gflop(flops, a.batch, a.queue, a.dim)
    print("torch_config=arch:%s,shape:%s,batch:%d,queue:%d,dim:%d,threads:%d,data:%s,steps:%dx%d"
          % (arch, "x".join(map(str, shape)), a.batch, a.queue, a.dim, a.threads, a.data, a.reps, steps))
    negs = "all %d queue keys" % a.queue if a.strategy == "all" else "the %d hardest" % model.hard_n
    configured = ""
    if cfg:
        c = cfg["contrast"]
        configured = " (configured: loss %s, strategy %s%s)" % (
            c["loss"], c["negatives"]["strategy"], ", symmetric" if c["symmetric"] else "")
    bn = "shuffle BN %d groups" % a.shuffle_bn_groups if a.shuffle_bn_groups > 1 else "no shuffle BN"
    print("torch_job=InfoNCE over %s, strategy %s, %s%s" % (negs, a.strategy, bn, configured))
    print("torch_version=%s" % torch.__version__)
    print("torch_ms_per_step_median=%.2f" % (med * 1e3))
    print("torch_ms_per_step_min=%.2f" % (min(times) * 1e3))
    print("torch_ms_per_step_max=%.2f" % (max(times) * 1e3))
    print("torch_steps_per_sec=%.2f" % (1.0 / med))
    print("torch_gflop_per_step=%.3f" % gf)
    print("torch_gflops=%.1f" % (gf / med))
    print("torch_final_loss=%.4f" % float(loss))
    with open("/proc/self/status") as f:
        hwm = [int(line.split()[1]) for line in f if line.startswith("VmHWM:")]
    if hwm:
        print("torch_peak_rss_mb=%.0f" % (hwm[0] / 1024))
    return 0


if __name__ == "__main__":
    sys.exit(main())
