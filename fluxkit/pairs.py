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
under the sample index REFERENCE + i.
"""

from __future__ import annotations

import os

from .errors import UserError

REFERENCE = 1 << 40  # latent index of sample i's reference image: REFERENCE + i (targets i >= 0, class -1 - i)


def editing_requested(args) -> bool:
    return bool(getattr(args, "cond_image_dir", None) or getattr(args, "cond_image_column", None))


def check_flags(args) -> None:
    """The pair flags' own rules (any family check comes from fluxkit.families)."""
    if getattr(args, "cond_image_column", None) and not args.dataset_name:
        raise UserError("--cond_image_column names a column of --dataset_name; give --dataset_name (a parquet file, "
                        "dataset folder or hub id) or use --cond_image_dir with --instance_data_dir")
    if getattr(args, "cond_image_dir", None) and args.dataset_name:
        raise UserError("--cond_image_dir pairs with --instance_data_dir; with --dataset_name name the reference "
                        "column with --cond_image_column")
    if editing_requested(args) and args.with_prior_preservation:
        raise UserError("--with_prior_preservation has no reference images for its class samples; drop it when "
                        "training on editing pairs")


def reference_in_folder(folder: str, target: str) -> str:
    """The reference image of target path `target`: the file of the same stem in `folder`."""
    from .scan import IMAGE_EXTENSIONS

    stem = os.path.splitext(os.path.basename(target))[0]
    found = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
             if os.path.splitext(n)[0] == stem and n.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise UserError(f"target image {target!r} has no reference image in --cond_image_dir {folder!r} "
                        f"(expected {stem}.png/.jpg/...); add it, or move the target out of --instance_data_dir")
    return found[0]


def attach_references(scan, args, skipped: list) -> None:
    """Give each scanned target its reference (scan.references, parallel to scan.samples); a pair whose
    reference is missing or unreadable is one error line, or skipped with --skip_bad_images."""
    from .scan import ImageInfo, _bad_image_error, _row_image, inspect_image

    folder = getattr(args, "cond_image_dir", None)
    if folder and not os.path.isdir(folder):
        raise UserError(f"--cond_image_dir {folder!r} does not exist or is not a directory; point it at the folder "
                        "of reference images (same file names as the targets)")
    if scan.table is not None and args.cond_image_column not in scan.table.column_names:
        raise UserError(f"--cond_image_column {args.cond_image_column!r} is not in dataset {args.dataset_name!r}; its "
                        f"columns are: {', '.join(scan.table.column_names)}")
    if scan.table is not None:
        import datasets

        if isinstance(scan.table.features[args.cond_image_column], datasets.Image):  # bytes stay on disk, as the targets'
            scan.table = scan.table.cast_column(args.cond_image_column, datasets.Image(decode=False))
    kept, references, skip_bad = [], [], bool(getattr(args, "skip_bad_images", False))
    for sample in scan.samples:
        if scan.table is not None:
            ref, name = int(sample.ref), f"{args.dataset_name}[{sample.ref}].{args.cond_image_column}"
            source = _row_image(scan.table[ref][args.cond_image_column])
        else:
            ref = name = source = reference_in_folder(folder, sample.ref)
        try:
            if source is None:
                raise OSError("the row has no reference image")
            size, mode = inspect_image(source, name)
        except Exception as err:
            if not skip_bad:
                raise _bad_image_error(name, err) from None
            skipped.append(f"{name} ({type(err).__name__}: {str(err)[:120]})")
            continue
        kept.append(sample)
        references.append(ImageInfo(name, ref, size, mode, sample.caption, "reference"))
    if not kept:
        raise UserError("no training pair has a readable reference image; check --cond_image_dir / --cond_image_column")
    scan.samples, scan.references, scan.cond_column = kept, references, getattr(args, "cond_image_column", None)
