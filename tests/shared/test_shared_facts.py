"""Small ideas with one home each (issue 19): the yes/no truth table every reader shares, the ZeRO
stage read from the environment, an accelerate config or an Accelerator, the device-module
dispatch, and the versions + commit record that run_config.json and bench results share."""

import argparse
import json
import os
from types import SimpleNamespace

import pytest

from conftest import ROOT
from fluxkit.shared.device import device_module, empty_cache, synchronize, total_memory_bytes, zero_stage
from fluxkit.shared.environment import env_flag, git_state, parse_bool, versions
from fluxkit.shared.errors import UserError

YES = ["1", "true", "True", "YES", "y", "on", "On", " true "]
NO = ["0", "false", "FALSE", "no", "n", "off", "Off"]
NEITHER = ["maybe", "2", "tru", ""]


def test_one_truth_table():
    assert all(parse_bool(v) is True for v in YES + [True])
    assert all(parse_bool(v) is False for v in NO + [False])
    assert all(parse_bool(v) is None for v in NEITHER)


@pytest.mark.parametrize("value", YES + NO + ["maybe"])
def test_every_reader_agrees_with_it(value, monkeypatch, tmp_path):
    """The trainer's true/false flags, a launcher switch on the command line and in a --config file,
    and an environment flag read the same word the same way (and refuse the same word)."""
    from fluxkit.launch.keys import _switch_value, read_config
    from fluxkit.training.optim import _bool
    from fluxkit.training.train_args import trainer_flags

    expected = parse_bool(value)
    monkeypatch.setenv("FLUXKIT_SOME_FLAG", value)
    config = tmp_path / "c.toml"
    config.write_text(f'gradient_checkpointing = "{value}"\n')
    flags = trainer_flags(lora=True)
    readers = [lambda: _bool(value), lambda: _switch_value("gradient_checkpointing", value),
               lambda: env_flag("FLUXKIT_SOME_FLAG"),
               lambda: read_config(str(config), {"gradient_checkpointing"}, flags)["gradient_checkpointing"]]
    for read in readers:
        if expected is None:
            with pytest.raises((UserError, argparse.ArgumentTypeError)):
                read()
        else:
            assert read() is expected


def _accelerator(stage=None):
    if stage is None:
        return SimpleNamespace(distributed_type="DistributedType.MULTI_CPU", state=SimpleNamespace(deepspeed_plugin=None))
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
    return SimpleNamespace(distributed_type="DistributedType.DEEPSPEED", state=SimpleNamespace(deepspeed_plugin=plugin))


def test_zero_stage_from_each_source(monkeypatch, tmp_path):
    from fluxkit.launch.checks import check_accelerate_config

    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert zero_stage() is None  # a plain process: no DeepSpeed
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert zero_stage() == 2
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    assert zero_stage() == 3
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert zero_stage() is None

    for name, stage in (("pretrain_bf16_accelerate_config.yaml", 2), ("pretrain_bf16_zero3_accelerate_config.yaml", 3)):
        assert zero_stage(check_accelerate_config(os.path.join(ROOT, name), 1, 1)) == stage
    assert zero_stage({"distributed_type": "MULTI_GPU"}) is None
    assert zero_stage({"distributed_type": "DEEPSPEED", "deepspeed_config_file_contents": {"zero_optimization": {"stage": 1}}}) == 1

    assert zero_stage(_accelerator(3)) == 3 and zero_stage(_accelerator(0)) == 0 and zero_stage(_accelerator()) is None


def test_device_module_dispatch_on_this_host():
    import torch

    assert device_module("cpu") is None and device_module(torch.device("cpu")) is None
    assert device_module("cuda") is torch.cuda and device_module("cuda:1") is torch.cuda
    assert device_module(SimpleNamespace(type="cuda")) is torch.cuda
    synchronize("cpu")  # nothing to wait for, nothing to free, no memory to report
    empty_cache("cpu")
    assert total_memory_bytes("cpu") is None


def test_run_record_and_bench_share_versions_and_commit():
    import bench.harness as harness
    from fluxkit.launch.record import toolkit_commit
    from fluxkit.shared.device import detect

    found = versions()
    assert found["python"] and found["torch"] and "diffusers" in found
    state = git_state(ROOT)
    result = harness.new_result([], {}, detect("cpu"))
    assert result["versions"] == found
    if state is not None:
        assert result["git"] == state
        assert toolkit_commit(ROOT) == state["commit"] + ("-dirty" if state["dirty"] else "")


def test_launcher_and_trainer_share_the_host_checks(tmp_path, capsys, monkeypatch):
    """fluxkit.training.preflight.check_host runs in the launcher before any process starts and in the
    trainer first thing: the same refusal, in the same words, from both."""
    from conftest import run_entry_inprocess

    from fluxkit.launch import main as launch

    monkeypatch.chdir(tmp_path)
    trainer = run_entry_inprocess(os.path.join(ROOT, "train_flux_dreambooth_lora.py"), [
        "--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p",
        "--device", "cpu", "--enable_npu_flash_attention"])
    said_by_trainer = capsys.readouterr().err.strip().split(": error: ", 1)[1]
    launcher = launch(["--launcher", "lora", "launcher.sh", "--device=cpu", "--enable_npu_flash_attention"])
    said_by_launcher = capsys.readouterr().err.strip().split(": error: ", 1)[1]
    assert trainer == launcher == 2
    assert said_by_trainer == said_by_launcher and "--enable_npu_flash_attention needs an Ascend NPU" in said_by_trainer
    assert not os.listdir(tmp_path)


@pytest.mark.unit
@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_agreed_stop_is_said_once_by_the_first_process(rank, monkeypatch, capsys):
    """Every process raises the agreed stop at the same step; only RANK 0 prints it (two processes
    printing the same resume line raced in CI). A process's own error is still said by it."""
    from fluxkit.shared.errors import cli
    from fluxkit.training.runcontrol import Interrupted

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.delenv("FLUXKIT_EXIT_STATUS_FILE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)  # alone: no agent to wait for
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)  # as after the processes connected

    def stopped():
        raise Interrupted("stopped by SIGINT at step 3")

    def own():
        raise UserError("cannot read this rank's file")

    assert cli(stopped)() == 2
    assert ("stopped by SIGINT at step 3" in capsys.readouterr().err) == (rank == "0")
    assert cli(own)() == 2
    assert "cannot read this rank's file" in capsys.readouterr().err
