"""The FLUX models of a training run and what trains in them.

`resolve_model_dir` finds the pipeline folder (downloading a hub id unless offline), `load_models`
loads its components as its family names them (fluxkit.families), `setup_trainables` decides what trains (the whole transformer, or LoRA
adapters; optionally CLIP) and in which dtype, and `build_optimizer` builds AdamW, 8-bit AdamW or
Prodigy over those parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .. import families
from ..weights import quant
from ..shared.environment import check_pipeline_folder, hf_offline, is_hub_id
from ..shared.errors import UserError

@dataclass
class Models:
    """The run's components; those its family does not have (FLUX.2's second text encoder) are None."""
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    transformer: torch.nn.Module
    scheduler: object
    model_dir: str
    family: families.Family = families.get("flux1")

    def text_encoders_loaded(self) -> bool:
        """Whether every text encoder of the family is here (else prompts come from the cache)."""
        return all(getattr(self, n) is not None for n in self.family.text_encoders)


def resolve_model_dir(args) -> str:
    """A local folder for --pretrained_model_name_or_path, checked component by component."""
    path = args.pretrained_model_name_or_path
    if not os.path.isdir(path):
        if not is_hub_id(path):
            raise UserError(f"--pretrained_model_name_or_path {path!r} is not a FLUX pipeline folder; "
                            "give a local folder (make_tiny_flux.py builds one) or a hub id like black-forest-labs/FLUX.1-dev")
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=args.revision, cache_dir=args.cache_dir, local_files_only=hf_offline())
        except Exception as err:
            raise UserError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} could not be "
                            f"downloaded ({type(err).__name__}); download it first or give a local folder") from None
    return check_pipeline_folder(path, "--pretrained_model_name_or_path")


def load_models(args, model_dir: str, without: tuple[str, ...] = (), weight_dtype: torch.dtype = torch.float32,
                device_type: str = "cpu", deepspeed: bool = False, text_device="cpu") -> Models:
    """The pipeline's components, loaded by the classes its family names (fluxkit.families); those
    named in `without` (e.g. text encoders whose every output is cached, or the transformer while the
    cache fills: see train.prepare_models) are not loaded and are None; so are those the family does
    not have. The transformer comes as load_transformer gives it; text encoders quantized as
    --text_encoder_quantization asks land on text_device as they load (the others on the host)."""
    family = families.of_args(args, model_dir)

    def load(name):
        if name in without or name not in family.components:
            return None
        kw = {} if name.startswith(("tokenizer", "scheduler")) else dict(variant=args.variant)
        return family.load_component(name, model_dir, args.text_encoder_quantization, weight_dtype, text_device,
                                     text_layers=args.text_encoder_out_layers, revision=args.revision, local_files_only=True,
                                     **kw)

    try:
        models = Models(**{n: load(n) for n in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae")},
                        transformer=None, scheduler=load("scheduler"), model_dir=model_dir, family=family)
        if "transformer" not in without:
            models.transformer = load_transformer(args, model_dir, weight_dtype, device_type, deepspeed)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the {family.name} pipeline from {model_dir!r}: {str(err).splitlines()[0][:300]}") from None
    return models


def transformer_load_dtype(args, weight_dtype: torch.dtype, deepspeed: bool) -> torch.dtype:
    """The dtype the transformer is read in. Every weight a run keeps in the compute dtype is read in
    it (a bf16 file such as FLUX.1-dev's is then never widened to fp32 in host memory: half the
    bytes per process): a LoRA base (frozen), and a full fine-tune under DeepSpeed, whose engine
    casts the module to the compute dtype and builds its fp32 masters from those weights. Only a
    full fine-tune outside DeepSpeed keeps fp32 master weights in the module: read in fp32."""
    if args.lora or deepspeed:
        return weight_dtype
    return torch.float32


def load_transformer(args, model_dir: str, weight_dtype: torch.dtype, device_type: str = "cpu",
                     deepspeed: bool = False) -> torch.nn.Module:
    """The FLUX transformer, quantized as --base_quantization asks (fluxkit.weights.quant), in
    transformer_load_dtype. A quantized base on CUDA lands on the device as it loads."""
    try:
        return quant.load_transformer(model_dir, args.base_quantization,
                                      transformer_load_dtype(args, weight_dtype, deepspeed), device_type,
                                      subfolder="transformer", variant=args.variant, revision=args.revision,
                                      local_files_only=True,
                                      model_class=families.of_args(args, model_dir).component_class("transformer"))
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the FLUX transformer from {model_dir!r}: {str(err).splitlines()[0][:300]}") from None


def freeze_encoders(args, m: Models, weight_dtype: torch.dtype) -> None:
    """The VAE and the text encoders frozen, in the compute dtype (CLIP stays fp32 when it trains; a
    quantized text encoder was loaded in it)."""
    for module in (m.vae, m.text_encoder_2, m.text_encoder):
        if module is not None:
            module.requires_grad_(False)
    for module in (m.vae, m.text_encoder_2, None if args.train_text_encoder else m.text_encoder):
        quant.place(module, dtype=weight_dtype)


@dataclass
class Trainables:
    """What trains: the whole transformer (full) or LoRA adapters; optionally the CLIP text encoder."""
    transformer_params: list
    text_encoder_params: list = field(default_factory=list)

    @property
    def all(self) -> list:
        return self.transformer_params + self.text_encoder_params


def setup_trainables(args, m: Models, weight_dtype: torch.dtype) -> Trainables:
    from diffusers.training_utils import cast_training_params

    freeze_encoders(args, m, weight_dtype)  # text encoders are None once the cache holds all they would make
    m.transformer.requires_grad_(False)
    # Frozen parts run in the compute dtype; trained full weights stay fp32 (masters for mixed precision).
    if args.lora:
        from peft import LoraConfig

        targets = [t.strip() for t in args.lora_layers.split(",") if t.strip()] if args.lora_layers \
            else m.family.default_lora_targets(m.transformer.config)
        if not quant.is_quantized(m.transformer):  # a quantized base was loaded in weight_dtype
            m.transformer.to(dtype=weight_dtype)
        try:
            m.transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                 init_lora_weights="gaussian", target_modules=targets))
            found = [n for n, p in m.transformer.named_parameters() if "lora" in n]
        except ValueError:  # peft's NoMatchingPeftModuleError: no module has any of these names
            found = []
        if not found:
            raise UserError(f"--lora_layers {args.lora_layers!r} matched no module of the transformer; "
                            "use names like attn.to_q,attn.to_k,attn.to_v,attn.to_out.0")
        cast_training_params(m.transformer, dtype=torch.float32)
        t_params = [p for p in m.transformer.parameters() if p.requires_grad]
        te_params = []
        if args.train_text_encoder:
            m.text_encoder.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                  init_lora_weights="gaussian", target_modules=list(m.family.clip_lora_targets)))
            cast_training_params(m.text_encoder, dtype=torch.float32)
            te_params = [p for p in m.text_encoder.parameters() if p.requires_grad]
        return Trainables(t_params, te_params)
    m.transformer.requires_grad_(True)
    te_params = []
    if args.train_text_encoder:
        m.text_encoder.requires_grad_(True)
        te_params = list(m.text_encoder.parameters())
    return Trainables(list(m.transformer.parameters()), te_params)


def build_optimizer(args, t: Trainables, lr: float, fused: bool = False):
    """AdamW, 8-bit AdamW or prodigy over what trains; fused: torch's fused AdamW kernel (the step that
    runs on the host under ZeRO offload, fluxkit.weights.zero3.host_optimizer)."""
    groups = [{"params": t.transformer_params, "lr": lr}] if t.transformer_params else []  # none: textual inversion only
    if t.text_encoder_params:
        groups.append({"params": t.text_encoder_params, "lr": args.text_encoder_lr if args.lora else lr,
                       "weight_decay": args.adam_weight_decay_text_encoder})
    if args.optimizer.lower() == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2), beta3=args.prodigy_beta3,
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, decouple=args.prodigy_decouple,
                                  use_bias_correction=args.prodigy_use_bias_correction,
                                  safeguard_warmup=args.prodigy_safeguard_warmup)
    kwargs = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs, **({"fused": True} if fused else {}))
