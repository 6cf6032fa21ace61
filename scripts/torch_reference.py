#!/usr/bin/python3
"""PyTorch CPU reference of mocod's training step, for `make bench` (mocod steps/s / PyTorch steps/s).

The same job as mocod's default configuration, written the way a PyTorch user would write MoCo v2
(He et al. 2020, Chen et al. 2020): an nn.Module query encoder + projection head, a deep-copied key
encoder updated in place by an exponential moving average under no_grad, the queue as a registered
buffer, InfoNCE as cross-entropy over [positive | queue] logits, SGD with momentum and weight decay.

    /usr/bin/python3 scripts/torch_reference.py --arch mlp --threads 2
    /usr/bin/python3 scripts/torch_reference.py --arch cnn --threads 2 --data fashion

The step is timed on ready-made views (random, or Fashion-MNIST images with a little noise): the data
pipeline is not part of the comparison. Output, one `key=value` per line, machine-readable:
    torch_steps_per_sec=NN.N  torch_ms_per_step_median=..  torch_gflop_per_step=..  torch_gflops=..
Use Debian's /usr/bin/python3 (python3-torch); other interpreters on PATH may lack torch.
"""
import argparse
import copy
import gzip
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def mlp_encoder(in_dim=784, widths=(1024, 512)):
    """784 -> 1024 -> 512, BatchNorm1d and ReLU after each linear: mocod's default MLP backbone."""
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


class Encoder(nn.Module):
    """Backbone + head; forward returns L2-normalised embeddings, `features` the backbone output."""

    def __init__(self, backbone, feat_dim, hidden=512, dim=128):
        super().__init__()
        self.backbone = backbone
        self.head = projection_head(feat_dim, hidden, dim)

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
    return Encoder(bb, d, hidden, dim)


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and a FIFO queue of K normalised keys."""

    def __init__(self, encoder, queue_size=4096, dim=128, momentum=0.99, temperature=0.2):
        super().__init__()
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.m, self.t = momentum, temperature
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
            k = self.encoder_k(x_k)
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ self.queue.t()
        logits = torch.cat([l_pos, l_neg], dim=1) / self.t
        labels = torch.zeros(q.shape[0], dtype=torch.long)
        loss = F.cross_entropy(logits, labels)
        return loss, logits, k


def make_optimizer(model, lr, momentum=0.9, weight_decay=5e-4):
    """SGD; like mocod's default, no weight decay on biases and BatchNorm parameters."""
    decay, no_decay = [], []
    for p in model.encoder_q.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=momentum)


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


def count_flops(encoder, shape):
    """Multiply-adds x 2 of the convolutions and linears of one forward pass of one sample."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += 2 * out[0].numel() * k
        elif isinstance(mod, nn.Linear):
            total[0] += 2 * mod.in_features * mod.out_features

    hs = [m.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = encoder.training
    encoder.eval()
    with torch.no_grad():
        encoder(torch.zeros(1, *shape))
    encoder.train(was)
    for h in hs:
        h.remove()
    return total[0]


def step_gflop(fwd_flops, batch, queue, dim):
    """Query forward + backward (3x forward), key forward, queue similarities and their gradient."""
    return (4 * fwd_flops * batch + 2 * 2 * batch * dim * queue) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512, help="projection head hidden width")
    ap.add_argument("--channels", default="32,64,128", help="cnn: output channels of the 3x3 conv blocks")
    ap.add_argument("--pools", type=int, default=2, help="cnn: 2x2 max-pool after the first N conv blocks")
    ap.add_argument("--fc", type=int, default=0, help="cnn: flatten + linear of this width instead of GAP")
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--momentum", type=float, default=0.99, help="key encoder EMA momentum")
    ap.add_argument("--lr", type=float, default=0.06)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="steps per repetition (0: fit --budget)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions; the median is reported")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--budget", type=float, default=25.0, help="seconds of timed steps when --steps=0")
    ap.add_argument("--data", choices=["random", "fashion"], default="random")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    shape = (1, 28, 28)
    channels = tuple(int(c) for c in a.channels.split(","))
    enc = build_encoder(a.arch, a.hidden, a.dim, channels=channels, fc=a.fc, pools=a.pools)
    fwd = count_flops(enc, shape)
    model = MoCo(enc, a.queue, a.dim, a.momentum, a.temperature)
    opt = make_optimizer(model, a.lr)
    model.train()

    # A pool of ready views, cycled, so every step reads fresh memory as a real one would.
    pool = 4
    if a.data == "fashion":
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
    gf = step_gflop(fwd, a.batch, a.queue, a.dim)
    arch = a.arch if a.arch == "mlp" else "cnn[%s,pools:%d,fc:%d]" % (a.channels, a.pools, a.fc)
    print("torch_config=arch:%s,batch:%d,queue:%d,dim:%d,threads:%d,data:%s,steps:%dx%d"
          % (arch, a.batch, a.queue, a.dim, a.threads, a.data, a.reps, steps))
    print("torch_version=%s" % torch.__version__)
    print("torch_ms_per_step_median=%.2f" % (med * 1e3))
    print("torch_ms_per_step_min=%.2f" % (min(times) * 1e3))
    print("torch_ms_per_step_max=%.2f" % (max(times) * 1e3))
    print("torch_steps_per_sec=%.2f" % (1.0 / med))
    print("torch_gflop_per_step=%.3f" % gf)
    print("torch_gflops=%.1f" % (gf / med))
    print("torch_final_loss=%.4f" % float(loss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
