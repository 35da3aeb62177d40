#!/usr/bin/env bash
# Run every fuzz target for SECONDS (default 1800) with a seed corpus, one after the other (or
# all at once with PARALLEL=1), and print a line per target: runs, coverage, crashes; each
# target's libFuzzer log in fuzz/logs/. Needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`). Crashes land in fuzz/artifacts/<target>/.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-1800}
mkdir -p corpus/decode corpus/pipeline_yaml corpus/url_list
cp ../tests/data/tiff/*.tif ../tests/data/tiff/base.png corpus/decode/ 2>/dev/null
for f in ../recap-demo/world/images/*; do [ -f "$f" ] && cp "$f" corpus/decode/; done 2>/dev/null
cp ../pipelines/*.yaml corpus/pipeline_yaml/
# URL lists: the first byte picks the kind (0 parquet, 1 csv, 2 tsv, 3 jsonl, 4 csv.gz).
printf '\x01url,caption\nhttp://a.example/1.jpg,a cat\n"http://b.example/2.jpg","a ""quoted"", caption"\n' > corpus/url_list/csv
printf '\x02url\tcaption\nhttp://a.example/1.jpg\ta cat\n' > corpus/url_list/tsv
printf '\x03{"url": "http://a.example/1.jpg", "caption": "a cat"}\n{"url": null}\n' > corpus/url_list/jsonl
{ printf '\x04'; printf 'url,caption\nhttp://a.example/1.jpg,x\n' | gzip -c; } > corpus/url_list/csvgz
for f in ../tests/data/*.parquet ../recap-demo/world/urls.parquet; do [ -f "$f" ] && { printf '\x00'; cat "$f"; } > "corpus/url_list/pq-$(basename "$f")"; done
one() {
  local t=$1 log="logs/$1.log"
  cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -timeout=20 > "$log" 2>&1
  local rc=$?
  local runs crashes cov
  runs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  crashes=$(ls "artifacts/$t" 2>/dev/null | wc -l)
  echo "{\"target\": \"$t\", \"seconds\": $secs, \"runs\": ${runs:-0}, \"coverage_edges\": ${cov:-0}, \"exit\": $rc, \"crash_files\": $crashes}"
  [ "$rc" = 0 ] || tail -40 "$log"
}
mkdir -p logs
cargo +nightly fuzz build || exit 1
# PARALLEL=1: the three targets at once (one process each) instead of one after the other.
if [ "${PARALLEL:-0}" = 1 ]; then
  for t in pipeline_yaml url_list decode; do one "$t" > "logs/$t.summary" & done
  wait
  cat logs/*.summary
else
  for t in pipeline_yaml url_list decode; do one "$t"; done
fi
