"""The launchers' closing report, read from the trainer's JSON summary (never from tqdm output).

fluxkit.launch calls final_report(); the same report by hand:

    python -m fluxkit.launch.report --summary OUTPUT/train_summary.json --network FluxLora --log_dir OUTPUT/logs

Prints the reference's final lines ("Final Performance images/sec : X", "Final Train Loss : Y",
"E2E Training Duration sec : Z") plus MFU and peak memory, and writes the reference's
CASE_NAME.log (`key = value` lines) into --log_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..shared.errors import UserError, report_user_error
from ..shared.fsio import atomic_write_text

SUMMARY_FILE = "train_summary.json"
_REQUIRED = ("images_per_sec", "final_loss", "e2e_seconds", "train_seconds", "world_size", "grad_accum", "micro_batch")


def load_summary(path: str, since: float | None = None) -> dict | None:
    """The summary at path, or None when it is missing or older than `since` (a previous run's)."""
    if not os.path.isfile(path):
        return None
    if since is not None and os.path.getmtime(path) < since:
        return None
    with open(path) as f:
        try:
            summary = json.load(f)
        except ValueError as err:
            raise UserError(f"{path} is not valid JSON ({err}); the trainer's summary is damaged") from None
    missing = [k for k in _REQUIRED if k not in summary]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it is not a fluxkit trainer summary")
    return summary


def _fmt(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def case_name(network: str, micro_batch, world_size) -> str:
    # the reference's name pattern, with the real process count instead of a fixed "8p"
    return f"{network}_bs{micro_batch}_{world_size}p_acc"


def report(summary: dict | None, network: str, batch_size: int, wall_seconds: float | None) -> tuple[list[str], dict]:
    """(the lines to print, the CASE_NAME.log fields) for a summary, or for a trainer that wrote none."""
    s = summary or {}
    world = s.get("world_size")
    micro = s.get("micro_batch", batch_size)
    accum = s.get("grad_accum")
    e2e = s.get("e2e_seconds", wall_seconds)
    mfu = s.get("mfu")
    lines = [
        "------------------ Final result ------------------",
        f"Final Performance images/sec : {_fmt(s.get('images_per_sec'), '.2f')}",
        f"Final Train Loss : {_fmt(s.get('final_loss'), '.4f')}",
        f"E2E Training Duration sec : {_fmt(e2e, '.1f')}",
        f"Training Duration sec : {_fmt(s.get('train_seconds'), '.1f')}",
        f"MFU : {_fmt(None if mfu is None else 100 * mfu, '.2f', ' %')}",
        f"Peak Memory GB : {_fmt(s.get('peak_memory_gb'), '.2f')}",
    ]
    if summary is not None:
        lines.append(f"Global batch : {micro} per device x {world} processes x {accum} accumulation = "
                     f"{micro * world * accum} images per optimizer step")
    fields = {
        "Network": network,
        "BatchSize": micro,
        "DeviceType": s.get("device", "n/a"),
        "CaseName": case_name(network, micro, world if world is not None else "n"),
        "ActualFPS": _fmt(s.get("images_per_sec"), ".2f"),
        "ActualLoss": _fmt(s.get("final_loss"), ".4f"),
        "E2ETrainingTime": _fmt(e2e, ".1f"),
        "TrainingTime": _fmt(s.get("train_seconds"), ".1f"),
        "WorldSize": _fmt(world, ""),
        "GradAccum": _fmt(accum, ""),
        "MFU": _fmt(mfu, ".4f"),
    }
    return lines, fields


def write_case_log(log_dir: str, fields: dict) -> str:
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"{fields['CaseName']}.log")
    # never a half-written case log
    return atomic_write_text(path, "".join(f"{key} = {value}\n" for key, value in fields.items()))


def final_report(summary_path: str, network: str, log_dir: str, batch_size: int | None = None,
                 since: float | None = None, allow_missing: bool = False) -> list[str]:
    """The closing lines for a finished run; writes CASE_NAME.log into log_dir (UserError if the summary is bad)."""
    summary = load_summary(summary_path, since)
    if summary is None and not allow_missing:
        raise UserError(f"the trainer exited 0 but wrote no {summary_path}; no performance summary to report")
    wall = time.time() - since if since is not None else None
    lines, fields = report(summary, network, batch_size, wall)
    if summary is None:
        lines.insert(1, f"(the trainer wrote no {os.path.basename(summary_path)}: only the wall time is known)")
    lines.append(f"Case log : {write_case_log(log_dir, fields)}")
    return lines


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summary", required=True, help=f"the trainer's {SUMMARY_FILE}")
    p.add_argument("--network", required=True, help="Network name for CASE_NAME.log, e.g. FluxDreambooth")
    p.add_argument("--log_dir", required=True, help="where CASE_NAME.log is written")
    p.add_argument("--batch_size", type=int, default=None, help="micro batch, used when the trainer wrote no summary")
    p.add_argument("--since", type=float, default=None, help="ignore a summary older than this epoch time (a previous run's)")
    p.add_argument("--allow_missing", action="store_true",
                   help="a trainer that writes no summary (e.g. diffusers' upstream script) is not an error")
    p.add_argument("--prog", default="run_summary", help="name used in error messages")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        lines = final_report(args.summary, args.network, args.log_dir, args.batch_size, args.since, args.allow_missing)
    except UserError as err:
        return report_user_error(err, prog=args.prog)
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
