"""Defaults of diffusers' FLUX DreamBooth examples, flag by flag (issue 13): our trainers must match them.

Built from DESIGN.md's flag list and the argparse blocks of examples/dreambooth/train_dreambooth_flux.py
(FULL) and train_dreambooth_lora_flux.py (LORA) as of diffusers 0.3x. Entries marked ASSUMED were not
re-read from upstream source here (no network) and rest on what we know of those scripts.
"""

# flag -> default; the same in both scripts unless overridden in FULL_ONLY / LORA_ONLY
COMMON = {
    "pretrained_model_name_or_path": None,  # required
    "revision": None,
    "variant": None,
    "dataset_name": None,
    "dataset_config_name": None,
    "instance_data_dir": None,
    "cache_dir": None,
    "image_column": "image",
    "caption_column": None,
    "repeats": 1,
    "class_data_dir": None,
    "instance_prompt": None,  # required
    "class_prompt": None,
    "validation_prompt": None,
    "num_validation_images": 4,
    "validation_epochs": 50,
    "with_prior_preservation": False,
    "prior_loss_weight": 1.0,
    "num_class_images": 100,
    "seed": None,
    "resolution": 512,
    "center_crop": False,
    "random_flip": False,
    "train_text_encoder": False,
    "train_batch_size": 4,
    "sample_batch_size": 4,
    "num_train_epochs": 1,
    "max_train_steps": None,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": None,
    "resume_from_checkpoint": None,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "learning_rate": 1e-4,
    "guidance_scale": 3.5,
    "text_encoder_lr": 5e-6,
    "scale_lr": False,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 500,
    "lr_num_cycles": 1,
    "lr_power": 1.0,
    "dataloader_num_workers": 0,
    "weighting_scheme": "none",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "optimizer": "AdamW",
    "use_8bit_adam": False,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "prodigy_beta3": None,
    "prodigy_decouple": True,
    "adam_weight_decay": 1e-04,
    "adam_weight_decay_text_encoder": 1e-03,
    "adam_epsilon": 1e-08,
    "prodigy_use_bias_correction": True,
    "prodigy_safeguard_warmup": True,
    "max_grad_norm": 1.0,
    "push_to_hub": False,
    "hub_token": None,
    "hub_model_id": None,
    "logging_dir": "logs",
    "allow_tf32": False,
    "report_to": "tensorboard",
    "mixed_precision": None,
    "prior_generation_precision": None,
    "local_rank": -1,
    "image_interpolation_mode": "lanczos",  # ASSUMED (added upstream in 2025; lanczos in the SD3/FLUX scripts)
    "enable_npu_flash_attention": False,
}

FULL_ONLY = {
    "max_sequence_length": 77,
    "output_dir": "flux-dreambooth",
}

LORA_ONLY = {
    "max_sequence_length": 512,
    "output_dir": "flux-dreambooth-lora",
    "rank": 4,
    "lora_alpha": 4,  # ASSUMED (upstream added --lora_alpha with the rank's default)
    "lora_dropout": 0.0,  # ASSUMED
    "lora_layers": None,
    "cache_latents": False,
    "upcast_before_saving": False,
    # pivotal tuning, from examples/advanced_diffusion_training/train_dreambooth_lora_flux_advanced.py
    "train_text_encoder_ti": False,
    "enable_t5_ti": False,
    "token_abstraction": "TOK",
    "num_new_tokens_per_abstraction": None,
    "initializer_concept": None,
    "train_text_encoder_ti_frac": 0.5,
    "train_text_encoder_frac": 1.0,
    "train_transformer_frac": 1.0,
}


def upstream_defaults(lora: bool) -> dict:
    return {**COMMON, **(LORA_ONLY if lora else FULL_ONLY)}
