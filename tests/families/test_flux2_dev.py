"""FLUX.2 [dev] on its tiny model (make_tiny_flux.py --family flux2): prompts through the processor's
text half where torchvision is missing (fluxkit.families.pixtral_text), our LoRA trainer, the plain
Flux2Pipeline loading its LoRA, the inference scripts, and the runner's pixtral-text-processor patch."""

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, run_card_code
from test_inference import _fresh_process_state  # noqa: F401 (autouse: in-process inference leaves no accelerate state)

LORA = os.path.join(ROOT, "train_flux_dreambooth_lora.py")
PROMPTS = ["a photo of sks dog", "a red car in the snow"]
TOKENS = 48  # the tiny tokenizer's system message takes 33 tokens: room for the prompt after it


@pytest.fixture(scope="module")
def dev_pipe(tiny_flux2_dev):
    from fluxkit import families

    pipe = families.get("flux2").load_pipeline(tiny_flux2_dev, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe, **extra):
    call = dict(prompt=PROMPTS[0], height=32, width=32, num_inference_steps=2, max_sequence_length=TOKENS,
                output_type="np", generator=torch.Generator().manual_seed(0))
    return pipe(**{**call, **extra}).images


# ----------------------------------------------------------------------------- the prompt path

def test_folder_is_a_flux2_pipeline_whose_tokenizer_is_a_pixtral_processor(tiny_flux2_dev):
    from fluxkit import families

    index = json.load(open(os.path.join(tiny_flux2_dev, "model_index.json")))
    assert index["_class_name"] == "Flux2Pipeline" and index["tokenizer"] == ["transformers", "PixtralProcessor"]
    assert index["text_encoder"] == ["transformers", "Mistral3ForConditionalGeneration"]
    processor = json.load(open(os.path.join(tiny_flux2_dev, "tokenizer", "processor_config.json")))
    assert processor["processor_class"] == "PixtralProcessor"
    assert families.of_folder(tiny_flux2_dev).name == "flux2"
    config = json.load(open(os.path.join(tiny_flux2_dev, "text_encoder", "config.json")))
    assert config["text_config"]["num_hidden_layers"] > max(families.get("flux2").out_layers)


def test_our_prompt_encoding_equals_flux2pipelines_and_holds_system_message_and_prompt(dev_pipe):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    from fluxkit import families
    from fluxkit.families.pixtral_text import PixtralTextProcessor, torchvision_available

    assert not torchvision_available() and isinstance(dev_pipe.tokenizer, PixtralTextProcessor)
    args = SimpleNamespace(max_sequence_length=TOKENS, text_encoder_out_layers=None)
    with torch.no_grad():
        ours, pooled = families.get("flux2").encode_prompts(dev_pipe, PROMPTS, args, "cpu")
        theirs, _ = dev_pipe.encode_prompt(PROMPTS, max_sequence_length=TOKENS)
    assert ours.shape == (2, TOKENS, 3 * 16) and pooled.shape == (2, 0)  # 3 hidden states x the 16-wide text model
    assert torch.equal(ours, theirs) and not torch.equal(ours[0], ours[1])
    tokens = dev_pipe.tokenizer.apply_chat_template(format_input(PROMPTS[:1]), tokenize=True, return_dict=True)["input_ids"][0]
    text = dev_pipe.tokenizer.tokenizer.decode(tokens)
    assert text.startswith("<s>[SYSTEM_PROMPT]You are an AI that reasons about image descriptions.")
    assert text.endswith(f"[/SYSTEM_PROMPT][INST]{PROMPTS[0]}[/INST]") and len(tokens) < TOKENS


