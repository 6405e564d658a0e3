"""Each term of the memory plan (fluxkit.plan.terms) against a count made by hand or by the real
libraries, and the phases they make: FLUX.1-dev's architecture (no weights) and the tiny preset."""

import dataclasses

import pytest

from fluxkit.plan import GiB, plan_shape, read_architecture, smallest_change
from fluxkit.plan import terms
from fluxkit.plan.architecture import block_linear_shapes
from fluxkit.plan.shape import RunShape
from fluxkit.plan.architecture import default_lora_targets


@pytest.fixture(scope="module")
def dev():
    return read_architecture("black-forest-labs/FLUX.1-dev")


def shape(**kw):
    base = dict(lora=True, targets=tuple(default_lora_targets()), rank=4, mixed="bf16", resolution=512, seq_len=512,
                checkpointing=True, device="cuda")
    return RunShape(**{**base, **kw})


def test_encoders_and_the_decoder_that_stays(dev):
    s = shape()
    enc = {i.name: i.bytes for i in terms.encoder_weights(s, dev)}
    assert enc["T5 text encoder (frozen)"] == 4_762_310_656 * 2
    assert set(enc) == {"VAE (frozen)", "T5 text encoder (frozen)", "CLIP text encoder (frozen)"}
    assert "CLIP text encoder (frozen)" not in {i.name for i in terms.encoder_weights(shape(train_clip=True), dev)}
    decoder = terms.vae_decoder_weights(s, dev).bytes
    assert 0.4 * enc["VAE (frozen)"] < decoder < 0.7 * enc["VAE (frozen)"]  # FLUX's decoder is the larger half


def test_the_vae_split_matches_the_library(tiny_flux):
    from diffusers import AutoencoderKL

    arch = read_architecture(tiny_flux)
    vae = AutoencoderKL.from_pretrained(tiny_flux, subfolder="vae")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert arch.params["vae_encoder"] == count(vae.encoder) + (count(vae.quant_conv) if vae.quant_conv else 0)
    from diffusers import FluxTransformer2DModel

    t = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    assert arch.block_params == [count(b) for b in list(t.transformer_blocks) + list(t.single_transformer_blocks)]


def test_quantized_base_and_zero3_partition(dev):
    none, nf4 = terms.transformer_base(shape(), dev).bytes, terms.transformer_base(shape(quant="nf4"), dev).bytes
    assert none == dev.params["transformer"] * 2
    assert nf4 / GiB == pytest.approx(6.24, abs=0.02)
    assert terms.transformer_base(shape(zero_stage=3, world=4), dev).bytes == none // 4
    assert terms.transformer_base(shape(zero_stage=3, world=4, offload_params=True), dev).bytes == 0


