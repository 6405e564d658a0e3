"""OUTPUT/run_config.json: a run's resolved settings, enough to repeat it.

The launchers write it before they start the trainer (write_run_config); a trainer run without
a launcher writes it itself (write_trainer_run_config), with what accelerate was given.

    {"launcher": ..., "settings": {key: value, ...}, "trainer": ..., "accelerate_config": {...},
     "command": [...], "versions": {...}, "toolkit_commit": ..., "masked": [...]}

`settings` holds every launcher key and trainer flag with the value the run used, under the
launcher's key names, so the file is itself a valid `--config` (JSON is YAML). Secrets (the hub
token) are never written; their names are listed under `masked`.
"""

from __future__ import annotations

import os
import sys
import time

from ..shared.environment import TOOLKIT_ROOT as ROOT
from ..shared.environment import git_state, versions
from ..shared.fsio import atomic_write_json

RUN_CONFIG = "run_config.json"
SECRETS = ("hub_token",)
# trainer attributes that are not flags a user sets, or that must not be replayed
_NOT_SETTINGS = ("lora", "local_rank")
# launcher keys that describe this machine's rendezvous, not the run: a replay picks its own
_PER_LAUNCH = ("main_process_port",)


def toolkit_commit(root: str) -> str | None:
    """The toolkit's git commit (with '-dirty' when files differ from it), or None outside a checkout."""
    state = git_state(root)
    return None if state is None else state["commit"] + ("-dirty" if state["dirty"] else "")


def masked(argv: list[str]) -> list[str]:
    """argv with secrets (a hub token) replaced by ***: the plan is also written to the log."""
    shown, hide = [], False
    for arg in argv:
        if hide:
            shown.append("***")
            hide = False
            continue
        flag, eq, _ = arg.partition("=")
        secret = len(flag) > 6 and any(f"--{s}".startswith(flag) for s in SECRETS)
        if secret and eq:
            shown.append(f"{flag}=***")
        else:
            shown.append(arg)
            hide = secret
    return shown


def settings(opts: dict, trainer_args, flags: set, key_of_flag: dict, given: set) -> dict:
    """Launcher keys and trainer flags (`flags`: the trainer parser's) with the values the run used
    (the trainer's reading wins)."""
    out = {k: v for k, v in opts.items() if k not in SECRETS and (k not in _PER_LAUNCH or k in given)}
    if trainer_args is not None:
        for name, value in vars(trainer_args).items():
            if name not in flags or name in _NOT_SETTINGS or name in SECRETS:
                continue  # (None stays: as a --config it means "not given", over a launcher default)
            out[key_of_flag.get(name, name)] = value
    return out


def write_run_config(output_dir: str, req, trainer_args, accelerate_config: dict, plan, key_of_flag: dict) -> str:
    from ..training.train_args import trainer_flags  # deferred: it imports torch

    flags = {a.dest for a in trainer_flags(req.spec.kind == "lora").values()}

    record = {
        "launcher": req.prog,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings(req.opts, trainer_args, flags, key_of_flag, req.given),
        "trainer": plan.command[len(plan.command) - len(plan.trainer_args) - 1],
        "trainer_args": masked(plan.trainer_args),
        "accelerate_config": accelerate_config,
        "command": masked(plan.command),
        "environment": plan.env,
        "versions": versions(),
        "toolkit_commit": toolkit_commit(ROOT),
        "masked": [s for s in SECRETS if any(a.startswith(f"--{s}") for a in plan.trainer_args)],
    }
    return atomic_write_json(os.path.join(output_dir, RUN_CONFIG), record)


def write_trainer_run_config(args, accelerator) -> str:
    """run_config.json of a trainer started without a launcher: its flags and accelerate's state."""
    import json

    from ..training.train_args import trainer_flags  # deferred: it imports torch

    flags = {a.dest for a in trainer_flags(args.lora).values()}
    state = accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    accelerate = {"distributed_type": str(state.distributed_type), "num_processes": state.num_processes,
                  "mixed_precision": str(state.mixed_precision),
                  "deepspeed_config": plugin.deepspeed_config if plugin is not None else None}
    record = {
        "launcher": None,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # mixed_precision as the run used it (the flag's None means accelerate's choice)
        "settings": {**settings({}, args, flags, {}, set()), "mixed_precision": str(state.mixed_precision)},
        "trainer": os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else None,
        "trainer_args": masked(sys.argv[1:]),
        # JSON-safe copy: DeepSpeed's config may hold values json cannot write as they are
        "accelerate_config": json.loads(json.dumps(accelerate, default=str)),
        "versions": versions(),
        "toolkit_commit": toolkit_commit(ROOT),
        "masked": [s for s in SECRETS if getattr(args, s)],
    }
    return atomic_write_json(os.path.join(args.output_dir, RUN_CONFIG), record)
