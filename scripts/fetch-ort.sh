#!/usr/bin/env bash
# Fetch the ONNX Runtime shared library that recap loads at run time (the `ort` crate in
# load-dynamic mode). It ships inside the PyPI `onnxruntime` wheel; no other host is needed.
#
#   bash scripts/fetch-ort.sh            # -> .ort/libonnxruntime.so (a link to the versioned file)
#   ORT_VERSION=1.32.0 ORT_DIR=/opt/ort bash scripts/fetch-ort.sh
#
# Idempotent: does nothing when the library is already there. recap finds it through
# ORT_DYLIB_PATH, then .ort/ beside the current directory, then .ort/ beside the executable's repo.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${ORT_VERSION:-1.32.0}"
dir="${ORT_DIR:-.ort}"
lib="$dir/libonnxruntime.so.$version"
if [ -f "$lib" ] && [ -L "$dir/libonnxruntime.so" ]; then
  echo "onnxruntime $version: $lib"
  exit 0
fi
mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest "$tmp" "onnxruntime==$version"
wheel="$(ls "$tmp"/onnxruntime-*.whl | head -n1)"
python3 - "$wheel" "$lib" <<'PY'
import shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if "/capi/libonnxruntime.so" in n]
    if not names:
        sys.exit(f"{wheel}: no capi/libonnxruntime.so inside")
    with z.open(sorted(names)[-1]) as src, open(dest + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
mv "$lib.part" "$lib"
ln -sfn "libonnxruntime.so.$version" "$dir/libonnxruntime.so"
echo "onnxruntime $version: $lib"
