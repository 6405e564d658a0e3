"""What every suite shares: repeat statistics, the noise rule, the result record and its schema,
running a command, and the markdown table.

Statistics: a metric measured over repeats is kept as its median, min, max and all values.
Its spread is max - min. Two measurements differ only when their [min, max] ranges do not
overlap; otherwise the difference is smaller than the spread and is reported as noise.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Iterable

from fluxkit.shared.environment import free_port, git_state, versions
from fluxkit.shared.fsio import atomic_write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "fluxkit-bench/1"
STATUSES = ("ok", "skipped", "failed")


# ---------------------------------------------------------------- statistics

def summarize(values: Iterable[float | None]) -> dict | None:
    """Median, min, max, spread (max - min) and the raw values of the repeats that produced a number."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "spread": max(vals) - min(vals), "n": len(vals), "values": vals}


def compare(base: dict | None, other: dict | None) -> dict:
    """How `other` relates to `base` (two summaries): ratio of medians, and whether it is noise.

    verdict: "noise" when the two [min, max] ranges overlap (the difference is within the
    spread), "higher"/"lower" when they do not, "unjudged" when either has a single repeat.
    """
    if not base or not other:
        return {"ratio": None, "verdict": "missing"}
    ratio = other["median"] / base["median"] if base["median"] else None
    if base["n"] < 2 or other["n"] < 2:
        verdict = "unjudged"
    elif other["min"] <= base["max"] and base["min"] <= other["max"]:
        verdict = "noise"
    else:
        verdict = "higher" if other["median"] > base["median"] else "lower"
    return {"ratio": ratio, "verdict": verdict}


# ---------------------------------------------------------------- formatting

def suite_result(rows: list, comparisons: list, notes: list[str], failures: list[str]) -> dict:
    """A measuring suite's result: failed when any run failed or nothing was measured."""
    notes = notes + [f"failed run: {f}" for f in failures]
    status = "ok" if rows and not failures else "failed"
    result = {"status": status, "rows": rows, "comparisons": comparisons, "notes": notes}
    if status == "failed":
        result["reason"] = failures[0] if failures else "no run produced a summary"
    return result


def fmt_number(value: Any, digits: int = 3) -> str:
    """A number with `digits` significant digits, no exponent for everyday magnitudes."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0:
        return "0"
    if isinstance(value, int) and abs(value) < 10**6:
        return str(value)
    mag = math.floor(math.log10(abs(value)))
    if mag >= 6 or mag < -3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{max(0, digits - 1 - mag)}f}"


def fmt_cell(value: Any) -> str:
    """A table cell: a summary prints as `median ±half-spread` (and the repeat count), else the value."""
    if isinstance(value, dict) and "median" in value:
        if value["n"] < 2:
            return f"{fmt_number(value['median'])} (n=1)"
        return f"{fmt_number(value['median'])} ±{fmt_number(value['spread'] / 2, 2)}"
    return fmt_number(value)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; cells go through fmt_cell, pipes in text are escaped."""
    def cell(v):
        return fmt_cell(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def suite_table(name: str, suite: dict) -> str:
    """The markdown for one suite: its rows (case, params, metrics in first-seen order), its
    comparisons, its notes; or why it was skipped or failed."""
    out = [f"### {name}"]
    load = suite.get("load_average")
    if load and None not in load:
        out.append(f"host load average (1 min) {load[0]:.1f} at start, {load[1]:.1f} at end, on {os.cpu_count()} cores; "
                   f"{suite['seconds']:.0f} s")
    if suite["status"] != "ok":
        out.append(f"{suite['status']}: {suite.get('reason') or 'no reason given'}")
    groups: dict[str, list[dict]] = {}
    for row in suite.get("rows", []):  # rows with different metrics go in separate tables
        groups.setdefault(row.get("table", ""), []).append(row)
    for title, rows in groups.items():
        params = _ordered_keys(r.get("params", {}) for r in rows)
        metrics = _ordered_keys(r.get("metrics", {}) for r in rows)
        headers = ["case", *params, *metrics]
        body = [[r["case"], *(r.get("params", {}).get(k) for k in params),
                 *(r.get("metrics", {}).get(k) for k in metrics)] for r in rows]
        out.append((f"\n{title}:\n\n" if title else "") + markdown_table(headers, body))
    comparisons = suite.get("comparisons", [])
    if comparisons:
        out.append("")
        out.append(markdown_table(["comparison", "metric", "ratio", "verdict"],
                                  [[c["name"], c["metric"], c["ratio"], c["verdict"]] for c in comparisons]))
    for note in suite.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out)


