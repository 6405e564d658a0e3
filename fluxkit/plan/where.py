"""`python -m fluxkit.plan.where [--write FILE] [--short]`: the "what fits where" table of FLUX
family runs (FLUX.1 [dev], Kontext, FLUX.2 [dev], FLUX.2 [klein] 4B and 9B), computed by the plan
(never typed): for each card, the run's first rung that fits (the smallest change
fit.smallest_change finds), the plan's peak per device and host RAM per process, the flags, and the
published measurement of a comparable setup beside it. --write replaces the table between the
markers in FILE: docs/memory.md holds the full table, README.md the short one (rows marked readme);
tests/plan/test_plan_where.py checks both files hold what this prints.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from ..shared.errors import FlagParser, UserError, cli
from .architecture import default_lora_targets, read_architecture
from .fit import smallest_change
from .phases import GiB, plan_shape
from .shape import RunShape

WHERE_BEGIN = "<!-- fluxkit.plan.where: begin (generated: python -m fluxkit.plan.where --write FILE) -->"
WHERE_END = "<!-- fluxkit.plan.where: end -->"
# the README's short copy (a front door: a few rows) has markers of its own
SHORT_BEGIN = "<!-- fluxkit.plan.where short: begin (generated: python -m fluxkit.plan.where --write FILE) -->"
SHORT_END = "<!-- fluxkit.plan.where short: end -->"

FLUX1, KONTEXT = "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-Kontext-dev"
FLUX2, KLEIN4, KLEIN9 = "black-forest-labs/FLUX.2-dev", "black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-9B"
NAMES = {FLUX1: "FLUX.1 [dev]", KONTEXT: "FLUX.1 Kontext [dev]", FLUX2: "FLUX.2 [dev]",
         KLEIN4: "FLUX.2 [klein] 4B", KLEIN9: "FLUX.2 [klein] 9B"}

# Published peak memory of comparable setups (issues 20 and 21 name their sources)
HF_QLORA = "HF QLoRA (NF4, rank 4, 8-bit Adam, cached, 512x768, RTX 4090): about 9 GB"
HF_BF16 = "HF bf16 LoRA: 26 GB"
REFERENCE = "the reference's own run: 8 x 64 GB Atlas 900 A2, 55.23 images/s"
SIMPLETUNER_FLUX2 = "SimpleTuner: about 22 GB with an int4 text encoder and an int8 transformer, 96 GB+ system RAM"
MINDSPEED = "MindSpeed-MM {what} LoRA, 8 NPUs at 1024 px: {speed} images/s (memory not published)"

LORA = RunShape(lora=True, rank=16, targets=(), mixed="bf16", resolution=512, seq_len=512, batch=1,
                checkpointing=False, optimizer="adamw", device="cuda")
QLORA = replace(LORA, rank=4, quant="nf4", optimizer="adamw8bit", checkpointing=True)
FULL = RunShape(lora=False, mixed="bf16", resolution=256, seq_len=77, batch=16, checkpointing=True, world=8,
                zero_stage=2, device="cuda")
LORA_1024 = replace(LORA, resolution=1024, checkpointing=True)
EDIT_1024 = replace(LORA_1024, references=1)
ON_8 = dict(world=8, zero_stage=2)


@dataclass(frozen=True)
class Row:
    run: str
    model: str  # a hub id whose architecture the plan knows (fluxkit.families' hub_presets)
    card_gb: int
    start: RunShape  # the run as asked; the table shows the first change of it that fits
    published: str
    readme: bool = False  # also in the README's short table


ROWS = [
    Row("LoRA rank 16, 512px, batch 1", FLUX1, 8, LORA, "kohya: 8 GB with 28 blocks swapped (fp8 base)"),
    Row("LoRA rank 16, 512px, batch 1", FLUX1, 12, LORA, "kohya: 12 GB with 16 blocks swapped (fp8 base)"),
    Row("HF QLoRA recipe: rank 4, NF4, 8-bit Adam", FLUX1, 12, QLORA, HF_QLORA, readme=True),
    Row("LoRA rank 16, 512px, batch 1", FLUX1, 16, LORA, "SimpleTuner int4: 13 GB; kohya: 16 GB, no swap (fp8 base)"),
    Row("LoRA rank 16, 512px, batch 1", FLUX1, 24, LORA, "SimpleTuner int8: 18 GB; kohya: 24 GB (fp8 base)", readme=True),
    Row("LoRA rank 16, 512px, batch 1", FLUX1, 48, LORA, f"{HF_BF16}; SimpleTuner bf16: >30 GB"),
    Row("LoRA rank 16, 512px, batch 1", FLUX1, 80, LORA, HF_BF16),
    Row("full fine-tune, 256px, batch 16, 1 card", FLUX1, 80, replace(FULL, world=1, zero_stage=0), "none published"),
    Row("full fine-tune, 256px, batch 16, 8 cards (the reference's recipe)", FLUX1, 64, FULL, REFERENCE, readme=True),
    Row("editing LoRA rank 16, 1024px, batch 1", KONTEXT, 24, EDIT_1024, "SimpleTuner int8: 24 GB at 1024 px", readme=True),
    Row("editing LoRA rank 16, 1024px, batch 1, 8 cards", KONTEXT, 64, replace(EDIT_1024, **ON_8),
        MINDSPEED.format(what="Kontext", speed="1.97")),
    Row("LoRA rank 16, 1024px, batch 1", KLEIN4, 12, LORA_1024, "SimpleTuner bf16: about 12 GB", readme=True),
    Row("LoRA rank 16, 1024px, batch 1", KLEIN4, 8, LORA_1024, "SimpleTuner int8: about 8 GB"),
    Row("LoRA rank 16, 1024px, batch 1", KLEIN9, 24, LORA_1024, "SimpleTuner bf16: about 22 GB", readme=True),
    Row("LoRA rank 16, 1024px, batch 1", KLEIN9, 16, LORA_1024, "SimpleTuner int8: about 14 GB"),
    Row("LoRA rank 16, 1024px, batch 1", FLUX2, 24, LORA_1024, SIMPLETUNER_FLUX2),
    Row("LoRA rank 16, 1024px, batch 1, 4-bit text encoder", FLUX2, 24, replace(LORA_1024, text_quant="nf4", quant="int8"),
        SIMPLETUNER_FLUX2, readme=True),
    Row("LoRA rank 16, 1024px, batch 1, 8 cards", FLUX2, 64, replace(LORA_1024, **ON_8),
        MINDSPEED.format(what="FLUX.2", speed="1.28")),
]


def describe(s: RunShape) -> list[str]:
    """The flags (and launch) that make a RunShape, as a user types them."""
    out = [f"--rank {s.rank}"] if s.lora else []
    out += ["(editing pairs: `--cond_image_dir`)"] if s.references else []
    out += ["--gradient_checkpointing"] if s.checkpointing else []
    out += [f"--base_quantization {s.quant}"] if s.quant != "none" else []
    out += [f"--text_encoder_quantization {s.text_quant}"] if s.text_quant != "none" else []
    out += ["--use_8bit_adam"] if s.optimizer == "adamw8bit" else []
    out += [f"--blocks_to_swap {s.blocks_to_swap}"] if s.blocks_to_swap else []
    out += ["(prompts encoded on the host: the text encoder does not fit beside the VAE)"] if s.text_on_host else []
    out += ["a cache filled first on the host (`python -m fluxkit.cache` with the same flags and `--device cpu`)"] \
        if s.warm_cache else []
    if s.offload_params:
        out.append("ZeRO-3 with CPU offload (`pretrain_bf16_zero3_offload_accelerate_config.yaml`)")
    elif s.zero_stage:
        out.append(f"ZeRO-{s.zero_stage}")
    return out


def rows(short: bool = False) -> list[dict]:
    """Each row's plan: the run as asked if it fits, else the smallest change that fits."""
    out, archs = [], {}
    for row in ROWS:
        if short and not row.readme:
            continue
        arch = archs.setdefault(row.model, read_architecture(row.model))
        start = replace(row.start, targets=tuple(default_lora_targets(arch))) if row.start.lora else row.start
        plan = plan_shape(start, arch, row.card_gb * GiB, start.world)
        fitting = plan if plan.fits else (smallest_change(plan) or (None, None))[1]
        shown = fitting or plan
        out.append({"run": row.run, "model": NAMES[row.model], "card": f"{row.card_gb} GB" + (" x 8" if start.world == 8 else ""),
                    "plan": shown.peak_bytes / GiB, "host": shown.host_peak_bytes / GiB, "phase": shown.peak_phase.name,
                    "fits": fitting is not None, "published": row.published,
                    "flags": describe(fitting.shape) if fitting else ["does not fit: " + ", ".join(describe(start))]})
    return out


