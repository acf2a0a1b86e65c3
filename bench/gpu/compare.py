"""Reads what bench/gpu/run.sh wrote under OUT and writes OUT/summary.md and
OUT/summary.json: the parity, LFW and training-op checks (pass/fail) and the speed table
next to PyTorch's. Missing files are reported as such, so it can run after any step.
Exit status 1 when a check failed or is missing.

    python3 bench/gpu/compare.py OUT
"""

import json
import math
import os
import sys

# Gates.
PARITY_F32_RAW = 1e-3  # max |raw CUDA - raw CPU|, as the project's ONNX Runtime check
PARITY_F16_UNIT = 1e-2  # max |unit CUDA - unit CPU| in f16
LFW_POINTS = 0.05  # |CUDA - CPU| accuracy, percentage points
KNOWN_CPU_FOLD1 = {"insightface": 98.167, "exact": 98.167}  # y1, lfw-fold1.bin, flip
# The PyTorch figures to beat, torch.compile fp16 on an H200.
REFERENCE = {"faces_per_s_1024": 115_000, "latency_ms_1": 1.8}


def load(out, name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def unit(v):
    n = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / n for x in v]


def parity(out, checks, lines):
    cpu = load(out, "embed-cpu.json")
    lines.append("## Parity: y1 raw outputs on the 26 golden PNGs, CUDA against CPU\n")
    lines.append("| dtype | max abs raw diff | max raw (CPU) | max abs unit diff | min cosine | gate | result |")
    lines.append("|---|---|---|---|---|---|---|")
    for dt in ["f32", "f16", "bf16"]:
        gpu = load(out, f"embed-cuda-{dt}.json")
        name = f"parity-{dt}"
        if cpu is None or gpu is None:
            checks[name] = {"ok": False if dt != "bf16" else None, "why": "missing output"}
            lines.append(f"| {dt} | - | - | - | - | | missing |")
            continue
        a = [r["embedding"] for r in cpu["images"]]
        b = [r["embedding"] for r in gpu["images"]]
        paths_ok = [r["path"] for r in cpu["images"]] == [r["path"] for r in gpu["images"]]
        raw = max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))
        scale = max(abs(x) for u in a for x in u)
        ua, ub = [unit(u) for u in a], [unit(v) for v in b]
        unit_diff = max(abs(x - y) for u, v in zip(ua, ub) for x, y in zip(u, v))
        cos = min(sum(x * y for x, y in zip(u, v)) for u, v in zip(ua, ub))
        if dt == "f32":
            ok, gate = raw <= PARITY_F32_RAW, f"raw <= {PARITY_F32_RAW:g}"
        elif dt == "f16":
            ok, gate = unit_diff <= PARITY_F16_UNIT, f"unit <= {PARITY_F16_UNIT:g}"
        else:
            ok, gate = None, "report only"
        ok = ok if ok is None else (ok and paths_ok and len(a) == len(b))
        checks[name] = {"ok": ok, "max_abs_raw": raw, "max_raw": scale, "max_abs_unit": unit_diff,
                        "min_cosine": cos, "images": len(a)}
        res = "info" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"| {dt} | {raw:.2e} | {scale:.3f} | {unit_diff:.2e} | {cos:.6f} | {gate} | {res} |")
    lines.append("")


def accuracy(report):
    a = report["accuracy"]
    return {k: 100 * a[k]["mean"] for k in ("insightface", "exact")}


