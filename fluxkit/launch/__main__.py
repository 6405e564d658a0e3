"""python -m fluxkit.launch --launcher {full,lora} PROG [--key=value ...]: the run, step by step."""

from __future__ import annotations

import contextlib
import os
import sys
import time

from ..environment import TOOLKIT_ROOT as ROOT
from ..errors import EXIT_STATUS_ENV, EXIT_USER_ERROR, UserError, report_user_error
from . import report
from .checks import (check_accelerate_config, check_data, check_keys, check_memory, check_model, check_output_dir,
                     resolve_config_file, scan_training_data, validate_trainer_args)
from .command import make_plan, plan_text, resume_command
from .console import Supervisor, tee_print
from .demo import apply_demo, build_demo_cache, demo_infer
from .keys import Request, parse_command_line
from .spec import KEY_OF_FLAG, LAUNCHERS


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

    from .. import quiet
    from ..device import check_mixed_precision, detect

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
        from .. import quant  # a quantized base this host or a DeepSpeed launch cannot run: refused here

        quant.check(getattr(trainer_args, "base_quantization", "none"), info.type,
                    deepspeed=accelerate_config.get("distributed_type") == "DEEPSPEED")
    if not req.dry_run:
        check_model(o["model_name"])
        check_data(o)
        if trainer_args is not None:
            scan_training_data(trainer_args, plan.processes)
            # the trainer's run-lifecycle rules (another run's checkpoints, a resume with other settings)
            from .. import checkpoint

            checkpoint.check_run_folder(trainer_args, plan.processes, hand_over=True)  # its trainer need not hash again

    if trainer_args is not None:  # refuses a run that cannot fit, in one line, before anything is written
        plan.memory = check_memory(trainer_args, plan, info, accelerate_config, refuse=not req.dry_run)

    if req.dry_run:
        print(plan_text(req, plan))
        return 0
    if plan.memory is not None and plan.memory[0] is not None and plan.memory[0].fits is False:
        print(f"{req.prog}: warning: {plan.memory[1]}", file=sys.stderr, flush=True)

    out = o["output_dir"]
    if trainer_args is not None and trainer_args.overwrite_output_dir:
        from .. import checkpoint

        moved = checkpoint.move_aside_previous_run(out)  # before this run writes its logs there
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
    from .record import write_run_config

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
    runner = Supervisor(plan.log, req.verbose)
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
    lines = report.final_report(os.path.join(out, report.SUMMARY_FILE), spec.network, logs,
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
