"""The memory plan (fluxkit.plan): architecture from configs, parameter counts that match the
real libraries, activation constants that match autograd, the fit check, and plan vs the
trainers' measured peak on CPU (bench's memory suite covers the whole grid)."""

import json
import os
import sys

import pytest

from conftest import ROOT, run_inprocess, run_script

from fluxkit.shared.errors import UserError
from fluxkit.plan import (ACTIVATION_CONSTANTS, GiB, check_fits, lora_parameter_count, measure_activation_constants,
                          plan_memory, read_architecture)
from fluxkit.training.train_args import parse


def _args(model, data, *extra, lora=False):
    return parse(["--pretrained_model_name_or_path", model, "--instance_data_dir", data["instance_dir"],
                       "--instance_prompt", "a photo of sks dog", *extra], lora=lora)


def test_dev_architecture_needs_no_weights():
    arch = read_architecture("black-forest-labs/FLUX.1-dev")
    assert arch.params["transformer"] == 11_901_408_320
    assert arch.params["text_encoder_2"] == 4_762_310_656
    assert arch.hidden == 3072 and arch.vae_scale == 8


def test_lora_count_matches_peft(tiny_flux):
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from fluxkit.families.flux1 import FAMILY as FLUX1

    arch = read_architecture(tiny_flux)
    t = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    t.add_adapter(LoraConfig(r=3, lora_alpha=3, target_modules=list(FLUX1.lora_targets)))
    real = sum(p.numel() for n, p in t.named_parameters() if "lora" in n)
    assert lora_parameter_count(arch.linear_shapes, list(FLUX1.lora_targets), 3) == real
    assert sum(p.numel() for n, p in t.named_parameters() if "lora" not in n) == arch.params["transformer"]
    del torch


@pytest.mark.parametrize("key", [("deepspeed", "full", False), ("autocast", "lora", False), ("autocast", "lora", True)])
def test_activation_constants_match_autograd(key):
    """The table's constants are what autograd saves, measured again at another width."""
    measured = measure_activation_constants(*key, heads=2, head_dim=64)
    for table, got in zip(ACTIVATION_CONSTANTS[key], measured):
        assert abs(got - table) <= 0.06 * table + 0.3, (key, ACTIVATION_CONSTANTS[key], measured)


def test_plan_terms_follow_the_flags(tiny_flux, sample_data):
    one = ("--resolution", "256", "--train_batch_size", "1", "--max_sequence_length", "77")
    base = plan_memory(_args(tiny_flux, sample_data, *one, lora=True), device="cuda")
    by = lambda p, name: sum(i.bytes for i in p.items if i.name.startswith(name))  # noqa: E731
    # activations scale with batch; checkpointing keeps a small share
    four = plan_memory(_args(tiny_flux, sample_data, *one, "--train_batch_size", "4", lora=True), device="cuda")
    assert by(four, "saved") == pytest.approx(4 * by(base, "saved"), rel=1e-6)
    ckpt = plan_memory(_args(tiny_flux, sample_data, *one, "--gradient_checkpointing", lora=True), device="cuda")
    assert by(ckpt, "saved") < 0.2 * by(base, "saved")
    # a longer T5 sequence costs activations too
    long = plan_memory(_args(tiny_flux, sample_data, *one, "--max_sequence_length", "512", lora=True), device="cuda")
    double, single, _ = ACTIVATION_CONSTANTS[("fp32", "lora", False)]  # no --mixed_precision: fp32
    arch = read_architecture(tiny_flux)
    extra = (512 - 77) * arch.hidden * (arch.transformer["num_layers"] * double + arch.transformer["num_single_layers"] * single)
    assert by(long, "saved") - by(base, "saved") == pytest.approx(extra, abs=2)
    # ZeRO-2 over 4 processes splits the optimizer states of a full fine-tune by 4
    full = plan_memory(_args(tiny_flux, sample_data, "--mixed_precision", "bf16"), 1, 0, "cuda")
    zero = plan_memory(_args(tiny_flux, sample_data, "--mixed_precision", "bf16"), 4, 2, "cuda")
    assert by(zero, "AdamW") * 4 == pytest.approx(by(full, "AdamW"), abs=8)



