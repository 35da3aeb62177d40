"""One dense finetuning step in PyTorch, as benches/train.rs `finetune` times it in recap: a
segmentation head (linear probe per patch, or the light decoder: linear + quick_gelu, x2
bilinear, 3x3 conv + ReLU, 1x1 conv) on the patch tokens of a CLIP vision tower of teacher
clip-a's shapes (64 px, patch 8, width 64, 2 layers), upsampled bilinearly to 64x64, per-pixel
cross-entropy, clipping and AdamW; encoder frozen (no_grad) or trained. fp32 on CPU.

  python benches/finetune_python.py linear|decoder frozen|full THREADS BATCH [STEPS]
"""
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

kind, mode, threads, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 20
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")
cfg._attn_implementation = "sdpa"
enc = CLIPVisionModel(cfg).train()
C, H, G = 5, 64, 8


class QuickGelu(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


if kind == "linear":
    head = nn.Linear(64, C)
else:
    head = nn.ModuleDict({"fc": nn.Linear(64, H), "conv": nn.Conv2d(H, H, 3, padding=1), "out": nn.Conv2d(H, C, 1)})
params = list(head.parameters()) + (list(enc.parameters()) if mode == "full" else [])
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
pixels = torch.rand(batch, 3, 64, 64) * 3 - 1.5
labels = torch.randint(0, C, (batch, 64, 64))


def tokens():
    out = enc(pixel_values=pixels).last_hidden_state[:, 1:]
    return enc.vision_model.post_layernorm(out)


def step():
    if mode == "frozen":
        with torch.no_grad():
            t = tokens()
    else:
        t = tokens()
    if kind == "linear":
        y = head(t).transpose(1, 2).reshape(batch, C, G, G)
    else:
        y = QuickGelu()(head["fc"](t)).transpose(1, 2).reshape(batch, H, G, G)
        y = F.interpolate(y, size=(2 * G, 2 * G), mode="bilinear", align_corners=False)
        y = head["out"](F.relu(head["conv"](y)))
    y = F.interpolate(y, size=(64, 64), mode="bilinear", align_corners=False)
    loss = F.cross_entropy(y, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


for _ in range(3):
    step()
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"bench": f"finetune_{kind}_{mode}", "threads": threads, "batch": batch, "seconds_per_step": times[len(times) // 2], "torch": torch.__version__}))
