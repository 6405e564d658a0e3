"""python -m fluxkit.checkpoint verify PATH: check checkpoints without a run (after copying them
between machines, before a long resume). Exit 0 when every checkpoint checked is intact, 2 when
one is damaged (one error line for each, naming the file and what it holds)."""

from __future__ import annotations

import argparse
import os
import sys

from ..shared.errors import EXIT_USER_ERROR, FlagParser, UserError, cli, report_user_error
from .folders import _NAME
from .manifest import STATE_FILE
from .verify import Damaged, check

PROG = "python -m fluxkit.checkpoint"


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog=PROG, description=(
        "Check fluxkit training checkpoints without starting a run, e.g. after copying them between machines. "
        f"Every checkpoint records each file's size and SHA-256 in its {STATE_FILE}."),
        epilog=f"example: {PROG} verify OUTPUT_DIR/checkpoint-500")
    sub = p.add_subparsers(dest="command", required=True, metavar="verify")
    v = sub.add_parser("verify", prog=f"{PROG} verify", help="check checkpoints against their manifests",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=(
                           "Read every file of a checkpoint and compare it with the size and SHA-256 its "
                           f"{STATE_FILE} recorded when it was saved\n(weights, optimizer, schedule, each "
                           "process's random states, the step and data position, DeepSpeed's engine files).\n"
                           "A checkpoint written before manifests existed gets a partial check: its files are "
                           "whole and readable.\n\nexit status: 0 every checkpoint checked is intact; 2 damage "
                           "found (one error line per damaged\ncheckpoint, naming the file and what it holds) "
                           "or PATH is not a checkpoint."),
                       epilog=f"examples:\n  {PROG} verify OUTPUT_DIR/checkpoint-500\n"
                              f"  {PROG} verify OUTPUT_DIR      # every checkpoint, newest first, and the newest intact one")
    v.add_argument("path", metavar="PATH", help="a checkpoint-STEP folder, or a trainer's --output_dir")
    return p


def _targets(path: str) -> list[str]:
    if os.path.isfile(os.path.join(path, STATE_FILE)) or _NAME.match(os.path.basename(path.rstrip(os.sep))):
        return [path]
    found = sorted((int(m.group(1)), os.path.join(path, n)) for n in os.listdir(path) for m in [_NAME.match(n)] if m)
    if not found:
        raise UserError(f"{path!r} is neither a checkpoint (no {STATE_FILE}) nor an output folder holding "
                        "checkpoint-STEP folders; give one of those")
    return [p for _, p in reversed(found)]


def verify(path: str) -> int:
    if not os.path.isdir(path):
        raise UserError(f"{path!r} is not a folder; give a checkpoint-STEP folder or a trainer's --output_dir")
    damaged, intact = 0, None
    for target in _targets(path):
        try:
            state, complete = check(target)
        except Damaged as damage:
            damaged += 1
            report_user_error(UserError(f"checkpoint {target!r} is damaged: {damage}"), PROG)
            continue
        files = state.get("manifest", {}).get("files", {}) if complete else {}
        how = (f"{len(files) + 1} files, {sum(e['size'] for e in files.values()) / 1e6:.1f} MB, SHA-256 matches its manifest"
               if complete else "partial check: no manifest (written before checkpoints recorded one); its files are "
                                "whole and readable, but cannot be proven unchanged")
        print(f"{target}: intact at step {state.get('global_step')} ({how})", flush=True)
        intact = intact or target
    if damaged and len(_targets(path)) > 1:
        print(f"newest intact checkpoint: {intact}" if intact else "no intact checkpoint", flush=True)
    return EXIT_USER_ERROR if damaged else 0


@cli
def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return verify(args.path)


if __name__ == "__main__":
    sys.exit(main())
