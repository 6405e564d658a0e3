"""step-levers: what each candidate speed lever does to one CPU training step, and to the numbers.

One process builds the `small` preset's transformer once per variant (same seed, same inputs:
256x256 latents, batch 2; LoRA r4 on the default layers with 512 T5 tokens, the full fine-tune with
77; fp32, AdamW 1e-4), runs one warm-up step of each (torch.compile compiles there), then
`--lever_rounds` rounds that alternate the variants step by step, the order reversed every round,
so a change in the host's load hits them alike. Per variant: CPU seconds per step
(time.process_time: every thread of this process; on a shared host it moves far less than the wall
time), wall seconds per step, the warm-up's wall time, and whether the trained weights are
bit-identical to the default's after the same steps (else the largest difference), and the wall
time's MFU against this host's fp32 matmul peak (fluxkit.shared.flops; `--allow_tf32` may pass 100).
"""

from __future__ import annotations

import contextlib
import time

import torch

from fluxkit.plan.architecture import default_lora_targets
from fluxkit.shared import flops

from .. import harness
from .upstream import BATCH, RESOLUTION, T5_TOKENS

# name: (modes it applies to, what it changes)
VARIANTS = {
    "default": (("lora", "full"), "2 threads, SDPA flash kernel, single-tensor AdamW"),
    "allow_tf32": (("lora", "full"), "--allow_tf32: torch's 'medium' fp32 matmul precision"),
    "sdpa_math": (("lora",), "SDPA math kernel"),
    "one_thread": (("lora", "full"), "1 OpenMP thread"),
    "fused_adamw": (("full",), "AdamW fused=True"),
    "foreach_adamw": (("full",), "AdamW foreach=True"),
    "compile": ((), "torch.compile of the transformer (only with --lever_compile)"),
}


def _model(model_path: str, mode: str, variant: str):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_pretrained(model_path, subfolder="transformer")
    model.requires_grad_(mode == "full")
    if mode == "lora":
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=default_lora_targets()))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    adam = {"fused_adamw": {"fused": True}, "foreach_adamw": {"foreach": True}}.get(variant, {"foreach": False})
    call = torch.compile(model) if variant == "compile" else model
    return model, call, torch.optim.AdamW(params, lr=1e-4, **adam)


def _inputs(mode: str, batch: int = BATCH, side: int = RESOLUTION // 16) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = T5_TOKENS[mode]
    ids = torch.arange(side, dtype=torch.float32)
    img_ids = torch.stack([torch.zeros(side * side), ids.repeat_interleave(side), ids.repeat(side)], 1)
    return (dict(hidden_states=torch.randn(batch, side * side, 64, generator=g),
                 encoder_hidden_states=torch.randn(batch, text, 256, generator=g),
                 pooled_projections=torch.randn(batch, 128, generator=g), timestep=torch.rand(batch, generator=g),
                 img_ids=img_ids, txt_ids=torch.zeros(text, 3), guidance=torch.ones(batch), return_dict=False),
            torch.randn(batch, side * side, 64, generator=g))


def _step(setup, variant: str, inputs: dict, target: torch.Tensor) -> tuple[float, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, call, optimizer = setup
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    if variant == "one_thread":
        torch.set_num_threads(1)
    if variant == "allow_tf32":
        torch.set_float32_matmul_precision("medium")
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        with sdpa_kernel([SDPBackend.MATH]) if variant == "sdpa_math" else contextlib.nullcontext():
            loss = torch.nn.functional.mse_loss(call(**inputs)[0].float(), target)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)


def _measure(ctx, mode: str, names: list[str]) -> list[dict]:
    inputs, target = _inputs(mode)
    setups = {name: _model(ctx.small_assets()["model_path"], mode, name) for name in names}
    warmup = {name: _step(setups[name], name, inputs, target)[0] for name in names}
    walls: dict[str, list[float]] = {name: [] for name in names}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(ctx.args.lever_rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            wall, cpu = _step(setups[name], name, inputs, target)
            walls[name].append(wall)
            cpus[name].append(cpu)
    reference = [p for p in setups["default"][0].parameters() if p.requires_grad]
    step_flops = flops.training_step_flops(setups["default"][0].config, flops.image_tokens(RESOLUTION, RESOLUTION), T5_TOKENS[mode],
                                           batch=BATCH, frozen_base=mode == "lora")
    peak = harness.process_peak_flops(ctx.device, torch.float32, 1)
    rows = []
    for name in names:
        trained = [p for p in setups[name][0].parameters() if p.requires_grad]
        difference = max((a - b).abs().max().item() for a, b in zip(reference, trained))
        rows.append({"case": f"{mode}: {name}", "params": {"what": VARIANTS[name][1], "rounds": ctx.args.lever_rounds},
                     "metrics": {"cpu s/step": harness.summarize(cpus[name]), "wall s/step": harness.summarize(walls[name]),
                                 "warm-up wall s": harness.summarize([warmup[name]]),
                                 "MFU % (wall)": harness.summarize(100 * flops.mfu(step_flops, t, peak) for t in walls[name])
                                 if peak else None,
                                 "max weight diff vs default": harness.summarize([difference])}})
    return rows


def run(ctx) -> dict:
    rows, comparisons = [], []
    for mode in ("lora", "full"):
        names = [n for n, (modes, _) in VARIANTS.items() if mode in modes or (n == "compile" and ctx.args.lever_compile)]
        mode_rows = _measure(ctx, mode, names)
        rows += mode_rows
        base = mode_rows[0]["metrics"]["cpu s/step"]
        comparisons += [{"name": f"{row['case']} / default", "metric": "cpu s/step",
                         **harness.compare(base, row["metrics"]["cpu s/step"])} for row in mode_rows[1:]]
    notes = ["small preset, 256x256, batch 2, fp32, AdamW; LoRA r4 with 512 T5 tokens, full with 77; one process, "
             f"{torch.get_num_threads()} threads; {ctx.args.lever_rounds} alternating rounds after one warm-up step each",
             "max weight diff vs default 0 = bit-identical trained weights",
             "MFU: model FLOPs of the step (fluxkit.shared.flops) / wall s/step / this host's fp32 matmul peak"]
    return harness.suite_result(rows, comparisons, notes, [])