def test_optimizer_states_and_zero_step_gradients_per_trained_parameter():
    """Without weights (FLUX.1-dev's architecture from its configs): AdamW keeps 8 bytes per trained
    parameter, 8-bit AdamW 2, and under ZeRO-2 the optimizer step's gradients (compute-dtype and fp32
    partitions) and the optimizer states are divided by the process count."""
    dev, no_data = "black-forest-labs/FLUX.1-dev", {"instance_dir": "/nonexistent"}
    by = lambda p, group: sum(i.bytes for i in p.items if i.group == group)  # noqa: E731
    for extra, per_param in (((), 8), (("--use_8bit_adam",), 2)):
        plan = plan_memory(_args(dev, no_data, *extra, lora=True), device="cuda")
        assert by(plan, "optimizer") == per_param * plan.summary["trained_params"], extra
    bf16 = ("--mixed_precision", "bf16")
    one = plan_memory(_args(dev, no_data, *bf16), 1, 2, "cuda")
    four = plan_memory(_args(dev, no_data, *bf16), 4, 2, "cuda")
    trained = one.summary["trained_params"]
    assert by(four, "optimizer") == 8 * trained // 4
    # the step holds this process's bf16 and fp32 gradient partitions, plus foreach AdamW's fp32 temporary
    step = lambda p: sum(i.bytes for i in p.phase("train: optimizer step").items  # noqa: E731
                         if i.group in ("gradients", "transient"))
    assert step(one) == trained * (2 + 4 + 4)
    assert step(four) == trained * 2 // 4 + trained * 4 // 4 + trained * 4 // 4


def test_quantized_base_shrinks_the_frozen_transformer():
    from fluxkit.plan import parse

    def plan(quant):
        return parse(["--pretrained_model_name_or_path", "black-forest-labs/FLUX.1-dev", "--lora", "--rank", "16",
                      "--mixed_precision", "bf16", "--base_quantization", quant]).plan("cuda")

    base = {q: next(i.bytes for i in plan(q).items if i.name.startswith("transformer base")) for q in ("none", "int8", "nf4")}
    assert base["none"] / GiB == pytest.approx(22.2, abs=0.1)
    assert base["int8"] / GiB == pytest.approx(11.1, abs=0.2)
    assert base["nf4"] / GiB == pytest.approx(6.2, abs=0.2)


