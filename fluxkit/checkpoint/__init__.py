"""Checkpoints: checkpoint-STEP folders that are complete or absent, hold a manifest of what they
hold, are checked against it before a resume loads anything, and are confirmed restored.

    folders    writing (staged, then published), finding, resolving a resume, pruning, the save/load
               hooks for our models, and the run-folder lifecycle rules
    manifest   every file's size and SHA-256, hashed by the process that wrote it; the state file's seal
    verify     the check against the manifest (or the partial check of a checkpoint without one)
    restore    load_state, then each part confirmed (random states set here, DeepSpeed's engine asked)
    device_states   the device random states accelerate leaves out (NPUs), saved and restored per process
    __main__   python -m fluxkit.checkpoint verify PATH
"""

from .folders import (PREVIOUS_RUN_SUFFIX, changed_settings, check_run_folder, checkpoint_name, complete_checkpoints,
                      finished_run, move_aside_previous_run, previous_run, prune, register_state_hooks, remove_partials,
                      resolve_resume, resume_path, run_settings, save)
from .manifest import STATE_FILE
from .restore import load
from .verify import Damaged, check

__all__ = ["PREVIOUS_RUN_SUFFIX", "STATE_FILE", "Damaged", "changed_settings", "check", "check_run_folder",
           "checkpoint_name", "complete_checkpoints", "finished_run", "load", "move_aside_previous_run", "previous_run",
           "prune", "register_state_hooks", "remove_partials", "resolve_resume", "resume_path", "run_settings", "save"]
