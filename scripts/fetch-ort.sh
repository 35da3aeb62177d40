#!/usr/bin/env bash
# Fetch the ONNX Runtime shared library that recap loads at run time (the `ort` crate in
# load-dynamic mode). It ships inside the PyPI `onnxruntime` wheel; no other host is needed.
#
#   bash scripts/fetch-ort.sh            # -> .ort/libonnxruntime.so (a link to the versioned file)
#   ORT_VERSION=1.32.0 ORT_DIR=/opt/ort bash scripts/fetch-ort.sh
#   bash scripts/fetch-ort.sh --gpu      # -> .ort-gpu/: onnxruntime-gpu with its CUDA provider, and
#                                        #    cuda/ with the CUDA 13 runtime, cuBLAS, cuFFT, cuRAND,
#                                        #    nvJitLink, NVRTC and cuDNN 9 from NVIDIA's PyPI wheels
#
# Idempotent: does nothing when the library is already there. recap finds it through
# ORT_DYLIB_PATH, then .ort-gpu/ (when present) and .ort/ beside the current directory or the
# executable's checkout. With .ort-gpu/, `device: cuda` needs nothing else but the NVIDIA driver:
# recap loads the CUDA libraries from .ort-gpu/cuda/ itself (no LD_LIBRARY_PATH), and
# `recap validate` names what is missing on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--gpu" ]; then
  version="${ORT_GPU_VERSION:-1.31.1}"
  dir="${ORT_DIR:-.ort-gpu}"
  if [ -f "$dir/libonnxruntime.so.$version" ] && [ -f "$dir/libonnxruntime_providers_cuda.so" ] && [ -f "$dir/cuda/.complete" ]; then
    echo "onnxruntime-gpu $version: $dir ($(ls "$dir/cuda" | wc -l) CUDA libraries)"
    exit 0
  fi
  mkdir -p "$dir/cuda"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # The wheel and the NVIDIA wheels its [cuda,cudnn] extras name (about 1.5 GB).
  python3 -m pip download -q --disable-pip-version-check --only-binary=:all: --dest "$tmp" \
    "onnxruntime-gpu[cuda,cudnn]==$version"
  python3 - "$tmp" "$dir" "$version" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, dest, version = sys.argv[1:]
def extract(wheel, pick, to):
    n = 0
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if pick(name, base):
                with z.open(name) as src, open(os.path.join(to, base), "wb") as dst:
                    shutil.copyfileobj(src, dst)
                n += 1
    return n
ort = glob.glob(f"{tmp}/onnxruntime_gpu-*.whl")
if not ort:
    sys.exit("no onnxruntime_gpu wheel was downloaded")
n = extract(ort[0], lambda name, base: "/capi/" in name and base.startswith("libonnxruntime") and ".so" in base
            and "tensorrt" not in base, dest)
libs = 0
for wheel in glob.glob(f"{tmp}/nvidia_*.whl"):
    libs += extract(wheel, lambda name, base: name.startswith("nvidia/") and "/lib/" in name and ".so" in base, os.path.join(dest, "cuda"))
main = [f for f in os.listdir(dest) if f.startswith("libonnxruntime.so.")]
if not main or not os.path.exists(os.path.join(dest, "libonnxruntime_providers_cuda.so")):
    sys.exit(f"the onnxruntime-gpu wheel lacks libonnxruntime.so / libonnxruntime_providers_cuda.so: {os.listdir(dest)}")
versioned = sorted(main)[-1]
if versioned != f"libonnxruntime.so.{version}":
    os.replace(os.path.join(dest, versioned), os.path.join(dest, f"libonnxruntime.so.{version}"))
print(f"extracted {n} onnxruntime files and {libs} CUDA libraries")
PY
  ln -sfn "libonnxruntime.so.$version" "$dir/libonnxruntime.so"
  touch "$dir/cuda/.complete"
  echo "onnxruntime-gpu $version: $dir ($(du -sh "$dir" | cut -f1)); recap finds it by itself"
  exit 0
fi
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
