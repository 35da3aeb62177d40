"""Reference numbers for `recap eval` (tests/eval.rs KNOWN): zero-shot top-1 with CLIP's prompt
ensembling and retrieval recall, computed independently with onnxruntime-Python and the Hugging
Face processor of the model directory, on an eval.parquet written by `recap synth`.

  recap synth --out /tmp/w31 --count 160 --seed 31 --min-size 160x120 --max-size 320x240 --corrupt 2
  .venv-fixtures/bin/python tools/references/eval_reference.py models/shapeworld-clip-a /tmp/w31/eval.parquet
"""
import io
import json
import sys

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
from PIL import Image
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

model_dir, data = sys.argv[1], sys.argv[2]
table = pq.read_table(data)
spec = json.loads(table.schema.metadata[b"recap.eval"])
proc = CLIPImageProcessor.from_pretrained(model_dir)
tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
sess = ort.InferenceSession(f"{model_dir}/model.onnx", providers=["CPUExecutionProvider"])
inputs = {i.name for i in sess.get_inputs()}


def run(pixel_values, texts):
    enc = tok(texts, padding=True, return_tensors="np")
    feed = {"input_ids": enc["input_ids"].astype(np.int64), "pixel_values": pixel_values.astype(np.float32)}
    if "attention_mask" in inputs:
        feed["attention_mask"] = enc["attention_mask"].astype(np.int64)
    img, txt = sess.run(["image_embeds", "text_embeds"], feed)
    return img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True)


images = [Image.open(io.BytesIO(r["bytes"])).convert("RGB") for r in table.column("image").to_pylist()]
size = proc.crop_size["height"]
img_emb = np.concatenate([run(proc(images=images[i:i + 32], return_tensors="np")["pixel_values"], [""])[0] for i in range(0, len(images), 32)])
dummy = np.zeros((1, 3, size, size), np.float32)


def texts(t):
    return run(dummy, t)[1]


out = {"zero_shot": {}}
for task in spec["tasks"]:
    cls = []
    for c in task["classes"]:
        e = texts([tpl.replace("{}", c) for tpl in task["templates"]]).mean(0)
        cls.append(e / np.linalg.norm(e))
    cls = np.stack(cls)
    labels = table.column(task["name"]).to_pylist()
    idx = [i for i, l in enumerate(labels) if l is not None]
    pred = (img_emb[idx] @ cls.T).argmax(1)
    hits = int((pred == np.array([labels[i] for i in idx])).sum())
    out["zero_shot"][task["name"]] = {"hits": hits, "n": len(idx), "top1": hits / len(idx)}
caps = table.column(spec["caption_column"]).to_pylist()
txt = np.concatenate([texts(caps[i:i + 64]) for i in range(0, len(caps), 64)])
sim = img_emb @ txt.T
n = len(caps)
# rank = how many others score at least as high (ties count against the target), as recap does.
r_i2t = np.array([(sim[i] >= sim[i, i]).sum() - 1 for i in range(n)])
r_t2i = np.array([(sim[:, i] >= sim[i, i]).sum() - 1 for i in range(n)])
out["retrieval"] = {
    "image_to_text": {"r1_hits": int((r_i2t < 1).sum()), "r5_hits": int((r_i2t < 5).sum())},
    "text_to_image": {"r1_hits": int((r_t2i < 1).sum()), "r5_hits": int((r_t2i < 5).sum())},
    "n": n,
}
print(json.dumps(out, indent=1))
