#!/usr/bin/env bash
# Regenerates tests/data/shards: a small reinforced run (40 shapeworld rows in 2 shards, with
# corrupt image, HTTP faults and 10 planted duplicates) that the SQL golden tests, the UDF tests
# and the dedup tests read. Committed, so the tests need no model run; rerun this only when the
# shard layout changes (then review the snapshot diffs with `cargo insta review`).
# Usage: bash scripts/make-test-shards.sh   (from anywhere; needs a built target/debug/recap)
set -euo pipefail
cd "$(dirname "$0")/.."
R=target/debug/recap
[ -x "$R" ] || cargo build --bin recap
T=$(mktemp -d)
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$T"' EXIT
$R synth --out "$T/world" --count 40 --seed 11 --min-size 96x72 --max-size 240x180 --corrupt 2 --duplicates 10
PORT=18733
$R synth serve "$T/world" --port $PORT --faults 404=2,500=1 --seed 3 >"$T/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 50); do grep -q serving "$T/serve.log" && break; sleep 0.1; done
rm -rf tests/data/shards
# Relative model paths, so recap.teachers resolves from the repository root (embed_text).
$R run pipelines/demo.yaml --no-progress \
  --set input.path="$T/world/urls.parquet" --set input.rows_per_shard=20 \
  --set 'input.passthrough=[id, noise, fault, duplicate_of]' \
  --set output.path=tests/data/shards --set download.retries=0 --set filter.min_alt_score=0.2
rm -f tests/data/shards/*.done
ls -la tests/data/shards
