#!/usr/bin/env bash
# Runs the CUDA kernels of mfn-model (crates/mfn-model/src/cuda/kernels.cu) on the CPU: a
# C++20 emulation of the launch grid (blocks one after another, each block's threads as OS
# threads meeting at __syncthreads), against plain reference loops. It checks the kernels'
# indexing and reductions without a GPU; it does not check the PTX conversions (f16 goes
# through the compiler's _Float16 here) or anything about speed.
#
#   bash bench/gpu/host-check/run.sh        # needs g++ 12 or newer and python3
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 "$here/prep.py" "$here/../../../crates/mfn-model/src/cuda/kernels.cu" "$tmp/k.inc"
g++ -O1 -std=c++20 -pthread -I"$tmp" -I"$here" -o "$tmp/kernels_test" "$here/kernels_test.cpp"
"$tmp/kernels_test"
