"""A quantized frozen FLUX transformer (--base_quantization) for LoRA training and inference, and
quantized frozen text encoders (--text_encoder_quantization) for training and the cache fill.

    none  the weights in the run's dtype
    int8  torchao int8 weight-only (int8 weights, one scale per output row), via diffusers' TorchAoConfig
    nf4   bitsandbytes NF4 (4-bit weights, an absmax per 64), compute in the run's dtype
    fp8   torchao float8 (e4m3) weight-only; only on CUDA GPUs with compute capability 8.9 or newer

Only nn.Linear weights are quantized, as diffusers does; the frozen base stays quantized while peft
LoRA adapters train on top (peft has LoRA layers for torchao tensors and bitsandbytes' Linear4bit),
and the LoRA file is the same as over an unquantized base.

diffusers 0.42 quantizes NF4 through BitsAndBytesConfig only when a GPU is present (its quantizer
raises "No GPU found" otherwise), although bitsandbytes 0.50 quantizes and runs NF4 on a CPU. Off
CUDA the transformer is therefore loaded in the run's dtype and its nn.Linear layers are swapped for
bitsandbytes' Linear4bit here, which is what diffusers' quantizer builds on a GPU.

Text encoders (transformers models: CLIP, T5, Mistral3, Qwen3) are quantized by transformers'
own bitsandbytes quantizer (BitsAndBytesConfig), which runs on a CPU as on a GPU: nf4 (4-bit, an
fp32 absmax per 64 weights) or int8 (LLM.int8: int8 weights, an fp32 scale per output row). It
converts every nn.Linear but the output embeddings, tied weights and the model's fp32-only modules
(text_encoder_quantized_linears counts the same ones for the plan).
"""

from __future__ import annotations

import glob
import importlib.util
import os

from ..shared.errors import UserError

QUANTIZATIONS = ("none", "int8", "nf4", "fp8")
_LIBRARY = {"int8": "torchao", "fp8": "torchao", "nf4": "bitsandbytes"}  # versions: requirements_flux.txt
TEXT_ENCODER_QUANTIZATIONS = ("none", "nf4", "int8")  # bitsandbytes, through transformers
FP8_MIN_CAPABILITY = (8, 9)  # float8 matmul units: Ada (8.9) and Hopper (9.0) onwards


def quantizes(quantization: str | None) -> bool:
    """Whether a --base_quantization / --text_encoder_quantization value asks for quantized weights."""
    return quantization not in (None, "none")


def add_flag(group, what: str) -> None:
    """--base_quantization on a parser group; `what` says what it quantizes in that script."""
    group.add_argument("--base_quantization", default="none", choices=QUANTIZATIONS,
                       help=f"(ours) {what}: int8 (torchao), nf4 (bitsandbytes) or fp8 (torchao; CUDA compute "
                            "capability 8.9+); less memory, slower steps")


def add_text_encoder_flag(group, note: str = "") -> None:
    """--text_encoder_quantization on a parser group (trainers, the cache command, the inference
    scripts); `note` adds what it means in that script."""
    group.add_argument("--text_encoder_quantization", default="none", choices=TEXT_ENCODER_QUANTIZATIONS,
                       help="(ours) load the frozen text encoder(s) quantized by bitsandbytes as they load: nf4 (4-bit) "
                            "or int8 (LLM.int8). FLUX.2 [dev]'s 24B Mistral3 is 43 GiB in bf16, 13 GiB in nf4. Named "
                            "after --base_quantization, its values bitsandbytes' own; SimpleTuner calls it "
                            "--text_encoder_1_precision (nf4-bnb), diffusers' FLUX.2 scripts have none. Prompt "
                            "embeddings move a little (docs/memory.md)" + (f"; {note}" if note else ""))


def refuse_for_full_finetune(quantization: str) -> None:
    """A full fine-tune trains every weight: there is no frozen base to quantize."""
    if quantizes(quantization):
        raise UserError(f"--base_quantization {quantization} quantizes the frozen base of a LoRA run; a full fine-tune "
                        "trains every weight, so drop the flag or train LoRA")


