"""Memory plan: the per-device peak memory of a configured training run, before anything loads.

    python -m fluxkit.plan --pretrained_model_name_or_path DIR [--lora] [trainer flags]
                           [--num_processes N] [--zero_stage 0|2|3] [--device_memory_gb G] [--json FILE]

The architecture comes from the pipeline folder's component config.json files, counted on the
meta device (no weights are read); `black-forest-labs/FLUX.1-dev` (or any path that is not a
folder, given --architecture dev) uses fluxkit.tiny's `dev` preset, which is FLUX.1-dev's exact
architecture. The run's shape comes from the trainer's own flags (fluxkit.train_args).

What is counted, per device (one process), and why it is there:

- frozen weights: VAE, T5 and CLIP (unless CLIP trains) in the compute dtype, all resident on
  the device for the whole run; LoRA runs add the frozen transformer, in the compute dtype or
  quantized (--base_quantization: int8 = 1 byte + a per-row scale, nf4 = half a byte + an fp32
  absmax per 64 values; only nn.Linear weights are quantized, as diffusers does).
- trainable parameters: outside DeepSpeed they are fp32 masters (mixed precision runs them
  under autocast, which keeps a compute-dtype copy of every trained weight while forward and
  backward run); under DeepSpeed the module holds compute-dtype weights and the optimizer an
  fp32 master copy, split over the processes (ZeRO 1/2) together with the parameters (ZeRO 3).
- gradients: fp32 and full size outside DeepSpeed; under ZeRO-2/3 a compute-dtype bucket
  (DeepSpeed's reduce_bucket_size, 5e8 elements by default) plus this process's partition, and
  an fp32 copy of the partition while the optimizer steps.
- optimizer states: AdamW two fp32 moments (8 bytes per parameter), 8-bit AdamW two 8-bit
  moments (2 bytes), prodigy four fp32 buffers (16 bytes), split over processes under ZeRO;
  plus foreach AdamW's temporary (4 bytes per parameter) on accelerators.
- activations: what autograd saves for backward, bytes per token per hidden unit per block,
  measured (see ACTIVATION_CONSTANTS and measure_activation_constants) and scaled by batch x
  (image tokens + T5 tokens) x hidden size x blocks; with gradient checkpointing, each block's
  inputs plus one block's full activations while it is recomputed.
- caches: VAE latent moments per training image and text embeddings per prompt (the trainer
  caches both unless --no_cache; images themselves stream from disk).

The peak is static memory + the largest of three phases: forward/backward (activations,
trained-weight autocast copies, gradients held during backward), the optimizer step (gradients,
step temporaries) and VAE encoding (first epoch, or every step with --no_cache); or, when it is
larger, the loading of the weights before any training state exists (see plan_memory: the fp32
transformer as from_pretrained reads it, which ZeRO-3 never holds whole on a device). Library
workspace (cuBLAS, the CUDA context, allocator fragmentation) is not counted: keep some headroom
(HEADROOM_FRACTION) when judging whether a run fits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

from .errors import UserError, cli
from .quant import refuse_for_full_finetune

GiB = 2**30
# Share of the device's memory the plan may use: CUDA/NPU contexts, kernels' workspaces and
# allocator fragmentation take the rest.
HEADROOM_FRACTION = 0.92
DEEPSPEED_REDUCE_BUCKET = int(5e8)  # DeepSpeed's reduce_bucket_size default (accelerate leaves it)
DEEPSPEED_STAGE3_LIVE = int(1e9)  # stage3_max_live_parameters default: gathered parameters at once
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: one fp32 absmax per 64 weights
HUB_DEV_IDS = ("black-forest-labs/FLUX.1-dev",)
# read_architecture's memo of parameter counts: a folder (default ~/.cache/fluxkit/plan), or "off"
ARCHITECTURE_MEMO_ENV = "FLUXKIT_PLAN_MEMO"
MEMO_SCHEMA = 1  # bump when Architecture's fields change
# On a CPU device the process's first training steps leave lasting allocations of the runtime
# itself, which do not grow with batch or resolution: oneDNN's kernel cache (JIT code per op
# and shape; ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 halves the total) and small-block heap
# fragmentation. bench's memory suite measures 23 MiB for the tiny preset, and for the small one
# (the unplanned rest of its batch-1 runs) 40 MiB for the full fine-tune and 64 MiB for LoRA
# (peft's adapters add kernels of their own shapes). Accelerators keep these outside the
# allocator whose peak torch.cuda/npu report.
CPU_RUNTIME_BYTES = {"full": 40 * 2**20, "lora": 64 * 2**20}
# DeepSpeed on a CPU host (gloo) holds about 100 MiB more per process than the plan's ZeRO
# terms, the same for the full fine-tune (9.3M trained parameters) and LoRA (0.1M) of the small
# preset: the engine's and gloo's own state, not the model's. Measured by bench's memory suite.
CPU_DEEPSPEED_BYTES = 100 * 2**20

# Bytes autograd keeps for backward, per token (batch x (image + T5 tokens)) per hidden unit,
# for one double-stream block, one single-stream block, and the layers around them (per image
# token). Keyed by how the transformer runs:
#   "deepspeed": every weight in the compute dtype (bf16/fp16), no autocast (DeepSpeed bf16);
#   "autocast":  trained weights fp32 under bf16 autocast, LoRA's frozen base in bf16;
#   "fp32":      everything fp32 (--mixed_precision no).
# Measured on CPU with measure_activation_constants(): a FLUX transformer of width 256 (4 heads
# of 64) with 0 or 1 blocks of each kind, 256 image + 77 text tokens (and 1024 image tokens for
# the outer term), summing the distinct storages autograd's saved_tensors_hooks see, excluding
# parameters and autocast's weight copies (counted separately). They hold within 4% at widths
# 128 and 512 (the few per-token tensors that do not scale with width, like RoPE, fade as it grows), and attention is stored as flash attention does (no tokens^2 term; torch's
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


# ------------------------------------------------------------------------------ architecture

@dataclass
class Architecture:
    """Parameter counts and the shapes the plan needs, from configs only."""
    source: str
    params: dict  # component -> parameter count
    transformer: dict  # the transformer's config
    vae_scale: int
    latent_channels: int
    vae_first_channels: int = 128  # VAE encoder's first block width: its feature maps dominate encoding
    vae_layers_per_block: int = 2
    linear_shapes: list = field(default_factory=list)  # (module name, in, out) of every transformer nn.Linear
    clip_linear_shapes: list = field(default_factory=list)

    @property
    def hidden(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path!r} ({type(err).__name__}); point --pretrained_model_name_or_path "
                        "at a complete FLUX pipeline folder") from None


def component_configs(model: str, architecture: str | None = None) -> tuple[dict, str]:
    """{component: config dict} from a pipeline folder, or from a tiny.py preset."""
    from .tiny import resolve_preset

    if architecture:
        p = resolve_preset(architecture)
        return {"transformer": p.transformer, "vae": p.vae, "text_encoder": p.clip, "text_encoder_2": p.t5}, f"preset {p.name}"
    if os.path.isdir(model):
        comps = {c: _read_json(os.path.join(model, c, "config.json"))
                 for c in ("transformer", "vae", "text_encoder", "text_encoder_2")}
        return comps, model
    if model in HUB_DEV_IDS:
        return component_configs(model, "dev")
    raise UserError(f"--pretrained_model_name_or_path {model!r} is not a local pipeline folder; give one, or add "
                    "--architecture dev to plan FLUX.1-dev's architecture without its files")


def read_architecture(model: str, architecture: str | None = None) -> Architecture:
    """Count every component's parameters on the meta device (nothing is allocated).

    Importing diffusers and transformers takes seconds, longer than the count itself, and the
    launchers plan every run (--dry_run too) before they start anything: the counts are kept in
    a small memo file per set of configs and library versions (ARCHITECTURE_MEMO), so only the
    first plan of a model pays for the imports."""
    configs, source = component_configs(model, architecture)
    memo = _memo_path(configs)
    if memo:
        try:
            with open(memo) as f:
                data = json.load(f)
            for shapes in ("linear_shapes", "clip_linear_shapes"):
                data[shapes] = [tuple(s) for s in data[shapes]]
            return Architecture(**{**data, "source": source})
        except (OSError, ValueError, TypeError, KeyError):
            pass  # not there yet, or unreadable: count again
    arch = _count_architecture(configs, source)
    if memo:
        try:
            from .fsio import atomic_write_json

            os.makedirs(os.path.dirname(memo), exist_ok=True)
            atomic_write_json(memo, asdict(arch), indent=None)
        except OSError:
            pass  # a read-only home: the plan still works, only slower
    return arch


def _memo_path(configs: dict) -> str | None:
    """Where the counts for these configs are memoised: keyed by the configs and by the versions
    of the libraries that build the modules (a new version may add or drop parameters)."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    if os.environ.get(ARCHITECTURE_MEMO_ENV) == "off":
        return None
    try:
        versions = [version(lib) for lib in ("diffusers", "transformers", "torch")]
    except PackageNotFoundError:
        return None
    key = json.dumps([MEMO_SCHEMA, versions, configs], sort_keys=True, default=str)
    base = os.environ.get(ARCHITECTURE_MEMO_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fluxkit", "plan")
    return os.path.join(base, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _count_architecture(configs: dict, source: str) -> Architecture:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    with torch.device("meta"):
        models = {
            "transformer": FluxTransformer2DModel.from_config(strip(configs["transformer"])),
            "vae": AutoencoderKL.from_config(strip(configs["vae"])),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**strip(configs["text_encoder"]))),
            "text_encoder_2": T5EncoderModel(T5Config(**strip(configs["text_encoder_2"]))),
        }
    linears = lambda m: [(n, mod.in_features, mod.out_features) for n, mod in m.named_modules()  # noqa: E731
                         if isinstance(mod, torch.nn.Linear)]
    vae = configs["vae"]
    return Architecture(source=source, params={k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
                        transformer=dict(models["transformer"].config), vae_scale=2 ** (len(vae["block_out_channels"]) - 1),
                        latent_channels=vae["latent_channels"], vae_first_channels=vae["block_out_channels"][0],
                        vae_layers_per_block=vae.get("layers_per_block", 2), linear_shapes=linears(models["transformer"]),
                        clip_linear_shapes=linears(models["text_encoder"]))


def lora_parameter_count(shapes: list, targets: list[str], rank: int) -> int:
    """Parameters peft adds: rank x (in + out) for every nn.Linear whose name is or ends in a target."""
    return sum(rank * (i + o) for name, i, o in shapes if any(name == t or name.endswith("." + t) for t in targets))


def quantized_linear_bytes(shapes: list, quantization: str, dtype_bytes: int) -> tuple[int, int]:
    """(bytes of the quantized nn.Linear weights, their parameter count) of a frozen base."""
    numel = sum(i * o for _, i, o in shapes)
    if quantization in ("int8", "fp8"):  # torchao int8/float8 weight-only: 1-byte weights + one scale per output row
        return numel + sum(o for _, _, o in shapes) * dtype_bytes, numel
    if quantization == "nf4":  # bitsandbytes NF4: two weights per byte + an fp32 absmax per block
        return numel // 2 + math.ceil(numel / NF4_BLOCK) * 4, numel
    return numel * dtype_bytes, numel


# ------------------------------------------------------------------------------ the plan

@dataclass
class Item:
    group: str  # weights, trainable, gradients, optimizer, activations, caches, transient
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    items: list
    static_bytes: int
    backward_bytes: int
    step_bytes: int
    encode_bytes: int
    loading_bytes: int  # whole (not on top of static): the device while the weights load, before training state exists
    peak_bytes: int
    device: str
    device_memory_bytes: int | None
    world_size: int
    zero_stage: int
    summary: dict

    @property
    def fits(self) -> bool | None:
        if not self.device_memory_bytes:
            return None
        return self.peak_bytes <= HEADROOM_FRACTION * self.device_memory_bytes

    def one_line(self) -> str:
        s = self.summary
        what = (f"{s['run']} {s['resolution']}px batch {s['batch']} on {self.world_size} process(es), "
                f"ZeRO-{self.zero_stage}" if self.zero_stage else
                f"{s['run']} {s['resolution']}px batch {s['batch']} on {self.world_size} process(es), no DeepSpeed")
        line = f"memory plan: {self.peak_bytes / GiB:.1f} GiB peak per device ({what})"
        if self.device_memory_bytes:
            verdict = "fits" if self.fits else "does NOT fit"
            line += (f"; {verdict} in {self.device_memory_bytes / GiB:.1f} GiB "
                     f"({HEADROOM_FRACTION:.0%} usable)")
        return line

    def to_json(self) -> dict:
        out = asdict(self)
        out["fits"] = self.fits
        out["peak_gib"] = self.peak_bytes / GiB
        return out

    def table(self) -> str:
        rows = [(i.group, i.name, f"{i.bytes / GiB:9.3f}", i.note) for i in self.items if i.bytes]
        rows += [("", "", "", ""), ("static", "resident all run", f"{self.static_bytes / GiB:9.3f}", ""),
                 ("phase", "forward + backward", f"{self.backward_bytes / GiB:9.3f}", "on top of static"),
                 ("phase", "optimizer step", f"{self.step_bytes / GiB:9.3f}", "on top of static"),
                 ("phase", "VAE encoding", f"{self.encode_bytes / GiB:9.3f}", "on top of static"),
                 ("phase", "loading the weights", f"{self.loading_bytes / GiB:9.3f}", "whole, before any training state"),
                 ("PEAK", "per device", f"{self.peak_bytes / GiB:9.3f}", "static + largest phase, or loading")]
        widths = [max(len(r[k]) for r in rows + [("group", "item", "GiB", "")]) for k in range(3)]
        lines = [f"{'group':<{widths[0]}}  {'item':<{widths[1]}}  {'GiB':>{widths[2]}}  note"]
        lines += [f"{g:<{widths[0]}}  {n:<{widths[1]}}  {b:>{widths[2]}}  {note}".rstrip() for g, n, b, note in rows]
        return "\n".join(lines)


def _dtype_bytes(mixed_precision: str | None) -> int:
    return 2 if mixed_precision in ("bf16", "fp16") else 4


def _count_images(args) -> int | None:
    """Training images per epoch (before --repeats), when the plan can see them."""
    from .scan import IMAGE_EXTENSIONS

    folder = getattr(args, "instance_data_dir", None)
    if folder and os.path.isdir(folder) and not getattr(args, "dataset_name", None):
        return len([f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)])
    return None


