"""Bad inputs across every entry point, as data (issue 8, item 6).

tests/reliability/test_reliability.py runs each case as a real command and asserts: a non-zero exit, exactly one
line `PROG: error: ...` on stderr containing every needle (the culprit and what to do), no
traceback, and nothing written to the case's output folder.

Placeholders in arguments: {model} a tiny FLUX pipeline, {instance} a folder of instance images,
{dataset} a captioned parquet dataset, {tmp} a fresh folder for the case, {out} an output folder
inside it that must not appear. `files` are created under {tmp} first (path -> text or bytes). `trainer_base`
cases get a complete, valid set of trainer flags first; their own flags then override it.
"""

ENTRY_POINTS = {
    # name -> command before the case's arguments; "{python}" is the test's interpreter
    "train": ["{python}", "train_flux_dreambooth.py"],
    "train_lora": ["{python}", "train_flux_dreambooth_lora.py"],
    "launch": ["finetune_flux_dreambooth_deepspeed_bf16.sh"],
    "launch_lora": ["finetune_flux_dreambooth_lora_deepspeed_bf16.sh"],
    "infer": ["{python}", "infer_flux_text2img_bf16.py"],
    "infer_dreambooth": ["{python}", "infer_flux_text2img_dreambooth_bf16.py"],
    "infer_lora": ["{python}", "infer_flux_text2img_lora_bf16.py"],
    "infer_distrib": ["{python}", "infer_flux_text2img_distrib.py"],
    "patch_flux": ["{python}", "patch_flux.py"],
    "make_tiny_flux": ["{python}", "make_tiny_flux.py"],
}

TRAINER_BASE = ["--pretrained_model_name_or_path", "{model}", "--instance_data_dir", "{instance}",
                "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--train_batch_size", "1",
                "--max_train_steps", "1", "--output_dir", "{out}", "--report_to", "none"]
INFER_BASE = ["--model_path", "{model}", "--prompt", "a photo of sks dog", "--seeds", "1", "--height", "32",
              "--width", "32", "--num_inference_steps", "1", "--output_dir", "{out}"]
LAUNCH_BASE = ["--model_name={model}", "--instance_dir={instance}", "--instance_prompt=a photo of sks dog",
               "--output_dir={out}", "--max_train_steps=1"]


def _png() -> bytes:
    """A real 8x8 PNG, for cases that need an image file."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


def case(name, entry, args, needles, base=None, files=None, env=None):
    return {"name": name, "entry": entry, "args": list(base or []) + list(args), "needles": list(needles),
            "files": dict(files or {}), "env": dict(env or {})}


# diffusers' script shape as far as patch_flux.py's runner looks (the checkpoint block, log_validation),
# importing a module that is not installed, as their `from torchvision import transforms` does without torchvision
NEEDS_MISSING_MODULE = """import os
from fluxkit_walk_not_installed import transforms


def log_validation(pipeline, args, accelerator, pipeline_args, epoch, torch_dtype, is_final_validation=False):
    pipeline = pipeline.to(accelerator.device, dtype=torch_dtype)


def checkpoint(accelerator, args, global_step):
    if accelerator.is_main_process:
        if global_step % args.checkpointing_steps == 0:
            accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))
