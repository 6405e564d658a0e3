"""FLUX.2's text encoders as the family builds them (fluxkit.families.prompt_encoders): no output head,
no vision tower, no layer past the deepest hidden state prompts read but one; the checkpoint's
weights for those are neither loaded nor reported, the weights kept are the checkpoint's, the
prompt embeddings equal transformers' full model's bit for bit, and the plan counts what is built."""

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.tiny

FULL_CLASS = {"flux2": "Mistral3ForConditionalGeneration", "flux2-klein": "Qwen3ForCausalLM"}
LEFT_OUT = ("lm_head", "vision_tower", "multi_modal_projector")


def _layers(config):
    return getattr(config, "text_config", config).num_hidden_layers


@pytest.fixture(params=["flux2", "flux2-klein"])
def folder(request, tiny_flux2_dev, tiny_klein):
    return request.param, {"flux2": tiny_flux2_dev, "flux2-klein": tiny_klein}[request.param]


def _args(layers):
    return SimpleNamespace(text_encoder_out_layers=layers, max_sequence_length=32)


@pytest.mark.parametrize("layers", [None, (2, 5, 7)])
def test_the_encoder_stops_after_the_deepest_layer_read_and_encodes_the_same(folder, layers):
    import transformers

    from fluxkit import families
    from fluxkit.plan.architecture import read_architecture

    name, model = folder
    family = families.get(name)
    full = getattr(transformers, FULL_CLASS[name]).from_pretrained(model, subfolder="text_encoder", local_files_only=True).eval()
    encoder = family.load_component("text_encoder", model, text_layers=layers, local_files_only=True).eval()
    deepest = max(layers or family.out_layers)
    assert _layers(full.config) > deepest + 1  # the tiny presets store more layers than prompts read
    assert _layers(encoder.config) == len(encoder.get_decoder().layers) == deepest + 1
    # nothing left out was built, and every weight kept is the checkpoint's
    theirs = dict(full.named_parameters())
    ours = dict(encoder.named_parameters())
    assert not any(part in n for n in ours for part in LEFT_OUT)
    assert all(torch.equal(p, theirs[n]) for n, p in ours.items())
    # the plan counts the encoder as built
    assert read_architecture(model, text_layers=layers).text_encoders[0]["params"] == sum(p.numel() for p in ours.values())
    # the prompt embeddings, through the family's own encode, bit for bit
    tokenizer = family.load_component("tokenizer", model, local_files_only=True)
    prompts = ["a photo of sks dog", "an oil painting of a lighthouse at dusk"]
    with torch.no_grad():
        want, _ = family.encode_prompts(SimpleNamespace(tokenizer=tokenizer, text_encoder=full), prompts, _args(layers), "cpu")
        got, _ = family.encode_prompts(SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder), prompts, _args(layers), "cpu")
    assert torch.equal(want, got)
    with pytest.raises(NotImplementedError, match="encodes prompts only"):
        encoder.generate(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_the_checkpoint_layers_left_out_are_neither_loaded_nor_reported(folder):
    """transformers reports no unexpected or missing key for the shortened encoder: what is left out is
    skipped by name, and everything built comes from the checkpoint."""
    from fluxkit import families

    name, model = folder
    family = families.get(name)
    cls = family.component_class("text_encoder")
    stored = cls.config_class.from_pretrained(model, subfolder="text_encoder").to_dict()
    shorter = family.text_encoder_config(stored, (3, 4))
    assert shorter is not None and _layers(cls.config_class.from_dict(shorter)) == 5
    encoder, info = cls.from_pretrained(model, subfolder="text_encoder", config=cls.config_class.from_dict(shorter),
                                        local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert len(encoder.get_decoder().layers) == 5
    # asking for the last layer (or past it), or for one counted from the end, keeps every layer: as stored
    assert family.text_encoder_config(stored, (1, _layers(cls.config_class.from_dict(stored)))) is None
    assert family.text_encoder_config(stored, (2, -1)) is None


def test_flux1_text_encoders_are_built_as_stored(tiny_flux):
    """FLUX.1 reads CLIP's pooled output and T5's last hidden state: nothing is left out there."""
    from fluxkit import families

    family = families.get("flux1")
    assert family.text_encoder_config({"num_hidden_layers": 4}, None) is None
    t5 = family.load_component("text_encoder_2", tiny_flux, local_files_only=True)
    assert len(t5.encoder.block) == t5.config.num_layers
