"""The model-family seam (fluxkit.families): which family a folder is, and each family on its tiny model."""

import json
import os
import shutil

import pytest

from conftest import ROOT, run_card_code
from fluxkit import families
from fluxkit.shared.errors import UserError


def test_family_comes_from_model_index_and_model_family_overrides_within_the_same_components(tiny_flux, tmp_path):
    assert families.of_folder(tiny_flux).name == "flux1"
    assert families.of_folder(tiny_flux, "kontext").name == "kontext"  # a FLUX.1 folder trains Kontext
    with pytest.raises(UserError, match="cannot use .* flux1 pipeline"):
        families.of_folder(tiny_flux, "flux2-klein")
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UserError, match="StableDiffusionPipeline pipeline, which is no FLUX family"):
        families.of_folder(str(other))


def test_every_family_names_its_pipeline_and_components():
    for name in families.NAMES:
        family = families.get(name)
        assert family.pipeline_class().__name__ == family.pipeline_name
        assert family.component_class("transformer").__name__ == family.transformer_class
        assert set(family.text_parts()) <= set(family.components)


# ----------------------------------------------------------------------------- FLUX.2 [klein]

LORA = os.path.join(ROOT, "train_flux_dreambooth_lora.py")


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "train_log.jsonl"))]


def _render(pipe, seed=0):
    import torch

    return pipe(prompt="a photo of sks dog", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                output_type="np", generator=torch.Generator().manual_seed(seed)).images


def test_klein_lora_learns_and_its_file_changes_the_plain_klein_pipeline(tiny_klein, sample_data, tmp_path):
    import numpy as np
    from diffusers import Flux2KleinPipeline
    from safetensors.torch import load_file

    from conftest import run_entry_inprocess, trainer_args

    runs = {}
    for lr in ("1e-3", "1e-30"):  # 1e-30: updates vanish in fp32 (0 is refused)
        out = tmp_path / f"lr{lr}"
        assert run_entry_inprocess(LORA, trainer_args(tiny_klein, sample_data, out, steps=4, max_sequence_length=16,
                                                      learning_rate=lr, latent_cache_dir=tmp_path / "cache")) == 0
        runs[lr] = _losses(out)
    # the same draws: step 1 is the same loss, then the trained adapter moves it
    assert runs["1e-3"][0] == runs["1e-30"][0] and runs["1e-3"][1:] != runs["1e-30"][1:]
    lora = tmp_path / "lr1e-3" / "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(lora)))
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
    assert any("single_transformer_blocks.0.attn.to_qkv_mlp_proj" in k for k in keys)  # klein's default targets

    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    before = _render(pipe)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    after = _render(pipe)
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-4


def test_klein_refuses_training_a_text_encoder_in_one_line(tiny_klein, sample_data, tmp_path, capsys):
    from conftest import run_entry_inprocess, trainer_args

    status = run_entry_inprocess(LORA, trainer_args(tiny_klein, sample_data, tmp_path / "o", steps=1,
                                                    max_sequence_length=16, train_text_encoder=True))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1 and "--train_text_encoder" in errors[0] and "flux2-klein" in errors[0]
    assert not (tmp_path / "o").exists()  # refused before the output folder is made


# ----------------------------------------------------------------------------- editing pairs (Kontext, FLUX.2)

def _edit_args(model, data, out, steps=2, **extra):
    from conftest import trainer_args

    args = trainer_args(model, data, out, steps=steps, max_sequence_length=16, **extra)
    args[args.index("--instance_data_dir") + 1] = data["edit_targets"]
    return args


def _record_inputs(monkeypatch, cls):
    """Every transformer forward's (image tokens, image position ids), the real forward still running."""
    seen = []
    original = cls.forward

    def forward(self, hidden_states, *args, **kwargs):
        seen.append((hidden_states.shape[1], kwargs["img_ids"].detach().clone()))
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    return seen


