"""The launcher's checks, each one line and exit status 2 before anything is written: its own keys,
the accelerate config, the model folder, the data, the trainer's arguments (by the trainer's own
parser), the memory plan and the output folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys

from ..shared.environment import TOOLKIT_ROOT as ROOT
from ..shared.environment import hf_offline, is_hub_id, pipeline_folder_problem
from ..shared.errors import UserError
from .command import LaunchPlan
from .keys import Request
from .spec import ACCELERATE_CONFIG, KEY_OF_FLAG, OWNED_FLAGS


def _need_int(opts, key, minimum):
    value = str(opts[key])
    if not re.fullmatch(r"[0-9]+", value):
        raise UserError(f"--{key}='{value}' is not a whole number; pass --{key}=N")
    if int(value) < minimum:
        raise UserError(f"--{key}={value} is too small; it must be at least {minimum}")


def check_keys(req: Request) -> None:
    """The launcher's own keys; the trainer's values are the trainer parser's to judge."""
    o = req.opts
    # the keys the launcher itself reads as numbers (accelerate's settings, the effective batch); the
    # trainer's values (steps, resolution, learning rate, seed ...) are its parser's to judge (validate_trainer_args)
    for key in ("batch_size", "gradient_accumulation_steps", "num_machines"):
        _need_int(o, key, 1)
    _need_int(o, "machine_rank", 0)
    if o["seed"] != "":  # empty: no seed, as the trainer's default; its parser takes a negative one numpy refuses
        _need_int(o, "seed", 0)
    _need_int(o, "lr_warmup_steps", 0)  # (the trainer's parser takes a negative one)
    for key in ("num_processes", "main_process_port"):
        if o[key] != "":
            _need_int(o, key, 1)
    if o["dataloader_num_workers"] != "auto":
        _need_int(o, "dataloader_num_workers", 0)
    if o["mixed_precision"] not in ("bf16", "fp16", "no"):
        raise UserError(f"--mixed_precision='{o['mixed_precision']}' is not one of bf16, fp16, no")
    if o["validation"] not in ("auto", "full"):
        raise UserError(f"--validation='{o['validation']}' is not one of auto, full")
    if o["device"] not in ("auto", "npu", "cuda", "cpu"):
        raise UserError(f"--device='{o['device']}' is not one of auto, npu, cuda, cpu")
    for key in ("model_name", "output_dir", "config_file") + (("instance_prompt",) if o["train_script"] else ()):
        if not o[key]:
            raise UserError(f"--{key} is empty; pass --{key}=VALUE")
    machines = int(o["num_machines"])
    if int(o["machine_rank"]) >= machines:
        raise UserError(f"--machine_rank={o['machine_rank']} (NODE_RANK) must be below --num_machines={machines} (NNODES)")
    if machines > 1 and not o["main_process_ip"]:
        raise UserError(f"--num_machines={machines} needs machine 0's address: set MASTER_ADDR or --main_process_ip=HOST")
    if o["num_processes"] and int(o["num_processes"]) % machines:
        raise UserError(f"--num_processes={o['num_processes']} does not split evenly over --num_machines={machines}")
    # exactly one data source: the one the user named wins over the other's default
    if o.get("dataset_name") and o.get("instance_dir"):
        if {"dataset_name", "instance_dir"} <= req.given:
            raise UserError("--dataset_name and --instance_dir were both given; pass only one of them")
        o["dataset_name" if "instance_dir" in req.given else "instance_dir"] = ""
    if not o.get("dataset_name") and not o.get("instance_dir"):
        raise UserError("no training data: pass --instance_dir=PATH or --dataset_name=PATH")
    named = {"dataset_name", "instance_dir"} & req.given
    if named and req.spec.data_defaults_key not in named:  # the reference's prompts name its data, not the user's
        for key in req.spec.data_defaults:
            if key not in req.given:
                o[key] = ""  # our trainer's data scan names a missing --instance_prompt in one line
    for arg in req.extra:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--") or len(flag) < 4:
            continue
        # argparse also takes unambiguous prefixes (--gradient_acc=8), so those count too
        for owned, key in OWNED_FLAGS.items():
            if owned.startswith(flag):
                raise UserError(f"{flag} after -- would disagree with what the launcher hands to accelerate/DeepSpeed; "
                                f"use the launcher's --{key}=VALUE (before --) instead")


