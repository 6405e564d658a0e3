"""The fine-tuning launchers (finetune_flux_dreambooth*_deepspeed_bf16.sh) in Python.

    python -m fluxkit.launch --launcher lora PROG [--key=value ...] [--dry_run] [--demo] [-- TRAINER_ARGS ...]

The two .sh files exec this with their identity (`full` or `lora`); each launcher's defaults are
data (LAUNCHERS below). A run goes: read keys (command line over --config FILE over the demo's
values over the defaults), build the trainer's argument list, validate it with the trainer's own
parser and checks (model folder, data, output folder), pick devices and processes, then run
`accelerate launch` with its output passed through a console filter into OUTPUT/logs/, and end
with the trainer's summary (CASE_NAME.log) or one line with the trainer's exit status.
Every user mistake is one `PROG: error: ...` line, exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from . import run_summary
from .environment import TOOLKIT_ROOT, free_port, hf_offline, is_hub_id, pipeline_folder_problem
from .errors import EXIT_STATUS_ENV, EXIT_USER_ERROR, UserError, report_user_error
from .run_config import masked

ROOT = TOOLKIT_ROOT
ACCELERATE_CONFIG = "pretrain_bf16_accelerate_config.yaml"


@dataclass(frozen=True)
class Launcher:
    """One launcher: its trainer, its keys in --help order and the reference's values for them.

    `defaults` also holds the reference's fixed trainer settings (guidance 1, gradient
    checkpointing, ...): like every trainer flag they are keys, so a user can still change them.
    """
    kind: str  # full | lora
    network: str  # the reference's network name, used in CASE_NAME.log and the log file name
    trainer: str  # our trainer script, beside the launchers
    description: str
    keys: tuple  # this launcher's named keys, in --help order (COMMON_KEYS follow)
    defaults: dict
    demo: dict = field(default_factory=dict)  # values under --demo ("{cache}" = the demo cache); given keys win


COMMON_KEYS = ("lr_scheduler", "lr_warmup_steps", "dataloader_num_workers", "resume_from_checkpoint", "config_file",
               "num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port", "device",
               "train_script")
COMMON_DEFAULTS = {"config_file": ACCELERATE_CONFIG, "num_processes": "", "num_machines": "1", "machine_rank": "0",
                   "main_process_ip": "", "main_process_port": "", "device": "auto", "train_script": "",
                   "resume_from_checkpoint": "",
                   # the reference's constant schedule; a warm-up given without a scheduler turns it into
                   # constant_with_warmup (a constant schedule ignores warm-up)
                   "lr_scheduler": "constant", "lr_warmup_steps": "0"}

LAUNCHERS = {
    "full": Launcher(
        kind="full", network="FluxDreambooth", trainer="train_flux_dreambooth.py",
        description="Full DreamBooth fine-tuning of FLUX.1 (every transformer weight trains; output: a complete pipeline folder).",
        keys=("model_name", "instance_dir", "dataset_name", "instance_prompt", "batch_size", "resolution",
              "gradient_accumulation_steps", "learning_rate", "max_train_steps", "mixed_precision", "checkpointing_steps",
              "seed", "output_dir"),
        defaults={"model_name": "black-forest-labs/FLUX.1-dev", "instance_dir": "dog", "dataset_name": "",
                  "instance_prompt": "a photo of sks dog", "batch_size": "16", "resolution": "256",
                  "gradient_accumulation_steps": "4", "learning_rate": "1e-5", "max_train_steps": "5000",
                  "mixed_precision": "bf16", "checkpointing_steps": "50000", "seed": "0", "output_dir": "output_flux_dreambooth",
                  "dataloader_num_workers": "0",
                  "guidance_scale": "1", "gradient_checkpointing": True, "max_grad_norm": "1"},
        demo={"model_name": "{cache}/tiny_flux", "instance_dir": "{cache}/data/instance", "dataset_name": "",
              "resolution": "32", "batch_size": "1", "gradient_accumulation_steps": "2", "learning_rate": "1e-4",
              "max_train_steps": "30", "output_dir": "output_flux_dreambooth_demo", "report_to": "none"}),
    "lora": Launcher(
        kind="lora", network="FluxLora", trainer="train_flux_dreambooth_lora.py",
        description="DreamBooth-LoRA fine-tuning of FLUX.1 (output: pytorch_lora_weights.safetensors for FluxPipeline.load_lora_weights).",
        keys=("model_name", "dataset_name", "instance_dir", "caption_column", "instance_prompt", "validation_prompt",
              "batch_size", "resolution", "gradient_accumulation_steps", "learning_rate", "rank", "lora_alpha",
              "max_train_steps", "mixed_precision", "checkpointing_steps", "seed", "output_dir"),
        defaults={"model_name": "black-forest-labs/FLUX.1-dev", "dataset_name": "pokemon-blip-captions", "instance_dir": "",
                  "caption_column": "text", "instance_prompt": "a photo of pokemon",
                  "validation_prompt": "A photo of pokemon in a bucket", "batch_size": "8", "resolution": "512",
                  "gradient_accumulation_steps": "1", "learning_rate": "1e-6", "rank": "4", "lora_alpha": "4",
                  "max_train_steps": "5000", "mixed_precision": "bf16", "checkpointing_steps": "5001", "seed": "0",
                  "output_dir": "output_flux_dreambooth_lora",
                  "dataloader_num_workers": "auto",  # the reference's 8, at most the cores each process has (data.py)
                  "gradient_checkpointing": True, "validation_epochs": "500"},
        demo={"model_name": "{cache}/tiny_flux", "dataset_name": "{cache}/data/captioned", "instance_dir": "",
              "validation_prompt": "a red circle on a gray background", "resolution": "32", "batch_size": "2",
              "gradient_accumulation_steps": "1", "learning_rate": "1e-4", "max_train_steps": "30",
              "output_dir": "output_flux_dreambooth_lora_demo", "report_to": "none", "dataloader_num_workers": "0",
              "num_validation_images": "1", "num_validation_steps": "4"}),
}

# Launcher keys whose trainer flag has another name; the trainer's name is accepted as the key too.
TRAINER_NAME = {"model_name": "pretrained_model_name_or_path", "instance_dir": "instance_data_dir",
                "batch_size": "train_batch_size"}
KEY_OF_FLAG = {v: k for k, v in TRAINER_NAME.items()}
# Keys that are the launcher's own (accelerate's settings), not trainer flags.
LAUNCHER_ONLY = ("config_file", "num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                 "train_script")
# Trainer flags the launcher also hands to accelerate/DeepSpeed or reads itself: after `--` they would
# disagree with what DeepSpeed uses, so they go through the keys.
OWNED_FLAGS = {"--gradient_accumulation_steps": "gradient_accumulation_steps", "--train_batch_size": "batch_size",
               "--mixed_precision": "mixed_precision", "--output_dir": "output_dir"}

KEY_HELP = {
    "model_name": "FLUX pipeline folder or hub id",
    "dataset_name": "dataset folder/parquet or hub id ORG/NAME (image + caption columns); replaces instance_dir",
    "instance_dir": "folder of the subject's images; replaces dataset_name",
    "instance_prompt": "prompt naming the subject (the caption when the data has none)",
    "caption_column": "caption column of dataset_name (empty: instance_prompt for every image)",
    "validation_prompt": "prompt rendered at validation (empty: no validation)",
    "batch_size": "micro batch per device (--train_batch_size)",
    "max_train_steps": "optimizer steps",
    "mixed_precision": "bf16, fp16 or no; given to accelerate and the trainer",
    "resolution": "training resolution (a multiple of 16)",
    "gradient_accumulation_steps": "micro batches per optimizer step; given to accelerate/DeepSpeed and the trainer",
    "learning_rate": "learning rate",
    "rank": "LoRA rank",
    "lora_alpha": "LoRA alpha (scale = lora_alpha / rank)",
    "lr_scheduler": "learning rate schedule (with lr_warmup_steps > 0 and no scheduler given: constant_with_warmup)",
    "lr_warmup_steps": "warm-up steps of the schedule",
    "dataloader_num_workers": "data loader workers per process (auto: the reference's 8, at most the cores per process - 1)",
    "resume_from_checkpoint": "'latest', a checkpoint-STEP name inside output_dir, or a path",
    "config_file": "accelerate config (DeepSpeed ZeRO-2 bf16); looked up here, then beside this launcher",
    "num_processes": "processes in total over all machines (default: devices per machine x num_machines)",
    "num_machines": "machines (env NNODES); run the launcher on each one",
    "machine_rank": "this machine's rank, 0 = main (env NODE_RANK)",
    "main_process_ip": "address of machine 0 (env MASTER_ADDR); needed with num_machines > 1",
    "main_process_port": "port on machine 0 (env MASTER_PORT; default: a free port, 29500 multi-node)",
    "output_dir": "weights, checkpoints, run_config.json, logs/train_*.log, logs/CASE_NAME.log, train_summary.json",
    "checkpointing_steps": "save a resumable checkpoint every N steps",
    "seed": "random seed",
    "device": "auto (npu > cuda > cpu), npu, cuda or cpu",
    "train_script": "another trainer, e.g. diffusers' upstream script, run through patch_flux.py (default: ours)",
}

# Ascend settings the reference exports; only on NPU hosts, and a value already in the caller's
# environment wins.
ASCEND_ENV = {
    "ASCEND_SLOG_PRINT_TO_STDOUT": "0",  # CANN logs to files, not the training log
    "ASCEND_GLOBAL_LOG_LEVEL": "3",  # errors only
    "ASCEND_GLOBAL_EVENT_ENABLE": "0",
    "TASK_QUEUE_ENABLE": "2",  # level-2 operator queue pipelining
    "COMBINED_ENABLE": "1",  # fuse non-contiguous copy chains
    "HCCL_WHITELIST_DISABLE": "1",
    "HCCL_CONNECT_TIMEOUT": "1200",  # seconds; many ranks start slowly
    "HCCL_EXEC_TIMEOUT": "3600",  # seconds; rank 0 writing a 12B checkpoint keeps the others waiting
    "ACLNN_CACHE_LIMIT": "100000",  # operator cache entries on the host
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",  # less fragmentation with gradient checkpointing
    "CPU_AFFINITY_CONF": "1",  # bind each rank's threads near its NPU
}


# ------------------------------------------------------------------------------------- the keys

def _is_switch(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


@dataclass
class Request:
    """What the user asked for: key values (defaults filled in), which keys were given, modes, trainer args."""
    spec: Launcher
    prog: str  # the launcher's name, for messages
    invoked: str  # how it was called ($0), for the resume command
    argv: list  # the launcher's own arguments, for the resume hint
    opts: dict
    given: set
    extra: list
    dry_run: bool = False
    demo: bool = False
    verbose: bool = False
    config: str | None = None


def parse_command_line(spec: Launcher, prog: str, argv: list[str]) -> Request:
    from .train_args import trainer_flags  # deferred (imports torch): --help and key errors stay fast

    flags = trainer_flags(spec.kind == "lora")
    known = set(spec.keys) | set(COMMON_KEYS) | {k for k in flags if k not in KEY_OF_FLAG} | set(KEY_OF_FLAG)
    known -= {"local_rank"}
    opts = dict(spec.defaults)
    for key, value in COMMON_DEFAULTS.items():
        opts.setdefault(key, value)
    req = Request(spec=spec, prog=os.path.basename(prog), invoked=prog, argv=list(argv), opts=opts, given=set(), extra=[])
    given_values = {}

    def unknown(key):
        return UserError(f"unknown option --{key}; known keys: {' '.join(spec.keys + COMMON_KEYS)}, any trainer flag "
                         "(see --help), --config, --verbose, --dry_run, --demo, --help")

    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            req.extra = args[i:]
            break
        if arg in ("-h", "--help"):
            print(usage(spec, os.path.basename(prog)))
            raise SystemExit(0)
        if arg in ("--dry_run", "--demo", "--verbose"):
            setattr(req, arg[2:], True)
            continue
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{arg}': options are --key=value; trainer arguments go after --")
        key, has_value, value = arg[2:].partition("=")
        if key == "config":
            if not has_value:
                if i >= len(args) or args[i].startswith("--"):
                    raise UserError("--config needs a file: --config=FILE (TOML or YAML)")
                value, i = args[i], i + 1
            req.config = value
            continue
        if key not in known:
            raise unknown(key)
        key = KEY_OF_FLAG.get(key, key)
        action = flags.get(TRAINER_NAME.get(key, key))
        if not has_value:
            if action is not None and _is_switch(action):
                value = True
            elif i < len(args) and not args[i].startswith("--"):  # `--key value`, as the trainer takes it
                value, i = args[i], i + 1
            else:
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
        elif action is not None and _is_switch(action):
            value = _switch_value(key, value)
        given_values[key] = value

    if req.config:
        for key, value in read_config(req.config, known, flags).items():
            if key not in given_values:
                req.opts[key] = value
                req.given.add(key)
    for key, value in given_values.items():
        req.opts[key] = value
        req.given.add(key)
    # multi-node settings may come from the environment; a key wins
    for key, var in (("num_machines", "NNODES"), ("machine_rank", "NODE_RANK"), ("main_process_ip", "MASTER_ADDR"),
                     ("main_process_port", "MASTER_PORT")):
        if key not in req.given and os.environ.get(var):
            req.opts[key] = os.environ[var]
            req.given.add(key)
    return req


def _switch_value(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise UserError(f"--{key}={value!r}: an on/off flag takes no value, or true/false")


def read_config(path: str, known: set, flags: dict) -> dict:
    """Key values from a TOML or YAML file (a run's run_config.json is one too: JSON is YAML)."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path!r}: no such file; pass --config=FILE with the same keys as the command line")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            import yaml

            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"--config {path!r} cannot be read ({' '.join(str(err).split())[:200]}); fix the file") from None
    except Exception as err:  # yaml.YAMLError
        raise UserError(f"--config {path!r} is not valid YAML ({' '.join(str(err).split())[:200]}); fix the file") from None
    if isinstance(data, dict) and isinstance(data.get("settings"), dict):
        data = data["settings"]  # a run_config.json: its settings section holds the keys
    if not isinstance(data, dict):
        raise UserError(f"--config {path!r} is not a mapping of key = value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UserError(f"--config {path!r}: unknown key {key!r}; use the launcher's keys or trainer flags")
        name = KEY_OF_FLAG.get(name, name)
        if value is None:
            value = ""
        action = flags.get(TRAINER_NAME.get(name, name))
        if action is not None and _is_switch(action):
            try:
                value = _switch_value(name, value)
            except UserError as err:  # name the file: the command line does not show the value
                raise UserError(f"--config {path!r}: {err}") from None
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        else:
            value = str(value)
        out[name] = value
    return out


def usage(spec: Launcher, prog: str) -> str:
    opts = dict(COMMON_DEFAULTS)
    opts.update(spec.defaults)
    lines = [f"Usage: {prog} [--key=value ...] [--config FILE] [--dry_run] [--demo] [--verbose] [-- TRAINER_ARGS ...]", "",
             spec.description,
             "Runs `accelerate launch` with DeepSpeed ZeRO-2 bf16 on Ascend NPUs, CUDA GPUs or CPUs (gloo),",
             "one process per device found, on one or many machines.", "",
             "Options, shown with their defaults (the reference's); override any as --key=value:"]
    for key in spec.keys + COMMON_KEYS:
        help_text = KEY_HELP.get(key, "")
        if key == "learning_rate" and spec.kind == "lora":
            help_text = "learning rate (the reference's 1e-6; LoRA usually wants about 1e-4)"
        lines += [f"  --{key}={opts.get(key, '')}", f"        {help_text}"]
    fixed = [k for k in spec.defaults if k not in spec.keys + COMMON_KEYS]
    lines += ["", "The reference's fixed trainer settings (keys too): "
              + " ".join(f"--{k}" if v is True else f"--{k}={v}" for k, v in spec.defaults.items() if k in fixed),
              "Every other flag of the trainer is a key as well (python "
              f"{spec.trainer} --help lists them): --key=value or --key value, a switch as --key.",
              "", "Modes:",
              "  --config FILE  read keys from a TOML or YAML file (the same names); the command line wins. A run's",
              "                 OUTPUT/run_config.json is such a file.",
              "  --dry_run      print the environment, the exact accelerate command and the memory plan per device,",
              "                 then exit (a run whose plan does not fit is refused: --ignore_memory_plan runs it)",
              "  --demo         build a tiny random FLUX and sample data into the demo cache (reused next time),",
              "                 train a few dozen steps with DeepSpeed on whatever hardware is here (about a",
              "                 minute on a CPU), generate images with the result and say where everything is",
              "  --verbose      show every line the libraries print (known noise is filtered otherwise)",
              "  -h, --help     this text", "",
              "Arguments after -- go to the trainer verbatim, e.g. -- --lr_warmup_steps=100 --report_to=none",
              "(except the flags the launcher hands to accelerate too: use its keys for those).", "",
              "Environment:",
              "  NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT",
              "                 multi-node, as --num_machines, --machine_rank, --main_process_ip,",
              "                 --main_process_port (the keys win)",
              "  PYTHON         interpreter with the toolkit's requirements (default: python3)",
              "  FLUXKIT_DEMO_DIR",
              "                 demo cache (default: ${XDG_CACHE_HOME:-$HOME/.cache}/fluxkit/demo)",
              "  OMP_NUM_THREADS, TOKENIZERS_PARALLELISM",
              "                 set everywhere (1 per process on NPU/GPU, cores / processes on CPU; false)",
              "  TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
              "                 seconds a signalled run may take to save its checkpoint before it is killed (600)",
              "  On NPU only, each unless already set (the reference's Ascend settings):"]
    lines += [f"                 {k}={v}" for k, v in ASCEND_ENV.items()]
    lines += ["", "SIGINT/SIGTERM to this launcher reach the trainer, which saves a checkpoint and exits 2; the launcher",
              "then prints the command that resumes the run.",
              "Exit status: the trainer's; 2 for bad input (one line naming the culprit, before anything starts)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the checks

def _need_int(opts, key, minimum):
    value = str(opts[key])
    if not re.fullmatch(r"[0-9]+", value):
        raise UserError(f"--{key}='{value}' is not a whole number; pass --{key}=N")
    if int(value) < minimum:
        raise UserError(f"--{key}={value} is too small; it must be at least {minimum}")


def check_keys(req: Request) -> None:
    """The launcher's own keys; the trainer's values are the trainer parser's to judge."""
    o = req.opts
    for key in ("batch_size", "max_train_steps", "resolution", "gradient_accumulation_steps", "checkpointing_steps",
                "num_machines", "rank", "lora_alpha"):
        if key in o and o[key] != "":
            _need_int(o, key, 1)
    if o["seed"] != "":  # empty: no seed, as the trainer's default
        _need_int(o, "seed", 0)
    _need_int(o, "machine_rank", 0)
    _need_int(o, "lr_warmup_steps", 0)
    for key in ("num_processes", "main_process_port"):
        if o[key] != "":
            _need_int(o, key, 1)
    if o["dataloader_num_workers"] != "auto":
        _need_int(o, "dataloader_num_workers", 0)
    try:
        float(o["learning_rate"])
    except ValueError:
        raise UserError(f"--learning_rate='{o['learning_rate']}' is not a number; pass e.g. --learning_rate=1e-4") from None
    if o["mixed_precision"] not in ("bf16", "fp16", "no"):
        raise UserError(f"--mixed_precision='{o['mixed_precision']}' is not one of bf16, fp16, no")
    if o["device"] not in ("auto", "npu", "cuda", "cpu"):
        raise UserError(f"--device='{o['device']}' is not one of auto, npu, cuda, cpu")
    for key in ("model_name", "output_dir", "config_file", "instance_prompt"):
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


def scan_training_data(args, world_size: int) -> None:
    """The trainer's data scan (fluxkit.scan: image headers, captions, columns, enough samples per
    process), run here so that a data mistake is one line before any process starts."""
    from .scan import scan_dataset

    with contextlib.redirect_stderr(io.StringIO()):  # datasets' progress bars; mistakes come as UserError
        scan_dataset(args, world_size=world_size, quiet=True)


def validate_trainer_args(argv: list[str], lora: bool):
    """The trainer's parser and value checks on exactly the arguments it will get: its error as one UserError."""
    from .train_args import parse_args

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return parse_args(argv, lora=lora)
    except SystemExit:  # argparse: usage and `prog: error: message` on stderr
        message = [line for line in captured.getvalue().splitlines() if ": error: " in line]
        raise UserError(message[-1].split(": error: ", 1)[1] if message else captured.getvalue().strip()) from None


def check_memory(trainer_args, plan: Plan, info, accelerate_config: dict, refuse: bool):
    """The memory plan of the run about to start (fluxkit.plan.check_fits): (plan or None, its line).
    Raises UserError when it cannot fit and refuse is set (not --dry_run, no --ignore_memory_plan)."""
    from .plan import check_fits

    zero = 0
    if accelerate_config.get("distributed_type") == "DEEPSPEED":
        ds_json = accelerate_config.get("deepspeed_config_file_contents")
        if ds_json is not None:
            zero = (ds_json.get("zero_optimization") or {}).get("stage", 0)
        else:
            zero = (accelerate_config.get("deepspeed_config") or {}).get("zero_stage", 0)
        zero = int(zero) if str(zero).isdigit() else 0
    memory, line = check_fits(trainer_args, plan.processes, zero, info, processes_per_host=plan.per_machine,
                              ignore=None if refuse else True)
    if not refuse and memory is not None and memory.fits is False and not trainer_args.ignore_memory_plan:
        from .plan import remedies

        line = f"{memory.one_line()}; the run would be refused; to fit: {remedies(memory, trainer_args)}"
    return memory, line


def check_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"output_dir {path!r} is a file; pass --output_dir=PATH to a folder")


# ---------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    device_type: str
    device_count: int
    processes: int
    per_machine: int
    env: dict  # the variables the run gets (their values), in display order
    command: list
    trainer_args: list
    log: str = ""
    memory: tuple | None = None  # (fluxkit.plan.Plan or None, its line), for our own trainers


def demo_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("FLUXKIT_DEMO_DIR") or os.path.join(base, "fluxkit", "demo")


def apply_demo(req: Request) -> None:
    cache = demo_cache()
    for key, value in req.spec.demo.items():
        if key not in req.given:
            req.opts[key] = value.replace("{cache}", cache) if isinstance(value, str) else value
    if not {"output_dir", "resume_from_checkpoint", "overwrite_output_dir"} & req.given:
        # the demo's own folder: running the demo again starts over, the previous demo moves to OUTPUT.old-TIME
        req.opts["overwrite_output_dir"] = True


def build_demo_cache(dry_run: bool, verbose: bool = False) -> None:
    cache = demo_cache()
    model, data = os.path.join(cache, "tiny_flux"), os.path.join(cache, "data")
    todo_model = not os.path.isfile(os.path.join(model, "model_index.json"))
    todo_data = not os.path.isfile(os.path.join(data, "prompts.txt"))
    if not (todo_model or todo_data):
        print(f"demo: reusing the tiny FLUX and sample data in {cache}", flush=True)
        return
    if dry_run:
        print(f"demo: would build a tiny random FLUX and sample data in {cache} (make_tiny_flux.py --preset tiny)")
        return
    print(f"demo: building a tiny random FLUX and sample data in {cache} (once)", flush=True)
    from . import tiny

    os.makedirs(cache, exist_ok=True)
    preset = tiny.resolve_preset("tiny")
    # the tokenizer trainers and dataset writers print progress from native code: kept to show on failure
    with captured_output(show_on_error=True, keep=verbose):
        if todo_model:
            tiny.build_pipeline(model, preset, seed=0, overwrite=True)
        if todo_data:
            tiny.build_datasets(data, seed=0, resolution=preset.sample_resolution, overwrite=True)


@contextlib.contextmanager
def captured_output(show_on_error: bool, keep: bool = False):
    """Output written to this process's stdout/stderr file descriptors (native code included) goes to a
    temporary file instead; it is shown if the block fails (or if keep)."""
    if keep:
        yield
        return
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except UserError:
            raise  # one line says it all
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if failed and show_on_error:
                sink.seek(0)
                sys.stderr.write(sink.read().decode("utf-8", errors="replace"))
                sys.stderr.flush()


def python() -> str:
    return os.environ.get("PYTHON") or sys.executable


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def trainer_arguments(req: Request, device_type: str, per_machine: int, external: bool) -> list[str]:
    """The trainer's arguments: every key that is a trainer flag, then the user's `--` arguments verbatim."""
    o = req.opts
    from .train_args import trainer_flags

    flags = trainer_flags(req.spec.kind == "lora")
    values = {k: v for k, v in o.items() if k not in LAUNCHER_ONLY}
    if o.get("dataset_name"):
        values.pop("instance_dir", None)
    else:
        values.pop("caption_column", None)
    if values.get("dataloader_num_workers") == "auto":
        from .data import default_num_workers

        values["dataloader_num_workers"] = str(default_num_workers(per_machine))
    given_after_dash = trainer_flags_given(req.extra, req.spec.kind == "lora")
    if ("lr_scheduler" not in req.given and "lr_scheduler" not in given_after_dash
            and values.get("lr_scheduler") == "constant"):
        warmup = given_after_dash.get("lr_warmup_steps", values.get("lr_warmup_steps", "0"))
        if str(warmup) not in ("", "0"):
            values["lr_scheduler"] = "constant_with_warmup"  # a constant schedule would ignore the warm-up
    if external:
        values.pop("device", None)  # upstream scripts pick the device through accelerate
    else:
        values["device"] = device_type
    out = []
    for key, value in values.items():
        name = TRAINER_NAME.get(key, key)
        if name not in flags:
            continue  # a key of the other launcher kind cannot reach here; kept safe for --train_script
        if value is True:
            out.append(f"--{name}")
        elif value is False or value == "":
            continue
        else:
            out.append(f"--{name}={value}")
    return out + list(req.extra)


def trainer_flags_given(extra: list[str], lora: bool) -> dict:
    """The trainer flags a list of trainer arguments sets, with their values (argparse's reading)."""
    from .train_args import build_parser

    parser = build_parser(lora)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ns, _ = parser.parse_known_args(extra)
    except SystemExit:
        return {}
    return {k: str(v) for k, v in vars(ns).items()}


def make_plan(req: Request, info, external: bool, script: str) -> Plan:
    o = req.opts
    machines = int(o["num_machines"])
    if not o["num_processes"]:
        per = info.count
        if req.demo and info.type == "cpu":
            per = 2  # the demo shows real multi-process DeepSpeed even on a CPU host
        o["num_processes"] = str(per * machines)
    per_machine = int(o["num_processes"]) // machines
    if not o["main_process_port"]:
        o["main_process_port"] = str(free_port() if machines == 1 else 29500)

    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
           "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1"),
           # seconds torchrun lets its workers finish after passing on a signal before it kills them
           # (torch's 30 would cut short a step plus the interrupt checkpoint of a 12B model)
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")}
    threads = os.environ.get("OMP_NUM_THREADS")
    if not threads:  # 1 beside an accelerator (the reference's), the cores shared out on a CPU
        threads = str(max(1, cores() // per_machine)) if info.type == "cpu" else "1"
    env["OMP_NUM_THREADS"] = threads
    # DeepSpeed told the device the launcher chose, rather than guessing it in every process (and
    # warning "Setting accelerator to CPU" four times on a CPU host)
    env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", info.type)
    if info.type == "npu":
        for name, value in ASCEND_ENV.items():
            env[name] = os.environ.get(name, value)

    command = [python(), "-m", "accelerate.commands.launch", "--config_file", o["config_file"],
               "--num_processes", o["num_processes"], "--num_machines", o["num_machines"],
               "--machine_rank", o["machine_rank"], "--main_process_port", o["main_process_port"],
               "--mixed_precision", o["mixed_precision"], "--gradient_accumulation_steps", o["gradient_accumulation_steps"]]
    if machines > 1:
        # every machine runs this launcher itself (torchrun style): no ssh/pdsh hostfile
        command += ["--main_process_ip", o["main_process_ip"], "--deepspeed_multinode_launcher", "standard"]
    targs = trainer_arguments(req, info.type, per_machine, external)
    command += ([os.path.join(ROOT, "patch_flux.py"), script] if external else [script]) + targs
    return Plan(info.type, info.count, int(o["num_processes"]), per_machine, env, command, targs)


def plan_text(req: Request, plan: Plan) -> str:
    o = req.opts
    b, n, a = int(o["batch_size"]), plan.processes, int(o["gradient_accumulation_steps"])
    lines = [f"device: {plan.device_type} x {plan.device_count} per machine; machines: {o['num_machines']} "
             f"(this one: rank {o['machine_rank']}); processes: {n}",
             f"global batch: {b} per device x {n} processes x {a} accumulation = {b * n * a} images per optimizer step",
             "environment:"]
    lines += [f"  {k}={shlex.quote(v)}" for k, v in plan.env.items()]
    lines += ["command:", "  " + shlex.join(masked(plan.command))]
    if plan.memory is not None:  # per device, before anything loads (python -m fluxkit.plan tells the same)
        memory, line = plan.memory
        lines += ["memory plan per device:"] + ([memory.table()] if memory is not None else []) + [line]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the console

# a tqdm bar: "desc:  33%|###   | 10/30 [00:04<00:06,  3.22it/s, loss=1.4]", then whatever followed it
_BAR = re.compile(r"^(.*?\[\d+:\d+(<[\d:?]+)?,[^\]]*\])(.*)$")
# torch elastic's own log lines (glog style): "W1130 00:01:02.345000 1234 torch/distributed/elastic/...] ..."
_ELASTIC_LOG = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/(elastic|run)")
# what the launcher process prints when a worker failed or a signal arrived: a consequence, never the cause
_LAUNCHER_EXCEPTIONS = ("torch.distributed.elastic.multiprocessing.api.SignalException",
                        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError",
                        "subprocess.CalledProcessError", "KeyboardInterrupt")
# Named messages libraries print bare (no logger, no warning to filter at their source) that tell a
# user nothing: DeepSpeed announces its CPU shared-memory op from every process of every run.
_KNOWN_NOISE = ("deepspeed_shm_comm_op built successfully",)


class ConsoleFilter:
    """What of a run's output reaches the console (the log gets everything).

    Dropped: torch elastic's tracebacks and failure report for a worker that already said why
    (SignalException, ChildFailedError) and its log lines, the bare prints in _KNOWN_NOISE, a line already shown (the same message
    from another rank), and repeated blank lines. Every other line, errors and real tracebacks
    included, is shown. With verbose, nothing is dropped.
    """

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.seen: set[str] = set()
        self.block: list[str] | None = None  # a traceback being read
        self.report_rules = 0  # "=====" lines of elastic's failure report still to skip
        self.last_blank = True

    def feed(self, line: str) -> list[str]:
        if self.verbose:
            return [line]
        if self.report_rules:
            if line.startswith("====="):
                self.report_rules -= 1
            return []
        if self.block is not None:
            self.block.append(line)
            if self._ends_block(line):
                block, self.block = self.block, None
                if any(line.startswith(e) for e in _LAUNCHER_EXCEPTIONS):
                    if "ChildFailedError" in line:
                        self.report_rules = 2
                    return []
                return [self._show(b) for b in block if self._show(b) is not None]
            return []
        if line.startswith("Traceback (most recent call last)") or line.startswith(("During handling of the above",
                                                                                    "The above exception was")):
            self.block = [line]
            return []
        if _ELASTIC_LOG.match(line) or any(n in line for n in _KNOWN_NOISE):
            return []
        shown = self._show(line)
        return [] if shown is None else [shown]

    @staticmethod
    def _ends_block(line: str) -> bool:
        return bool(line) and not line[0].isspace() and not line.startswith(("Traceback", "During handling", "The above"))

    def _show(self, line: str) -> str | None:
        text = line.strip()
        if not text:
            if self.last_blank:
                return None
            self.last_blank = True
            return line
        self.last_blank = False
        if text in self.seen and "\r" not in line:
            return None
        self.seen.add(text)
        return line

    def flush(self) -> list[str]:
        block, self.block = self.block or [], None
        return [b for b in block if self._show(b) is not None]


class Run:
    """Runs a command in a process group of its own, its stdout/stderr through a ConsoleFilter to ours and
    everything into a log file. SIGINT/SIGTERM sent to the launcher go to the command (once per signal)."""

    def __init__(self, log_path: str | None, verbose: bool):
        self.log_path = log_path
        self.filter = ConsoleFilter(verbose)
        self.signalled: str | None = None
        self.proc = None

    def _forward(self, signum, frame):
        self.signalled = signal.Signals(signum).name
        if self.proc is not None and self.proc.poll() is None:
            try:  # torchrun (accelerate) passes it on to every worker and waits for them
                os.kill(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def __call__(self, command: list[str], env: dict) -> int:
        log = open(self.log_path, "a", encoding="utf-8") if self.log_path else None
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            # its own process group: a Ctrl-C at the terminal reaches only us, and we pass it on once
            self.proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, process_group=0)
            sel = selectors.DefaultSelector()
            pending = {}
            for stream, out in ((self.proc.stdout, sys.stdout), (self.proc.stderr, sys.stderr)):
                os.set_blocking(stream.fileno(), False)
                sel.register(stream, selectors.EVENT_READ, out)
                pending[stream] = b""
            while sel.get_map():
                for key, _ in sel.select():
                    chunk = key.fileobj.read(65536)
                    if chunk is None:
                        continue
                    if not chunk:
                        sel.unregister(key.fileobj)
                        self._emit(pending.pop(key.fileobj) + b"\n" if pending.get(key.fileobj) else b"", key.data, log)
                        continue
                    data = pending[key.fileobj] + chunk
                    cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
                    pending[key.fileobj] = data[cut + 1:]
                    self._emit(data[:cut + 1], key.data, log)
            rc = self.proc.wait()
            for line in self.filter.flush():
                sys.stderr.write(line + "\n")
            return rc
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if log:
                log.close()

    def _emit(self, data: bytes, out, log) -> None:
        if not data:
            return
        text = data.decode("utf-8", errors="replace")
        if log:
            log.write(text)
            log.flush()
        # progress bars redraw with \r and pass straight through; a line printed right after a bar
        # (another rank's message, a log line) is split off and judged like any other line
        for segment in re.split(r"(?<=\n)", text):
            if not segment:
                continue
            if not segment.endswith("\n"):  # a bar being redrawn
                out.write(segment)
                continue
            body = segment[:-1]
            head, cr, last = body.rpartition("\r")
            bar = _BAR.match(last)
            if cr or bar:
                rest = bar.group(3) if bar else ""
                if not rest.strip():
                    out.write(segment)
                    self.filter.last_blank = True
                    continue
                out.write(head + cr + bar.group(1) + "\n")
                body = rest
            for line in self.filter.feed(body):
                out.write(line + "\n")
        out.flush()


def tee_print(text: str, log_path: str | None, stream=None) -> None:
    stream = stream or sys.stdout
    print(text, file=stream, flush=True)
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def resume_command(req: Request) -> str:
    argv = [a for a in req.argv]
    cut = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:cut] if not a.startswith("--resume_from_checkpoint")]
    return shlex.join([req.invoked] + head + ["--resume_from_checkpoint=latest"] + argv[cut:])