def markdown(short: bool = False) -> str:
    lines = ["| model | run | card | plan, GiB per device (peak phase) | host RAM, GiB per process | flags that get there "
             "| published measurement |",
             "| --- | --- | --- | ---: | ---: | --- | --- |"]
    for r in rows(short):
        flags = ", ".join(f"`{f}`" if f.startswith("--") else f for f in r["flags"])
        lines.append(f"| {r['model']} | {r['run']} | {r['card']} | {r['plan']:.1f} ({r['phase']}) | {r['host']:.1f} | {flags} "
                     f"| {r['published']} |")
    return "\n".join(lines)


def markers(text: str) -> tuple[str, str, bool] | None:
    """(begin, end, short) of the generated table `text` holds: the full table's or the short one's."""
    for begin, end, short in ((WHERE_BEGIN, WHERE_END, False), (SHORT_BEGIN, SHORT_END, True)):
        if begin in text and end in text:
            return begin, end, short
    return None


def write_into(path: str) -> str:
    """Replace the table between the markers in `path` (full or short, as its markers say); the table."""
    from ..shared.fsio import atomic_write_text

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise UserError(f"--write {path}: cannot read it ({type(err).__name__}); name a markdown file") from None
    found = markers(text)
    if not found:
        raise UserError(f"{path} has no generated-table markers; add the two lines {WHERE_BEGIN!r} and {WHERE_END!r} "
                        f"(the full table) or {SHORT_BEGIN!r} and {SHORT_END!r} (the short one)")
    begin, end, short = found
    table = markdown(short)
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_text(path, f"{head}{begin}\n{table}\n{end}{tail}")
    return table


@cli
def main(argv=None) -> int:
    p = FlagParser(prog="python -m fluxkit.plan.where", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", default=None, help="replace the generated table in this markdown file (README.md: the short "
                                                 "table, docs/memory.md: the full one, as the file's markers say)")
    p.add_argument("--short", action="store_true", help="print the README's short table")
    args = p.parse_args(argv)
    print(write_into(args.write) if args.write else markdown(args.short))
    return 0


if __name__ == "__main__":
    sys.exit(main())
