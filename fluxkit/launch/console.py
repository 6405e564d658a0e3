"""The training processes' output on the console: everything into the log, and to the terminal all
but known noise (torch elastic's echo of a failure already reported, a line every rank prints);
signals to the launcher passed on to the run."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys


# a tqdm bar: "desc:  33%|###   | 10/30 [00:04<00:06,  3.22it/s, loss=1.4]", then whatever followed it
_BAR = re.compile(r"^(.*?\[\d+:\d+(<[\d:?]+)?,[^\]]*\])(.*)$")
# torch elastic's own log lines (glog style): "W1130 00:01:02.345000 1234 torch/distributed/elastic/...] ..."
_ELASTIC_LOG = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/(elastic|run)")
# what the launcher process prints when a worker failed or a signal arrived: a consequence, never the cause
_LAUNCHER_EXCEPTIONS = ("torch.distributed.elastic.multiprocessing.api.SignalException",
                        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError",
                        "subprocess.CalledProcessError", "KeyboardInterrupt")
# Named messages libraries print bare (no logger, no warning to filter at their source) that tell a
# user nothing: DeepSpeed announces its CPU shared-memory op from every process of every run.
_KNOWN_NOISE = ("deepspeed_shm_comm_op built successfully",)


class ConsoleFilter:
    """What of a run's output reaches the console (the log gets everything).

    Dropped: torch elastic's tracebacks and failure report for a worker that already said why
    (SignalException, ChildFailedError) and its log lines, the bare prints in _KNOWN_NOISE, a line already shown (the same message
    from another rank), and repeated blank lines. Every other line, errors and real tracebacks
    included, is shown. With verbose, nothing is dropped.
    """

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.seen: set[str] = set()
        self.block: list[str] | None = None  # a traceback being read
        self.report_rules = 0  # "=====" lines of elastic's failure report still to skip
        self.last_blank = True

    def feed(self, line: str) -> list[str]:
        if self.verbose:
            return [line]
        if self.report_rules:
            if line.startswith("====="):
                self.report_rules -= 1
            return []
        if self.block is not None:
            self.block.append(line)
            if self._ends_block(line):
                block, self.block = self.block, None
                if any(line.startswith(e) for e in _LAUNCHER_EXCEPTIONS):
                    if "ChildFailedError" in line:
                        self.report_rules = 2
                    return []
                return self._show_all(block)
            return []
        if line.startswith("Traceback (most recent call last)") or line.startswith(("During handling of the above",
                                                                                    "The above exception was")):
            self.block = [line]
            return []
        if _ELASTIC_LOG.match(line) or any(n in line for n in _KNOWN_NOISE):
            return []
        shown = self._show(line)
        return [] if shown is None else [shown]

    @staticmethod
    def _ends_block(line: str) -> bool:
        return bool(line) and not line[0].isspace() and not line.startswith(("Traceback", "During handling", "The above"))

    def _show(self, line: str) -> str | None:
        text = line.strip()
        if not text:
            if self.last_blank:
                return None
            self.last_blank = True
            return line
        self.last_blank = False
        if text in self.seen and "\r" not in line:
            return None
        self.seen.add(text)
        return line

    def _show_all(self, lines: list[str]) -> list[str]:
        # _show once per line: it records what it shows, so a second call would hide the line it just passed
        shown = [self._show(line) for line in lines]
        return [line for line in shown if line is not None]

    def flush(self) -> list[str]:
        block, self.block = self.block or [], None
        return self._show_all(block)


class Supervisor:
    """Runs a command in a process group of its own, its stdout/stderr through a ConsoleFilter to ours and
    everything into a log file. SIGINT/SIGTERM sent to the launcher go to the command (once per signal)."""

    def __init__(self, log_path: str | None, verbose: bool):
        self.log_path = log_path
        self.filter = ConsoleFilter(verbose)
        self.signalled: str | None = None
        self.proc = None

    def _forward(self, signum, frame):
        self.signalled = signal.Signals(signum).name
        if self.proc is not None and self.proc.poll() is None:
            try:  # torchrun (accelerate) passes it on to every worker and waits for them
                os.kill(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def __call__(self, command: list[str], env: dict) -> int:
        log = open(self.log_path, "a", encoding="utf-8") if self.log_path else None
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            # its own process group: a Ctrl-C at the terminal reaches only us, and we pass it on once
            if self.signalled:  # stopped before the command started: nothing to pass it on to
                return 128 + signal.Signals[self.signalled].value
            self.proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, process_group=0)
            if self.signalled:  # it came while the command was starting
                self._forward(signal.Signals[self.signalled].value, None)
            sel = selectors.DefaultSelector()
            pending = {}
            for stream, out in ((self.proc.stdout, sys.stdout), (self.proc.stderr, sys.stderr)):
                os.set_blocking(stream.fileno(), False)
                sel.register(stream, selectors.EVENT_READ, out)
                pending[stream] = b""
            while sel.get_map():
                for key, _ in sel.select():
                    chunk = key.fileobj.read(65536)
                    if chunk is None:
                        continue
                    if not chunk:
                        sel.unregister(key.fileobj)
                        self._emit(pending.pop(key.fileobj) + b"\n" if pending.get(key.fileobj) else b"", key.data, log)
                        continue
                    data = pending[key.fileobj] + chunk
                    cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
                    pending[key.fileobj] = data[cut + 1:]
                    self._emit(data[:cut + 1], key.data, log)
            rc = self.proc.wait()
            for line in self.filter.flush():
                sys.stderr.write(line + "\n")
            return rc
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if log:
                log.close()

    def _emit(self, data: bytes, out, log) -> None:
        if not data:
            return
        text = data.decode("utf-8", errors="replace")
        if log:
            log.write(text)
            log.flush()
        # progress bars redraw with \r and pass straight through; a line printed right after a bar
        # (another rank's message, a log line) is split off and judged like any other line
        for segment in re.split(r"(?<=\n)", text):
            if not segment:
                continue
            if not segment.endswith("\n"):  # a bar being redrawn
                out.write(segment)
                continue
            body = segment[:-1]
            head, cr, last = body.rpartition("\r")
            bar = _BAR.match(last)
            if cr or bar:
                rest = bar.group(3) if bar else ""
                if not rest.strip():
                    out.write(segment)
                    self.filter.last_blank = True
                    continue
                out.write(head + cr + bar.group(1) + "\n")
                body = rest
            for line in self.filter.feed(body):
                out.write(line + "\n")
        out.flush()


def tee_print(text: str, log_path: str | None, stream=None) -> None:
    stream = stream or sys.stdout
    print(text, file=stream, flush=True)
    if log_path:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
