"""Make a recap evaluation set (eval.parquet) from an ImageNet-style folder tree:

    ROOT/<class name>/<image files>     ->   one task, its classes the folder names (sorted)

Usage: python tools/eval_from_folders.py ROOT OUT.parquet [--task NAME] [--template "a photo of a {}."]...
           [--captions captions.tsv]

Images are stored as they are (bytes + relative path), labels as class indices, and the
`recap.eval` metadata holds the class names and prompt templates (CLIP's "a photo of a {}."
family by default). `--captions` adds a caption column for retrieval from a TSV of
`relative/path<TAB>caption` lines. Needs pyarrow only. Then: recap eval --model M --data OUT.parquet
"""
import argparse
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a photo of many {}.",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--task", default="class")
    ap.add_argument("--template", action="append", help="prompt template with {} (repeatable)")
    ap.add_argument("--captions", help="TSV of relative/path<TAB>caption")
    a = ap.parse_args()
    classes = sorted(d for d in os.listdir(a.root) if os.path.isdir(os.path.join(a.root, d)) and not d.startswith("."))
    if len(classes) < 2:
        sys.exit(f"{a.root}: expected at least two class folders, found {len(classes)}")
    captions = {}
    if a.captions:
        with open(a.captions, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if "\t" not in line:
                    sys.exit(f"{a.captions}:{n}: expected path<TAB>caption")
                p, c = line.rstrip("\n").split("\t", 1)
                captions[p] = c
    paths, data, labels = [], [], []
    for i, c in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(a.root, c))):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXT:
                continue
            rel = f"{c}/{name}"
            with open(os.path.join(a.root, c, name), "rb") as f:
                data.append(f.read())
            paths.append(rel)
            labels.append(i)
    if not paths:
        sys.exit(f"{a.root}: no images ({', '.join(sorted(IMAGE_EXT))}) in the class folders")
    image = pa.StructArray.from_arrays([pa.array(data, pa.binary()), pa.array(paths, pa.string())], ["bytes", "path"])
    cols = {"image": image, a.task: pa.array(labels, pa.int32())}
    spec = {"version": 1, "tasks": [{"name": a.task, "classes": classes, "templates": a.template or DEFAULT_TEMPLATES}]}
    if a.captions:
        cols["caption"] = pa.array([captions.get(p) for p in paths], pa.string())
        spec["caption_column"] = "caption"
    table = pa.table(cols).replace_schema_metadata({"recap.eval": json.dumps(spec)})
    pq.write_table(table, a.out)
    print(f"{a.out}: {len(paths)} images, {len(classes)} classes ({', '.join(classes)})")


if __name__ == "__main__":
    main()