def lfw(out, checks, lines):
    lines.append("## LFW fold 1 (lfw-fold1.bin: 600 pairs, 10 folds, flip test), accuracy %\n")
    lines.append("| run | insightface | exact | faces/s | result |")
    lines.append("|---|---|---|---|---|")
    cpu = load(out, "eval-cpu.json")
    if cpu is not None:
        acc = accuracy(cpu)
        known = all(abs(acc[k] - KNOWN_CPU_FOLD1[k]) < 0.01 for k in acc)
        checks["lfw-cpu-known"] = {"ok": known, **acc, "known": KNOWN_CPU_FOLD1}
        lines.append(f"| CPU | {acc['insightface']:.3f} | {acc['exact']:.3f} | "
                     f"{cpu.get('faces_per_second', 0):.0f} | {'as known' if known else 'DIFFERS from known'} "
                     f"({KNOWN_CPU_FOLD1['insightface']}/{KNOWN_CPU_FOLD1['exact']}) |")
    else:
        checks["lfw-cpu-known"] = {"ok": False, "why": "missing output"}
        lines.append("| CPU | - | - | - | missing |")
    for dt in ["f32", "f16"]:
        gpu = load(out, f"eval-cuda-{dt}.json")
        name = f"lfw-cuda-{dt}"
        if gpu is None or cpu is None:
            checks[name] = {"ok": False, "why": "missing output"}
            lines.append(f"| CUDA {dt} | - | - | - | missing |")
            continue
        g, c = accuracy(gpu), accuracy(cpu)
        diff = max(abs(g[k] - c[k]) for k in g)
        ok = diff <= LFW_POINTS
        checks[name] = {"ok": ok, **g, "max_diff_points": diff}
        lines.append(f"| CUDA {dt} | {g['insightface']:.3f} | {g['exact']:.3f} | "
                     f"{gpu.get('faces_per_second', 0):.0f} | {'PASS' if ok else 'FAIL'} (diff {diff:.3f} "
                     f"<= {LFW_POINTS}) |")
    lines.append("")


def speed(out, checks, lines):
    rows = []
    for dt in ["f16", "f32"]:
        for r in load(out, f"bench-cuda-{dt}.json") or []:
            rows.append((f"MFN {dt}", r["batch"], r["median_ms"], r["faces_per_s"]))
    for r in load(out, "torch.json") or []:
        rows.append((r["engine"], r["batch"], r["median_ms"], r["faces_per_s"]))
    lines.append("## Inference speed, same GPU (median ms per batch, input on the GPU)\n")
    if not rows:
        lines.append("no speed results\n")
        return
    engines = list(dict.fromkeys(r[0] for r in rows))
    batches = sorted({r[1] for r in rows})
    lines.append("| engine | " + " | ".join(f"batch {b}: ms / faces/s" for b in batches) + " |")
    lines.append("|---|" + "---|" * len(batches))
    table = {(r[0], r[1]): r for r in rows}
    for e in engines:
        cells = []
        for b in batches:
            r = table.get((e, b))
            cells.append(f"{r[2]:.3f} / {r[3]:,.0f}" if r else "-")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines.append("")
    mfn = {b: table.get(("MFN f16", b)) for b in batches}
    torch = [r for r in rows if r[0].startswith("torch-compile-fp16")]
    best_torch_1024 = max((r[3] for r in torch if r[1] == 1024), default=None)
    best_torch_1 = min((r[2] for r in torch if r[1] == 1), default=None)
    summary = {
        "mfn_f16_faces_per_s_1024": mfn.get(1024)[3] if mfn.get(1024) else None,
        "mfn_f16_latency_ms_1": mfn.get(1)[2] if mfn.get(1) else None,
        "torch_compile_fp16_faces_per_s_1024": best_torch_1024,
        "torch_compile_fp16_latency_ms_1": best_torch_1,
        "reference_h200": REFERENCE,
    }
    checks["speed"] = {"ok": None, **summary}
    lines.append("MFN f16 at batch 1024: {} faces/s (torch.compile fp16 here: {}; reference on an H200: "
                 "{:,} faces/s). Batch 1: {} ms (torch.compile fp16 here: {}; reference {} ms).\n".format(
                     f"{summary['mfn_f16_faces_per_s_1024']:,.0f}" if summary["mfn_f16_faces_per_s_1024"] else "-",
                     f"{best_torch_1024:,.0f}" if best_torch_1024 else "-",
                     REFERENCE["faces_per_s_1024"],
                     f"{summary['mfn_f16_latency_ms_1']:.3f}" if summary["mfn_f16_latency_ms_1"] else "-",
                     f"{best_torch_1:.3f} ms" if best_torch_1 else "-",
                     REFERENCE["latency_ms_1"]))


