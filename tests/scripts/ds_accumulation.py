"""Which gradient accumulation DeepSpeed ends up with when only the trainer names it.

Run under `accelerate launch --config_file pretrain_bf16_accelerate_config.yaml ... ds_accumulation.py N`
(no --gradient_accumulation_steps for accelerate): prints a JSON line with the Accelerator's and the
DeepSpeed engine's accumulation; both must be N, i.e. the config did not override the trainer.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from fluxkit.shared.device import build_accelerator, detect  # noqa: E402

steps = int(sys.argv[1])
acc = build_accelerator(detect(), gradient_accumulation_steps=steps)
model = torch.nn.Linear(4, 1)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
model, opt, loader = acc.prepare(model, opt, loader)
if acc.is_main_process:
    print(json.dumps({"accelerator": acc.gradient_accumulation_steps, "deepspeed": model.gradient_accumulation_steps(),
                      "processes": acc.num_processes}))
