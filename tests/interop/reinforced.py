"""Open reinforced recap shards with pyarrow and check the layout from Python's side: embeddings
read as float16 arrays, each teacher's part of each row has unit norm, and clip_score is the
teachers' mean cosine between the original view and the alt-text, recomputed from the stored
embeddings. Prints a JSON summary.

Usage: reinforced.py SHARD_DIR
"""
import glob
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq

files = sorted(glob.glob(os.path.join(sys.argv[1], "*.parquet")))
meta = pq.read_metadata(files[0]).metadata
teachers = json.loads(meta[b"recap.teachers"])
dims = [t["dim"] for t in teachers]
rows = ok = 0
max_norm_err = max_score_err = 0.0
for f in files:
    t = pq.read_table(f)
    rows += t.num_rows
    status = t.column("status").to_pylist()
    img = t.column("image_embeddings").to_pylist()
    txt = t.column("text_embeddings").to_pylist()
    score = t.column("clip_score").to_pylist()
    for i, s in enumerate(status):
        if s != "ok":
            continue
        ok += 1
        views = np.array(img[i], dtype=np.float32)
        texts = np.array(txt[i], dtype=np.float32)
        assert t.schema.field("image_embeddings").type.value_type.value_type == "halffloat"
        cos = []
        start = 0
        for d in dims:
            for row in list(views) + list(texts[1:]):
                max_norm_err = max(max_norm_err, abs(float(np.linalg.norm(row[start:start + d])) - 1.0))
            cos.append(float(views[0, start:start + d] @ texts[0, start:start + d]))
            start += d
        max_score_err = max(max_score_err, abs(np.mean(cos) - score[i]))
print(json.dumps({"rows": rows, "ok": ok, "dims": dims, "max_norm_err": max_norm_err, "max_score_err": max_score_err}))
