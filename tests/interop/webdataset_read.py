"""Read a `recap export webdataset` directory with the `webdataset` package, as open_clip does
(`decode("pilrgb")`, `to_tuple("jpg;png;jpeg;webp", "txt")`), and dump every sample's members:
image size, caption, synthetic captions, view parameters and the npz arrays. Prints JSON.

Usage: webdataset_read.py EXPORT_DIR
"""
import glob
import io
import json
import os
import sys

import numpy as np
import webdataset as wds

tars = sorted(glob.glob(os.path.join(sys.argv[1], "*.tar")))
manifest = json.load(open(os.path.join(sys.argv[1], "manifest.json")))

# open_clip's pipeline: image + caption tuples.
pairs = list(wds.WebDataset(tars, shardshuffle=False).decode("pilrgb").to_tuple("jpg;png;jpeg;webp", "txt"))

samples = {}
for s in wds.WebDataset(tars, shardshuffle=False):
    z = np.load(io.BytesIO(s["npz"]))
    samples[s["__key__"]] = {
        "members": sorted(k for k in s if not k.startswith("__")),
        "txt": s["txt"].decode(),
        "url": s["url.txt"].decode(),
        "syn": json.loads(s["syn.json"])["syn_text"],
        "views": len(json.loads(s["paug.json"])["param_aug"]),
        "meta": json.loads(s["json"]),
        "image_emb": {"dtype": str(z["image_emb"].dtype), "shape": list(z["image_emb"].shape), "values": z["image_emb"].astype(float).ravel().tolist()},
        "text_emb": {"dtype": str(z["text_emb"].dtype), "shape": list(z["text_emb"].shape), "values": z["text_emb"].astype(float).ravel().tolist()},
    }
print(json.dumps({
    "open_clip_pairs": len(pairs),
    "first_pair": [list(pairs[0][0].size), pairs[0][1]] if pairs else None,
    "manifest_samples": manifest["samples"],
    "samples": samples,
}))
