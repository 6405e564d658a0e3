"""The plan: a run's phases in the order fluxkit.training.train runs them, what each holds on one device,
and host memory per process beside it. The peak is the largest phase, never a sum across them.

    encode       text encoders and the VAE fill the cache (skipped with a warm cache); with
                 --no_cache they stay for the whole run and encode every step instead
    load         the transformer arrives; only the VAE decoder (and a CLIP that trains) remain
    train        forward + backward (activations, gradients), then the optimizer step
    validate     one image rendered (with --validation_prompt)
    save         weights written (the optimizer's states still exist)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from . import terms
from .architecture import Architecture, read_architecture
from .shape import RunShape, shape_from_args
from .terms import Item

GiB = 2**30
# Share of the device's memory the plan may use: CUDA/NPU contexts, kernels' workspaces and
# allocator fragmentation take the rest.
HEADROOM_FRACTION = 0.92


@dataclass
class Phase:
    name: str
    items: list  # Item: what is on the device during this phase
    host_bytes: int = 0  # host memory of one process during this phase (an accelerator's run)
    note: str = ""

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)


@dataclass
class Plan:
    phases: list
    device: str
    device_memory_bytes: int | None
    world_size: int
    zero_stage: int
    summary: dict
    shape: RunShape | None = None  # what it was planned from (fit.smallest_change re-plans variations)
    arch: Architecture | None = None

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak_phase.bytes

    @property
    def host_peak_bytes(self) -> int:
        """Host memory of one process at its highest (on a CPU device: the same as the device)."""
        return self.peak_bytes if self.device == "cpu" else max(p.host_bytes for p in self.phases)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    @property
    def items(self) -> list:
        """Every distinct item of every phase (for a listing)."""
        seen, out = set(), []
        for p in self.phases:
            for i in p.items:
                if (i.group, i.name) not in seen:
                    seen.add((i.group, i.name))
                    out.append(i)
        return out

    @property
    def fits(self) -> bool | None:
        if not self.device_memory_bytes:
            return None
        return self.peak_bytes <= HEADROOM_FRACTION * self.device_memory_bytes

    def one_line(self) -> str:
        s = self.summary
        what = (f"{s['run']} {s['resolution']}px batch {s['batch']} on {self.world_size} process(es), "
                + (f"ZeRO-{self.zero_stage}" if self.zero_stage else "no DeepSpeed"))
        line = f"memory plan: {self.peak_bytes / GiB:.1f} GiB peak per device ({what}), in {self.peak_phase.name}"
        if self.device_memory_bytes:
            verdict = "fits" if self.fits else "does NOT fit"
            line += f"; {verdict} in {self.device_memory_bytes / GiB:.1f} GiB ({HEADROOM_FRACTION:.0%} usable)"
        return line

    def to_json(self) -> dict:
        out = {"device": self.device, "device_memory_bytes": self.device_memory_bytes, "world_size": self.world_size,
               "zero_stage": self.zero_stage, "summary": self.summary}
        out["phases"] = [{"name": p.name, "bytes": p.bytes, "host_bytes": p.host_bytes, "note": p.note,
                          "items": [asdict(i) for i in p.items]} for p in self.phases]
        out.update(fits=self.fits, peak_bytes=self.peak_bytes, peak_phase=self.peak_phase.name,
                   peak_gib=self.peak_bytes / GiB, host_peak_bytes=self.host_peak_bytes)
        return out

    def table(self) -> str:
        rows = []
        for p in self.phases:
            rows.append((p.name.upper(), "on the device", f"{p.bytes / GiB:9.3f}",
                         (p.note + "; " if p.note else "") + f"host {p.host_bytes / GiB:.2f} GiB per process"
                         if self.device != "cpu" else p.note))
            rows += [("", i.name, f"{i.bytes / GiB:9.3f}", i.note) for i in p.items if i.bytes]
        rows.append(("PEAK", f"per device ({self.peak_phase.name})", f"{self.peak_bytes / GiB:9.3f}", "the largest phase"))
        if self.device != "cpu":
            rows.append(("HOST", "per process, at most", f"{self.host_peak_bytes / GiB:9.3f}",
                         f"x {self.summary['processes_per_host']} process(es) per machine"))
        widths = [max(len(r[k]) for r in rows + [("phase", "item", "GiB", "")]) for k in range(3)]
        lines = [f"{'phase':<{widths[0]}}  {'item':<{widths[1]}}  {'GiB':>{widths[2]}}  note"]
        lines += [f"{g:<{widths[0]}}  {n:<{widths[1]}}  {b:>{widths[2]}}  {note}".rstrip() for g, n, b, note in rows]
        return "\n".join(lines)


def plan_memory(args, world_size: int = 1, zero_stage: int = 0, device: str = "cuda",
                device_memory_bytes: int | None = None, arch: Architecture | None = None,
                offload: tuple[bool, bool] = (False, False), processes_per_host: int | None = None,
                warm_cache: bool = False) -> Plan:
    """The per-device memory of the run `args` (a TrainConfig) describes, phase by phase (warm_cache: the
    cache already holds everything, as `python -m fluxkit.plan --warm_cache` says)."""
    arch = arch or read_architecture(args.pretrained_model_name_or_path, family=args.model_family)
    s = shape_from_args(args, world_size, zero_stage, device, offload, warm_cache, arch)
    return plan_shape(s, arch, device_memory_bytes, processes_per_host or world_size)


def plan_shape(s: RunShape, arch: Architecture, device_memory_bytes: int | None = None,
               processes_per_host: int = 1) -> Plan:
    if _text_goes_to_host(s, arch, device_memory_bytes):
        s = replace(s, text_on_host=True)
    trained = terms.trained_parameters(s, arch)
    encoders = terms.encoder_weights(s, arch)
    # a device that is the host keeps no encoder "elsewhere"; with a cache they leave after encoding
    encoders_stay = not s.caching and not (s.offload_encoders and not s.on_cpu)
    around = (terms.caches(s, arch) + terms.trained_clip_weights(s, arch)
              + (encoders if encoders_stay else terms.pivotal_encoders(s, arch)))
    if not encoders_stay:
        around = [terms.vae_decoder_weights(s, arch)] + around
    phases = []
    if s.caching and not s.warm_cache:
        phases.append(_encode_phase(s, arch, encoders))
    phases.append(Phase("load", around + [terms.transformer_arriving(s, arch, trained)],
                        host_bytes=terms.host_transformer_read(s, arch), note="the transformer arrives"))
    resident = (around + ([terms.transformer_base(s, arch)] if s.lora else []) + terms.block_offload(s, arch)
                + terms.trainable_weights(s, trained) + [terms.optimizer_states(s, trained)]
                + terms.zero3_working_set(s, arch, trained))
    host_train = sum(i.bytes for i in terms.host_offloaded(s, arch, trained))
    grads_bw, grads_step, grad_note = terms.gradients(s, trained)
    acts = terms.activations(s, arch)
    # gradients of late blocks appear while their activations are freed: backward holds about the
    # larger of the two, never both in full
    held = [Item("gradients", "gradients (backward)", grads_bw, grad_note),
            Item("overlap", "gradients fill freed activations", -min(grads_bw, sum(i.bytes for i in acts)),
                 "backward holds about the larger of the two")]
    fwd_bwd = (resident + acts + held + terms.pivotal_t5_backward(s, arch) + terms.autocast_copies(s, trained)
               + terms.cpu_runtime(s, arch))
    if not s.caching:  # encoding every step, before the forward pass
        fwd_bwd = fwd_bwd + [terms.vae_encoding(s, arch)]
        if s.offload_encoders and not s.on_cpu:
            fwd_bwd += [Item("transient", "offloaded encoders visiting", sum(i.bytes for i in encoders), "--offload_encoders")]
    phases.append(Phase("train: forward + backward", fwd_bwd, host_bytes=host_train))
    step = [Item("gradients", "gradients (step)", grads_step, grad_note)]
    temp = terms.step_temporaries(s, trained)
    if temp:
        step.append(Item("transient", "optimizer step temporaries", temp, "foreach AdamW, fp32"))
    phases.append(Phase("train: optimizer step", resident + step + terms.cpu_runtime(s, arch), host_bytes=host_train))
    if s.validates:
        phases.append(Phase("validate", resident + terms.validation_working_set(s, arch) + terms.cpu_runtime(s, arch),
                            host_bytes=host_train, note="one image, from cached prompt embeddings"))
    save_host = trained * (s.cb if s.deepspeed else 4) if not s.lora else 0
    phases.append(Phase("save", resident + terms.cpu_runtime(s, arch), host_bytes=host_train + save_host,
                        note="weights copied to host memory and written"))
    summary = {"run": "LoRA" if s.lora else "full", "text_encoders_on": "host" if s.text_on_host else "device", "resolution": s.resolution, "batch": s.batch,
               "mixed_precision": s.mixed, "regime": s.regime, "trained_params": trained,
               "image_tokens": terms.image_tokens(s, arch), "text_tokens": s.seq_len,
               "reference_images": s.references, "family": arch.family,
               "gradient_checkpointing": s.checkpointing, "base_quantization": s.quant,
               "text_encoder_quantization": s.text_quant,
               "blocks_to_swap": s.blocks_to_swap, "blocks": len(arch.block_params),
               "offload": {"params": s.offload_params, "optimizer": s.offload_optimizer},
               "architecture": arch.source, "params": arch.params, "processes_per_host": processes_per_host}
    return Plan(phases, s.device, device_memory_bytes, s.world, s.zero_stage, summary, s, arch)


def _text(items) -> list:
    return [i for i in items if " text encoder " in i.name]


def _encode_phase(s: RunShape, arch: Architecture, encoders: list) -> Phase:
    """The encoders fill the cache: all on the device, or with text_on_host the text encoders on the
    host CPU (their weights and their working set in host memory) and only the VAE on the device."""
    text = _text(encoders) if s.text_on_host else []
    vae_side = [i for i in encoders if i not in text] + [terms.vae_encoding(s, arch)]
    host = terms.host_encoders_read(s, arch)
    if s.text_on_host:
        return Phase("encode", vae_side + terms.caches(s, arch), host_bytes=host,
                     note="the VAE fills the cache; the text encoders run on the host CPU (they do not fit beside it)")
    # one at a time: quantizing the text encoders as they load, encoding prompts, encoding images
    encoding = max(vae_side[-1], terms.text_encoding(s, arch), terms.text_quantizing(s, arch), key=lambda i: i.bytes)
    return Phase("encode", encoders + [encoding] + terms.caches(s, arch), host_bytes=host,
                 note="encoders read into host memory, fill the cache on the device, then leave")


def _text_goes_to_host(s: RunShape, arch: Architecture, device_memory_bytes: int | None) -> bool:
    """Whether the text encoders should encode on the host: an accelerator run whose encoders, all on
    the device, would not fit in it (encoding a few prompts on the CPU costs seconds to minutes; a run
    refused for it costs the run). A CPU device is the host already."""
    if s.on_cpu or s.text_on_host or not s.caching or s.warm_cache or not device_memory_bytes:
        return False
    return _encode_phase(s, arch, terms.encoder_weights(s, arch)).bytes > HEADROOM_FRACTION * device_memory_bytes
