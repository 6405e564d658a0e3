"""What every FLUX family answers (fluxkit.families): one `Family` instance per family module."""

from __future__ import annotations

import functools
import importlib
import json
import os

import torch


class Family:
    """One FLUX model family. Stateless: the run's models are passed in (m: fluxkit.training.models.Models)."""

    name = ""
    pipeline_name = ""  # the diffusers pipeline class (model_index.json's _class_name)
    transformer_class = ""
    # every component but the transformer: folder name -> (module, class) that loads it
    components: dict[str, tuple[str, str]] = {}
    text_encoders: tuple[str, ...] = ("text_encoder",)  # their outputs are what the text cache holds
    editing = False  # trains on (reference image, target, instruction) pairs
    min_reference_side = 0  # the pipeline refuses reference images with a smaller side (pixels)
    trains_text_encoder = False  # --train_text_encoder is supported
    lora_targets: tuple[str, ...] = ()  # see default_lora_targets
    # the defaults of diffusers' LoRA script for this family, shown by --help and the launchers
    defaults = {"resolution": 512, "max_sequence_length": 512, "guidance_scale": 3.5}
    # the family pipeline's own call defaults: what the inference scripts render with unless told
    inference_defaults = {"height": 1024, "width": 1024, "guidance_scale": 3.5, "max_sequence_length": 512}
    # the memory plan (fluxkit.plan): each text encoder's name there and its role ("pooled": a pooled
    # vector, "sequence": the per-token embeddings); the one --train_text_encoder trains
    text_encoder_labels: dict[str, tuple[str, str]] = {}
    trained_text_encoder: str | None = None
    encoding_keeps_hidden_states = False  # prompts are read at several layers: every layer's output is kept
    out_layers: tuple[int, ...] = ()  # the text encoder's hidden states prompts read (none: its last output)
    first_block_cache = True  # diffusers' FirstBlockCache hook runs on this family's transformer (inference)
    card_notes: tuple[str, ...] = ()  # comment lines after the model card's load line ({model}: the base model)
    hub_presets: dict[str, str] = {}  # hub ids whose architecture the plan knows without files -> preset
    # On a CPU device a run's first steps leave lasting allocations of the runtime itself (oneDNN's
    # kernel cache per op and shape, heap fragmentation) that do not grow with batch or resolution:
    # measured by bench's memory suite on the family's small preset (the rest of its batch-1 runs
    # after the plan's terms). FLUX.1 small: 40 MiB full fine-tune, 64 MiB LoRA (peft's adapters add
    # kernels of their own shapes).
    cpu_runtime_bytes = {"full": 40 * 2**20, "lora": 64 * 2**20}

    def check(self, args, model_dir: str | None = None) -> None:
        """Refuse flags this family cannot honour, before anything loads (model_dir: the local folder,
        whose config files the checks may read)."""
        from ..shared.errors import UserError

        from ..data.pairs import editing_requested

        self._check_out_layers(args.text_encoder_out_layers, model_dir)

        if editing_requested(args) and not self.editing:
            raise UserError(f"--cond_image_dir/--cond_image_column give editing pairs, but {self.name} trains "
                            "text-to-image only; use a Kontext or FLUX.2 model (a FLUX.1 folder trains Kontext with "
                            "--model_family kontext)")
        for flag in ("train_text_encoder", "train_text_encoder_ti"):
            if getattr(args, flag) and not self.trains_text_encoder:
                raise UserError(f"--{flag} trains FLUX.1's CLIP; {self.name} has no text encoder this toolkit "
                                "trains: drop the flag")

    def check_prompt_room(self, tokenizer, max_sequence_length: int) -> None:
        """Refuse a --max_sequence_length that leaves none of the prompt (FLUX.2's chat template); FLUX.1's T5
        reads the prompt from its first token: nothing to refuse."""

    def _check_out_layers(self, layers, model_dir: str | None) -> None:
        """--text_encoder_out_layers: only where prompts are read at hidden-state layers, and each one
        the stored text encoder has (hidden states 0..N of N layers; -N-1..-1 from the end)."""
        from ..shared.errors import UserError

        if not layers:
            return
        if not self.out_layers:
            raise UserError(f"--text_encoder_out_layers picks the hidden states FLUX.2's text encoder is read at; "
                            f"{self.name} reads its text encoders' final outputs: drop the flag")
        if model_dir is None:
            return
        with open(os.path.join(model_dir, self.text_encoders[0], "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        depth = config.get("text_config", config)["num_hidden_layers"]
        if not all(-depth - 1 <= k <= depth for k in layers):
            raise UserError(f"--text_encoder_out_layers {' '.join(map(str, layers))}: the text encoder has {depth} layers "
                            f"(hidden states 0..{depth}); give layers in that range ({self.name} reads "
                            f"{' '.join(map(str, self.out_layers))} by default)")

    # ------------------------------------------------------------------ components

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def component_class(self, name: str):
        module, cls = ("diffusers", self.transformer_class) if name == "transformer" else self.components[name]
        return getattr(importlib.import_module(module), cls)

    def load_component(self, name: str, model_dir: str, text_quantization: str = "none", dtype=None,
                       text_device="cpu", text_layers=None, **from_pretrained):
        """The folder's component `name` (from_pretrained's arguments besides subfolder in from_pretrained).
        A text encoder is built as text_encoder_config says for the hidden states prompts read
        (text_layers: --text_encoder_out_layers; None: the family's); with text_quantization nf4/int8
        (--text_encoder_quantization) it loads frozen, its nn.Linear weights quantized by bitsandbytes as
        they load, onto text_device, the rest in dtype."""
        from ..weights import quant

        cls = self.component_class(name)
        if name not in self.text_encoders:
            return cls.from_pretrained(model_dir, subfolder=name, **from_pretrained)
        if self.out_layers:
            hub = {k: v for k, v in from_pretrained.items() if k in ("revision", "local_files_only", "cache_dir", "token")}
            shorter = self.text_encoder_config(cls.config_class.from_pretrained(model_dir, subfolder=name, **hub).to_dict(),
                                               text_layers)
            if shorter is not None:
                from_pretrained["config"] = cls.config_class.from_dict(shorter)
        if quant.quantizes(text_quantization):
            return quant.load_text_encoder(cls, model_dir, text_quantization, dtype, text_device, subfolder=name,
                                           **from_pretrained)
        return cls.from_pretrained(model_dir, subfolder=name, **from_pretrained)

    def text_encoder_config(self, config: dict, text_layers=None) -> dict | None:
        """The config (a dict) a text encoder stored with `config` is built from, or None: as stored.
        Where prompts read hidden states (out_layers, or text_layers), the layers past the deepest read
        but one are left out (fluxkit.families.prompt_encoders); not where one is counted from the end."""
        layers = text_layers or self.out_layers
        if not layers or min(layers) < 0:
            return None
        from .prompt_encoders import keep_layers

        return keep_layers(config, max(layers) + 1)

    def default_lora_targets(self, config) -> list[str]:
        """The modules diffusers' LoRA script for this family adapts when --lora_layers is not given."""
        return list(self.lora_targets)

    def text_parts(self) -> tuple[str, ...]:
        """The folders whose contents decide a prompt's embedding (the text cache's identity), each
        text encoder followed by its tokenizer."""
        return tuple(p for enc in self.text_encoders for p in (enc, enc.replace("text_encoder", "tokenizer")))

    def load_pipeline(self, model_path, **kwargs):
        """The family's pipeline from a folder or hub id (kwargs: from_pretrained's)."""
        return self.pipeline_class().from_pretrained(model_path, **kwargs)

    def pipeline(self, m, transformer, text_encoder=None):
        """The family's pipeline over the run's live components (validation images)."""
        parts = {n: getattr(m, n) for n in self.components}
        if text_encoder is not None:
            parts["text_encoder"] = text_encoder
        return self.pipeline_class()(transformer=transformer, **parts)

    # ------------------------------------------------------------------ text

    def text_settings(self, args) -> tuple:
        """Settings besides the prompt and max_sequence_length that change its embedding (part of
        the text cache's identity): a quantized text encoder's, and the family's own."""
        from ..weights.quant import quantizes

        q = args.text_encoder_quantization
        return ("text_encoder_quantization", q) if quantizes(q) else ()

    def encode_prompts(self, m, prompts: list[str], args, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence embeddings (B, L, D), pooled embeddings (B, P); P is 0 where the family has none)."""
        raise NotImplementedError

    def trained_pooled(self, m, text_encoder, prompts: list[str], device) -> torch.Tensor:
        """Pooled embeddings from the text encoder that trains (with gradients)."""
        raise NotImplementedError(f"{self.name} does not train its text encoder")

    def validation_prompts(self, args) -> list[str]:
        """The prompts a validation render encodes: --validation_prompt (and the family pipeline's
        negative prompt); their embeddings come from the cache once the text encoders have left."""
        return [args.validation_prompt]

    def validation_text(self, prompt: str, embeds, args) -> dict:
        """The pipeline call's text arguments: the prompt, or the cached embeddings of
        validation_prompts (embeds: (sequences, pooled) stacked in that order) when the text
        encoders have left (embeds None: they are loaded)."""
        raise NotImplementedError

    def edit_call(self, image, height: int, width: int) -> dict:
        """The pipeline call's arguments for editing `image` into a height x width result."""
        return {"image": image}

    def render_call(self, image, height: int, width: int) -> dict:
        """The inference scripts' extra pipeline arguments: the edit of `image`, none without one."""
        return {} if image is None else self.edit_call(image, height, width)

    # ------------------------------------------------------------------ latents and tokens

    def latents(self, mean: torch.Tensor, logvar: torch.Tensor, vae) -> torch.Tensor:
        """The transformer's clean image latents x0 (B, C, H, W) from the VAE's moments."""
        raise NotImplementedError

    def reference_latents(self, mean: torch.Tensor, logvar: torch.Tensor, vae) -> torch.Tensor:
        """A reference image's latents (editing families): the distribution's mode, as the pipelines do."""
        raise NotImplementedError(f"{self.name} takes no reference image")

    def velocity(self, transformer, noisy, timesteps, prompt_embeds, pooled, cfg, refs=None) -> torch.Tensor:
        """The transformer's velocity for noisy latents (B, C, H, W), in their layout (fluxkit.training.loss's predict)."""
        from ..weights.lora import unwrap_model

        config = unwrap_model(transformer).config
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full((noisy.shape[0],), cfg.guidance_scale, device=noisy.device, dtype=noisy.dtype)
        inputs = self.transformer_inputs(noisy, prompt_embeds, pooled, refs, guidance, config)
        return self.prediction(transformer(timestep=timesteps / 1000, return_dict=False, **inputs)[0], noisy.shape)

    def predictor(self, refs=None):
        """fluxkit.training.loss's predict for a batch, its reference latents (or None) bound."""
        return self.velocity if refs is None else functools.partial(self.velocity, refs=refs)

    def transformer_inputs(self, noisy: torch.Tensor, seq: torch.Tensor, pooled: torch.Tensor, refs, guidance,
                           config) -> dict:
        """The transformer's keyword arguments for noisy latents (B, C, H, W) and the text; refs: the
        reference latents (B, C, h, w) appended as extra tokens, or None. guidance: (B,) or None."""
        raise NotImplementedError

    def prediction(self, out: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The transformer's output tokens back to latents of `shape` (reference tokens dropped)."""
        raise NotImplementedError

    def flop_parts(self):
        """The transformer's forward FLOP count (fluxkit.shared.flops: (config, image_tokens, text_tokens, batch) -> parts)."""
        from ..shared.flops import flux_forward_flop_parts

        return flux_forward_flop_parts
