"""Facts about the environment a run starts in, one rule each: environment flags, hub offline
mode, this process's rank, what a hub id looks like, what makes a folder a FLUX pipeline, and a
free TCP port for a rendezvous."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

from .errors import UserError

_TRUE = ("1", "true", "yes", "on", "y")
_FALSE = ("0", "false", "no", "off", "n")

# A hub id is exactly ORG/NAME; anything else that is not on disk is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# The toolkit's folder: the entry scripts, configs and the fluxkit package live here.
TOOLKIT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fluxkit/shared/ -> root
PIPELINE_INDEX = "model_index.json"
# Components whose folders hold weights (the others hold configs and vocabularies).
_WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")

# the packages a run's record (run_config.json) and a benchmark result name with their versions
PACKAGES = ("torch", "torch_npu", "diffusers", "transformers", "accelerate", "deepspeed", "peft", "datasets",
            "safetensors", "tokenizers")


def parse_bool(value) -> bool | None:
    """The one truth table for yes/no values, wherever they come from (launcher keys, --config files,
    environment flags, the trainers' true/false flags): 1/true/yes/y/on -> True, 0/false/no/n/off ->
    False, in any case; a bool is itself. None for anything else: the caller names the culprit."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def env_flag(name: str, default: bool = False) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off, any case; unset = default."""
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.strip():
        return False
    if parse_bool(value) is not None:
        return parse_bool(value)
    raise UserError(f"environment variable {name}={os.environ[name]!r} is not a yes/no value; use 1 or 0")



def versions() -> dict:
    """Python's and each installed package's version (PACKAGES)."""
    from importlib import metadata

    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def git_state(root: str = TOOLKIT_ROOT) -> dict | None:
    """{"commit": the checkout's commit, "dirty": whether tracked files differ from it}, or None
    outside a git checkout."""
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return None


def hf_offline() -> bool:
    """Whether the user asked the Hugging Face libraries to stay off the network."""
    return env_flag("HF_HUB_OFFLINE") or env_flag("TRANSFORMERS_OFFLINE")


def process_rank() -> int:
    """This process's global rank as set by accelerate/torchrun (0 when not launched by one)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_rank0() -> bool:
    return process_rank() == 0


def is_hub_id(name: str) -> bool:
    """ORG/NAME that is not a path on disk: the only thing we would look up on a hub."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def pipeline_folder_problem(path: str) -> str | None:
    """What keeps folder `path` from being a loadable FLUX pipeline (in words), or None.

    The rule: a folder with a model_index.json naming a Flux pipeline, and every component it lists
    present as a folder, with weights (.safetensors) for the model components.
    """
    if not os.path.isdir(path):
        return "is not a folder" if os.path.exists(path) else "does not exist"
    index = os.path.join(path, PIPELINE_INDEX)
    if not os.path.isfile(index):
        if os.path.isfile(os.path.join(path, "pytorch_lora_weights.safetensors")):
            return f"has no {PIPELINE_INDEX}: it holds LoRA weights, which go with a base model, not instead of one"
        return f"has no {PIPELINE_INDEX}, so it is not a pipeline folder"
    try:
        with open(index, encoding="utf-8") as f:
            spec = json.load(f)
        class_name = str(spec.get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return f"has an unreadable {PIPELINE_INDEX}; re-download or re-save the pipeline"
    if "Flux" not in class_name:
        return f"holds a {class_name or 'unnamed'} pipeline, not a FLUX one"
    listed = [k for k, v in spec.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None]
    missing = [k for k in listed if not os.path.isdir(os.path.join(path, k))]
    if missing:
        return f"lacks the component folder(s) {', '.join(missing)}/"
    empty = [k for k in listed if k in _WEIGHT_COMPONENTS
             and not any(f.endswith(".safetensors") for f in os.listdir(os.path.join(path, k)))]
    if empty:
        return f"has no .safetensors weights in {', '.join(c + '/' for c in empty)}"
    return None


def check_pipeline_folder(path: str, flag: str) -> str:
    """path if it is a complete FLUX pipeline folder, else one UserError naming flag and the fix."""
    problem = pipeline_folder_problem(path)
    if problem:
        raise UserError(f"{flag} {path!r} {problem}; point it at a complete FLUX pipeline folder "
                        "(make_tiny_flux.py builds one; a full fine-tune's --output_dir is one)")
    return path


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
