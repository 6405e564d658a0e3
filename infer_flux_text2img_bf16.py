#!/usr/bin/env python
"""Text-to-image from a FLUX pipeline: the base model or a full fine-tune.

    python infer_flux_text2img_bf16.py --model_path PIPELINE_DIR --prompt "a photo of sks dog" --seeds 8 23

Every flag: --help. Images, manifest.jsonl and infer_summary.json go to --output_dir.
"""

import sys

from fluxkit.errors import cli
from fluxkit.infer_args import BASE
from fluxkit.inference import main

if __name__ == "__main__":
    sys.exit(cli(main)(BASE))
