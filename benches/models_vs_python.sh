#!/usr/bin/env bash
# recap's model stages vs onnxruntime in Python, on the same fixture ONNX files, batches and
# thread count (2): captions/s (greedy; top-p sampling with 5 captions per image) and CLIP
# embeddings/s (images model-only and with preprocessing; texts from strings, tokenization
# included on both sides). Each figure is at least 2 s of calls; this VM varies by ~20% run to run.
# Prints both and the ratio recap / Python.
# Usage: bash benches/models_vs_python.sh [threads]   (needs tools/fixtures' venv: FIXTURES_VENV)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
bash scripts/fetch-ort.sh >/dev/null
venv=${FIXTURES_VENV:-.venv-fixtures}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check torch==2.15.0
  "$venv/bin/pip" install -q --disable-pip-version-check -r tools/fixtures/requirements.txt
fi
rs=$(cargo bench --no-default-features --bench models -- cpu "$threads" 2>/dev/null | grep '^{')
py=$("$venv/bin/python" benches/models_python.py "$threads" 2>/dev/null | grep '^{')
python3 - "$rs" "$py" <<'PY'
import json, sys
rs = {j["bench"]: j for j in map(json.loads, sys.argv[1].splitlines())}
py = {j["bench"]: j for j in map(json.loads, sys.argv[2].splitlines())}
print(f"{'bench':<42} {'recap /s':>10} {'python /s':>10} {'ratio':>7}")
for k, r in rs.items():
    key = "captions_per_s" if "captions_per_s" in r else "per_s"
    p = py.get(k, {}).get(key)
    print(f"{k:<42} {r[key]:>10} {p if p is not None else '-':>10} {(r[key] / p if p else float('nan')):>7.2f}")
PY
