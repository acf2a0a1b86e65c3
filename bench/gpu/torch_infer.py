"""PyTorch reference for `cargo xtask bench --device cuda`: inference of the paper's
MobileFaceNet on the GPU, eager and `torch.compile`d, in fp16 (and fp32 eager).

The network is `bench/mobilefacenet_torch.py` (PReLU, BatchNorm, GDConv, linear
512 -> 128 and BatchNorm) with random weights, in eval mode and channels-last, with the
input normalisation `(x - 127.5) / 128` inside it as MFN has. Each (engine, batch) row is
the median ms of RUNS passes after warm-up (and compilation), the input already on the GPU,
each pass timed to the end of its last kernel, as `cargo xtask bench` times MFN's.

    python3 bench/gpu/torch_infer.py [--batches 1,256,1024] [--runs 30] [--json OUT]
                                     [--compile-mode default] [--engines eager-fp32,eager-fp16,compile-fp16]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mobilefacenet_torch import MobileFaceNet  # noqa: E402


def randomize(model, seed=0):
    """Random weights and BatchNorm statistics, so that eval mode is not an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, nn.PReLU):
                m.weight.fill_(0.25)


def time_runs(fn, x, runs):
    ms = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms), min(ms)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,256,1024")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--json")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, ...")
    p.add_argument("--engines", default="eager-fp32,eager-fp16,compile-fp16")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    engines = args.engines.split(",")
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name(dev)
    base = MobileFaceNet()
    randomize(base)
    base.eval()
    params = sum(p.numel() for p in base.parameters())
    print(f"PyTorch {torch.__version__} on {gpu}; paper MobileFaceNet, {params:,} parameters")
    rows = []
    for engine in engines:
        kind, precision = engine.split("-")
        dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        model = MobileFaceNet()
        model.load_state_dict(base.state_dict())
        model = model.to(dev, dtype).eval().to(memory_format=torch.channels_last)
        fn = model
        if kind == "compile":
            fn = torch.compile(model, mode=args.compile_mode, dynamic=False)
        with torch.inference_mode():
            for b in batches:
                x = (torch.rand(b, 3, 112, 112, device=dev) * 255).to(dtype)
                x = x.contiguous(memory_format=torch.channels_last)
                t0 = time.perf_counter()
                for _ in range(3):
                    fn(x)
                torch.cuda.synchronize()
                warm_s = time.perf_counter() - t0
                med, best = time_runs(fn, x, args.runs)
                row = {
                    "engine": f"torch-{engine}" + (f"-{args.compile_mode}" if kind == "compile" else ""),
                    "batch": b,
                    "median_ms": med,
                    "min_ms": best,
                    "faces_per_s": b * 1e3 / med,
                    "warmup_s": warm_s,
                    "gpu": gpu,
                    "torch": torch.__version__,
                    "host": platform.node(),
                }
                rows.append(row)
                print(f"{row['engine']:<28} batch {b:>5}: {med:9.3f} ms  {row['faces_per_s']:>10.0f} faces/s"
                      f"  (warm-up {warm_s:.1f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
