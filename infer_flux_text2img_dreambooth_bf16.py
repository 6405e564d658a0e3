#!/usr/bin/env python
"""Text-to-image from a full DreamBooth fine-tune (by default train_flux_dreambooth.py's output_flux_dreambooth).

    python infer_flux_text2img_dreambooth_bf16.py --model_path output_flux_dreambooth --prompt "a photo of sks dog"

Every flag: --help. Images, manifest.jsonl and infer_summary.json go to --output_dir.
"""

from fluxkit.shared.host_runtime import apply_defaults

apply_defaults()  # before torch loads: OpenMP reads its wait policy once (fluxkit/shared/host_runtime.py)
from fluxkit.shared.errors import cli  # noqa: E402
from fluxkit.inference.args import DREAMBOOTH  # noqa: E402
from fluxkit.inference.run import main  # noqa: E402

if __name__ == "__main__":
    from fluxkit.shared.host_runtime import exit_without_teardown

    exit_without_teardown(cli(main)(DREAMBOOTH), __file__)  # everything is written: skip the interpreter's slow teardown
