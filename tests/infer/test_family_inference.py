"""The inference scripts on every FLUX family (fluxkit.families): Kontext and klein edits with
--image (one for all prompts, or per line of a .jsonl prompts file), each family's LoRA, the
family's defaults, one-line errors, and klein split over two processes (Ulysses)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, accelerate_launch
from test_context_parallel import two_process_config
from test_inference import FAST, _fresh_process_state, infer, manifest, pixels, pngs  # noqa: F401

# 64 x 64: the FLUX.2 pipelines take no smaller reference image
EDIT = [*FAST, "--height", "64", "--width", "64", "--max_sequence_length", "8", "--seeds", "8"]
DISTRIB = os.path.join(ROOT, "infer_flux_text2img_distrib.py")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Two 64x64 reference images that differ, a 32x32 one, and a file that is no image."""
    folder = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    for name in ("red.png", "noise.png"):
        data = np.zeros((64, 64, 3), np.uint8) + np.array([200, 30, 30], np.uint8) if name == "red.png" \
            else rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(data).save(folder / name)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "small.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


def family_lora(model_dir, family_name, out_dir):
    """A LoRA on the family's transformer made with peft (non-zero lora_B), saved by the family's pipeline class."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    from fluxkit import families

    family = families.get(family_name)
    cls = family.pipeline_class()
    pipe = cls.from_pretrained(model_dir, local_files_only=True)
    torch.manual_seed(1)
    targets = family.default_lora_targets(pipe.transformer.config)  # what our trainer adapts for this family
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    cls.save_lora_weights(str(out_dir), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return os.path.join(out_dir, "pytorch_lora_weights.safetensors")


def record_image_tokens(monkeypatch, family_name):
    """The image-token count of every transformer forward (the real forward still runs)."""
    from fluxkit import families

    cls = families.get(family_name).component_class("transformer")
    seen, forward = [], cls.forward

    def recording(self, hidden_states=None, *args, **kwargs):
        seen.append(hidden_states.shape[1])
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", recording)
    return seen


@pytest.mark.parametrize("family", ["kontext", "flux2-klein"])
def test_edit_follows_the_reference_and_a_lora_changes_it(family, tiny_flux, tiny_klein, references, tmp_path,
                                                          monkeypatch):
    model = tiny_klein if family == "flux2-klein" else tiny_flux
    common = ["--model_path", model, "--prompt", "make it blue", *EDIT]
    if family == "kontext":
        common += ["--model_family", "kontext"]  # a FLUX.1 folder runs as Kontext
    seen = record_image_tokens(monkeypatch, family)
    assert infer("BASE", common + ["--output_dir", tmp_path / "text"]) == 0
    text_only = sorted(set(seen))
    # a folder run as another family than its own is another recipe: the manifest says so, the file name differs
    text = manifest(tmp_path / "text")[0]
    if family == "kontext":
        assert infer("BASE", common[:-2] + ["--output_dir", tmp_path / "flux1"]) == 0
        own = manifest(tmp_path / "flux1")[0]
        assert text["model_family"] == "kontext" and "model_family" not in own and text["file"] != own["file"]
    else:
        assert "model_family" not in text
    seen.clear()
    for ref in ("red", "noise"):
        assert infer("BASE", common + ["--image", references / f"{ref}.png", "--output_dir", tmp_path / ref]) == 0
    # the reference image's tokens (same size as the target here) follow the target's into every forward
    assert len(text_only) == 1 and sorted(set(seen)) == [2 * text_only[0]], (text_only, seen)
    lora = family_lora(model, family, tmp_path / "lora_weights")
    assert infer("LORA", common + ["--image", references / "red.png", "--lora_weights", lora,
                                   "--output_dir", tmp_path / "lora"]) == 0
    red, noise, with_lora = (manifest(tmp_path / d)[0] for d in ("red", "noise", "lora"))
    assert red["image"] == os.path.realpath(references / "red.png") and len(red["image_digest"]) >= 16
    assert red["image_digest"] != noise["image_digest"] and red["file"] != noise["file"]  # the hash names the file
    # the family's defaults, and the reference image reached the picture
    assert red["guidance_scale"] == (4.0 if family == "flux2-klein" else 3.5) and red["max_sequence_length"] == 8
    png = lambda d: pixels(tmp_path / d / pngs(tmp_path / d)[0])  # noqa: E731
    assert np.abs(png("red") - png("noise")).max() > 0  # the random tiny model barely looks at the reference
    assert np.abs(png("red") - png("lora")).max() > 3 and with_lora["lora"] == os.path.realpath(lora)
    with Image.open(tmp_path / "red" / red["file"]) as im:
        assert im.text["image_digest"] == red["image_digest"]


def test_a_jsonl_prompts_file_gives_each_prompt_its_own_reference(tiny_klein, references, tmp_path):
    lines = [{"prompt": "make it blue", "image": "red.png"}, {"prompt": "make it blue", "image": "noise.png"},
             {"prompt": "a cat"}]  # no image of its own: --image's
    prompts = references / "edits.jsonl"
    prompts.write_text("# prompt and reference per line\n" + "\n".join(json.dumps(x) for x in lines) + "\n")
    argv = ["--model_path", tiny_klein, "--prompts_file", prompts, "--image", references / "noise.png", *EDIT,
            "--batch_size", "2"]
    assert infer("BASE", argv + ["--output_dir", tmp_path / "file"]) == 0
    records = manifest(tmp_path / "file")
    assert [os.path.basename(r["image"]) for r in records] == ["red.png", "noise.png", "noise.png"]
    # the same prompt and reference as a one-image run gives the same file (within fp32's batch rounding)
    single = ["--model_path", tiny_klein, "--prompt", "make it blue", "--image", references / "noise.png", *EDIT]
    assert infer("BASE", single + ["--output_dir", tmp_path / "one"]) == 0
    one = manifest(tmp_path / "one")[0]
    assert one["file"] == records[1]["file"]
    assert np.abs(pixels(tmp_path / "one" / one["file"]) - pixels(tmp_path / "file" / one["file"])).max() <= 1


@pytest.mark.parametrize("case", ["missing", "unreadable", "text-to-image", "bad line", "too small", "first-block cache",
                                  "embeddings"])
def test_reference_image_errors_are_one_line_and_write_nothing(case, tiny_flux, tiny_klein, references, tmp_path, capfd):
    out = tmp_path / "out"
    argv = ["--model_path", tiny_flux, "--prompt", "edit", *EDIT, "--output_dir", out, "--model_family", "kontext"]
    if case == "too small":
        argv = ["--model_path", tiny_klein, "--prompt", "edit", *EDIT, "--output_dir", out, "--image", references / "small.png"]
        needles = ["small.png", "32x32", "at least 64"]
    elif case == "first-block cache":  # diffusers' hook cannot take FLUX.2's blocks: it was a TypeError traceback
        argv = ["--model_path", tiny_klein, "--prompt", "edit", *EDIT, "--output_dir", out, "--image", references / "red.png",
                "--first_block_cache", "0.08"]
        needles = ["--first_block_cache", "flux2-klein", "drop the flag"]
    elif case == "embeddings":  # pivotal tuning's CLIP/T5 tokens on klein: an AttributeError traceback (text_encoder_2)
        import torch
        from safetensors.torch import save_file

        emb = tmp_path / "tok_emb.safetensors"
        save_file({"clip_l": torch.zeros(2, 32)}, str(emb), metadata={"fluxkit_tokens": json.dumps({"TOK": ["<s0>", "<s1>"]})})
        argv = ["--model_path", tiny_klein, "--prompt", "TOK", *EDIT, "--output_dir", out, "--embeddings", emb]
        needles = ["--embeddings", "tok_emb.safetensors", "flux2-klein does not have"]
    elif case == "missing":
        bad = references / "missing.jsonl"
        bad.write_text(json.dumps({"prompt": "edit", "image": "nowhere.png"}) + "\n")
        argv += ["--prompts_file", bad]
        needles = ["nowhere.png", "is not a file"]
    elif case == "unreadable":
        argv += ["--image", references / "broken.png"]
        needles = ["broken.png", "cannot be read as an image"]
    elif case == "text-to-image":
        argv = argv[:-2] + ["--image", references / "red.png"]
        needles = ["--image", "runs as flux1 (text-to-image)", "--model_family kontext"]
    else:
        bad = references / "bad.jsonl"
        bad.write_text('{"prompt": "edit"}\n{"text": "edit"}\n')
        argv += ["--prompts_file", bad]
        needles = ["line 2", 'no "prompt"']
    assert infer("BASE", argv) == 2
    lines = [l for l in capfd.readouterr().err.splitlines() if "error:" in l]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), lines
    assert not out.exists()


def test_kontext_edits_with_the_first_block_cache(tiny_flux, references, tmp_path):
    """Kontext's pipeline opens no cache context (diffusers 0.42): --first_block_cache was a ValueError traceback.
    A threshold every step passes reuses residuals (other pixels), one no step passes gives the uncached image."""
    common = ["--model_path", tiny_flux, "--model_family", "kontext", "--image", references / "red.png", "--prompt",
              "make it blue", *FAST, "--num_inference_steps", "3"]
    for name, extra in (("off", []), ("always", ["--first_block_cache", "1e6"]), ("never", ["--first_block_cache", "1e-12"])):
        assert infer("BASE", common + ["--output_dir", tmp_path / name, *extra]) == 0, name
    off, always, never = (pixels(tmp_path / n / pngs(tmp_path / n)[0]) for n in ("off", "always", "never"))
    assert np.abs(off - always).max() >= 1 and np.array_equal(off, never)


@pytest.mark.multiproc
def test_klein_edit_split_over_two_processes_matches_one(tiny_klein, references, tmp_path):
    """Ulysses over 2 gloo processes on FLUX.2 [klein] with a reference image (target + reference
    tokens are split together): the same files as one process, within one level."""
    argv = ["--model_path", tiny_klein, "--prompt", "make it blue", "--prompt", "a cat", "--image",
            references / "red.png", *EDIT]
    assert infer("DISTRIB", argv + ["--output_dir", tmp_path / "one"]) == 0
    proc = accelerate_launch([DISTRIB, *map(str, argv), "--output_dir", str(tmp_path / "two"), "--ulysses_degree", "2"],
                             num_processes=2, config=two_process_config(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), grid 1 data-parallel x ulysses 2 x ring 1" in proc.stdout
    one, two = tmp_path / "one", tmp_path / "two"
    assert pngs(one) == pngs(two) and len(pngs(one)) == 2
    assert max(int(np.abs(pixels(one / n) - pixels(two / n)).max()) for n in pngs(one)) <= 1


# ----------------------------------------------------------------------------- launchers

def test_launcher_dry_run_and_help_show_the_family_defaults(tiny_klein, sample_data, tmp_path):
    """A klein folder: resolution, max_sequence_length and guidance_scale not given take klein's
    defaults (diffusers' klein script's), given ones win, and --help lists every family's."""
    from fluxkit import families
    from fluxkit.launch.keys import usage
    from fluxkit.launch.spec import LAUNCHERS
    from test_launchers import LORA, dry

    keys = [f"--model_name={tiny_klein}", f"--instance_dir={sample_data['instance_dir']}", "--batch_size=1",
            "--instance_prompt=a photo of sks dog", "--max_train_steps=1", "--num_processes=1", "--validation_prompt=", f"--output_dir={tmp_path / 'out'}",
            "--report_to=none"]
    klein = families.get("flux2-klein").defaults
    text = dry(LORA, *keys, "--max_sequence_length=16").text
    line = next(l for l in text.splitlines() if l.startswith("model family:"))
    assert line == (f"model family: flux2-klein (Flux2KleinPipeline); resolution {klein['resolution']} (default), "
                    f"max_sequence_length 16, guidance_scale {klein['guidance_scale']} (default)"), line
    command = next(l for l in text.splitlines()[text.splitlines().index("command:") + 1:])
    assert f"--resolution={klein['resolution']}" in command and "--max_sequence_length=16" in command
    help_text = usage(LAUNCHERS["lora"], "launcher")  # what --help prints
    assert "  flux2-klein  --resolution=512 --max_sequence_length=512 --guidance_scale=3.5" in help_text
    assert not (tmp_path / "out").exists()


