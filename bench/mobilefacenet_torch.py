"""The paper's MobileFaceNet (Chen et al., 2018) in PyTorch, as MFN's `Config::paper()`:
PReLU, BatchNorm, the 7x7 global depthwise conv, linear 512 -> 128 and BatchNorm, with the
input normalisation `(x - 127.5) / 128` inside it. The reference network of the PyTorch
side of MFN's benchmarks (`train_step_torch.py`, `gpu/torch_infer.py`).
"""

from torch import nn


def unit(cin, cout, k=1, s=1, groups=1, act=True, pad=None):
    pad = (k // 2 if k > 1 else 0) if pad is None else pad
    layers = [nn.Conv2d(cin, cout, k, s, pad, groups=groups, bias=False), nn.BatchNorm2d(cout)]
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
    """Raw RGB pixels in 0..255, NCHW, 112x112; raw 128-d embeddings out."""

    def __init__(self):
        super().__init__()
        layers = [unit(3, 64, 3, 2), unit(64, 64, 3, 1, 64)]
        cin = 64
        for t, c, n, s in [(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)]:
            for i in range(n):
                layers.append(Bottleneck(cin, c, s if i == 0 else 1, t))
                cin = c
        # The 7x7 GDConv covers the 7x7 map without padding.
        layers += [unit(cin, 512), unit(512, 512, 7, 1, 512, act=False, pad=0)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(512, 128, bias=False)
        self.bn = nn.BatchNorm1d(128)

    def forward(self, x):
        x = (x - 127.5) * 0.0078125
        return self.bn(self.fc(self.body(x).flatten(1)))
