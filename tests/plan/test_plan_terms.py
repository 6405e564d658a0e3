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
    assert dev.text_encoder_shape == {"d_model": 4096, "d_ff": 10240, "num_heads": 64}
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
