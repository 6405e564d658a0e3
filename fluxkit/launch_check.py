"""Pre-flight checks of the fine-tuning launchers, run before anything heavy starts.

    python -m fluxkit.launch_check --prog NAME --config_file CFG --gradient_accumulation_steps N ... [-- TRAINER_ARGS]

It detects the device through fluxkit.device (so the npu > cuda > cpu rule lives in one place),
checks the accelerate config, the model and data paths and the trainer arguments, and prints
`key=value` lines for the shell launcher: device_type, device_count, main_process_port.
A mistake is one line `PROG: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys

from .errors import UserError, report_user_error

# A hub id is exactly ORG/NAME; anything else that is not on disk is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")

# Trainer flags whose values the launcher also hands to accelerate/DeepSpeed or records in its
# summary: set after `--` they would disagree with what DeepSpeed uses, so they must go
# through the launcher's keys.
_LAUNCHER_OWNED = {
    "--gradient_accumulation_steps": "gradient_accumulation_steps",
    "--train_batch_size": "batch_size",
    "--mixed_precision": "mixed_precision",
    "--output_dir": "output_dir",
}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def check_config(path: str, grad_accum: int, batch_size: int) -> dict:
    """Load the accelerate config and refuse anything that would change the effective batch."""
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"config_file {path!r} does not exist; pass --config_file=PATH to an accelerate config "
                        "(the toolkit ships pretrain_bf16_accelerate_config.yaml)")
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
        # (a fixed train_batch_size that disagrees is already a loud error in accelerate/DeepSpeed)
        expected = {"gradient_accumulation_steps": ("gradient_accumulation_steps", grad_accum),
                    "train_micro_batch_size_per_gpu": ("batch_size", batch_size)}
        for field, (key, want) in expected.items():
            have = ds_json.get(field, "auto")
            if have == "auto":
                continue
            if not isinstance(have, int) or isinstance(have, bool):
                raise UserError(f"{ds_file} sets {field}={have!r}; use a whole number or \"auto\"")
            if have != want:
                raise UserError(f"{ds_file} sets {field}={have} but the launcher's {key} gives {want}; DeepSpeed would "
                                f"silently use {have}: set it to \"auto\" in {ds_file} or pass --{key}={have}")
    elif "gradient_accumulation_steps" in ds:
        # harmless under the launcher (its --gradient_accumulation_steps wins), but say so once
        if str(ds["gradient_accumulation_steps"]) != str(grad_accum):
            print(f"note: {path} sets gradient_accumulation_steps={ds['gradient_accumulation_steps']}; "
                  f"the launcher's value {grad_accum} is used for both accelerate and the trainer", file=sys.stderr)
    return config


def check_model(model: str) -> None:
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise UserError(f"model_name {model!r} is a folder without model_index.json, not a FLUX pipeline; "
                            "pass --model_name=PATH to a pipeline folder (make_tiny_flux.py builds one) or a hub id")
        return
    if os.path.exists(model) or not _HUB_ID.match(model):
        raise UserError(f"model_name {model!r}: no such pipeline folder; pass --model_name=PATH to a FLUX pipeline "
                        "folder or a hub id such as black-forest-labs/FLUX.1-dev")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json")
        if not isinstance(cached, str):
            raise UserError(f"model_name {model!r} is not a local folder and not in the hub cache, and HF_HUB_OFFLINE "
                            "is set; download it first or pass --model_name=PATH to a local pipeline folder")


def check_dataset(name: str) -> None:
    if os.path.exists(name):
        return
    if not _HUB_ID.match(name):
        raise UserError(f"dataset_name {name!r}: no such folder or file; pass --dataset_name=PATH to a local dataset "
                        "(e.g. a copy of lambdalabs/pokemon-blip-captions) or a hub id ORG/NAME")


def check_instance_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise UserError(f"instance_dir {path!r}: no such folder; pass --instance_dir=PATH to a folder of instance "
                        "images (or --dataset_name=... instead)")
    if not any(not n.startswith(".") for n in os.listdir(path)):
        raise UserError(f"instance_dir {path!r} is empty; put the subject's images there")


def check_trainer_args(trainer_args: list[str]) -> None:
    for arg in trainer_args:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--") or len(flag) < 4:
            continue
        # argparse also takes unambiguous prefixes (--gradient_acc=8), so those count too
        for owned, key in _LAUNCHER_OWNED.items():
            if owned.startswith(flag):
                raise UserError(f"{flag} after -- would disagree with what the launcher hands to accelerate/DeepSpeed; "
                                f"use the launcher's --{key}=VALUE (before --) instead")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prog", default="launcher", help="name used in error messages")
    p.add_argument("--device", default="auto")
    p.add_argument("--config_file", required=True)
    p.add_argument("--gradient_accumulation_steps", type=int, required=True)
    p.add_argument("--batch_size", type=int, required=True)
    p.add_argument("--mixed_precision", default=None)
    p.add_argument("--model_name", default=None)
    p.add_argument("--dataset_name", default=None)
    p.add_argument("--instance_dir", default=None)
    p.add_argument("--output_dir", default=None)
    p.add_argument("--train_script", default=None)
    p.add_argument("--need_port", action="store_true", help="pick a free main process port")
    p.add_argument("--skip_paths", action="store_true", help="do not check model/data paths (dry run)")
    argv = list(argv)
    trainer_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, trainer_args = argv[:cut], argv[cut + 1:]
    return p.parse_args(argv), trainer_args


def run(args, trainer_args) -> list[tuple[str, str]]:
    from .device import check_mixed_precision, detect

    check_trainer_args(trainer_args)
    check_config(args.config_file, args.gradient_accumulation_steps, args.batch_size)
    if args.train_script and not os.path.isfile(args.train_script):
        raise UserError(f"train_script {args.train_script!r}: no such file; pass --train_script=PATH to a training script")
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"output_dir {args.output_dir!r} is a file; pass --output_dir=PATH to a folder")
    info = detect(args.device)
    check_mixed_precision(info, args.mixed_precision)
    if not args.skip_paths:
        if args.model_name:
            check_model(args.model_name)
        if args.dataset_name:
            check_dataset(args.dataset_name)
        if args.instance_dir:
            check_instance_dir(args.instance_dir)
    out = [("device_type", info.type), ("device_count", str(info.count))]
    if args.need_port:
        out.append(("main_process_port", str(free_port())))
    return out


def main(argv=None) -> int:
    args, trainer_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        for key, value in run(args, trainer_args):
            print(f"{key}={value}")
    except UserError as err:
        return report_user_error(err, prog=args.prog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
