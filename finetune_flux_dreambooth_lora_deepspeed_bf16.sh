#!/usr/bin/env bash
# DreamBooth-LoRA fine-tune of FLUX.1 with DeepSpeed ZeRO-2 bf16 (accelerate), on NPU, GPU or CPU.
# Defaults are the reference's; every one is a --key=value override. Run with --help.
set -euo pipefail

FK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=fluxkit/launcher.sh
source "$FK_ROOT/fluxkit/launcher.sh"

FK_KIND=lora
FK_NETWORK=FluxLora
FK_TRAINER=train_flux_dreambooth_lora.py
FK_DESCRIPTION="DreamBooth-LoRA fine-tuning of FLUX.1 (output: pytorch_lora_weights.safetensors for FluxPipeline.load_lora_weights)."
FK_KEYS=(model_name dataset_name instance_dir caption_column instance_prompt validation_prompt batch_size resolution
    gradient_accumulation_steps learning_rate rank max_train_steps mixed_precision checkpointing_steps seed output_dir)
declare -A FK_DEFAULT=(
    [model_name]="black-forest-labs/FLUX.1-dev"
    [dataset_name]="pokemon-blip-captions"
    [instance_dir]=""
    [caption_column]="text"
    [instance_prompt]="a photo of pokemon"
    [validation_prompt]="A photo of pokemon in a bucket"
    [batch_size]=8
    [resolution]=512
    [gradient_accumulation_steps]=1
    [learning_rate]=1e-6
    [rank]=4
    [max_train_steps]=5000
    [mixed_precision]=bf16
    [checkpointing_steps]=5001
    [seed]=0
    [output_dir]="output_flux_dreambooth_lora"
)
# the reference's fixed settings
FK_FIXED_ARGS=(--gradient_checkpointing --dataloader_num_workers=8 --lr_scheduler=constant --lr_warmup_steps=0
    --validation_epochs=500)
# @CACHE@ stands for the demo cache folder
declare -A FK_DEMO=(
    [model_name]="@CACHE@/tiny_flux"
    [dataset_name]="@CACHE@/data/captioned"
    [instance_dir]=""
    [validation_prompt]="a red circle on a gray background"
    [resolution]=32
    [batch_size]=2
    [gradient_accumulation_steps]=1
    [learning_rate]=1e-4
    [max_train_steps]=30
    [output_dir]="output_flux_dreambooth_lora_demo"
)
FK_DEMO_ARGS=(--report_to=none --dataloader_num_workers=0 --num_validation_images=1 --num_validation_steps=4)

fk_main "$@"