def test_the_processor_reads_a_legacy_chat_template_and_refuses_images(tiny_flux2_dev, tmp_path):
    """A tokenizer folder with the processor's template only in chat_template.json (the older layout):
    the tokenizer alone has no template there, the processor's text half renders with it."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from PIL import Image
    from transformers import AutoTokenizer

    from fluxkit.families.pixtral_text import PixtralTextProcessor

    legacy = tmp_path / "tokenizer"
    shutil.copytree(os.path.join(tiny_flux2_dev, "tokenizer"), legacy)
    template = (legacy / "chat_template.jinja").read_text()
    (legacy / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    os.remove(legacy / "chat_template.jinja")
    assert AutoTokenizer.from_pretrained(str(legacy)).chat_template is None
    current = PixtralTextProcessor.from_pretrained(tiny_flux2_dev, subfolder="tokenizer")
    older = PixtralTextProcessor.from_pretrained(str(legacy))
    conversation = format_input(PROMPTS)
    call = dict(tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", truncation=True, max_length=TOKENS)
    assert torch.equal(older.apply_chat_template(conversation, **call)["input_ids"],
                       current.apply_chat_template(conversation, **call)["input_ids"])
    with pytest.raises(ValueError, match="needs torchvision"):
        current.apply_chat_template(format_input(PROMPTS[:1], images=[[Image.new("RGB", (64, 64))]]), **call)
    # saved, it is a PixtralProcessor folder again
    current.save_pretrained(str(tmp_path / "saved"))
    assert json.load(open(tmp_path / "saved" / "processor_config.json"))["processor_class"] == "PixtralProcessor"
    assert (tmp_path / "saved" / "chat_template.jinja").read_text() == template


# ----------------------------------------------------------------------------- training

def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "train_log.jsonl"))]


@pytest.fixture(scope="module")
def dev_lora(tiny_flux2_dev, sample_data, tmp_path_factory):
    """Two 4-step LoRA runs from the same draws: lr 1e-3 (with a validation image) and 1e-30."""
    from conftest import run_entry_inprocess, trainer_args

    root = tmp_path_factory.mktemp("dev_lora")
    runs = {}
    for lr in ("1e-3", "1e-30"):  # 1e-30: updates vanish in fp32 (0 is refused)
        extra = dict(validation_prompt=PROMPTS[0], num_validation_images=1) if lr == "1e-3" else {}
        out = root / f"lr{lr}"
        assert run_entry_inprocess(LORA, trainer_args(tiny_flux2_dev, sample_data, out, steps=4, max_sequence_length=TOKENS,
                                                      learning_rate=lr, latent_cache_dir=root / "cache", **extra)) == 0
        runs[lr] = _losses(out)
    return root / "lr1e-3", runs


def test_the_lora_card_code_runs_where_torchvision_is_missing(dev_lora):
    """The card loads Flux2Pipeline.from_pretrained, which fails without torchvision (this host: the tokenizer
    folder is a PixtralProcessor); its note gives the loader that works: with the note's line instead, the
    card's code renders."""
    from fluxkit.families.pixtral_text import torchvision_available

    out = dev_lora[0]
    code = (out / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    lines = code.splitlines()
    note = next(i for i, l in enumerate(lines) if l.startswith("# pipe = fluxkit.families.get('flux2').load_pipeline("))
    if not torchvision_available():
        lines = [l for l in lines if "Flux2Pipeline.from_pretrained" not in l]
        lines[note - 1] = "import fluxkit.families; " + lines[note - 1][2:]
    code = "\n".join(lines).replace("torch.bfloat16", "torch.float32").replace(
        ").images[0]", f", height=32, width=32, num_inference_steps=1, max_sequence_length={TOKENS}).images[0]")
    assert run_card_code(code, out)["image"].size == (32, 32)


def test_lora_learns_and_its_file_changes_the_plain_flux2_pipeline(dev_lora, dev_pipe):
    from safetensors.torch import load_file

    out, runs = dev_lora
    assert runs["1e-3"][0] == runs["1e-30"][0] and runs["1e-3"][1:] != runs["1e-30"][1:]
    assert list((out / "validation").glob("*.png"))  # rendered from the cached prompt (no negative prompt)
    keys = list(load_file(str(out / "pytorch_lora_weights.safetensors")))
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
    assert any("single_transformer_blocks.0.attn.to_qkv_mlp_proj" in k for k in keys)  # FLUX.2's default targets

    before = _render(dev_pipe)
    dev_pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors", adapter_name="trained")
    try:
        after = _render(dev_pipe)
    finally:
        dev_pipe.delete_adapters("trained")
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-4
    assert np.array_equal(_render(dev_pipe), before)  # the adapter gone, the base image again


# ----------------------------------------------------------------------------- inference scripts

def test_inference_scripts_render_text_to_image_edits_and_the_lora(tiny_flux2_dev, dev_lora, tmp_path):
    from PIL import Image

    from test_inference import infer, manifest, pixels, pngs

    fast = ["--model_path", tiny_flux2_dev, "--height", "64", "--width", "64", "--num_inference_steps", "2", "--dtype", "fp32",
            "--max_sequence_length", str(TOKENS), "--seeds", "8", "--prompt", "make it blue"]
    reference = tmp_path / "reference.png"  # FLUX.2 takes references of 64 px and more
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(reference)
    lora = dev_lora[0] / "pytorch_lora_weights.safetensors"
    runs = {"text": ("BASE", []), "edit": ("BASE", ["--image", reference]), "lora": ("LORA", ["--lora_weights", lora]),
            "distrib": ("DISTRIB", ["--image", reference])}
    for name, (script, extra) in runs.items():
        assert infer(script, [*fast, *extra, "--output_dir", tmp_path / name]) == 0, name
    text, edit, with_lora, distrib = (manifest(tmp_path / n)[0] for n in runs)
    assert text["guidance_scale"] == 4.0 and "image" not in text  # Flux2Pipeline's guidance default
    assert edit["image"] == os.path.realpath(reference) and with_lora["lora"] == os.path.realpath(lora)
    png = lambda d: pixels(tmp_path / d / pngs(tmp_path / d)[0])  # noqa: E731
    assert np.abs(png("text") - png("edit")).max() > 0 and np.abs(png("text") - png("lora")).max() > 0
    assert edit["file"] == distrib["file"] and np.array_equal(png("edit"), png("distrib"))


# ----------------------------------------------------------------------------- diffusers' scripts through the runner

def test_runner_patch_lets_transformers_pixtral_processor_load_the_tokenizer_folder(tiny_flux2_dev, monkeypatch):
    """What diffusers' train_dreambooth_lora_flux2.py does with FLUX.2 [dev]'s tokenizer: PixtralProcessor
    .from_pretrained, then Flux2Pipeline.from_pretrained with it (and, for validation, without it)."""
    import transformers
    from diffusers import Flux2Pipeline

    from fluxkit.upstream import patches
    from fluxkit.families.pixtral_text import PixtralTextProcessor

    monkeypatch.setattr(transformers, "PixtralProcessor", transformers.PixtralProcessor)  # undone after the test
    with pytest.raises(ImportError, match="requires the Torchvision library"):
        transformers.PixtralProcessor.from_pretrained(tiny_flux2_dev, subfolder="tokenizer")
    (name, applied, why), = patches.apply(["pixtral-text-processor"])
    assert applied and "no torchvision" in why
    patches.apply(["pixtral-text-processor"])  # idempotent
    from transformers import PixtralProcessor

    tokenizer = PixtralProcessor.from_pretrained(tiny_flux2_dev, subfolder="tokenizer")
    encoder = Flux2Pipeline.from_pretrained(tiny_flux2_dev, vae=None, transformer=None, scheduler=None, tokenizer=tokenizer)
    whole = Flux2Pipeline.from_pretrained(tiny_flux2_dev)
    assert isinstance(whole.tokenizer, PixtralTextProcessor) and encoder.tokenizer is tokenizer
    with torch.no_grad():
        embeds, ids = encoder.encode_prompt(PROMPTS[0], max_sequence_length=TOKENS)
        assert torch.equal(embeds, whole.encode_prompt(PROMPTS[0], max_sequence_length=TOKENS)[0])
    assert embeds.shape == (1, TOKENS, 48) and ids.shape == (1, TOKENS, 4)
