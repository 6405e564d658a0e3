import json
import os
import sys
import types

import pytest
import torch

from conftest import ROOT, accelerate_launch


@pytest.fixture
def fake_npu(monkeypatch, tmp_path):
    """A stand-in torch_npu on sys.path: enough to exercise our own npu dispatch."""
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import torch, types\n"
        "torch.npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 8)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("torch_npu", None)
    if hasattr(torch, "npu"):
        monkeypatch.delattr(torch, "npu", raising=False)


def test_cpu_host_picks_cpu_and_gloo():
    from fluxkit.shared.device import detect

    info = detect()
    assert (info.type, info.backend, info.count) == ("cpu", "gloo", 1)
    assert info.supports("bf16") and info.supports("no") and not info.supports("fp16")


def test_npu_preferred_when_torch_npu_present(fake_npu):
    from fluxkit.shared.device import detect

    info = detect()
    assert (info.type, info.backend, info.count) == ("npu", "hccl", 8)
    assert detect("cpu").type == "cpu"


def test_cuda_preferred_over_cpu(monkeypatch):
    from fluxkit.shared import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    info = device.detect()
    assert (info.type, info.backend, info.count) == ("cuda", "nccl", 4)


@pytest.mark.parametrize("choice, needle", [("npu", "torch_npu"), ("cuda", "CUDA"), ("tpu", "not one of")])
def test_unavailable_device_is_a_clear_error(choice, needle):
    from fluxkit.shared.device import detect
    from fluxkit.shared.errors import UserError

    with pytest.raises(UserError, match=needle):
        detect(choice)


def test_mixed_precision_check():
    from fluxkit.shared.device import DeviceInfo, check_mixed_precision
    from fluxkit.shared.errors import UserError

    cpu = DeviceInfo("cpu", 1, "gloo")
    check_mixed_precision(cpu, "bf16")
    with pytest.raises(UserError, match="fp16"):
        check_mixed_precision(cpu, "fp16")


