#!/usr/bin/env bash
# The README's training run, end to end and offline: a shapeworld of COUNT samples served on
# loopback -> `recap run` (captioner, two teachers, 10 views per image) -> `recap train` of three
# tiny students: from scratch (STEPS steps), from scratch with pure distillation at teacher scale
# 20 (STEPS steps), and started from teacher clip-a's weights (model.init_from, STEPS/3 steps)
# -> `recap eval` of the students and both teachers on a held-out world of another seed. About a
# quarter of an hour on 2 cores with the defaults.
# Usage: bash scripts/train-run.sh [WORKDIR] [COUNT] [STEPS]   (RECAP_BIN to use another build)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/readme}
count=${2:-4000}
steps=${3:-3000}
bash scripts/fetch-ort.sh >/dev/null
if [ -z "${RECAP_BIN:-}" ]; then
  cargo build --locked --release --no-default-features --bin recap
  RECAP_BIN=target/release/recap
fi
recap=$RECAP_BIN
mkdir -p "$work"
log() { echo "[$(date +%H:%M:%S)] $*"; }
[ -f "$work/world/eval.parquet" ] || "$recap" synth --out "$work/world" --count "$count" --seed 1 --min-size 160x120 --max-size 640x480 --png-fraction 0.1
[ -f "$work/heldout/eval.parquet" ] || "$recap" synth --out "$work/heldout" --count 1000 --seed 2 --min-size 160x120 --max-size 640x480
port=${PORT:-8765}
"$recap" synth serve "$work/world" --port "$port" > "$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q serving "$work/serve.log" 2>/dev/null && break; sleep 0.1; done
log "recap run pipelines/reinforce.yaml"
/usr/bin/time -v "$recap" run pipelines/reinforce.yaml --no-progress \
  --set input.path="$work/world/urls.parquet" --set output.path="$work/shards" 2> "$work/run.time" | tail -n 12
kill $server 2>/dev/null || true
log "recap train pipelines/train-tiny.yaml ($steps steps, from scratch)"
"$recap" train pipelines/train-tiny.yaml --no-progress --resume \
  --set data.shards="$work/shards" --set output.dir="$work/student" --set train.steps="$steps" \
  --set data.eval_set="$work/heldout/eval.parquet" --set train.eval_every=250
log "recap train pipelines/train-tiny.yaml ($steps steps, from scratch, pure distillation at teacher scale 20)"
"$recap" train pipelines/train-tiny.yaml --no-progress --resume \
  --set data.shards="$work/shards" --set output.dir="$work/student-distill" --set train.steps="$steps" \
  --set loss.contrastive_weight=0 --set "loss.teacher_scales=[20]" \
  --set data.eval_set="$work/heldout/eval.parquet" --set train.eval_every=500
log "recap train pipelines/train-tiny.yaml ($((steps / 3)) steps, from models/shapeworld-clip-a)"
"$recap" train pipelines/train-tiny.yaml --no-progress --resume \
  --set data.shards="$work/shards" --set output.dir="$work/student-init" --set train.steps="$((steps / 3))" \
  --set model.init_from=models/shapeworld-clip-a --set data.eval_set="$work/heldout/eval.parquet" --set train.eval_every=250
for m in "$work/student" "$work/student-distill" "$work/student-init" models/shapeworld-clip-a models/shapeworld-clip-b; do
  log "recap eval --model $m"
  "$recap" eval --model "$m" --data "$work/heldout/eval.parquet"
done
