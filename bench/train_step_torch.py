"""PyTorch eager reference for `cargo bench -p mfn-train --bench train_step`.

The paper's MobileFaceNet (`mobilefacenet_torch.py`, BatchNorm in train mode), an ArcFace head over 1000 classes, cross-entropy and an SGD step with momentum,
timed on random faces the same way: median of STEPS steps after one warm-up step.

    python bench/train_step_torch.py [BATCH [STEPS [THREADS]]]
"""

import math
import os
import statistics
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mobilefacenet_torch import MobileFaceNet  # noqa: E402


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
