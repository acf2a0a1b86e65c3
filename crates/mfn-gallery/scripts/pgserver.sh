#!/usr/bin/env bash
# PostgreSQL 16 with pgvector 0.6 for mfn-gallery's PostgreSQL tests, from the PyPI wheel
# pgserver 0.1.4 (linux x86_64), unpacked into a cache folder; prints the folder holding
# `initdb` and `postgres`, for MFN_PG_BIN. Does nothing but print it when it is there.
#
#   crates/mfn-gallery/scripts/pgserver.sh [CACHE]
#
# CACHE defaults to ${XDG_CACHE_HOME:-~/.cache}/mfn/pgserver, where the tests also look
# when MFN_PG_BIN is unset.
set -euo pipefail

cache="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/mfn/pgserver}"
install="$cache/pgserver/pginstall"
wheel="pgserver-0.1.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
sha256="d595789b47624a3d963aa9aa6359da9be31beb7e61f1a45541953242068b8813"

if [[ -x "$install/bin/postgres" && -x "$install/bin/initdb" && -f "$install/lib/postgresql/vector.so" \
      && -d "$cache/pgserver.libs" ]]; then
  echo "$install/bin"
  exit 0
fi
if [[ "$(uname -sm)" != "Linux x86_64" ]]; then
  echo "pgserver.sh: the wheel is for Linux x86_64; elsewhere set MFN_PG_BIN to a PostgreSQL with pgvector" >&2
  exit 1
fi
mkdir -p "$cache"
if [[ ! -f "$cache/$wheel" ]]; then
  # The binaries do not depend on Python: the cp311 wheel serves every interpreter.
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version 3.11 --implementation cp \
    -d "$cache" pgserver==0.1.4 >&2
fi
if ! echo "$sha256  $cache/$wheel" | sha256sum --check --status; then
  echo "pgserver.sh: $cache/$wheel does not have the expected sha256; remove it and rerun" >&2
  exit 1
fi
rm -rf "$cache/pgserver.partial"
# Unpacks pginstall/ and the libraries its programs load from ../../../pgserver.libs (libpq),
# with the modes the wheel records (Python's zipfile drops them).
python3 - "$cache/$wheel" "$cache/pgserver.partial" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(("pgserver/pginstall/", "pgserver.libs/")):
            continue
        path = z.extract(info, dest)
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            os.chmod(path, mode)
PY
chmod -R a+rX "$cache/pgserver.partial"
rm -rf "$cache/pgserver" "$cache/pgserver.libs"
mv "$cache/pgserver.partial/pgserver.libs" "$cache/pgserver.libs"
mv "$cache/pgserver.partial/pgserver" "$cache/pgserver"
rmdir "$cache/pgserver.partial"
echo "$install/bin"
