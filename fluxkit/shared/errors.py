"""One place that decides how a user's mistake is reported: one line, non-zero exit."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in what the user asked for (a path, a flag, an input file).

    The message must name the culprit and the fix; it is printed as one line, without a
    traceback, and the process exits with status 2. `agreed` errors are raised alike by every
    process after they agreed on them (a stop request): only the first process says them.
    """

    agreed = False


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def nearest(word: str, choices) -> str | None:
    """The choice closest to a misspelt word, or None when none is close."""
    import difflib

    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


class FlagParser(argparse.ArgumentParser):
    """argparse whose mistakes are one `PROG: error:` line and exit status 2 (SystemExit, as argparse's
    own) without the usage block; an unknown flag names the nearest known one ("did you mean
    --learning_rate?"). Its name is the command's as typed: a script's file name, `python -m fluxkit.X`."""

    def __init__(self, *args, **kwargs):
        if not args:
            kwargs.setdefault("prog", _prog_name())
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {' '.join(self._suggest(message).split())}\n")

    def _suggest(self, message: str) -> str:
        prefix = "unrecognized arguments: "
        if not message.startswith(prefix):
            return message
        unknown = [a.split("=", 1)[0] for a in message[len(prefix):].split() if a.startswith("-")]
        if not unknown:
            return message
        flags = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        guess = nearest(unknown[0], flags)
        hint = f"did you mean {guess}?" if guess else f"{self.prog} --help lists the flags"
        return f"unknown flag {unknown[0]}; {hint}" + (f" (also unknown: {' '.join(unknown[1:])})" if unknown[1:] else "")


def report_user_error(err: UserError, prog: str | None = None) -> int:
    name = prog or _prog_name()
    message = " ".join(str(err).split())  # one line, whatever the message held
    print(f"{name}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def _prog_name() -> str:
    import os

    if not (sys.argv and sys.argv[0]):
        return "fluxkit"
    path = os.path.abspath(sys.argv[0])
    inside = os.path.relpath(path, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the fluxkit folder
    if not inside.startswith(os.pardir) and inside.endswith(".py"):  # `python -m fluxkit.plan`, `-m fluxkit.cache`
        parts = inside[:-3].split(os.sep)
        return "python -m " + ".".join(["fluxkit"] + parts[:-1 if parts[-1] == "__main__" else None])
    return os.path.basename(path)


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate an entry point: UserError -> one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            rc = int(main(*args, **kwargs) or 0)
        except UserError as err:
            rc = EXIT_USER_ERROR
            if err.agreed and _connected():
                if _rank("RANK") == 0:  # every process raised it at the same step: the first one says it
                    report_user_error(err)
                _leave_together()
            elif _said_by_another_process():
                _record_exit_status(rc)
                _wait_for_the_process_that_says_it()
                return rc
            else:
                report_user_error(err)
        except KeyboardInterrupt:
            print(f"{_prog_name()}: interrupted", file=sys.stderr, flush=True)
            rc = EXIT_INTERRUPTED
        _record_exit_status(rc)
        return rc

    return wrapper


def _rank(variable: str) -> int:
    import os

    return int(os.environ.get(variable, "0") or 0)


def _connected() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _said_by_another_process() -> bool:
    """Under `accelerate launch`, every process checks the same flags and files before the processes
    connect, and each would print the same line: before that, only each machine's first process
    (LOCAL_RANK 0) reports. Once connected, a process's error may be its own (a file only it read),
    so every process reports it (an agreed one excepted: the first process says it)."""
    return _rank("LOCAL_RANK") != 0 and not _connected()


def _leave_together() -> None:
    """After an agreed error: no process leaves before the first one has said it (the launcher's
    agent stops the others when one exits first)."""
    import torch.distributed as dist

    try:
        dist.barrier()
    except Exception:  # a process already gone: nothing left to wait for
        pass


SILENT_WAIT_S = 30.0  # the longest a quiet process waits; processes can start seconds apart on a loaded host


def _wait_for_the_process_that_says_it() -> None:
    """A process that leaves the line to another must not exit first: torch's elastic agent stops
    every other process when one fails, and would stop the one that says it before it prints (a
    silent run, seen with two processes). So it waits, with the default signal handlers back, to be
    stopped by the agent once that process has failed; alone (no agent) it does not wait."""
    import os
    import signal
    import time

    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    time.sleep(SILENT_WAIT_S)


EXIT_STATUS_ENV = "FLUXKIT_EXIT_STATUS_FILE"


def _record_exit_status(rc: int) -> None:
    """Leave our exit status where a launcher asked for it: `accelerate launch` itself only
    reports 1 for any failed process, and the launchers promise the trainer's own status."""
    import os

    path = os.environ.get(EXIT_STATUS_ENV)
    if path:
        try:
            with open(path, "w") as f:
                f.write(f"{rc}\n")
        except OSError:
            pass  # the status is a courtesy; never turn it into a second failure
