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
