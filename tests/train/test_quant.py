"""--base_quantization (issue 15): LoRA on an int8 (torchao) or NF4 (bitsandbytes) frozen base, on
the tiny FLUX at 32 px, fp32, one process, seconds each.

A LoRA trained over a quantized base learns (its losses fall below those of the same run with the
learning rate at zero: the same seeds draw the same noise and timesteps, so the runs pair step by
step), its file is an ordinary LoRA file that changes an unquantized pipeline's images, a killed
run resumes bit-identically, and what cannot run is refused in one line before anything is written.
"""

import json
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, assert_user_error, run_entry_inprocess as train_inprocess, run_script
from test_reliability import LORA, assert_bit_identical, log_lines, steps_and_losses, train_args, weights
from test_train_guards import run_chain

FULL = os.path.join(ROOT, "train_flux_dreambooth.py")
LORA_FILE = "pytorch_lora_weights.safetensors"


def losses(out):
    return [r["loss"] for r in log_lines(out)]


def infer_lora(argv) -> int:
    """infer_flux_text2img_lora_bf16.py's main in this process: its exit status."""
    from fluxkit.inference import args as infer_args, run as inference
    from fluxkit.shared.errors import cli

    return cli(inference.main)(infer_args.LORA, [str(a) for a in argv])


def test_the_transformer_loads_with_quantized_linear_weights(tiny_flux):
    """What the trainer and the inference scripts load: every nn.Linear weight quantized, nothing else."""
    import bitsandbytes as bnb
    import torch
    from torchao.quantization import Int8Tensor

    from fluxkit.weights.quant import load_transformer

    plain = load_transformer(tiny_flux, "none", torch.float32, "cpu", subfolder="transformer", local_files_only=True)
    linears = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)]
    for quantization, kind in (("int8", Int8Tensor), ("nf4", bnb.nn.Params4bit)):
        t = load_transformer(tiny_flux, quantization, torch.float32, "cpu", subfolder="transformer", local_files_only=True)
        modules = dict(t.named_modules())
        assert all(isinstance(modules[n].weight, kind) for n in linears), quantization
        others = [p for n, p in t.named_parameters() if n.rsplit(".", 1)[0] not in linears]
        assert others and all(p.dtype == torch.float32 for p in others)


COMMON = dict(repeats=2, rank=8, lora_alpha=8)  # the learning runs' settings, quantization aside


@pytest.fixture(scope="module")
def unquantized_first_loss(tiny_flux, sample_data, tmp_path_factory):
    """Step 1's loss over the unquantized base: the same noise and timesteps as the quantized runs' step 1."""
    out = tmp_path_factory.mktemp("unquantized")
    assert train_inprocess(LORA, train_args(tiny_flux, sample_data, out, 1, **COMMON)) == 0
    return losses(out)[0]


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_lora_on_a_quantized_base_learns_and_loads_into_an_unquantized_pipeline(
        quantization, tiny_flux, sample_data, tmp_path, unquantized_first_loss):
    steps = 10
    common = dict(base_quantization=quantization, **COMMON)
    trained, frozen = tmp_path / "trained", tmp_path / "lr0"
    assert train_inprocess(LORA, train_args(tiny_flux, sample_data, trained, steps, learning_rate=3e-2, **common,
                                            validation_prompt="a photo of sks dog", num_validation_images=1,
                                            num_validation_steps=2)) == 0
    assert (trained / "validation" / "validation-final.png").is_file()  # rendered on the quantized base
    # the same run with the learning rate at (nearly) zero draws the same noise and timesteps
    assert train_inprocess(LORA, train_args(tiny_flux, sample_data, frozen, steps, learning_rate=1e-12, **common)) == 0
    a, b = losses(trained), losses(frozen)
    assert len(a) == len(b) == steps
    # step 1 runs before any update: the same loss, and one the quantization moved off the unquantized base's
    assert a[0] == b[0] and a[0] != unquantized_first_loss and abs(a[0] - unquantized_first_loss) < 0.05 * unquantized_first_loss
    later = slice(steps // 2, steps)
    gains = [y - x for x, y in zip(a[later], b[later])]
    assert sum(gains) > 0.05 * sum(b[later]) and sum(g > 0 for g in gains) >= len(gains) - 1, (a, b)

    # the saved file is an ordinary LoRA file: LoRA tensors only, named as over an unquantized base
    from safetensors.torch import load_file

    state = load_file(str(trained / LORA_FILE))
    assert state and all(k.startswith("transformer.") and ".lora_" in k for k in state)
    assert not any(part in k for k in state for part in ("base_layer", "absmax", "quant"))
    assert json.loads((trained / "run_config.json").read_text())["settings"]["base_quantization"] == quantization

    # it loads into an unquantized FluxPipeline and changes what it renders
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a photo of sks dog", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                    max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    before = render()
    pipe.load_lora_weights(str(trained / LORA_FILE))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    assert np.abs(render() - before).max() > 1e-3

    # and into the inference scripts' quantized transformer, also merged into its quantized weights (--fuse_lora)
    images = {}
    for how in ("none", "lora", "fused"):
        out = tmp_path / f"infer-{how}"
        lora = [] if how == "none" else ["--lora_weights", trained] + (["--fuse_lora"] if how == "fused" else [])
        assert infer_lora(["--model_path", tiny_flux, "--base_quantization", quantization, "--prompt", "a photo of sks dog",
                           "--seeds", "1", "--height", "32", "--width", "32", "--num_inference_steps", "2", "--dtype",
                           "fp32", "--max_sequence_length", "32", "--output_dir", out, "--lora_weights", ""] + lora) == 0
        images[how] = np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.int16)
    effect = np.abs(images["lora"] - images["none"]).mean()
    # merged: the same image up to rounding (int8) or re-quantizing the merged weights to NF4 (about a quarter)
    assert effect > 5 and np.abs(images["fused"] - images["lora"]).mean() < 0.4 * effect


