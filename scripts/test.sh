#!/usr/bin/env bash
# The test suite, as CI runs it (.ci/run calls this): sets up what the tests need, then cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/native-env.sh         # nasm, so libjpeg-turbo builds with SIMD (a loud warning if it cannot)
bash scripts/fetch-ort.sh          # ONNX Runtime shared library for the model stages
bash scripts/python-env.sh
bash scripts/browser-env.sh     # headless Chromium for the report test
bash scripts/azurite-env.sh     # Azurite (npm), the Azure Blob server the az:// tests write to
export RECAP_PYTHON="$PWD/.venv/bin/python"
cargo test --locked "$@"
# Distributed SQL (feature `cluster`, a separate build with Ballista): a scheduler and two
# executors on loopback give the local session's results.
cargo test --locked --features cluster --test cluster
