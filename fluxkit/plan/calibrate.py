"""`python -m fluxkit.plan --calibrate`: measure terms.ACTIVATION_CONSTANTS again on this CPU, from
the tensors autograd saves for backward in small FLUX transformers."""

from __future__ import annotations

from .architecture import default_lora_targets as _default_targets
from .terms import ACTIVATION_CONSTANTS


def measure_activation_constants(regime: str, mode: str, checkpointing: bool, heads: int = 4, head_dim: int = 64,
                                 image_tokens: int = 256, text_tokens: int = 77) -> tuple[float, float, float]:
    """Measure ACTIVATION_CONSTANTS[(regime, mode, checkpointing)] on this CPU: saved-tensor bytes
    of FLUX transformers with (0, 0), (1, 0) and (0, 1) blocks, and (0, 0) at 4x the image tokens."""
    width = heads * head_dim
    base = _saved_bytes(0, 0, image_tokens, text_tokens, regime, mode, checkpointing, heads, head_dim)
    one_double = _saved_bytes(1, 0, image_tokens, text_tokens, regime, mode, checkpointing, heads, head_dim)
    one_single = _saved_bytes(0, 1, image_tokens, text_tokens, regime, mode, checkpointing, heads, head_dim)
    more = _saved_bytes(0, 0, 4 * image_tokens, text_tokens, regime, mode, checkpointing, heads, head_dim)
    tokens = image_tokens + text_tokens
    return ((one_double - base) / (tokens * width), (one_single - base) / (tokens * width),
            (more - base) / (3 * image_tokens * width))


def _saved_bytes(double: int, single: int, image_tokens: int, text_tokens: int, regime: str, mode: str,
                 checkpointing: bool, heads: int, head_dim: int) -> int:
    import contextlib

    import torch
    from diffusers import FluxTransformer2DModel

    from ..tiny.build import _transformer

    torch.manual_seed(0)
    axes = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    t = FluxTransformer2DModel(**_transformer(64, double, single, head_dim, heads, 256, 128, axes))
    compute = torch.float32 if regime == "fp32" else torch.bfloat16
    trained_dtype = compute if regime != "autocast" else torch.float32
    t.to(trained_dtype if mode == "full" else compute).requires_grad_(mode == "full")
    if mode == "lora":
        from peft import LoraConfig

        t.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=_default_targets()))
        for p in t.parameters():
            if p.requires_grad:
                p.data = p.data.to(trained_dtype)
    if checkpointing:
        t.enable_gradient_checkpointing()
    t.train()
    c = t.config
    inputs = dict(hidden_states=torch.randn(1, image_tokens, c.in_channels, dtype=compute),
                  encoder_hidden_states=torch.randn(1, text_tokens, c.joint_attention_dim, dtype=compute),
                  pooled_projections=torch.randn(1, c.pooled_projection_dim, dtype=compute), timestep=torch.rand(1),
                  guidance=torch.ones(1), img_ids=torch.zeros(image_tokens, 3), txt_ids=torch.zeros(text_tokens, 3))
    params = {p.untyped_storage().data_ptr() for p in t.parameters()}
    seen: dict[int, int] = {}

    def weight_copy(x) -> bool:
        """autocast's copy of a trained weight (counted by the plan with the weights): a cast
        whose only input is a parameter's gradient accumulator."""
        fn = x.grad_fn
        while fn is not None and type(fn).__name__ in ("TBackward0", "ViewBackward0"):  # linear saves weight.t()
            fn = fn.next_functions[0][0]
        if fn is None or type(fn).__name__ != "ToCopyBackward0":
            return False
        source = fn.next_functions[0][0]
        return source is not None and isinstance(getattr(source, "variable", None), torch.nn.Parameter)

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in params and not weight_copy(x):
            seen[storage.data_ptr()] = storage.nbytes()
        return x

    amp = torch.autocast("cpu", dtype=torch.bfloat16) if regime == "autocast" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), amp:
        t(**inputs, return_dict=False)
    return sum(seen.values())


def calibrate() -> int:
    print("regime     mode  ckpt  double(table/measured)  single(table/measured)  outer(table/measured)")
    for (regime, mode, ckpt), table in ACTIVATION_CONSTANTS.items():
        measured = measure_activation_constants(regime, mode, ckpt)
        cells = "  ".join(f"{t:6.1f} / {m:6.1f}        " for t, m in zip(table, measured))
        print(f"{regime:<10} {mode:<5} {'on' if ckpt else 'off':<4}  {cells}")
    return 0
