#!/usr/bin/env bash
# Full DreamBooth fine-tune of FLUX.1 with DeepSpeed ZeRO-2 bf16 (accelerate), on NPU, GPU or CPU.
# Defaults are the reference's; every one is a --key=value override. Run with --help.
set -euo pipefail

FK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=fluxkit/launcher.sh
source "$FK_ROOT/fluxkit/launcher.sh"

FK_KIND=full
FK_NETWORK=FluxDreambooth
FK_TRAINER=train_flux_dreambooth.py
FK_DESCRIPTION="Full DreamBooth fine-tuning of FLUX.1 (every transformer weight trains; output: a complete pipeline folder)."
FK_KEYS=(model_name instance_dir dataset_name instance_prompt batch_size resolution gradient_accumulation_steps
    learning_rate max_train_steps mixed_precision checkpointing_steps seed output_dir)
declare -A FK_DEFAULT=(
    [model_name]="black-forest-labs/FLUX.1-dev"
    [instance_dir]="dog"
    [dataset_name]=""
    [instance_prompt]="a photo of sks dog"
    [batch_size]=16
    [resolution]=256
    [gradient_accumulation_steps]=4
    [learning_rate]=1e-5
    [max_train_steps]=5000
    [mixed_precision]=bf16
    [checkpointing_steps]=50000
    [seed]=0
    [output_dir]="output_flux_dreambooth"
)
# the reference's fixed settings
FK_FIXED_ARGS=(--guidance_scale=1 --gradient_checkpointing --max_grad_norm=1 --dataloader_num_workers=0
    --lr_scheduler=constant --lr_warmup_steps=0)
# @CACHE@ stands for the demo cache folder
declare -A FK_DEMO=(
    [model_name]="@CACHE@/tiny_flux"
    [instance_dir]="@CACHE@/data/instance"
    [dataset_name]=""
    [resolution]=32
    [batch_size]=1
    [gradient_accumulation_steps]=2
    [learning_rate]=1e-4
    [max_train_steps]=30
    [output_dir]="output_flux_dreambooth_demo"
)
FK_DEMO_ARGS=(--report_to=none)

fk_main "$@"
