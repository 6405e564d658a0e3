"""The trainers on the tiny FLUX: outputs, checkpoints, resume, LoRA format, caching, bad input."""

import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, accelerate_launch, assert_user_error, run_entry_inprocess as train_inprocess, run_script
from conftest import trainer_args as base_args

FULL = os.path.join(ROOT, "train_flux_dreambooth.py")
LORA = os.path.join(ROOT, "train_flux_dreambooth_lora.py")


def losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "train_log.jsonl"))]


def generate(pipe, seed=0):
    return pipe("a photo of sks dog", height=32, width=32, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


# ----------------------------------------------------------------------------- full fine-tune

def test_full_run_checkpoints_resume_and_limit(tiny_flux, sample_data, tmp_path, capsys):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    out = tmp_path / "full"
    assert train_inprocess(FULL, base_args(tiny_flux, sample_data, out, steps=4, checkpointing_steps=2)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["global_step"] == 4 and summary["run_type"] == "full" and summary["images_per_sec"] > 0
    # the printed line stays short; the per-step times (after 2 warm-up steps) are in the file
    saved = json.loads((out / "train_summary.json").read_text())
    assert "step_seconds" not in summary and len(saved["step_seconds"]) == 2
    # where start-up went (python -m bench startup reads it), phase by phase, from this process's start
    assert list(saved["startup_seconds"]) == ["imports", "plan", "scan", "accelerate", "model load", "cache", "prepare",
                                              "first step", "train", "save"]
    assert all(v >= 0 for v in saved["startup_seconds"].values()) and saved["process_started_at"] < time.time()
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    pipe = FluxPipeline.from_pretrained(str(out), local_files_only=True)
    base = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    tuned_img, base_img = generate(pipe), generate(base)
    assert np.isfinite(tuned_img).all() and not np.allclose(tuned_img, base_img)

    # the intermediate transformer loads on its own and inside a pipeline
    mid = FluxTransformer2DModel.from_pretrained(str(out / "checkpoint-2" / "transformer"))
    assert np.isfinite(generate(FluxPipeline.from_pretrained(tiny_flux, transformer=mid, local_files_only=True))).all()

    # resume from checkpoint-4 to 6 steps adds checkpoint-6; the limit keeps the newest two
    args = base_args(tiny_flux, sample_data, out, steps=6, checkpointing_steps=2, checkpoints_total_limit=2,
                     resume_from_checkpoint=str(out / "checkpoint-4"))
    assert train_inprocess(FULL, args) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 6
    assert [json.loads(l)["step"] for l in open(out / "train_log.jsonl")] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- LoRA

def lora_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), f.metadata()


def test_lora_output_format_and_loads_into_pipeline(tiny_flux, sample_data, tmp_path):
    from diffusers import FluxPipeline

    out = tmp_path / "lora"
    args = base_args(tiny_flux, sample_data, out, steps=3, rank=4, lora_alpha=8, learning_rate=1e-2)
    assert train_inprocess(LORA, args) == 0
    keys, meta = lora_keys(out / "pytorch_lora_weights.safetensors")
    assert keys and all("lora" in k and k.startswith("transformer.") for k in keys)
    assert "rank 4" in (out / "README.md").read_text() and "a photo of sks dog" in (out / "README.md").read_text()
    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    before = generate(pipe)
    pipe.load_lora_weights(str(out))
    after = generate(pipe)
    assert not np.allclose(before, after)


def test_lora_text_encoder_and_layer_selection(tiny_flux, sample_data, tmp_path):
    out = tmp_path / "lora_te"
    args = base_args(tiny_flux, sample_data, out, steps=2, train_text_encoder=True)
    assert train_inprocess(LORA, args) == 0
    keys, _ = lora_keys(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder"} and all("lora" in k for k in keys)

    out2 = tmp_path / "lora_q"
    assert train_inprocess(LORA, base_args(tiny_flux, sample_data, out2, steps=1, lora_layers="attn.to_q")) == 0
    keys, _ = lora_keys(out2 / "pytorch_lora_weights.safetensors")
    assert keys and all(".attn.to_q.lora_" in k for k in keys)


def test_caching_does_not_change_the_loss_sequence(tiny_flux, sample_data, tmp_path):
    # two epochs of 4 samples: the second epoch reads latents and text embeddings from the cache
    common = dict(steps=8, weighting_scheme="logit_normal", random_flip=True)
    assert train_inprocess(LORA, base_args(tiny_flux, sample_data, tmp_path / "cached", **common)) == 0
    assert train_inprocess(LORA, base_args(tiny_flux, sample_data, tmp_path / "uncached", no_cache=True, **common)) == 0
    a, b = losses(tmp_path / "cached"), losses(tmp_path / "uncached")
    assert len(a) == 8 and a == b


def test_captioned_dataset_with_repeats(tiny_flux, sample_data, tmp_path):
    out = tmp_path / "captioned"
    args = base_args(tiny_flux, sample_data, out, steps=2, dataset_name=sample_data["dataset_name"],
                     caption_column="text", repeats=2)
    assert train_inprocess(LORA, args) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_prior_preservation_generates_class_images(tiny_flux, sample_data, tmp_path):
    out, cls = tmp_path / "prior", tmp_path / "class"
    args = base_args(tiny_flux, sample_data, out, steps=2, with_prior_preservation=True, class_data_dir=cls,
                     class_prompt="a photo of dog", num_class_images=2, num_validation_steps=1, sample_batch_size=2)
    assert train_inprocess(LORA, args) == 0
    assert sorted(os.listdir(cls)) == ["class_00000.png", "class_00001.png"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_validation_images_and_tensorboard(tiny_flux, sample_data, tmp_path):
    out = tmp_path / "val"
    args = base_args(tiny_flux, sample_data, out, steps=8, validation_prompt="a photo of sks dog", validation_epochs=1,
                     num_validation_images=2, num_validation_steps=1)
    args[args.index("--report_to") + 1] = "tensorboard"
    assert train_inprocess(LORA, args) == 0
    names = sorted(os.listdir(out / "validation"))
    assert "validation-epoch-1.png" in names and "validation-final.png" in names
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(out / "logs") for f in fs)
    assert "validation-final.png" in (out / "README.md").read_text()


# DeepSpeed: the full fine-tune's ZeRO-2 checkpoint + resume from "latest" is in test_zero3 (on the ZeRO-2 run it compares
# ZeRO-3 with), the LoRA's in test_reliability's 2-process SIGKILL chain (conftest.zero2_lora_run).

# ----------------------------------------------------------------------------- bad input

def _corrupt_dir(tmp_path, sample_data):
    d = tmp_path / "corrupt"
    shutil.copytree(sample_data["instance_dir"], d)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return d


BAD = {
    "missing model": (lambda m, d, t: {"pretrained_model_name_or_path": str(t / "nope")}, "nope"),
    "model missing a component": (lambda m, d, t: {"pretrained_model_name_or_path": _partial_model(m, t)}, "vae"),
    "instance dir missing": (lambda m, d, t: {"instance_data_dir": str(t / "none")}, "--instance_data_dir"),
    "instance dir empty": (lambda m, d, t: {"instance_data_dir": str(_mk(t / "empty"))}, "holds no images"),
    "only non-images": (lambda m, d, t: {"instance_data_dir": str(_mk(t / "txt", "notes.txt"))}, "holds no images"),
    "corrupt image": (lambda m, d, t: {"instance_data_dir": str(_corrupt_dir(t, d))}, "broken.png"),
    "missing column": (lambda m, d, t: {"dataset_name": d["dataset_name"], "caption_column": "caption"}, "text"),
    "resolution": (lambda m, d, t: {"resolution": "40"}, "multiple of 16"),
    "zero steps": (lambda m, d, t: {"max_train_steps": "0"}, "--max_train_steps"),
    "negative batch": (lambda m, d, t: {"train_batch_size": "-1"}, "--train_batch_size"),
    "zero lr": (lambda m, d, t: {"learning_rate": "0"}, "--learning_rate"),
    "resume missing": (lambda m, d, t: {"resume_from_checkpoint": str(t / "checkpoint-9")}, "checkpoint-9"),
    "prior without class prompt": (lambda m, d, t: {"with_prior_preservation": True, "class_data_dir": str(t / "c")}, "--class_prompt"),
    "fp16 on cpu": (lambda m, d, t: {"mixed_precision": "fp16"}, "fp16"),
    "push to hub offline": (lambda m, d, t: {"push_to_hub": True}, "--push_to_hub"),
    # judged on the loaded transformer, after the output folder was made: that folder goes again (it stayed, empty)
    "lora layers matching nothing": (lambda m, d, t: {"lora_layers": "nonexistent"}, "--lora_layers"),
}


def _mk(path, *files):
    path.mkdir()
    for f in files:
        (path / f).write_text("x")
    return path


def _partial_model(model, tmp_path):
    dst = tmp_path / "partial_model"
    shutil.copytree(model, dst)
    shutil.rmtree(dst / "vae")
    return str(dst)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line(tiny_flux, sample_data, tmp_path, capsys, case):
    make, needle = BAD[case]
    args = base_args(tiny_flux, sample_data, tmp_path / "out")
    for k, v in make(tiny_flux, sample_data, tmp_path).items():
        flag = f"--{k}"
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
        args += [flag] + ([] if v is True else [v])
    rc = train_inprocess(LORA, args)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "out").exists()  # nothing written


def test_skip_bad_images_counts_and_trains(tiny_flux, sample_data, tmp_path, caplog):
    args = base_args(tiny_flux, sample_data, tmp_path / "out", steps=1, skip_bad_images=True)
    args[args.index("--instance_data_dir") + 1] = str(_corrupt_dir(tmp_path, sample_data))
    assert train_inprocess(LORA, args) == 0
    assert "skipped 1 unreadable image" in caplog.text


def test_resume_across_run_types_is_refused(tiny_flux, sample_data, tmp_path, capsys):
    out = tmp_path / "lora"
    assert train_inprocess(LORA, base_args(tiny_flux, sample_data, out, steps=1, checkpointing_steps=1)) == 0
    capsys.readouterr()
    rc = train_inprocess(FULL, base_args(tiny_flux, sample_data, out, steps=2, resume_from_checkpoint="latest"))
    err = capsys.readouterr().err
    assert rc == 2 and "lora run" in err and "train_flux_dreambooth_lora.py" in err


def test_allow_tf32_on_a_cpu_takes_the_fast_fp32_matmul_path(tiny_flux, sample_data, tmp_path, capsys):
    """Upstream's --allow_tf32 (speed over the last bits of fp32 matmuls) means, on a CPU, torch's
    "medium" float32 matmul precision (oneDNN's bf16-based path); without it matmuls stay exact."""
    try:
        assert train_inprocess(LORA, base_args(tiny_flux, sample_data, tmp_path / "exact", steps=1)) == 0
        assert torch.get_float32_matmul_precision() == "highest"
        assert train_inprocess(LORA, base_args(tiny_flux, sample_data, tmp_path / "fast", steps=1, allow_tf32=True)) == 0
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")


@pytest.mark.cli
def test_bad_input_through_the_real_entry_point(tiny_flux, sample_data, tmp_path):
    proc = run_script([sys.executable, LORA] + base_args(tiny_flux, sample_data, tmp_path / "o", resolution=40), timeout=120)
    assert_user_error(proc, "--resolution")


@pytest.mark.multiproc
def test_plain_accelerate_launch_reports_a_mistake_once(tiny_flux, sample_data, tmp_path):
    # every process checks the same flags before they connect; only the machine's first one says so
    proc = accelerate_launch([LORA] + base_args(tiny_flux, sample_data, tmp_path / "o", resolution=40), timeout=180)
    assert proc.returncode != 0
    said = [l for l in proc.stderr.splitlines() if "error: --resolution" in l]
    assert len(said) == 1, proc.stderr
    assert not (tmp_path / "o").exists()
