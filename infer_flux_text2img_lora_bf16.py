#!/usr/bin/env python
"""Text-to-image from a base FLUX pipeline plus DreamBooth-LoRA weights.

    python infer_flux_text2img_lora_bf16.py --model_path BASE_DIR --lora_weights output_flux_dreambooth_lora \\
        --lora_scale 1.0 --prompt "a photo of sks dog"

Every flag: --help. Images, manifest.jsonl and infer_summary.json go to --output_dir.
"""

import sys

from fluxkit.errors import cli
from fluxkit.infer_args import LORA
from fluxkit.inference import main

if __name__ == "__main__":
    sys.exit(cli(main)(LORA))
