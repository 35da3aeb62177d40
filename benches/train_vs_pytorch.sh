#!/usr/bin/env bash
# One training step, recap (candle, release) vs the same architecture in PyTorch on CPU (and one
# dense finetuning step of each head and mode): same
# presets, batch, threads, loss (contrastive + distillation), clipping and AdamW, fp32. Rounds
# alternate recap and Python (RUNS, default 3); prints the median seconds per step of each and
# the ratio recap / PyTorch (target: <= 1.5). Then the data path alone (shards -> replayed,
# tokenised batches) against what the step consumes.
# Usage: bash benches/train_vs_pytorch.sh [threads] [batch] [shards-dir]   (needs torch + transformers: FIXTURES_VENV)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
batch=${2:-64}
shards=${3:-recap-demo/shards}
venv=$(bash scripts/fixtures-env.sh)
runs=${RUNS:-3}
cargo bench --no-default-features --bench train --no-run 2>/dev/null
rs="" py=""
for _ in $(seq "$runs"); do
  for preset in tiny small; do
    rs+=$(cargo bench --no-default-features --bench train -- step "$preset" "$threads" "$batch" 2>/dev/null | grep '^{')$'\n'
    py+=$("$venv/bin/python" benches/train_python.py "$preset" "$threads" "$batch" 2>/dev/null | grep '^{')$'\n'
  done
  # Dense finetuning steps (segmentation head on clip-a's tiny shapes), batch 16.
  for head in linear decoder; do
    for mode in frozen full; do
      rs+=$(cargo bench --no-default-features --bench train -- finetune "$head" "$mode" "$threads" 16 2>/dev/null | grep '^{')$'\n'
      py+=$("$venv/bin/python" benches/finetune_python.py "$head" "$mode" "$threads" 16 2>/dev/null | grep '^{')$'\n'
    done
  done
done
python3 - "$rs" "$py" "$runs" <<'PY'
import json, statistics, sys
def load(text):
    out = {}
    for line in filter(None, text.splitlines()):
        j = json.loads(line)
        out.setdefault(j["bench"], []).append(j["seconds_per_step"])
    return out
rs, py, runs = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
print(f"median of {runs} alternating rounds  {'recap s/step':>12} {'torch s/step':>12} {'ratio':>6}  ratio per round")
for k, r in rs.items():
    p = py[k]
    ratios = [a / b for a, b in zip(r, p)]
    print(f"{k:<33} {statistics.median(r):>12.4f} {statistics.median(p):>12.4f} {statistics.median(r) / statistics.median(p):>6.2f}  {min(ratios):.2f}-{max(ratios):.2f}")
PY
if [ -d "$shards" ]; then
  for w in 1 2; do
    cargo bench --no-default-features --bench train -- data "$shards" "$w" "$batch" 2>/dev/null | grep '^{'
  done
fi
