"""Shared fixtures: one tiny FLUX pipeline and one sample dataset per test session."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The tests live in folders like the package's (tests/launch, tests/train, tests/data, ...) and import
# each other's helpers by module name (`from test_reliability import ...`, `from conftest import ...`):
# every test folder is on sys.path, whichever test pytest imports first (module names stay unique).
TESTS = os.path.join(ROOT, "tests")
TEST_FOLDERS = sorted(d for d in os.listdir(TESTS) if os.path.isdir(os.path.join(TESTS, d))
                      and d not in ("faults", "fixtures", "scripts", "__pycache__"))
for _folder in TEST_FOLDERS:
    sys.path.insert(1, os.path.join(TESTS, _folder))

# Keep every test offline and quiet; tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ACCELERATE_CONFIG = os.path.join(ROOT, "pretrain_bf16_accelerate_config.yaml")
FAULTS = os.path.join(ROOT, "tests", "faults")  # sitecustomize.py: SIGKILL at a chosen point of a child run


def with_faults(env=None):
    """env for a child process that loads tests/faults/sitecustomize.py (its FLUXKIT_TEST_* variables
    choose where the run dies; without them it changes nothing)."""
    env = dict(env or {})
    env["PYTHONPATH"] = FAULTS + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    from fluxkit.tiny.build import build_pipeline

    return build_pipeline(str(tmp_path_factory.mktemp("models") / "tiny_flux"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory):
    """The tiny FLUX.2 [klein] pipeline (Qwen3 text encoder), built once for every module that uses it."""
    from fluxkit.tiny.build import build_pipeline

    return build_pipeline(str(tmp_path_factory.mktemp("models") / "tiny_klein"), "tiny", family="flux2-klein")


@pytest.fixture(scope="session")
def tiny_flux2_dev(tmp_path_factory):
    """The tiny FLUX.2 [dev] pipeline (Mistral3 text encoder, PixtralProcessor tokenizer folder), built once."""
    from fluxkit.tiny.build import build_pipeline

    return build_pipeline(str(tmp_path_factory.mktemp("models") / "tiny_flux2_dev"), "tiny", family="flux2")


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    from fluxkit.tiny.build import build_datasets

    return build_datasets(str(tmp_path_factory.mktemp("data") / "sample"), seed=0, resolution=32)


# ------------------------------------------------------------------------------- cost marks
# Every test has one cost mark (pytest.ini): unit (no model, no subprocess), tiny (the tiny FLUX in this
# process), cli (one real command), multiproc (accelerate with 2+ processes). A test without one is
# tiny when it uses a fixture that builds the tiny FLUX, else unit; the old `slow` counts as cli.
# The fast loop is `python -m pytest -m "unit or tiny"`.
COST_MARKS = ("unit", "tiny", "cli", "multiproc")
# fixtures that build a tiny FLUX of some shape (test modules name theirs here)
TINY_FIXTURES = {"tiny_flux", "small_flux", "five_blocks", "tiny_klein", "tiny_flux2_dev", "devlike"}


def cost_of(item) -> str:
    given = [m.name for m in item.iter_markers() if m.name in COST_MARKS]
    if len(set(given)) > 1:
        raise pytest.UsageError(f"{item.nodeid} has the cost marks {sorted(set(given))}; give it one")
    if given:
        return given[0]
    if item.get_closest_marker("slow") is not None:
        return "cli"
    return "tiny" if TINY_FIXTURES & set(getattr(item, "fixturenames", ())) else "unit"


# A pytest session holds half a million objects or more (torch, diffusers, transformers, each test module), and
# a full garbage collection scans them all (0.3 s and more); the trainer collects after encoding in every
# in-process run (fluxkit.training.train.release_encoders), and Python itself collects fully every so often. After each
# test, what it dropped is collected and what lives on (modules, session and module fixtures) is frozen out of
# the collector's sight (gc.freeze), so later collections scan only what the running test made. (A frozen
# fixture released later is not reclaimed: tiny models, a few MB.) Measured: full collections 5.2 -> 2.4 s CPU
# in tests/train/test_train.py's in-process tests.
@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    import gc

    gc.collect()
    gc.freeze()


# The README's test command runs the suite on 2 pytest-xdist workers (`-n 2 --dist loadgroup`), which share out
# groups of tests: every multi-process test, and every test that reads a multi-process run made once per session
# (below), is in one group, "serial", that one worker runs in order (a session fixture is made once per worker; two
# 2-process launches never run at once: with them side by side a 2-process cache-fill test once stalled until its
# 180 s timeout, cause not found yet); the rest go one by one to either worker.
SERIAL_GROUP = "serial"
SHARED_RUNS = {"zero2_lora_run", "zero3_runs", "lora_demo", "deepspeed_run"}  # deepspeed_run: test_checkpoint_verify's copies


def xdist_group(item, cost):
    """The xdist group of a test (None: a group of its own)."""
    if cost == "multiproc" or SHARED_RUNS & set(getattr(item, "fixturenames", ())):
        return SERIAL_GROUP
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        cost = cost_of(item)
        item.stash[_COST] = cost
        if item.get_closest_marker(cost) is None:
            item.add_marker(cost)
        group = xdist_group(item, cost)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config):
    """xdist groups a test by the "@group" its hook appends to the test's id, which pytest 9.2 no longer lets it do
    (pytest-xdist#1386, open in xdist 3.8.0): the groups would be dropped without a word (each worker making the
    shared runs and a module's chains), so that pair refuses to run (requirements_test.txt pins pytest)."""
    from importlib.metadata import version

    release = lambda name: tuple(int(p) for p in version(name).split(".")[:3] if p.isdigit())  # noqa: E731
    if config.getoption("dist", "no") == "loadgroup" and release("pytest") >= (9, 2) and release("pytest-xdist") <= (3, 8, 0):
        raise pytest.UsageError(f"--dist loadgroup loses its test groups with pytest {version('pytest')} and pytest-xdist "
                                f"{version('pytest-xdist')} (pytest-xdist#1386): pip install -r requirements_test.txt")


_COST = pytest.StashKey[str]()
# what a unit or tiny test may not start: another interpreter (inductor's compile workers excepted)
_INTERPRETERS = ("python", "accelerate", "torchrun", "deepspeed")


@pytest.fixture(autouse=True)
def _in_process_only(request, monkeypatch):
    """A unit or tiny test that starts an interpreter or a launcher is mislabelled: it fails when a -m
    expression chose it (the fast loop would pay for it), and is reported otherwise."""
    cost = request.node.stash.get(_COST, None)
    if cost not in ("unit", "tiny"):
        yield
        return
    original = subprocess.Popen.__init__
    node, strict = request.node.nodeid, bool(request.config.option.markexpr)

    def guarded(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        first = os.path.basename(str(argv[0])) if argv else ""
        starts = str(argv[0]) == sys.executable or first.endswith(".sh") or first.startswith(_INTERPRETERS)
        if starts and not any("torch._inductor" in str(a) for a in argv):
            message = f"{node} is marked {cost} but starts {[str(a) for a in argv[:3]]}: mark it cli or multiproc"
            if strict:
                raise AssertionError(message)
            import warnings

            warnings.warn(message, pytest.PytestWarning, stacklevel=2)
        original(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


# ports for accelerate launches: each xdist worker (PYTEST_XDIST_WORKER gw0, gw1, ...) counts up in a range of its
# own, so two workers never hand out the same port before either launch binds it; the pid spreads sessions apart
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
_port = [20000 + 3000 * (_WORKER % 4) + (os.getpid() % 150) * 20]  # below the ephemeral range (32768-)


def private_mount_prefix(probe):
    """The unshare prefix that mounts a tmpfs privately here (makes the folder `probe` to try it), or
    None on hosts that forbid it: tests of a full or read-only disk mount one of their own."""
    import shutil

    if shutil.which("unshare") is None:
        return None
    probe.mkdir(exist_ok=True)
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        proc = subprocess.run(prefix + ["sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(probe)],
                              capture_output=True, timeout=60)
        if proc.returncode == 0:
            return prefix
    return None


def free_port() -> int:
    import socket

    while True:
        _port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", _port[0]))
            except OSError:
                continue
            return _port[0]


def run_script(args, timeout=300, env=None, cwd=ROOT, check=False):
    """Run a command, return CompletedProcess with text output; never hangs past timeout."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def accelerate_launch(script_args, num_processes=2, config=ACCELERATE_CONFIG, timeout=600, env=None, extra=()):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
           "--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(free_port()), *extra, *script_args]
    return run_script(cmd, timeout=timeout, env=env)


def assert_user_error(proc, *needles):
    """A user mistake: non-zero exit, one clear error line naming the culprit, no traceback."""
    assert proc.returncode != 0, f"expected failure, got 0:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    return errors[0]


def trainer_args(model, data, out, steps=4, **extra):
    """Trainer flags for the tiny model: 32x32, micro batch 1, seeded, no trackers; extra as flag=value
    (True for a bare flag; a later flag of the same name overrides an earlier one)."""
    args = ["--pretrained_model_name_or_path", model, "--instance_data_dir", data["instance_dir"],
            "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--output_dir", str(out), "--seed", "0", "--report_to", "none",
            "--lr_warmup_steps", "0"]
    for k, v in extra.items():
        args += [f"--{k}"] + ([] if v is True else [str(v)])
    return args


# ------------------------------------------------------------------------------- shared 2-process runs
# A 2-process DeepSpeed launch costs about 15 CPU-seconds before it trains a step (two interpreters, DeepSpeed's
# start): the uninterrupted runs several test files need are made once per session here. Read them, never change
# them (copy the folder first).
LORA_SCRIPT = os.path.join(ROOT, "train_flux_dreambooth_lora.py")
FULL_SCRIPT = os.path.join(ROOT, "train_flux_dreambooth.py")
SHARD_ALL = os.path.join(ROOT, "tests", "fixtures", "zero3_shard_everything.yaml")  # ZeRO-3, every parameter sharded


def zero2_lora_launch(model, data, out, env=None, **extra):
    """The shared ZeRO-2 LoRA run's launch: 2 processes, bf16, seeded, 4 steps of accumulation 2, checkpoint-2 and
    checkpoint-4; extra flags as trainer_args takes them, env for the child (tests/faults loaded)."""
    args = trainer_args(model, data, out, 4, mixed_precision="bf16", checkpointing_steps=2, gradient_accumulation_steps=2,
                        **extra)
    return accelerate_launch([LORA_SCRIPT] + args, num_processes=2, timeout=600, env=with_faults(env))


@pytest.fixture(scope="session")
def zero2_lora_run(tiny_flux, sample_data, tmp_path_factory):
    """(output folder, CompletedProcess) of one uninterrupted zero2_lora_launch: test_reliability's SIGKILL chain
    resumes to equal it, test_checkpoint_verify damages copies of its checkpoint-2."""
    out = tmp_path_factory.mktemp("zero2_lora") / "out"
    proc = zero2_lora_launch(model=tiny_flux, data=sample_data, out=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.fixture(scope="session")
def zero3_runs(tiny_flux, sample_data, tmp_path_factory):
    """script -> (output folder, CompletedProcess) of its 2-process ZeRO-3 run (every parameter sharded), made on
    first use: 2 steps of accumulation 2 at --learning_rate 1e-2, checkpoint-1 and checkpoint-2, a validation image
    at the end.
    test_zero3 compares each with ZeRO-2 and resumes from it; test_checkpoint_verify damages copies of the full
    fine-tune's checkpoint-2."""
    made = {}

    def run(script):
        if script not in made:
            out = tmp_path_factory.mktemp("zero3") / "out"
            args = trainer_args(tiny_flux, sample_data, out, 2, checkpointing_steps=1, learning_rate="1e-2",
                                gradient_accumulation_steps=2, validation_prompt="a photo of sks dog",
                                num_validation_images=1, num_validation_steps=2)
            proc = accelerate_launch([script] + args, num_processes=2, config=SHARD_ALL, timeout=420)
            assert proc.returncode == 0, proc.stderr[-4000:]
            made[script] = out, proc
        return made[script]

    return run


@pytest.fixture(scope="session")
def lora_demo(tmp_path_factory):
    """(CompletedProcess, output folder, demo cache) of the LoRA launcher's --demo as a user runs it (build the
    tiny FLUX into a fresh FLUXKIT_DEMO_DIR, 2-process training, images), once for the session: test_launch reads
    its console, test_launchers its outputs, and the full demo reuses its cache."""
    from test_launchers import LORA, launch

    root = tmp_path_factory.mktemp("demo")
    cache, out = root / "demo cache", root / "lora demo"
    return launch(LORA, "--demo", f"--output_dir={out}", env={"FLUXKIT_DEMO_DIR": str(cache)}, timeout=900), out, cache


def run_card_code(code: str, folder) -> dict:
    """Run a model card's Python code as its reader would, from the output folder it describes; its globals."""
    scope, cwd = {}, os.getcwd()
    os.chdir(folder)
    try:
        exec(code, scope)
    finally:
        os.chdir(cwd)
    return scope


def run_entry_inprocess(script, args):
    """An entry script's main() in this process (no interpreter start): its exit status."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(args)


LAUNCHER_KINDS = {"finetune_flux_dreambooth_deepspeed_bf16.sh": "full", "finetune_flux_dreambooth_lora_deepspeed_bf16.sh": "lora"}


def run_inprocess(command, env=None, cwd=ROOT, timeout=None):
    """`command` as run_script would run it, in this process: an entry script (`python SCRIPT.py ARGS`,
    run as __main__ with sys.argv set, so its error lines name it), `python -m fluxkit.X ARGS`, or a .sh
    launcher (its one line: `python -m fluxkit.launch --launcher KIND "$0" "$@"`, the toolkit first on
    PYTHONPATH). Saves the 3-5 s interpreter start and imports of a subprocess where a test asserts an
    argument list or an error line. stdout/stderr are what the command printed through sys.stdout/err;
    env values of None unset a variable; the environment, working folder and sys.argv are restored after. Returns a CompletedProcess."""
    import contextlib
    import io
    import runpy

    command = [str(c) for c in command]
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), list(sys.argv)
    for key, value in (env or {}).items():  # None: unset
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = _run_command(command, runpy)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv[:] = saved_argv
    return subprocess.CompletedProcess(command, rc, out.getvalue(), err.getvalue())


def _run_command(command, runpy) -> int:
    name = os.path.basename(command[0])
    if name in LAUNCHER_KINDS:
        from fluxkit import launch

        given = os.environ.get("PYTHONPATH")  # the caller's env (e.g. with_faults) holds it now
        os.environ["PYTHONPATH"] = ROOT + (os.pathsep + given if given else "")
        sys.argv[:] = [launch.__file__, *command]
        return launch.main(["--launcher", LAUNCHER_KINDS[name], *command])
    assert command[0] == sys.executable, f"not a command run_inprocess knows: {command}"
    try:
        if command[1] == "-m":
            sys.argv[:] = [command[2], *command[3:]]
            runpy.run_module(command[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv[:] = command[1:]
            runpy.run_path(command[1], run_name="__main__")
    except SystemExit as stop:
        code = stop.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0


def count_rows(monkeypatch, counts, cls, method, key):
    """Count in counts[key] the rows (the first argument's batch size) every call of cls.method sees;
    the real method still runs."""
    original = getattr(cls, method)

    def wrapper(self, x, *args, **kwargs):
        counts[key] += x.shape[0]
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapper)
