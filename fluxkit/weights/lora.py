"""LoRA weights in and out of peft-wrapped FLUX models, in diffusers' FLUX LoRA file format.

The file is OUTPUT_DIR/pytorch_lora_weights.safetensors. Its keys are the peft adapter keys
prefixed with the component name ("transformer." / "text_encoder."), and its safetensors
metadata carries each component's LoraConfig under "lora_adapter_metadata" (keys prefixed the
same way), so `FluxPipeline.load_lora_weights` rebuilds the adapter with the trained rank and
alpha instead of guessing alpha = rank from the tensor shapes.

Everything here works on a live training model without touching it: weights are copied and
cast, never cast in place (the reference's checkpoint hook upcast the live model to fp32).

Both directions live here, as in diffusers' loaders: saving and resuming a training adapter
(save_lora / load_lora and the accelerate hooks), and, for inference, finding a LoRA file,
refusing pickles, checking that it was made for this model and attaching it to a pipeline
(resolve_lora_file / read_lora_shapes / attach_lora).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings

import torch

from ..shared.device import is_deepspeed
from ..shared.errors import UserError
from ..shared.fsio import atomic_write_bytes
from .zero3 import gathered_parameters

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# diffusers' key for adapter configs in the safetensors header (diffusers.loaders.lora_base).
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("transformer", "text_encoder")
ADAPTER = "fluxkit_lora"  # adapter name inference gives a loaded LoRA, so we can find exactly its layers
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def unwrap_model(model):
    """The bare model under DeepSpeed's engine, DDP/DataParallel and torch.compile wrappers.

    Wrappers have no `.config`/`.dtype` and prefix state-dict keys with "module." (or
    "_orig_mod."), so everything that reads or writes weights goes through here first.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and _is_parallel_wrapper(model):
            inner = model.module
        if inner is None:
            return model
        model = inner


def _is_parallel_wrapper(model) -> bool:
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return True
    # DeepSpeed is imported only if the script already did: it is slow to import and optional.
    import sys

    ds = sys.modules.get("deepspeed")
    engine = getattr(ds, "DeepSpeedEngine", None) if ds is not None else None
    return engine is not None and isinstance(model, engine)


def _peft_target(model):
    """(module holding the adapter, its LoraConfig) or (None, None) when there is no adapter.

    A PeftModel (get_peft_model) is reduced to its base model so keys lose "base_model.model.";
    models wrapped with `add_adapter` carry `peft_config` themselves.
    """
    model = unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        model = get_base()
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None, None
    if "default" not in configs:
        raise UserError(f"{type(model).__name__} has LoRA adapters {sorted(configs)} but none named 'default'; "
                        "train with the default adapter name")
    return model, configs["default"]


def has_lora(model) -> bool:
    return model is not None and _peft_target(model)[0] is not None


def lora_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A detached copy of the model's adapter weights (keys without wrapper prefixes), cast to dtype."""
    from peft.utils import get_peft_model_state_dict

    target, _ = _peft_target(model)
    if target is None:
        raise UserError(f"{type(unwrap_model(model)).__name__} has no LoRA adapter to save; add one before training")
    state = get_peft_model_state_dict(target)
    # .clone() also on the no-cast path: the copy must not alias live parameters.
    return {k: v.detach().to(dtype=dtype or v.dtype).clone().contiguous().cpu() for k, v in state.items()}


