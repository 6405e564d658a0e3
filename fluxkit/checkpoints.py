"""Resumable checkpoints: checkpoint-STEP folders that are complete by construction.

accelerate's save_state writes into a hidden partial folder on every rank (DeepSpeed needs all
ranks); only when all ranks are done does the main process add our run-state file and rename the
folder into place. A crash mid-write therefore leaves only a `.partial-` folder, which resume never
picks and the next run removes. Pruning to --checkpoints_total_limit happens after the new
checkpoint is in place, and never removes the newest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

from .errors import UserError

STATE_FILE = "fluxkit_state.json"
PARTIAL_PREFIX = ".partial-"
_NAME = re.compile(r"^checkpoint-(\d+)$")


# Test hooks (tests/test_reliability.py): a real SIGKILL at a chosen point, so crash-resume is tested
# against a process that really died there. Unset in normal runs; nothing else reads them.
KILL_AT_STEP_ENV = "FLUXKIT_TEST_KILL_AT_STEP"  # after optimizer step N is logged, before its checkpoint
KILL_IN_CHECKPOINT_ENV = "FLUXKIT_TEST_KILL_IN_CHECKPOINT"  # checkpoint N written but not yet renamed into place


def kill_here_for_tests(env_var: str, step: int) -> None:
    if os.environ.get(env_var) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def remove_partials(output_dir: str) -> list[str]:
    removed = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith(PARTIAL_PREFIX + "checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
                removed.append(name)
    return removed


def read_state(path: str) -> dict:
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise UserError(f"--resume_from_checkpoint {path!r} is not a complete fluxkit checkpoint (no {STATE_FILE}); "
                        "give a checkpoint-STEP folder written by this trainer, or 'latest'")
    with open(state_path) as f:
        return json.load(f)


def resolve_resume(output_dir: str, spec: str | None, run_type: str) -> tuple[str, dict] | None:
    """The checkpoint to resume from and its state, or None to start fresh ('latest' with none yet)."""
    if not spec:
        return None
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            return None
        path = found[-1][1]
    else:
        path = spec if os.path.isabs(spec) or os.path.isdir(spec) else os.path.join(output_dir, spec)
        if not os.path.isdir(path):
            raise UserError(f"--resume_from_checkpoint {spec!r} does not exist; give a checkpoint-STEP folder or 'latest'")
    state = read_state(path)
    if state.get("run_type") != run_type:
        other = "train_flux_dreambooth_lora.py" if state.get("run_type") == "lora" else "train_flux_dreambooth.py"
        raise UserError(f"--resume_from_checkpoint {path!r} is from a {state.get('run_type')} run, this is a {run_type} run; "
                        f"resume it with {other} or choose another checkpoint")
    return path, state


def save(accelerator, output_dir: str, step: int, state: dict, total_limit: int | None) -> str:
    """Write checkpoint-STEP atomically on every rank; returns its path. Errors leave older ones intact."""
    final = os.path.join(output_dir, checkpoint_name(step))
    partial = os.path.join(output_dir, PARTIAL_PREFIX + checkpoint_name(step))
    error = None
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial)
    except OSError as err:
        error = err
    accelerator.wait_for_everyone()
    kill_here_for_tests(KILL_IN_CHECKPOINT_ENV, step)
    if accelerator.is_main_process:
        try:
            if error is not None:
                raise error
            with open(os.path.join(partial, STATE_FILE), "w") as f:
                json.dump(state, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # the same step written again after a resume: replace it
                shutil.rmtree(final)
            os.replace(partial, final)
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            previous = complete_checkpoints(output_dir)
            keep = f"the previous checkpoint {previous[-1][1]!r} is intact" if previous else "no earlier checkpoint exists"
            raise UserError(f"could not write checkpoint {final!r}: {err.strerror or err}; {keep}; "
                            "free disk space or fix permissions, then resume with --resume_from_checkpoint latest") from None
        prune(output_dir, total_limit)
    elif error is not None:
        raise UserError(f"could not write checkpoint {final!r} on this rank: {error}")
    accelerator.wait_for_everyone()
    return final


def prune(output_dir: str, total_limit: int | None) -> list[str]:
    """Keep the newest total_limit complete checkpoints (at least the newest one)."""
    if not total_limit:
        return []
    found = complete_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - max(1, total_limit))]
    for _, path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return [p for _, p in doomed]
