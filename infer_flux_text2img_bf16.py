#!/usr/bin/env python
"""Text-to-image from a FLUX pipeline: the base model or a full fine-tune.

    python infer_flux_text2img_bf16.py --model_path PIPELINE_DIR --prompt "a photo of sks dog" --seeds 8 23

Every flag: --help. Images, manifest.jsonl and infer_summary.json go to --output_dir.
"""

from fluxkit.shared.host_runtime import apply_defaults

apply_defaults()  # before torch loads: OpenMP reads its wait policy once (fluxkit/shared/host_runtime.py)
from fluxkit.shared.errors import cli  # noqa: E402
from fluxkit.inference.args import BASE  # noqa: E402
from fluxkit.inference.run import main  # noqa: E402

if __name__ == "__main__":
    from fluxkit.shared.host_runtime import exit_without_teardown

    exit_without_teardown(cli(main)(BASE), __file__)  # everything is written: skip the interpreter's slow teardown
