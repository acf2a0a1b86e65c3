"""PyTorch eager reference for `cargo bench -p mfn-train --bench train_step`.

The paper's MobileFaceNet (PReLU, BatchNorm in train mode, GDConv, linear 512 -> 128 and
BatchNorm), an ArcFace head over 1000 classes, cross-entropy and an SGD step with momentum,
timed on random faces the same way: median of STEPS steps after one warm-up step.

    python bench/train_step_torch.py [BATCH [STEPS [THREADS]]]
"""

import math
import statistics
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F


def unit(cin, cout, k=1, s=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2 if k > 1 else 0, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, s, t):
        super().__init__()
        h = cin * t
        self.body = nn.Sequential(unit(cin, h), unit(h, h, 3, s, h), unit(h, cout, act=False))
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        layers = [unit(3, 64, 3, 2), unit(64, 64, 3, 1, 64)]
        cin = 64
        for t, c, n, s in [(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)]:
            for i in range(n):
                layers.append(Bottleneck(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [unit(cin, 512), unit(512, 512, 7, 1, 512, act=False)]
        self.body = nn.Sequential(*layers)
        self.gdconv_pad_fix()
        self.fc = nn.Linear(512, 128, bias=False)
        self.bn = nn.BatchNorm1d(128)

    def gdconv_pad_fix(self):
        # The 7x7 GDConv covers the 7x7 map without padding.
        self.body[-1][0].padding = (0, 0)

    def forward(self, x):
        return self.bn(self.fc(self.body(x).flatten(1)))


def arcface_loss(emb, weight, labels, s=64.0, m=0.5):
    cos = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
    theta = torch.acos(cos)
    target = torch.cos(theta + m)
    one_hot = F.one_hot(labels, cos.shape[1]).bool()
    logits = torch.where(one_hot, target, cos) * s
    return F.cross_entropy(logits, labels)


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else torch.get_num_threads()
    torch.set_num_threads(threads)
    model = MobileFaceNet().train()
    head = nn.Parameter(torch.randn(1000, 128) * 0.01)
    opt = torch.optim.SGD(list(model.parameters()) + [head], lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, 112, 112) * 255
    x = (x - 127.5) / 128
    labels = torch.arange(batch) % 1000
    times = {"forward": [], "backward": [], "update": [], "step": []}
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = arcface_loss(model(x), head, labels)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i > 0:
            times["forward"].append(t1 - t0)
            times["backward"].append(t2 - t1)
            times["update"].append(t3 - t2)
            times["step"].append(t3 - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    assert math.isfinite(loss.item())
    print(f"torch {torch.__version__} eager, {threads} threads, batch {batch}")
    print(" ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()),
          f"images/s {batch / med['step']:.1f}")


if __name__ == "__main__":
    main()
