import hashlib
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_user_error, run_inprocess, run_script


def _generate(path, size):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    out = pipe("a photo of sks dog", height=size, width=size, num_inference_steps=2, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    return out


def test_tiny_pipeline_loads_and_generates(tiny_flux):
    img = _generate(tiny_flux, 32)
    assert img.shape == (1, 32, 32, 3)
    assert np.isfinite(img).all() and img.std() > 0


@pytest.mark.tiny
def test_small_preset_matches_flux_structure(tmp_path):
    from diffusers import FluxPipeline

    from fluxkit.tiny.build import build_pipeline

    path = build_pipeline(str(tmp_path / "small"), "small", seed=1)
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert pipe.vae.config.latent_channels == 16
    t = pipe.transformer.config
    assert t.in_channels == 4 * pipe.vae.config.latent_channels
    assert t.num_layers >= 2 and t.num_single_layers >= 4
    assert sum(t.axes_dims_rope) == t.attention_head_dim
    assert t.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert t.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    img = pipe("a red circle", height=64, width=64, num_inference_steps=1, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_tokenizers_are_real(tiny_flux):
    from transformers import AutoTokenizer

    clip = AutoTokenizer.from_pretrained(os.path.join(tiny_flux, "tokenizer"), local_files_only=True)
    t5 = AutoTokenizer.from_pretrained(os.path.join(tiny_flux, "tokenizer_2"), local_files_only=True)
    ids = clip("a photo of sks dog", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == clip.bos_token_id
    ids2 = t5("a photo of sks dog").input_ids
    assert ids2[-1] == t5.eos_token_id and t5.pad_token_id == 0
    assert t5.decode(ids2, skip_special_tokens=True).strip() == "a photo of sks dog"


@pytest.mark.tiny
def test_builder_is_deterministic(tmp_path):
    from fluxkit.tiny.build import build_datasets, build_pipeline

    def digest(folder):
        h = hashlib.sha256()
        for root, _, files in sorted(os.walk(folder)):
            for f in sorted(files):
                if f.endswith((".safetensors", ".png", ".parquet")):
                    h.update(open(os.path.join(root, f), "rb").read())
        return h.hexdigest()

    a = build_pipeline(str(tmp_path / "a"), "tiny", seed=3)
    b = build_pipeline(str(tmp_path / "b"), "tiny", seed=3)
    c = build_pipeline(str(tmp_path / "c"), "tiny", seed=4)
    assert digest(a) == digest(b) != digest(c)
    d1 = build_datasets(str(tmp_path / "d1"), seed=5, resolution=32)
    d2 = build_datasets(str(tmp_path / "d2"), seed=5, resolution=32)
    assert digest(tmp_path / "d1") == digest(tmp_path / "d2")
    assert d1["instance_dir"].endswith("instance") and d2


def test_sample_data_loads_with_datasets(sample_data):
    import datasets
    from PIL import Image

    ds = datasets.load_dataset(sample_data["dataset_name"], split="train")
    assert set(ds.column_names) == {"image", "text"} and len(ds) >= 4
    assert isinstance(ds[0]["image"], Image.Image) and ds[0]["text"].startswith("a ")
    files = sorted(os.listdir(sample_data["instance_dir"]))
    assert files and all(f.endswith(".png") for f in files)
    arr = np.asarray(Image.open(os.path.join(sample_data["instance_dir"], files[0])), dtype=np.float32)
    # a learnable pattern: the subject's red dominates the centre, the border is gray
    c = arr[arr.shape[0] // 2, arr.shape[1] // 2]
    assert c[0] > 150 and c[1] < 100
    prompts = [l for l in open(sample_data["prompts_file"]) if l.strip() and not l.startswith("#")]
    assert len(prompts) >= 2


@pytest.mark.cli
def test_dev_preset_refuses_without_allow_large(tmp_path):
    """In a fresh interpreter, as typed: the refusal is the only line (the libraries' import-time notes about
    torchao and bitsandbytes kernels came first until make_tiny_flux silenced them as the trainers do)."""
    proc = run_script([sys.executable, "make_tiny_flux.py", "--family", "flux2-klein", "--preset", "4b",
                       "--output_dir", str(tmp_path / "dev")], timeout=120)
    line = assert_user_error(proc, "--allow_large", "B random parameters")
    assert proc.returncode == 2 and [l for l in proc.stderr.splitlines() if l.strip()] == [line], proc.stderr
    assert not (tmp_path / "dev").exists()
    proc = run_inprocess([sys.executable, "make_tiny_flux.py", "--preset", "dev", "--output_dir", str(tmp_path / "dev")],
                         timeout=120)
    assert_user_error(proc, "--allow_large", "B random parameters")
    assert not (tmp_path / "dev").exists()


def test_dev_preset_is_flux1_dev_architecture():
    from fluxkit.tiny.build import PRESETS, parameter_count

    counts = parameter_count(PRESETS["dev"])
    assert 11.8e9 < counts["transformer"] < 12.0e9  # FLUX.1-dev: 11.9B
    assert 4.6e9 < counts["text_encoder_2"] < 4.9e9  # T5-XXL encoder: 4.76B
    assert 120e6 < counts["text_encoder"] < 125e6  # CLIP-L text: 123M


@pytest.mark.tiny
def test_devlike_preset_has_flux1_dev_proportions():
    from fluxkit.tiny.build import PRESETS, parameter_count

    dev, small = parameter_count(PRESETS["dev"]), parameter_count(PRESETS["devlike"])
    for part in ("text_encoder_2", "text_encoder", "vae"):  # each within 10% of dev's share of the transformer
        share, dev_share = small[part] / small["transformer"], dev[part] / dev["transformer"]
        assert abs(share / dev_share - 1) < 0.10, (part, share, dev_share)
    assert 50e6 < small["transformer"] < 120e6  # a CPU runs a LoRA step of it in seconds


@pytest.mark.parametrize("case", ["preset", "nonempty", "unwritable"])
def test_builder_bad_input(tmp_path, case):
    out = tmp_path / "out"
    args = [sys.executable, "make_tiny_flux.py", "--output_dir", str(out)]
    if case == "preset":
        proc = run_inprocess(args + ["--preset", "huge"], timeout=120)
        assert_user_error(proc, "huge", "tiny")
        assert not out.exists()
    elif case == "nonempty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        proc = run_inprocess(args, timeout=120)
        assert_user_error(proc, "--overwrite")
        assert os.listdir(out) == ["keep.txt"]
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a file instead
            ro.chmod(0o700)
            (tmp_path / "file").write_text("x")
            target = tmp_path / "file" / "sub"
        else:
            target = ro / "sub"
        proc = run_inprocess([sys.executable, "make_tiny_flux.py", "--output_dir", str(target)], timeout=120)
        assert_user_error(proc, str(target))
    leftovers = [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert leftovers == []
