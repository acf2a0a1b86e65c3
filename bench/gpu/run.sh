#!/usr/bin/env bash
# The CUDA check, run on the GPU machine from the repository root with .gpu/ (made by
# bench/gpu/prepare.sh) beside it. Writes every result under $OUT (default out/gpu):
#
#   1. parity: raw y1 outputs of the golden PNGs on CUDA (f32, f16, bf16) against the CPU's
#   2. LFW fold 1 (.bin set, 600 pairs, flip test) on CUDA f32/f16 against the CPU
#   3. throughput and latency of MFN on CUDA, f32 and f16, batches 1, 256, 1024
#   4. the same network in PyTorch on the same GPU (eager fp32/fp16, torch.compile fp16)
#   5. the training depthwise conv on CUDA against candle's grouped conv, forward and
#      backward, and one training step of the whole network, GPU against CPU
#
# then summary.md / summary.json (bench/gpu/compare.py). Each step has its own time limit
# and a failing step does not stop the others; the exit status is 1 if any check failed.
# About 5-8 minutes on an H100/H200.
#
#   bash bench/gpu/run.sh
set -u
cd "$(dirname "$0")/../.."
G=${MFN_GPU_DIR:-.gpu}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

if [ ! -d "$G/bin" ] && [ -f "$G/bin.tar.gz" ]; then
  tar xzf "$G/bin.tar.gz" -C "$G"
fi
for f in "$G/bin/mfn-cli" "$G/bin/xtask" "$G/gpu-env"; do
  [ -e "$f" ] || { echo "missing $f: run bench/gpu/prepare.sh first and carry .gpu"; exit 2; }
done
case $G in /*) ;; *) G=$PWD/$G ;; esac
export MFN_ASSETS=$G/assets
ENV=(bash "$G/gpu-env")
CLI=("${ENV[@]}" "$G/bin/mfn-cli")
XT=("${ENV[@]}" "$G/bin/xtask")
PY=${PYTHON:-python3}
STATUS=$OUT/steps.tsv
: > "$STATUS"

# step NAME SECONDS CMD...: runs CMD under a time limit and records its exit status.
step() {
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name ($(date +%T), limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STATUS"
  # The summary so far, in case the whole run is cut short.
  $PY bench/gpu/compare.py "$OUT" > /dev/null 2>&1 || true
  return 0
}

echo "=== machine"
{
  nvidia-smi 2>&1 || true
  "${ENV[@]}" bash -c 'echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"'
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' 2>&1
  nproc
} | tee "$OUT/machine.txt"

# 1. Parity on the golden PNGs: raw outputs, CPU then CUDA in three precisions.
mapfile -t PNGS < <(ls "$G"/assets/golden/images/*.png)
step embed-cpu 90 "${CLI[@]}" embed --no-normalize --batch 32 --json "$OUT/embed-cpu.json" "${PNGS[@]}"
for dt in f32 f16 bf16; do
  step "embed-cuda-$dt" 90 "${CLI[@]}" embed --device cuda --dtype "$dt" --no-normalize --batch 32 \
    --json "$OUT/embed-cuda-$dt.json" "${PNGS[@]}"
done

# 2. LFW's first fold, flip test, insightface's 10 folds of its 600 pairs.
BIN=$G/assets/lfw/lfw-fold1.bin
step eval-cpu 150 "${CLI[@]}" eval --bin "$BIN" --json "$OUT/eval-cpu.json"
for dt in f32 f16; do
  step "eval-cuda-$dt" 120 "${CLI[@]}" eval --device cuda --dtype "$dt" --bin "$BIN" --batch 256 \
    --json "$OUT/eval-cuda-$dt.json"
done

# 3. MFN throughput and latency on the GPU.
for dt in f16 f32; do
  step "bench-cuda-$dt" 150 "${XT[@]}" bench --device cuda --dtype "$dt" --batches 1,256,1024 \
    --model "$MFN_ASSETS/models/mobilefacenet-y1/model-symbol.json" \
    --runs 20 --rounds 3 --no-gate --json "$OUT/bench-cuda-$dt.json"
done

# 4. PyTorch on the same GPU: eager fp32/fp16 and torch.compile fp16.
step torch 300 "${ENV[@]}" $PY bench/gpu/torch_infer.py --batches 1,256,1024 --runs 20 \
  --json "$OUT/torch.json"

# 5. Training ops: depthwise conv native vs candle's grouped conv, and a whole step.
step bench-depthwise 180 "${XT[@]}" bench-depthwise --device cuda --batch 128 --runs 5 \
  --json "$OUT/depthwise.json"

echo
$PY bench/gpu/compare.py "$OUT"
