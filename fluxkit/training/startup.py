"""Where a run's start-up goes: named marks, each the seconds since the previous one.

The trainer marks the end of each phase (imports, plan, scan, accelerate, model load, cache,
prepare, first step, train (the other steps), save); the first mark counts from this process's start (interpreter start-up
and imports included). The summary's `startup_seconds` holds them, `process_started_at` the
process's start as a Unix time, so a caller timing the whole command can tell what came before
the process (`accelerate launch` itself). `python -m bench startup` reads both.
"""

from __future__ import annotations

import os
import time

_MARKS: list[tuple[str, float]] = []


def process_started_at() -> float:
    """This process's start as a Unix time (Linux: from /proc; elsewhere: when this module loaded)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # starttime: clock ticks after boot
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])  # seconds since boot, 10 ms resolution
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _LOADED_AT


_LOADED_AT = time.time()


_RUNS = {"base": None}  # when the current run's first phase began


def begin(phase: str = "imports") -> None:
    """A run starts: its first phase ends now. It began with the process for the process's first
    run; a later run in the same process (tests, notebooks) has imported everything already. The garbage
    collector, paused while a trainer imports (fluxkit.shared.host_runtime), runs again from here."""
    from ..shared.host_runtime import resume_collection

    resume_collection()
    _MARKS.clear()
    _RUNS["base"] = process_started_at() if _RUNS["base"] is None else time.time()
    mark(phase)


def mark(phase: str) -> None:
    """The phase that ends now."""
    _MARKS.append((phase, time.time()))


def phases() -> dict[str, float]:
    """{phase: seconds} in the order marked; a phase marked twice adds up."""
    out: dict[str, float] = {}
    previous = _RUNS["base"] if _RUNS["base"] is not None else process_started_at()
    for phase, at in _MARKS:
        out[phase] = round(out.get(phase, 0.0) + max(0.0, at - previous), 3)
        previous = at
    return out