def test_a_reference_images_tokens_count_in_the_split():
    """Context parallelism splits target + reference tokens together: their sum must divide."""
    from types import SimpleNamespace

    from fluxkit.shared.errors import UserError
    from fluxkit.inference.parallel import Grid, check_sequence_split

    pipe = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(num_attention_heads=2)), vae_scale_factor=8)
    check_sequence_split(pipe, Grid(2, 2, 1), 64, 64, 8, [(64, 32)])  # 16 + 8 tokens
    with pytest.raises(UserError, match=r"plus a 48x48 reference image's 9\)"):
        check_sequence_split(pipe, Grid(2, 2, 1), 64, 64, 8, [(48, 48)])  # 16 + 9 tokens


def test_klein_on_an_int8_base_with_its_lora(tiny_klein, references, tmp_path):
    """The family's transformer class loads quantized (fluxkit.weights.quant) and its LoRA goes on top."""
    pytest.importorskip("torchao")
    common = ["--model_path", tiny_klein, "--prompt", "make it blue", "--image", references / "red.png", *EDIT]
    assert infer("BASE", common + ["--output_dir", tmp_path / "fp32"]) == 0
    assert infer("BASE", common + ["--base_quantization", "int8", "--output_dir", tmp_path / "int8"]) == 0
    lora = family_lora(tiny_klein, "flux2-klein", tmp_path / "lora_weights")
    assert infer("LORA", common + ["--base_quantization", "int8", "--lora_weights", lora,
                                   "--output_dir", tmp_path / "int8_lora"]) == 0
    png = lambda d: pixels(tmp_path / d / pngs(tmp_path / d)[0])  # noqa: E731
    assert manifest(tmp_path / "int8")[0]["base_quantization"] == "int8"
    assert 0 < np.abs(png("fp32") - png("int8")).max() <= 24  # int8 weights: close to fp32, not equal
    assert np.abs(png("int8") - png("int8_lora")).max() > 3
