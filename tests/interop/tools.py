"""Open reinforced recap shards with the tools users already have (pyarrow, DuckDB, polars and
Hugging Face `datasets`) and report, per tool, rows per status, the first ok row's decoded image
(size and mean pixel value) and its first embedding values, as JSON. The Rust test checks that
the tools agree with each other and with recap.

Usage: tools.py SHARD_DIR
"""
import glob
import json
import os
import sys

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
from datasets import load_dataset
from PIL import Image
import io

files = sorted(glob.glob(os.path.join(sys.argv[1], "*.parquet")))
out = {"counts": {}, "image": {}, "embedding": {}}


def counts(values):
    c = {}
    for v in values:
        c[v] = c.get(v, 0) + 1
    return c


def image_summary(img):
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    return {"size": [img.width, img.height], "mean": float(a.mean())}


# pyarrow: the schema carries the metadata (huggingface features, recap.*).
table = pq.ParquetDataset(files).read()
schema_meta = table.schema.metadata or {}
out["pyarrow_metadata_keys"] = sorted(k.decode() for k in schema_meta)
out["counts"]["pyarrow"] = counts(table.column("status").to_pylist())
rows = table.sort_by("key").to_pylist()
first_ok = next(r for r in rows if r["status"] == "ok")
out["first_ok_key"] = first_ok["key"]
out["image"]["pyarrow+PIL"] = image_summary(Image.open(io.BytesIO(first_ok["image"]["bytes"])))
out["embedding"]["pyarrow"] = [float(x) for x in first_ok["image_embeddings"][0][:4]]
out["pyarrow_embedding_type"] = str(table.schema.field("image_embeddings").type)

# DuckDB reads float16 as FLOAT.
con = duckdb.connect()
out["counts"]["duckdb"] = dict(con.execute("SELECT status, count(*) FROM read_parquet(?) GROUP BY status", [files]).fetchall())
emb, img_bytes = con.execute(
    "SELECT image_embeddings[1][1:4], image.bytes FROM read_parquet(?) WHERE key = ?", [files, first_ok["key"]]
).fetchone()
out["embedding"]["duckdb"] = [float(x) for x in emb]
out["image"]["duckdb+PIL"] = image_summary(Image.open(io.BytesIO(img_bytes)))
out["duckdb_cosine"] = con.execute(
    "SELECT list_cosine_similarity(image_embeddings[1], text_embeddings[1]) - clip_score FROM read_parquet(?) WHERE key = ?",
    [files, first_ok["key"]],
).fetchone()[0]

# polars keeps float16.
df = pl.read_parquet(files)
out["counts"]["polars"] = {s: n for s, n in df.group_by("status").len().iter_rows()}
row = df.filter(pl.col("key") == first_ok["key"]).row(0, named=True)
out["embedding"]["polars"] = [float(x) for x in row["image_embeddings"][0][:4]]
out["polars_embedding_type"] = str(df.schema["image_embeddings"])
out["image"]["polars+PIL"] = image_summary(Image.open(io.BytesIO(row["image"]["bytes"])))

# datasets: the huggingface metadata makes `image` an Image feature decoded to PIL.
ds = load_dataset("parquet", data_files=files, split="train")
out["datasets_features"] = {k: repr(v) for k, v in ds.features.items() if k in ("image", "caption", "synthetic_captions", "image_embeddings", "clip_score")}
out["counts"]["datasets"] = counts(ds["status"])
i = ds["key"].index(first_ok["key"])
r = ds[i]
out["datasets_image_type"] = type(r["image"]).__module__ + "." + type(r["image"]).__name__
out["image"]["datasets"] = image_summary(r["image"])
out["embedding"]["datasets"] = [float(x) for x in r["image_embeddings"][0][:4]]
out["datasets_captions"] = r["synthetic_captions"]

print(json.dumps(out))
