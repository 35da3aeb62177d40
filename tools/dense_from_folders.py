"""Make a recap dense dataset (dense.parquet, layout in src/train/dense.rs) from the folder
layouts dense benchmarks ship in:

  ADE20K-style:  ROOT/images/<name>.jpg + ROOT/annotations/<name>.png   (8/16-bit class-index PNGs)
  NYUv2-style:   ROOT/images/<name>.jpg + ROOT/depth/<name>.png         (16-bit depth PNGs)
  both:          all three folders

Usage: python tools/dense_from_folders.py ROOT OUT.parquet --classes classes.txt|a,b,c
           [--ignore-index 0|255] [--depth-scale 0.001] [--depth-unit mm]

Files are paired by name stem; images without a label keep a null mask / depth. The PNGs are
stored as they are: `recap` checks their sizes and class indices when it opens the file
(`DenseSet::open`), naming the row of any that does not fit. ADE20K's 0 = "other" is usually
ignored: pass --ignore-index 0 with a class list whose first name is "other". Needs pyarrow only.
"""
import argparse
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def stems(folder, exts):
    if not os.path.isdir(folder):
        return {}
    return {os.path.splitext(n)[0]: os.path.join(folder, n) for n in sorted(os.listdir(folder)) if os.path.splitext(n)[1].lower() in exts}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--classes", required=True, help="a file with one class name per line, or names separated by commas")
    ap.add_argument("--ignore-index", type=int, default=None)
    ap.add_argument("--depth-scale", type=float, default=0.001, help="metres per unit of the depth PNGs")
    ap.add_argument("--depth-unit", default="mm")
    a = ap.parse_args()
    if os.path.isfile(a.classes):
        with open(a.classes, encoding="utf-8") as f:
            classes = [l.strip() for l in f if l.strip()]
    else:
        classes = [c.strip() for c in a.classes.split(",") if c.strip()]
    if not classes:
        sys.exit("--classes: no class names")
    images = stems(os.path.join(a.root, "images"), IMAGE_EXT)
    if not images:
        sys.exit(f"{a.root}/images: no images")
    masks = stems(os.path.join(a.root, "annotations"), {".png"})
    depths = stems(os.path.join(a.root, "depth"), {".png"})
    if not masks and not depths:
        sys.exit(f"{a.root}: neither annotations/ nor depth/ holds PNGs")
    unpaired = sorted((set(masks) | set(depths)) - set(images))
    if unpaired:
        sys.exit(f"labels without an image: {', '.join(unpaired[:5])}{' ...' if len(unpaired) > 5 else ''}")

    def read(p):
        with open(p, "rb") as f:
            return f.read()

    names = sorted(images)
    image = pa.StructArray.from_arrays(
        [pa.array([read(images[n]) for n in names], pa.binary()), pa.array([os.path.relpath(images[n], a.root) for n in names], pa.string())],
        ["bytes", "path"])
    mask = pa.array([read(masks[n]) if n in masks else None for n in names], pa.binary())
    depth = pa.array([read(depths[n]) if n in depths else None for n in names], pa.binary())
    spec = {"version": 1, "classes": classes, "ignore_index": a.ignore_index, "depth_scale": a.depth_scale, "depth_unit": a.depth_unit}
    table = pa.table({"image": image, "mask": mask, "depth": depth}).replace_schema_metadata({"recap.dense": json.dumps(spec)})
    pq.write_table(table, a.out)
    print(f"{a.out}: {len(names)} images, {sum(n in masks for n in names)} masks, {sum(n in depths for n in names)} depth maps, {len(classes)} classes")


if __name__ == "__main__":
    main()
