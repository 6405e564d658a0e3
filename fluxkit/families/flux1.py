"""FLUX.1 [dev]/[schnell]: CLIP's pooled embedding + T5's sequence, 2x2-packed latents, 3-axis ids."""

from __future__ import annotations

import torch

from .base import Family


class Flux1(Family):
    name = "flux1"
    pipeline_name = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    components = {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "vae": ("diffusers", "AutoencoderKL"),
        "tokenizer": ("transformers", "AutoTokenizer"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer_2": ("transformers", "AutoTokenizer"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
    }
    text_encoders = ("text_encoder", "text_encoder_2")
    trains_text_encoder = True
    text_encoder_labels = {"text_encoder": ("CLIP", "pooled"), "text_encoder_2": ("T5", "sequence")}
    trained_text_encoder = "text_encoder"
    hub_presets = {"black-forest-labs/FLUX.1-dev": "dev"}
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2", "proj_mlp", "proj_out")
    clip_lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")

    # ------------------------------------------------------------------ text

    @staticmethod
    def _clip_ids(m, prompts, device):
        return m.tokenizer(prompts, padding="max_length", max_length=m.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)

    def encode_prompts(self, m, prompts, args, device):
        pooled = m.text_encoder(self._clip_ids(m, prompts, device), output_hidden_states=False).pooler_output
        t5_ids = m.tokenizer_2(prompts, padding="max_length", max_length=args.max_sequence_length,
                               truncation=True, return_tensors="pt").input_ids.to(device)
        seq = m.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return seq, pooled

    def trained_pooled(self, m, text_encoder, prompts, device):
        return text_encoder(self._clip_ids(m, prompts, device)).pooler_output

    def validation_text(self, prompt, embeds, args):
        if embeds is None:
            return dict(prompt=prompt, max_sequence_length=args.max_sequence_length)
        return dict(prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], max_sequence_length=args.max_sequence_length)

    # ------------------------------------------------------------------ latents and tokens

    def latents(self, mean, logvar, vae):
        # sampled here (not inside the VAE) so cached and uncached runs draw the same random numbers
        x0 = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        return (x0 - vae.config.shift_factor) * vae.config.scaling_factor

    def reference_latents(self, mean, logvar, vae):
        return (mean - vae.config.shift_factor) * vae.config.scaling_factor

    @staticmethod
    def _tokens(latents, first_axis: int = 0):
        """(packed 2x2 patches (B, h*w/4, 4C), their ids (h*w/4, 3)); the ids' first axis tells images apart."""
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        if first_axis:
            ids[..., 0] = first_axis
        return FluxPipeline._pack_latents(latents, b, c, h, w), ids

    def transformer_inputs(self, noisy, seq, pooled, refs, guidance, config):
        tokens, img_ids = self._tokens(noisy)
        if refs is not None:  # Kontext: the reference image's tokens follow the noisy ones, ids marked 1
            ref_tokens, ref_ids = self._tokens(refs.to(noisy.dtype), first_axis=1)
            tokens, img_ids = torch.cat([tokens, ref_tokens], dim=1), torch.cat([img_ids, ref_ids], dim=0)
        dtype = noisy.dtype
        return dict(hidden_states=tokens, img_ids=img_ids, guidance=guidance, pooled_projections=pooled.to(dtype),
                    encoder_hidden_states=seq.to(dtype), txt_ids=torch.zeros(seq.shape[1], 3, device=noisy.device, dtype=dtype))

    def prediction(self, out, shape):
        from diffusers import FluxPipeline

        _, _, h, w = shape
        # height/width in latent cells with a scale factor of 1: the same reshape the pipeline does
        return FluxPipeline._unpack_latents(out[:, : (h // 2) * (w // 2)], height=h, width=w, vae_scale_factor=1)


FAMILY = Flux1()
