"""Random FLUX.2 pipelines of a chosen size, offline (fluxkit.tiny.build builds FLUX.1 and Kontext).

Two families share the transformer (Flux2Transformer2DModel), the VAE (AutoencoderKLFlux2) and the
scheduler, and differ in the text half:
- FLUX.2 [klein]: Flux2KleinPipeline's layout, text_encoder Qwen3ForCausalLM, tokenizer a
  byte-level BPE trained here with a Qwen-style chat template; no guidance embedding.
- FLUX.2 [dev]: Flux2Pipeline's layout, text_encoder Mistral3ForConditionalGeneration (a Mistral
  text model and a Pixtral vision tower), tokenizer a PixtralProcessor folder (model_index.json
  names PixtralProcessor, as FLUX.2-dev's does): a byte-level BPE with Mistral's special tokens, a
  Mistral-style chat template of ours in chat_template.jinja, and the processor and image-processor
  configs; a guidance embedding. Where torchvision is missing, fluxkit.families.pixtral_text
  loads that folder for text.
The toolkit's trainers and inference scripts, and diffusers' own pipelines and LoRA loaders, run
on them unchanged.

Shapes that must agree: the transformer's in_channels = 4 x the VAE's latent channels (latents
are patchified 2x2), joint_attention_dim = 3 x the text encoder's hidden size (three hidden-state
layers concatenated per token), sum(axes_dims_rope) = attention_head_dim (four rope axes), and
the text encoder has more layers than the highest hidden state the pipeline reads (klein 9, 18,
27; dev 10, 20, 30).
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import SCHEDULER_CONFIG, _corpus, _vae


@dataclass(frozen=True)
class Flux2Preset:
    name: str
    description: str
    transformer: dict
    vae: dict
    text_encoder: dict
    large: bool = False
    sample_resolution: int = 64
    family: str = "flux2-klein"  # fluxkit.families name: which text half and pipeline class

    def configs(self) -> dict:
        """{pipeline folder: config} of the components (what the memory plan counts)."""
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder}


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


# The text encoder has 30 layers even when tiny: the pipeline reads hidden states 9, 18 and 27, and
# the family builds it with 28 (fluxkit.families.prompt_encoders), so every tiny run leaves two unread.
KLEIN_PRESETS = {
    "tiny": Flux2Preset(
        name="tiny", description="for tests: seconds to build; VAE downsamples 2x, 4 latent channels; 30-layer 16-wide Qwen3",
        transformer=_transformer(4, 1, 1, 16, 2, 16, (4, 4, 4, 4)),
        vae=_flux2_vae((8, 16), latent_channels=4, groups=8),
        text_encoder=_qwen3(16, 30, 2, 1, 8, 32, 1000), sample_resolution=32),
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


# ------------------------------------------------------------------ FLUX.2 [dev]

# Mistral's control tokens, numbered so that [IMG] is Mistral3Config's image_token_index (10).
MISTRAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                  "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
                  "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]


def _pixtral(hidden, layers, heads, intermediate, patch, image_size):
    return dict(model_type="pixtral", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                head_dim=hidden // heads, intermediate_size=intermediate, patch_size=patch, image_size=image_size)


def _mistral3(hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, vision, tied=False):
    """Mistral3ForConditionalGeneration's config: a Mistral text model beside a Pixtral vision tower."""
    text = dict(model_type="mistral", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab,
                max_position_embeddings=131072, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "rope_theta": 1e9})
    return dict(text_config=text, vision_config=vision, image_token_index=MISTRAL_TOKENS.index("[IMG]"),
                spatial_merge_size=2, projector_hidden_act="gelu", multimodal_projector_bias=False, tie_word_embeddings=tied)