def resolve_config_file(path: str) -> str:
    """The accelerate config: looked up in the caller's folder first, then beside the launcher."""
    if not os.path.exists(path) and "/" not in path and os.path.exists(os.path.join(ROOT, path)):
        return os.path.join(ROOT, path)
    return path


def check_accelerate_config(path: str, grad_accum: int, batch_size: int) -> dict:
    """Load the accelerate config and refuse anything that would change the effective batch."""
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"config_file {path!r} does not exist; pass --config_file=PATH to an accelerate config "
                        f"(the toolkit ships {ACCELERATE_CONFIG})")
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"config_file {path!r} is not readable YAML ({err}); fix it or pass another --config_file") from None
    if not isinstance(config, dict):
        raise UserError(f"config_file {path!r} is not an accelerate config (expected a YAML mapping)")
    ds = config.get("deepspeed_config") or {}
    ds_file = ds.get("deepspeed_config_file")
    if ds_file:
        # accelerate then ignores --gradient_accumulation_steps and DeepSpeed's JSON wins silently
        ds_path = ds_file if os.path.isabs(ds_file) else os.path.join(os.path.dirname(os.path.abspath(path)), ds_file)
        if not os.path.isfile(ds_path) and os.path.isfile(ds_file):
            ds_path = ds_file
        try:
            with open(ds_path) as f:
                ds_json = json.load(f)
        except (OSError, ValueError) as err:
            raise UserError(f"deepspeed_config_file {ds_file!r} named in {path!r} cannot be read ({err})") from None
        config["deepspeed_config_file_contents"] = ds_json
        # (a fixed train_batch_size that disagrees is already a loud error in accelerate/DeepSpeed)
        expected = {"gradient_accumulation_steps": ("gradient_accumulation_steps", grad_accum),
                    "train_micro_batch_size_per_gpu": ("batch_size", batch_size)}
        for name, (key, want) in expected.items():
            have = ds_json.get(name, "auto")
            if have == "auto":
                continue
            if not isinstance(have, int) or isinstance(have, bool):
                raise UserError(f"{ds_file} sets {name}={have!r}; use a whole number or \"auto\"")
            if have != want:
                raise UserError(f"{ds_file} sets {name}={have} but the launcher's {key} gives {want}; DeepSpeed would "
                                f"silently use {have}: set it to \"auto\" in {ds_file} or pass --{key}={have}")
    elif "gradient_accumulation_steps" in ds and str(ds["gradient_accumulation_steps"]) != str(grad_accum):
        # harmless under the launcher (its --gradient_accumulation_steps wins), but say so once
        print(f"note: {path} sets gradient_accumulation_steps={ds['gradient_accumulation_steps']}; "
              f"the launcher's value {grad_accum} is used for both accelerate and the trainer", file=sys.stderr)
    return config


def check_model(model: str) -> None:
    if os.path.exists(model):
        problem = pipeline_folder_problem(model)
        if problem:
            raise UserError(f"model_name {model!r} {problem}; pass --model_name=PATH to a complete FLUX pipeline folder "
                            "(make_tiny_flux.py builds one) or a hub id")
        return
    if not is_hub_id(model):
        raise UserError(f"model_name {model!r}: no such pipeline folder; pass --model_name=PATH to a FLUX pipeline "
                        "folder or a hub id such as black-forest-labs/FLUX.1-dev")
    if hf_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
            raise UserError(f"model_name {model!r} is not a local folder and not in the hub cache, and HF_HUB_OFFLINE "
                            "is set; download it first or pass --model_name=PATH to a local pipeline folder")