def plan_memory(args, world_size: int = 1, zero_stage: int = 0, device: str = "cuda",
                device_memory_bytes: int | None = None, arch: Architecture | None = None) -> Plan:
    """The per-device memory of the run `args` (trainer flags) describes; see the module doc."""
    if zero_stage not in (0, 1, 2, 3):
        raise UserError(f"--zero_stage {zero_stage} must be 0 (no DeepSpeed), 1, 2 or 3")
    if world_size < 1:
        raise UserError(f"--num_processes {world_size} must be at least 1")
    arch = arch or read_architecture(args.pretrained_model_name_or_path, getattr(args, "architecture", None))
    lora = bool(getattr(args, "lora", False))
    quant = getattr(args, "base_quantization", None) or "none"
    if not lora:
        refuse_for_full_finetune(quant)
    deepspeed = zero_stage > 0
    mixed = args.mixed_precision or ("bf16" if deepspeed else "no")
    cb = _dtype_bytes(mixed)  # compute dtype bytes
    regime = "fp32" if cb == 4 else ("deepspeed" if deepspeed else "autocast")
    on_cpu = device == "cpu"
    n = world_size if deepspeed else 1  # ZeRO partitions over processes; DDP replicates
    items: list[Item] = []
    add = lambda *a: items.append(Item(*a))  # noqa: E731
    P = arch.params
    train_clip = bool(args.train_text_encoder)

    # ---- frozen weights (with --offload_encoders in host memory, on the device only while encoding)
    encoders = [("VAE (frozen)", P["vae"] * cb, f"{P['vae'] / 1e6:.1f}M params, {mixed if cb == 2 else 'fp32'}"),
                ("T5 text encoder (frozen)", P["text_encoder_2"] * cb, f"{P['text_encoder_2'] / 1e9:.2f}B params")]
    if not train_clip:  # a CLIP that trains stays on the device with the transformer
        encoders.append(("CLIP text encoder (frozen)", P["text_encoder"] * cb, f"{P['text_encoder'] / 1e6:.0f}M params"))
    offloaded = bool(getattr(args, "offload_encoders", False)) and not on_cpu  # on a CPU the host is the device
    visiting = sum(b for _, b, _ in encoders) if offloaded else 0
    for name, size, note in encoders:
        add("weights", name, 0 if offloaded else size, "in host memory (--offload_encoders)" if offloaded else note)
    if train_clip and lora:
        add("weights", "CLIP text encoder (LoRA base)", P["text_encoder"] * cb, f"{P['text_encoder'] / 1e6:.0f}M params")

    # ---- what trains
    if lora:
        targets = ([t.strip() for t in args.lora_layers.split(",") if t.strip()] if args.lora_layers else _default_targets())
        trained = lora_parameter_count(arch.linear_shapes, targets, args.rank)
        if train_clip:
            trained += lora_parameter_count(arch.clip_linear_shapes, ["q_proj", "k_proj", "v_proj", "out_proj"], args.rank)
        qbytes, qnumel = quantized_linear_bytes(arch.linear_shapes, quant, cb)
        rest = P["transformer"] - qnumel
        add("weights", "transformer base (frozen)", qbytes + rest * cb,
            f"{P['transformer'] / 1e9:.2f}B params" + (f", Linear weights {quant}" if quant != "none" else ""))
        what = f"LoRA rank {args.rank} on {len(targets)} module name(s)"
    else:
        trained = P["transformer"] + (P["text_encoder"] if train_clip else 0)
        what = "transformer" + (" + CLIP" if train_clip else "")
    if deepspeed:
        # module weights in the compute dtype (ZeRO-3 keeps only this process's share resident)
        add("trainable", f"{what}: weights ({mixed})", trained * cb // (n if zero_stage == 3 else 1),
            f"{trained / 1e6:.1f}M params" + (f", 1/{n} per process" if zero_stage == 3 else ""))
        add("trainable", f"{what}: fp32 master copy", trained * 4 // n, f"1/{n} per process")
    else:
        add("trainable", f"{what}: weights (fp32)", trained * 4, f"{trained / 1e6:.1f}M params")

    # ---- optimizer states
    opt = args.optimizer.lower()
    per_param = 16 if opt == "prodigy" else (2 if args.use_8bit_adam else 8)
    opt_name = "prodigy (4 fp32 buffers)" if opt == "prodigy" else ("8-bit AdamW (2 x int8)" if args.use_8bit_adam else "AdamW (2 x fp32)")
    add("optimizer", opt_name, trained * per_param // n, f"1/{n} per process" if deepspeed else "")

    # ---- caches
    images = _count_images(args)
    caching = not getattr(args, "no_cache", False)
    lat_side = args.resolution // arch.vae_scale
    if caching and images is not None:
        samples = images * max(1, args.repeats) * (2 if args.with_prior_preservation else 1)  # at most one per sample
        add("caches", "VAE latent moments", samples * 2 * arch.latent_channels * lat_side * lat_side * cb,
            f"{samples} image(s), mean + logvar")
        prompts = 1 if not args.caption_column else samples
        add("caches", "text embeddings", prompts * (args.max_sequence_length * arch.transformer["joint_attention_dim"]
                                                    + arch.transformer["pooled_projection_dim"]) * 4,
            f"{prompts} prompt(s) x {args.max_sequence_length} T5 tokens")
    if zero_stage == 3:
        add("trainable", "ZeRO-3 gathered working set", min(DEEPSPEED_STAGE3_LIVE, trained) * cb,
            "stage3_max_live_parameters, compute dtype")

    if on_cpu:
        add("runtime", "CPU runtime (kernel caches, heap)", CPU_RUNTIME_BYTES["lora" if lora else "full"],
            "measured constant, see CPU_RUNTIME_BYTES")
        if deepspeed:
            add("runtime", "DeepSpeed engine and gloo on CPU", CPU_DEEPSPEED_BYTES, "measured constant")
    static = sum(i.bytes for i in items)

    # ---- forward + backward
    batch = args.train_batch_size * (2 if args.with_prior_preservation else 1)
    img_tokens = (args.resolution // arch.vae_scale // 2) ** 2
    tokens = batch * (img_tokens + args.max_sequence_length)
    ckpt = bool(args.gradient_checkpointing)
    mode = "lora" if lora else "full"
    double, single, outer = ACTIVATION_CONSTANTS[(regime, mode, ckpt)]
    d, Ld, Ls = arch.hidden, arch.transformer["num_layers"], arch.transformer["num_single_layers"]
    saved = int(tokens * d * (Ld * double + Ls * single) + batch * img_tokens * d * outer)
    bw = [Item("activations", "saved for backward", saved,
               f"{batch} x ({img_tokens} image + {args.max_sequence_length} T5 tokens), {Ld}+{Ls} blocks, "
               f"checkpointing {'on' if ckpt else 'off'}")]
    if ckpt:
        full_double, full_single, _ = ACTIVATION_CONSTANTS[(regime, mode, False)]
        bw.append(Item("activations", "one block recomputed", int(tokens * d * max(full_double, full_single)),
                       "gradient checkpointing"))
    if regime == "autocast":
        bw.append(Item("trainable", "autocast copies of trained weights", trained * cb, f"{mixed}, while forward/backward run"))
    # gradients held during backward; at the step, gradients + the optimizer's temporaries
    if not deepspeed:
        grads_bw = grads_step = trained * 4
        grad_note = "fp32, full size"
    elif zero_stage == 1:
        grads_bw, grads_step = trained * cb, trained * cb + trained * 4 // n
        grad_note = f"{mixed} full size; fp32 1/{n} at the step"
    else:
        # on CPU only the touched part of DeepSpeed's bucket is resident; on devices all of it
        bucket = min(DEEPSPEED_REDUCE_BUCKET, trained) if on_cpu else DEEPSPEED_REDUCE_BUCKET
        grads_bw = bucket * cb + trained * cb // n
        grads_step = trained * cb // n + trained * 4 // n
        grad_note = f"{bucket / 1e6:.0f}M-element {mixed} reduce bucket + 1/{n} partition; fp32 1/{n} at the step"
    # torch's foreach AdamW (the default on accelerators) makes one fp32 temporary per parameter
    step_temp = 0 if (on_cpu or opt == "prodigy" or args.use_8bit_adam) else trained * 4 // n
    act_total = sum(i.bytes for i in bw if i.group == "activations")
    # gradients of late blocks appear while their activations are freed: the backward phase
    # holds about the larger of the two, never both in full
    other_bw = sum(i.bytes for i in bw if i.group != "activations")
    backward = max(act_total, grads_bw) + other_bw
    step = grads_step + step_temp
    items += bw
    items.append(Item("gradients", "gradients", max(grads_bw, grads_step), grad_note))
    if step_temp:
        items.append(Item("transient", "optimizer step temporaries", step_temp, "foreach AdamW, fp32"))
    # VAE encoding (every image of the first epoch, every step with --no_cache) runs before the
    # transformer and frees its feature maps before it starts: a phase of its own. Its peak is
    # (4 + layers_per_block) maps of the first block's width at full resolution, measured on CPU
    # (bench: small and dev VAEs at 256 and 512 px), plus the fp32 pixel batch.
    encode = batch * args.resolution ** 2 * (arch.vae_first_channels * (4 + arch.vae_layers_per_block) * cb + 3 * 4)
    items.append(Item("transient", "VAE encoding", encode, f"{batch} image(s) at {args.resolution}px, first epoch or --no_cache"))
    if visiting:
        items.append(Item("transient", "offloaded encoders visiting", visiting, "--offload_encoders, while encoding"))
        encode += visiting
    # On CPU the runtime's caches form during the first forward/backward, after the first encoding.
    encode_phase = encode - (CPU_RUNTIME_BYTES[mode] if on_cpu and caching else 0)
    peak = static + max(backward, step, encode_phase)
    # Loading: the frozen weights, plus the transformer as it arrives on the device before DeepSpeed or
    # the optimizer touches it. from_pretrained reads it in fp32 into host memory (a CPU device's own
    # memory: every process holds it whole, under ZeRO-3 too); a LoRA base is cast to the compute dtype
    # on the host first (it is then the static base above); a full fine-tune outside ZeRO-3 moves the
    # fp32 weights to the device, where DeepSpeed ZeRO-1/2 casts them to the compute dtype; ZeRO-3 moves
    # and partitions them one parameter at a time (DeepSpeed's conversion of an unpartitioned module),
    # so a device never holds more than the largest one whole.
    frozen = sum(i.bytes for i in items if i.group == "weights" and not i.name.startswith("transformer base"))
    if on_cpu and quant == "none":
        arriving = P["transformer"] * 4
    elif on_cpu and quant == "nf4":  # off CUDA, fluxkit.quant loads it in the compute dtype, then swaps in NF4
        arriving = P["transformer"] * cb
    elif lora:
        arriving = sum(i.bytes for i in items if i.name.startswith("transformer base"))
    elif zero_stage == 3:
        arriving = max(i * o for _, i, o in arch.linear_shapes) * 4
    else:
        arriving = trained * 4
    loading = frozen + arriving
    peak = max(peak, loading)
    summary = {"run": "LoRA" if lora else "full", "resolution": args.resolution, "batch": args.train_batch_size,
               "mixed_precision": mixed, "regime": regime, "trained_params": trained, "image_tokens": img_tokens,
               "text_tokens": args.max_sequence_length, "gradient_checkpointing": ckpt, "base_quantization": quant,
               "architecture": arch.source, "params": arch.params}
    return Plan(items=items, static_bytes=static, backward_bytes=backward, step_bytes=step, encode_bytes=encode,
                loading_bytes=loading, peak_bytes=peak,
                device=device, device_memory_bytes=device_memory_bytes, world_size=world_size, zero_stage=zero_stage,
                summary=summary)


def _default_targets() -> list[str]:
    from .families import get

    return list(get("flux1").lora_targets)


# ------------------------------------------------------------------------------ device memory

def device_memory_bytes(device_info, processes_per_host: int = 1) -> int | None:
    """Memory one process may use: the accelerator's total, or on CPU the host's RAM shared by
    its processes. None when it cannot be told."""
    import torch

    try:
        if device_info.type == "cuda":
            return int(torch.cuda.get_device_properties(0).total_memory)
        if device_info.type == "npu":
            return int(torch.npu.get_device_properties(0).total_memory)
        import psutil

        return int(psutil.virtual_memory().total // max(1, processes_per_host))
    except Exception:  # a broken driver must not stop a launch: the plan is advice
        return None


def launched_zero_stage() -> int:
    """The ZeRO stage `accelerate launch` set up for this process (0 without DeepSpeed), read from the
    environment it exports, so a trainer can plan before its Accelerator exists."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("1", "true"):
        return 0
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")  # a DeepSpeed JSON holds the stage instead
    try:
        with open(config) as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    except (TypeError, OSError, ValueError, AttributeError):
        return 0


def remedies(plan: Plan, args) -> str:
    """What would shrink this run, most effective first, from the flags it was planned with."""
    s = plan.summary
    out = []
    if not s["gradient_checkpointing"]:
        out.append("add --gradient_checkpointing")
    out.append("lower --train_batch_size or --resolution")
    if s["run"] == "LoRA" and s["base_quantization"] == "none":  # (int8 is refused under DeepSpeed: fluxkit.quant)
        out.append("quantize the frozen base (--base_quantization " + ("nf4)" if plan.zero_stage else "nf4 or int8)"))
    if not getattr(args, "offload_encoders", False) and plan.device != "cpu":
        out.append("keep the encoders in host memory (--offload_encoders)")
    if s["run"] == "full" and plan.zero_stage != 3:
        out.append("shard the weights over more processes with ZeRO-3 (pretrain_bf16_zero3_accelerate_config.yaml)")
    return ", ".join(out)


def check_fits(args, world_size: int, zero_stage: int, device_info, processes_per_host: int | None = None,
               model_dir: str | None = None, ignore: bool | None = None) -> tuple[Plan | None, str]:
    """The pre-flight of the launchers and the trainers: (the plan, the line to show for it).

    args: the trainer's parsed flags (train_args.parse_args); world_size: processes in the run;
    zero_stage: 0 without DeepSpeed, else its stage; device_info: fluxkit.device.DeviceInfo;
    processes_per_host: processes on this machine (default world_size), which share a CPU host's
    memory; model_dir: the pipeline folder to read (default args.pretrained_model_name_or_path).
    The device's memory is args.device_memory_gb when given, else detected.

    Raises UserError (one line: the plan's summary and what to change) when the plan exceeds the
    device's usable memory, unless args.ignore_memory_plan (or `ignore`): then it comes back
    (plan.fits is False: show the line as a warning). Anything else that keeps the plan from being made (an unreadable config, a hub id
    with no local files, an unknown driver) never stops a run: the plan is advice, and the plan
    comes back as None with a line that says why.
    """
    ignore = getattr(args, "ignore_memory_plan", False) if ignore is None else ignore
    stated = getattr(args, "device_memory_gb", None)
    try:
        if stated:
            memory = int(stated * GiB)
        else:
            sharing = (processes_per_host or world_size) if device_info.type == "cpu" else 1
            memory = device_memory_bytes(device_info, sharing)
        arch = read_architecture(model_dir) if model_dir else None
        plan = plan_memory(args, world_size, zero_stage, device_info.type, memory, arch)
    except Exception as err:  # noqa: BLE001 - an unreadable config must not stop training
        return None, f"memory plan: unavailable ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
    if plan.fits is False:
        if not ignore:
            raise UserError(f"{plan.one_line()}; to fit: {remedies(plan, args)}; or run anyway with --ignore_memory_plan")
        return plan, f"{plan.one_line()}; going on anyway (--ignore_memory_plan)"
    return plan, plan.one_line()


# ------------------------------------------------------------------------------ calibration

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

    from .tiny import _transformer

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


# ------------------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags (LoRA's included) plus the plan's own."""
    from .train_args import build_parser as trainer_parser

    p = trainer_parser(lora=True)
    p.prog = "python -m fluxkit.plan"
    p.description = ("Per-device peak memory of a training run, from the trainer's flags and the model's configs "
                     "(no weights are loaded). LoRA flags apply with --lora.")
    for action in p._actions:  # the plan needs no data or prompt
        if action.dest in ("instance_prompt",):
            action.required = False
    g = p.add_argument_group("memory plan")
    g.add_argument("--lora", action="store_true", help="plan train_flux_dreambooth_lora.py (default: the full fine-tune)")
    g.add_argument("--num_processes", type=int, default=1, help="processes (devices) in the run")
    g.add_argument("--zero_stage", type=int, default=None,
                   help="DeepSpeed ZeRO stage (0 = no DeepSpeed); default 2 with several processes, else 0")
    g.add_argument("--architecture", default=None, help="plan a tiny.py preset's architecture (dev = FLUX.1-dev) instead of the folder's")
    g.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    g.add_argument("--calibrate", action="store_true", help="measure the activation constants on this CPU and compare")
    p.set_defaults(max_sequence_length=None)  # the full and LoRA trainers differ: filled in by parse()
    return p


def parse(argv, parser=None) -> argparse.Namespace:
    """The plan's flags; defaults the two trainers disagree on (T5 tokens) follow --lora."""
    from .train_args import build_parser as trainer_parser

    args = (parser or build_parser()).parse_args(argv)
    if args.max_sequence_length is None:
        args.max_sequence_length = trainer_parser(lora=args.lora).get_default("max_sequence_length")
    return args


def _calibrate() -> int:
    print("regime     mode  ckpt  double(table/measured)  single(table/measured)  outer(table/measured)")
    for (regime, mode, ckpt), table in ACTIVATION_CONSTANTS.items():
        measured = measure_activation_constants(regime, mode, ckpt)
        cells = "  ".join(f"{t:6.1f} / {m:6.1f}        " for t, m in zip(table, measured))
        print(f"{regime:<10} {mode:<5} {'on' if ckpt else 'off':<4}  {cells}")
    return 0


@cli
def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--calibrate" in argv:
        return _calibrate()
    args = parse(argv, parser)
    if args.resolution <= 0 or args.resolution % 16:
        raise UserError(f"--resolution {args.resolution} must be a positive multiple of 16")
    if args.train_batch_size <= 0:
        raise UserError(f"--train_batch_size {args.train_batch_size} must be a positive integer")
    if args.device_memory_gb is not None and args.device_memory_gb <= 0:
        raise UserError(f"--device_memory_gb {args.device_memory_gb} must be positive (GiB of one device)")
    zero = args.zero_stage if args.zero_stage is not None else (2 if args.num_processes > 1 else 0)
    device = args.device
    if device == "auto":
        if args.device_memory_gb:
            device = "cuda"  # a stated device size: plan for an accelerator
        else:
            from .device import detect

            device = detect("auto").type
    memory = int(args.device_memory_gb * GiB) if args.device_memory_gb else None
    plan = plan_memory(args, args.num_processes, zero, device, memory)
    print(plan.table())
    print(plan.one_line())
    if args.json:
        from .fsio import atomic_write_json

        atomic_write_json(args.json, plan.to_json())
    return 0 if plan.fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
