"""A few optimizer steps of a small model through fluxkit's device layer; prints a JSON line.

Run under `accelerate launch --config_file pretrain_bf16_accelerate_config.yaml --num_processes 2`
to check that DeepSpeed on a CPU host sees every process and trains.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from fluxkit.shared.device import build_accelerator, detect  # noqa: E402

info = detect()
acc = build_accelerator(info)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
x = torch.randn(64, 8)
y = x.sum(dim=1, keepdim=True)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
model, opt, loader = acc.prepare(model, opt, loader)
losses = []
for _epoch in range(4):
    for xb, yb in loader:
        pred = model(xb.to(acc.device, dtype=next(model.parameters()).dtype))
        loss = torch.nn.functional.mse_loss(pred.float(), yb.to(acc.device).float())
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(acc.gather(loss.detach().float().reshape(1)).mean().item())
if acc.is_main_process:
    print(json.dumps({"num_processes": acc.num_processes, "device": info.type, "distributed_type": str(acc.distributed_type),
                      "mixed_precision": acc.mixed_precision, "first_loss": sum(losses[:8]) / 8, "last_loss": sum(losses[-8:]) / 8, "steps": len(losses)}))
