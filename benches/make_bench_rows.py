"""Synthetic shards for the SQL and dedup benches (outside CI).

query: N rows (default 100k) in the reinforced shard layout recap writes: 90% ok, the rest
    failures and filtered rows with reasons; 50 hosts; alt-text and 3 synthetic captions; a 1.5 KB
    image blob; 5 view and 4 text embeddings of 112 float16 values; CLIP scores; phash with
    planted near copies. Row groups of 512 rows and zstd, as recap writes them.
dedup: N rows (default 1M) of key, status, reason, sha256 and phash only (what dedup reads), with 2%
    exact and 2% near copies planted.

Usage: make_bench_rows.py query|dedup OUT_DIR [N]
"""
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

kind, out = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else (100_000 if kind == "query" else 1_000_000)
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(7)
per_file = 5000 if kind == "query" else 10_000
words = np.array("red green blue yellow purple orange white black circle square triangle diamond large small medium at the center left right top bottom on a background".split())
statuses = np.array(["ok"] * 90 + ["filtered"] * 5 + ["http_error"] * 2 + ["timeout", "decode_failed", "download_failed"])


def phashes(m):
    h = rng.integers(0, 2**63, size=m, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, size=m, dtype=np.uint64)
    # near copies: 2% of rows copy an earlier hash with 0-3 bits flipped
    idx = rng.choice(m, size=m // 50, replace=False)
    for i in idx:
        j = rng.integers(0, m)
        flips = rng.integers(0, 4)
        v = int(h[j])
        for _ in range(flips):
            v ^= 1 << int(rng.integers(0, 64))
        h[i] = v
    return h


for f in range((n + per_file - 1) // per_file):
    m = min(per_file, n - f * per_file)
    keys = [f"{f:05d}{r:05d}" for r in range(m)]
    st = rng.choice(statuses, size=m)
    sha = [os.urandom(32).hex() for _ in range(m)]
    for i in rng.choice(m, size=m // 50, replace=False):
        sha[i] = sha[rng.integers(0, m)]
    cols = {"key": keys, "status": st, "sha256": sha, "phash": pa.array(phashes(m), pa.uint64()),
            "reason": pa.array([None if s == "ok" else f"{s}: example" for s in st], pa.string())}
    if kind == "query":
        hosts = rng.integers(0, 50, size=m)
        cols["url"] = [f"https://img{h}.example.com/{f}/{r}.jpg" for r, h in enumerate(hosts)]
        cols["caption"] = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(m)]
        cols["width"] = pa.array(rng.integers(200, 1600, size=m), pa.uint32())
        cols["height"] = pa.array(rng.integers(150, 1200, size=m), pa.uint32())
        blobs = [os.urandom(1500) if s == "ok" else None for s in st]
        cols["image"] = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array([f"{k}.jpg" for k in keys])], names=["bytes", "path"])
        cols["synthetic_captions"] = [[" ".join(rng.choice(words, size=8)) for _ in range(3)] for _ in range(m)]

        def matrix(rows):
            v = rng.standard_normal((m, rows, 112)).astype(np.float32)
            v /= np.linalg.norm(v, axis=2, keepdims=True)
            flat = pa.array(v.astype(np.float16).ravel(), pa.float16())
            inner = pa.FixedSizeListArray.from_arrays(flat, 112)
            return pa.ListArray.from_arrays(pa.array(np.arange(0, m * rows + 1, rows, dtype=np.int32)), inner)

        cols["image_embeddings"] = matrix(5)
        cols["text_embeddings"] = matrix(4)
        cols["clip_score"] = pa.array(rng.normal(0.3, 0.1, size=m).astype(np.float32))
        cols["synthetic_clip_scores"] = pa.array([list(rng.normal(0.35, 0.08, size=3).astype(np.float32)) for _ in range(m)], pa.list_(pa.float32()))
    t = pa.table(cols)
    pq.write_table(t, os.path.join(out, f"{f:05d}.parquet"), row_group_size=512, compression="zstd",
                   column_encoding=None, use_dictionary=True)
print(f"wrote {n} rows to {out}")
