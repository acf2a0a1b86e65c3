#!/usr/bin/env bash
# MFN's CPU engine (f32 and int8) against ONNX Runtime (fp32 and its own INT8) on the same
# weights, in alternating rounds on one machine: each round times MFN f32, MFN int8, ORT
# fp32 and ORT INT8 back to back, and the summary gives each round's ratios and their median.
#
# usage: bench/cpu_vs_ort.sh [ROUNDS] [OUT_DIR]
#   needs: target/release/xtask (cargo build --release -p xtask), the peer venv of
#   ../shared/tools/peer-bench/run with onnx and sympy (for bench/ort_int8.py), $MFN_ASSETS.
# The ORT INT8 models are made once with bench/ort_int8.py (the same 512 calibration faces
# as MFN's int8 path) into OUT_DIR.
set -euo pipefail
rounds=${1:-3}
out=${2:-/tmp/mfn-cpu-vs-ort}
here=$(cd "$(dirname "$0")/.." && pwd)
assets=${MFN_ASSETS:?set MFN_ASSETS to the assets folder}
peer="$here/../shared/tools/peer-bench/run"
venv=${PEER_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mfn-peer-bench-venv}
xtask="$here/target/release/xtask"
mkdir -p "$out"
calib="$assets/lfw/aligned-112x112"
declare -A mfn_model=(
  [w600k_mbf]="$assets/models/w600k-mbf/w600k_mbf.onnx"
  [y1]="$assets/models/mobilefacenet-y1/model-symbol.json"
)
declare -A ort_model=(
  [w600k_mbf]="$assets/models/w600k-mbf/w600k_mbf.onnx"
  [y1]="$assets/models/mobilefacenet-y1/mobilefacenet-y1.onnx"
)
for m in w600k_mbf y1; do
  if [[ ! -f $out/$m.int8.onnx ]]; then
    "$venv/bin/python" "$here/bench/ort_int8.py" quantize "${ort_model[$m]}" \
      --calib "$calib" --images 512 --out "$out/$m.int8.onnx" >&2
  fi
done
for r in $(seq 1 "$rounds"); do
  for m in w600k_mbf y1; do
    echo "round $r $m: load $(cut -d' ' -f1 /proc/loadavg)" >&2
    for p in f32 int8; do
      "$xtask" bench --model "${mfn_model[$m]}" --threads 1,2 --batches 1,32 --no-gate \
        --no-layers --rounds 1 --runs 30 --precision $p --calib "$calib" \
        --json "$out/r$r-$m-mfn-$p.json" >&2
    done
    "$peer" "${ort_model[$m]}" --threads 1,2 --batches 1,32 --runs 30 \
      --json "$out/r$r-$m-ort-fp32.json" >&2
    "$peer" "$out/$m.int8.onnx" --threads 1,2 --batches 1,32 --runs 30 \
      --json "$out/r$r-$m-ort-int8.json" >&2
  done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def rows(path):
    return {(r["threads"], r["batch"]): r["median_ms"] for r in json.load(open(path))}
for m in ["w600k_mbf", "y1"]:
    print(f"\n{m}: median ms per batch per round (MFN f32 / MFN int8 / ORT fp32 / ORT INT8), ratios")
    for key in [(1, 1), (1, 32), (2, 1), (2, 32)]:
        ratios = {"f32/ort": [], "int8/ort-int8": [], "f32/int8": [], "ort/ort-int8": []}
        for r in range(1, rounds + 1):
            a = rows(f"{out}/r{r}-{m}-mfn-f32.json")[key]
            b = rows(f"{out}/r{r}-{m}-mfn-int8.json")[key]
            c = rows(f"{out}/r{r}-{m}-ort-fp32.json")[key]
            d = rows(f"{out}/r{r}-{m}-ort-int8.json")[key]
            print(f"  {key[0]}t b{key[1]:<3} round {r}: {a:8.2f} {b:8.2f} {c:8.2f} {d:8.2f}")
            ratios["f32/ort"].append(a / c)
            ratios["int8/ort-int8"].append(b / d)
            ratios["f32/int8"].append(a / b)
            ratios["ort/ort-int8"].append(c / d)
        print("  " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in ratios.items()))
PY
