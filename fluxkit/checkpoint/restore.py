"""Loading a checkpoint that passed its check, and making sure each part really was restored.

accelerate's load_state raises when the weights, optimizer or schedule cannot be loaded, but it
swallows a failure to restore the random states (an INFO line, "Could not load random states"),
and DeepSpeed returns quietly when it finds no engine checkpoint. So the random states are read
and set here, by each process from its own file, and the engine is asked whether it loaded. What
cannot be restored but does not stop the run (another process count's random states, with
--allow_changed_settings) is said in one warning line; anything else is one error line.
"""

from __future__ import annotations

import logging
import os
import pickle

from ..shared.errors import UserError
from . import device_states, verify
from .verify import Damaged

logger = logging.getLogger("fluxkit.checkpoint")
# device random states accelerate saves, by the torch module that holds them
_DEVICE_STATES = (("cuda", "torch_cuda_manual_seed"), ("xpu", "torch_xpu_manual_seed"), ("mlu", "torch_mlu_manual_seed"),
                  ("musa", "torch_musa_manual_seed"), ("hpu", "torch_hpu_manual_seed"))


def load(accelerator, path: str, state: dict) -> None:
    """accelerator.load_state(path), then the confirmations (see the module's docstring)."""
    try:
        accelerator.load_state(path)
    except UserError:
        raise
    except Exception as err:
        culprit = _culprit(path, err)
        if culprit is None:
            raise
        raise UserError(f"checkpoint {path!r}: {culprit}; resume from a checkpoint this trainer wrote") from None
    _confirm_engines(accelerator, path)
    device_notes = restore_random_states(accelerator, path, state)
    if accelerator.is_main_process:
        for line in filter(None, [_partial_check_line(path, state), _other_world_line(path, state, accelerator.num_processes),
                                  device_notes]):
            logger.warning(line)


def restore_random_states(accelerator, path: str, state: dict) -> str | None:
    """Set this process's random states from its file (also when accelerate already did); returns
    a note when this device's random states are not in the file, else None."""
    import random

    import numpy as np
    import torch

    rank = accelerator.process_index
    rel = f"random_states_{rank}.pkl"
    recorded = (state.get("manifest") or {}).get("files", {})
    if not os.path.isfile(os.path.join(path, rel)):
        if rel in recorded or rank < _world(state):
            raise UserError(f"checkpoint {path!r}: {Damaged(rel, 'is missing on this machine')}; nothing of it was restored")
        return None  # a process the writing run did not have: the main process's warning says so
    try:
        states = verify.read_random_states(path, rel)
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        device_type = accelerator.device.type
        for name, key in _DEVICE_STATES:
            if name == device_type and key in states:
                getattr(torch, name).set_rng_state_all(states[key])
    except Damaged as damage:
        raise UserError(f"checkpoint {path!r}: {damage}; its random states were not restored") from None
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"checkpoint {path!r}: {Damaged(rel, f'cannot be restored ({err})')}; resume from a checkpoint "
                        "this trainer wrote") from None
    try:
        device_set = device_states.restore(accelerator, path)  # what accelerate leaves out (NPUs)
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        other = device_states.FILE.format(rank)
        raise UserError(f"checkpoint {path!r}: {Damaged(other, f'cannot be restored ({err})')}; resume from a "
                        "checkpoint this trainer wrote") from None
    key = dict(_DEVICE_STATES).get(device_type)
    if ((key and key not in states) or device_set is False) and rank == 0:
        return (f"checkpoint {path!r} holds no {device_type} random states (written on another kind of device, or "
                "before they were saved): "
                f"random draws on the {device_type} devices start from the seed, so this run is not bit-identical to "
                "an uninterrupted one; everything else is restored")
    return None


def _world(state: dict) -> int:
    world = state.get("world_size", 1)
    return world if isinstance(world, int) and world > 0 else 1


def _other_world_line(path: str, state: dict, now: int) -> str | None:
    """The one warning for a resume on another number of processes (allowed by --allow_changed_settings)."""
    then = _world(state)
    if then == now:
        return None
    if then > now:
        lost = f"the random states of {_processes(now, then - 1)} are not restored (this run has {now})"
    else:
        lost = f"{_processes(then, now - 1)} have no random states in it and start from the seed"
    return (f"resuming {path!r}, written by {then} process(es), on {now}: {lost}; noise and timestep draws differ "
            "from an uninterrupted run's, so the result is not bit-identical to one; weights, optimizer, schedule, "
            "step and data position are restored")


def _processes(first: int, last: int) -> str:
    return f"process {first}" if first == last else f"processes {first}-{last}"


def _partial_check_line(path: str, state: dict) -> str | None:
    if state.get("manifest") is not None:
        return None
    return (f"checkpoint {path!r} has no manifest (written before checkpoints recorded one): partial check, its "
            "files were found whole and readable but cannot be proven unchanged since they were written")


def _confirm_engines(accelerator, path: str) -> None:
    """DeepSpeed logs a warning and returns when it finds no engine checkpoint; accelerate goes on."""
    for model in getattr(accelerator, "_models", []):
        if type(model).__name__ == "DeepSpeedEngine" and getattr(model, "loaded_checkpoint_dp_world_size", 0) is None:
            raise UserError(f"checkpoint {path!r}: DeepSpeed did not load its engine state (pytorch_model/, named by "
                            "'latest'); resume from a checkpoint this trainer wrote under DeepSpeed")


def _culprit(path: str, err: Exception) -> Damaged | None:
    """The file behind a load_state failure, when one can be named."""
    if isinstance(err, FileNotFoundError) and err.filename:
        return Damaged(os.path.relpath(str(err.filename), path).replace(os.sep, "/"), "is missing")
    from accelerate.utils import load as safe_load  # weights_only=True with accelerate's allow-list, as load_state

    for name in sorted(os.listdir(path)):
        if name.endswith((".bin", ".pkl", ".pt", ".pth")) and os.path.isfile(os.path.join(path, name)):
            try:
                safe_load(os.path.join(path, name), map_location="cpu")
            except pickle.UnpicklingError:
                return Damaged(name, "holds objects other than tensors and plain data, which could run code when "
                               "loaded, so it was refused")
            except Exception as probe:
                return Damaged(name, f"cannot be read ({type(probe).__name__})")
    return None