def _ordered_keys(dicts: Iterable[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        for k in d:
            seen.setdefault(k, None)
    return list(seen)


def results_markdown(result: dict) -> str:
    m = result["machine"]
    head = (f"## fluxkit bench {result['created']} (commit {result['git']['commit'][:10]}"
            f"{' + local changes' if result['git']['dirty'] else ''})\n"
            f"machine: {m['device_name']} x{m['device_count']} ({m['device']}), {m['cpu']} with {m['cpu_cores']} cores, "
            f"{fmt_number(m['memory_gb'])} GiB; torch {result['versions'].get('torch')}, "
            f"diffusers {result['versions'].get('diffusers')}\n"
            f"command: {result['command']}\n"
            f"cells: median ±half the spread (max - min) over repeats; comparisons whose ranges overlap are noise")
    return "\n\n".join([head] + [suite_table(n, s) for n, s in result["suites"].items()])


# ---------------------------------------------------------------- the result record

def machine_info(device_info) -> dict:
    import psutil

    from fluxkit.shared.device import device_name
    from fluxkit.shared.flops import _cpu_model

    name = device_name(device_info) or "cpu"
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cpu_cores": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30,
            "device": device_info.type, "device_name": name, "device_count": device_info.count}


def new_result(argv: list[str], flags: dict, device_info) -> dict:
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m bench", *argv]),
        "flags": flags,
        "git": git_state(ROOT) or {"commit": "unknown", "dirty": False},
        "machine": machine_info(device_info),
        "versions": versions(),
        "suites": {},
    }


def validate(result: dict) -> None:
    """Raise ValueError naming the first field that does not follow the schema."""
    def need(cond, what):
        if not cond:
            raise ValueError(f"bench result: {what}")

    need(isinstance(result, dict) and result.get("schema") == SCHEMA, f"schema must be {SCHEMA!r}")
    for key, typ in (("created", str), ("command", str), ("flags", dict), ("git", dict), ("machine", dict),
                     ("versions", dict), ("suites", dict)):
        need(isinstance(result.get(key), typ), f"{key!r} must be a {typ.__name__}")
    need(isinstance(result["git"].get("commit"), str) and isinstance(result["git"].get("dirty"), bool),
         "git needs commit (str) and dirty (bool)")
    for key in ("device", "device_name", "device_count", "cpu", "cpu_cores", "memory_gb"):
        need(key in result["machine"], f"machine lacks {key!r}")
    need(result["versions"].get("torch"), "versions lacks torch")
    for name, suite in result["suites"].items():
        need(suite.get("status") in STATUSES, f"suite {name!r}: status must be one of {STATUSES}")
        need(isinstance(suite.get("seconds"), (int, float)), f"suite {name!r}: seconds must be a number")
        need(suite["status"] == "ok" or suite.get("reason"), f"suite {name!r}: a {suite['status']} suite needs a reason")
        for row in suite.get("rows", []):
            need(isinstance(row.get("case"), str), f"suite {name!r}: every row needs a case name")
            need(isinstance(row.get("metrics"), dict), f"suite {name!r} case {row.get('case')!r}: metrics must be a dict")
            for metric, value in row["metrics"].items():
                if isinstance(value, dict):
                    need({"median", "min", "max", "spread", "n", "values"} <= set(value),
                         f"suite {name!r} case {row['case']!r}: {metric} is not a repeat summary")
                    need(value["min"] <= value["median"] <= value["max"], f"suite {name!r}: {metric} median outside [min, max]")
        for comp in suite.get("comparisons", []):
            need({"name", "metric", "ratio", "verdict"} <= set(comp), f"suite {name!r}: comparison lacks fields")


def write_result(result: dict, results_dir: str) -> str:
    """Validate and write the result as results_dir/<time>-<suites>.json (never overwriting)."""
    validate(result)
    os.makedirs(results_dir, exist_ok=True)
    stamp = result["created"].replace(":", "").replace("-", "")
    base = os.path.join(results_dir, f"{stamp}-{'+'.join(result['suites']) or 'none'}")
    path, i = base + ".json", 1
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}.json"
    atomic_write_json(path, result)
    return path


# ---------------------------------------------------------------- running commands

