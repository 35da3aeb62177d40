"""One training step of the same CLIP in PyTorch (transformers' CLIPModel with recap's preset
shapes, quick_gelu), same batch shapes, loss (contrastive + MobileCLIP distillation from two
teachers' stored embeddings, 64 + 48 wide), global-norm clipping and AdamW, fp32 on CPU.
Prints one JSON line like benches/train.rs: the median seconds per step.

  python benches/train_python.py tiny|small THREADS BATCH [STEPS]
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

preset, threads, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 20
torch.set_num_threads(threads)
torch.manual_seed(0)
# recap's presets (src/train/config.rs Preset::shape)
shapes = {
    "tiny": dict(image=64, patch=8, vw=64, vl=2, vh=4, vm=256, tw=64, tl=2, th=4, tm=256, embed=64),
    "small": dict(image=96, patch=8, vw=192, vl=4, vh=3, vm=768, tw=192, tl=4, th=3, tm=768, embed=192),
}[preset]
s = shapes
cfg = CLIPConfig(
    text_config=dict(vocab_size=512, hidden_size=s["tw"], intermediate_size=s["tm"], num_hidden_layers=s["tl"], num_attention_heads=s["th"],
                     max_position_embeddings=32, hidden_act="quick_gelu", eos_token_id=3, bos_token_id=1, pad_token_id=0),
    vision_config=dict(image_size=s["image"], patch_size=s["patch"], hidden_size=s["vw"], intermediate_size=s["vm"], num_hidden_layers=s["vl"],
                       num_attention_heads=s["vh"], hidden_act="quick_gelu"),
    projection_dim=s["embed"],
)
cfg._attn_implementation = "sdpa"
model = CLIPModel(cfg).train()
decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "position_embedding" not in n]
rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "position_embedding" not in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
L = 20
pixels = torch.rand(batch, 3, s["image"], s["image"]) * 3 - 1.5
ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.randint(4, 512, (batch, L - 2)), torch.full((batch, 1), 3)], 1)
slices = [(0, 64), (64, 112)]
t_img = torch.cat([F.normalize(torch.rand(batch, b - a) * 2 - 1, dim=-1) for a, b in slices], 1)
t_txt = torch.cat([F.normalize(torch.rand(batch, b - a) * 2 - 1, dim=-1) for a, b in slices], 1)
labels = torch.arange(batch)


def step():
    img = F.normalize(model.get_image_features(pixel_values=pixels), dim=-1)
    txt = F.normalize(model.get_text_features(input_ids=ids), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt.T
    contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    with torch.no_grad():
        p_i2t = sum(F.softmax(100 * t_img[:, a:b] @ t_txt[:, a:b].T, 1) for a, b in slices) / 2
        p_t2i = sum(F.softmax(100 * t_txt[:, a:b] @ t_img[:, a:b].T, 1) for a, b in slices) / 2
    distill = (-(p_i2t * F.log_softmax(logits, 1)).sum(1).mean() - (p_t2i * F.log_softmax(logits.T, 1)).sum(1).mean()) / 2
    loss = contrastive + distill
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, 4.605170)


for _ in range(3):
    step()
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"bench": f"step_{preset}", "threads": threads, "batch": batch, "seconds_per_step": times[len(times) // 2],
                  "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}))
