"""What the launcher starts: processes per machine, the environment, the `accelerate launch` command
and the trainer's arguments built from the keys (LaunchPlan); and how it is shown."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
from dataclasses import dataclass

from ..shared.environment import TOOLKIT_ROOT as ROOT
from ..shared import host_runtime
from ..shared.environment import free_port
from . import validation
from .keys import Request
from .record import masked
from .spec import ASCEND_ENV, FAMILY_DEFAULTED, LAUNCHER_ONLY, TRAINER_NAME


@dataclass
class LaunchPlan:
    """What the launcher starts (named apart from fluxkit.plan.Plan, the memory plan)."""
    device_type: str
    device_count: int
    processes: int
    per_machine: int
    env: dict  # the variables the run gets (their values), in display order
    command: list
    trainer_args: list
    log: str = ""
    memory: tuple | None = None  # (fluxkit.plan.Plan or None, its line), for our own trainers
    validation: str = ""  # what validation renders and costs (fluxkit.launch.validation), for our own trainers
    family: str = ""  # the model's family and its script's defaults (fluxkit.families), for a local model folder


def python() -> str:
    return os.environ.get("PYTHON") or sys.executable


def trainer_arguments(req: Request, device_type: str, per_machine: int, external: bool) -> list[str]:
    """The trainer's arguments: every key that is a trainer flag, then the user's `--` arguments verbatim."""
    o = req.opts
    from ..training.train_args import trainer_flags

    flags = trainer_flags(req.spec.kind == "lora")
    values = {k: v for k, v in o.items() if k not in LAUNCHER_ONLY}
    if o.get("dataset_name"):
        values.pop("instance_dir", None)
    else:
        values.pop("caption_column", None)
    if values.get("dataloader_num_workers") == "auto":
        from ..data.dataset import default_num_workers

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
        elif value is False or (value == "" and key != "instance_prompt"):  # our trainers require that flag
            continue
        else:
            out.append(f"--{name}={value}")
    return out + list(req.extra)


def trainer_flags_given(extra: list[str], lora: bool) -> dict:
    """The trainer flags a list of trainer arguments sets, with their values (argparse's reading)."""
    from ..training.train_args import build_parser

    parser = build_parser(lora)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ns, _ = parser.parse_known_args(extra)
    except SystemExit:  # a mistake there is the trainer parser's to report, once
        return {}
    return {k: str(v) for k, v in vars(ns).items()}


def make_plan(req: Request, info, external: bool, script: str) -> LaunchPlan:
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
        threads = str(max(1, host_runtime.usable_cpus() // per_machine)) if info.type == "cpu" else "1"
    env["OMP_NUM_THREADS"] = threads
    # OpenMP's wait policy for the host's load, and a JIT-extensions folder per Python environment,
    # unless set (fluxkit/shared/host_runtime.py: measured on a quiet and a shared CPU host)
    env.update(host_runtime.runtime_env())
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
    if not external:  # upstream scripts have no --num_validation_steps
        validation.apply_cpu_default(req, info.type, trainer_flags_given(req.extra, req.spec.kind == "lora"))
    targs = trainer_arguments(req, info.type, per_machine, external)
    command += ([os.path.join(ROOT, "patch_flux.py"), script] if external else [script]) + targs
    return LaunchPlan(info.type, info.count, int(o["num_processes"]), per_machine, env, command, targs)


def family_line(req: Request) -> str:
    from .keys import model_family

    family = model_family(req)
    from ..training.train_args import trainer_flags

    flags = trainer_flags(req.spec.kind == "lora")  # a key the launcher leaves to the trainer: the trainer's default
    values = ", ".join(f"{k} {req.opts.get(k) or flags[k].default}" + ("" if k in req.given else " (default)")
                       for k in FAMILY_DEFAULTED)
    return f"model family: {family.name} ({family.pipeline_name}); {values}"


def plan_text(req: Request, plan: LaunchPlan) -> str:
    o = req.opts
    b, n, a = int(o["batch_size"]), plan.processes, int(o["gradient_accumulation_steps"])
    lines = [f"device: {plan.device_type} x {plan.device_count} per machine; machines: {o['num_machines']} "
             f"(this one: rank {o['machine_rank']}); processes: {n}",
             f"global batch: {b} per device x {n} processes x {a} accumulation = {b * n * a} images per optimizer step"]
    lines += [plan.validation] if plan.validation else []
    lines += [plan.family] if plan.family else []
    lines += ["environment:"]
    lines += [f"  {k}={shlex.quote(v)}" for k, v in plan.env.items()]
    lines += ["command:", "  " + shlex.join(masked(plan.command))]
    if plan.memory is not None:  # per device, before anything loads (python -m fluxkit.plan tells the same)
        memory, line = plan.memory
        lines += ["memory plan per device:"] + ([memory.table()] if memory is not None else []) + [line]
    return "\n".join(lines)


def resume_command(req: Request) -> str:
    argv = [a for a in req.argv]
    cut = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:cut] if not a.startswith("--resume_from_checkpoint")]
    return shlex.join([req.invoked] + head + ["--resume_from_checkpoint=latest"] + argv[cut:])
