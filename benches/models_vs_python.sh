#!/usr/bin/env bash
# recap's model stages vs onnxruntime in Python, on the same fixture ONNX files, batches and
# thread count (2): captions/s (greedy; top-p sampling with 5 captions per image) and CLIP
# embeddings/s (images model-only and with preprocessing; texts from strings, tokenization
# included on both sides). Each figure is at least 2 s of calls; this VM varies by ~20% run to run.
# Prints both and the ratio recap / Python (medians of RUNS alternating rounds, default 3).
# Usage: bash benches/models_vs_python.sh [threads]   (needs tools/fixtures' venv: FIXTURES_VENV)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
bash scripts/fetch-ort.sh >/dev/null
venv=$(bash scripts/fixtures-env.sh)
# RUNS rounds (default 3), recap and Python alternating, so a noisy spell of the VM hits both
# sides; each figure printed is the median of its rounds, with the range of the ratio.
runs=${RUNS:-3}
cargo bench --no-default-features --bench models --no-run 2>/dev/null
rs="" py=""
for _ in $(seq "$runs"); do
  rs+=$(cargo bench --no-default-features --bench models -- cpu "$threads" 2>/dev/null | grep '^{')$'\n'
  py+=$("$venv/bin/python" benches/models_python.py "$threads" 2>/dev/null | grep '^{')$'\n'
done
python3 - "$rs" "$py" "$runs" <<'PY'
import json, statistics, sys
def load(text):
    out = {}
    for line in filter(None, text.splitlines()):
        j = json.loads(line)
        out.setdefault(j["bench"], []).append(j.get("captions_per_s", j.get("per_s")))
    return out
rs, py, runs = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
print(f"median of {runs} alternating rounds, {'recap /s':>10} {'python /s':>10} {'ratio':>7}  ratio per round")
for k, r in rs.items():
    p = py.get(k, [])
    ratios = [a / b for a, b in zip(r, p) if b]
    mr, mp = statistics.median(r), (statistics.median(p) if p else None)
    rng = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"
    print(f"{k:<42} {mr:>10.1f} {mp if mp is not None else float('nan'):>10.1f} {(mr / mp if mp else float('nan')):>7.2f}  {rng}")
PY