def test_kontext_pairs_reach_the_transformer_and_cached_equals_uncached(tiny_flux, sample_data, tmp_path, monkeypatch):
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel
    from safetensors.torch import load_file

    from conftest import run_entry_inprocess

    seen = _record_inputs(monkeypatch, FluxTransformer2DModel)
    pairs = dict(cond_image_dir=sample_data["edit_references"], model_family="kontext")
    cached, uncached = tmp_path / "cached", tmp_path / "uncached"
    assert run_entry_inprocess(LORA, _edit_args(tiny_flux, sample_data, cached, latent_cache_dir=tmp_path / "c", **pairs)) == 0
    # 32 px, a 2x VAE, 2x2 packing: 64 target tokens + 64 reference tokens, the reference's ids marked 1 on axis 0
    assert [n for n, _ in seen] == [128, 128]
    ids = seen[0][1]
    assert (ids[:64, 0] == 0).all() and (ids[64:, 0] == 1).all() and torch_equal(ids[:64, 1:], ids[64:, 1:])
    assert run_entry_inprocess(LORA, _edit_args(tiny_flux, sample_data, uncached, no_cache=True, **pairs)) == 0
    assert _losses(str(cached)) == _losses(str(uncached))

    # the Kontext LoRA loads into the plain FluxKontextPipeline and changes its edit of an image
    import numpy as np
    from PIL import Image

    pipe = FluxKontextPipeline.from_pretrained(tiny_flux, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(os.path.join(sample_data["edit_references"], "pair_000.png"))

    def edit():
        import torch

        return pipe(**families.get("kontext").edit_call(image, 32, 32), prompt="make the circle blue", height=32, width=32,
                    num_inference_steps=2,
                    max_sequence_length=16, output_type="np", generator=torch.Generator().manual_seed(0)).images

    before = edit()
    pipe.load_lora_weights(str(cached), weight_name="pytorch_lora_weights.safetensors")
    assert np.abs(edit() - before).max() > 1e-4
    assert all(k.startswith("transformer.") for k in load_file(str(cached / "pytorch_lora_weights.safetensors")))


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_pairs_from_a_parquet_column_train_klein_with_reference_tokens_cached_as_uncached(tiny_klein, sample_data, tmp_path,
                                                                                        monkeypatch):
    from diffusers import Flux2Transformer2DModel

    from conftest import run_entry_inprocess, trainer_args

    seen = _record_inputs(monkeypatch, Flux2Transformer2DModel)

    def train(out, **cache):
        args = trainer_args(tiny_klein, sample_data, out, steps=2, max_sequence_length=16, dataset_name=sample_data["edit_dataset"],
                            caption_column="text", cond_image_column="cond_image", **cache)
        assert run_entry_inprocess(LORA, args) == 0
        return _losses(str(out))

    cached = train(tmp_path / "cached", latent_cache_dir=tmp_path / "cache")
    # FLUX.2: 64 target tokens (patchified 2x2) + 64 reference tokens at t = 10 on the first of 4 axes
    assert [n for n, _ in seen] == [128, 128]
    ids = seen[0][1][0]
    assert (ids[:64, 0] == 0).all() and (ids[64:, 0] == 10).all() and ids.shape[-1] == 4
    # both latents of each pair from the cache give the losses of encoding them every step
    assert train(tmp_path / "uncached", no_cache=True) == cached
    _run_model_card_code(tmp_path / "cached", os.path.join(sample_data["edit_references"], "pair_000.png"), tmp_path)


def test_a_missing_reference_with_skip_bad_images_skips_its_pair(tiny_flux, sample_data, tmp_path, capsys):
    """families.md: a missing or unreadable reference is one error line; with --skip_bad_images the pair is skipped
    (a missing one stopped the run even with the flag)."""
    from conftest import run_entry_inprocess

    refs = tmp_path / "refs"
    shutil.copytree(sample_data["edit_references"], refs)
    os.remove(refs / "pair_002.png")
    args = _edit_args(tiny_flux, sample_data, tmp_path / "o", cond_image_dir=refs, model_family="kontext",
                      skip_bad_images=True)
    assert run_entry_inprocess(LORA, args) == 0
    err = capsys.readouterr().err
    assert "data: 3 editing pair(s)" in err and "pair_002.png (no reference image" in err, err[-2000:]


@pytest.mark.parametrize("case", ["missing reference", "text-to-image family"])
def test_a_bad_pair_is_one_error_line_and_nothing_is_written(tiny_flux, sample_data, tmp_path, capsys, case):
    from conftest import run_entry_inprocess

    refs = tmp_path / "refs"
    shutil.copytree(sample_data["edit_references"], refs)
    extra = dict(cond_image_dir=refs, model_family="kontext")
    if case == "missing reference":
        os.remove(refs / "pair_002.png")
        needles = ["pair_002.png", "no reference image", str(refs)]
    else:
        extra.pop("model_family")
        needles = ["flux1 trains text-to-image only", "--model_family kontext"]
    status = run_entry_inprocess(LORA, _edit_args(tiny_flux, sample_data, tmp_path / "o", **extra))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1, errors
    assert all(n in errors[0] for n in needles), errors[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["layer past the encoder", "a family read at its final outputs"])
def test_text_encoder_out_layers_are_judged_before_anything_loads(tiny_flux, tiny_klein, sample_data, tmp_path,
                                                                   capsys, monkeypatch, case):
    """A layer the stored text encoder lacks stopped the run only while the cache was being filled, after the
    models loaded and with the output folder made; FLUX.1 ignored the flag. Now one line, before anything loads."""
    import diffusers

    from conftest import run_entry_inprocess, trainer_args

    def no_loading(*a, **k):
        raise AssertionError("a model loaded before the refusal")

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", no_loading)
    model, layers, needles = ((tiny_klein, "9 18 99", ["9 18 99", "30 layers", "hidden states 0..30"])
                              if case == "layer past the encoder" else (tiny_flux, "1 2", ["flux1", "drop the flag"]))
    args = trainer_args(model, sample_data, tmp_path / "o", steps=2, max_sequence_length=16)
    status = run_entry_inprocess(LORA, args + ["--text_encoder_out_layers", *layers.split()])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1 and all(n in errors[0] for n in needles), errors
    assert not (tmp_path / "o").exists()


def test_a_max_sequence_length_that_keeps_none_of_the_prompt_is_refused(tiny_flux2_dev, tiny_klein, sample_data,
                                                                         tmp_path, capsys):
    """FLUX.2's chat template puts tokens before the prompt (the tiny [dev]'s system message: 31) and the sequence
    is cut from the end: --max_sequence_length 16 trained and rendered on the template alone, silently. Now the
    trainer refuses it before anything loads, inference before rendering; klein's 16 keeps its prompt."""
    from conftest import run_entry_inprocess, trainer_args
    from test_inference import infer

    out = tmp_path / "o"
    assert run_entry_inprocess(LORA, trainer_args(tiny_flux2_dev, sample_data, out, steps=1, max_sequence_length=16)) == 2
    assert infer("BASE", ["--model_path", tiny_flux2_dev, "--prompt", "a red car", "--seeds", "1", "--height", "32",
                          "--width", "32", "--num_inference_steps", "1", "--max_sequence_length", "16",
                          "--output_dir", out]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 2 and all("--max_sequence_length 16 keeps none of the prompt" in e and "31 tokens" in e
                                    for e in errors), errors
    assert not out.exists()
    from fluxkit import families

    tokenizer = families.get("flux2-klein").component_class("tokenizer").from_pretrained(tiny_klein, subfolder="tokenizer")
    families.get("flux2-klein").check_prompt_room(tokenizer, 16)  # the tests' length: 5 template tokens before


# ----------------------------------------------------------------------------- inference

def test_inference_scripts_take_any_family_and_an_image_for_editing(tiny_flux, tiny_klein, sample_data, tmp_path, capsys):
    from fluxkit.inference import args as infer_args, run as inference
    from fluxkit.shared.errors import cli

    def infer(*argv):
        return cli(inference.main)(infer_args.BASE, [str(a) for a in argv])

    fast = ["--height", "32", "--width", "32", "--num_inference_steps", "2", "--max_sequence_length", "16",
            "--dtype", "fp32", "--seeds", "1", "--prompt", "make the circle blue"]
    assert infer("--model_path", tiny_klein, "--output_dir", tmp_path / "klein", *fast) == 0
    kontext = tmp_path / "kontext"  # FLUX.1's components saved as a Kontext pipeline
    shutil.copytree(tiny_flux, kontext)
    index = json.loads((kontext / "model_index.json").read_text())
    (kontext / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    image = os.path.join(sample_data["edit_references"], "pair_000.png")
    assert infer("--model_path", kontext, "--output_dir", tmp_path / "edit", "--image", image, *fast) == 0
    record = [json.loads(line) for line in open(tmp_path / "edit" / "manifest.jsonl")][0]
    assert record["image"] == os.path.realpath(image) and len(record["image_digest"]) >= 16

    capsys.readouterr()
    assert infer("--model_path", tiny_flux, "--output_dir", tmp_path / "t2i", "--image", image, *fast) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--image" in errors[0] and "flux1" in errors[0]


def test_klein_full_fine_tune_writes_a_klein_pipeline_folder(tiny_klein, sample_data, tmp_path):
    import torch
    from diffusers import Flux2KleinPipeline

    from conftest import run_entry_inprocess, trainer_args

    full = os.path.join(os.path.dirname(LORA), "train_flux_dreambooth.py")
    out = tmp_path / "full"
    assert run_entry_inprocess(full, trainer_args(tiny_klein, sample_data, out, steps=2, max_sequence_length=16,
                                                  learning_rate="1e-3")) == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    trained = Flux2KleinPipeline.from_pretrained(str(out), local_files_only=True)
    base = Flux2KleinPipeline.from_pretrained(tiny_klein, local_files_only=True)
    moved = [n for n, p in trained.transformer.named_parameters()
             if not torch.equal(p, dict(base.transformer.named_parameters())[n])]
    assert moved and all(torch.equal(a, b) for a, b in zip(trained.text_encoder.parameters(), base.text_encoder.parameters()))


def _run_model_card_code(out, reference, tmp_path, **call):
    """The LoRA's README.md code as a user runs it in the output folder, at tiny size (`call`: more keywords for
    the pipeline): it renders an edit (it called pipe(prompt) positionally, which Kontext's and FLUX.2's pipelines
    take as the image, and the pivotal card named FluxPipeline for every family)."""
    from PIL import Image

    Image.open(reference).resize((64, 64)).save(tmp_path / "reference.png")  # FLUX.2 takes 64 px and more
    card = (out / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "image=load_image('reference.png')" in code, code
    call = dict(height=32, width=32, num_inference_steps=1, max_sequence_length=16, **call)
    code = (code.replace("reference.png", str(tmp_path / "reference.png")).replace("torch.bfloat16", "torch.float32")
            .replace(").images[0]", "".join(f", {k}={v!r}" for k, v in call.items()) + ").images[0]"))
    assert run_card_code(code, out)["image"].size == (32, 32)
    return code


def test_a_kontext_pivotal_editing_run_s_model_card_code_edits(tiny_flux, sample_data, tmp_path):
    from conftest import run_entry_inprocess

    out = tmp_path / "tok"
    args = _edit_args(tiny_flux, sample_data, out, model_family="kontext", cond_image_dir=sample_data["edit_references"],
                      train_text_encoder_ti=True)
    args[args.index("--instance_prompt") + 1] = "make TOK blue"
    assert run_entry_inprocess(LORA, args) == 0
    code = _run_model_card_code(out, os.path.join(sample_data["edit_references"], "pair_000.png"), tmp_path,
                                _auto_resize=False, max_area=32 * 32)  # at the tiny size, not Kontext's 1 MP
    assert "FluxKontextPipeline.from_pretrained" in code and "load_textual_inversion" in code


@pytest.mark.parametrize("model,family,pipeline", [("tiny_flux", "kontext", "FluxKontextPipeline"),
                                                     ("tiny_flux2_dev", None, "Flux2Pipeline")])
def test_full_fine_tune_of_an_editing_family_writes_its_pipeline_and_edits(model, family, pipeline, sample_data,
                                                                          tmp_path, request):
    """Kontext (a FLUX.1 folder trained with --model_family kontext) and FLUX.2 [dev] full fine-tunes on editing
    pairs: the folder is the family trained (FLUX.1's index said FluxPipeline, so --image was refused on it), and
    infer_flux_text2img_dreambooth_bf16.py edits with it as the user types it."""
    from PIL import Image

    from conftest import run_entry_inprocess
    from test_inference import infer

    model_dir = request.getfixturevalue(model)
    full = os.path.join(os.path.dirname(LORA), "train_flux_dreambooth.py")
    out = tmp_path / "full"
    extra = {"model_family": family} if family else {}
    args = _edit_args(model_dir, sample_data, out, cond_image_dir=sample_data["edit_references"], **extra)
    args[args.index("--max_sequence_length") + 1] = "48"  # FLUX.2 [dev]'s tiny system message takes 33 tokens
    assert run_entry_inprocess(full, args) == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == pipeline
    reference = tmp_path / "reference.png"  # FLUX.2 takes references of 64 px and more
    Image.open(os.path.join(sample_data["edit_references"], "pair_000.png")).resize((64, 64)).save(reference)
    assert infer("DREAMBOOTH", ["--model_path", out, "--image", reference, "--prompt", "make it blue", "--seeds", "1",
                                "--height", "32", "--width", "32", "--num_inference_steps", "2",
                                "--max_sequence_length", "48", "--dtype", "fp32", "--output_dir", tmp_path / "edits"]) == 0


@pytest.mark.cli
def test_klein_editing_run_sigkilled_at_step_3_resumes_bit_identical(tiny_klein, sample_data, tmp_path):
    from conftest import run_entry_inprocess
    from test_reliability import KILL_AT_STEP, SIGKILLED, assert_bit_identical, listing, steps_and_losses, train_subprocess

    def args(out, **extra):
        return _edit_args(tiny_klein, sample_data, out, steps=4, cond_image_dir=sample_data["edit_references"],
                          checkpointing_steps=2, mixed_precision="no", learning_rate="1e-3", **extra)

    reference, out = tmp_path / "uninterrupted", tmp_path / "crashed"
    assert run_entry_inprocess(LORA, args(reference)) == 0
    resumed = args(out, resume_from_checkpoint="latest")
    proc = train_subprocess(LORA, resumed, env={KILL_AT_STEP: "3"})
    assert proc.returncode == SIGKILLED and listing(out) == ["checkpoint-2"], proc.stderr[-3000:]
    assert run_entry_inprocess(LORA, resumed) == 0
    assert steps_and_losses(out) == steps_and_losses(reference)
    assert_bit_identical(weights_of(out), weights_of(reference))


def weights_of(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))


def test_launcher_names_the_family_and_applies_its_refusals(tiny_klein, sample_data, tmp_path):
    from conftest import ROOT, assert_user_error, run_inprocess

    launcher = os.path.join(ROOT, "finetune_flux_dreambooth_lora_deepspeed_bf16.sh")
    keys = [f"--model_name={tiny_klein}", f"--instance_dir={sample_data['instance_dir']}", f"--output_dir={tmp_path / 'o'}",
            "--instance_prompt=a photo of sks dog", "--batch_size=1"]
    proc = run_inprocess([launcher, *keys, "--dry_run"])
    assert proc.returncode == 0 and "model family: flux2-klein (Flux2KleinPipeline)" in proc.stdout, proc.stdout + proc.stderr
    # the validation line's estimate counts FLUX.2's transformer (FLUX.1's count raised on its config), and an
    # editing run's training steps with the reference's tokens (its renders have none): a smaller share
    short = ["--dry_run", "--validation_prompt=a dog", "--max_train_steps=10", "--resolution=32"]
    edit = [f"--instance_dir={sample_data['edit_targets']}", f"--cond_image_dir={sample_data['edit_references']}"]
    shares = []
    for extra in ([], edit):
        proc = run_inprocess([launcher, *keys, *short, *extra])
        line = next((s for s in proc.stdout.splitlines() if s.startswith("validation:")), proc.stdout + proc.stderr)
        assert "% of the run's transformer compute (estimate)" in line, line
        shares.append(int(line.split("about ")[1].split("%")[0]))
    assert shares[1] < shares[0], shares
    proc = run_inprocess([launcher, *keys, "--train_text_encoder"])
    assert_user_error(proc, "--train_text_encoder", "flux2-klein")
    proc = run_inprocess([launcher, *keys, "--dry_run", "--", "--text_encoder_out_layers", "9", "18", "99"])
    assert_user_error(proc, "--text_encoder_out_layers 9 18 99", "hidden states 0..30")  # the folder's encoder judged
    assert not (tmp_path / "o").exists()


def test_flops_count_the_reference_tokens_of_editing_pairs(tiny_klein):
    from types import SimpleNamespace as N

    from fluxkit.shared.flops import flux2_forward_flop_parts, training_step_flops
    from fluxkit.training.runcontrol import flops_and_peak
    from fluxkit.training.train_args import parse

    config = json.loads(open(os.path.join(tiny_klein, "transformer", "config.json")).read())
    m = N(vae=N(config=N(block_out_channels=[8, 16])), transformer=N(config=config), family=families.get("flux2-klein"))
    info = N(type="cpu", count=1, name="cpu")
    run = ["--pretrained_model_name_or_path", tiny_klein, "--instance_prompt", "p", "--instance_data_dir", "d",
           "--resolution", "32", "--max_sequence_length", "16"]
    t2i, edit = (flops_and_peak(parse(run + extra, lora=True), m, info, None, 1)[0]
                 for extra in ([], ["--cond_image_dir", "refs"]))
    # 32 px, a 2x VAE, 2x2 patches: 64 target tokens, and 64 more for the reference
    assert t2i == training_step_flops(config, 64, 16, frozen_base=True, flop_parts=flux2_forward_flop_parts)
    assert edit == training_step_flops(config, 128, 16, frozen_base=True, flop_parts=flux2_forward_flop_parts)