def check(quantization: str, device_type: str, deepspeed: bool = False) -> None:
    """Refuse, before anything loads or is written, a quantization this host or launch cannot run."""
    if not quantizes(quantization):
        return
    if deepspeed and quantization in ("int8", "fp8"):
        # Tried with DeepSpeed 0.19 and torchao 0.18: the engine keeps weak references to every parameter
        # (deepspeed.utils.debug) and then calls module.to(device), which must swap torchao's
        # tensor-subclass weights; torch refuses to swap a tensor that has a weak reference.
        raise UserError(f"--base_quantization {quantization} cannot run under DeepSpeed: DeepSpeed holds weak references "
                        "to every parameter and then moves the model, which torch cannot do with torchao's quantized "
                        "weights; use --base_quantization nf4 with DeepSpeed, or launch without a DeepSpeed config")
    if quantization == "fp8" and not has_fp8(device_type):
        raise UserError(f"--base_quantization fp8 needs a CUDA GPU with compute capability "
                        f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper), and this run's "
                        f"device is {_describe(device_type)}; use --base_quantization int8 or nf4")
    library = _LIBRARY[quantization]
    if importlib.util.find_spec(library) is None:
        raise UserError(f"--base_quantization {quantization} needs {library}, which is not installed; "
                        f"pip install {library} (the versions this toolkit is tested with are in requirements_flux.txt)")


def refuse_trained_text_encoder(quantization: str, trains_text: bool) -> None:
    """A quantized text encoder is frozen: it cannot be the one --train_text_encoder(_ti) trains."""
    if quantizes(quantization) and trains_text:
        raise UserError(f"--text_encoder_quantization {quantization} loads the text encoders frozen and quantized, and "
                        "--train_text_encoder / --train_text_encoder_ti train one: drop one of the two")


def refuse_text_encoder_lora(quantization: str, lora_file: str, components) -> None:
    """diffusers loads a LoRA's text-encoder layers by casting the encoder (text_encoder.to(dtype=...)),
    which transformers refuses for a bitsandbytes model: refuse the pair before anything loads."""
    if quantizes(quantization) and "text_encoder" in components:
        raise UserError(f"--text_encoder_quantization {quantization} loads the text encoders quantized, and --lora_weights "
                        f"{lora_file!r} holds text-encoder layers (trained with --train_text_encoder), which diffusers "
                        "cannot load into a bitsandbytes-quantized encoder: drop --text_encoder_quantization")


def check_text_encoder(quantization: str, device_type: str) -> None:
    """Refuse, before anything loads or is written, a text-encoder quantization this host cannot run:
    bitsandbytes missing, or a device bitsandbytes has no backend for."""
    if not quantizes(quantization):
        return
    flag = f"--text_encoder_quantization {quantization}"
    if importlib.util.find_spec("bitsandbytes") is None:  # also None where sys.modules blocks the import
        raise UserError(f"{flag} needs bitsandbytes, which is not installed; pip install bitsandbytes (the version "
                        "this toolkit is tested with is in requirements_flux.txt), or drop the flag")
    if device_type == "npu":
        raise UserError(f"{flag}: bitsandbytes has no Ascend NPU backend; drop the flag (the memory plan encodes "
                        "prompts on the host CPU when the text encoder does not fit on the NPU)")


def libraries_not_needed(quantization: str, eight_bit_adam: bool, model_path: str,
                         text_quantization: str = "none") -> tuple[str, ...]:
    """The quantization libraries (bitsandbytes, torchao) a run with these settings never calls.
    diffusers, transformers and peft import both whenever they are installed (about 1 s for
    bitsandbytes on this CPU); a run that calls neither can skip that (host_runtime.leave_out).
    Kept: the library --base_quantization names, bitsandbytes for --use_8bit_adam and for
    --text_encoder_quantization, and both when the
    model is not a local folder or a component of it was saved quantized (its config.json names a
    quantization_config: loading it needs its library)."""
    if not os.path.isdir(model_path) or _saved_quantized(model_path):
        return ()
    needed = {_LIBRARY.get(quantization)} | ({"bitsandbytes"} if eight_bit_adam or quantizes(text_quantization)
                                            else set())
    return tuple(library for library in ("bitsandbytes", "torchao") if library not in needed)


def _saved_quantized(model_path: str) -> bool:
    for config in glob.glob(os.path.join(model_path, "*", "config.json")):
        with open(config, encoding="utf-8") as f:
            if '"quantization_config"' in f.read():
                return True
    return False


def has_fp8(device_type: str) -> bool:
    import torch

    return device_type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability() >= FP8_MIN_CAPABILITY


def _describe(device_type: str) -> str:
    import torch

    if device_type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"a CUDA GPU of capability {major}.{minor}"
    return device_type


def is_quantized(module) -> bool:
    return bool(getattr(module, "is_quantized", False))


def place(module, device=None, dtype=None) -> None:
    """Move a frozen encoder (None: nothing) to `device` and cast it to `dtype`; a quantized one keeps
    its dtypes (transformers refuses to cast a bitsandbytes model)."""
    if module is None:
        return
    if is_quantized(module):
        dtype = None
    if device is not None or dtype is not None:
        module.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})


