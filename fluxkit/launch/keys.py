"""Reading what the user asked for: --key=value arguments, a --config file (TOML or YAML; a run's
run_config.json is one), the environment's multi-node settings; and the --help text."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from ..shared.errors import UserError, nearest
from .spec import (ASCEND_ENV, COMMON_DEFAULTS, COMMON_KEYS, FAMILY_DEFAULTED, KEY_HELP, KEY_OF_FLAG, TRAINER_NAME,
                   Launcher)


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
    # a key of TRAINER_NAME typed with the trainer's spelling (train_batch_size): messages use that spelling
    trainer_spelling: set = field(default_factory=set)
    demo_cache: str | None = None  # where the demo's model and data are (a scratch folder under --dry_run)


def parse_command_line(spec: Launcher, prog: str, argv: list[str]) -> Request:
    from ..training.train_args import trainer_flags  # deferred (imports torch): --help and key errors stay fast

    flags = trainer_flags(spec.kind == "lora")
    known = set(spec.keys) | set(COMMON_KEYS) | {k for k in flags if k not in KEY_OF_FLAG} | set(KEY_OF_FLAG)
    known -= {"local_rank"}
    opts = dict(spec.defaults)
    for key, value in COMMON_DEFAULTS.items():
        opts.setdefault(key, value)
    req = Request(spec=spec, prog=os.path.basename(prog), invoked=prog, argv=list(argv), opts=opts, given=set(), extra=[])
    given_values = {}

    def unknown(key):
        guess = nearest(key, known | {"config", "verbose", "dry_run", "demo", "help"})
        return UserError(f"unknown option --{key}" + (f" (did you mean --{guess}?)" if guess else "")
                         + f"; known keys: {' '.join(spec.keys + COMMON_KEYS)}, any trainer flag "
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
        if key in KEY_OF_FLAG:
            key = KEY_OF_FLAG[key]
            req.trainer_spelling.add(key)
        else:
            req.trainer_spelling.discard(key)
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


def model_family(req: Request):
    """The run's model family: --model_family, else model_name's folder's; FLUX.1 for a hub id."""
    from .. import families

    model, override = req.opts.get("model_name") or "", req.opts.get("model_family") or None
    if os.path.isfile(os.path.join(model, "model_index.json")):  # else check_model names what is missing
        return families.of_folder(model, override)
    return families.get(override or "flux1")


def apply_family_defaults(req: Request):
    """Keys of FAMILY_DEFAULTED not given take the model family's defaults, unless the launcher's
    own defaults are for that family (the reference's FLUX.1 values). Returns the family."""
    family = model_family(req)
    if family.name != req.spec.family:
        for key in FAMILY_DEFAULTED:
            if key not in req.given:
                req.opts[key] = str(family.defaults[key])
    return family


def family_lines(spec: Launcher) -> list[str]:
    """--help's account of the family defaults."""
    from .. import families

    lines = ["", "Model families: the family comes from model_name's model_index.json (FLUX.1, Kontext, FLUX.2 [dev],",
             "FLUX.2 [klein]), or --model_family (a FLUX.1 folder also trains kontext). The defaults above are",
             f"for {spec.family}; with another family's model, {', '.join(FAMILY_DEFAULTED)} not given take that family's:"]
    for name in families.NAMES:
        if name != spec.family:
            lines.append(f"  {name:12} " + " ".join(f"--{k}={families.get(name).defaults[k]}" for k in FAMILY_DEFAULTED))
    return lines


def _switch_value(key: str, value) -> bool:
    from ..shared.environment import parse_bool

    if parse_bool(value) is not None:
        return parse_bool(value)
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
            guess = nearest(name, known)
            raise UserError(f"--config {path!r}: unknown key {key!r}" + (f" (did you mean {guess!r}?)" if guess else "")
                            + "; use the launcher's keys or trainer flags")
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
    lines += family_lines(spec)
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
              "  OMP_WAIT_POLICY, GOMP_SPINCOUNT, TORCH_EXTENSIONS_DIR",
              "                 unless set: PASSIVE, with GOMP_SPINCOUNT=3000 when the host is quiet at start",
              "                 (OpenMP threads sleep between regions: a busy CPU host ran 10x slower",
              "                 spinning, a quiet one 1.4x slower without a short spin); a folder per",
              "                 Python environment",
              "  TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
              "                 seconds a signalled run may take to save its checkpoint before it is killed (600)",
              "  On NPU only, each unless already set (the reference's Ascend settings):"]
    lines += [f"                 {k}={v}" for k, v in ASCEND_ENV.items()]
    lines += ["", "SIGINT/SIGTERM to this launcher reach the trainer, which saves a checkpoint and exits 2; the launcher",
              "then prints the command that resumes the run.",
              "Exit status: the trainer's; 2 for bad input (one line naming the culprit, before anything starts)."]
    return "\n".join(lines)
