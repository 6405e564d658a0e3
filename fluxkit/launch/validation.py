"""What validation will cost, said before the run: its prompt, images, steps and resolution, and an
estimate of its share of the run; on a CPU host a light default.

The reference renders 4 images x 28 steps at the training resolution. On a CPU host that can take
most of a short run (measured: 171 s of a 236 s run whose training took 6 s), so there the
launchers render 1 image x 4 steps unless the user named the validation settings or asked for the
reference's with --validation=full.
"""

from __future__ import annotations

import math

CPU_IMAGES, CPU_STEPS = "1", "4"
SETTINGS = ("num_validation_images", "num_validation_steps")


def apply_cpu_default(req, device_type: str, given_after_dash: dict) -> None:
    """1 image x 4 steps on a CPU host, unless --validation=full or the user gave either setting."""
    o = req.opts
    if device_type != "cpu" or o.get("validation") == "full" or not o.get("validation_prompt"):
        return
    if not any(k in req.given or k in given_after_dash for k in SETTINGS):
        o["num_validation_images"], o["num_validation_steps"] = CPU_IMAGES, CPU_STEPS


def describe(args, processes: int, samples: int | None) -> str:
    """One line: what validation renders, when, and its estimated share of the run's transformer FLOPs
    (validation on one process against one process's training; text encoding and the VAE left out)."""
    if not args.validation_prompt:
        return "validation: none (no validation_prompt)"
    when = f"at the end and every {args.validation_epochs} epoch(s)"
    renders = 1
    if samples:
        updates = math.ceil(math.ceil(samples / (args.train_batch_size * processes)) / args.gradient_accumulation_steps)
        epochs = math.ceil(args.max_train_steps / max(1, updates)) if args.max_train_steps else args.num_train_epochs
        renders = 1 + epochs // args.validation_epochs
        when = "at the end" if renders == 1 else \
            f"{renders} times: every {args.validation_epochs} epoch(s) of {epochs}, and at the end"
    head = (f"validation: {args.validation_prompt!r}, {args.num_validation_images} image(s) x "
            f"{args.num_validation_steps} steps at {args.resolution}x{args.resolution}, {when}")
    share = _share(args, renders)
    keys = "--validation=full for the reference's 4 x 28" if args.num_validation_steps < 28 else \
        "--num_validation_images/--num_validation_steps to change"
    cost = "" if share is None else "; under 1%" if share < 0.01 else f"; about {share:.0%}"
    return head + (cost + " of the run's transformer compute (estimate)" if cost else "") + f"; {keys}"


def _share(args, renders: int) -> float | None:
    from .. import families
    from ..data.pairs import editing_requested
    from ..shared import flops
    from ..plan import read_architecture

    try:
        arch = read_architecture(args.pretrained_model_name_or_path, family=args.model_family)
    except Exception:  # a hub model not downloaded yet: no estimate, the rest of the line stands
        return None
    tokens = flops.image_tokens(args.resolution, args.resolution, arch.vae_scale)
    text = args.max_sequence_length
    steps = args.max_train_steps or 0
    parts = families.get(arch.family).flop_parts()  # the family's transformer (FLUX.2's has no pooled projection)
    trained = tokens * (2 if editing_requested(args) else 1)  # pairs train with the reference's tokens; renders have none
    train = steps * flops.training_step_flops(arch.transformer, trained, text, args.train_batch_size * args.gradient_accumulation_steps,
                                              frozen_base=args.lora, flop_parts=parts)
    forward = parts(arch.transformer, tokens, text, 1)
    render = renders * args.num_validation_images * args.num_validation_steps * (forward["linear"] + forward["attention"])
    return render / (render + train) if render + train else None