def dtype_kwarg(dtype) -> dict:
    """from_pretrained's dtype argument: diffusers renamed torch_dtype to dtype (the old name warns);
    older releases only know torch_dtype."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def load_transformer(path: str, quantization: str, dtype: torch.dtype, device_type: str, model_class=None,
                     **from_pretrained):
    """The transformer (model_class: its family's, FluxTransformer2DModel by default) from `path` (a
    pipeline folder or hub id; subfolder= etc. in from_pretrained), its nn.Linear weights quantized
    as asked, everything else in `dtype`."""
    if model_class is None:
        from diffusers import FluxTransformer2DModel as model_class
    kwargs = dict(from_pretrained, **dtype_kwarg(dtype))
    if not quantizes(quantization):
        return model_class.from_pretrained(path, **kwargs)
    if quantization == "nf4" and device_type != "cuda":
        transformer = swap_in_nf4(model_class.from_pretrained(path, **kwargs), dtype)
    else:
        transformer = model_class.from_pretrained(path, quantization_config=diffusers_config(quantization, dtype),
                                                             **kwargs)
    if quantization == "nf4":
        reload_nf4_in_place(transformer)
    return transformer


def diffusers_config(quantization: str, dtype: torch.dtype):
    """The quantization_config diffusers' from_pretrained takes for this quantization."""
    if quantization == "nf4":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if quantization == "int8" else Float8WeightOnlyConfig())


def swap_in_nf4(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every nn.Linear of `model` (in place) by bitsandbytes' NF4 Linear4bit holding the same
    weights, quantized on the CPU, computing in `dtype`; marks the model the way diffusers marks a
    4-bit model (peft reads is_loaded_in_4bit to give those layers its 4-bit LoRA)."""
    import bitsandbytes as bnb
    import torch

    def quantized(linear: torch.nn.Linear) -> torch.nn.Module:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=dtype,
                                  compress_statistics=False, quant_type="nf4", quant_storage=torch.uint8, device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=False,
                                         quant_type="nf4", quant_storage=torch.uint8)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        # bitsandbytes' AVX512-bf16 CPU path repacks the weights in place on the first no-grad eval
        # forward (with a bf16 absmax: a validation render would change the base training then sees)
        # and fails for in_features that are not a multiple of 64; the plain NF4 kernel has neither problem
        layer.support_avx512bf16_for_cpu = False
        return layer.to(linear.weight.device)  # moving an unquantized Params4bit is what quantizes it

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, quantized(child))
    model.requires_grad_(False)
    model.is_quantized = True
    model.is_loaded_in_4bit = True
    return model


def reload_nf4_in_place(model) -> None:
    """Let load_state_dict take back the model's own state dict (a DeepSpeed checkpoint holds the whole
    module's): bitsandbytes writes each NF4 weight's quantization state (absmax, quant_map, ...) as
    extra keys beside it, which load_state_dict would reject as unexpected. The frozen base loads
    quantized the same way every time, so those keys are dropped and the packed weights copied."""
    import bitsandbytes as bnb

    def drop_quant_state(module, state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix + "weight.")]:
            del state_dict[key]

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module._register_load_state_dict_pre_hook(drop_quant_state, with_module=True)


# ------------------------------------------------------------------------------ text encoders

def text_encoder_config(quantization: str, dtype):
    """transformers' BitsAndBytesConfig for --text_encoder_quantization (single quantization of the
    absmax, as the NF4 transformer base has: the plan's bytes per weight)."""
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=False)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_text_encoder(model_class, path: str, quantization: str, dtype, device, **from_pretrained):
    """A frozen text encoder of `model_class` from `path` (subfolder= etc. in from_pretrained), its
    nn.Linear weights quantized by bitsandbytes as it loads, onto `device` tensor by tensor (the host
    never holds it whole in the compute dtype), everything else in `dtype`."""
    import torch

    model = model_class.from_pretrained(path, quantization_config=text_encoder_config(quantization, dtype),
                                        device_map={"": torch.device(device)}, **from_pretrained, **dtype_kwarg(dtype))
    keep_4bit_layout(model)
    return model.requires_grad_(False).eval()


def keep_4bit_layout(model) -> None:
    """bitsandbytes' AVX512-bf16 CPU path repacks 4-bit weights in place on the first no-grad forward
    and fails for in_features that are not a multiple of 64 (see swap_in_nf4): keep the plain kernel."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def text_encoder_quantized_linears(model) -> list[tuple[int, int]]:
    """(in, out) of each nn.Linear of a transformers model (on any device, meta included) that
    transformers' bitsandbytes quantizer converts: all but the modules it keeps (output embeddings,
    tied weights, the last module, _keep_in_fp32_modules), matched as it matches them."""
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = HfQuantizer.get_modules_to_not_convert(model, None, list(getattr(model, "_keep_in_fp32_modules", None) or []))
    return [(m.in_features, m.out_features) for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and should_convert_module(name, keep)]