# ---------------------------------------------------------------------------------- the run

def run(req: Request) -> int:
    spec, o = req.spec, req.opts
    if req.demo:
        apply_demo(req)
    check_keys(req)
    o["config_file"] = resolve_config_file(o["config_file"])
    external = bool(o["train_script"])
    if external:
        script = o["train_script"]
        if not os.path.isfile(script):
            raise UserError(f"train_script {script!r}: no such file; pass --train_script=PATH to a training script")
    else:
        script = os.path.join(ROOT, spec.trainer)
    accelerate_config = check_accelerate_config(o["config_file"], int(o["gradient_accumulation_steps"]), int(o["batch_size"]))
    check_output_dir(o["output_dir"])

    from . import quiet
    from .device import check_mixed_precision, detect

    quiet.install(req.verbose)
    info = detect(o["device"])
    check_mixed_precision(info, o["mixed_precision"])
    os.environ.setdefault("DS_ACCELERATOR", info.type)  # see make_plan
    if req.demo:
        build_demo_cache(req.dry_run, req.verbose)
    plan = make_plan(req, info, external, script)
    trainer_args = None
    if not external:  # our trainer's own parser and checks judge its arguments (upstream scripts judge theirs)
        trainer_args = validate_trainer_args(plan.trainer_args, spec.kind == "lora")
        from . import quant  # a quantized base this host or a DeepSpeed launch cannot run: refused here

        quant.check(getattr(trainer_args, "base_quantization", "none"), info.type,
                    deepspeed=accelerate_config.get("distributed_type") == "DEEPSPEED")
    if not req.dry_run:
        check_model(o["model_name"])
        check_data(o)
        if trainer_args is not None:
            scan_training_data(trainer_args, plan.processes)
            # the trainer's run-lifecycle rules (another run's checkpoints, a resume with other settings)
            from . import checkpoints

            checkpoints.check_run_folder(trainer_args, plan.processes)

    if trainer_args is not None:  # refuses a run that cannot fit, in one line, before anything is written
        plan.memory = check_memory(trainer_args, plan, info, accelerate_config, refuse=not req.dry_run)

    if req.dry_run:
        print(plan_text(req, plan))
        return 0
    if plan.memory is not None and plan.memory[0] is not None and plan.memory[0].fits is False:
        print(f"{req.prog}: warning: {plan.memory[1]}", file=sys.stderr, flush=True)

    out = o["output_dir"]
    if trainer_args is not None and trainer_args.overwrite_output_dir:
        from . import checkpoints

        moved = checkpoints.move_aside_previous_run(out)  # before this run writes its logs there
        if moved:
            why = "demo: the previous demo run" if req.demo and "overwrite_output_dir" not in req.given else \
                "--overwrite_output_dir: the previous run"
            print(f"{why} in {out} moved to {moved}", flush=True)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    plan.log = os.path.join(logs, f"train_{o['mixed_precision']}_{spec.network}_{time.strftime('%Y%m%d_%H%M%S')}.log")
    start = time.time()
    text = plan_text(req, plan)
    with open(plan.log, "a", encoding="utf-8") as f:
        f.write(text + "\n")
    # the console gets the devices and the batch; the environment and the command are in the log
    print(text if req.verbose else "\n".join(text.splitlines()[:2]), flush=True)
    from .run_config import write_run_config

    write_run_config(out, req, trainer_args, accelerate_config, plan, KEY_OF_FLAG)

    status_file = os.path.join(logs, ".trainer_exit_status")
    with contextlib.suppress(FileNotFoundError):
        os.remove(status_file)
    env = dict(os.environ)
    env.update(plan.env)
    env[EXIT_STATUS_ENV] = status_file  # our trainers leave their own status (accelerate reports 1 for any failure)
    env[quiet.LAUNCHER_ENV] = req.prog
    if req.verbose:
        env[quiet.VERBOSE_ENV] = "1"
    runner = Run(plan.log, req.verbose)
    rc = runner(plan.command, env)
    if rc != 0:
        trainer_rc = None
        with contextlib.suppress(OSError, ValueError):
            with open(status_file) as f:
                trainer_rc = int(f.read().strip())
        if trainer_rc is not None:
            rc = trainer_rc or 1  # the trainer ended well but another process did not
        if rc < 0:
            rc = 128 - rc
        if runner.signalled:
            tee_print(f"{req.prog}: stopped on {runner.signalled} (exit status {rc}); resume with: {resume_command(req)}",
                      plan.log, sys.stderr)
        elif trainer_rc == EXIT_USER_ERROR:  # the trainer already said why, in one line
            tee_print(f"{req.prog}: training failed with exit status {rc} (the trainer's message is above); "
                      f"log: {plan.log}", plan.log, sys.stderr)
        else:
            tee_print(f"{req.prog}: error: training failed with exit status {rc}; see {plan.log}", plan.log, sys.stderr)
        return rc
    if int(o["machine_rank"]) != 0:
        tee_print(f"machine {o['machine_rank']}: training finished; machine 0 reports the summary and holds the weights",
                  plan.log)
        return 0
    lines = run_summary.final_report(os.path.join(out, run_summary.SUMMARY_FILE), spec.network, logs,
                                     int(o["batch_size"]), since=start, allow_missing=external)
    with open(plan.log, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    # the trainer's global batch is shown again only when it is not the one the plan showed
    shown_batch = text.splitlines()[1].split(": ", 1)[1]
    print("\n".join(line for line in lines if req.verbose or line.split(" : ", 1)[-1] != shown_batch), flush=True)
    if not req.demo:  # the demo names its log at the end
        tee_print(f"log: {plan.log}", plan.log)
    if req.demo:
        demo_infer(req, plan, info.type)
    return 0


def demo_infer(req: Request, plan: Plan, device_type: str) -> None:
    """Render the demo's prompts with the result, in this process (the inference scripts' main)."""
    from .infer_args import DREAMBOOTH, LORA
    from .inference import main as infer

    o = req.opts
    out = o["output_dir"]
    images = os.path.join(out, "demo_images")
    args = ["--prompts_file", os.path.join(demo_cache(), "data", "prompts.txt"), "--seeds", "0",
            "--num_inference_steps", "4", "--height", o["resolution"], "--width", o["resolution"],
            "--output_dir", images, "--device", device_type, "--overwrite"]
    if req.spec.kind == "lora":
        infer(LORA, ["--model_path", o["model_name"], "--lora_weights", out] + args)
    else:
        infer(DREAMBOOTH, ["--model_path", out] + args)
    if req.spec.kind == "lora":
        print(f"demo: done. LoRA weights : {out}/pytorch_lora_weights.safetensors (base model: {o['model_name']})")
    else:
        print(f"demo: done. weights      : {out} (a complete FLUX pipeline folder)")
    print(f"            images       : {images}")
    print(f"            training log : {plan.log}", flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "--launcher" or argv[1] not in LAUNCHERS:
        print("usage: python -m fluxkit.launch --launcher {full,lora} PROG [ARGS ...] (the .sh launchers call this)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    spec, prog, rest = LAUNCHERS[argv[1]], argv[2], argv[3:]
    try:
        return run(parse_command_line(spec, prog, rest))
    except UserError as err:
        return report_user_error(err, prog=os.path.basename(prog))


if __name__ == "__main__":
    sys.exit(main())
