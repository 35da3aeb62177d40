#!/usr/bin/env bash
# recap vs img2dataset, one after the other, on the same shapeworld served over loopback:
# 3000 images (200x150 to 1600x1200, JPEG + 10% PNG, 10 corrupt, 10 404s), 256px center crops,
# Parquet output, 500 rows per shard, the same parallelism (img2dataset: 2 processes x 64 threads).
# Prints wall time, images/s and peak RSS (whole process tree) of each and the ratios; recap runs
# twice: with its default resampler (`auto`: area average when shrinking, Lanczos3 when enlarging,
# img2dataset's own choice), and with Lanczos3 throughout.
# WEB=photo: the photo-like web instead (`recap synth --photo`: uneven light, texture and sensor
# noise, ~1.9 bits/pixel JPEGs as web photos are, 640x480 to 2048x1536, no PNGs).
# Usage: bash benches/vs_img2dataset.sh    (N=3000 BENCH_DIR=bench-out PORT=18080 WEB=shapes|photo;
#        RECAP_BIN=path/to/recap to use a release binary you already built;
#        RECAP_ARGS="--set key=value" to pass options to both recap runs)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-3000}
WEB=${WEB:-shapes}
work=${BENCH_DIR:-bench-out}
port=${PORT:-18080}
mkdir -p "$work"

if [ ! -x .venv-bench/bin/img2dataset ]; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q --disable-pip-version-check img2dataset
fi
bash scripts/native-env.sh    # nasm: libjpeg-turbo with SIMD
if [ -n "${RECAP_BIN:-}" ]; then
  recap=$RECAP_BIN
else
  cargo build --release --no-default-features --bin recap
  recap=target/release/recap
fi
"$recap" --version | tail -1

case "$WEB" in
  shapes) synth_args=(--min-size 200x150 --max-size 1600x1200 --png-fraction 0.1 --corrupt 10) ;;
  photo) synth_args=(--photo --min-size 640x480 --max-size 2048x1536 --png-fraction 0 --corrupt 10) ;;
  *) echo "WEB must be shapes or photo" >&2; exit 2 ;;
esac

if [ ! -f "$work/world/world.json" ] || ! grep -q "\"count\": $N," "$work/world/world.json" \
   || ! grep -q "\"photo\": $([ "$WEB" = photo ] && echo true || echo false)" "$work/world/world.json"; then
  rm -rf "$work/world"
  "$recap" synth --out "$work/world" --count "$N" --seed 1 "${synth_args[@]}"
fi

"$recap" synth serve "$work/world" --port "$port" --faults 404=10 > "$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q serving "$work/serve.log" 2>/dev/null && break; sleep 0.1; done
grep -q serving "$work/serve.log" || { echo "server did not start"; cat "$work/serve.log"; exit 1; }

cat > "$work/recap.yaml" <<YAML
input:
  path: $work/world/urls.parquet
  rows_per_shard: 500
download:
  concurrency: 128          # img2dataset: 2 processes x 64 threads
  per_host: 128
  rate_per_host: null      # img2dataset has no per-host rate limit
  timeout: 10s
  retries: 0                # img2dataset's default
  allow_private_networks: true
image:
  size: 256
  resize: center_crop
  format: jpeg
  quality: 95               # img2dataset's default encode_quality
  min_size: 0
  max_aspect_ratio: 1000
output:
  path: $work/recap-out
YAML

rm -rf "$work/i2d-out" "$work/recap-out" "$work/recap-lanczos-out"
# albumentations (an img2dataset dependency) asks PyPI for a newer version at import, in every
# process; that network round trip is not img2dataset's work, so it is switched off.
export NO_ALBUMENTATIONS_UPDATE=1
i2d=$(python3 benches/peak_rss.py img2dataset -- .venv-bench/bin/img2dataset \
  --url_list "$work/world/urls.parquet" --input_format parquet --url_col url --caption_col caption \
  --output_folder "$work/i2d-out" --processes_count 2 --thread_count 64 --image_size 256 \
  --resize_mode center_crop --output_format parquet --number_sample_per_shard 500 --enable_wandb False)
# recap twice: with its default resampler (auto: the area average that img2dataset's OpenCV
# INTER_AREA applies when it shrinks an image), and with Lanczos3 throughout (slower, sharper).
rc=$(python3 benches/peak_rss.py recap -- "$recap" run "$work/recap.yaml" --no-progress ${RECAP_ARGS:-})
rclz=$(python3 benches/peak_rss.py recap-lanczos3 -- "$recap" run "$work/recap.yaml" --no-progress \
  --set output.path="$work/recap-lanczos-out" --set image.filter=lanczos3 ${RECAP_ARGS:-})

python3 - "$work" "$i2d" "$rc" "$rclz" <<'PY'
import glob, json, sys
work, i2d, rc, rclz = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
i2d["ok"] = sum(json.load(open(f)).get("successes", 0) for f in glob.glob(f"{work}/i2d-out/*_stats.json"))
for r, out in ((rc, "recap-out"), (rclz, "recap-lanczos-out")):
    r["ok"] = sum(json.load(open(f))["status"].get("ok", 0) for f in glob.glob(f"{work}/{out}/*.stats.json"))
runs = (i2d, rc, rclz)
for r in runs:
    r["images_per_s"] = round(r["ok"] / r["wall_s"], 1)
print(f"{'tool':<15} {'rc':>3} {'ok images':>10} {'wall s':>8} {'images/s':>9} {'peak RSS MB':>12}")
for r in runs:
    print(f"{r['label']:<15} {r['rc']:>3} {r['ok']:>10} {r['wall_s']:>8} {r['images_per_s']:>9} {r['peak_rss_mb']:>12}")
for r in (rc, rclz):
    print(f"{r['label']} / img2dataset: {r['images_per_s'] / max(i2d['images_per_s'], 1e-9):.2f}x images/s, "
          f"{r['peak_rss_mb'] / max(i2d['peak_rss_mb'], 1e-9):.2f}x peak RSS")
PY