def test_use_8bit_adam_trains_on_a_cpu_with_8_bit_states(tiny_flux, sample_data, tmp_path):
    """training.md said --use_8bit_adam is CUDA only; bitsandbytes' AdamW8bit runs on this CPU: the run trains
    and its checkpoint holds the optimizer's 8-bit (uint8) states, not AdamW's fp32 ones."""
    import torch

    out = tmp_path / "adam8"
    assert train_inprocess(LORA, train_args(tiny_flux, sample_data, out, 2, use_8bit_adam=True, checkpointing_steps=2,
                                            learning_rate=1e-2)) == 0
    state = torch.load(str(out / "checkpoint-2" / "optimizer.bin"), weights_only=True)["state"]
    assert state and all("__bnb_optimizer_quant_state__" in s for s in state.values())
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(out))


@pytest.mark.cli
def test_killed_run_on_a_quantized_base_resumes_bit_identical(tiny_flux, sample_data, tmp_path, capsys):
    """Killed after step 3 (checkpoint-2 on disk), resumed: the uninterrupted run's losses and LoRA.
    A resume that changes the quantization is refused, naming it."""
    reference, out, left = run_chain(tiny_flux, sample_data, tmp_path, 4, kills=[3], checkpointing_steps=2,
                                     base_quantization="nf4")
    assert left == [["checkpoint-2"]]
    assert steps_and_losses(out) == steps_and_losses(reference)
    assert_bit_identical(weights(out, LORA), weights(reference, LORA))

    capsys.readouterr()
    args = train_args(tiny_flux, sample_data, out, 6, resume_from_checkpoint="latest", base_quantization="int8")
    assert train_inprocess(LORA, args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "base_quantization nf4 -> int8" in err and "--allow_changed_settings" in err


def test_the_quantization_libraries_a_run_never_calls(tmp_path):
    from fluxkit.weights.quant import libraries_not_needed

    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    assert libraries_not_needed("none", False, str(model)) == ("bitsandbytes", "torchao")
    assert libraries_not_needed("nf4", False, str(model)) == ("torchao",)
    assert libraries_not_needed("int8", False, str(model)) == ("bitsandbytes",)
    assert libraries_not_needed("none", True, str(model)) == ("torchao",)  # --use_8bit_adam: bitsandbytes' optimizer
    assert libraries_not_needed("none", False, str(model), "nf4") == ("torchao",)  # --text_encoder_quantization: bitsandbytes
    assert libraries_not_needed("none", False, "black-forest-labs/FLUX.1-dev") == ()  # not local: cannot tell
    # a component saved quantized needs its library to load
    (model / "transformer" / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    assert libraries_not_needed("none", False, str(model)) == ()


@pytest.mark.cli
def test_a_plain_lora_run_does_not_import_bitsandbytes_or_torchao(tiny_flux, sample_data, tmp_path):
    """Both are installed here, and diffusers, transformers and peft import them whenever installed
    (about 1 s of start-up): the trainer and the inference scripts leave them out of a run that never
    calls them."""
    out = tmp_path / "o"
    infer = [os.path.join(ROOT, "infer_flux_text2img_lora_bf16.py"), "--model_path", tiny_flux, "--lora_weights", out,
             "--prompt", "a photo of sks dog", "--height", "32", "--width", "32", "--num_inference_steps", "1",
             "--output_dir", tmp_path / "images"]
    for command in ([LORA] + train_args(tiny_flux, sample_data, out, 1), infer):
        proc = run_script([sys.executable, "-X", "importtime", *map(str, command)], timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        loaded = re.findall(r"\|\s+((?:bitsandbytes|torchao)\.\S+)", proc.stderr)  # a submodule: the library loaded
        assert not loaded, (command[0], loaded[:5])
    assert (out / LORA_FILE).is_file() and any((tmp_path / "images").glob("*.png"))


def _refused(capsys, script, args, *needles):
    import subprocess

    capsys.readouterr()
    rc = infer_lora(args) if script is None else train_inprocess(script, args)
    captured = capsys.readouterr()
    assert rc == 2
    return assert_user_error(subprocess.CompletedProcess(args, rc, captured.out, captured.err), *needles)


def test_what_cannot_run_is_refused_in_one_line_before_anything_is_written(tiny_flux, sample_data, tmp_path, capsys,
                                                                           monkeypatch):
    out = tmp_path / "out"
    # fp8 needs float8 hardware: this CPU has none
    _refused(capsys, LORA, train_args(tiny_flux, sample_data, out, 1, base_quantization="fp8"),
             "--base_quantization fp8 needs a CUDA GPU with compute capability 8.9", "int8 or nf4")
    _refused(capsys, None, ["--model_path", tiny_flux, "--lora_weights", "", "--base_quantization", "fp8",
                                  "--output_dir", str(out)], "--base_quantization fp8 needs a CUDA GPU", "this run's device is cpu")
    # a full fine-tune has no frozen base
    _refused(capsys, FULL, train_args(tiny_flux, sample_data, out, 1, base_quantization="nf4"),
             "--base_quantization nf4 quantizes the frozen base of a LoRA run", "drop the flag or train LoRA")
    # under DeepSpeed torchao's weights cannot be moved (without this check: a traceback from DeepSpeed's engine)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    _refused(capsys, LORA, train_args(tiny_flux, sample_data, out, 1, base_quantization="int8"),
             "--base_quantization int8 cannot run under DeepSpeed", "use --base_quantization nf4 with DeepSpeed")
    assert not out.exists()


def test_inference_renders_on_a_quantized_transformer(tiny_flux, tmp_path):
    """The same prompt and seed on int8 and NF4 transformers: images, named apart from the unquantized one's."""
    common = ["--model_path", tiny_flux, "--lora_weights", "", "--prompt", "a photo of sks dog", "--seeds", "1",
              "--height", "32", "--width", "32", "--num_inference_steps", "2", "--dtype", "fp32"]
    images = {}
    for quantization in ("none", "int8", "nf4"):
        out = tmp_path / quantization
        assert infer_lora(common + ["--output_dir", str(out), "--base_quantization", quantization]) == 0
        records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert len(records) == 1 and records[0].get("base_quantization", "none") == quantization
        images[quantization] = (records[0]["file"], np.asarray(Image.open(out / records[0]["file"]), dtype=np.int16))
    names = {name for name, _ in images.values()}
    assert len(names) == 3
    for quantization in ("int8", "nf4"):  # close to the unquantized image, not equal to it
        diff = np.abs(images[quantization][1] - images["none"][1])
        assert 0 < diff.mean() < 40, (quantization, diff.mean())
