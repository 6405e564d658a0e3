#!/usr/bin/env python
"""Run diffusers' FLUX DreamBooth scripts unmodified on NPU, GPU and CPU.

    python patch_flux.py SCRIPT [ARGS...]
    accelerate launch --config_file pretrain_bf16_accelerate_config.yaml patch_flux.py SCRIPT [ARGS...]
    python patch_flux.py --list                 # every patch: does it apply here, and why
    python patch_flux.py --check SCRIPT         # show what would be fixed in SCRIPT, run nothing

The runner applies the runtime patches, fixes SCRIPT's source in memory (never on disk) and
runs it as __main__ with ARGS; its exit status is the script's. The reference toolkit's API
also works from inside a script, where its README put it:

    from patch_flux import TorchPatcher, config_gc, create_save_model_hook
    TorchPatcher.apply_patch()
    config_gc()
"""

from __future__ import annotations

import argparse
import os
import sys

# The runner may be started from anywhere; fluxkit lives beside this file.
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

from fluxkit.shared.host_runtime import apply_defaults  # noqa: E402

apply_defaults()  # before torch loads, when run as the runner (fluxkit/shared/host_runtime.py)
from fluxkit.upstream import patches, script_fixes  # noqa: E402
from fluxkit.shared.environment import is_rank0  # noqa: E402
from fluxkit.shared.errors import FlagParser, UserError, cli  # noqa: E402

PROG = "patch_flux.py"


class TorchPatcher:
    """The reference's entry point: apply every runtime patch that applies here (gc aside)."""

    @classmethod
    def apply_patch(cls) -> list[tuple[str, bool, str]]:
        return patches.apply([p.name for p in patches.PATCHES if p.name != "gc-thresholds"])


def config_gc() -> bool:
    """The reference's gc thresholds (opt out with FLUXKIT_NO_GC_TUNING=1); True if set."""
    (_, applied, _), = patches.apply(["gc-thresholds"])
    return applied


def create_save_model_hook(accelerator, unwrap_model, transformer, text_encoder_one, args, weight_dtype):
    """The reference's LoRA checkpoint hook, fixed: every rank may call it (rank 0 writes), it saves
    a cast copy (the live model keeps its dtype), and rank/alpha survive in the file's metadata.

    `unwrap_model` is accepted for the reference's signature; fluxkit unwraps engines itself.
    """
    del unwrap_model
    return script_fixes.upstream_lora_hooks(accelerator, transformer, text_encoder_one, args, weight_dtype)[0]


def _print_list() -> None:
    import accelerate
    import diffusers
    import torch

    from fluxkit.shared.device import detect

    info = detect()
    print(f"this machine: {info.type} x{info.count}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"accelerate {accelerate.__version__}")
    print("runtime patches:")
    for name, applies, why, reason in patches.describe():
        print(f"  {name:27} {'APPLIES' if applies else 'skipped'}  {why}")
        print(f"  {'':27} why it exists: {reason}")
    print("script fixes (by the runner, on the script's source in memory):")
    for name, fix in script_fixes.FIXES.items():
        doc = (fix.__doc__ or "").strip().splitlines()
        print(f"  {name}" + (f": {doc[0]}" if doc else ""))


def _summary(patch_results, fix_results) -> str:
    groups: dict[str, list[str]] = {}
    for name, applied, why in patch_results:
        group = "skipped" if why == patches.SKIPPED else "patches applied" if applied else "patches not needed"
        groups.setdefault(group, []).append(name)
    for r in fix_results:
        group = "skipped" if r.detail == script_fixes.SKIPPED else {"applied": "fixes applied", "already fixed": "already fixed"}.get(r.status, "not needed")
        groups.setdefault(group, []).append(r.name)
    order = ("patches applied", "fixes applied", "already fixed", "skipped", "not needed", "patches not needed")
    return f"{PROG}: " + "; ".join(f"{k}: {', '.join(groups[k])}" for k in order if groups.get(k))


def check_processes() -> None:
    """Refuse processes that accelerate would leave unconnected: `accelerate launch --multi_gpu` on a host
    without an accelerator starts WORLD_SIZE processes that each get DistributedType.NO (no DeepSpeed,
    no DDP), so each trains alone on the whole dataset into the same output_dir."""
    from fluxkit.shared.device import detect
    from fluxkit.shared.environment import parse_bool

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    engines = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU")
    if world < 2 or detect().has_accelerator or any(parse_bool(os.environ.get(k, "")) for k in engines):
        return
    raise UserError(f"{world} processes were started without DeepSpeed on a host without an accelerator (accelerate's "
                    f"--multi_gpu?): accelerate would not connect them and each would train alone; launch with a DeepSpeed "
                    f"config and no --multi_gpu: accelerate launch --config_file pretrain_bf16_accelerate_config.yaml "
                    f"--num_processes {world} patch_flux.py SCRIPT ...")


def run_fixed(tree, path: str, args: list[str]) -> None:
    """Run the fixed AST as __main__, as `python SCRIPT ARGS` would run the file."""
    import types

    code = compile(tree, path, "exec")
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=path, __builtins__=__builtins__, __cached__=None)
    module.__dict__[script_fixes.HELPER] = script_fixes
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(path)  # what Python does for a script: its folder comes first
    sys.modules["__main__"] = module  # pickling (dataloader workers) looks functions up here
    exec(code, module.__dict__)


def parse_args(argv):
    p = FlagParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print every runtime patch, whether it applies here and why, then exit")
    p.add_argument("--check", action="store_true", help="fix SCRIPT in memory and report what changed; do not run it")
    p.add_argument("--show_source", action="store_true", help="with --check: also print the fixed source")
    p.add_argument("--skip", action="append", default=[], metavar="NAME",
                   help="leave one runtime patch or source fix out (repeatable); --list names them all")
    p.add_argument("script", nargs="?", metavar="SCRIPT", help="the training script to run, e.g. train_dreambooth_lora_flux.py")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed to SCRIPT unchanged")
    return p.parse_args(argv)


@cli
def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list or args.check:  # the toolkit's own report: without the libraries' known noise (torchao's kernels, ...)
        from fluxkit.shared import quiet

        quiet.install()
    if args.list:
        _print_list()
        return 0
    if not args.script:
        raise UserError("no SCRIPT given; usage: python patch_flux.py SCRIPT [ARGS...] (or --list)")
    patches.check_skip(args.skip)
    path = os.path.abspath(args.script)
    tree = script_fixes.parse_script(path)
    fixes = script_fixes.fix_script(tree, args.script, skip=args.skip)
    if args.check:
        for r in fixes:
            print(f"{r.name:22} {r.status:14} {r.detail}")
        if args.show_source:
            import ast

            print(ast.unparse(tree))
        return 0
    script_fixes.check_imports(tree, args.script)
    check_processes()
    applied = patches.apply(skip=args.skip)
    if is_rank0():
        print(_summary(applied, fixes), file=sys.stderr, flush=True)
    run_fixed(tree, path, args.script_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
