"""Reference values for src/train/loss.rs: CLIP's contrastive loss and MobileCLIP's distillation
(ml-mobileclip DistillClipLoss, average after softmax), computed by PyTorch on a small fixed
example. Run: .venv-fixtures/bin/python tools/references/losses.py"""
import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
IMG = [[0.3, -1.2, 0.5, 0.8], [1.1, 0.4, -0.7, 0.2], [-0.5, 0.9, 1.3, -0.4]]
TXT = [[0.2, -1.0, 0.9, 0.6], [0.8, 0.1, -0.2, 0.9], [-1.3, 0.7, 0.4, -0.1]]
TI = [[0.6, 0.8, 1.0, 0.0], [0.0, 1.0, 0.6, 0.8], [-0.8, 0.6, 0.0, -1.0]]
TT = [[0.8, 0.6, 0.8, 0.6], [0.6, 0.8, 0.0, 1.0], [-1.0, 0.0, 0.6, -0.8]]

img, txt = F.normalize(torch.tensor(IMG), dim=-1), F.normalize(torch.tensor(TXT), dim=-1)
ti, tt = torch.tensor(TI), torch.tensor(TT)
scale = 3.0
logits = scale * img @ txt.T
labels = torch.arange(3)
contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
teachers = [(70.0, (0, 2)), (60.0, (2, 4))]
p_i2t = sum(F.softmax(s * ti[:, a:b] @ tt[:, a:b].T, 1) for s, (a, b) in teachers) / 2
p_t2i = sum(F.softmax(s * tt[:, a:b] @ ti[:, a:b].T, 1) for s, (a, b) in teachers) / 2
distill = (-(p_i2t * F.log_softmax(logits, 1)).sum(1).mean() - (p_t2i * F.log_softmax(logits.T, 1)).sum(1).mean()) / 2
print(f"torch {torch.__version__}")
print(f"REF_CONTRASTIVE = {contrastive.item():.6f}")
print(f"REF_DISTILL = {distill.item():.6f}")

# AdamW (src/train/optim.rs): two steps with decoupled weight decay.
p = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.2)
for g in ([0.5, -1.0, 2.0], [0.1, 0.3, -0.2]):
    p.grad = torch.tensor(g)
    opt.step()
print("REF_ADAMW =", [round(x, 6) for x in p.detach().tolist()])
