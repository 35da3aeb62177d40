#!/usr/bin/env bash
# The Python environment of the fixture models and of the PyTorch / onnxruntime-Python benches
# (FIXTURES_VENV, default .venv-fixtures): torch plus tools/fixtures/requirements.txt, pinned.
# Idempotent; prints the venv's path.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FIXTURES_VENV:-.venv-fixtures}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, transformers, onnxruntime' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check torch==2.15.0
  "$venv/bin/pip" install -q --disable-pip-version-check -r tools/fixtures/requirements.txt
fi
echo "$venv"