def test_trainable_optimizer_and_gradients_follow_zero(dev):
    n = 1_000_000
    assert [i.bytes for i in terms.trainable_weights(shape(), n)] == [4 * n]
    z2 = shape(lora=False, zero_stage=2, world=8)
    assert [i.bytes for i in terms.trainable_weights(z2, n)] == [2 * n, 4 * n // 8]
    assert terms.optimizer_states(z2, n).bytes == 8 * n // 8
    assert terms.optimizer_states(dataclasses.replace(z2, optimizer="adamw8bit"), n).bytes == 2 * n // 8
    assert terms.optimizer_states(dataclasses.replace(z2, offload_optimizer=True), n).bytes == 0
    bw, step, _ = terms.gradients(z2, n)
    assert bw == terms.DEEPSPEED_REDUCE_BUCKET * 2 + 2 * n // 8 and step == 2 * n // 8 + 4 * n // 8
    assert terms.gradients(shape(), n)[:2] == (4 * n, 4 * n)
    assert terms.step_temporaries(shape(), n) == 4 * n and terms.step_temporaries(shape(device="cpu"), n) == 0


def test_activations_scale_with_tokens_and_checkpointing(dev):
    one = sum(i.bytes for i in terms.activations(shape(batch=1), dev))
    two = sum(i.bytes for i in terms.activations(shape(batch=2), dev))
    assert two == pytest.approx(2 * one, rel=1e-6)
    off = sum(i.bytes for i in terms.activations(shape(checkpointing=False), dev))
    assert one < 0.2 * off
    double, single, outer = terms.ACTIVATION_CONSTANTS[("autocast", "lora", False)]
    tokens, img = 1024 + 512, 1024
    assert off == int(tokens * 3072 * (19 * double + 38 * single) + img * 3072 * outer)


def test_block_terms_match_the_blocks(dev):
    shapes = block_linear_shapes(dev.linear_shapes)
    assert len(shapes) == len(dev.block_params) == 57
    sizes = terms.block_bytes(shape(), dev)
    assert sum(sizes) < dev.params["transformer"] * 2 and sizes[0] > sizes[-1]  # double blocks are the larger
    s = shape(blocks_to_swap=20)
    assert terms.swapped_blocks(s, dev) == sizes[-20:]
    (item,) = terms.block_offload(s, dev)
    assert item.bytes == -(sum(sizes[-20:]) - 2 * max(sizes[-20:]))  # two visit at a time on an accelerator
    (cpu,) = terms.block_offload(dataclasses.replace(s, device="cpu"), dev)
    assert cpu.bytes == -(sum(sizes[-20:]) - max(sizes[-20:]))
    assert terms.host_offloaded(s, dev, 10)[0].bytes == sum(sizes[-20:])


def test_the_peak_is_the_largest_phase_not_a_sum(dev):
    plan = plan_shape(shape(quant="nf4", optimizer="adamw8bit"), dev, 12 * GiB)
    assert plan.peak_bytes == max(p.bytes for p in plan.phases)
    encode, train = plan.phase("encode"), plan.phase("train: forward + backward")
    assert {i.name for i in encode.items} & {"transformer base (frozen)", "transformer arriving"} == set()
    assert "T5 text encoder (frozen)" not in {i.name for i in train.items}
    assert plan.peak_bytes < encode.bytes + train.bytes


def test_published_recipes_fit(dev):
    """The HF QLoRA recipe fits a 12 GB card at 10 GiB or less; the reference's full fine-tune (8 x 64 GB,
    ZeRO-2, 256 px, batch 16) fits its cards."""
    qlora = plan_shape(shape(quant="nf4", optimizer="adamw8bit"), dev, 12 * GiB)
    assert qlora.peak_bytes <= 10 * GiB and qlora.fits
    full = plan_shape(shape(lora=False, zero_stage=2, world=8, resolution=256, batch=16, seq_len=77), dev, 64 * GiB)
    assert full.fits


def test_smallest_change_names_the_block_count(dev):
    plan = plan_shape(shape(quant="nf4", optimizer="adamw8bit", warm_cache=True), dev, 8 * GiB)
    assert plan.fits is False
    flags, fitting = smallest_change(plan)
    assert fitting.fits and flags[-1].startswith("--blocks_to_swap ")
    n = int(flags[-1].split()[-1])
    fewer = plan_shape(dataclasses.replace(plan.shape, blocks_to_swap=n - 1), dev, 8 * GiB)
    assert fewer.fits is False  # the smallest count that fits
    full = plan_shape(shape(lora=False, zero_stage=2, world=1, resolution=512, batch=1, seq_len=77), dev, 80 * GiB)
    assert full.fits is False and "ZeRO-3 with CPU offload" in smallest_change(full)[0][-1]


def test_text_encoding_working_set(dev):
    (t5,) = [terms.text_encoding(shape(), dev)]
    (entry,) = [t for t in dev.text_encoders if t["label"] == "T5"]
    assert {k: entry[k] for k in ("width", "ff", "heads", "layers", "role")} == {
        "width": 4096, "ff": 10240, "heads": 64, "layers": 24, "role": "sequence"}
    assert t5.bytes == (64 * 512 ** 2 + 512 * (2 * 10240 + 4 * 4096)) * 2
    assert t5.bytes < terms.vae_encoding(shape(), dev).bytes  # at 512 px the VAE's maps are the larger transient


def test_text_encoders_go_to_the_host_only_when_they_do_not_fit(dev):
    roomy = plan_shape(shape(quant="nf4"), dev, 24 * GiB)
    assert roomy.summary["text_encoders_on"] == "device"
    assert "T5 text encoder (frozen)" in {i.name for i in roomy.phase("encode").items}
    tight = plan_shape(shape(quant="nf4"), dev, 8 * GiB)
    assert tight.summary["text_encoders_on"] == "host" and tight.shape.text_on_host
    encode = tight.phase("encode")
    assert not {i.name for i in encode.items} & {"T5 text encoder (frozen)", "CLIP text encoder (frozen)"}
    assert encode.host_bytes >= dev.params["text_encoder_2"] * 2
    cpu = plan_shape(shape(quant="nf4", device="cpu"), dev, 8 * GiB)
    assert cpu.summary["text_encoders_on"] == "device"  # a CPU device is the host already


# --------------------------------------------------------------- the FLUX family (read through fluxkit.families)

KLEIN4, KLEIN9, FLUX2 = "black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-9B", "black-forest-labs/FLUX.2-dev"


@pytest.fixture(scope="module")
def family_archs():
    return {m: read_architecture(m) for m in (KLEIN4, KLEIN9, FLUX2, "black-forest-labs/FLUX.1-Kontext-dev")}


def test_each_family_reads_its_own_components(family_archs, dev):
    """The published sizes, counted by the families' classes on the meta device: klein 4B and 9B with
    Qwen3-4B / Qwen3-8B (4.02B / 8.19B in transformers' class), FLUX.2 [dev] with a 24B Mistral3 (24.01B);
    of each, what prompts reach loads (fluxkit.families.prompt_encoders: no output head, no vision
    tower, 28 of Qwen3's 36 layers, 31 of Mistral3's 40); Kontext is FLUX.1-dev's."""
    from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM

    from fluxkit.plan.architecture import _on_meta
    from fluxkit.tiny.build import resolve_preset

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    full = _on_meta(Mistral3ForConditionalGeneration, resolve_preset("dev", "flux2").configs()["text_encoder"])
    assert count(full) == pytest.approx(24.01e9, rel=2e-3)
    unused = count(full.lm_head) + count(full.model.vision_tower) + count(full.model.multi_modal_projector)
    unread = sum(count(layer) for layer in full.model.language_model.layers[31:])
    assert family_archs[FLUX2].params["text_encoder"] == count(full) - unused - unread
    for model, preset, published in ((KLEIN4, "4b", 4.02e9), (KLEIN9, "9b", 8.19e9)):
        qwen = _on_meta(Qwen3ForCausalLM, resolve_preset(preset, "flux2-klein").configs()["text_encoder"])
        assert count(qwen) == pytest.approx(published, rel=2e-3)
        head = 0 if qwen.config.tie_word_embeddings else count(qwen.lm_head)  # 4B's is the embedding
        assert family_archs[model].params["text_encoder"] == count(qwen) - head - sum(count(b) for b in qwen.model.layers[28:])
    expect = {KLEIN4: ("flux2-klein", "Qwen3", 3.88e9, 3.22e9), KLEIN9: ("flux2-klein", "Qwen3", 9.08e9, 6.02e9),
              FLUX2: ("flux2", "Mistral3", 32.22e9, 17.90e9)}
    for model, (family, label, transformer, text) in expect.items():
        arch = family_archs[model]
        (t,) = arch.text_encoders
        assert (arch.family, t["label"], t["role"], t["keeps_hidden_states"]) == (family, label, "sequence", True), model
        assert arch.params["transformer"] == pytest.approx(transformer, rel=2e-3)
        assert t["params"] == arch.params["text_encoder"] == pytest.approx(text, rel=2e-3)
        assert arch.transformer["joint_attention_dim"] == 3 * t["width"]  # three hidden-state layers per token
    kontext = family_archs["black-forest-labs/FLUX.1-Kontext-dev"]
    assert kontext.family == "kontext" and kontext.params == dev.params
    # the weights the plan puts on the device name the family's encoders, never T5/CLIP for FLUX.2
    names = {i.name for i in terms.encoder_weights(shape(), family_archs[FLUX2])}
    assert names == {"VAE (frozen)", "Mistral3 text encoder (frozen)"}
    # FLUX.2's default LoRA targets are its script's (the fused single-block projections among them)
    assert "to_qkv_mlp_proj" in default_lora_targets(family_archs[KLEIN4])


def test_encoders_read_every_layer_for_flux2(family_archs):
    """FLUX.2's encoders return every built layer's hidden states (the pipelines read three of them): the
    working set adds (layers + 1) x tokens x width, of the 28 layers klein builds; Qwen3 really returns
    layers + 1 of them."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fluxkit.tiny.flux2 import KLEIN_PRESETS

    s, (t,) = shape(), family_archs[KLEIN4].text_encoders
    plain = dict(t, keeps_hidden_states=False)
    extra = terms.text_encoder_working_set(s, t) - terms.text_encoder_working_set(s, plain)
    assert t["layers"] == 28 and extra == (28 + 1) * 512 * 2560 * 2
    config = KLEIN_PRESETS["tiny"].text_encoder
    out = Qwen3ForCausalLM(Qwen3Config(**config))(torch.zeros(1, 8, dtype=torch.long), output_hidden_states=True)
    assert len(out.hidden_states) == config["num_hidden_layers"] + 1
    # the host holds every encoder while they load (all are read before the first moves to the device);
    # FLUX.2 [dev]'s Mistral3 without its unread output head, vision tower and layers (17.9B of its 24.0B)
    tight = plan_shape(shape(quant="nf4", resolution=1024), family_archs[FLUX2], 24 * GiB)
    assert tight.shape.text_on_host and tight.phase("encode").host_bytes > 17.9e9 * 2
    assert "Mistral3 text encoder (frozen)" not in {i.name for i in tight.phase("encode").items}


@pytest.mark.parametrize("family,preset", [("kontext", "tiny"), ("flux2-klein", "tiny")])
def test_reference_tokens_double_the_image_sequence(family, preset):
    """An editing pair's reference image enters the transformer as many tokens again as its target (the
    family's own packing), and the plan counts the same in activations and in the latent cache."""
    import types

    import torch

    from fluxkit.families import get

    fam = get(family)
    arch = read_architecture("", architecture=preset, family=family)
    s = shape(resolution=64, references=1, samples=3, prompts=1, batch=1)
    side = 64 // arch.vae_scale
    # the latents as the family's transformer_inputs takes them: FLUX.1's unpacked, FLUX.2's patchified 2x2
    packed = family != "kontext"
    latents = torch.zeros(1, arch.transformer["in_channels"] // (1 if packed else 4), side // (2 if packed else 1),
                          side // (2 if packed else 1))
    config = types.SimpleNamespace(**arch.transformer)
    seq = torch.zeros(1, 8, arch.transformer["joint_attention_dim"])
    pooled = torch.zeros(1, arch.transformer.get("pooled_projection_dim", 0))
    inputs = fam.transformer_inputs(latents, seq, pooled, latents.clone(), None, config)
    assert inputs["hidden_states"].shape[1] == terms.sequence_image_tokens(s, arch) == 2 * terms.image_tokens(s, arch)
    alone = dataclasses.replace(s, references=0)
    saved = lambda x: terms.activations(x, arch)[0].bytes  # noqa: E731
    double, single, outer = terms.ACTIVATION_CONSTANTS[(s.regime, s.mode, s.checkpointing)]
    d, t = arch.hidden, arch.transformer
    per_image_token = d * (t["num_layers"] * double + t["num_single_layers"] * single + outer)
    assert saved(s) - saved(alone) == pytest.approx(terms.image_tokens(s, arch) * per_image_token, abs=2)
    assert terms.caches(s, arch)[0].bytes == 2 * terms.caches(alone, arch)[0].bytes