def _config_metadata(config) -> dict:
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def save_lora(output_dir: str, transformer=None, text_encoder=None, dtype: torch.dtype | None = None) -> str:
    """Write output_dir/pytorch_lora_weights.safetensors and return its path.

    Models without an adapter are skipped (a frozen text encoder may be passed as is). The file
    appears complete or not at all: it is written beside its final name and renamed.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, object] = {}
    for prefix, model in zip(COMPONENTS, (transformer, text_encoder)):
        if model is None or not has_lora(model):
            continue
        tensors.update({f"{prefix}.{k}": v for k, v in lora_state_dict(model, dtype).items()})
        _, config = _peft_target(model)
        metadata.update({f"{prefix}.{k}": v for k, v in _config_metadata(config).items()})
    if not tensors:
        raise UserError("no LoRA adapter found on the transformer or the text encoder; nothing to save")

    os.makedirs(output_dir, exist_ok=True)
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True, default=str)}
    return atomic_write_bytes(os.path.join(output_dir, LORA_WEIGHT_NAME), save(tensors, metadata=header))


def save_lora_gathered(output_dir: str, main: bool, transformer=None, text_encoder=None,
                       dtype: torch.dtype | None = None) -> None:
    """save_lora on the main process, with the adapter weights gathered first when ZeRO-3 shards
    them. Every rank must call it (the gather is a collective); only the main process writes."""
    adapters = [p for m in (transformer, text_encoder) if m is not None
                for name, p in unwrap_model(m).named_parameters() if "lora_" in name]
    with gathered_parameters(adapters):
        if main:
            save_lora(output_dir, transformer, text_encoder, dtype)


def read_lora(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter metadata) of a LoRA file or of the folder holding one."""
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        path = os.path.join(path, LORA_WEIGHT_NAME)
    if not os.path.isfile(path):
        raise UserError(f"LoRA weights {path!r} not found; point at a folder holding {LORA_WEIGHT_NAME} "
                        "(a training output_dir or checkpoint-STEP)")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"LoRA weights {path!r} cannot be read as safetensors ({err}); re-save them with this toolkit") from err
    raw = header.get(METADATA_KEY)
    return tensors, (json.loads(raw) if raw else {})


def load_lora(input_dir: str, transformer, text_encoder=None) -> None:
    """Load a file written by save_lora back into models that already carry the same adapter."""
    from peft.utils import set_peft_model_state_dict

    tensors, metadata = read_lora(input_dir)
    for prefix, model in zip(COMPONENTS, (transformer, text_encoder)):
        if model is None or not has_lora(model):
            continue
        target, config = _peft_target(model)
        state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if not state:
            raise UserError(f"{input_dir!r} holds no {prefix} LoRA weights but the {prefix} has an adapter; "
                            f"resume with the same --train_text_encoder / --lora_layers as the run that wrote it")
        for field in ("r", "lora_alpha"):
            saved = metadata.get(f"{prefix}.{field}")
            if saved is not None and saved != getattr(config, field):
                raise UserError(f"{input_dir!r} was trained with {prefix} {field}={saved} but the model has "
                                f"{field}={getattr(config, field)}; pass the same --rank/--lora_alpha as that run")
        result = set_peft_model_state_dict(target, state)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]  # adapters the file did not restore
        if unexpected or missing:
            which = f"LoRA weights the model lacks (e.g. {unexpected[0]})" if unexpected else \
                f"no weights for some of the model's {prefix} LoRA layers (e.g. {missing[0]})"
            raise UserError(f"{input_dir!r} has {which}; resume with the same --lora_layers as the run that wrote it")


# ---------------------------------------------------------------- reading a LoRA into a pipeline (inference)

def resolve_lora_file(path: str) -> str:
    """The one .safetensors file to load; pickle formats are refused without being opened."""
    if not os.path.exists(path):
        raise UserError(f"--lora_weights {path!r} does not exist; pass the LoRA trainer's output folder or its {LORA_WEIGHT_NAME}")
    if os.path.isdir(path):
        preferred = os.path.join(path, LORA_WEIGHT_NAME)
        if os.path.isfile(preferred):
            return preferred
        names = sorted(os.listdir(path))
        found = [n for n in names if n.endswith(".safetensors")]
        if len(found) == 1:
            return os.path.join(path, found[0])
        if len(found) > 1:
            raise UserError(f"--lora_weights folder {path!r} holds several .safetensors files ({', '.join(found)}); pass the file itself")
        pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise UserError(f"--lora_weights folder {path!r} holds only pickle weights ({', '.join(pickled)}), which are refused "
                            f"because loading them can run code; convert them to .safetensors")
        raise UserError(f"--lora_weights folder {path!r} holds no {LORA_WEIGHT_NAME} (no .safetensors file at all)")
    if path.endswith(PICKLE_SUFFIXES):
        raise UserError(f"--lora_weights {path!r} is a pickle file, refused because loading it can run code; "
                        f"convert it to .safetensors (safetensors.torch.save_file) or pass the trainer's {LORA_WEIGHT_NAME}")
    if not path.endswith(".safetensors"):
        raise UserError(f"--lora_weights {path!r} is not a .safetensors file; pass a .safetensors LoRA or its folder")
    return path


