"""Runtime defaults for the host a run starts on, each applied only where the user set nothing.

- OpenMP's wait policy, chosen by the host's load when the run starts: OpenMP threads that spin between
  parallel regions hold cores the peer threads of the same region wait for. On a busy host (1-minute
  load average over half the cores) OMP_WAIT_POLICY=PASSIVE: threads sleep at once (spinning made a LoRA
  step 10-20x slower there). On a quiet host PASSIVE with GOMP_SPINCOUNT=3000: threads spin briefly
  before they sleep (pure sleeping made a small model's step 1.4x slower there, a short spin costs
  nothing; a short spin on a busy host costs 1.3-2.6x, so it is not used there). Measured in
  docs/performance.md. Read by the OpenMP runtime when it loads, so it is set before torch is imported
  (entry scripts) or in the environment of the processes a launcher starts; the user's own
  OMP_WAIT_POLICY or GOMP_SPINCOUNT wins, and then neither is touched.
- TORCH_EXTENSIONS_DIR, one folder per Python environment: torch keys its JIT-built extensions
  (DeepSpeed's ops) by name only, so two environments on one host sharing ~/.cache/torch_extensions
  rebuild each other's ops on every launch.
- Optional libraries a run never calls (bitsandbytes, torchao: fluxkit.weights.quant.libraries_not_needed)
  are left out of a process started for one of the toolkit's entry points (scripts, launchers), before
  diffusers, transformers or peft load: these look each one up once and import it whenever installed.
- DeepSpeed's shared-memory communication op (deepspeed_shm_comm) is not built for training on a CPU:
  DeepSpeed's TorchBackend compiles it (about a minute of C++) when it starts, and uses it only for
  inference_all_reduce, which training never calls; gradients go through torch.distributed (gloo).
"""

from __future__ import annotations

import hashlib
import os
import sys

WAIT_POLICY = "PASSIVE"
QUIET_SPIN_COUNT = "3000"  # spins before an OpenMP thread sleeps, on a quiet host (libgomp's default: 300000)
OPENMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SHM_COMM_OP = "deepspeed_shm_comm"


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def host_busy(load: float | None = None, cpus: int | None = None) -> bool:
    """Whether other work keeps more than half the cores busy (the 1-minute load average)."""
    if load is None:
        if not hasattr(os, "getloadavg"):
            return False
        load = os.getloadavg()[0]
    return load > 0.5 * (usable_cpus() if cpus is None else cpus)


def openmp_wait(environ, load: float | None = None, cpus: int | None = None) -> dict[str, str]:
    """OpenMP's wait settings for a run starting now (module docstring); nothing where `environ` sets
    either variable."""
    if any(environ.get(name) for name in OPENMP_VARS):
        return {}
    if host_busy(load, cpus):
        return {"OMP_WAIT_POLICY": WAIT_POLICY}
    return {"OMP_WAIT_POLICY": WAIT_POLICY, "GOMP_SPINCOUNT": QUIET_SPIN_COUNT}


