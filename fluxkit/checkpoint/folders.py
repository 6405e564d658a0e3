"""Resumable checkpoints: checkpoint-STEP folders that are complete by construction.

accelerate's save_state writes into a hidden partial folder on every rank (DeepSpeed needs all
ranks); only when all ranks are done does the main process add our run-state file, with the
manifest of every file (fluxkit.checkpoint.manifest), and rename the folder into place. A crash mid-write therefore leaves only a `.partial-` folder, which resume never
picks and the next run removes. Pruning to --checkpoints_total_limit happens after the new
checkpoint is in place, and never removes the newest.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from ..shared.errors import UserError
from ..shared.fsio import PARTIAL_PREFIX, discard_dir, write_failure
from ..weights.lora import lora_save_load_hooks, unwrap_model
from ..training.pivotal import settings as pivotal_settings
from ..weights.zero3 import save_pretrained_gathered
from . import device_states, manifest, verify
from .manifest import STATE_FILE
# A storage error's cause is judged by a probe write of this size (room for a small file is not enough).
_PROBE_BYTES = 1 << 20
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


def resume_path(output_dir: str, spec: str) -> str | None:
    """Where --resume_from_checkpoint NAME points: a folder of that name inside output_dir (as diffusers
    looks it up), else the path itself; None when neither is a folder."""
    for path in (os.path.join(output_dir, spec), spec):
        if os.path.isdir(path):
            return path
    return None


# set by a process that has checked a checkpoint deeply (a launcher) for the trainer it starts: "SEAL PATH"
_CHECKED_ENV = "FLUXKIT_CHECKPOINT_CHECKED"


def _check(path: str, hand_over: bool = False) -> dict:
    """verify.check with this process's share of the work: one process (the main one, or a launcher before
    any starts) reads the whole checkpoint, once; the others compare sizes and wait for its verdict.
    hand_over (a launcher): tell the trainer it starts, through the environment, that this checkpoint passed."""
    deep = int(os.environ.get("RANK", "0") or 0) == 0
    seal, _, checked = os.environ.get(_CHECKED_ENV, "").partition(" ")
    trusted = seal if checked and os.path.realpath(checked) == os.path.realpath(path) else None
    state, complete = verify.check(path, deep=deep, trusted_seal=trusted)
    if hand_over and deep and complete and state.get("seal"):
        os.environ[_CHECKED_ENV] = f"{state['seal']} {os.path.realpath(path)}"
    return state


def resolve_resume(output_dir: str, spec: str | None, run_type: str, hand_over: bool = False) -> tuple[str, dict] | None:
    """The checkpoint to resume from and its state, checked against its manifest (fluxkit.checkpoint.verify),
    or None to start fresh ('latest' with none yet). A damaged checkpoint is one error line naming the file."""
    if not spec:
        return None
    if spec == "latest":
        found = _checkpoint_folders(output_dir)
        if not found:
            return None
        path = found[-1][1]
        try:
            state = _check(path, hand_over)
        except verify.Damaged as damage:
            raise UserError(_damaged_latest(path, damage, found[:-1])) from None
    else:
        path = resume_path(output_dir, spec)
        if path is None:
            raise UserError(f"--resume_from_checkpoint {spec!r} is neither a checkpoint inside --output_dir {output_dir!r} "
                            "nor a folder; give 'latest', a checkpoint-STEP name or a path")
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            raise UserError(f"--resume_from_checkpoint {path!r} is not a complete fluxkit checkpoint (no {STATE_FILE}); "
                            "give a checkpoint-STEP folder written by this trainer, or 'latest'")
        try:
            state = _check(path, hand_over)
        except verify.Damaged as damage:
            raise UserError(f"--resume_from_checkpoint {path!r} is damaged: {damage}; nothing was loaded; copy the "
                            "checkpoint again from where it was written, or resume from an intact one "
                            f"(python -m fluxkit.checkpoint verify {output_dir} lists them)") from None
    if state.get("run_type") != run_type:
        other = "train_flux_dreambooth_lora.py" if state.get("run_type") == "lora" else "train_flux_dreambooth.py"
        raise UserError(f"--resume_from_checkpoint {path!r} is from a {state.get('run_type')} run, this is a {run_type} run; "
                        f"resume it with {other} or choose another checkpoint")
    return path, state


def _checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-STEP folder, oldest first, complete or not: 'latest' names the
    newest even when its state file is gone, rather than silently falling back to an older one."""
    if not os.path.isdir(output_dir):
        return []
    return sorted((int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
                  for m in [_NAME.match(name)] if m and os.path.isdir(os.path.join(output_dir, name)))


def _damaged_latest(path: str, damage: Exception, older: list[tuple[int, str]]) -> str:
    """The error for 'latest' when the newest checkpoint is damaged: it, what is wrong, the newest intact one."""
    intact = None
    for _, candidate in reversed(older):
        try:
            _check(candidate)
            intact = os.path.basename(candidate)
            break
        except verify.Damaged:
            continue
    name = os.path.basename(path)
    fix = (f"the newest intact checkpoint is {intact}: resume from it with --resume_from_checkpoint {intact} (the steps "
           f"after it are trained again), or copy {name} again from where it was written") if intact else \
        (f"{'no older checkpoint is intact' if older else 'there is no older checkpoint'}: copy {name} again from "
         "where it was written, or start over with --overwrite_output_dir")
    return f"--resume_from_checkpoint latest: the newest checkpoint {path!r} is damaged: {damage}; nothing was loaded; {fix}"


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
        device_states.save(accelerator, partial)  # what accelerate leaves out (NPU random states)
    except Exception as err:  # judged below, after every rank is done: a full disk or a bug
        error = err
    accelerator.wait_for_everyone()
    # every process hashes what it wrote; the main one learns of any process's failure
    recorded, failure = manifest.build(accelerator, partial, saved=error is None)
    if accelerator.is_main_process:
        try:
            if error is not None:
                raise error
            if failure is not None:
                raise _ProcessFailed(failure)
            with open(os.path.join(partial, STATE_FILE), "w") as f:
                json.dump(manifest.seal({**state, "manifest": recorded}), f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # the same step written again after a resume: replace it
                discard_dir(final)
            os.replace(partial, final)
        except Exception as err:
            reason = str(err) if isinstance(err, _ProcessFailed) else write_failure(err, output_dir, _PROBE_BYTES)
            shutil.rmtree(partial, ignore_errors=True)
            if reason is None:
                raise
            previous = complete_checkpoints(output_dir)
            keep = f"the previous checkpoint {previous[-1][1]!r} is intact" if previous else "no earlier checkpoint exists"
            raise UserError(f"could not write checkpoint {final!r}: {reason}; {keep}; "
                            "free disk space or fix permissions, then resume with --resume_from_checkpoint latest") from None
        prune(output_dir, total_limit)
    elif error is not None:
        reason = write_failure(error, output_dir, _PROBE_BYTES)
        if reason is None:
            raise error
        raise UserError(f"could not write checkpoint {final!r} on this rank: {reason}")
    accelerator.wait_for_everyone()
    return final


class _ProcessFailed(Exception):
    """Another process could not write or read back its part of a checkpoint."""


def prune(output_dir: str, total_limit: int | None) -> list[str]:
    """Keep the newest total_limit complete checkpoints (at least the newest one)."""
    if not total_limit:
        return []
    found = complete_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - max(1, total_limit))]
    for _, path in doomed:
        discard_dir(path)
    return [p for _, p in doomed]