def read_lora_shapes(path: str) -> dict:
    """Tensor name -> shape, read from the safetensors header only (no tensor data, no pickle)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for any malformed header
        raise UserError(f"--lora_weights {path!r} is not a valid safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not any("lora" in k for k in shapes):
        raise UserError(f"--lora_weights {path!r} holds no LoRA tensors (no tensor name contains 'lora'); is it a full model checkpoint?")
    return shapes


# diffusers' FLUX LoRA format: <component>.<module path>.lora_A.weight / .lora_B.weight
_DIFFUSERS_LORA_KEY = re.compile(r"^(transformer|text_encoder)\.(.+)\.lora_([AB])\.weight$")


def _expected_lora_layers(shapes: dict) -> dict:
    """component -> {module path: {"A": shape, "B": shape}} for keys in diffusers' format."""
    layers: dict = {}
    for key, shape in shapes.items():
        m = _DIFFUSERS_LORA_KEY.match(key)
        if m:
            layers.setdefault(m.group(1), {}).setdefault(m.group(2), {})[m.group(3)] = shape
    return layers


def lora_components(path: str) -> set[str]:
    """The pipeline components (transformer, text_encoder) a LoRA file has layers for."""
    return set(_expected_lora_layers(read_lora_shapes(path)))


def _check_lora_fits(pipe, path: str, expected: dict) -> None:
    """Every LoRA layer on an existing Linear must match its size: diffusers would otherwise widen
    the model's layers to fit a LoRA made for a bigger model. Unknown layers are caught by the
    count of attached layers after loading."""
    import torch

    for component, layers in expected.items():
        model = getattr(pipe, component, None)
        for module_path, ab in sorted(layers.items()):
            try:
                module = model.get_submodule(module_path)
            except AttributeError:
                continue  # diffusers may rename it (e.g. older CLIP layouts); the count after loading decides
            if not isinstance(module, torch.nn.Linear) or "A" not in ab or "B" not in ab:
                continue
            rank_in, rank_out = ab["A"][-1], ab["B"][0]
            if (rank_in, rank_out) != (module.in_features, module.out_features):
                raise UserError(f"--lora_weights {path!r} was made for another model size: {component}.{module_path} is "
                                f"{module.in_features}->{module.out_features} here but {rank_in}->{rank_out} in the LoRA; "
                                f"use a LoRA trained on this base model")


def count_attached_layers(model) -> int:
    """Layers of `model` that carry our adapter."""
    if model is None:
        return 0
    return sum(1 for m in model.modules() if ADAPTER in (getattr(m, "lora_A", None) or {}))


# where diffusers and peft report LoRA keys that found no layer (and call it ignorable)
_KEY_WARNING_LOGGERS = ("diffusers.utils.peft_utils",)  # peft says it with warnings.warn


