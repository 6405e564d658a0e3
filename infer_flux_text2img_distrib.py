#!/usr/bin/env python
"""Text-to-image with every prompt x seed pair rendered once across processes.

    accelerate launch --multi_gpu --num_processes 4 infer_flux_text2img_distrib.py --model_path PIPELINE_DIR \\
        [--lora_weights LORA] [--ulysses_degree 2] --prompts_file prompts.txt

(--multi_gpu on CPU and NPU hosts too: without it accelerate starts one process.) The processes
form N / (ulysses x ring) groups; each group renders a contiguous share of the pairs that are not
on disk yet (a rerun resumes), splitting every image over its processes; rank 0 writes
manifest.jsonl and infer_summary.json once all are done. Every flag: --help.
"""

from fluxkit.shared.host_runtime import apply_defaults

apply_defaults()  # before torch loads: OpenMP reads its wait policy once (fluxkit/shared/host_runtime.py)
from fluxkit.shared.errors import cli  # noqa: E402
from fluxkit.inference.args import DISTRIB  # noqa: E402
from fluxkit.inference.run import main  # noqa: E402

if __name__ == "__main__":
    from fluxkit.shared.host_runtime import exit_without_teardown

    exit_without_teardown(cli(main)(DISTRIB), __file__)  # everything is written: skip the interpreter's slow teardown
