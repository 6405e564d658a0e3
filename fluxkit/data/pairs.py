"""Editing pairs: (reference image, target image, instruction) for FLUX.1 Kontext and FLUX.2.

Where the reference images come from (scan time, before anything loads):

    --cond_image_dir DIR     beside --instance_data_dir: DIR/NAME.* is the reference of target NAME.*
                             (the same file names in a second folder, as control-image datasets lay
                             them out); the caption stays the target's (NAME.txt or metadata.jsonl)
    --cond_image_column COL  with --dataset_name (parquet/hub): the row's reference image, as
                             diffusers' Kontext script names it

Each target's reference is checked like the targets (readable, a size the family can take); a
missing or unreadable one is one error line naming it (or, with --skip_bad_images, the pair is
skipped). The reference is placed into the target's shape (its bucket, its crop rule and flip),
so both images of a pair are in one bucket. Its latents are cached by content like the target's,
under the sample index REFERENCE + i. The scan itself finds and checks the references
(fluxkit.data.scan: attach_references).
"""

from __future__ import annotations

from ..shared.errors import UserError

REFERENCE = 1 << 40  # latent index of sample i's reference image: REFERENCE + i (targets i >= 0, class -1 - i)


def editing_requested(args) -> bool:
    return bool(args.cond_image_dir or args.cond_image_column)


def check_flags(args) -> None:
    """The pair flags' own rules (any family check comes from fluxkit.families)."""
    if args.cond_image_column and not args.dataset_name:
        raise UserError("--cond_image_column names a column of --dataset_name; give --dataset_name (a parquet file, "
                        "dataset folder or hub id) or use --cond_image_dir with --instance_data_dir")
    if args.cond_image_dir and args.dataset_name:
        raise UserError("--cond_image_dir pairs with --instance_data_dir; with --dataset_name name the reference "
                        "column with --cond_image_column")
    if editing_requested(args) and args.with_prior_preservation:
        raise UserError("--with_prior_preservation has no reference images for its class samples; drop it when "
                        "training on editing pairs")
