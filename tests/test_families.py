"""The model-family seam (fluxkit.families): which family a folder is, and each family on its tiny model."""

import json
import os
import shutil

import pytest

from fluxkit import families
from fluxkit.errors import UserError


def test_family_comes_from_model_index_and_model_family_overrides_within_the_same_components(tiny_flux, tmp_path):
    assert families.of_folder(tiny_flux).name == "flux1"
    assert families.of_folder(tiny_flux, "kontext").name == "kontext"  # a FLUX.1 folder trains Kontext
    with pytest.raises(UserError, match="cannot use .* flux1 pipeline"):
        families.of_folder(tiny_flux, "flux2-klein")
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UserError, match="StableDiffusionPipeline pipeline, which is no FLUX family"):
        families.of_folder(str(other))


def test_every_family_names_its_pipeline_and_components():
    for name in families.NAMES:
        family = families.get(name)
        assert family.pipeline_class().__name__ == family.pipeline_name
        assert family.component_class("transformer").__name__ == family.transformer_class
        assert set(family.text_parts()) <= set(family.components)


# ----------------------------------------------------------------------------- FLUX.2 [klein]

LORA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_flux_dreambooth_lora.py")


@pytest.fixture(scope="module")
def tiny_klein(tmp_path_factory):
    from fluxkit.tiny import build_pipeline

    return build_pipeline(str(tmp_path_factory.mktemp("models") / "tiny_klein"), "tiny", family="flux2-klein")


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "train_log.jsonl"))]


def _render(pipe, seed=0):
    import torch

    return pipe(prompt="a photo of sks dog", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                output_type="np", generator=torch.Generator().manual_seed(seed)).images


def test_klein_lora_learns_and_its_file_changes_the_plain_klein_pipeline(tiny_klein, sample_data, tmp_path):
    import numpy as np
    from diffusers import Flux2KleinPipeline
    from safetensors.torch import load_file

    from conftest import run_entry_inprocess, trainer_args

    runs = {}
    for lr in ("1e-3", "1e-30"):  # 1e-30: updates vanish in fp32 (0 is refused)
        out = tmp_path / f"lr{lr}"
        assert run_entry_inprocess(LORA, trainer_args(tiny_klein, sample_data, out, steps=4, max_sequence_length=16,
                                                      learning_rate=lr, latent_cache_dir=tmp_path / "cache")) == 0
        runs[lr] = _losses(out)
    # the same draws: step 1 is the same loss, then the trained adapter moves it
    assert runs["1e-3"][0] == runs["1e-30"][0] and runs["1e-3"][1:] != runs["1e-30"][1:]
    lora = tmp_path / "lr1e-3" / "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(lora)))
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
    assert any("single_transformer_blocks.0.attn.to_qkv_mlp_proj" in k for k in keys)  # klein's default targets

    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    before = _render(pipe)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    after = _render(pipe)
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-4


def test_klein_refuses_training_a_text_encoder_in_one_line(tiny_klein, sample_data, tmp_path, capsys):
    from conftest import run_entry_inprocess, trainer_args

    status = run_entry_inprocess(LORA, trainer_args(tiny_klein, sample_data, tmp_path / "o", steps=1,
                                                    max_sequence_length=16, train_text_encoder=True))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1 and "--train_text_encoder" in errors[0] and "flux2-klein" in errors[0]
    assert not (tmp_path / "o").exists()  # refused before the output folder is made
