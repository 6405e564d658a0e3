"""FLUX.2 [dev]: a Mistral3 text encoder read at hidden-state layers 10, 20, 30 (concatenated per
token) of a prompt rendered with a system message through its PixtralProcessor's chat template, a
32-channel VAE whose latents are patchified 2x2 to 128 channels and normalised by the VAE's
batch-norm statistics, 4-axis position ids (t, h, w, l), a guidance embedding, and reference
images as extra tokens at t = 10, 20, ... (the FLUX.2 pipelines take them for editing).

Where torchvision is missing, transformers cannot build the PixtralProcessor; the tokenizer folder
then loads as its text half (fluxkit.families.pixtral_text), which is all the prompt path uses."""

from __future__ import annotations

import torch

from .base import Family

REFERENCE_T_STEP = 10  # the pipelines' time-axis offset between the target and each reference image


class Flux2(Family):
    name = "flux2"
    pipeline_name = "Flux2Pipeline"
    transformer_class = "Flux2Transformer2DModel"
    components = {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "vae": ("diffusers", "AutoencoderKLFlux2"),
        "tokenizer": ("fluxkit.families.pixtral_text", "PromptProcessor"),  # PixtralProcessor, or its text half
        # without its output head, vision tower and the layers past those prompts read
        "text_encoder": ("fluxkit.families.prompt_encoders", "Mistral3PromptEncoder"),
    }
    editing = True
    text_encoder_labels = {"text_encoder": ("Mistral3", "sequence")}
    encoding_keeps_hidden_states = True  # read at layers 10, 20, 30: the model returns every layer's
    hub_presets = {"black-forest-labs/FLUX.2-dev": "dev"}
    # klein small, LoRA: 41 MiB (the rest of its batch-1 run, 256 px; batch 4 then within 1%); the
    # full fine-tune's is FLUX.1's, not measured for FLUX.2
    cpu_runtime_bytes = {"full": 40 * 2**20, "lora": 41 * 2**20}
    min_reference_side = 64  # Flux2Pipeline/Flux2KleinPipeline: "Both dimensions must be at least 64px"
    out_layers = (10, 20, 30)  # Flux2Pipeline's hidden_states_layers
    # diffusers 0.42's FirstBlockCache hook subtracts its head block's output from the next one's, and
    # Flux2Transformer2DModel's blocks return lists: TypeError at the first step
    first_block_cache = False
    card_notes = ("# where torchvision is missing, transformers cannot build the tokenizer folder's PixtralProcessor:",
                  "# pipe = fluxkit.families.get('flux2').load_pipeline({model!r}, torch_dtype=torch.bfloat16)")
    defaults = {"resolution": 512, "max_sequence_length": 512, "guidance_scale": 3.5}
    # Flux2Pipeline/Flux2KleinPipeline default to 4.0 (classifier-free guidance for klein)
    inference_defaults = {"height": 1024, "width": 1024, "guidance_scale": 4.0, "max_sequence_length": 512}

    def default_lora_targets(self, config) -> list[str]:
        # the double blocks' attention, and the single blocks' fused projections (their to_out by
        # index: the double blocks' to_out is a ModuleList peft cannot adapt)
        return ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj"] + [
            f"single_transformer_blocks.{i}.attn.to_out" for i in range(config.num_single_layers)]

    # ------------------------------------------------------------------ text

    def check(self, args, model_dir: str | None = None) -> None:
        super().check(args, model_dir)
        if model_dir is not None:
            tokenizer = self.component_class("tokenizer").from_pretrained(model_dir, subfolder="tokenizer")
            self.check_prompt_room(tokenizer, args.max_sequence_length)

    def check_prompt_room(self, tokenizer, max_sequence_length: int) -> None:
        """The chat template puts tokens before the prompt (FLUX.2 [dev]'s system message among them) and the
        sequence is cut from the end, so a length at or below them silently keeps none of the prompt."""
        from types import SimpleNamespace

        from ..shared.errors import UserError

        def tokens(prompt):
            batch = self._token_batch(SimpleNamespace(tokenizer=tokenizer), [prompt], 512)
            return batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()

        empty, marked = tokens(""), tokens("x")
        before = next((i for i, (a, b) in enumerate(zip(empty, marked)) if a != b), len(empty))
        if max_sequence_length <= before:
            raise UserError(f"--max_sequence_length {max_sequence_length} keeps none of the prompt: {self.name}'s chat "
                            f"template puts {before} tokens before it and the sequence is cut from the end; give more "
                            f"than {before}, e.g. 512")

    def layers(self, args) -> tuple[int, ...]:
        return tuple(args.text_encoder_out_layers or self.out_layers)

    def text_settings(self, args) -> tuple:
        return super().text_settings(args) + ("out_layers", *self.layers(args))

    def _token_batch(self, m, prompts, max_length):
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        return m.tokenizer.apply_chat_template(format_input(prompts=prompts), add_generation_prompt=False, tokenize=True,
                                               return_dict=True, return_tensors="pt", padding="max_length",
                                               truncation=True, max_length=max_length)

    def encode_prompts(self, m, prompts, args, device):
        inputs = self._token_batch(m, prompts, args.max_sequence_length)
        out = m.text_encoder(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
                             output_hidden_states=True, use_cache=False)
        # (B, layers, L, D); Family.check refused layers the text encoder does not have
        hidden = torch.stack([out.hidden_states[k] for k in self.layers(args)], dim=1)
        b, n, length, d = hidden.shape
        seq = hidden.permute(0, 2, 1, 3).reshape(b, length, n * d)
        return seq, seq.new_zeros(b, 0)  # no pooled embedding: an empty one keeps the cache's pairs

    def validation_text(self, prompt, embeds, args):
        text = dict(max_sequence_length=args.max_sequence_length, text_encoder_out_layers=self.layers(args))
        if embeds is None:
            return dict(prompt=prompt, **text)
        return dict(prompt_embeds=embeds[0][:1], **text)  # guidance-distilled: no negative prompt

    # ------------------------------------------------------------------ pipeline

    def load_pipeline(self, model_path, **kwargs):
        from .pixtral_text import torchvision_available

        if torchvision_available() or "tokenizer" in kwargs:
            return super().load_pipeline(model_path, **kwargs)
        # model_index.json names PixtralProcessor, which diffusers cannot load (or check a passed one against)
        # without torchvision: load the rest, then attach the processor's text half under the folder's name
        pipe = super().load_pipeline(model_path, tokenizer=None, **kwargs)
        local = {k: kwargs[k] for k in ("local_files_only", "revision", "cache_dir", "token") if k in kwargs}
        pipe.register_modules(tokenizer=self.component_class("tokenizer").from_pretrained(model_path, subfolder="tokenizer",
                                                                                           **local))
        pipe.register_to_config(tokenizer=("transformers", "PixtralProcessor"))
        return pipe

    # ------------------------------------------------------------------ latents and tokens

    @staticmethod
    def _normalise(latents, vae):
        from diffusers import Flux2Pipeline

        patches = Flux2Pipeline._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches.device, patches.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patches.device, patches.dtype)
        return (patches - mean) / std

    def latents(self, mean, logvar, vae):
        # the FLUX.2 scripts train on the distribution's mode, patchified and normalised as the pipeline does
        return self._normalise(mean, vae)

    def reference_latents(self, mean, logvar, vae):
        return self._normalise(mean, vae)

    @staticmethod
    def _ids(latents, t: int):
        b, _, h, w = latents.shape
        axes = (torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))
        return torch.cartesian_prod(*axes).to(latents.device).unsqueeze(0).expand(b, -1, -1)

    @staticmethod
    def _pack(latents):
        b, c, h, w = latents.shape
        return latents.reshape(b, c, h * w).permute(0, 2, 1)

    def transformer_inputs(self, noisy, seq, pooled, refs, guidance, config):
        tokens, img_ids = self._pack(noisy), self._ids(noisy, 0)
        if refs is not None:
            tokens = torch.cat([tokens, self._pack(refs.to(noisy.dtype))], dim=1)
            img_ids = torch.cat([img_ids, self._ids(refs, REFERENCE_T_STEP)], dim=1)
        b, length = seq.shape[:2]
        txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
        return dict(hidden_states=tokens, img_ids=img_ids, guidance=guidance if config.guidance_embeds else None,
                    encoder_hidden_states=seq.to(noisy.dtype), txt_ids=txt_ids.to(noisy.device).unsqueeze(0).expand(b, -1, -1))

    def prediction(self, out, shape):
        b, c, h, w = shape
        return out[:, : h * w].permute(0, 2, 1).reshape(b, c, h, w)

    def flop_parts(self):
        from ..shared.flops import flux2_forward_flop_parts

        return flux2_forward_flop_parts


FAMILY = Flux2()
