#!/usr/bin/env python
"""DreamBooth-LoRA fine-tuning of any FLUX family (FLUX.1, Kontext, FLUX.2); accepts diffusers' train_dreambooth_lora_flux.py flags.

    accelerate launch --config_file pretrain_bf16_accelerate_config.yaml train_flux_dreambooth_lora.py \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev --instance_data_dir dog \\
        --instance_prompt "a photo of sks dog" --rank 16 --output_dir flux-dreambooth-lora
"""

from fluxkit.shared.host_runtime import apply_defaults

apply_defaults()  # before torch loads: OpenMP reads its wait policy once (fluxkit/shared/host_runtime.py)
from fluxkit.shared.errors import cli  # noqa: E402


@cli
def main(argv=None):
    from fluxkit.training.train import train
    from fluxkit.training.train_args import parse

    train(parse(argv, lora=True))


if __name__ == "__main__":
    from fluxkit.shared.host_runtime import exit_without_teardown, pause_collection_while_importing

    pause_collection_while_importing(__file__)  # until the run starts (fluxkit.training.startup.begin)
    exit_without_teardown(main(), __file__)  # everything is written: skip the interpreter's slow teardown