@contextlib.contextmanager
def _held_key_warnings():
    """Hold back what diffusers and peft say about unmatched LoRA keys while a LoRA loads: shown
    after a load that passes our checks, dropped when a check refuses the file (the one error line
    says it better, and they call the mismatch ignorable)."""
    records: list[logging.LogRecord] = []

    class Hold(logging.Filter):
        def filter(self, record):
            records.append(record)
            return False

    hold = Hold()
    loggers = [logging.getLogger(name) for name in _KEY_WARNING_LOGGERS]
    for logger in loggers:
        logger.addFilter(hold)
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(hold)
    for record in records:
        logging.getLogger(record.name).handle(record)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _load_checked(pipe, path: str, shapes: dict, expected: dict) -> dict:
    """Load the file as the ADAPTER and count where it attached; a UserError unless all of it did."""
    try:
        pipe.load_lora_weights(os.path.dirname(os.path.abspath(path)), weight_name=os.path.basename(path),
                               adapter_name=ADAPTER, use_safetensors=True, local_files_only=True)
    except (ValueError, RuntimeError, KeyError, OSError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--lora_weights {path!r} does not fit this FLUX pipeline: {first_line}") from None
    attached = {c: count_attached_layers(getattr(pipe, c, None)) for c in ("transformer", "text_encoder")}
    if not any(attached.values()):
        raise UserError(f"--lora_weights {path!r} attached to no layer of this FLUX pipeline (its tensors name layers of "
                        f"another architecture, e.g. {sorted(shapes)[0]!r}); use a FLUX LoRA")
    for component, layers in expected.items():
        if attached[component] != len(layers):
            raise UserError(f"--lora_weights {path!r}: only {attached[component]} of its {len(layers)} {component} layers "
                            f"attached; it was made for another model")
    return attached


def attach_lora(pipe, path: str, scale: float, fuse: bool) -> dict:
    """Load the LoRA file into the pipeline, check it attached where it should, apply the scale.

    Returns {component: layers attached}. Fails with a UserError rather than run the base model
    when the adapter did not attach ("loaded nothing").
    """
    shapes = read_lora_shapes(path)
    expected = _expected_lora_layers(shapes)
    _check_lora_fits(pipe, path, expected)
    with _held_key_warnings():
        attached = _load_checked(pipe, path, shapes, expected)
    components = [c for c, n in attached.items() if n]
    if fuse:
        pipe.fuse_lora(components=components, lora_scale=scale, adapter_names=[ADAPTER])
        pipe.unload_lora_weights()  # the LoRA now lives in the base weights; drop the side layers
    else:
        pipe.set_adapters([ADAPTER], adapter_weights=[scale])
    return attached


def lora_save_load_hooks(accelerator, transformer, text_encoder=None, dtype: torch.dtype | None = None):
    """(save_hook, load_hook) for accelerator.register_save_state_pre_hook / register_load_state_pre_hook.

    Both run on every rank (save_state must be called on every rank under DeepSpeed, or the
    collective checkpoint hangs); only the main process writes the LoRA file, after a ZeRO-3
    gather in which every rank takes part. Under DeepSpeed
    accelerate hands the hooks engine-wrapped models and an empty `weights` list (the engine
    saves the full state itself), so the hooks work from the models given here, unwrapped.
    """
    ours = [unwrap_model(m) for m in (transformer, text_encoder) if m is not None]

    def is_ours(model) -> bool:
        return any(unwrap_model(model) is m for m in ours)

    def save_hook(models, weights, output_dir):
        # Outside DeepSpeed accelerate would also write each model's full state dict: the
        # LoRA file replaces it, so drop ours from `weights` (aligned with `models` there).
        for i in reversed(range(min(len(models), len(weights)))):
            if is_ours(models[i]):
                weights.pop(i)
        save_lora_gathered(output_dir, accelerator.is_main_process, transformer, text_encoder, dtype)

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            if is_ours(models[i]):
                models.pop(i)  # accelerate must not look for a full model file we never wrote
        if is_deepspeed(accelerator):
            # The engine already restored every weight (each rank its shard under ZeRO-3) from its
            # own checkpoint; the LoRA file beside it is for people, not for resuming.
            return
        load_lora(input_dir, transformer, text_encoder)

    return save_hook, load_hook
