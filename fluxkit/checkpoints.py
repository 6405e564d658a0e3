"""Resumable checkpoints: checkpoint-STEP folders that are complete by construction.

accelerate's save_state writes into a hidden partial folder on every rank (DeepSpeed needs all
ranks); only when all ranks are done does the main process add our run-state file and rename the
folder into place. A crash mid-write therefore leaves only a `.partial-` folder, which resume never
picks and the next run removes. Pruning to --checkpoints_total_limit happens after the new
checkpoint is in place, and never removes the newest.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile

from .errors import UserError

STATE_FILE = "fluxkit_state.json"
PARTIAL_PREFIX = ".partial-"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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


def load(accelerator, path: str) -> None:
    """accelerator.load_state(path), with a tampered state file reported in one line.

    accelerate reads optimizer, scheduler and RNG states with torch's weights-only unpickler, which
    refuses (never runs) pickled objects other than tensors and plain data.
    """
    import pickle

    try:
        accelerator.load_state(path)
    except pickle.UnpicklingError:
        culprit = _first_unsafe_file(path)
        raise UserError(f"checkpoint {path!r}: {culprit or 'a state file'} holds objects other than tensors and plain data, "
                        "which could run code when loaded, so it was refused; resume from a checkpoint this trainer wrote") from None


def _first_unsafe_file(path: str) -> str | None:
    import pickle

    from accelerate.utils import load as safe_load  # weights_only=True with accelerate's allow-list, as load_state

    for name in sorted(os.listdir(path)):
        if name.endswith((".bin", ".pkl", ".pt", ".pth")) and os.path.isfile(os.path.join(path, name)):
            try:
                safe_load(os.path.join(path, name), map_location="cpu")
            except pickle.UnpicklingError:
                return name
    return None


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
    except Exception as err:  # judged below, after every rank is done: a full disk or a bug
        error = err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            if error is not None:
                raise error
            with open(os.path.join(partial, STATE_FILE), "w") as f:
                json.dump(state, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # the same step written again after a resume: replace it
                _discard(final)
            os.replace(partial, final)
        except Exception as err:
            reason = write_failure(err, output_dir)
            shutil.rmtree(partial, ignore_errors=True)
            if reason is None:
                raise
            previous = complete_checkpoints(output_dir)
            keep = f"the previous checkpoint {previous[-1][1]!r} is intact" if previous else "no earlier checkpoint exists"
            raise UserError(f"could not write checkpoint {final!r}: {reason}; {keep}; "
                            "free disk space or fix permissions, then resume with --resume_from_checkpoint latest") from None
        prune(output_dir, total_limit)
    elif error is not None:
        reason = write_failure(error, output_dir)
        if reason is None:
            raise error
        raise UserError(f"could not write checkpoint {final!r} on this rank: {reason}")
    accelerator.wait_for_everyone()
    return final


def write_failure(err: BaseException, folder: str) -> str | None:
    """Why a write into folder failed when storage is to blame (full, read-only, no permission), else None.

    torch.save and safetensors report a full disk as RuntimeError or SafetensorError, not OSError,
    so for those a probe write decides: storage problems get one clear line, bugs keep their traceback.
    """
    if isinstance(err, OSError):
        return err.strerror or str(err)
    text = str(err)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO):
        if os.strerror(code) in text:  # e.g. safetensors: "I/O error: No space left on device (os error 28)"
            return os.strerror(code)
    return storage_problem(folder)


def storage_problem(folder: str, probe_bytes: int = 1 << 20) -> str | None:
    """Why folder cannot take a new file of probe_bytes now (e.g. 'No space left on device'), or None."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".fluxkit-write-probe-", dir=folder)
    except OSError as err:
        return err.strerror or str(err)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(probe_bytes))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return err.strerror or str(err)
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
    return None


def prepare_output_dir(output_dir: str) -> None:
    """Create output_dir and make sure it takes files, before hours of training depend on it."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output_dir {output_dir!r} cannot be created ({err.strerror or err}); choose another folder") from None
    problem = storage_problem(output_dir, probe_bytes=4096)
    if problem:
        raise UserError(f"--output_dir {output_dir!r} is not writable ({problem}); free space, fix its permissions "
                        "or choose another folder")


def _discard(path: str) -> None:
    """Remove a checkpoint folder so that a crash midway never leaves a complete-looking half of it:
    renamed first (atomically) to a partial name, which resume ignores and the next run cleans up."""
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, f"{PARTIAL_PREFIX}{name}.discarded")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(output_dir: str, total_limit: int | None) -> list[str]:
    """Keep the newest total_limit complete checkpoints (at least the newest one)."""
    if not total_limit:
        return []
    found = complete_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - max(1, total_limit))]
    for _, path in doomed:
        _discard(path)
    return [p for _, p in doomed]