@pytest.mark.multiproc
def test_deepspeed_zero2_bf16_two_cpu_processes(tmp_path):
    """... and builds no DeepSpeed op on the way: its shm comm op (a minute of C++ on a user's clock,
    used only by inference_all_reduce) is skipped on CPU hosts. The empty extensions folder would
    hold the build."""
    extensions = tmp_path / "torch_extensions"
    proc = accelerate_launch([os.path.join(ROOT, "tests", "scripts", "ds_step.py")], num_processes=2, timeout=300,
                             env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "built successfully" not in proc.stdout + proc.stderr and not extensions.exists(), proc.stdout[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_processes"] == 2
    assert result["distributed_type"].endswith("DEEPSPEED") and result["mixed_precision"] == "bf16"
    assert result["last_loss"] < 0.7 * result["first_loss"]


def test_host_runtime_defaults_leave_what_the_user_set(monkeypatch, tmp_path):
    from fluxkit.shared import host_runtime

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    defaults = host_runtime.env_defaults()
    assert defaults["OMP_WAIT_POLICY"] == "PASSIVE"
    # one extensions folder per Python environment: another sys.prefix gets another folder
    assert defaults["TORCH_EXTENSIONS_DIR"].startswith(str(tmp_path / "torch_extensions" / "env-"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    assert host_runtime.env_defaults()["TORCH_EXTENSIONS_DIR"] != defaults["TORCH_EXTENSIONS_DIR"]
    assert host_runtime.env_defaults({"OMP_WAIT_POLICY": "ACTIVE", "TORCH_EXTENSIONS_DIR": "/mine"}) == {}
    # a spin count of the user's own is a choice of wait too: neither variable is touched
    assert host_runtime.env_defaults({"GOMP_SPINCOUNT": "0", "TORCH_EXTENSIONS_DIR": "/mine"}) == {}
    assert host_runtime.runtime_env({"OMP_WAIT_POLICY": "ACTIVE", "TORCH_EXTENSIONS_DIR": "/mine"}) == {
        "OMP_WAIT_POLICY": "ACTIVE", "TORCH_EXTENSIONS_DIR": "/mine"}


def test_openmp_threads_spin_briefly_on_a_quiet_host_and_sleep_at_once_on_a_busy_one():
    """docs/performance.md: on a quiet 2-core host a short spin before sleeping made a LoRA step 1.4x
    faster than sleeping at once; on a busy one any spin cost 1.3-2.6x (libgomp's default spin 10x)."""
    from fluxkit.shared.host_runtime import host_busy, openmp_wait

    assert openmp_wait({}, load=0.3, cpus=2) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}
    assert openmp_wait({}, load=1.5, cpus=2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_wait({}, load=1.5, cpus=8) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}
    assert not host_busy(1.0, 2) and host_busy(1.01, 2)
    assert openmp_wait({"OMP_WAIT_POLICY": "ACTIVE"}, load=0.0, cpus=2) == {}


def test_a_trainer_collects_no_garbage_while_it_imports_and_again_once_its_run_starts(monkeypatch):
    """The trainers pause the garbage collector for their imports (Python's full collections rescan the half
    million objects as they grow) and the run turns it back on as it starts; in a process that was not started
    for the trainer (this test runner) nothing is paused."""
    import gc

    from fluxkit.shared import host_runtime
    from fluxkit.training import startup

    host_runtime.pause_collection_while_importing("train_flux_dreambooth_lora.py")
    assert gc.isenabled()  # pytest, not the trainer
    monkeypatch.setattr(host_runtime, "_started_as", lambda entry: True)
    try:
        host_runtime.pause_collection_while_importing("train_flux_dreambooth_lora.py")
        assert not gc.isenabled()
        startup.begin()
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.enable()


def test_fast_exit_only_for_the_script_the_interpreter_was_started_with(monkeypatch, tmp_path):
    """Entry scripts skip the interpreter's teardown (seconds after a run's last line) only when the
    interpreter was started to run them: inside a test runner or a wrapper they exit as usual."""
    from fluxkit.shared import host_runtime

    script = tmp_path / "train.py"
    script.write_text("")
    for argv, expected in ((["python", str(script), "--x"], True), (["python", "-u", "-X", "importtime", str(script)], True),
                           (["python", "-m", "pytest", str(script)], False), (["python", "-c", "pass"], False),
                           (["python", str(tmp_path / "other.py")], False)):
        monkeypatch.setattr(sys, "orig_argv", argv)
        assert host_runtime._started_as(str(script)) is expected, argv
    for argv, expected in ((["python", "-m", "fluxkit.launch", "--launcher", "lora"], True), (["python", "-m", "pytest"], False),
                           (["python", str(script)], False)):  # the launchers: python -m fluxkit.launch
        monkeypatch.setattr(sys, "orig_argv", argv)
        assert host_runtime._started_as("fluxkit.launch") is expected, argv
    # optional libraries are left out only of a process started for the toolkit's own scripts or launchers
    for argv, expected in ((["python", os.path.join(ROOT, "train_flux_dreambooth_lora.py")], True),
                           (["python", "-u", "-m", "fluxkit.launch", "--launcher", "lora"], True),
                           (["python", "-m", "pytest"], False), (["python", str(script)], False), (["python", "-c", "1"], False)):
        monkeypatch.setattr(sys, "orig_argv", argv)
        assert host_runtime._started_for_the_toolkit() is expected, argv
    assert host_runtime.leave_out(["bitsandbytes"]) == ()  # -c: nothing is left out
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "pytest"])
    with pytest.raises(SystemExit) as stopped:  # not the started script: a plain exit, this process lives on
        host_runtime.exit_without_teardown(3, str(script))
    assert stopped.value.code == 3


def test_one_set_of_progress_bars_per_machine(monkeypatch):
    """transformers' "Loading weights" bars and diffusers' bars are drawn by a machine's first process
    only: the others would draw the same bars again."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    from fluxkit.shared import quiet

    try:
        monkeypatch.setenv("LOCAL_RANK", "0")
        quiet.install(verbose=False)
        assert tlog.is_progress_bar_enabled() and dlog.is_progress_bar_enabled()
        monkeypatch.setenv("LOCAL_RANK", "1")
        quiet.install(verbose=False)
        assert not tlog.is_progress_bar_enabled() and not dlog.is_progress_bar_enabled()
    finally:
        tlog.enable_progress_bar()
        dlog.enable_progress_bar()


@pytest.mark.cli
def test_a_fast_exit_stops_thread_pools_left_running(tmp_path):
    """An entry script's exit skips the interpreter's teardown but not its order: threading's exit calls
    (which stop the workers of a thread pool nobody shut down, as a library loading weights may leave)
    come before the wait for non-daemon threads; joined first, the run hung after its last line."""
    import subprocess

    script = tmp_path / "entry.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from fluxkit.shared.host_runtime import exit_without_teardown\n"
        "pool = ThreadPoolExecutor(2)\n"
        "pool.submit(print, 'work done', flush=True).result()\n"
        "exit_without_teardown(4, __file__)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (4, "work done\n"), proc.stderr[-2000:]
