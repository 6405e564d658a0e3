"""Random FLUX.2 [klein] pipelines of a chosen size, offline (fluxkit.tiny builds FLUX.1 and Kontext).

A folder has Flux2KleinPipeline's layout (scheduler, vae: AutoencoderKLFlux2, text_encoder:
Qwen3ForCausalLM, tokenizer: a byte-level BPE trained here with a Qwen-style chat template,
transformer: Flux2Transformer2DModel), so the toolkit's trainers and inference scripts, and
diffusers' own klein pipeline and LoRA loader, run on it unchanged.

Shapes that must agree: the transformer's in_channels = 4 x the VAE's latent channels (latents
are patchified 2x2), joint_attention_dim = 3 x the text encoder's hidden size (three hidden-state
layers concatenated per token), sum(axes_dims_rope) = attention_head_dim (four rope axes), and
the text encoder has at least as many layers as the pipeline reads (9, 18, 27).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tiny_common import SCHEDULER_CONFIG, _corpus, _vae


@dataclass(frozen=True)
class Flux2Preset:
    name: str
    description: str
    transformer: dict
    vae: dict
    text_encoder: dict
    large: bool = False
    sample_resolution: int = 64


def _transformer(latent_channels, layers, single_layers, head_dim, heads, text_hidden, axes, guidance=False):
    assert sum(axes) == head_dim, "FLUX.2 needs sum(axes_dims_rope) == attention_head_dim"
    return dict(patch_size=1, in_channels=4 * latent_channels, num_layers=layers, num_single_layers=single_layers,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=3 * text_hidden,
                timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=list(axes), guidance_embeds=guidance)


def _qwen3(hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, tied=True):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=40960,
                rms_norm_eps=1e-6, tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def _flux2_vae(block_out_channels, latent_channels, groups, layers_per_block=1):
    vae = _vae(block_out_channels, latent_channels, groups, layers_per_block)
    for key in ("scaling_factor", "shift_factor", "force_upcast"):  # FLUX.2 normalises by batch-norm statistics instead
        vae.pop(key)
    return dict(vae, batch_norm_eps=1e-4, batch_norm_momentum=0.1, patch_size=[2, 2])


# The text encoder keeps 28 layers even when tiny: the pipeline reads hidden states 9, 18 and 27.
KLEIN_PRESETS = {
    "tiny": Flux2Preset(
        name="tiny", description="for tests: seconds to build; VAE downsamples 2x, 4 latent channels; 28-layer 16-wide Qwen3",
        transformer=_transformer(4, 1, 1, 16, 2, 16, (4, 4, 4, 4)),
        vae=_flux2_vae((8, 16), latent_channels=4, groups=8),
        text_encoder=_qwen3(16, 28, 2, 1, 8, 32, 1000), sample_resolution=32),
    "small": Flux2Preset(
        name="small", description="for CPU benchmarks: VAE downsamples 8x with 32 latent channels like FLUX.2's",
        transformer=_transformer(32, 2, 4, 64, 4, 64, (16, 16, 16, 16)),
        vae=_flux2_vae((32, 64, 64, 64), latent_channels=32, groups=32),
        text_encoder=_qwen3(64, 28, 4, 2, 16, 128, 1000), sample_resolution=256),
    # the published architectures (Qwen3-4B / Qwen3-8B text encoders), random weights: for the plan and GPUs
    "4b": Flux2Preset(
        name="4b", description="FLUX.2 [klein] 4B's architecture with random weights (needs --allow_large)",
        transformer=_transformer(32, 5, 20, 128, 24, 2560, (32, 32, 32, 32)),
        vae=_flux2_vae((128, 256, 512, 512), latent_channels=32, groups=32, layers_per_block=2),
        text_encoder=_qwen3(2560, 36, 32, 8, 128, 9728, 151936), large=True, sample_resolution=512),
    "9b": Flux2Preset(
        name="9b", description="FLUX.2 [klein] 9B's architecture with random weights (needs --allow_large)",
        transformer=_transformer(32, 8, 24, 128, 32, 4096, (32, 32, 32, 32)),
        vae=_flux2_vae((128, 256, 512, 512), latent_channels=32, groups=32, layers_per_block=2),
        text_encoder=_qwen3(4096, 36, 32, 8, 128, 12288, 151936, tied=False), large=True, sample_resolution=512),
}

# A Qwen-style chat template (user turns, then the assistant's opening with thinking switched off),
# written here: Flux2KleinPipeline formats every prompt through it.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def build_qwen_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE tokenizer with Qwen's special tokens and a chat template, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 1000), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, chat_template=CHAT_TEMPLATE, model_max_length=512)


def build_models(preset: Flux2Preset) -> dict:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return {"transformer": Flux2Transformer2DModel(**preset.transformer), "vae": AutoencoderKLFlux2(**preset.vae),
            "text_encoder": Qwen3ForCausalLM(Qwen3Config(**preset.text_encoder))}


def pipeline(preset: Flux2Preset, models: dict):
    """The Flux2KleinPipeline over `models` (a guidance-free base model: is_distilled False)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                              tokenizer=build_qwen_tokenizer(preset.text_encoder["vocab_size"]), **models)