def register_state_hooks(args, accelerator, m) -> None:
    """What save_state/load_state write and read for our models (m: the run's Models): LoRA files for
    LoRA runs, diffusers-format model folders for full runs (checkpoint-STEP/transformer loads alone).
    Both are written with full weights under ZeRO-3 too (gathered; see fluxkit.weights.zero3); under
    DeepSpeed, resuming reads the engine's own sharded checkpoint and these files are for people."""
    if args.lora:
        te = m.text_encoder if args.train_text_encoder else None
        save_dtype = torch.float32 if args.upcast_before_saving else None
        save_hook, load_hook = lora_save_load_hooks(accelerator, m.transformer, te, save_dtype)
    else:
        ours = {"transformer": m.transformer}
        if args.train_text_encoder:
            ours["text_encoder"] = m.text_encoder

        def which(model):
            bare = unwrap_model(model)
            return next((name for name, mod in ours.items() if mod is bare), None)

        def save_hook(models, weights, output_dir):
            for i in reversed(range(min(len(models), len(weights)))):
                if which(models[i]):
                    weights.pop(i)  # saved below in diffusers' layout instead of accelerate's
            for name, module in ours.items():  # every rank: under ZeRO-3 saving gathers the shards
                save_pretrained_gathered(module, os.path.join(output_dir, name), accelerator.is_main_process)

        def load_hook(models, input_dir):
            from safetensors.torch import load_file

            for i in reversed(range(len(models))):
                name = which(models[i])
                if name is None:
                    continue
                models.pop(i)
                folder = os.path.join(input_dir, name)
                shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
                if not shards:  # never fall back to pickle formats: loading those can run code
                    raise UserError(f"checkpoint {input_dir!r} holds no {name} weights as .safetensors in {folder!r} "
                                    "(.bin/.pt pickles are refused); resume from a checkpoint this trainer wrote")
                state = {}
                for f in shards:
                    state.update(load_file(os.path.join(folder, f)))
                ours[name].load_state_dict(state)
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ------------------------------------------------------------------------------ the run's lifecycle

PREVIOUS_RUN_SUFFIX = ".old-"
# files a finished or interrupted run leaves in output_dir (the launcher's logs/ and run_config.json are not among them:
# a launcher writes them for the run it is starting, before the trainer judges the folder)
_RUN_FILES = ("train_log.jsonl", "train_summary.json")
# what only a finished run leaves: its final weights (the LoRA file, or the full fine-tune's pipeline folder) and
# its summary; a fresh run there would silently replace them
_FINISHED_RUN_FILES = ("pytorch_lora_weights.safetensors", "model_index.json", "train_summary.json")