class CommandFailed(RuntimeError):
    pass


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process of this one (and theirs, once
    waited for). The difference around one command is that command's CPU time: on a host shared with
    other work it moves far less than the wall time, which waits for the cores."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(cmd: list[str], log_path: str, env: dict | None = None, timeout: float = 900) -> str:
    """Run cmd from the repo root with stdout+stderr to log_path; return stdout.

    Raises CommandFailed with the log's last lines when it exits non-zero or times out.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as err:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"timed out after {timeout:.0f}s: {' '.join(cmd)} (log: {log_path})") from None
    with open(log_path, "a") as err:
        err.write(f"\n--- stdout ---\n{proc.stdout}\n--- exit {proc.returncode} after {time.perf_counter() - start:.1f}s ---\n")
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = [line for line in f.read().splitlines() if line.strip()][-6:]
        raise CommandFailed(f"exit {proc.returncode}: {' '.join(cmd[:4])} ...; log {log_path}: " + " / ".join(tail))
    return proc.stdout


# ---------------------------------------------------------------- what suites are given

ACCELERATE_CONFIG = os.path.join(ROOT, "pretrain_bf16_accelerate_config.yaml")


def launch_prefix(processes: int, deepspeed: bool = False, config: str | None = None) -> list[str]:
    """How to start a script: plain python for one process, accelerate launch for more
    (with the toolkit's DeepSpeed ZeRO-2 bf16 config when deepspeed=True), or accelerate launch
    with the accelerate config file `config` (one process too)."""
    if processes == 1 and not config:
        return [sys.executable]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    # --multi_gpu is accelerate's torchrun launcher; it starts N processes on CPU hosts too
    # (--cpu would start one), and the scripts pick gloo there.
    cmd += ["--config_file", config or ACCELERATE_CONFIG] if deepspeed or config else ["--multi_gpu"]
    return cmd + ["--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(free_port())]


def threads_env(processes: int) -> dict:
    """Split the host's cores evenly between processes, so 1 vs 2 processes uses the same CPU."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes)), "TOKENIZERS_PARALLELISM": "false"}


class Context:
    """What a suite gets: parsed flags, the device, a scratch folder, and shared test assets."""

    def __init__(self, args, device_info, work_dir: str):
        self.args, self.device, self.work_dir = args, device_info, work_dir
        self._assets: dict | None = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.work_dir, *parts)

    def log(self, message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    def small_assets(self) -> dict:
        """The `small` preset pipeline and 256x256 sample data, built once per bench run
        (or the pipeline given with --model_path)."""
        if self._assets is None:
            from fluxkit.tiny.build import build_datasets, build_pipeline

            model = self.args.model_path
            if not model:
                model = self.path("small_flux")
                if not os.path.isdir(model):
                    self.log("building the small random FLUX pipeline (once per run)")
                    build_pipeline(model, "small", seed=0)
            data = self.path("small_data")
            if not os.path.isdir(data):
                build_datasets(data, seed=0, resolution=256)
            self._assets = {"model_path": model, "instance_dir": os.path.join(data, "instance"),
                            "prompts_file": os.path.join(data, "prompts.txt"),
                            "edit_targets": os.path.join(data, "edit", "targets"),
                            "edit_references": os.path.join(data, "edit", "references")}
        return self._assets

    def small_model(self, family: str) -> str:
        """The `small` preset pipeline of another FLUX family (fluxkit.tiny), built once per bench run."""
        from fluxkit.tiny.build import build_pipeline

        model = self.path(f"small_{family}")
        if not os.path.isdir(model):
            self.log(f"building the small random {family} pipeline (once per run)")
            build_pipeline(model, "small", seed=0, family=family)
        return model


def timed_steps(device_info, step, warmup: int, steps: int) -> list[float]:
    """Wall seconds of each of `steps` calls of step() after `warmup` untimed ones; the device is
    synchronized before and after each call, so queued work is counted where it was launched."""
    from fluxkit.shared.device import synchronize

    times = []
    for i in range(warmup + steps):
        synchronize(device_info)
        start = time.perf_counter()
        step()
        synchronize(device_info)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def model_geometry(model_path: str) -> dict:
    """The transformer config and the VAE's downsampling factor of a saved FLUX pipeline."""
    with open(os.path.join(model_path, "transformer", "config.json")) as f:
        transformer = json.load(f)
    with open(os.path.join(model_path, "vae", "config.json")) as f:
        vae = json.load(f)
    return {"transformer": transformer, "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1)}


def process_peak_flops(device_info, dtype, processes: int) -> float | None:
    """Peak FLOP/s one process of a `processes`-process run can use: a device each on
    accelerators; on CPU its share of the whole CPU's measured peak."""
    from fluxkit.shared.flops import cpu_peak_flops, peak_flops

    if device_info.type == "cpu" and not os.environ.get("FLUXKIT_PEAK_TFLOPS"):
        return cpu_peak_flops(dtype) / processes
    return peak_flops(device_info, dtype)
