#!/usr/bin/env bash
# Peak RSS against input size: the same small served world (1000 images, 64-160 px), URL lists of
# 3k, 100k and 1M rows cycling over it (each row its own id), one download-only pipeline. A run's
# memory should not grow with the number of rows (target: 1M rows <= 1.1x the 3k figure).
# Usage: bash benches/memory_vs_rows.sh   (SIZES="3000 100000 1000000" RECAP_BIN=... BENCH_DIR=...)
# Compare two builds with both binaries copied just before (a freshly written binary maps ~3 MB more of its file).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${BENCH_DIR:-target/bench-memory}
SIZES=${SIZES:-"3000 100000 1000000"}
port=${PORT:-18090}
PY=${RECAP_PYTHON:-.venv/bin/python}
if [ -n "${RECAP_BIN:-}" ]; then recap=$RECAP_BIN; else
  cargo build --release --no-default-features --bin recap; recap=target/release/recap; fi
mkdir -p "$work"
[ -f "$work/world/world.json" ] || "$recap" synth --out "$work/world" --count 1000 --seed 5 --min-size 64x48 --max-size 160x120 --png-fraction 0 > /dev/null
"$recap" synth serve "$work/world" --port "$port" > "$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q serving "$work/serve.log" 2>/dev/null && break; sleep 0.1; done
for n in $SIZES; do
  "$PY" - "$work/world/urls.parquet" "$work/urls-$n.parquet" "$n" <<'PY'
import sys
import pyarrow as pa, pyarrow.parquet as pq
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = pq.read_table(src, columns=["url", "caption"])
reps = -(-n // t.num_rows)
urls = (t.column("url").to_pylist() * reps)[:n]
caps = (t.column("caption").to_pylist() * reps)[:n]
pq.write_table(pa.table({"url": urls, "caption": caps, "id": pa.array(range(n), pa.int64())}), dst, row_group_size=int(__import__("os").environ.get("ROW_GROUP", "100000")))
PY
  cat > "$work/p-$n.yaml" <<YAML
input:
  path: $work/urls-$n.parquet
  passthrough: [id]
  rows_per_shard: 1000
download:
  concurrency: 64
  per_host: 64
  rate_per_host: null
  allow_private_networks: true
image:
  size: 64
  min_size: 1
output:
  path: $work/out-$n
YAML
  rm -rf "$work/out-$n"
  r=$("$PY" benches/peak_rss.py "rows=$n" -- "$recap" run "$work/p-$n.yaml" --no-progress 2>&1 | tail -1)
  echo "$r"
  rm -rf "$work/out-$n"
done
