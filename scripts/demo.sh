#!/usr/bin/env bash
# The demo, on a fresh machine: fetch the ONNX Runtime library, then `recap demo` (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-ort.sh
cargo run --locked -- demo "$@"
