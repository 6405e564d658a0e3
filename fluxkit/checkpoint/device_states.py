"""Device random states that accelerate's checkpoints leave out, saved beside them.

accelerate saves the random states of CUDA, XPU, MLU, MUSA, HPU and a few more devices, but not of
Ascend NPUs; the flow-matching noise is drawn on the device, so a resumed NPU run would draw other
noise than the uninterrupted one. Each process writes its device's states here as tensors
(device_random_states_N.safetensors: no pickle) and sets them back on resume.
"""

from __future__ import annotations

import os

# device types whose random states accelerate does not save (torch.<type> has get/set_rng_state_all)
NOT_SAVED_BY_ACCELERATE = ("npu",)
FILE = "device_random_states_{}.safetensors"


def save(accelerator, folder: str) -> None:
    """Every process: write its device's random states into the checkpoint being written."""
    kind = accelerator.device.type
    if kind not in NOT_SAVED_BY_ACCELERATE:
        return
    import torch
    from safetensors.torch import save_file

    states = getattr(torch, kind).get_rng_state_all()
    save_file({f"{kind}.{i}": s.contiguous() for i, s in enumerate(states)},
              os.path.join(folder, FILE.format(accelerator.process_index)))


def restore(accelerator, path: str) -> bool | None:
    """Set this process's device random states from the checkpoint: True when set, False when the
    checkpoint has none for it (written elsewhere or before they were saved), None when accelerate
    handles this device type. A file that cannot be read raises ValueError/KeyError/RuntimeError."""
    kind = accelerator.device.type
    if kind not in NOT_SAVED_BY_ACCELERATE:
        return None
    full = os.path.join(path, FILE.format(accelerator.process_index))
    if not os.path.isfile(full):
        return False
    import torch
    from safetensors.torch import load_file

    tensors = load_file(full)
    getattr(torch, kind).set_rng_state_all([tensors[f"{kind}.{i}"] for i in range(len(tensors))])
    return True
