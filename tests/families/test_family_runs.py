"""Each editing family on a quantized frozen base, and editing pairs in kohya-style folders; in
this process, on the tiny models (FLUX.2 [klein]: tiny_klein; Kontext: the tiny FLUX.1 folder
trained as --model_family kontext), 32 px pairs, fp32."""

import json
import os

import pytest
import torch

from conftest import ROOT, run_entry_inprocess, trainer_args

LORA = os.path.join(ROOT, "train_flux_dreambooth_lora.py")
FAMILIES = {"flux2-klein": "Flux2Transformer2DModel", "kontext": "FluxTransformer2DModel"}


def _pair_args(family, models, data, out, steps, **extra):
    model = models["flux2-klein"] if family == "flux2-klein" else models["flux1"]
    if family == "kontext":
        extra["model_family"] = "kontext"
    args = trainer_args(model, data, out, steps=steps, max_sequence_length=16, mixed_precision="no", no_cache=True,
                        cond_image_dir=data["edit_references"], **extra)
    args[args.index("--instance_data_dir") + 1] = data["edit_targets"]
    return args


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "train_log.jsonl"))]


@pytest.fixture(scope="module")
def models(tiny_flux, tiny_klein):
    return {"flux1": tiny_flux, "flux2-klein": tiny_klein}


@pytest.fixture(scope="module")
def unquantized_first_loss(models, sample_data, tmp_path_factory):
    """Step 1's loss over each family's unquantized base (the quantized runs draw the same noise and timesteps)."""
    first = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(f"unquantized-{family}")
        assert run_entry_inprocess(LORA, _pair_args(family, models, sample_data, out, 1)) == 0
        first[family] = _losses(out)[0]
    return first


def _record_forwards(monkeypatch, class_name):
    """Per transformer forward: (image tokens, the class of each frozen Linear's weight)."""
    import diffusers

    cls, seen = getattr(diffusers, class_name), []
    original = cls.forward

    def forward(self, hidden_states, *args, **kwargs):
        weights = {type(m.weight).__name__ for n, m in self.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lora_" not in n}
        seen.append((hidden_states.shape[1], weights))
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    return seen


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_editing_lora_trains_on_a_quantized_base(family, quantization, models, sample_data, tmp_path, monkeypatch,
                                                 unquantized_first_loss):
    seen = _record_forwards(monkeypatch, FAMILIES[family])
    out = tmp_path / "out"
    assert run_entry_inprocess(LORA, _pair_args(family, models, sample_data, out, 2, base_quantization=quantization,
                                                learning_rate="1e-3")) == 0
    # every forward ran on the quantized transformer (each frozen Linear's weight quantized: bitsandbytes'
    # Params4bit, torchao's Int8Tensor) with the reference's tokens beside the target's (64 + 64)
    kind = {"nf4": "Params4bit", "int8": "Int8Tensor"}[quantization]
    assert [(n, w) for n, w in seen] == [(128, {kind})] * 2, seen
    # step 1 runs before any update: the quantization moved the loss off the unquantized base's, a little
    first, plain = _losses(out)[0], unquantized_first_loss[family]
    assert first != plain and abs(first - plain) < 0.05 * plain, (first, plain)

    from safetensors.torch import load_file

    state = load_file(str(out / "pytorch_lora_weights.safetensors"))  # an ordinary LoRA file
    assert state and all(k.startswith("transformer.") and ".lora_" in k for k in state)
    assert not any(part in k for k in state for part in ("base_layer", "absmax", "quant"))
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)  # B starts at zero: it trained
    assert json.loads((out / "run_config.json").read_text())["settings"]["base_quantization"] == quantization


# ----------------------------------------------------------------------------- kohya folders with references

def _image(path, size, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_kohya_folders_take_each_reference_from_the_same_n_prompt_folder(tmp_path):
    """A kohya-style --instance_data_dir (N_prompt folders) pairs with a --cond_image_dir of the same
    folders: each target's reference is its own folder's file of that name (two concepts both holding
    img0.png keep theirs), each repeat of a target has its reference; a flat reference folder is one line."""
    from fluxkit.data.dataset import DreamBoothDataset
    from fluxkit.shared.errors import UserError
    from fluxkit.data.scan import scan_dataset
    from test_data import make_args

    targets, refs = tmp_path / "targets", tmp_path / "refs"
    layout = {"10_sks cat": [("img0", (40, 36)), ("img1", (36, 40))], "3_zwx toy": [("img0", (48, 32))]}
    for folder, images in layout.items():
        for stem, size in images:
            _image(targets / folder / f"{stem}.png", (32, 32), "white")
            _image(refs / folder / f"{stem}.png", size, "black")  # each reference's size tells it apart
    args = make_args(targets, cond_image_dir=str(refs))
    scan = scan_dataset(args, quiet=True)
    assert scan.num_samples == 2 * 10 + 3 and len(scan.references) == len(scan.samples)
    for sample, reference in zip(scan.samples, scan.references):
        assert os.path.relpath(reference.name, refs) == os.path.relpath(sample.name, targets)
    sizes = {os.path.relpath(r.name, refs): r.size for r in scan.references}
    assert sizes == {os.path.join(f, f"{stem}.png"): size for f, images in layout.items() for stem, size in images}
    assert "3 editing pair(s)" in scan.report()
    dataset = DreamBoothDataset(args, scan=scan)
    item = dataset[len(dataset) - 1]  # the toy's repeat: its reference placed into the target's 32x32
    assert item["prompt"] == "zwx toy" and item["cond_pixel_values"].shape == (3, 32, 32)

    flat = tmp_path / "flat"
    for folder, images in layout.items():
        for stem, size in images:
            _image(flat / f"{stem}.png", size, "black")
    with pytest.raises(UserError) as refused:
        scan_dataset(make_args(targets, cond_image_dir=str(flat)), quiet=True)
    message = str(refused.value)
    assert "\n" not in message and os.path.join("10_sks cat", "img0") in message and "mirrors the N_prompt folders" in message


# ----------------------------------------------------------------------------- images the trainer renders

@pytest.mark.parametrize("family", list(FAMILIES))
def test_class_images_and_validation_render_at_the_run_resolution(family, models, sample_data, tmp_path):
    """Prior preservation's class images and the validation image, through each family's pipeline at
    --resolution (Kontext's pipeline scales a render without a reference to 1 MP unless told not to: a
    multi-minute render of a 32 px model; klein's pipeline takes the image first, the prompt by name)."""
    from PIL import Image

    model = models["flux2-klein"] if family == "flux2-klein" else models["flux1"]
    extra = dict(model_family="kontext") if family == "kontext" else {}
    out, classes = tmp_path / "out", tmp_path / "class"
    assert run_entry_inprocess(LORA, trainer_args(model, sample_data, out, steps=1, max_sequence_length=16, no_cache=True,
                                                  with_prior_preservation=True, class_prompt="a dog", class_data_dir=classes,
                                                  num_class_images=1, num_validation_steps=1, validation_prompt="a dog",
                                                  num_validation_images=1, **extra)) == 0
    for path in (classes / "class_00000.png", out / "validation" / "validation-final.png"):
        with Image.open(path) as image:
            assert image.size == (32, 32), path
