"""recap query vs DuckDB on the README's example queries over >= 100k synthetic rows (outside CI).

Both run as whole processes on the same Parquet files (farm-bench: A B A B ..., ratio per pair,
median quoted): `recap query --format csv -o /dev/null "SQL"` against the DuckDB CLI
(`duckdb -csv -c "SQL"`, the duckdb-cli wheel) with the same query in DuckDB's dialect. Output is
written to /dev/null by both. Prints a table of medians and ratios.

Usage: python benches/query_vs_duckdb.py [--rows 100000] [--recap target/release/recap] [--runs 5]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=100_000)
ap.add_argument("--recap", default="target/release/recap")
ap.add_argument("--runs", type=int, default=5)
ap.add_argument("--data", default="target/bench-query")
ap.add_argument("--only", default="")
args = ap.parse_args()

venv = os.path.dirname(sys.executable)
duckdb = os.path.join(venv, "duckdb")
if not os.path.exists(duckdb):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "duckdb-cli==1.5.6"], check=True)
data = os.path.abspath(f"{args.data}-{args.rows}")
if not os.path.isdir(data):
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "make_bench_rows.py"), "query", data, str(args.rows)], check=True)
files = f"'{data}/*.parquet'"

# One fixed 112-d vector for "most similar to a text" (embed_text needs the teachers; both engines get a literal).
vec = "[" + ", ".join(f"{((i * 37) % 23 - 11) / 40:.3f}" for i in range(112)) + "]"
Q = [
    ("alt vs best synthetic score",
     "SELECT status, count(*) AS n, avg(clip_score) AS alt, avg(array_max(synthetic_clip_scores)) AS best_syn FROM shards WHERE clip_score IS NOT NULL GROUP BY status ORDER BY status",
     f"SELECT status, count(*) AS n, avg(clip_score) AS alt, avg(list_max(synthetic_clip_scores)) AS best_syn FROM read_parquet({files}) WHERE clip_score IS NOT NULL GROUP BY status ORDER BY status"),
    ("top failing hosts",
     "SELECT regexp_replace(url, '^[a-z]+://([^/]+)/.*$', '\\1') AS host, status, count(*) AS n FROM shards WHERE status NOT IN ('ok', 'filtered') GROUP BY host, status ORDER BY n DESC, host, status LIMIT 20",
     f"SELECT regexp_replace(url, '^[a-z]+://([^/]+)/.*$', '\\1') AS host, status, count(*) AS n FROM read_parquet({files}) WHERE status NOT IN ('ok', 'filtered') GROUP BY host, status ORDER BY n DESC, host, status LIMIT 20"),
    ("20 worst-aligned alt-texts",
     "SELECT key, caption, synthetic_captions[1] AS synthetic, clip_score FROM shards WHERE status = 'ok' ORDER BY clip_score LIMIT 20",
     f"SELECT key, caption, synthetic_captions[1] AS synthetic, clip_score FROM read_parquet({files}) WHERE status = 'ok' ORDER BY clip_score LIMIT 20"),
    ("near-duplicate pairs by phash",
     "SELECT a.key, b.key AS other, hamming(a.phash, b.phash) AS bits FROM shards a JOIN shards b ON a.phash >> 48 = b.phash >> 48 AND a.key < b.key WHERE hamming(a.phash, b.phash) <= 6 ORDER BY bits, a.key, other",
     f"WITH s AS (SELECT key, phash FROM read_parquet({files})) SELECT a.key, b.key AS other, bit_count(xor(a.phash, b.phash)) AS bits FROM s a JOIN s b ON a.phash >> 48 = b.phash >> 48 AND a.key < b.key WHERE bit_count(xor(a.phash, b.phash)) <= 6 ORDER BY bits, a.key, other"),
    ("most similar to a vector",
     f"SELECT key, caption, cosine_sim(view(image_embeddings, 0), {vec}) AS sim FROM shards WHERE status = 'ok' ORDER BY sim DESC LIMIT 10",
     f"SELECT key, caption, list_cosine_similarity(image_embeddings[1], {vec}::FLOAT[]) AS sim FROM read_parquet({files}) WHERE status = 'ok' ORDER BY sim DESC LIMIT 10"),
]

farm = shutil.which("farm-bench")
print(f"{args.rows} rows in {data} ({sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data)) / 1e6:.0f} MB); recap {args.recap} vs duckdb-cli 1.5.6")
rows = []
for name, rq, dq in Q:
    if args.only and args.only not in name:
        continue
    # Same answers first (row counts), then time.
    r = subprocess.run([args.recap, "query", "--shards", data, "--format", "csv", rq], capture_output=True, text=True)
    d = subprocess.run([duckdb, "-csv", "-c", dq], capture_output=True, text=True)
    if r.returncode or d.returncode:
        print(name, "FAILED", r.stderr[-500:], d.stderr[-500:])
        continue
    nr, nd = len(r.stdout.strip().splitlines()), len(d.stdout.strip().splitlines())
    a = ["sh", "-c", f'exec {args.recap} query --shards {data} --format csv -o /dev/null "$0"', rq]
    b = f"sh -c 'exec {duckdb} -csv -c \"$0\" >/dev/null' \"{dq}\""
    out = subprocess.run([farm, "-n", str(args.runs), "--timeout", "1200", "--vs", b, "--"] + a, capture_output=True, text=True)
    text = out.stdout + out.stderr
    ratio = re.search(r"ratio[^\n]*?wall[^\n]*?median\s+([0-9.]+)", text) or re.search(r"A/B[^\n]*?([0-9.]+)", text)
    rows.append((name, nr, nd, text))
    print(f"\n=== {name}: recap {nr - 1} rows, duckdb {nd - 1} rows")
    print(text)