# The text model has 33 layers even when tiny: the pipeline reads hidden states 10, 20 and 30, and the
# family builds it with 31 so that 30 stays an intermediate layer's output (the last hidden state is
# normalised; fluxkit.families.prompt_encoders): every tiny run leaves two layers unread.
DEV_PRESETS = {
    "tiny": Flux2Preset(
        name="tiny", description="for tests: seconds to build; VAE downsamples 2x, 4 latent channels; 33-layer 16-wide Mistral3",
        transformer=_transformer(4, 1, 1, 16, 2, 16, (4, 4, 4, 4), guidance=True),
        vae=_flux2_vae((8, 16), latent_channels=4, groups=8),
        text_encoder=_mistral3(16, 33, 2, 1, 8, 32, 1000, _pixtral(16, 1, 2, 32, 4, 64)), sample_resolution=32, family="flux2"),
    "small": Flux2Preset(
        name="small", description="for CPU benchmarks: VAE downsamples 8x with 32 latent channels like FLUX.2's",
        transformer=_transformer(32, 2, 4, 64, 4, 64, (16, 16, 16, 16), guidance=True),
        vae=_flux2_vae((32, 64, 64, 64), latent_channels=32, groups=32),
        text_encoder=_mistral3(64, 31, 4, 2, 16, 128, 1000, _pixtral(32, 1, 2, 64, 8, 128)), sample_resolution=256,
        family="flux2"),
    # FLUX.2 [dev]'s published architecture (diffusers' Flux2Transformer2DModel defaults; a Mistral Small 3.x
    # 24B text encoder: transformers' Mistral3Config defaults, untied output embeddings), random weights
    "dev": Flux2Preset(
        name="dev", description="FLUX.2 [dev]'s architecture with random weights (needs --allow_large)",
        transformer=_transformer(32, 8, 48, 128, 48, 5120, (32, 32, 32, 32), guidance=True),
        vae=_flux2_vae((128, 256, 512, 512), latent_channels=32, groups=32, layers_per_block=2),
        text_encoder=_mistral3(5120, 40, 32, 8, 128, 32768, 131072, _pixtral(1024, 24, 16, 4096, 14, 1540)),
        large=True, sample_resolution=512, family="flux2"),
}

# A Mistral-style chat template of ours: BOS, the system turn in [SYSTEM_PROMPT] tags, user turns in
# [INST] tags (an image part becomes [IMG]), assistant turns closed by EOS. Message content is a string
# or a list of {"type": "text"|"image"} parts, as Flux2Pipeline's format_input builds it.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{% elif message['role'] == 'user' %}[INST]{% endif %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}[IMG]{% endif %}{% endfor %}"
    "{% if message['role'] == 'system' %}[/SYSTEM_PROMPT]{% elif message['role'] == 'user' %}[/INST]"
    "{% else %}{{ eos_token }}{% endif %}{% endfor %}"
)


def build_mistral_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE with Mistral's control tokens and MISTRAL_CHAT_TEMPLATE, trained offline on the
    sample corpus and Flux2Pipeline's system message (which then takes tens of tokens, not a hundred)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 1000), special_tokens=MISTRAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus() + [SYSTEM_MESSAGE] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=MISTRAL_CHAT_TEMPLATE, model_max_length=131072)


def build_pixtral_processor(preset: Flux2Preset):
    """The tokenizer folder's contents as a PixtralProcessor folder holds them (text half built here; the
    processor and image-processor configs are written for transformers' PixtralProcessor to load)."""
    from ..families.pixtral_text import IMAGE_PROCESSOR_CONFIG, PROCESSOR_CONFIG, PixtralTextProcessor

    vision = preset.text_encoder["vision_config"]
    patch, merge = vision["patch_size"], preset.text_encoder["spatial_merge_size"]
    processor = PixtralTextProcessor(build_mistral_tokenizer(preset.text_encoder["text_config"]["vocab_size"]),
                                     chat_template=MISTRAL_CHAT_TEMPLATE)
    processor.saved_configs[PROCESSOR_CONFIG] = {
        "processor_class": "PixtralProcessor", "patch_size": patch, "spatial_merge_size": merge,
        "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
    processor.saved_configs[IMAGE_PROCESSOR_CONFIG] = {  # Pixtral's (CLIP's) normalisation, the tower's patch
        "image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor",
        "do_resize": True, "size": {"longest_edge": vision["image_size"]}, "patch_size": patch, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    return processor


# ------------------------------------------------------------------ both

PRESETS_BY_FAMILY = {"flux2-klein": KLEIN_PRESETS, "flux2": DEV_PRESETS}


def build_models(preset: Flux2Preset) -> dict:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    if preset.family == "flux2":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(**preset.text_encoder))
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        text_encoder = Qwen3ForCausalLM(Qwen3Config(**preset.text_encoder))
    return {"transformer": Flux2Transformer2DModel(**preset.transformer), "vae": AutoencoderKLFlux2(**preset.vae),
            "text_encoder": text_encoder}


def pipeline(preset: Flux2Preset, models: dict):
    """The family's pipeline over `models`: klein as a guidance-free base model (is_distilled False);
    dev with a model_index.json that names PixtralProcessor for its tokenizer, as FLUX.2-dev's does."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    if preset.family == "flux2":
        pipe = Flux2Pipeline(scheduler=scheduler, tokenizer=build_pixtral_processor(preset), **models)
        pipe.register_to_config(tokenizer=("transformers", "PixtralProcessor"))
        return pipe
    return Flux2KleinPipeline(scheduler=scheduler, tokenizer=build_qwen_tokenizer(preset.text_encoder["vocab_size"]),
                              **models)
