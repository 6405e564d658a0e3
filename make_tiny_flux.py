#!/usr/bin/env python
"""Build a random FLUX pipeline of a chosen family (and optional sample data) offline.

    python make_tiny_flux.py --preset small --output_dir tiny_flux --dataset_dir tiny_data
    python make_tiny_flux.py --family flux2-klein --output_dir tiny_klein

Families: flux1 (FluxPipeline), kontext (FLUX.1's components as FluxKontextPipeline), flux2 (Flux2Pipeline:
Mistral3 text encoder, PixtralProcessor tokenizer folder, FLUX.2 VAE and transformer), flux2-klein
(Flux2KleinPipeline: Qwen3 text encoder, FLUX.2 VAE and transformer).
Presets: flux1/kontext: tiny (tests), small (CPU benchmarks), devlike (FLUX.1-dev's proportions, small), dev
(FLUX.1-dev's architecture; needs --allow_large); flux2: tiny, small, dev (FLUX.2 [dev]'s architecture;
needs --allow_large); flux2-klein: tiny, small, 4b, 9b (the published architectures; need --allow_large).
The folder loads with its family's pipeline class: <Pipeline>.from_pretrained(DIR, local_files_only=True).
"""

import argparse
import sys

from fluxkit.shared.errors import FlagParser, cli
from fluxkit.tiny.build import FAMILIES, PRESETS


def parse_args(argv=None):
    p = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="flux1", choices=FAMILIES,
                   help="the FLUX family to build (its pipeline class and components)")
    p.add_argument("--preset", default="tiny", help="model size: " + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--output_dir", help="folder to write the pipeline to (must be new or empty unless --overwrite)")
    p.add_argument("--dataset_dir", help="also write sample data here: instance/ images, captioned/ parquet dataset, prompts.txt")
    p.add_argument("--resolution", type=int, default=None, help="sample image size (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data (same seed, same files)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="weight dtype (default fp32; bf16 for dev)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--allow_large", action="store_true", help="needed for --preset dev (tens of GiB)")
    args = p.parse_args(argv)
    if not args.output_dir and not args.dataset_dir:
        p.error("give --output_dir and/or --dataset_dir")
    return args


@cli
def main(argv=None):
    from fluxkit.shared import quiet
    from fluxkit.tiny import build as tiny

    quiet.install()  # the libraries' import-time notes (torchao, bitsandbytes kernels) before any line of ours
    args = parse_args(argv)
    preset = tiny.resolve_preset(args.preset, args.family)
    if args.dataset_dir:  # check both destinations before writing either
        tiny.check_output_dir(args.dataset_dir, args.overwrite, "--dataset_dir")
    if args.output_dir:
        dtype = args.dtype or ("bf16" if preset.large else "fp32")
        tiny.build_pipeline(args.output_dir, preset, seed=args.seed, overwrite=args.overwrite,
                            allow_large=args.allow_large, dtype=dtype, family=args.family)
        print(f"wrote {preset.name} {args.family} pipeline to {args.output_dir}")
    if args.dataset_dir:
        paths = tiny.build_datasets(args.dataset_dir, seed=args.seed, resolution=args.resolution or preset.sample_resolution,
                                    overwrite=args.overwrite)
        for k, v in paths.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