def run_settings(args, world_size: int) -> dict:
    """What a checkpoint records about the run that wrote it: a resume with other values would silently
    continue a different run (another learning rate, global batch, LoRA rank, base model or its quantization,
    or prompt embeddings from a text encoder quantized otherwise)."""
    model = args.pretrained_model_name_or_path
    return {"run_type": "lora" if args.lora else "full", "world_size": world_size,
            "train_batch_size": args.train_batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "learning_rate": args.learning_rate, "rank": args.rank, "base_quantization": args.base_quantization,
            "text_encoder_quantization": args.text_encoder_quantization,
            "model": os.path.abspath(model) if os.path.exists(model) else model, "pivotal": pivotal_settings(args)}


def changed_settings(recorded: dict, now: dict) -> list[str]:
    """'name old -> new' for each recorded setting that differs (settings a checkpoint lacks are not judged)."""
    changes = []
    batch = ("world_size", "train_batch_size", "gradient_accumulation_steps")
    if all(k in recorded for k in batch) and any(recorded[k] != now[k] for k in batch):
        changes.append("world size x batch x accumulation " + "x".join(str(recorded[k]) for k in batch) + " -> "
                       + "x".join(str(now[k]) for k in batch))
    for key in ("learning_rate", "rank", "base_quantization", "text_encoder_quantization", "model", "pivotal"):
        if key in recorded and recorded[key] != now[key]:
            changes.append(f"{key} {recorded[key]} -> {now[key]}")
    return changes


def previous_run(output_dir: str) -> list[str]:
    """What of another run output_dir holds: its checkpoints (complete or partial) and run files."""
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    found = [checkpoint_name(step) for step, _ in complete_checkpoints(output_dir)]
    found += [n for n in names if n.startswith(PARTIAL_PREFIX + "checkpoint-")]
    return found + [n for n in dict.fromkeys(_RUN_FILES + _FINISHED_RUN_FILES) if n in names]


def finished_run(output_dir: str) -> list[str]:
    """The files of a finished run output_dir holds (final weights, summary), or []."""
    if not os.path.isdir(output_dir):
        return []
    return [n for n in _FINISHED_RUN_FILES if os.path.isfile(os.path.join(output_dir, n))]


def check_run_folder(args, world_size: int, hand_over: bool = False) -> tuple[str, dict] | None:
    """The lifecycle rules, before anything is written: a fresh run never mixes with another run's
    checkpoints nor replaces a finished run's weights, and a resume continues only the run it names.
    Returns (checkpoint, state) or None. hand_over: a launcher's check, which its trainer need not repeat (_check)."""
    output_dir = args.output_dir
    overwrite = args.overwrite_output_dir
    if args.resume_from_checkpoint and overwrite:
        raise UserError("--resume_from_checkpoint continues the run in --output_dir and --overwrite_output_dir moves it "
                        "aside; give only one of them")
    start_over = f"start over with --overwrite_output_dir (the old run moves to {output_dir.rstrip(os.sep)}{PREVIOUS_RUN_SUFFIX}TIME)"
    if not args.resume_from_checkpoint:
        found = [checkpoint_name(step) for step, _ in complete_checkpoints(output_dir)]
        if found and not overwrite:
            raise UserError(f"--output_dir {output_dir!r} holds another run's checkpoints ({', '.join(found)}); continue "
                            f"that run with --resume_from_checkpoint latest, or {start_over}")
    resume = resolve_resume(output_dir, args.resume_from_checkpoint, "lora" if args.lora else "full", hand_over)
    if resume is None:  # a fresh run (also 'latest' with no checkpoint to continue)
        done = finished_run(output_dir)
        if done and not overwrite:
            raise UserError(f"--output_dir {output_dir!r} holds a finished run ({', '.join(done)}) that a new run would "
                            f"replace; {start_over}, or choose another --output_dir")
        return None
    if not args.allow_changed_settings:
        path, state = resume
        changes = changed_settings(state, run_settings(args, world_size))
        if changes:
            raise UserError(f"--resume_from_checkpoint {path!r} was written by a run whose settings differ: "
                            f"{'; '.join(changes)}; resume with that run's settings, or pass --allow_changed_settings "
                            "to continue it with these")
    return resume


def move_aside_previous_run(output_dir: str) -> str | None:
    """--overwrite_output_dir: rename an output_dir that holds another run to OUTPUT_DIR.old-TIME (kept,
    never deleted: the user removes it when sure). Returns the new name, or None when there was no run."""
    import time

    if not previous_run(output_dir):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = output_dir.rstrip(os.sep)
    target, n = f"{base}{PREVIOUS_RUN_SUFFIX}{stamp}", 1
    while os.path.exists(target):
        n += 1
        target = f"{base}{PREVIOUS_RUN_SUFFIX}{stamp}-{n}"
    try:
        os.rename(output_dir, target)
    except OSError as err:
        raise UserError(f"--overwrite_output_dir: cannot move the previous run in {output_dir!r} aside to {target!r} "
                        f"({err.strerror or err}); move or delete it yourself") from None
    return target