def check_data(opts: dict) -> None:
    name, folder = opts.get("dataset_name"), opts.get("instance_dir")
    if name and not os.path.exists(name) and not is_hub_id(name):
        raise UserError(f"dataset_name {name!r}: no such folder or file; pass --dataset_name=PATH to a local dataset "
                        "(e.g. a copy of lambdalabs/pokemon-blip-captions) or a hub id ORG/NAME")
    if folder:
        if not os.path.isdir(folder):
            raise UserError(f"instance_dir {folder!r}: no such folder; pass --instance_dir=PATH to a folder of instance "
                            "images (or --dataset_name=... instead)")
        if not any(not n.startswith(".") for n in os.listdir(folder)):
            raise UserError(f"instance_dir {folder!r} is empty; put the subject's images there")


def scan_training_data(args, world_size: int) -> int:
    """The trainer's data scan (fluxkit.data.scan: image headers, captions, columns, enough samples per
    process), run here so that a data mistake is one line before any process starts; its sample count."""
    from ..data.scan import scan_dataset

    with contextlib.redirect_stderr(io.StringIO()):  # datasets' progress bars; mistakes come as UserError
        return scan_dataset(args, world_size=world_size, quiet=True).num_samples


def validate_trainer_args(argv: list[str], lora: bool):
    """The trainer's parser and value checks on exactly the arguments it will get: its error as one UserError."""
    from ..training.train_args import parse

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return parse(argv, lora=lora)
    except SystemExit:  # the parser's one line: `prog: error: message` (fluxkit.shared.errors.FlagParser)
        message = [line for line in captured.getvalue().splitlines() if ": error: " in line]
        raise UserError(message[-1].split(": error: ", 1)[1] if message else captured.getvalue().strip()) from None


@contextlib.contextmanager
def in_launcher_words(req: Request):
    """The trainer's own checks, run by the launcher (its parser, the data scan, the run folder, the
    memory plan): their one line names a flag as the user named it, the launcher's key (--batch_size)
    for the trainer's flag (--train_batch_size) unless the user typed the trainer's name; a key left at
    the launcher's default is named as the launcher's key too (that is the name that changes it)."""
    try:
        yield
    except UserError as err:
        raise UserError(launcher_words(str(err), req)) from None


def launcher_words(text: str, req: Request) -> str:
    for flag, key in KEY_OF_FLAG.items():
        if key not in req.trainer_spelling:
            text = re.sub(rf"--{flag}\b", f"--{key}", text)
    return text


def check_memory(trainer_args, plan: LaunchPlan, info, accelerate_config: dict):
    """The memory plan of the run about to start (fluxkit.plan.check_fits): (plan or None, its line).
    Raises UserError when it cannot fit, unless --ignore_memory_plan (a dry run too: it says what the run does)."""
    from ..shared.device import zero_stage
    from ..plan import accelerate_offload, check_fits

    return check_fits(trainer_args, plan.processes, zero_stage(accelerate_config) or 0, info,
                      processes_per_host=plan.per_machine, offload=accelerate_offload(accelerate_config))


def check_cache_folder(trainer_args, write: bool) -> None:
    """A --latent_cache_dir the user gave must take files (the default one sits beside the output folder,
    whose own check names the right flag); a dry run judges it without making it."""
    from ..cache import cache_root, check_cache_dir
    from ..shared.fsio import creatable_problem

    if write:
        check_cache_dir(trainer_args, given_only=True)
        return
    root = cache_root(trainer_args)
    problem = creatable_problem(root) if root is not None and trainer_args.latent_cache_dir else None
    if problem:
        raise UserError(f"--latent_cache_dir {root!r} cannot be created or written ({problem}); choose another folder")


def check_output_dir(path: str) -> None:
    """A folder the run can create and write (judged without writing: a dry run checks it too)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"output_dir {path!r} is a file; pass --output_dir=PATH to a folder")
    from ..shared.fsio import creatable_problem

    problem = creatable_problem(path)
    if problem:
        raise UserError(f"output_dir {path!r} cannot be created or written ({problem}); pass --output_dir=PATH "
                        "to a folder you can write")