"""

CASES = [
    # ------------------------------------------------------------------ trainers
    case("trainer: model path is a file", "train", ["--pretrained_model_name_or_path", "{tmp}/model.txt"],
         ["--pretrained_model_name_or_path", "model.txt"], TRAINER_BASE, files={"model.txt": "not a model"}),
    case("trainer: instance data dir is a file", "train_lora", ["--instance_data_dir", "{tmp}/images.zip"],
         ["--instance_data_dir", "images.zip"], TRAINER_BASE, files={"images.zip": "PK"}),
    case("trainer: T5 sequence too long", "train_lora", ["--max_sequence_length", "600"],
         ["--max_sequence_length 600", "512"], TRAINER_BASE),
    case("trainer: unknown optimizer", "train_lora", ["--optimizer", "sgd"], ["--optimizer 'sgd'", "AdamW"], TRAINER_BASE),
    case("trainer: LoRA rank zero", "train_lora", ["--rank", "0"], ["--rank 0", "positive"], TRAINER_BASE),
    case("trainer: LoRA dropout of 1.5", "train_lora", ["--lora_dropout", "1.5"], ["--lora_dropout 1.5"], TRAINER_BASE),
    case("trainer: LoRA layers that match nothing", "train_lora", ["--lora_layers", "attn.to_nothing"],
         ["--lora_layers 'attn.to_nothing'", "matched no module"], TRAINER_BASE),
    case("trainer: checkpoint limit zero", "train", ["--checkpoints_total_limit", "0"],
         ["--checkpoints_total_limit 0"], TRAINER_BASE),
    case("trainer: accumulation zero", "train", ["--gradient_accumulation_steps", "0"],
         ["--gradient_accumulation_steps 0"], TRAINER_BASE),
    case("trainer: unknown tracker", "train_lora", ["--report_to", "mlflow"], ["--report_to 'mlflow'", "tensorboard"],
         TRAINER_BASE),
    case("trainer: NPU flash attention without an NPU", "train_lora", ["--enable_npu_flash_attention", "--device", "cpu"],
         ["--enable_npu_flash_attention", "NPU"], TRAINER_BASE),
    case("trainer: resume from a folder that is not a checkpoint", "train",
         ["--resume_from_checkpoint", "{tmp}/checkpoint-7"], ["checkpoint-7", "fluxkit_state.json"], TRAINER_BASE,
         files={"checkpoint-7/pytorch_model.bin": "not ours"}),
    case("trainer: output dir under a regular file", "train_lora", ["--output_dir", "{tmp}/blocker/out"],
         ["--output_dir", "blocker/out", "cannot be created"], TRAINER_BASE, files={"blocker": ""}),
    case("trainer: misspelt flag", "train_lora", ["--lerning_rate", "1e-4"], ["--lerning_rate"], TRAINER_BASE),
    case("trainer: pivotal tuning and CLIP LoRA together", "train_lora", ["--train_text_encoder_ti", "--train_text_encoder"],
         ["--train_text_encoder", "--train_text_encoder_ti"], TRAINER_BASE),
    case("trainer: both pivotal fractions below 1", "train_lora",
         ["--train_text_encoder_ti", "--train_transformer_frac", "0.5", "--train_text_encoder_ti_frac", "0.5"],
         ["--train_transformer_frac", "--train_text_encoder_ti_frac"], TRAINER_BASE),
    case("trainer: batch size not a number", "train", ["--train_batch_size", "four"],
         ["--train_batch_size", "'four'"], TRAINER_BASE),
    # data conventions users bring (issue 22): kohya-style N_prompt folders, empty captions
    case("trainer: kohya folders beside loose images", "train_lora", ["--instance_data_dir", "{tmp}/kohya"],
         ["kohya", "10_sks cat", "loose.png"], TRAINER_BASE,
         files={"kohya/10_sks cat/a.png": PNG, "kohya/loose.png": PNG}),
    case("trainer: kohya folders and --repeats", "train_lora", ["--instance_data_dir", "{tmp}/kohya", "--repeats", "3"],
         ["--repeats 3", "10_sks cat", "own repeat counts"], TRAINER_BASE, files={"kohya/10_sks cat/a.png": PNG}),
    case("trainer: folder without N_ beside kohya folders", "train_lora", ["--instance_data_dir", "{tmp}/kohya"],
         ["'cats'", "N_", "1_cats"], TRAINER_BASE, files={"kohya/10_sks cat/a.png": PNG, "kohya/cats/b.png": PNG}),
    case("trainer: kohya folder with 0 repeats", "train", ["--instance_data_dir", "{tmp}/kohya"],
         ["0_sks cat", "0 times"], TRAINER_BASE, files={"kohya/0_sks cat/a.png": PNG}),
    case("trainer: empty caption file and an empty --instance_prompt", "train_lora",
         ["--instance_data_dir", "{tmp}/imgs", "--instance_prompt", ""],
         ["a.png", "empty .txt file", "--instance_prompt"], TRAINER_BASE, files={"imgs/a.png": PNG, "imgs/a.txt": ""}),
    # ------------------------------------------------------------------ launchers
    case("launcher: config file is not YAML", "launch", ["--config_file={tmp}/config.yaml"],
         ["config.yaml", "not readable YAML"], LAUNCH_BASE, files={"config.yaml": "deepspeed_config: [unclosed\n"}),
    case("launcher: config file is not a mapping", "launch_lora", ["--config_file={tmp}/list.yaml"],
         ["list.yaml", "not an accelerate config"], LAUNCH_BASE, files={"list.yaml": "- a\n- b\n"}),
    case("launcher: instance dir is empty", "launch_lora", ["--instance_dir={tmp}/empty"], ["instance_dir", "empty"],
         LAUNCH_BASE, files={"empty/.keep": ""}),
    # the reference's prompts ("a photo of pokemon") describe its own data: with the user's images and
    # no captions, the missing prompt is named instead of training every image as a pokemon
    case("launcher: own images without a prompt or captions", "launch_lora",
         ["--model_name={model}", "--instance_dir={tmp}/mine", "--output_dir={out}", "--max_train_steps=1",
          "--batch_size=1"], ["--instance_prompt", "have no caption", "a.png"], files={"mine/a.png": PNG, "mine/b.png": PNG}),
    case("launcher: latent cache dir that cannot take files", "launch_lora",
         ["--batch_size=1", "--latent_cache_dir={tmp}/blocker/cache"],
         ["--latent_cache_dir", "blocker/cache", "cannot be created"], LAUNCH_BASE, files={"blocker": ""}),
    case("launcher: train script missing", "launch_lora", ["--train_script={tmp}/train_dreambooth_lora_flux.py"],
         ["train_script", "train_dreambooth_lora_flux.py", "no such file"], LAUNCH_BASE),
    case("launcher: output dir is a file", "launch", ["--output_dir={tmp}/taken"], ["output_dir", "taken", "is a file"],
         LAUNCH_BASE, files={"taken": ""}),
    case("launcher: python not found", "launch_lora", [], ["PYTHON", "not found"], LAUNCH_BASE,
         env={"PYTHON": "{tmp}/no/python"}),
    case("launcher: train_script imports a module that is not installed", "launch_lora",
         ["--train_script={tmp}/upstream.py"], ["upstream.py", "imports fluxkit_walk_not_installed", "pip install"],
         LAUNCH_BASE, files={"upstream.py": NEEDS_MISSING_MODULE}),
    case("launcher: seed not a whole number", "launch", ["--seed=x1"], ["--seed='x1'", "whole number"], LAUNCH_BASE),
    # ------------------------------------------------------------------ inference
    case("infer: zero denoising steps", "infer", ["--num_inference_steps", "0"], ["--num_inference_steps 0"], INFER_BASE),
    case("infer: T5 sequence too long", "infer", ["--max_sequence_length", "513"], ["--max_sequence_length 513"],
         INFER_BASE),
    case("infer: prompts file not UTF-8", "infer_dreambooth", ["--prompts_file", "{tmp}/prompts.txt"],
         ["--prompts_file", "prompts.txt", "UTF-8"], INFER_BASE, files={"prompts.txt": b"caf\xe9 au lait\n"}),
    case("infer: embeddings that are a pickle", "infer_lora", ["--embeddings", "{tmp}/emb.pt"],
         ["--embeddings", "emb.pt", ".safetensors"], INFER_BASE, files={"emb.pt": b"\x80\x02}q\x00."}),
    case("infer: pickle LoRA refused", "infer_lora", ["--lora_weights", "{tmp}/lora.pt"],
         ["--lora_weights", "lora.pt", "pickle"], INFER_BASE, files={"lora.pt": "pickle bytes"}),
    case("infer: LoRA that is not safetensors", "infer_lora", ["--lora_weights", "{tmp}/lora.safetensors"],
         ["--lora_weights", "lora.safetensors"], INFER_BASE, files={"lora.safetensors": "not a header"}),
    case("infer: distrib batch size zero", "infer_distrib", ["--batch_size", "0"], ["--batch_size 0"], INFER_BASE),
    case("infer: model_index.json unreadable", "infer", ["--model_path", "{tmp}/pipe"], ["--model_path", "model_index.json"],
         INFER_BASE, files={"pipe/model_index.json": "{not json"}),
    # ------------------------------------------------------------------ patch runner
    case("patch_flux: SCRIPT is a folder", "patch_flux", ["{tmp}/scripts"], ["{tmp}/scripts"],
         files={"scripts/.keep": ""}),
    case("patch_flux: SCRIPT has a syntax error", "patch_flux", ["{tmp}/broken.py"], ["broken.py"],
         files={"broken.py": "def train(:\n"}),
    case("patch_flux: SCRIPT imports a module that is not installed", "patch_flux", ["{tmp}/upstream.py", "--seed", "1"],
         ["upstream.py", "imports fluxkit_walk_not_installed (line 2)", "pip install fluxkit_walk_not_installed"],
         files={"upstream.py": NEEDS_MISSING_MODULE}),
    case("patch_flux: misspelt flag", "patch_flux", ["--chek", "train.py"], ["--chek", "did you mean --check?"]),
    # ------------------------------------------------------------------ make_tiny_flux
    case("make_tiny_flux: misspelt flag", "make_tiny_flux", ["--presett", "tiny", "--output_dir", "{out}"],
         ["--presett", "did you mean --preset?"]),
    case("make_tiny_flux: no destination", "make_tiny_flux", ["--preset", "tiny"], ["--output_dir", "--dataset_dir"]),
    case("make_tiny_flux: dataset dir not empty", "make_tiny_flux", ["--dataset_dir", "{tmp}/data"],
         ["--dataset_dir", "--overwrite"], files={"data/mine.txt": "keep me"}),
    case("make_tiny_flux: unknown dtype", "make_tiny_flux", ["--output_dir", "{out}", "--dtype", "fp8"], ["--dtype", "fp8"]),
]
