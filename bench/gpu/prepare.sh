#!/usr/bin/env bash
# Builds the CUDA binaries on a machine without a GPU and packs everything the GPU check
# (bench/gpu/run.sh) needs into .gpu/ (ignored by git): stripped `mfn-cli` and `xtask`,
# the `gpu-env` wrapper, and the assets it reads (y1's MXNet files, the golden PNGs and
# their reference embeddings, LFW's first fold as a .bin set). See bench/gpu/README.md.
#
#   bash bench/gpu/prepare.sh            # from the repository root
#
# Needs the CUDA toolkit from ../shared/tools/cuda/setup-toolkit (set up here if NVCC is
# unset). Builds into target/cuda (CARGO_TARGET_DIR overrides it) so the default target/
# is left alone; the first build takes ~15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SHARED=${MFN_SHARED:-$ROOT/../shared}
ASSETS=${MFN_ASSETS:-$SHARED/assets}
# Carried paths may total 64 MiB; keep a margin.
LIMIT_MIB=62

if [ -z "${NVCC:-}" ]; then
  cargo fetch
  eval "$("$SHARED/tools/cuda/setup-toolkit")"
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda}
start=$(date +%s)
cargo build --release --features mfn-cli/cuda,xtask/cuda -p mfn-cli -p xtask
echo "build: $(( $(date +%s) - start )) s"

G=$ROOT/.gpu
rm -rf "$G"
mkdir -p "$G/bin" "$G/assets/models/mobilefacenet-y1" "$G/assets/golden" "$G/assets/lfw"
for b in mfn-cli xtask; do
  cp "$CARGO_TARGET_DIR/release/$b" "$G/bin/$b"
  strip "$G/bin/$b"
done
cp "$SHARED/tools/cuda/gpu-env" "$G/gpu-env"
cp "$ASSETS/models/mobilefacenet-y1/model-symbol.json" "$ASSETS/models/mobilefacenet-y1/model-0000.params" \
   "$G/assets/models/mobilefacenet-y1/"
cp -r "$ASSETS/golden/images" "$G/assets/golden/"
cp "$ASSETS/golden/mobilefacenet-y1-embeddings.json" "$G/assets/golden/"
cp "$ASSETS/lfw/lfw-fold1.bin" "$G/assets/lfw/"

size_mib() { du -sm "$G" | cut -f1; }
if [ "$(size_mib)" -gt "$LIMIT_MIB" ]; then
  # The binaries are mostly candle's PTX, which compresses well.
  tar czf "$G/bin.tar.gz" -C "$G" bin
  rm -rf "$G/bin"
fi
echo "packed $(size_mib) MiB into .gpu/:"
(cd "$G" && find . -maxdepth 3 -type f -size +100k -exec ls -la {} \; | awk '{print "  " $5, $9}')
if [ "$(size_mib)" -gt "$LIMIT_MIB" ]; then
  echo "error: .gpu/ is $(size_mib) MiB, over the ${LIMIT_MIB} MiB that can be carried" >&2
  exit 1
fi
echo "next, on the GPU machine (carry [\".gpu\"]): bash bench/gpu/run.sh"
