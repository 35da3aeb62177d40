#!/usr/bin/env bash
# Run every fuzz target for SECONDS (default 1800) with a seed corpus, one after the other, and
# print a line per target: runs, seconds, crashes. Needs the nightly toolchain and cargo-fuzz
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
for t in pipeline_yaml url_list decode; do
  log=$(mktemp)
  cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -timeout=20 > "$log" 2>&1
  rc=$?
  runs=$(grep -oE '#[0-9]+' "$log" | tail -1 | tr -d '#')
  crashes=$(ls "artifacts/$t" 2>/dev/null | wc -l)
  echo "{\"target\": \"$t\", \"seconds\": $secs, \"runs\": ${runs:-0}, \"exit\": $rc, \"crash_files\": $crashes}"
  [ "$rc" = 0 ] || tail -40 "$log"
done
