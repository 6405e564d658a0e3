"""The two launchers as data: each one's trainer, keys in --help order, the reference's defaults
and the demo's values; the key names that differ from the trainer's flags; Ascend's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

ACCELERATE_CONFIG = "pretrain_bf16_accelerate_config.yaml"


@dataclass(frozen=True)
class Launcher:
    """One launcher: its trainer, its keys in --help order and the reference's values for them.

    `defaults` also holds the reference's fixed trainer settings (guidance 1, gradient
    checkpointing, ...): like every trainer flag they are keys, so a user can still change them.
    """
    kind: str  # full | lora
    network: str  # the reference's network name, used in CASE_NAME.log and the log file name
    trainer: str  # our trainer script, beside the launchers
    description: str
    keys: tuple  # this launcher's named keys, in --help order (COMMON_KEYS follow)
    defaults: dict
    demo: dict = field(default_factory=dict)  # values under --demo ("{cache}" = the demo cache); given keys win
    # defaults that describe the reference's own data (its prompts): dropped when the user names other
    # data, except through `data_defaults_key` (LoRA: a --dataset_name is taken as the user's copy of
    # the reference's pokemon dataset; full: any --instance_dir is the user's own subject)
    data_defaults: tuple = ()
    data_defaults_key: str = ""
    # the model family `defaults` are for; another family's model takes FAMILY_DEFAULTED from that family
    family: str = "flux1"


COMMON_KEYS = ("lr_scheduler", "lr_warmup_steps", "dataloader_num_workers", "resume_from_checkpoint", "config_file",
               "num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port", "device",
               "train_script", "validation")
COMMON_DEFAULTS = {"config_file": ACCELERATE_CONFIG, "validation": "auto", "num_processes": "", "num_machines": "1", "machine_rank": "0",
                   "main_process_ip": "", "main_process_port": "", "device": "auto", "train_script": "",
                   "resume_from_checkpoint": "",
                   # the reference's constant schedule; a warm-up given without a scheduler turns it into
                   # constant_with_warmup (a constant schedule ignores warm-up)
                   "lr_scheduler": "constant", "lr_warmup_steps": "0"}
LAUNCHERS = {
    "full": Launcher(
        kind="full", network="FluxDreambooth", trainer="train_flux_dreambooth.py",
        description="Full DreamBooth fine-tuning of a FLUX model (FLUX.1, Kontext, FLUX.2 [klein] or [dev]: the family "
                    "read from the folder); every transformer weight trains; output: a complete pipeline folder.",
        keys=("model_name", "instance_dir", "dataset_name", "instance_prompt", "batch_size", "resolution",
              "gradient_accumulation_steps", "learning_rate", "max_train_steps", "mixed_precision", "checkpointing_steps",
              "seed", "output_dir"),
        defaults={"model_name": "black-forest-labs/FLUX.1-dev", "instance_dir": "dog", "dataset_name": "",
                  "instance_prompt": "a photo of sks dog", "batch_size": "16", "resolution": "256",
                  "gradient_accumulation_steps": "4", "learning_rate": "1e-5", "max_train_steps": "5000",
                  "mixed_precision": "bf16", "checkpointing_steps": "50000", "seed": "0", "output_dir": "output_flux_dreambooth",
                  "dataloader_num_workers": "0",
                  "guidance_scale": "1", "gradient_checkpointing": True, "max_grad_norm": "1"},
        demo={"model_name": "{cache}/tiny_flux", "instance_dir": "{cache}/data/instance", "dataset_name": "",
              "resolution": "32", "batch_size": "1", "gradient_accumulation_steps": "2", "learning_rate": "1e-4",
              "max_train_steps": "30", "output_dir": "output_flux_dreambooth_demo", "report_to": "none"},
        data_defaults=("instance_prompt",)),
    "lora": Launcher(
        kind="lora", network="FluxLora", trainer="train_flux_dreambooth_lora.py",
        description="DreamBooth-LoRA fine-tuning of a FLUX model (FLUX.1, Kontext, FLUX.2 [klein] or [dev]: the family "
                    "read from the folder); output: pytorch_lora_weights.safetensors for the family pipeline's "
                    "load_lora_weights.",
        keys=("model_name", "dataset_name", "instance_dir", "caption_column", "instance_prompt", "validation_prompt",
              "batch_size", "resolution", "gradient_accumulation_steps", "learning_rate", "rank", "lora_alpha",
              "max_train_steps", "mixed_precision", "checkpointing_steps", "seed", "output_dir"),
        defaults={"model_name": "black-forest-labs/FLUX.1-dev", "dataset_name": "pokemon-blip-captions", "instance_dir": "",
                  "caption_column": "text", "instance_prompt": "a photo of pokemon",
                  "validation_prompt": "A photo of pokemon in a bucket", "batch_size": "8", "resolution": "512",
                  "gradient_accumulation_steps": "1", "learning_rate": "1e-6", "rank": "4", "lora_alpha": "4",
                  "max_train_steps": "5000", "mixed_precision": "bf16", "checkpointing_steps": "5001", "seed": "0",
                  "output_dir": "output_flux_dreambooth_lora",
                  "dataloader_num_workers": "auto",  # the reference's 8, at most the cores each process has (data.py)
                  "gradient_checkpointing": True, "validation_epochs": "500"},
        demo={"model_name": "{cache}/tiny_flux", "dataset_name": "{cache}/data/captioned", "instance_dir": "",
              "validation_prompt": "a red circle on a gray background", "resolution": "32", "batch_size": "2",
              "gradient_accumulation_steps": "1", "learning_rate": "1e-4", "max_train_steps": "30",
              "output_dir": "output_flux_dreambooth_lora_demo", "report_to": "none", "dataloader_num_workers": "0",
              "num_validation_images": "1", "num_validation_steps": "4"},
        data_defaults=("instance_prompt", "validation_prompt"), data_defaults_key="dataset_name"),
}
# keys whose default is the model family's (fluxkit.families: Family.defaults, diffusers' script for it)
FAMILY_DEFAULTED = ("resolution", "max_sequence_length", "guidance_scale")
# Launcher keys whose trainer flag has another name; the trainer's name is accepted as the key too.
TRAINER_NAME = {"model_name": "pretrained_model_name_or_path", "instance_dir": "instance_data_dir",
                "batch_size": "train_batch_size"}
KEY_OF_FLAG = {v: k for k, v in TRAINER_NAME.items()}
# Keys that are the launcher's own (accelerate's settings), not trainer flags.
LAUNCHER_ONLY = ("config_file", "num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                 "train_script", "validation")
# Trainer flags the launcher also hands to accelerate/DeepSpeed or reads itself: after `--` they would
# disagree with what DeepSpeed uses, so they go through the keys.
OWNED_FLAGS = {"--gradient_accumulation_steps": "gradient_accumulation_steps", "--train_batch_size": "batch_size",
               "--mixed_precision": "mixed_precision", "--output_dir": "output_dir"}
KEY_HELP = {
    "model_name": "FLUX pipeline folder or hub id",
    "dataset_name": "dataset folder/parquet or hub id ORG/NAME (image + caption columns); replaces instance_dir",
    "instance_dir": "folder of the subject's images; replaces dataset_name",
    "instance_prompt": "prompt naming the subject (the caption when the data has none)",
    "caption_column": "caption column of dataset_name (empty: instance_prompt for every image)",
    "validation_prompt": "prompt rendered at validation (empty: no validation)",
    "validation": "auto: on a CPU host 1 image x 4 steps (unless num_validation_images/_steps are given); "
                  "full: the reference's 4 x 28 everywhere",
    "batch_size": "micro batch per device (--train_batch_size)",
    "max_train_steps": "optimizer steps",
    "mixed_precision": "bf16, fp16 or no; given to accelerate and the trainer",
    "resolution": "training resolution (a multiple of 16)",
    "gradient_accumulation_steps": "micro batches per optimizer step; given to accelerate/DeepSpeed and the trainer",
    "learning_rate": "learning rate",
    "rank": "LoRA rank",
    "lora_alpha": "LoRA alpha (scale = lora_alpha / rank)",
    "lr_scheduler": "learning rate schedule (with lr_warmup_steps > 0 and no scheduler given: constant_with_warmup)",
    "lr_warmup_steps": "warm-up steps of the schedule",
    "dataloader_num_workers": "data loader workers per process (auto: the reference's 8, at most the cores per process - 1)",
    "resume_from_checkpoint": "'latest', a checkpoint-STEP name inside output_dir, or a path",
    "config_file": "accelerate config (DeepSpeed ZeRO-2 bf16); looked up here, then beside this launcher",
    "num_processes": "processes in total over all machines (default: devices per machine x num_machines)",
    "num_machines": "machines (env NNODES); run the launcher on each one",
    "machine_rank": "this machine's rank, 0 = main (env NODE_RANK)",
    "main_process_ip": "address of machine 0 (env MASTER_ADDR); needed with num_machines > 1",
    "main_process_port": "port on machine 0 (env MASTER_PORT; default: a free port, 29500 multi-node)",
    "output_dir": "weights, checkpoints, run_config.json, logs/train_*.log, logs/CASE_NAME.log, train_summary.json",
    "checkpointing_steps": "save a resumable checkpoint every N steps",
    "seed": "random seed",
    "device": "auto (npu > cuda > cpu), npu, cuda or cpu",
    "train_script": "another trainer, e.g. diffusers' upstream script, run through patch_flux.py (default: ours)",
}
# Ascend settings the reference exports; only on NPU hosts, and a value already in the caller's
# environment wins.
ASCEND_ENV = {
    "ASCEND_SLOG_PRINT_TO_STDOUT": "0",  # CANN logs to files, not the training log
    "ASCEND_GLOBAL_LOG_LEVEL": "3",  # errors only
    "ASCEND_GLOBAL_EVENT_ENABLE": "0",
    "TASK_QUEUE_ENABLE": "2",  # level-2 operator queue pipelining
    "COMBINED_ENABLE": "1",  # fuse non-contiguous copy chains
    "HCCL_WHITELIST_DISABLE": "1",
    "HCCL_CONNECT_TIMEOUT": "1200",  # seconds; many ranks start slowly
    "HCCL_EXEC_TIMEOUT": "3600",  # seconds; rank 0 writing a 12B checkpoint keeps the others waiting
    "ACLNN_CACHE_LIMIT": "100000",  # operator cache entries on the host
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",  # less fragmentation with gradient checkpointing
    "CPU_AFFINITY_CONF": "1",  # bind each rank's threads near its NPU
}
