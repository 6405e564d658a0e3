"""FLOP accounting (fluxkit.flops) against torch's own counter, and the bench harness's
result schema and table printer. No timing is asserted anywhere."""

import json
import os
import sys

import pytest
import torch

from conftest import ROOT, assert_user_error, run_script


def _transformer(preset, device=None, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel
    from fluxkit.tiny import PRESETS

    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            return FluxTransformer2DModel(**PRESETS[preset].transformer).to(dtype)
    return FluxTransformer2DModel(**PRESETS[preset].transformer)


def _rel(a, b):
    return abs(a - b) / b


# ---------------------------------------------------------------- fluxkit.flops

@pytest.mark.parametrize("image_tokens, text_tokens, batch", [(64, 16, 1), (256, 77, 2), (100, 512, 3)])
def test_forward_flops_match_torch_counter_on_tiny_model(image_tokens, text_tokens, batch):
    from fluxkit.flops import flux_forward_flops, torch_counted_flops

    model = _transformer("tiny")
    measured = torch_counted_flops(model, image_tokens, text_tokens, batch)
    ours = flux_forward_flops(model.config, image_tokens, text_tokens, batch)
    assert measured > 0
    assert _rel(ours, measured) < 0.05, (ours, measured)


def test_forward_flops_match_torch_counter_on_flux_dev_architecture():
    """FLUX.1-dev's exact layer sizes, counted on the meta device (no memory, no compute)."""
    from fluxkit.flops import flux_forward_flops, torch_counted_flops

    model = _transformer("dev", device="meta", dtype=torch.bfloat16)
    measured = torch_counted_flops(model, 256, 77, 1)
    ours = flux_forward_flops(model.config, 256, 77)
    assert _rel(ours, measured) < 0.05, (ours, measured)
    # FLUX.1-dev at 1024x1024 with a 512-token prompt is the often-quoted ~74 TFLOPs per step.
    assert 70e12 < flux_forward_flops(model.config, 4096, 512) < 78e12


def test_full_training_step_is_forward_plus_backward():
    from fluxkit.flops import torch_counted_flops, training_step_flops

    model = _transformer("tiny")
    measured = torch_counted_flops(model, 64, 16, 2, backward=True)
    assert _rel(training_step_flops(model.config, 64, 16, 2), measured) < 0.05


def test_lora_training_step_skips_base_weight_gradients():
    from peft import LoraConfig

    from fluxkit.flops import torch_counted_flops, training_step_flops

    model = _transformer("small")
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    measured = torch_counted_flops(model, 64, 16, 1, backward=True)
    lora = training_step_flops(model.config, 64, 16, 1, frozen_base=True)
    assert _rel(lora, measured) < 0.05, (lora, measured)
    # and counting it as a full step would overstate the work by far more than 5%
    assert training_step_flops(model.config, 64, 16, 1) > 1.3 * measured


def test_image_tokens_and_mfu():
    from fluxkit.flops import image_tokens, mfu

    assert image_tokens(1024, 1024) == 4096 and image_tokens(256, 256) == 256 and image_tokens(512, 256) == 512
    assert image_tokens(32, 32, vae_scale_factor=2) == 64
    assert mfu(50e12, 1.0, 100e12) == 0.5
    assert mfu(50e12, 1.0, 100e12, devices=2) == 0.25
    assert mfu(1.0, 1.0, None) is None


def test_peak_table_knows_datasheet_gpus_only_in_half_precision():
    from fluxkit.flops import table_peak_flops

    assert table_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert table_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert table_peak_flops("NVIDIA H200", torch.float16) == 989e12
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) is None
    assert table_peak_flops("Some Future Chip", torch.bfloat16) is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    from fluxkit.device import detect
    from fluxkit.flops import peak_flops

    monkeypatch.setenv("FLUXKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLUXKIT_PEAK_TFLOPS", raising=False)
    first = peak_flops(detect("cpu"), torch.bfloat16)
    assert first > 1e8  # any CPU of this century does over 0.1 GFLOP/s
    cache = tmp_path / "peak_flops.json"
    entries = json.loads(cache.read_text())
    (key,) = [k for k in entries if "bfloat16" in k and f"threads={torch.get_num_threads()}" in k]
    entries[key] = 123.0  # a value no measurement gives: proves the next call reads the cache
    cache.write_text(json.dumps(entries))
    assert peak_flops(detect("cpu"), torch.bfloat16) == 123.0


def test_peak_env_override_and_bad_value(monkeypatch):
    from fluxkit.device import detect
    from fluxkit.errors import UserError
    from fluxkit.flops import peak_flops

    monkeypatch.setenv("FLUXKIT_PEAK_TFLOPS", "313")
    assert peak_flops(detect("cpu"), torch.bfloat16) == 313e12
    monkeypatch.setenv("FLUXKIT_PEAK_TFLOPS", "fast")
    with pytest.raises(UserError, match="FLUXKIT_PEAK_TFLOPS"):
        peak_flops(detect("cpu"), torch.bfloat16)
