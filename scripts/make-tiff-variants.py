"""The odd TIFFs of the real web, made with the reference tools, for recap's decode tests.

Writes tests/data/tiff/*.tif from one 96x64 RGB picture (base.png) and reference.json: for each
file, its size and the mean R, G, B that the reference decoders give (PIL; tifffile for what PIL
cannot read). Run with the project's .venv (pillow, numpy, tifffile) and libtiff-tools' tiffcp:
  apt-get install libtiff-tools && .venv/bin/pip install tifffile && .venv/bin/python scripts/make-tiff-variants.py
"""
import json
import pathlib
import subprocess

import numpy as np
import tifffile
from PIL import Image

out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "tiff"
out.mkdir(parents=True, exist_ok=True)
h, w = 64, 96
y, x = np.mgrid[0:h, 0:w]
rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), 128 + 100 * np.sin(x / 7.0) * np.cos(y / 5.0)], -1).clip(0, 255).astype(np.uint8)
rgb[20:40, 30:60] = [250, 30, 40]
Image.fromarray(rgb).save(out / "base.png")
base = out / "base.tif"
tifffile.imwrite(base, rgb, photometric="rgb")

def tiffcp(name, *args):
    subprocess.run(["tiffcp", *args, str(base), str(out / name)], check=True)

tiffcp("planar.tif", "-p", "separate")                       # PlanarConfiguration = 2
tiffcp("tiled.tif", "-t", "-w", "32", "-l", "32")            # 32x32 tiles
tiffcp("bigtiff.tif", "-8")                                  # BigTIFF header, 64-bit offsets
tiffcp("ycbcr-jpeg.tif", "-c", "jpeg:90", "-r", "16")        # JPEG compression, YCbCr 2x2 subsampled
tiffcp("lzw-predictor.tif", "-c", "lzw:2")                   # LZW with horizontal predictor
tiffcp("tiled-planar-deflate.tif", "-t", "-w", "32", "-l", "32", "-p", "separate", "-c", "zip")
# CIELab (photometric 8): L 0..255 = 0..100, a* and b* signed bytes; computed here with the
# standard sRGB -> XYZ (D65) -> L*a*b* formulas (PIL's own RGB -> LAB is off by 1-3 units).
def srgb_to_lab(c):
    c = c / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)

lab = srgb_to_lab(rgb.astype(np.float64))
lab8 = np.empty(rgb.shape, np.uint8)
lab8[..., 0] = np.round(lab[..., 0] * 255 / 100).clip(0, 255)
lab8[..., 1:] = np.round(lab[..., 1:]).clip(-128, 127).astype(np.int8).view(np.uint8)
tifffile.imwrite(out / "lab.tif", lab8, photometric=8)
# 12 bits per sample, packed MSB-first with rows padded to a byte (as libtiff writes them), by
# hand: tifffile needs imagecodecs for packing. Value v is v/4095 of full scale.
def write_rgb12(path, a12):
    import struct
    rows = []
    for row in a12.reshape(h, -1):
        bits = "".join(f"{int(v):012b}" for v in row)
        bits += "0" * (-len(bits) % 8)
        rows.append(int(bits, 2).to_bytes(len(bits) // 8, "big"))
    data = b"".join(rows)
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, None), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    ifd_at = 8
    extra_at = ifd_at + 2 + 12 * len(entries) + 4
    data_at = extra_at + 6
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if tag == 258:
            ifd += struct.pack("<HHII", tag, typ, count, extra_at)
        elif tag == 273:
            ifd += struct.pack("<HHII", tag, typ, count, data_at)
        elif typ == 3:
            ifd += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, typ, count, value)
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", ifd_at) + ifd + struct.pack("<HHH", 12, 12, 12) + data)

rgb12 = (rgb.astype(np.uint32) * 4095 + 127) // 255
write_rgb12(out / "rgb12.tif", rgb12)
# 16 bits per sample.
tifffile.imwrite(out / "rgb16.tif", rgb.astype(np.uint16) * 257, photometric="rgb")

ref = {}
for f in sorted(out.glob("*.tif")):
    try:
        im = Image.open(f)
        im.load()
        if im.mode == "LAB":
            arr = None   # PIL keeps LAB (no RGB conversion); compared with base.png's RGB instead
        else:
            arr = np.asarray(im.convert("RGB"))
        how = "PIL"
    except Exception as e:  # noqa: BLE001
        arr, how = None, f"PIL cannot: {e}"
    if arr is None:
        a = tifffile.imread(f)
        if a.dtype == np.uint16:
            a = (a.astype(np.float64) / (4095 if "12" in f.name else 65535) * 255).round()
        if "12" in f.name:
            assert (a == rgb).all(), "tifffile reads the hand-packed 12-bit file back to the picture"  
        arr = a if "lab" not in f.name else rgb
        how += "; tifffile" if "lab" not in f.name else "; base RGB (LAB round trip)"
    arr = np.asarray(arr, dtype=np.float64)
    ref[f.name] = {"width": int(arr.shape[1]), "height": int(arr.shape[0]), "mean_rgb": [round(float(v), 2) for v in arr.reshape(-1, 3).mean(0)], "reference": how}
(out / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
for k, v in ref.items():
    print(k, v)
