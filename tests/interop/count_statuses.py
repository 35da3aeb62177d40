"""Open recap shards with pyarrow and with DuckDB; print rows per status from each, as JSON.

Usage: count_statuses.py SHARD_DIR
"""
import glob
import json
import os
import sys

import duckdb
import pyarrow.dataset as ds
import pyarrow.parquet as pq

shard_dir = sys.argv[1]
files = sorted(glob.glob(os.path.join(shard_dir, "*.parquet")))

table = ds.dataset(files, format="parquet").to_table(columns=["status", "image", "key"])
by_pyarrow = {}
for s in table.column("status").to_pylist():
    by_pyarrow[s] = by_pyarrow.get(s, 0) + 1
# The image struct must be readable: bytes present exactly for ok rows.
images = table.column("image").to_pylist()
with_bytes = sum(1 for im in images if im is not None and im["bytes"])

con = duckdb.connect()
rows = con.execute(
    "SELECT status, count(*) FROM read_parquet(?) GROUP BY status", [files]
).fetchall()
by_duckdb = {s: n for s, n in rows}
phash_ok = con.execute(
    "SELECT count(*) FROM read_parquet(?) WHERE status = 'ok' AND phash IS NOT NULL AND length(sha256) = 64", [files]
).fetchone()[0]

# Codecs per column chunk, as the file records them: image bytes stored as they are, the rest zstd.
codecs = {}
for f in files:
    md = pq.read_metadata(f)
    for g in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(g).column(c)
            kind = "image.bytes" if col.path_in_schema == "image.bytes" else "other"
            codecs.setdefault(kind, set()).add(col.compression)

print(json.dumps({"pyarrow": by_pyarrow, "duckdb": by_duckdb, "pyarrow_images_with_bytes": with_bytes,
                  "duckdb_ok_with_hashes": phash_ok, "codecs": {k: sorted(v) for k, v in codecs.items()}}))