def training(out, checks, lines):
    d = load(out, "depthwise.json")
    lines.append("## Training depthwise conv, forward + backward: native CUDA vs candle's grouped conv\n")
    if d is None:
        checks["depthwise"] = {"ok": False, "why": "missing output"}
        lines.append("missing (see run.log)\n")
        return
    lines.append(f"batch {d['batch']}\n")
    lines.append("| layer | input | native ms | candle ms | speedup | max rel diff vs candle (y, dx, dw) | vs CPU |")
    lines.append("|---|---|---|---|---|---|---|")
    worst = 0.0
    for r in d["layers"]:
        diffs = r["max_rel_diff"]
        worst = max([worst] + [x for v in diffs.values() for x in v])
        cand = r["candle_ms"]
        fmt = lambda k: " ".join(f"{x:.1e}" for x in diffs[k]) if k in diffs else "-"
        lines.append(f"| {r['layer']} | {r['input']} | {r['native_ms']:.3f} | "
                     f"{cand:.3f} | {cand / r['native_ms']:.1f}x | {fmt('candle')} | {fmt('cpu')} |"
                     if cand is not None else
                     f"| {r['layer']} | {r['input']} | {r['native_ms']:.3f} | - | - | - | {fmt('cpu')} |")
    g = d.get("graph")
    ok = worst <= 1e-4 and g is not None and g["worst_rel_diff"] <= 1e-3
    checks["depthwise"] = {"ok": worst <= 1e-4, "worst_rel_diff": worst}
    if g is not None:
        checks["train-step"] = {"ok": g["worst_rel_diff"] <= 1e-3, **g}
        lines.append("")
        lines.append(f"Training step of the paper network, {g['check_images']} images, GPU against CPU: "
                     f"loss {g['loss_gpu']:.6f} vs {g['loss_cpu']:.6f}; {g['gradients']} gradients, worst "
                     f"{g['worst_gradient']} at {g['worst_rel_diff']:.1e} of its scale. One step at batch "
                     f"{g['step_batch']}: {g['step_ms']:.2f} ms ({g['step_batch'] * 1e3 / g['step_ms']:.0f} images/s).")
    else:
        checks["train-step"] = {"ok": False, "why": "missing"}
    lines.append(f"\nresult: {'PASS' if ok else 'FAIL'}\n")


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "out/gpu"
    checks, lines = {}, ["# MFN on CUDA: results of bench/gpu/run.sh\n"]
    machine = os.path.join(out, "machine.txt")
    if os.path.exists(machine):
        with open(machine) as f:
            gpu_lines = [l for l in f.read().splitlines() if l.startswith("torch ")]
        lines.extend(gpu_lines + [""])
    for part in (parity, lfw, speed, training):
        try:
            part(out, checks, lines)
        except Exception as e:  # a malformed file must not hide the other results
            checks[part.__name__] = {"ok": False, "why": f"{type(e).__name__}: {e}"}
            lines.append(f"{part.__name__}: could not read the results: {e}\n")
    steps = os.path.join(out, "steps.tsv")
    if os.path.exists(steps):
        lines.append("## Steps\n\n| step | exit | seconds |\n|---|---|---|")
        with open(steps) as f:
            for row in f.read().splitlines():
                lines.append("| " + " | ".join(row.split("\t")) + " |")
        lines.append("")
    failed = [k for k, v in checks.items() if v.get("ok") is False]
    lines.append("**All checks passed.**" if not failed else f"**Failed or missing: {', '.join(failed)}**")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"checks": checks, "failed": failed}, f, indent=2)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
