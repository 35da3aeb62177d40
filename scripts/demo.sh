#!/usr/bin/env bash
# The demo, on a fresh machine: nasm (SIMD JPEG), the ONNX Runtime library, then `recap demo` (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/native-env.sh    # nasm for libjpeg-turbo's SIMD (warns loudly if it cannot install it)
bash scripts/fetch-ort.sh
cargo run --locked -- demo "$@"