def extensions_dir() -> str:
    """A TORCH_EXTENSIONS_DIR of this Python environment (sys.prefix), under the user's cache."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    env_id = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    return os.path.join(cache, "torch_extensions", f"env-{env_id}")


def env_defaults(environ=None) -> dict[str, str]:
    """The variables above that `environ` (default: this process's) does not set yet."""
    environ = os.environ if environ is None else environ
    wanted = openmp_wait(environ)
    if not environ.get("TORCH_EXTENSIONS_DIR"):
        wanted["TORCH_EXTENSIONS_DIR"] = extensions_dir()
    return wanted


def runtime_env(environ=None) -> dict[str, str]:
    """The variables above as a run started from `environ` gets them: the user's where set, else ours."""
    environ = os.environ if environ is None else environ
    given = {name: environ[name] for name in (*OPENMP_VARS, "TORCH_EXTENSIONS_DIR") if environ.get(name)}
    return {**given, **env_defaults(environ)}


def apply_defaults() -> None:
    """Set env_defaults() in this process; entry scripts call it before anything imports torch."""
    os.environ.update(env_defaults())


def skip_deepspeed_shm_op() -> None:
    """Mark DeepSpeed's shm comm op unbuildable for this process (DeepSpeed keeps the probe result in
    deepspeed.ops.__compatible_ops__, a dict its comm backend reads; edits to it are kept). Call
    before DeepSpeed's comm backend starts, on CPU hosts only."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


LIBRARIES_THAT_LOOK_ONCE = ("diffusers", "transformers", "peft")  # cache what is installed at import


def leave_out(names) -> tuple[str, ...]:
    """Make each of `names` look not installed to every later import and availability check in this
    process (sys.modules[name] = None: Python's own "this import fails"; importlib.util.find_spec
    then returns None). Done only in a process started for one of the toolkit's entry points (a test
    runner's later runs may need them) and before any of LIBRARIES_THAT_LOOK_ONCE loaded (they would
    have recorded the library as present). Returns the names left out."""
    if not names or not _started_for_the_toolkit() or any(m in sys.modules for m in LIBRARIES_THAT_LOOK_ONCE):
        return ()
    left = tuple(name for name in names if name not in sys.modules)
    for name in left:
        sys.modules[name] = None
    return left


def _started_with() -> tuple[str, str] | None:
    """What this interpreter was started to run: ("script", PATH) for python [options] SCRIPT,
    ("module", NAME) for python -m NAME; None for -c or an interactive interpreter."""
    args = list(getattr(sys, "orig_argv", []))[1:]
    while args and args[0].startswith("-"):
        option = args.pop(0)
        if option == "-m":
            return ("module", args[0]) if args else None
        if option == "-c":
            return None
        if option in ("-X", "-W") and args:
            args.pop(0)
    return ("script", args[0]) if args else None


def _started_as(entry: str) -> bool:
    """Whether this interpreter was started to run `entry` (a script's path, or a module's name for
    python -m), not a test runner or another program that runs it inside its own process."""
    started = _started_with()
    if started is None:
        return False
    if started[0] == "module":
        return started[1] == entry
    try:
        return os.path.samefile(started[1], entry)
    except OSError:
        return False


def _started_for_the_toolkit() -> bool:
    """Whether this interpreter was started to run one of the toolkit's scripts or `python -m fluxkit...`
    (the launchers)."""
    from .environment import TOOLKIT_ROOT

    started = _started_with()
    if started is None:
        return False
    if started[0] == "module":
        return started[1].split(".")[0] == "fluxkit"
    return os.path.dirname(os.path.realpath(started[1])) == os.path.realpath(TOOLKIT_ROOT)


_COLLECTION_PAUSED = []


def pause_collection_while_importing(entry: str) -> None:
    """Pause the garbage collector while a trainer imports (torch, diffusers, transformers, DeepSpeed: half a
    million objects, which Python's full collections rescan again and again as they grow: about 0.9 of the 4.3
    CPU-seconds of a trainer's imports here); resume_collection() turns it back on when the run starts. Only in
    a process started to run `entry` (in a test runner's process it changes nothing)."""
    import gc

    if _started_as(entry) and gc.isenabled():
        gc.disable()
        _COLLECTION_PAUSED.append(entry)


def resume_collection() -> None:
    """After pause_collection_while_importing: collect again, with what the imports made (modules, classes:
    alive as long as the process) frozen out of the collector's sight, so the run's collections scan only
    the run's own objects. A no-op when nothing was paused."""
    import gc

    if _COLLECTION_PAUSED:
        _COLLECTION_PAUSED.clear()
        gc.freeze()
        gc.enable()


def exit_without_teardown(rc: int, entry: str) -> None:
    """End the process now, with its exit handlers run but without the interpreter's teardown;
    a plain sys.exit(rc) unless the interpreter was started to run `entry` (the entry script's path,
    or the module's name for python -m: the launchers' fluxkit.launch).

    After a run has written everything and closed its files, CPython still finalizes every module
    and object of torch, diffusers, transformers and friends one by one: 2 to 7 s measured here
    after the last line of a run, for nothing a user keeps. Exit handlers (logging, accelerate,
    torch.distributed, multiprocessing's workers) still run; then stdio is flushed and the process
    ends with rc."""
    import atexit
    import threading

    if not _started_as(entry):
        sys.exit(rc)
    try:
        # as the interpreter would: threading's own exit calls (they stop the worker threads of thread
        # pools never shut down: a joined worker would wait on its queue forever), then wait for the
        # non-daemon threads, then the exit handlers
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken pipe: nothing left to say
                pass
        os._exit(rc)
