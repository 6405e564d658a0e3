"""python -m fluxkit.launch --launcher {full,lora} PROG [--key=value ...]: the run, step by step."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

from ..shared import host_runtime
from ..shared.environment import TOOLKIT_ROOT as ROOT
from ..shared.errors import EXIT_INTERRUPTED, EXIT_STATUS_ENV, EXIT_USER_ERROR, UserError, report_user_error
from . import report
from .checks import (check_accelerate_config, check_cache_folder, check_data, check_keys, check_memory, check_model,
                     check_output_dir, in_launcher_words, resolve_config_file, scan_training_data,
                     validate_trainer_args)
from .command import LaunchPlan, family_line, make_plan, plan_text, resume_command
from .console import Supervisor, tee_print
from .demo import apply_demo, build_demo_cache, demo_infer, import_for_demo_infer, remove_dry_run_scratch
from .keys import Request, apply_family_defaults, parse_command_line
from .spec import KEY_OF_FLAG, LAUNCHERS


@dataclass
class Launch:
    """What the steps of a launch find out, in order."""
    req: Request
    script: str = ""  # the trainer script
    external: bool = False  # --train_script: another trainer, run through patch_flux.py
    accelerate_config: dict = field(default_factory=dict)
    info: object = None  # fluxkit.shared.device.DeviceInfo
    plan: LaunchPlan | None = None
    trainer_args: object = None  # our trainer's parsed flags (None for an external script)
    started: float = 0.0
    shown: str = ""  # the plan's text, as the log has it
    supervisor: Supervisor | None = None  # the running training processes
    trainer_rc: int | None = None  # the exit status our trainer left (None: none left)


def run(req: Request) -> int:
    """One launch: every check before anything is written, then the training processes and the report."""
    launch = Launch(req)
    try:
        read_keys(launch)
        find_devices(launch)
        with in_launcher_words(req):  # the trainer's checks name the launcher's keys the user typed
            check_trainer_args(launch)
            check_inputs(launch)
    finally:
        remove_dry_run_scratch(req)
    if req.dry_run:
        print(plan_text(req, launch.plan))
        return 0
    open_run_folder(launch)
    rc = start_training(launch)
    if rc != 0:
        return report_failure(launch, rc)
    return report_success(launch)


def read_keys(launch: Launch) -> None:
    """The launcher's keys (with the demo's values), the trainer script and the accelerate config."""
    req = launch.req
    o = req.opts
    if req.demo:
        apply_demo(req)
    apply_family_defaults(req)
    check_keys(req)
    o["config_file"] = resolve_config_file(o["config_file"])
    launch.external = bool(o["train_script"])
    if launch.external:
        launch.script = o["train_script"]
        if not os.path.isfile(launch.script):
            raise UserError(f"train_script {launch.script!r}: no such file; pass --train_script=PATH to a training script")
        from ..upstream import script_fixes  # what patch_flux.py's runner refuses, refused before anything starts

        tree = script_fixes.parse_script(launch.script)
        script_fixes.fix_script(tree, launch.script)
        script_fixes.check_imports(tree, launch.script)
    else:
        launch.script = os.path.join(ROOT, req.spec.trainer)
    launch.accelerate_config = check_accelerate_config(o["config_file"], int(o["gradient_accumulation_steps"]),
                                                       int(o["batch_size"]))
    check_output_dir(o["output_dir"])


def find_devices(launch: Launch) -> None:
    """The devices here, the processes, and the command that starts them (with the demo's model built)."""
    from ..shared import quiet
    from ..shared.device import check_mixed_precision, detect

    req = launch.req
    quiet.install(req.verbose)
    launch.info = detect(req.opts["device"])
    check_mixed_precision(launch.info, req.opts["mixed_precision"])
    os.environ.setdefault("DS_ACCELERATOR", launch.info.type)  # see make_plan
    if req.demo:
        build_demo_cache(req)
    launch.plan = make_plan(req, launch.info, launch.external, launch.script)


def check_trainer_args(launch: Launch) -> None:
    """Our trainer's own parser and checks judge its arguments (upstream scripts judge theirs)."""
    if launch.external:
        return
    launch.trainer_args = validate_trainer_args(launch.plan.trainer_args, launch.req.spec.kind == "lora")
    from ..shared.device import zero_stage
    from ..training.preflight import check_host  # what the trainer checks first, in every process: refused here

    deepspeed = zero_stage(launch.accelerate_config) is not None
    check_host(launch.trainer_args, launch.info, deepspeed=deepspeed)
    from ..training import blockswap  # --blocks_to_swap under a DeepSpeed config, or too many blocks: refused here too

    blockswap.check_launch(launch.trainer_args, deepspeed, launch.req.opts.get("model_name") or "")


def check_inputs(launch: Launch) -> None:
    """The model, the data, the run and cache folders and the memory plan: the same checks, and the same
    one-line refusal, under --dry_run (which only judges the folders instead of making them)."""
    req, plan, trainer_args = launch.req, launch.plan, launch.trainer_args
    samples = None
    check_model(req.opts["model_name"])
    plan.family = family_line(req)  # the family and the values of the keys it defaults
    # a local pipeline folder: its family's refusals (one line, before the data is read)
    if trainer_args is not None and os.path.isfile(os.path.join(req.opts["model_name"] or "", "model_index.json")):
        from .. import families

        families.of_args(trainer_args, req.opts["model_name"]).check(trainer_args, req.opts["model_name"])
    check_data(req.opts)
    if trainer_args is None:  # an upstream script judges the rest itself
        return
    samples = scan_training_data(trainer_args, plan.processes)
    check_cache_folder(trainer_args, write=not req.dry_run)  # a --latent_cache_dir that takes no files: before logs/
    # the trainer's run-lifecycle rules (another run's checkpoints, a resume with other settings)
    from .. import checkpoint

    checkpoint.check_run_folder(trainer_args, plan.processes, hand_over=not req.dry_run)  # its trainer need not hash again
    # refuses a run that cannot fit, in one line, before anything is written (unless --ignore_memory_plan)
    plan.memory = check_memory(trainer_args, plan, launch.info, launch.accelerate_config)
    from .validation import describe

    plan.validation = describe(trainer_args, plan.processes, samples)


def open_run_folder(launch: Launch) -> None:
    """The previous run moved aside (--overwrite_output_dir), logs/, the log's head and run_config.json."""
    req, plan = launch.req, launch.plan
    o = req.opts
    if plan.memory is not None and plan.memory[0] is not None and plan.memory[0].fits is False:
        print(f"{req.prog}: warning: {plan.memory[1]}", file=sys.stderr, flush=True)
    out = o["output_dir"]
    if launch.trainer_args is not None and launch.trainer_args.overwrite_output_dir:
        from .. import checkpoint

        moved = checkpoint.move_aside_previous_run(out)  # before this run writes its logs there
        if moved:
            why = "demo: the previous demo run" if req.demo and "overwrite_output_dir" not in req.given else \
                "--overwrite_output_dir: the previous run"
            print(f"{why} in {out} moved to {moved}", flush=True)
    from ..shared.fsio import ensure_writable_dir

    logs = ensure_writable_dir(os.path.join(out, "logs"), "--output_dir")  # one line when it cannot be made
    plan.log = os.path.join(logs, f"train_{o['mixed_precision']}_{req.spec.network}_{time.strftime('%Y%m%d_%H%M%S')}.log")
    launch.started = time.time()
    launch.shown = plan_text(req, plan)
    with open(plan.log, "a", encoding="utf-8") as f:
        f.write(launch.shown + "\n")
    # the console gets the devices, the batch and validation; the environment and the command are in the log
    print(launch.shown if req.verbose else "\n".join(launch.shown.splitlines()[:3 if plan.validation else 2]), flush=True)
    from .record import write_run_config

    write_run_config(out, req, launch.trainer_args, launch.accelerate_config, plan, KEY_OF_FLAG)


def start_training(launch: Launch) -> int:
    """`accelerate launch` through the console filter; the trainer's own exit status when it left one."""
    from ..shared import quiet

    req, plan = launch.req, launch.plan
    status_file = os.path.join(os.path.dirname(plan.log), ".trainer_exit_status")
    with contextlib.suppress(FileNotFoundError):
        os.remove(status_file)
    env = dict(os.environ)
    env.update(plan.env)
    env[EXIT_STATUS_ENV] = status_file  # our trainers leave their own status (accelerate reports 1 for any failure)
    env[quiet.LAUNCHER_ENV] = req.prog
    if req.verbose:
        env[quiet.VERBOSE_ENV] = "1"
    launch.supervisor = Supervisor(plan.log, req.verbose)
    if req.demo:
        import_for_demo_infer(req)
    rc = launch.supervisor(plan.command, env)
    if rc != 0:
        with contextlib.suppress(OSError, ValueError):
            with open(status_file) as f:
                launch.trainer_rc = int(f.read().strip())
        if launch.trainer_rc is not None:
            rc = launch.trainer_rc or 1  # the trainer ended well but another process did not
        if rc < 0:
            rc = 128 - rc
    return rc


def report_failure(launch: Launch, rc: int) -> int:
    """One line: stopped by a signal (and how to resume), the trainer's own refusal, or a failure."""
    req, log = launch.req, launch.plan.log
    if launch.supervisor.signalled:
        tee_print(stopped_line(req, launch.supervisor.signalled, rc, req.opts["output_dir"]), log, sys.stderr)
    elif launch.trainer_rc == EXIT_USER_ERROR:  # the trainer already said why, in one line
        tee_print(f"{req.prog}: training failed with exit status {rc} (the trainer's message is above); "
                  f"log: {log}", log, sys.stderr)
    else:
        tee_print(f"{req.prog}: error: training failed with exit status {rc}; see {log}", log, sys.stderr)
    return rc


def report_success(launch: Launch) -> int:
    """The reference's closing lines from the trainer's summary; the demo's images."""
    req, plan = launch.req, launch.plan
    o = req.opts
    if int(o["machine_rank"]) != 0:
        tee_print(f"machine {o['machine_rank']}: training finished; machine 0 reports the summary and holds the weights",
                  plan.log)
        return 0
    logs = os.path.dirname(plan.log)
    lines = report.final_report(os.path.join(o["output_dir"], report.SUMMARY_FILE), req.spec.network, logs,
                                int(o["batch_size"]), since=launch.started, allow_missing=launch.external)
    with open(plan.log, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    # the trainer's global batch is shown again only when it is not the one the plan showed
    shown_batch = launch.shown.splitlines()[1].split(": ", 1)[1]
    print("\n".join(line for line in lines if req.verbose or line.split(" : ", 1)[-1] != shown_batch), flush=True)
    if req.demo:  # the demo names its log at the end
        demo_infer(req, plan, launch.info.type)
    else:
        tee_print(f"log: {plan.log}", plan.log)
    return 0


def stopped_line(req: Request, signal_name: str, rc: int, out: str) -> str:
    """What a stopped run says: how to resume when a checkpoint exists, else that nothing was saved."""
    from ..checkpoint import complete_checkpoints

    if complete_checkpoints(out):
        return f"{req.prog}: stopped on {signal_name} (exit status {rc}); resume with: {resume_command(req)}"
    return (f"{req.prog}: stopped on {signal_name} (exit status {rc}) before the first checkpoint: nothing to resume; "
            "run the same command again to start over")


def main(argv=None) -> int:
    # before torch loads (nothing above imports it): this process renders the demo's images and reads
    # the data, and OpenMP reads its wait policy once; the trainers' processes get the same values
    host_runtime.apply_defaults()
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
    except KeyboardInterrupt:  # Ctrl-C before accelerate started (the supervisor handles it after)
        print(f"{os.path.basename(prog)}: stopped on SIGINT before training started: nothing to resume; "
              "run the same command again to start", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    # everything is written and said: skip the interpreter's teardown (10 s after the demo's last line at load 8)
    host_runtime.exit_without_teardown(main(), "fluxkit.launch")
