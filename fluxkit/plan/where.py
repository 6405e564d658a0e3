"""`python -m fluxkit.plan.where [--write FILE]`: the "what fits where" table of FLUX.1-dev runs,
computed by the plan (never typed): for each card, the run's first rung that fits (the smallest
change fit.smallest_change finds), the plan's peak, the flags, and the published measurement of a
comparable setup beside it. --write replaces the table between WHERE_BEGIN and WHERE_END in FILE
(docs/memory.md); tests/plan/test_plan_where.py checks that file holds what this prints.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from ..shared.errors import FlagParser, UserError, cli
from .architecture import default_lora_targets, read_architecture
from .fit import smallest_change
from .phases import GiB, plan_shape
from .shape import RunShape

WHERE_BEGIN = "<!-- fluxkit.plan.where: begin (generated: python -m fluxkit.plan.where --write FILE) -->"
WHERE_END = "<!-- fluxkit.plan.where: end -->"

# Published peak memory of comparable setups (DESIGN.md, "Published memory")
HF_QLORA = "HF QLoRA (NF4, rank 4, 8-bit Adam, cached, 512x768, RTX 4090): about 9 GB"
HF_BF16 = "HF bf16 LoRA: 26 GB"
REFERENCE = "the reference's own run: 8 x 64 GB Atlas 900 A2, 55.23 images/s"

LORA = RunShape(lora=True, rank=16, targets=(), mixed="bf16", resolution=512, seq_len=512, batch=1,
                checkpointing=False, optimizer="adamw", device="cuda")
QLORA = replace(LORA, rank=4, quant="nf4", optimizer="adamw8bit", checkpointing=True)
FULL = RunShape(lora=False, mixed="bf16", resolution=256, seq_len=77, batch=16, checkpointing=True, world=8,
                zero_stage=2, device="cuda")
# (what, card GB, the starting run, the published measurement beside it)
ROWS = [
    ("LoRA rank 16, 512px, batch 1", 8, LORA, "kohya: 8 GB with 28 blocks swapped (fp8 base)"),
    ("LoRA rank 16, 512px, batch 1", 12, LORA, "kohya: 12 GB with 16 blocks swapped (fp8 base)"),
    ("HF QLoRA recipe: rank 4, NF4, 8-bit Adam", 12, QLORA, HF_QLORA),
    ("LoRA rank 16, 512px, batch 1", 16, LORA, "SimpleTuner int4: 13 GB; kohya: 16 GB, no swap (fp8 base)"),
    ("LoRA rank 16, 512px, batch 1", 24, LORA, "SimpleTuner int8: 18 GB; kohya: 24 GB (fp8 base)"),
    ("LoRA rank 16, 512px, batch 1", 48, LORA, f"{HF_BF16}; SimpleTuner bf16: >30 GB"),
    ("LoRA rank 16, 512px, batch 1", 80, LORA, HF_BF16),
    ("full fine-tune, 256px, batch 16, 1 card", 80, replace(FULL, world=1, zero_stage=0), "none published"),
    ("full fine-tune, 256px, batch 16, 8 cards (the reference's recipe)", 64, FULL, REFERENCE),
]


def describe(s: RunShape) -> list[str]:
    """The flags (and launch) that make a RunShape, as a user types them."""
    out = [f"--rank {s.rank}"] if s.lora else []
    out += ["--gradient_checkpointing"] if s.checkpointing else []
    out += [f"--base_quantization {s.quant}"] if s.quant != "none" else []
    out += ["--use_8bit_adam"] if s.optimizer == "adamw8bit" else []
    out += [f"--blocks_to_swap {s.blocks_to_swap}"] if s.blocks_to_swap else []
    out += ["(prompts encoded on the host: T5 does not fit beside the VAE)"] if s.text_on_host else []
    out += ["a cache filled first on the host (`python -m fluxkit.cache` with the same flags and `--device cpu`)"] \
        if s.warm_cache else []
    if s.offload_params:
        out.append("ZeRO-3 with CPU offload (`pretrain_bf16_zero3_offload_accelerate_config.yaml`)")
    elif s.zero_stage:
        out.append(f"ZeRO-{s.zero_stage}")
    return out


def rows(arch) -> list[dict]:
    out = []
    for what, gb, start, published in ROWS:
        shape = replace(start, targets=tuple(default_lora_targets())) if start.lora else start
        plan = plan_shape(shape, arch, gb * GiB, shape.world)
        fitting = plan if plan.fits else (smallest_change(plan) or (None, None))[1]
        flags = describe(fitting.shape) if fitting else None
        out.append({"run": what, "card": f"{gb} GB" + (" x 8" if shape.world == 8 else ""),
                    "plan": fitting.peak_bytes / GiB if fitting else plan.peak_bytes / GiB,
                    "phase": (fitting or plan).peak_phase.name, "fits": fitting is not None,
                    "flags": flags or ["does not fit: " + ", ".join(describe(shape))], "published": published})
    return out


def markdown(arch) -> str:
    lines = ["| run | card | plan, GiB per device (peak phase) | flags that get there | published measurement |",
             "| --- | --- | ---: | --- | --- |"]
    for r in rows(arch):
        flags = ", ".join(f"`{f}`" if f.startswith("--") else f for f in r["flags"])
        lines.append(f"| {r['run']} | {r['card']} | {r['plan']:.1f} ({r['phase']}) | {flags} | {r['published']} |")
    return "\n".join(lines)


def write_into(path: str, table: str) -> None:
    from ..shared.fsio import atomic_write_text

    with open(path, encoding="utf-8") as f:
        text = f.read()
    if WHERE_BEGIN not in text or WHERE_END not in text:
        raise UserError(f"{path} has no generated-table markers; add the two lines {WHERE_BEGIN!r} and {WHERE_END!r}")
    head, rest = text.split(WHERE_BEGIN, 1)
    tail = rest.split(WHERE_END, 1)[1]
    atomic_write_text(path, f"{head}{WHERE_BEGIN}\n{table}\n{WHERE_END}{tail}")


@cli
def main(argv=None) -> int:
    p = FlagParser(prog="python -m fluxkit.plan.where", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", default=None, help="replace the generated table in this markdown file (README.md, docs/memory.md)")
    args = p.parse_args(argv)
    table = markdown(read_architecture("black-forest-labs/FLUX.1-dev"))
    print(table)
    if args.write:
        write_into(args.write, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
