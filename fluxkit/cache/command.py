"""python -m fluxkit.cache: fill the cache a training run will read, ahead of it; show its size;
prune it."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import torch

from ..shared.errors import FlagParser, UserError
from .admin import prune_to_size, prune_unused, usage
from .facade import cache_folder, check_cache_dir, default_cache_dir, prepare_data
from .fill import fill
from .store import FORMAT


def main(argv=None) -> int:
    """Fill the cache a training run will read, ahead of it, with a progress bar and an ETA; or show
    its size and prune it.

    python -m fluxkit.cache [--full] TRAINER FLAGS            fill what the run needs
    python -m fluxkit.cache --prune [--full] TRAINER FLAGS    remove every entry that run does not use
    python -m fluxkit.cache --list [--latent_cache_dir DIR | --output_dir OUT]   (default: ./.fluxkit-cache)
    python -m fluxkit.cache --max_size_gb N (--latent_cache_dir DIR | --output_dir OUT)

    Give the same flags as the training command (data, --resolution, crops, --seed, buckets,
    --max_sequence_length, --mixed_precision, --output_dir or --latent_cache_dir). --full takes the
    full fine-tune's defaults (--max_sequence_length 77) instead of the LoRA script's (512).
    --max_size_gb removes the least recently used shards (of any model) until the cache is that big.
    Pruning is safe while runs use the cache: what a run still needs is encoded again, never corrupted.
    """
    from ..shared.errors import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list" in argv or any(a == "--max_size_gb" or a.startswith("--max_size_gb=") for a in argv):
        return cli(_size_command)(argv)
    if "-h" in argv or "--help" in argv:  # the modes first; the trainer's flags follow
        import inspect

        print(inspect.cleandoc(main.__doc__) + "\n\nTRAINER FLAGS:", flush=True)
    return cli(_fill_command)(argv)


def _size_command(argv) -> int:
    import datetime
    import json

    p = FlagParser(prog="python -m fluxkit.cache", description="show the latent cache's size, or shrink it")
    p.add_argument("--list", action="store_true", help="one line per model namespace: shards, entries, size, last used")
    p.add_argument("--max_size_gb", type=float, default=None, help="remove least recently used shards down to this size")
    import copy

    from ..training.train_args import build_parser

    trainer = {a.dest: a for a in build_parser(lora=True)._actions}
    for name in ("latent_cache_dir", "output_dir"):  # the trainer's flags, defined once (there)
        p._add_action(copy.copy(trainer[name]))
    p.set_defaults(output_dir=None)  # not given: the default cache of runs in this folder (below)
    args = p.parse_args(argv)
    if args.max_size_gb is not None and args.max_size_gb < 0:
        raise UserError(f"--max_size_gb {args.max_size_gb} must be 0 or more")
    if args.latent_cache_dir or args.output_dir:
        top = cache_folder(args.latent_cache_dir, args.output_dir)
    else:  # the default folder of runs whose --output_dir is in this folder (the launchers' and trainers' defaults)
        top = default_cache_dir(os.path.join(os.getcwd(), "output"))
    root = os.path.join(top, FORMAT)
    if not os.path.isdir(root):
        where = "" if args.latent_cache_dir or args.output_dir else " (the default folder for runs started here)"
        raise UserError(f"{top!r}{where} holds no fluxkit cache ({FORMAT}/ is missing); "
                        "pass --latent_cache_dir DIR, or the run's --output_dir")
    if args.max_size_gb is not None:
        stats = prune_to_size(root, int(args.max_size_gb * 2**30))
        print(json.dumps({"cache_dir": root, **stats}), flush=True)
    if args.list:
        rows = usage(root)
        print(f"{root}: {sum(r['bytes'] for r in rows) / 2**20:.1f} MiB in {sum(r['shards'] for r in rows)} shard(s)")
        for r in rows:
            when = datetime.datetime.fromtimestamp(r["last_used"]).strftime("%Y-%m-%d %H:%M") if r["last_used"] else "-"
            what = "image(s) that do not decode" if r["namespace"] == "unreadable" else f"entries in {r['shards']} shard(s)"
            print(f"  {r['entries']:>8} {what:<28} {r['bytes'] / 2**20:>10.1f} MiB  last used {when}  {_named(r)}")
    return 0


def _named(row: dict) -> str:
    """A namespace in words (its about.json), else its folder (written before namespaces were named)."""
    if row["namespace"] == "unreadable":
        return "unreadable/"
    return f"{row['about']} [{row['namespace'][:20]}]" if row.get("about") else f"{row['namespace']} (unnamed)"


def _fill_command(argv=None) -> int:
    import json

    from ..shared import quiet

    quiet.install()  # the trainer's filter for known library noise (torchao's kernels, empty fp32 lists): same loads here
    from ..training import pivotal
    from ..shared.device import check_mixed_precision, detect, torch_dtype
    from ..training.encode import encode_prompts, latent_moments
    from ..weights import quant
    from ..training.models import load_models, resolve_model_dir
    from ..data.scan import list_images, scan_dataset
    from ..training.train_args import parse

    argv = list(sys.argv[1:] if argv is None else argv)
    lora, prune = "--full" not in argv, "--prune" in argv
    args = parse([a for a in argv if a not in ("--full", "--prune")], lora=lora)
    if prune:  # pruning trains nothing: images recorded as undecodable are kept out, not an error
        args = dataclasses.replace(args, skip_bad_images=True)
    if args.no_cache:
        raise UserError("--no_cache leaves nothing to fill; drop it")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    info = detect(args.device)
    quant.check_text_encoder(args.text_encoder_quantization, info.type)  # before anything is written
    model_dir = resolve_model_dir(args)
    args, tokens = pivotal.prepare_prompts(args, model_dir)  # the trainer's prompts: TOK -> <s0><s1> (pivotal tuning)
    scan = scan_dataset(args, world_size=1)
    pivotal.rewrite_captions(tokens, scan)
    check_cache_dir(args)
    class_images = None  # the class images already there (the trainer generates missing ones)
    if args.with_prior_preservation and os.path.isdir(args.class_data_dir or ""):
        class_images = list_images(args.class_data_dir, "--class_data_dir")[: args.num_class_images]
    check_mixed_precision(info, args.mixed_precision)
    # the trainer's compute dtype: encoders run in it, and it is part of the cache's identity
    dtype = torch_dtype(args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
    device = torch.device(info.type)
    dataset, cache, prompts = prepare_data(args, scan, class_images, model_dir, dtype, device)
    if prune:
        print(json.dumps({"cache_dir": cache.root, **prune_unused(cache, prompts)}), flush=True)
        return 0
    if cache.missing_latents() or cache.missing_prompts(prompts):
        m = load_models(args, model_dir, without=("transformer", "scheduler"), weight_dtype=dtype, text_device=device)
        for module in (m.vae, m.text_encoder, m.text_encoder_2):
            if module is not None:  # a family with one text encoder has no second
                module.requires_grad_(False)
                quant.place(module, device, dtype)
        from ..data.dataset import default_num_workers

        workers = args.dataloader_num_workers or default_num_workers(1)  # decoding in parallel is the point here
        fill(cache, dataset, prompts, lambda px: latent_moments(m.vae, px),
             lambda batch: encode_prompts(batch, m, args, device), num_workers=workers)
    print(json.dumps({"cache_dir": cache.root, "latents_encoded": cache.encoded["latents"], "prompts_encoded": cache.encoded["text"],
                      "latents": len(set(cache.latent_keys.values())), "prompts": len(prompts)}), flush=True)
    return 0
