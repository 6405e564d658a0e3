"""The plan's terms: one named function per thing that takes memory, each from the run's shape
(RunShape) and the model's architecture alone. fluxkit.plan.phases puts them on the device phase
by phase; each is unit-tested (tests/plan/test_plan_terms.py).

Constants measured on this toolkit's runs are here, each with how it was measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from .architecture import (Architecture, block_linear_shapes, lora_parameter_count, quantized_linear_bytes,
                           quantized_text_bytes)
from .shape import RunShape

DEEPSPEED_REDUCE_BUCKET = int(5e8)  # DeepSpeed's reduce_bucket_size default (accelerate leaves it)
DEEPSPEED_STAGE3_LIVE = int(1e9)  # stage3_max_live_parameters default: gathered parameters at once
DEEPSPEED_STAGE3_PREFETCH = int(5e8)  # stage3_prefetch_bucket_size default
CLIP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# DeepSpeed on a CPU host (gloo) holds about 100 MiB more per process than the plan's ZeRO
# terms, the same for the full fine-tune (9.3M trained parameters) and LoRA (0.1M) of the small
# preset: the engine's and gloo's own state, not the model's. Measured by bench's memory suite.
CPU_DEEPSPEED_BYTES = 100 * 2**20
# Optimizer state bytes per trained parameter: AdamW two fp32 moments, 8-bit AdamW two 8-bit
# moments, prodigy four fp32 buffers.
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}

# Bytes autograd keeps for backward, per token (batch x (image + T5 tokens)) per hidden unit,
# for one double-stream block, one single-stream block, and the layers around them (per image
# token). Keyed by how the transformer runs:
#   "deepspeed": every weight in the compute dtype (bf16/fp16), no autocast (DeepSpeed bf16);
#   "autocast":  trained weights fp32 under bf16 autocast, LoRA's frozen base in bf16;
#   "fp32":      everything fp32 (--mixed_precision no).
# Measured on CPU with calibrate.measure_activation_constants(): a FLUX transformer of width 256
# (4 heads of 64) with 0 or 1 blocks of each kind, 256 image + 77 text tokens (and 1024 image
# tokens for the outer term), summing the distinct storages autograd's saved_tensors_hooks see,
# excluding parameters and autocast's weight copies (counted separately). They hold within 4% at
# widths 128 and 512, and attention is stored as flash attention does (no tokens^2 term; torch's
# CPU SDPA and CUDA/NPU fused kernels both save q, k, v, out and the log-sum-exp).
# `python -m fluxkit.plan --calibrate` measures them again.
ACTIVATION_CONSTANTS = {
    # (regime, mode, checkpointing): (double, single, outer per image token)
    ("deepspeed", "full", False): (58.3, 52.7, 6.5), ("deepspeed", "full", True): (2.0, 2.5, 6.5),
    ("deepspeed", "lora", False): (42.0, 40.4, 2.0), ("deepspeed", "lora", True): (3.6, 4.0, 2.0),
    ("autocast", "full", False): (58.3, 52.7, 6.5), ("autocast", "full", True): (2.0, 2.5, 6.5),
    ("autocast", "lora", False): (48.0, 46.4, 2.0), ("autocast", "lora", True): (3.6, 4.0, 2.0),
    ("fp32", "full", False): (98.5, 87.2, 13.0), ("fp32", "full", True): (4.0, 4.9, 13.0),
    ("fp32", "lora", False): (73.9, 70.6, 4.1), ("fp32", "lora", True): (7.1, 8.0, 4.1),
}
# --text_encoder_quantization: bitsandbytes quantizes each weight as it loads, through temporaries of
# that weight (a float32 copy, block indices): bytes per element of the largest converted weight, on
# top of what is loaded so far. Measured on CPU (bitsandbytes 0.50, transformers 5.23): a 132M-parameter
# Qwen3 read from bf16 files, RssAnon's peak while loading above its end: 37 MiB (nf4) and 23 MiB (int8)
# over a largest weight of 3.1M elements.
QUANTIZING_BYTES = {"nf4": 12, "int8": 8}
# Inference (validation) holds no activations for backward: the largest live set is one block's
# working tensors, a few times the hidden states (q, k, v, attention output, the MLP's 4x input).
INFERENCE_WORKING_PER_TOKEN_HIDDEN = 12


@dataclass
class Item:
    group: str  # weights, trainable, gradients, optimizer, activations, caches, transient, runtime, offload
    name: str
    bytes: int
    note: str = ""


def image_tokens(s: RunShape, arch: Architecture) -> int:
    """The target image's tokens (2x2 latent patches)."""
    return (s.resolution // arch.vae_scale // 2) ** 2


def sequence_image_tokens(s: RunShape, arch: Architecture) -> int:
    """Image tokens the transformer runs over: the target's, and as many again per reference image of
    an editing pair (Kontext, FLUX.2: the reference is placed in the target's shape)."""
    return image_tokens(s, arch) * (1 + s.references)


def _label(arch: Architecture) -> str:
    """The name of the text encoder whose per-token output the transformer reads (T5, Mistral3, Qwen3)."""
    seq = arch.text_encoder("sequence")
    return seq["label"] if seq else "text"


def trained_parameters(s: RunShape, arch: Architecture) -> int:
    """Parameters that train: LoRA's adapters (transformer, and CLIP's when it trains) or every
    weight of the transformer (and CLIP)."""
    if s.lora:
        n = lora_parameter_count(arch.linear_shapes, list(s.targets), s.rank) + pivotal_rows(s, arch)
        return n + (lora_parameter_count(arch.trained_text_linear_shapes, list(CLIP_LORA_TARGETS), s.rank) if s.train_clip else 0)
    return arch.params["transformer"] + (arch.text_encoder("pooled")["params"] if s.train_clip else 0)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B params" if n >= 1e9 else f"{n / 1e6:.0f}M params"


def encoder_weights(s: RunShape, arch: Architecture) -> list[Item]:
    """The frozen encoders in the compute dtype: the VAE and the family's text encoders (T5 and CLIP,
    Mistral3, Qwen3; quantized_text_weights), less FLUX.1's CLIP when it trains."""
    P, cb = arch.params, s.cb
    out = [Item("weights", "VAE (frozen)", P["vae"] * cb, f"{P['vae'] / 1e6:.1f}M params")]
    for t in sorted(arch.text_encoders, key=lambda t: t["role"] != "sequence"):
        if not (s.train_clip and t["role"] == "pooled"):
            out.append(text_encoder_weights(s, t))
    return out


def text_encoder_weights(s: RunShape, t: dict) -> Item:
    """One frozen text encoder as it is held: in the compute dtype, or with --text_encoder_quantization
    its nn.Linear weights packed by bitsandbytes (architecture.quantized_text_bytes)."""
    note = _count(t["params"])
    if s.text_quant != "none":
        note += f", Linear weights {s.text_quant} (bitsandbytes, --text_encoder_quantization)"
    return Item("weights", f"{t['label']} text encoder (frozen)", quantized_text_bytes(t, s.text_quant, s.cb), note)


def vae_decoder_weights(s: RunShape, arch: Architecture) -> Item:
    """What stays of the VAE once the cache is full: its decoder, for validation images."""
    n = arch.params["vae"] - arch.params.get("vae_encoder", 0)
    return Item("weights", "VAE decoder (frozen)", n * s.cb, "validation images; the encoder left with the cache fill")


def trained_clip_weights(s: RunShape, arch: Architecture) -> list[Item]:
    """A CLIP that trains stays on the device with the transformer (its LoRA base, or its weights)."""
    if not s.train_clip or not s.lora:
        return []  # a fully trained CLIP is counted with the trained weights
    clip = arch.text_encoder("pooled")
    return [Item("weights", f"{clip['label']} text encoder (LoRA base)", clip["params"] * s.cb, _count(clip["params"]))]


def pivotal_rows(s: RunShape, arch: Architecture) -> int:
    """Parameters of pivotal tuning's new token rows: CLIP's width (the pooled projection's input),
    plus T5's (the transformer's joint attention width) with --enable_t5_ti."""
    if not s.pivotal_tokens:
        return 0
    width = arch.transformer["pooled_projection_dim"] + (arch.transformer["joint_attention_dim"] if s.pivotal_t5 else 0)
    return s.pivotal_tokens * width


def pivotal_encoders(s: RunShape, arch: Architecture) -> list[Item]:
    """With pivotal tuning CLIP (and T5) encode prompts with new tokens every step: they stay on the
    device with the transformer after the cache fill. Their activations for backward (a few
    prompts) are left out."""
    if not s.pivotal_tokens:
        return []
    clip, t5 = arch.text_encoder("pooled"), arch.text_encoder("sequence")
    out = [Item("weights", f"{clip['label']} text encoder (new tokens)", clip["params"] * s.cb,
                "encodes prompts with new tokens every step")]
    if s.pivotal_t5:
        out.append(Item("weights", f"{t5['label']} text encoder (new tokens)", t5["params"] * s.cb, "--enable_t5_ti"))
    return out


def transformer_base(s: RunShape, arch: Architecture) -> Item:
    """The frozen transformer under LoRA: its nn.Linear weights quantized as asked, the rest in
    the compute dtype; ZeRO-3 partitions it like every parameter of the module."""
    qbytes, qnumel = quantized_linear_bytes(arch.linear_shapes, s.quant, s.cb)
    size = qbytes + (arch.params["transformer"] - qnumel) * s.cb
    note = f"{arch.params['transformer'] / 1e9:.2f}B params" + (f", Linear weights {s.quant}" if s.quant != "none" else "")
    if s.zero_stage == 3:
        size //= s.parts
        note += f", 1/{s.parts} per process" + (" (in host memory: ZeRO-3 offload)" if s.offload_params else "")
        if s.offload_params:
            size = 0
    return Item("weights", "transformer base (frozen)", size, note)


def trainable_weights(s: RunShape, trained: int) -> list[Item]:
    """Trained weights: fp32 outside DeepSpeed (masters under autocast); under DeepSpeed the module
    in the compute dtype plus the optimizer's fp32 master copy, split by ZeRO (weights by ZeRO-3
    only; with ZeRO offload the masters, and under ZeRO-3 offload the weights, are in host memory)."""
    what = f"LoRA rank {s.rank} on {len(s.targets)} module name(s)" if s.lora else "transformer" + (" + CLIP" if s.train_clip else "")
    if not s.deepspeed:
        return [Item("trainable", f"{what}: weights (fp32)", trained * 4, f"{trained / 1e6:.1f}M params")]
    n = s.parts
    weights = 0 if s.offload_params else trained * s.cb // (n if s.zero_stage == 3 else 1)
    master = 0 if s.offload_optimizer else trained * 4 // n
    host = " (in host memory: ZeRO offload)"
    return [Item("trainable", f"{what}: weights ({s.mixed})", weights,
                 f"{trained / 1e6:.1f}M params" + (f", 1/{n} per process" if s.zero_stage == 3 else "")
                 + (host if s.offload_params else "")),
            Item("trainable", f"{what}: fp32 master copy", master, f"1/{n} per process" + (host if s.offload_optimizer else ""))]


def optimizer_states(s: RunShape, trained: int) -> Item:
    names = {"adamw": "AdamW (2 x fp32)", "adamw8bit": "8-bit AdamW (2 x int8)", "prodigy": "prodigy (4 fp32 buffers)"}
    size = trained * OPTIMIZER_BYTES[s.optimizer] // s.parts
    note = f"1/{s.parts} per process" if s.deepspeed else ""
    if s.offload_optimizer:
        return Item("optimizer", names[s.optimizer], 0, note + " (in host memory: ZeRO offload)")
    return Item("optimizer", names[s.optimizer], size, note)


def gradients(s: RunShape, trained: int) -> tuple[int, int, str]:
    """(bytes held during backward, bytes at the optimizer step, note). Outside DeepSpeed fp32 and
    full size; ZeRO-1 compute-dtype full size; ZeRO-2/3 a reduce bucket plus this process's
    partition (on a CPU only the touched part of the bucket is resident), and an fp32 copy of it
    at the step; ZeRO offload sends the partitions to host memory."""
    n = s.parts
    if not s.deepspeed:
        return trained * 4, trained * 4, "fp32, full size"
    if s.zero_stage == 1:
        return trained * s.cb, trained * s.cb + trained * 4 // n, f"{s.mixed} full size; fp32 1/{n} at the step"
    bucket = min(DEEPSPEED_REDUCE_BUCKET, trained) if s.on_cpu else DEEPSPEED_REDUCE_BUCKET
    if s.offload_optimizer:
        return bucket * s.cb, 0, f"{bucket / 1e6:.0f}M-element {s.mixed} reduce bucket; partitions in host memory"
    return (bucket * s.cb + trained * s.cb // n, trained * s.cb // n + trained * 4 // n,
            f"{bucket / 1e6:.0f}M-element {s.mixed} reduce bucket + 1/{n} partition; fp32 1/{n} at the step")


def step_temporaries(s: RunShape, trained: int) -> int:
    """torch's foreach AdamW (the default on accelerators) makes one fp32 temporary per parameter."""
    if s.on_cpu or s.optimizer != "adamw" or s.offload_optimizer:
        return 0
    return trained * 4 // s.parts


def activations(s: RunShape, arch: Architecture) -> list[Item]:
    """What autograd saves for backward (ACTIVATION_CONSTANTS), and with gradient checkpointing
    one block's full activations while it is recomputed."""
    img = sequence_image_tokens(s, arch)
    tokens = s.batch * (img + s.seq_len)
    double, single, outer = ACTIVATION_CONSTANTS[(s.regime, s.mode, s.checkpointing)]
    d, Ld, Ls = arch.hidden, arch.transformer["num_layers"], arch.transformer["num_single_layers"]
    refs = f" incl. {s.references} reference image(s)" if s.references else ""
    out = [Item("activations", "saved for backward", int(tokens * d * (Ld * double + Ls * single) + s.batch * img * d * outer),
                f"{s.batch} x ({img} image{refs} + {s.seq_len} {_label(arch)} tokens), {Ld}+{Ls} blocks, "
                f"checkpointing {'on' if s.checkpointing else 'off'}")]
    if s.checkpointing:
        full_double, full_single, _ = ACTIVATION_CONSTANTS[(s.regime, s.mode, False)]
        out.append(Item("activations", "one block recomputed", int(tokens * d * max(full_double, full_single)),
                        "gradient checkpointing"))
    return out


def autocast_copies(s: RunShape, trained: int) -> list[Item]:
    """Under autocast every trained fp32 weight has a compute-dtype copy while forward/backward run."""
    if s.regime != "autocast":
        return []
    return [Item("trainable", "autocast copies of trained weights", trained * s.cb, f"{s.mixed}, while forward/backward run")]


def vae_encoding(s: RunShape, arch: Architecture) -> Item:
    """The VAE encoder's peak while it encodes a batch: (4 + layers_per_block) feature maps of its
    first block's width at full resolution (measured on CPU with the small and dev VAEs at 256 and
    512 px), plus the fp32 pixel batch."""
    size = s.batch * s.resolution ** 2 * (arch.vae_first_channels * (4 + arch.vae_layers_per_block) * s.cb + 3 * 4)
    return Item("transient", "VAE encoding", size, f"{s.batch} image(s) at {s.resolution}px")


def text_encoder_working_set(s: RunShape, t: dict) -> int:
    """One text encoder's working set while it encodes one prompt (no gradients), in the compute
    dtype: the attention scores (heads x tokens^2: T5's position bias needs them whole), the gated
    feed-forward's two inner tensors and a few hidden states; an encoder read at several layers
    (FLUX.2's) also returns every layer's hidden states."""
    tokens = min(s.seq_len, t.get("max_tokens") or s.seq_len)
    size = t["heads"] * tokens ** 2 + tokens * (2 * t["ff"] + 4 * t["width"])
    if t.get("keeps_hidden_states"):
        size += (t["layers"] + 1) * tokens * t["width"]
    if s.text_quant != "none":  # bitsandbytes dequantizes one weight at a time for the matmul
        size += t["largest_linear"]
    return size * s.cb


def text_encoding(s: RunShape, arch: Architecture) -> Item:
    """The largest text encoder working set (they encode one after the other)."""
    sizes = {t["label"]: text_encoder_working_set(s, t) for t in arch.text_encoders}
    label = max(sizes, key=sizes.get) if sizes else _label(arch)
    return Item("transient", f"{label} encoding one prompt", sizes.get(label, 0), f"{s.seq_len} tokens")


def text_quantizing(s: RunShape, arch: Architecture) -> Item:
    """--text_encoder_quantization: the temporaries of the one weight bitsandbytes quantizes at a time
    while a text encoder loads (QUANTIZING_BYTES), on the device it lands on; nothing without it."""
    if s.text_quant == "none":
        return Item("transient", "quantizing the text encoder", 0)
    largest = max((t["largest_linear"] for t in arch.text_encoders), default=0)
    return Item("transient", "quantizing the text encoder", largest * QUANTIZING_BYTES[s.text_quant],
                f"one weight at a time as it loads ({s.text_quant}, bitsandbytes)")


def pivotal_t5_backward(s: RunShape, arch: Architecture) -> list[Item]:
    """--enable_t5_ti: T5 runs with gradients for each prompt holding new tokens (at most the micro
    batch): every layer keeps about its encoding working set (text_encoder_working_set) for backward,
    for each of its layers (T5-XXL: 24, from its config). CLIP's
    share (77 tokens, 12 narrow layers) is left out."""
    if not s.pivotal_t5:
        return []
    t5 = arch.text_encoder("sequence")
    layers = t5["layers"]
    size = s.batch * layers * text_encoder_working_set(s, t5)
    return [Item("activations", "T5 saved for the new rows' gradients", size,
                 f"{s.batch} prompt(s) x {layers} layers, --enable_t5_ti")]


def validation_working_set(s: RunShape, arch: Architecture) -> list[Item]:
    """Rendering one validation image: the transformer's no-grad working tensors, then the VAE
    decoding (its feature maps mirror the encoder's at full resolution)."""
    tokens = sequence_image_tokens(s, arch) + s.seq_len
    dec = s.resolution ** 2 * (arch.vae_first_channels * (4 + arch.vae_layers_per_block) * s.cb + 3 * 4)
    return [Item("transient", "validation: transformer working set", tokens * arch.hidden * INFERENCE_WORKING_PER_TOKEN_HIDDEN * s.cb,
                 "one image, no gradients"),
            Item("transient", "validation: VAE decoding", dec, f"one image at {s.resolution}px")]


def caches(s: RunShape, arch: Architecture) -> list[Item]:
    """Cached VAE latent moments (one per sample) and prompt embeddings, when the plan sees the data."""
    if not s.caching or s.samples is None:
        return []
    side = s.resolution // arch.vae_scale
    images = s.samples * (1 + s.references)  # an editing pair caches its reference's latents too
    return [Item("caches", "VAE latent moments", images * 2 * arch.latent_channels * side * side * s.cb,
                 f"{images} image(s), mean + logvar"),
            Item("caches", "text embeddings", s.prompts * (s.seq_len * arch.transformer["joint_attention_dim"]
                                                          + arch.transformer.get("pooled_projection_dim", 0)) * 4,
                 f"{s.prompts} prompt(s) x {s.seq_len} {_label(arch)} tokens")]


def cpu_runtime(s: RunShape, arch: Architecture) -> list[Item]:
    """On a CPU device: the runtime's lasting allocations, as measured for the model's family."""
    if not s.on_cpu:
        return []
    from ..families import get

    out = [Item("runtime", "CPU runtime (kernel caches, heap)", get(arch.family).cpu_runtime_bytes[s.mode],
                f"measured constant ({arch.family})")]
    if s.deepspeed:
        out.append(Item("runtime", "DeepSpeed engine and gloo on CPU", CPU_DEEPSPEED_BYTES, "measured constant"))
    return out


def zero3_working_set(s: RunShape, arch: Architecture, trained: int) -> list[Item]:
    """Parameters ZeRO-3 gathers at once (stage3_max_live_parameters, plus the prefetch bucket),
    in the compute dtype; under LoRA the frozen base is partitioned and gathered too."""
    if s.zero_stage != 3:
        return []
    gathered = arch.params["transformer"] if s.lora else trained
    live = min(DEEPSPEED_STAGE3_LIVE + DEEPSPEED_STAGE3_PREFETCH, gathered)
    return [Item("trainable", "ZeRO-3 gathered working set", live * s.cb, "stage3_max_live_parameters + prefetch bucket")]


def block_bytes(s: RunShape, arch: Architecture) -> list[int]:
    """Bytes of each transformer block's frozen weights as the base holds them (quantized or in the
    compute dtype), in forward order."""
    out = []
    for params, shapes in zip(arch.block_params, block_linear_shapes(arch.linear_shapes)):
        qbytes, qnumel = quantized_linear_bytes(shapes, s.quant, s.cb)
        out.append(qbytes + (params - qnumel) * s.cb)
    return out


def swapped_blocks(s: RunShape, arch: Architecture) -> list[int]:
    """The bytes of the blocks --blocks_to_swap keeps in host memory: the last N in forward order
    (fluxkit.training.blockswap swaps the same ones)."""
    sizes = block_bytes(s, arch)
    return sizes[len(sizes) - s.blocks_to_swap:] if s.blocks_to_swap else []


def block_offload(s: RunShape, arch: Architecture) -> list[Item]:
    """--blocks_to_swap N: the swapped blocks leave the device, except the ones visiting it (the
    block that runs and, on an accelerator, the next one being copied in)."""
    swapped = swapped_blocks(s, arch)
    if not swapped:
        return []
    visiting = sorted(swapped)[-1] * (1 if s.on_cpu else 2)
    return [Item("offload", f"{len(swapped)} block(s) in host memory (--blocks_to_swap)", -(sum(swapped) - min(visiting, sum(swapped))),
                 f"{sum(swapped) / 2**30:.2f} GiB swapped; {'one' if s.on_cpu else 'two'} visiting at a time")]


def transformer_arriving(s: RunShape, arch: Architecture, trained: int) -> Item:
    """The transformer as it reaches the device, before DeepSpeed or the optimizer touches it (read
    as fluxkit.training.models.transformer_load_dtype says): a LoRA base quantized or in the compute dtype
    (off CUDA an NF4 base arrives in the compute dtype and is swapped to NF4 afterwards); a full
    fine-tune in fp32 outside DeepSpeed, in the compute dtype under ZeRO-1/2; ZeRO-3 moves and
    partitions it one parameter at a time, so a device holds the largest one whole."""
    P = arch.params["transformer"]
    if s.zero_stage == 3:
        size, note = max(i * o for _, i, o in arch.linear_shapes) * s.cb, "ZeRO-3: one parameter at a time"
    elif s.lora and s.quant == "nf4" and s.device != "cuda":
        size, note = P * s.cb, f"read in {s.mixed}, then swapped to NF4"
    elif s.lora:
        size, note = transformer_base(s, arch).bytes, "as the frozen base"
    elif s.deepspeed:
        size, note = trained * s.cb, f"read in {s.mixed} (DeepSpeed builds the fp32 masters)"
    else:
        size, note = trained * 4, "fp32 (the module holds the masters)"
    if s.blocks_to_swap and s.lora and not (s.quant != "none" and s.device == "cuda"):
        # the swapped blocks stay in host memory (a base diffusers quantizes on CUDA lands whole first)
        size += sum(i.bytes for i in block_offload(s, arch))
    return Item("transient", "transformer arriving", size, note)


def host_encoders_read(s: RunShape, arch: Architecture) -> int:
    """Host memory one process uses while the encoders load: all of them are read
    (fluxkit.training.models.load_models) before the first moves to the device, so their sum
    (FLUX.2 [dev]'s 24B Mistral3 alone is 33.3 GiB in bf16, what prompts never reach left out). A quantized text encoder
    (--text_encoder_quantization) is quantized onto the device that encodes as it loads: the host
    holds its largest tensor at a time in the compute dtype (the packed encoder only where it
    encodes on the host: text_on_host, --offload_encoders). Text encoders that encode on the host
    also keep their largest working set."""
    size = sum(i.bytes for i in encoder_weights(s, arch) if not (s.text_quant != "none" and " text encoder " in i.name))
    if s.text_quant != "none":
        on_host = s.text_on_host or s.offload_encoders
        size += sum(text_encoder_weights(s, t).bytes if on_host else t["largest_param"] * s.cb for t in arch.text_encoders)
        size += text_quantizing(s, arch).bytes if on_host else 0
    return size + (text_encoding(s, arch).bytes if s.text_on_host else 0)


def host_transformer_read(s: RunShape, arch: Architecture) -> int:
    """Host memory one process uses to read the transformer: the whole of it in the dtype it is
    read in (every process reads its own copy)."""
    if not s.lora and not s.deepspeed:
        return arch.params["transformer"] * 4
    if s.lora and s.quant != "none" and s.device == "cuda":  # quantized onto the device tensor by tensor
        return max(i * o for _, i, o in arch.linear_shapes) * s.cb
    return arch.params["transformer"] * s.cb


def host_offloaded(s: RunShape, arch: Architecture, trained: int) -> list[Item]:
    """What a process keeps in host memory while it trains: swapped blocks (pinned), ZeRO offload's
    parameter partition, fp32 masters, optimizer states and fp32 gradient partitions."""
    out = []
    swapped = swapped_blocks(s, arch)
    if swapped:
        out.append(Item("host", "swapped blocks", sum(swapped), "--blocks_to_swap"))
    n = s.parts
    if s.offload_params:
        gathered = arch.params["transformer"] if s.lora else trained
        out.append(Item("host", "ZeRO-3 offloaded parameters", gathered * s.cb // n, f"1/{n} per process"))
    if s.offload_optimizer:
        out.append(Item("host", "ZeRO offloaded master, optimizer, gradients",
                        trained * (4 + OPTIMIZER_BYTES[s.optimizer] + 4) // n, f"1/{n} per process, fp32"))
    return out


