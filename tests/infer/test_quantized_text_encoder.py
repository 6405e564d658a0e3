"""--text_encoder_quantization in the inference scripts (fluxkit.inference.run.load_text_encoders, through
each family's load_component as the trainers load them) on the tiny FLUX.2 [dev]: an NF4 Mistral3 renders,
the metadata and the file name say so, and the image differs from the unquantized one only through the
prompt embeddings; the same image from two data-parallel processes; the bad combinations as one error
line."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, accelerate_launch
from test_context_parallel import two_process_config
from test_inference import _fresh_process_state, infer, manifest, pixels, pngs  # noqa: F401

DISTRIB = os.path.join(ROOT, "infer_flux_text2img_distrib.py")
PROMPTS = ["a photo of sks dog", "an astronaut riding a horse on the moon"]
# 48 tokens: the tiny dev tokenizer's system message takes 33, the prompt comes after it
ARGV = ["--height", "32", "--width", "32", "--num_inference_steps", "2", "--dtype", "fp32", "--max_sequence_length", "48",
        "--seeds", "8", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]


def recorded_run(model, out, quantization, replay=None):
    """One in-process run of the base script recording, per pipeline call, the prompt embeddings the
    pipeline encoded, the latents it handed the VAE, and the Linear classes of its text encoder.
    replay: embeddings to hand the pipeline instead of its own (in call order)."""
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline

    record = {"embeds": [], "latents": [], "linears": set()}
    encode, decode = Flux2Pipeline.encode_prompt, AutoencoderKLFlux2.decode

    def encode_prompt(self, *args, **kwargs):
        record["linears"] |= {type(m).__name__ for m in self.text_encoder.modules() if "Linear" in type(m).__name__}
        embeds, ids = encode(self, *args, **kwargs)
        if replay is not None:
            embeds = replay[len(record["embeds"])]
        record["embeds"].append(embeds.detach().clone())
        return embeds, ids

    def vae_decode(self, z, *args, **kwargs):
        record["latents"].append(z.detach().clone())
        return decode(self, z, *args, **kwargs)

    Flux2Pipeline.encode_prompt, AutoencoderKLFlux2.decode = encode_prompt, vae_decode
    try:
        assert infer("BASE", ["--model_path", model, *ARGV, "--text_encoder_quantization", quantization,
                              "--output_dir", out]) == 0
    finally:
        Flux2Pipeline.encode_prompt, AutoencoderKLFlux2.decode = encode, decode
    return record


@pytest.fixture(scope="module")
def nf4_run(tiny_flux2_dev, tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4") / "out"
    record = recorded_run(tiny_flux2_dev, out, "nf4")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return out, record


@pytest.mark.tiny
def test_flux2_dev_renders_over_a_4bit_text_encoder_and_only_its_embeddings_change_the_image(tiny_flux2_dev, nf4_run,
                                                                                              tmp_path):
    """The check: the NF4 run's embeddings move (0 < relative L2 <= 0.3 per prompt, the bound of
    tests/families/test_text_encoder_quantization.py) and so do its final latents; handing the NF4 run's
    embeddings to the unquantized pipeline gives its final latents bit for bit and its PNGs exactly. So
    the image differs from the unquantized one by exactly what the embeddings do, nothing else."""
    out, q = nf4_run
    assert "Linear4bit" in q["linears"] and "Linear" not in q["linears"], q["linears"]  # no head, all converted
    records = manifest(out)
    assert [r["text_encoder_quantization"] for r in records] == ["nf4", "nf4"]
    with Image.open(out / records[0]["file"]) as im:
        assert im.text["text_encoder_quantization"] == "nf4"

    plain = recorded_run(tiny_flux2_dev, tmp_path / "none", "none")
    assert plain["linears"] == {"Linear"}
    assert all("text_encoder_quantization" not in r for r in manifest(tmp_path / "none"))  # names of earlier runs kept
    assert set(pngs(out)).isdisjoint(pngs(tmp_path / "none"))  # the file name tells them apart
    for got, full in zip(q["embeds"], plain["embeds"]):
        error = ((got - full).norm() / full.norm()).item()
        assert 0 < error <= 0.3, error
    assert any(not torch.equal(a, b) for a, b in zip(q["latents"], plain["latents"]))

    replayed = recorded_run(tiny_flux2_dev, tmp_path / "replay", "none", replay=q["embeds"])
    assert all(torch.equal(a, b) for a, b in zip(q["latents"], replayed["latents"]))
    for a, b in zip(records, manifest(tmp_path / "replay")):
        assert np.array_equal(pixels(out / a["file"]), pixels(tmp_path / "replay" / b["file"]))


@pytest.mark.multiproc
def test_two_data_parallel_processes_render_the_same_4bit_images(tiny_flux2_dev, nf4_run, tmp_path):
    """Each of two processes quantizes its own text encoder and renders its share (one image each):
    the same files, pixel for pixel, as the single process's NF4 run."""
    one, _ = nf4_run
    argv = ["--model_path", tiny_flux2_dev, *ARGV, "--text_encoder_quantization", "nf4", "--output_dir", tmp_path / "two"]
    proc = accelerate_launch([DISTRIB, *map(str, argv)], num_processes=2, config=two_process_config(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), grid 2 data-parallel x ulysses 1 x ring 1" in proc.stdout
    two = tmp_path / "two"
    import json

    assert json.loads((two / "infer_summary.json").read_text())["images_per_process"] == [1, 1]
    assert pngs(two) == pngs(one) and len(pngs(one)) == 2
    assert all(np.array_equal(pixels(one / n), pixels(two / n)) for n in pngs(one))
    assert manifest(two) == manifest(one)


@pytest.mark.tiny
@pytest.mark.parametrize("mistake", ["bitsandbytes missing", "npu", "text-encoder LoRA"])
def test_bad_combinations_are_one_line_and_write_nothing(mistake, tiny_flux2_dev, tiny_flux, tmp_path, capfd, monkeypatch):
    """bitsandbytes missing; an NPU (bitsandbytes has no backend there); a LoRA with text-encoder layers
    (FLUX.1's --train_text_encoder), which diffusers loads by casting the encoder, refused by transformers
    for a bitsandbytes model (seen: "You cannot cast a bitsandbytes model in a new `dtype`")."""
    import sys
    from dataclasses import replace

    from fluxkit.shared import device

    model, extra = tiny_flux2_dev, []
    if mistake == "text-encoder LoRA":  # FLUX.1's CLIP  # only its header is read before the refusal
        from safetensors.torch import save_file

        layer = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
        save_file({f"{layer}.lora_A.weight": torch.zeros(4, 32), f"{layer}.lora_B.weight": torch.zeros(32, 4)},
                  str(tmp_path / "clip_lora.safetensors"))
        model, extra = tiny_flux, ["--lora_weights", tmp_path / "clip_lora.safetensors"]
        needle = "holds text-encoder layers"
    elif mistake == "npu":
        detect = device.detect
        monkeypatch.setattr(device, "detect", lambda name: replace(detect("cpu"), type="npu"))
        needle = "bitsandbytes has no Ascend NPU backend"
    else:
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as Python blocks an import
        needle = "needs bitsandbytes, which is not installed"
    out = tmp_path / "out"
    assert infer("BASE", ["--model_path", model, *ARGV, "--text_encoder_quantization", "nf4", "--output_dir", out,
                          *extra]) == 2
    lines = [line for line in capfd.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "--text_encoder_quantization nf4" in lines[0] and needle in lines[0], lines
    assert not out.exists()
