"""Reference values for recap's bilinear upsampling (src/train/ops.rs upsample_bilinear):
torch.nn.functional.interpolate(mode="bilinear", align_corners=False), forward and the gradient of
sum(out * w) with respect to the input, written to tests/vectors/bilinear.json.
Run: .venv-fixtures/bin/python tools/references/bilinear.py"""
import json
import math

import torch
import torch.nn.functional as F

cases = []
for (b, c, h, w), (oh, ow) in [((1, 2, 3, 4), (5, 7)), ((2, 1, 4, 4), (16, 16)), ((1, 1, 8, 6), (3, 5))]:
    n = b * c * h * w
    x = torch.tensor([math.sin(0.37 * i) + 0.1 * i for i in range(n)], dtype=torch.float64).reshape(b, c, h, w).requires_grad_()
    out = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)
    wt = torch.tensor([math.cos(0.21 * i) for i in range(out.numel())], dtype=torch.float64).reshape(out.shape)
    (out * wt).sum().backward()
    cases.append({"input_shape": [b, c, h, w], "size": [oh, ow], "input": x.detach().flatten().tolist(),
                  "weight": wt.flatten().tolist(), "output": out.detach().flatten().tolist(), "grad": x.grad.flatten().tolist()})
with open("tests/vectors/bilinear.json", "w") as f:
    json.dump({"torch": torch.__version__, "cases": cases}, f)
print(f"tests/vectors/bilinear.json: {len(cases)} cases, torch {torch.__version__}")
