"""The Python side of benches/models_vs_python.sh: the same ONNX files, batches and thread count
as benches/models.rs, run by onnxruntime from Python. Captioning goes through optimum's
ORTModelForVision2Seq.generate() (Hugging Face generate() driving ONNX Runtime, KV cache on),
which is how a Python pipeline would caption; CLIP embeddings are plain InferenceSession.run.
Prints JSON lines with the same bench names."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
root = Path(__file__).resolve().parent.parent
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2


def images(n):
    base = [Image.open(root / f"tests/vectors/images/{i:02d}_64.png").convert("RGB") for i in range(4)]
    return [base[i % 4] for i in range(n)]


def timed(reps, f):
    """Seconds per call: after a warm-up, at least `reps` calls and at least 2 s of them."""
    f()
    t = time.perf_counter()
    n = 0
    while n < reps or time.perf_counter() - t < 2.0:
        f()
        n += 1
    return (time.perf_counter() - t) / n


def so():
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    return o


def main():
    import torch
    from optimum.onnxruntime import ORTModelForVision2Seq
    from transformers import AutoImageProcessor, AutoTokenizer

    torch.set_num_threads(threads)
    cap_dir = root / "models/shapeworld-captioner"
    model = ORTModelForVision2Seq.from_pretrained(cap_dir, session_options=so(), provider="CPUExecutionProvider", use_cache=True)
    proc = AutoImageProcessor.from_pretrained(cap_dir)
    batch = 32
    pv = proc(images=images(batch), return_tensors="pt")["pixel_values"]
    for name, kw, k in [("greedy", dict(do_sample=False, num_beams=1), 1),
                        ("sample_top_p0.9_k5", dict(do_sample=True, top_p=0.9, top_k=0, num_return_sequences=5), 5)]:
        s = timed(5, lambda: model.generate(pixel_values=pv, max_new_tokens=40, **kw))
        print(json.dumps({"bench": f"captioner_{name}", "device": "cpu", "batch": batch, "captions_per_s": round(batch * k / s, 1)}))

    del model  # as in the Rust bench: the captioner's sessions are gone before the CLIPs run
    for name in ["shapeworld-clip-a", "shapeworld-clip-b"]:
        d = root / "models" / name
        proc = AutoImageProcessor.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        bs = 64
        px = proc(images=images(bs), return_tensors="np")["pixel_values"].astype(np.float32)
        texts = [f"a small red circle at the top left and a large blue square number {i}" for i in range(bs)]
        enc = tok(texts, padding=True, return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

        def tokenize():
            # Texts are timed from strings, tokenization included, as recap's embed_texts is.
            e = tok(texts, padding=True, return_tensors="np")
            return {"input_ids": e["input_ids"].astype(np.int64), "attention_mask": e["attention_mask"].astype(np.int64)}
        if (d / "model.onnx").exists():
            s = ort.InferenceSession(str(d / "model.onnx"), so(), providers=["CPUExecutionProvider"])
            one_ids, one_mask = ids[:1, :2], mask[:1, :2]
            one_px = np.zeros((1,) + px.shape[1:], np.float32)
            img = lambda: s.run(["image_embeds"], {"pixel_values": px, "input_ids": one_ids, "attention_mask": one_mask})
            txt = lambda: s.run(["text_embeds"], {"pixel_values": one_px, **tokenize()})
        else:
            si = ort.InferenceSession(str(d / "image_encoder.onnx"), so(), providers=["CPUExecutionProvider"])
            st = ort.InferenceSession(str(d / "text_encoder.onnx"), so(), providers=["CPUExecutionProvider"])
            img = lambda: si.run(None, {"pixel_values": px})
            txt = lambda: st.run(None, tokenize())
        print(json.dumps({"bench": f"{name}_images", "device": "cpu", "batch": bs, "per_s": round(bs / timed(20, img), 1)}))
        pre = lambda: (proc(images=images(bs), return_tensors="np"), img())
        print(json.dumps({"bench": f"{name}_images_with_preprocessing", "device": "cpu", "batch": bs, "per_s": round(bs / timed(20, pre), 1)}))
        print(json.dumps({"bench": f"{name}_texts", "device": "cpu", "batch": bs, "per_s": round(bs / timed(20, txt), 1)}))


if __name__ == "__main__":
    main()