@pytest.mark.cli
def test_cli_table_json_and_fit_line(tmp_path, tiny_flux):
    out = tmp_path / "plan.json"
    proc = run_script([sys.executable, "-m", "fluxkit.plan", "--pretrained_model_name_or_path", "black-forest-labs/FLUX.1-dev",
                       "--lora", "--rank", "16", "--resolution", "512", "--train_batch_size", "1", "--gradient_checkpointing",
                       "--mixed_precision", "bf16", "--base_quantization", "nf4", "--device_memory_gb", "24",
                       "--json", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("memory plan: ") and "fits in 24.0 GiB" in last
    plan = json.loads(out.read_text())
    assert plan["fits"] is True
    # every phase is the sum of what it lists; the peak is the largest phase, not a sum of phases
    for phase in plan["phases"]:
        assert phase["bytes"] == sum(i["bytes"] for i in phase["items"])
    assert plan["peak_bytes"] == max(p["bytes"] for p in plan["phases"])
    assert [p["name"] for p in plan["phases"]] == ["encode", "load", "train: forward + backward", "train: optimizer step", "save"]
    # the same run unquantized does not fit on a 24 GB card: one line says so, exit status 1
    proc = run_inprocess([sys.executable, "-m", "fluxkit.plan", "--pretrained_model_name_or_path", "black-forest-labs/FLUX.1-dev",
                       "--lora", "--rank", "16", "--resolution", "512", "--train_batch_size", "1", "--gradient_checkpointing",
                       "--mixed_precision", "bf16", "--device_memory_gb", "24"])
    assert proc.returncode == 1
    assert [line for line in proc.stdout.splitlines() if "does NOT fit in 24.0 GiB" in line]


def test_check_fits_refuses_in_one_line(tiny_flux, sample_data):
    from fluxkit.shared.device import DeviceInfo

    gpu = DeviceInfo(type="cuda", count=1, backend="nccl")
    tight = _args(tiny_flux, sample_data, "--resolution", "256", "--device_memory_gb", "0.001")
    with pytest.raises(UserError, match=r"does NOT fit in 0\.0 GiB.*to fit: lower --train_batch_size.*--ignore_memory_plan"):
        check_fits(tight, 1, 0, gpu)
    ignored = _args(tiny_flux, sample_data, "--resolution", "256", "--device_memory_gb", "0.001", "--ignore_memory_plan")
    plan, line = check_fits(ignored, 1, 0, gpu)
    assert plan.fits is False and line.endswith("going on anyway (--ignore_memory_plan)")
    plan, line = check_fits(_args(tiny_flux, sample_data, "--resolution", "256", "--device_memory_gb", "80"), 1, 0, gpu)
    assert plan.fits is True and line == plan.one_line() and "fits in 80.0 GiB" in line


def test_an_unplannable_run_is_never_stopped(tiny_flux, sample_data, tmp_path):
    """The plan is advice: a config it cannot read, or a hub id without local files, gives a line saying
    so, never an error (even with a device too small for anything)."""
    import shutil

    from fluxkit.shared.device import DeviceInfo

    broken = tmp_path / "broken"
    shutil.copytree(tiny_flux, broken)
    (broken / "text_encoder_2" / "config.json").write_text("{not json")
    gpu = DeviceInfo(type="cuda", count=1, backend="nccl")
    for model in (str(broken), "some-org/not-here"):
        args = _args(model, sample_data, "--device_memory_gb", "0.001")
        plan, line = check_fits(args, 1, 0, gpu)
        assert plan is None and line.startswith("memory plan: unavailable (UserError: "), line


def test_architecture_memo_is_used_and_survives_damage(tiny_flux, tmp_path, monkeypatch):
    """read_architecture keeps its counts in a memo file; a damaged memo is counted again, never trusted."""
    monkeypatch.setenv("FLUXKIT_PLAN_MEMO", str(tmp_path / "memo"))
    first = read_architecture(tiny_flux)
    (memo,) = (tmp_path / "memo").iterdir()
    assert read_architecture(tiny_flux) == first
    memo.write_text("{damaged")
    assert read_architecture(tiny_flux) == first
    monkeypatch.setenv("FLUXKIT_PLAN_MEMO", "off")
    assert read_architecture(tiny_flux) == first


def test_refusals(tiny_flux):
    proc = run_inprocess([sys.executable, "-m", "fluxkit.plan", "--pretrained_model_name_or_path", tiny_flux,
                       "--base_quantization", "nf4"])
    assert proc.returncode == 2 and "error: --base_quantization nf4 quantizes the frozen base of a LoRA run" in proc.stderr
    proc = run_inprocess([sys.executable, "-m", "fluxkit.plan", "--pretrained_model_name_or_path", "no/such-model"])
    assert proc.returncode == 2 and "--architecture dev" in proc.stderr
    proc = run_inprocess([sys.executable, "-m", "fluxkit.plan", "--pretrained_model_name_or_path", tiny_flux,
                       "--device_memory_gb", "0"])
    assert proc.returncode == 2 and "error: --device_memory_gb 0.0 must be positive" in proc.stderr
    assert "Traceback" not in proc.stderr



def test_plan_command_reads_the_trainer_flags_through_the_trainers_parse():
    """python -m fluxkit.plan: the trainer's flags are train_args.parse's TrainConfig (the trainer's checks
    and its defaults, full or LoRA), the plan's own flags read apart; the data is never required."""
    from conftest import assert_user_error

    from fluxkit.plan import parse as parse_plan
    from fluxkit.training.train_args import TrainConfig

    dev = ["--pretrained_model_name_or_path", "black-forest-labs/FLUX.1-dev", "--resolution", "256"]
    req = parse_plan(dev + ["--lora", "--rank", "8", "--num_processes", "2", "--warm_cache"])
    assert req.config == parse(dev + ["--rank", "8"], lora=True, need_data=False)
    assert isinstance(req.config, TrainConfig) and (req.num_processes, req.zero, req.warm_cache) == (2, 2, True)
    full = parse_plan(dev + ["--zero_offload"])
    assert full.config.lora is False and full.config.max_sequence_length == 77 and full.zero == 3  # the full trainer's T5 default
    plan = [sys.executable, "-m", "fluxkit.plan"] + dev
    for extra, needle in [(["--with_prior_preservation"], "--with_prior_preservation needs --class_prompt"),
                          (["--lora", "--lora_dropout", "1.5"], "--lora_dropout 1.5 must be in [0, 1)"),
                          (["--rank", "8"], "--rank is a flag of the LoRA trainer; add --lora"),
                          (["--num_procesess", "2"], "did you mean --num_processes?")]:
        proc = run_inprocess(plan + extra)
        assert proc.returncode == 2 and not proc.stdout, proc.stdout
        assert_user_error(proc, needle)

# --------------------------------------------------------------- plan vs measured (CPU)

@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """family -> (small preset folder, its data, extra trainer flags), each built on first use: FLUX.1's
    small preset (Kontext trains on it with the sample editing pairs), FLUX.2 [klein]'s and [dev]'s."""
    from fluxkit.tiny.build import build_datasets, build_pipeline

    root, built = tmp_path_factory.mktemp("small"), {}

    def get(family):
        if "data" not in built:
            built["data"] = build_datasets(str(root / "data"), seed=0, resolution=256)
        data = built["data"]
        kind = family if family.startswith("flux2") else "flux1"
        if kind not in built:
            built[kind] = build_pipeline(str(root / kind), "small", seed=0, family=kind)
        if family == "kontext":
            return built[kind], data["edit_targets"], ["--model_family", "kontext", "--cond_image_dir", data["edit_references"],
                                                       "--max_sequence_length", "77"]
        return built[kind], data["instance_dir"], (["--max_sequence_length", "64"] if kind != "flux1" else [])

    return get


@pytest.mark.cli
@pytest.mark.parametrize("family,mode,resolution,batch,checkpointing", [
    ("flux1", "full", 256, 1, False), ("flux1", "lora", 256, 4, True),
    ("kontext", "lora", 512, 1, False),  # the reference's 1024 tokens beside the target's: half the activations
    ("flux2-klein", "lora", 256, 4, False),  # FLUX.2's CPU runtime constant was measured on klein at batch 1
    ("flux2", "lora", 256, 4, False)])
def test_plan_within_15_percent_of_measured(tmp_path, small_models, family, mode, resolution, batch, checkpointing):
    sys.path.insert(0, ROOT)
    from bench.suites import memory

    model, instance, extra = small_models(family)
    flags = memory.trainer_flags(model, instance, str(tmp_path / "out"), mode, resolution, batch, checkpointing) + extra
    prefix = str(tmp_path / "probe")
    proc = run_script([sys.executable, "-m", "bench.memprobe", prefix, memory.SCRIPTS[mode], *flags],
                      env={**memory.PROBE_ENV, "OMP_NUM_THREADS": "2"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(prefix + ".rank0.json") as f:
        probe = json.load(f)
    measured = probe["loop_peak_bytes"] - probe["baseline_bytes"]
    planned = memory.planned_bytes(flags, mode, 1)
    print(f"{family} {mode} b{batch}: planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(planned / measured - 1) <= memory.TOLERANCE, (planned / 2**20, measured / 2**20)
    assert os.path.isdir(tmp_path / "out")


def test_trainer_logs_the_plan_before_loading(tmp_path, tiny_flux, sample_data, caplog):
    import logging

    from conftest import ROOT, run_entry_inprocess, trainer_args

    caplog.set_level(logging.INFO)
    rc = run_entry_inprocess(os.path.join(ROOT, "train_flux_dreambooth_lora.py"),
                             trainer_args(tiny_flux, sample_data, tmp_path / "out", steps=1))
    assert rc == 0
    messages = [r.getMessage() for r in caplog.records]
    lines = [m for m in messages if "memory plan: " in m]
    assert len(lines) == 1 and "GiB peak per device (LoRA 32px batch 1 on 1 process(es), no DeepSpeed)" in lines[0], lines
    # logged before the models load (the run's first model-loading message comes after it)
    assert messages.index(lines[0]) < next(i for i, m in enumerate(messages) if m.startswith("run: ") or " run: " in m)


def test_encoders_are_on_the_device_only_while_they_encode(tiny_flux, sample_data):
    """With a cache the encoders hold the device in the encode phase only; without one they stay for
    the whole run, unless --offload_encoders keeps them in host memory between visits."""
    def plan(*flags):
        return plan_memory(_args(tiny_flux, sample_data, "--resolution", "256", *flags, lora=True), device="cuda")

    names = lambda phase: {i.name for i in phase.items}  # noqa: E731
    cached = plan()
    assert "T5 text encoder (frozen)" in names(cached.phase("encode"))
    assert all("T5 text encoder (frozen)" not in names(p) for p in cached.phases if p.name != "encode")
    uncached = plan("--no_cache")
    assert [p.name for p in uncached.phases][0] == "load"
    assert "T5 text encoder (frozen)" in names(uncached.phase("train: optimizer step"))
    away = plan("--no_cache", "--offload_encoders")
    assert "T5 text encoder (frozen)" not in names(away.phase("train: optimizer step"))
    assert "offloaded encoders visiting" in names(away.phase("train: forward + backward"))


def test_a_klein_folder_is_planned_as_klein(tiny_klein, sample_data):
    """A FLUX.2 [klein] folder's plan reads its own components (Qwen3, the FLUX.2 transformer), the same
    counts as the preset it was built from, and the run's pre-flight gives a plan, not 'unavailable'."""
    from fluxkit.shared.device import DeviceInfo

    folder = read_architecture(tiny_klein)
    assert folder.family == "flux2-klein" and [t["label"] for t in folder.text_encoders] == ["Qwen3"]
    assert folder.params == read_architecture("", architecture="tiny", family="flux2-klein").params
    plan, line = check_fits(_args(tiny_klein, sample_data, "--resolution", "32", lora=True), 1, 0,
                            DeviceInfo(type="cuda", count=1, backend="nccl"))
    assert plan is not None and line.startswith("memory plan: ") and "unavailable" not in line, line
    assert "Qwen3 text encoder (frozen)" in {i.name for i in plan.phase("encode").items}
