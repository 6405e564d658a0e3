"""The four inference scripts on the tiny random FLUX: files, metadata, determinism, LoRA,
multi-process split and resume, and every bad input.

Most runs call fluxkit.inference.run in-process (no interpreter start-up per run); each script is
also run as a real subprocess at least once to cover its wiring and its one-line errors.
"""

import json
import os
import pickle
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, accelerate_launch, assert_user_error, private_mount_prefix, run_inprocess, run_script

SCRIPTS = {
    "base": os.path.join(ROOT, "infer_flux_text2img_bf16.py"),
    "dreambooth": os.path.join(ROOT, "infer_flux_text2img_dreambooth_bf16.py"),
    "lora": os.path.join(ROOT, "infer_flux_text2img_lora_bf16.py"),
    "distrib": os.path.join(ROOT, "infer_flux_text2img_distrib.py"),
}
# 32x32, 2 steps, fp32: seconds per run, and exact arithmetic for the equality checks.
FAST = ["--height", "32", "--width", "32", "--num_inference_steps", "2", "--dtype", "fp32"]
PROMPTS = ["a photo of sks dog", "a blue square on a gray background"]


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """In-process runs create accelerate's PartialState; leave none behind for other tests."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def infer(defaults, argv):
    """Run one script's main in-process through the same `cli` wrapper the script uses."""
    from fluxkit.inference import args as infer_args, run as inference
    from fluxkit.shared.errors import cli

    return cli(inference.main)(getattr(infer_args, defaults), [str(a) for a in argv])


def pngs(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".png"))


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def manifest(folder):
    with open(os.path.join(folder, "manifest.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def summary(folder):
    with open(os.path.join(folder, "infer_summary.json"), encoding="utf-8") as f:
        return json.load(f)


def max_diff(dir_a, dir_b, names=None):
    names = names or pngs(dir_a)
    return max(int(np.abs(pixels(os.path.join(dir_a, n)) - pixels(os.path.join(dir_b, n))).max()) for n in names)


def one_error_line(capfd):
    err = capfd.readouterr().err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- pure logic

def test_names_are_safe_unique_and_stable(tmp_path):
    from fluxkit.inference.args import Request
    from fluxkit.inference.run import image_name, plan_jobs

    hostile = ["../../etc/passwd", "a/b\\c", "\x00evil\x00", "x" * 5000, "..", ".", ".hidden",
               "ünïcødé 🐶 dog", "🐶🐶", "C:\\Windows\\system32", "a photo of sks dog"]
    settings = {"model": "m", "num_inference_steps": 2}
    names = [image_name(p, 8, settings) for p in hostile]
    for name in names:
        assert name == os.path.basename(name) and not name.startswith(".")
        assert not set(name) & {"/", "\\", "\x00", ":"} and ".." not in name
        assert len(name.encode()) <= 100 and "_seed8_" in name
        assert os.path.dirname(os.path.realpath(tmp_path / name)) == os.path.realpath(tmp_path)
    assert len(set(names)) == len(names)  # "🐶🐶" and ".." both slug to "prompt", the hash keeps them apart
    assert names == [image_name(p, 8, settings) for p in hostile]  # stable
    assert image_name("a", 8, settings) != image_name("a", 23, settings)
    assert image_name("a", 8, settings) != image_name("a", 8, {**settings, "num_inference_steps": 3})
    jobs = plan_jobs([Request("p1"), Request("p2")], [8, 23], settings)
    assert [(j.prompt, j.seed) for j in jobs] == [("p1", 8), ("p1", 23), ("p2", 8), ("p2", 23)]


def test_shard_covers_every_item_once_balanced():
    from fluxkit.inference.run import shard

    for n in range(0, 70):
        items = list(range(n))
        for count in range(1, 6):
            shares = [shard(items, i, count) for i in range(count)]
            assert sum(shares, []) == items
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_prompts_file_and_flags(tmp_path):
    from fluxkit import families
    from fluxkit.inference.args import BASE, apply_family_defaults, collect_prompts, parse_args

    def prompts(args):
        return [r.prompt for r in collect_prompts(args, BASE)]

    f = tmp_path / "prompts.txt"
    f.write_text("# a comment\n\n  a red circle  \n#another\na photo of sks dog\n\na red circle\n", encoding="utf-8")
    args = parse_args(BASE, ["--prompt", "first", "--prompts_file", str(f), "--seeds", "8", "23", "8"])
    assert prompts(args) == ["first", "a red circle", "a photo of sks dog"]
    assert args.seeds == [8, 23]
    defaults = parse_args(BASE, [])
    assert prompts(defaults) == list(BASE.prompts) and len(BASE.prompts) == 8
    apply_family_defaults(defaults, families.get("flux1"))  # unset size, guidance and length: the family's
    assert (defaults.seeds, defaults.num_inference_steps, defaults.height, defaults.width, defaults.guidance_scale,
            defaults.dtype, defaults.local_files_only) == ([8, 23, 42, 1334], 28, 1024, 1024, 3.5, "bf16", True)
    klein = parse_args(BASE, ["--height", "512"])
    apply_family_defaults(klein, families.get("flux2-klein"))
    assert (klein.height, klein.width, klein.guidance_scale, klein.max_sequence_length) == (512, 1024, 4.0, 512)
    assert parse_args(BASE, ["--no-local_files_only"]).local_files_only is False


# ---------------------------------------------------------------- end to end

@pytest.mark.cli
def test_base_script_files_metadata_manifest_and_resume(tiny_flux, tmp_path):
    out = tmp_path / "out"
    argv = ["--model_path", tiny_flux, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seeds", "8", "23",
            "--output_dir", out, *FAST]
    proc = run_script([sys.executable, SCRIPTS["base"], *map(str, argv)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 4 images (0 already there, skipped)" in proc.stdout.splitlines()[-1]
    names = pngs(out)
    assert len(names) == 4
    records = manifest(out)
    assert sorted(r["file"] for r in records) == names
    assert [(r["prompt"], r["seed"]) for r in records] == [(p, s) for p in PROMPTS for s in (8, 23)]
    for r in records:
        with Image.open(out / r["file"]) as im:
            assert im.size == (32, 32)
            meta = dict(im.text)
        assert meta["prompt"] == r["prompt"] and meta["seed"] == str(r["seed"])
        assert (meta["num_inference_steps"], meta["guidance_scale"], meta["height"], meta["width"]) == ("2", "3.5", "32", "32")
        assert meta["model"] == os.path.realpath(tiny_flux) and meta["lora"] == "" and meta["dtype"] == "fp32"
        assert pixels(out / r["file"]).std() > 0
    s = summary(out)
    assert (s["images_written"], s["images_skipped"], s["num_processes"]) == (4, 0, 1)
    assert s["sec_per_image"] > 0 and s["transformer_steps_per_sec"] > 0 and s["seconds"] > 0

    # A rerun finds everything on disk and leaves it alone; the manifest stays complete.
    before = {n: os.stat(out / n).st_mtime_ns for n in names}
    assert infer("BASE", argv) == 0
    assert summary(out)["images_written"] == 0 and summary(out)["images_skipped"] == 4
    assert {n: os.stat(out / n).st_mtime_ns for n in names} == before and manifest(out) == records

    # --overwrite renders again: same inputs, same pixels.
    again = tmp_path / "again"
    os.rename(out, again)
    assert infer("BASE", argv + ["--overwrite"]) == 0
    assert pngs(out) == names and max_diff(out, again) == 0


def test_batches_and_bf16(tiny_flux, tmp_path):
    common = ["--model_path", tiny_flux, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seeds", "8", "23", *FAST]
    assert infer("BASE", common + ["--output_dir", tmp_path / "b1"]) == 0
    assert infer("BASE", common + ["--output_dir", tmp_path / "b3", "--batch_size", "3"]) == 0
    assert pngs(tmp_path / "b1") == pngs(tmp_path / "b3")
    # one generator per image: batching changes only float rounding in the batched matmuls
    assert max_diff(tmp_path / "b1", tmp_path / "b3") <= 1

    assert infer("BASE", ["--model_path", tiny_flux, "--prompt", PROMPTS[0], "--seeds", "8", "--height", "32",
                          "--width", "32", "--num_inference_steps", "2", "--output_dir", tmp_path / "bf16"]) == 0
    (name,) = pngs(tmp_path / "bf16")
    with Image.open(tmp_path / "bf16" / name) as im:
        assert im.text["dtype"] == "bf16"
    assert pixels(tmp_path / "bf16" / name).std() > 0
    assert name not in pngs(tmp_path / "b1")  # another dtype is another recipe, never mistaken for it


def test_hostile_prompts_stay_inside_output_dir(tiny_flux, tmp_path):
    out = tmp_path / "box" / "out"
    prompts = ["../../escape", "/abs/path", "nul\x00byte", "y" * 3000, ".."]
    argv = ["--model_path", tiny_flux, "--seeds", "1", "--output_dir", out, *FAST]
    for p in prompts:
        argv += ["--prompt", p]
    assert infer("BASE", argv) == 0
    everything = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert all(os.path.dirname(f) == str(out) for f in everything), everything
    assert len(pngs(out)) == len(prompts)
    assert sorted(r["prompt"] for r in manifest(out)) == sorted(prompts)


def test_first_block_cache_and_compile(tiny_flux, tmp_path):
    common = ["--model_path", tiny_flux, "--prompt", PROMPTS[0], "--seeds", "8", *FAST]
    assert infer("BASE", common + ["--output_dir", tmp_path / "plain"]) == 0
    assert infer("BASE", common + ["--output_dir", tmp_path / "fbc", "--first_block_cache", "0.05"]) == 0
    (cached,) = pngs(tmp_path / "fbc")
    with Image.open(tmp_path / "fbc" / cached) as im:
        assert im.text["first_block_cache"] == "0.05"
    # the eager backend exercises dynamo's capture without minutes of C++ compilation on CI
    assert infer("BASE", common + ["--output_dir", tmp_path / "compiled", "--compile", "--compile_backend", "eager"]) == 0
    assert pngs(tmp_path / "compiled") == pngs(tmp_path / "plain")
    assert max_diff(tmp_path / "compiled", tmp_path / "plain") <= 1


def test_first_block_cache_threshold_changes_pixels(tiny_flux, tmp_path):
    """The cache really skips blocks: a threshold every step passes reuses the first step's residual
    (other pixels), one no step passes gives exactly the uncached image (under another name)."""
    common = ["--model_path", tiny_flux, "--prompt", PROMPTS[0], "--seeds", "8", *FAST]
    assert infer("BASE", common + ["--output_dir", tmp_path / "off"]) == 0
    assert infer("BASE", common + ["--output_dir", tmp_path / "always", "--first_block_cache", "1e6"]) == 0
    assert infer("BASE", common + ["--output_dir", tmp_path / "never", "--first_block_cache", "1e-12"]) == 0
    (off,), (always,), (never,) = pngs(tmp_path / "off"), pngs(tmp_path / "always"), pngs(tmp_path / "never")
    assert len({off, always, never}) == 3
    # (the tiny random transformer's steps differ little, so reused residuals move pixels by ~2/255)
    assert int(np.abs(pixels(tmp_path / "off" / off) - pixels(tmp_path / "always" / always)).max()) >= 1
    assert np.array_equal(pixels(tmp_path / "off" / off), pixels(tmp_path / "never" / never))


@pytest.mark.cli
def test_npu_branch_applies_the_patches(tmp_path):
    """With a stand-in torch_npu, the npu path asks fluxkit.upstream.patches for float32 RoPE and fused attention."""
    fake = tmp_path / "fake"
    (fake / "torch_npu").mkdir(parents=True)
    (fake / "torch_npu" / "__init__.py").write_text(
        "import torch, types\n"
        "torch.npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1)\n"
        "def npu_fusion_attention(*args, **kwargs):\n    raise NotImplementedError('stand-in')\n")
    code = ("import json; from fluxkit.inference.run import apply_npu_patches; from fluxkit.shared.device import detect; "
            "assert detect('auto').type == 'npu'; print(json.dumps(apply_npu_patches(True)))")
    proc = run_script([sys.executable, "-c", code], env={"PYTHONPATH": str(fake) + os.pathsep + ROOT}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = {name: (applied, why) for name, applied, why in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert set(result) == {"rope-float32", "npu-fused-attention"}
    assert result["npu-fused-attention"][0], result


# ---------------------------------------------------------------- LoRA

def _peft_lora(pipeline_dir, out_dir, text_encoder=False, seed=1):
    """A LoRA made with peft directly (non-zero lora_B) and saved by diffusers itself."""
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = FluxPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    torch.manual_seed(seed)
    layers = {}
    targets = {"transformer": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    for name in ["transformer"] + (["text_encoder"] if text_encoder else []):
        model = getattr(pipe, name)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets[name]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
    FluxPipeline.save_lora_weights(str(out_dir), **layers)
    return os.path.join(out_dir, "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def peft_lora(tiny_flux, tmp_path_factory):
    return _peft_lora(tiny_flux, tmp_path_factory.mktemp("peft_lora"), text_encoder=True)


def test_lora_changes_images_scale_zero_restores_base_fused_agrees(tiny_flux, peft_lora, tmp_path):
    common = ["--model_path", tiny_flux, "--prompt", PROMPTS[0], "--seeds", "8", "23", *FAST]
    assert infer("BASE", common + ["--output_dir", tmp_path / "base"]) == 0
    assert infer("LORA", common + ["--output_dir", tmp_path / "lora", "--lora_weights", peft_lora]) == 0
    assert infer("LORA", common + ["--output_dir", tmp_path / "fused", "--lora_weights", peft_lora, "--fuse_lora"]) == 0
    assert infer("LORA", common + ["--output_dir", tmp_path / "zero", "--lora_weights", os.path.dirname(peft_lora),
                                   "--lora_scale", "0"]) == 0
    assert infer("LORA", common + ["--output_dir", tmp_path / "zero_fused", "--lora_weights", peft_lora,
                                   "--lora_scale", "0", "--fuse_lora"]) == 0

    base, lora = tmp_path / "base", tmp_path / "lora"
    pairs = list(zip(pngs(base), pngs(lora)))
    assert len(pairs) == 2
    assert min(int(np.abs(pixels(base / b) - pixels(lora / l)).max()) for b, l in pairs) > 3
    for b, z in zip(pngs(base), pngs(tmp_path / "zero")):
        assert np.array_equal(pixels(base / b), pixels(tmp_path / "zero" / z))
    for b, z in zip(pngs(base), pngs(tmp_path / "zero_fused")):
        assert np.abs(pixels(base / b) - pixels(tmp_path / "zero_fused" / z)).max() <= 1
    for l, f in zip(pngs(lora), pngs(tmp_path / "fused")):
        assert np.abs(pixels(lora / l) - pixels(tmp_path / "fused" / f)).max() <= 2
    with Image.open(lora / pngs(lora)[0]) as im:
        assert im.text["lora"] == os.path.realpath(peft_lora) and im.text["lora_scale"] == "1.0"
    assert manifest(lora)[0]["lora"] == os.path.realpath(peft_lora)


def _bad_lora_files(tiny_flux, peft_lora, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    cases = {}
    tmp_path.mkdir()
    pickled = tmp_path / "lora.bin"
    pickled.write_bytes(pickle.dumps(Payload()))
    cases["pickle file"] = (pickled, "pickle")
    only_pickle = tmp_path / "only_pickle"
    only_pickle.mkdir()
    (only_pickle / "pytorch_lora_weights.bin").write_bytes(pickle.dumps(Payload()))
    cases["pickle folder"] = (only_pickle, "pickle")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pickle.dumps(Payload()))
    cases["not safetensors"] = (fake, "not a valid safetensors")
    cases["missing"] = (tmp_path / "nope.safetensors", "does not exist")
    (tmp_path / "empty").mkdir()
    cases["empty folder"] = (tmp_path / "empty", "no pytorch_lora_weights.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"transformer.x_embedder.weight": torch.zeros(2, 2)}, str(plain))
    cases["no lora tensors"] = (plain, "no LoRA tensors")
    sd = tmp_path / "sd.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(4, 8),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(8, 4)}, str(sd))
    cases["other architecture"] = (sd, "attached to no layer")
    state = load_file(peft_lora)
    wider = {k: (torch.ones(v.shape[0], v.shape[1] * 2) if "transformer." in k and "lora_A" in k else v) for k, v in state.items()}
    save_file(wider, str(tmp_path / "wider.safetensors"))
    cases["other model size"] = (tmp_path / "wider.safetensors", "another model size")
    extra = dict(state)
    extra["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.ones(4, 32)
    extra["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.ones(32, 4)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    cases["unknown layers"] = (tmp_path / "extra.safetensors", "layers attached")
    # FLUX.2's single blocks have attn.to_out, FLUX.1's do not: a LoRA of the other family, whose unmatched keys
    # diffusers and peft warn about (as ignorable) before the count refuses it
    other_family = dict(state)
    a, b = (state[f"transformer.transformer_blocks.0.attn.to_q.lora_{x}.weight"] for x in "AB")
    other_family["transformer.single_transformer_blocks.0.attn.to_out.lora_A.weight"] = torch.ones_like(a)
    other_family["transformer.single_transformer_blocks.0.attn.to_out.lora_B.weight"] = torch.ones_like(b)
    config = {"transformer.r": 4, "transformer.lora_alpha": 4,
              "transformer.target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"],
              "text_encoder.r": 4, "text_encoder.lora_alpha": 4,
              "text_encoder.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    save_file(other_family, str(tmp_path / "flux2_layers.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    cases["another family's layers"] = (tmp_path / "flux2_layers.safetensors", "layers attached")
    return cases, marker


def test_bad_lora_inputs(tiny_flux, peft_lora, tmp_path, capfd):
    cases, marker = _bad_lora_files(tiny_flux, peft_lora, tmp_path / "bad")
    for what, (path, needle) in cases.items():
        out = tmp_path / "out" / what.replace(" ", "_")
        rc = infer("LORA", ["--model_path", tiny_flux, "--lora_weights", path, "--prompt", "x", "--seeds", "1",
                            "--output_dir", out, *FAST])
        line = one_error_line(capfd)
        assert rc == 2 and needle in line and "--lora_weights" in line, (what, line)
        assert not (out.exists() and pngs(out)), what
    assert not marker.exists(), "a pickle was unpickled"


def test_a_refused_lora_is_one_line_without_the_libraries_ignorable_warnings(tiny_flux, peft_lora, tmp_path):
    """diffusers (its own logger, which does not propagate: caught at its root) and peft (warnings.warn) call
    unmatched LoRA keys ignorable; before a refusal they would contradict the error line, so none is shown."""
    import logging
    import warnings

    cases, _ = _bad_lora_files(tiny_flux, peft_lora, tmp_path / "bad")
    shown = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = shown.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        for what in ("unknown layers", "another family's layers"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rc = infer("LORA", ["--model_path", tiny_flux, "--lora_weights", cases[what][0], "--prompt", "x",
                                    "--seeds", "1", "--output_dir", tmp_path / "out", *FAST])
            said = [r.getMessage() for r in shown] + [str(w.message) for w in caught]
            assert rc == 2 and not [m for m in said if "lora_" in m or "PEFT" in m], (what, said)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)


# ---------------------------------------------------------------- bad input

def test_bad_inputs_one_line_each(tiny_flux, sample_data, tmp_path, capfd):
    not_flux = tmp_path / "sd_pipeline"
    not_flux.mkdir()
    (not_flux / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    lora_out = tmp_path / "lora_out"
    lora_out.mkdir()
    (lora_out / "pytorch_lora_weights.safetensors").write_bytes(b"")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n   \n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    ok = ["--model_path", tiny_flux, "--prompt", "x", "--seeds", "1", *FAST]
    cases = [
        (["--model_path", tmp_path / "missing"], "does not exist"),
        (["--model_path", sample_data["instance_dir"]], "no model_index.json"),
        (["--model_path", not_flux], "StableDiffusionPipeline"),
        (["--model_path", lora_out], "--lora_weights"),
        (["--model_path", empty], "is a file"),
        (["--prompts_file", empty], "has no prompts"),
        (["--prompts_file", tmp_path / "nope.txt"], "does not exist"),
        (["--height", "30"], "multiple of 16"),
        (["--width", "0"], "multiple of 16"),
        (["--output_dir", blocker / "sub"], "cannot be created"),
        (["--output_dir", blocker], "is a file"),
        (["--fuse_lora"], "--fuse_lora needs --lora_weights"),
        (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16"),
        (["--prompt", " "], "--prompt is empty"),
    ]
    for extra, needle in cases:
        out = tmp_path / "never"
        rc = infer("BASE", ok + ["--output_dir", out] + [str(e) for e in extra])
        line = one_error_line(capfd)
        assert rc == 2 and needle in line, (extra, line)
        assert not out.exists(), f"{extra} left {out} behind"
    with pytest.raises(SystemExit) as exc:
        infer("BASE", ok + ["--seeds", "8", "abc"])
    assert exc.value.code == 2 and "seeds must be integers, got 'abc'" in one_error_line(capfd)


def test_a_hub_id_not_in_the_cache_names_a_download_command_that_exists(tmp_path, capfd, monkeypatch):
    """Offline, a hub id that is not in the cache is one line naming how to download it; the command it
    names must be one the installed huggingface_hub provides (1.0 dropped `huggingface-cli` for `hf`)."""
    from importlib.metadata import entry_points

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    out = tmp_path / "never"
    rc = infer("BASE", ["--model_path", "nobody-here/not-a-flux", "--prompt", "x", "--seeds", "1", "--output_dir", out, *FAST])
    line = one_error_line(capfd)
    assert rc == 2 and not out.exists(), line
    command = line.split("download it first (", 1)[1].split(" download nobody-here/not-a-flux)", 1)[0]
    installed = {ep.name for ep in entry_points(group="console_scripts") if ep.value.startswith("huggingface_hub")}
    assert command in installed, (command, installed, line)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_unwritable_output_dir(tiny_flux, tmp_path, capfd):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    rc = infer("BASE", ["--model_path", tiny_flux, "--prompt", "x", "--seeds", "1", "--output_dir", locked, *FAST])
    assert rc == 2 and "not writable" in one_error_line(capfd)


@pytest.mark.cli
def test_read_only_output_dir_is_refused_before_loading(tiny_flux, tmp_path):
    """The write probe, also as root (CI): a read-only tmpfs refuses the probe file whatever the
    permission bits say, so the run stops with one line before it loads the model."""
    prefix = private_mount_prefix(tmp_path / "probe")
    if prefix is None:
        pytest.skip("this host does not let us mount a tmpfs in a private namespace")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    q = shlex.quote
    argv = ["--model_path", tiny_flux, "--prompt", "x", "--seeds", "1", "--output_dir", mnt, *FAST]
    script = (f"mount -t tmpfs -o size=64k,ro tmpfs {q(str(mnt))} || exit 90\n"
              f"exec {q(sys.executable)} {q(SCRIPTS['base'])} {' '.join(q(str(a)) for a in argv)}")
    proc = subprocess.run(prefix + ["sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert_user_error(proc, "--output_dir", "not writable", "Read-only file system")
    assert proc.returncode == 2 and "Loading" not in proc.stderr


@pytest.mark.cli
def test_script_defaults_fail_clearly(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = run_script([sys.executable, SCRIPTS["base"], "--output_dir", str(tmp_path / "o")], cwd=str(tmp_path), env=env)
    assert_user_error(proc, "black-forest-labs/FLUX.1-dev", "--model_path", "download")
    proc = run_inprocess([sys.executable, SCRIPTS["dreambooth"]], cwd=str(tmp_path), env=env)
    assert_user_error(proc, "output_flux_dreambooth", "does not exist")
    proc = run_inprocess([sys.executable, SCRIPTS["lora"], "--model_path", str(tmp_path)], cwd=str(tmp_path), env=env)
    assert_user_error(proc, "output_flux_dreambooth_lora", "does not exist")
    proc = run_inprocess([sys.executable, SCRIPTS["distrib"], "--seeds", "1", "x2"], cwd=str(tmp_path), env=env)
    assert_user_error(proc, "seeds must be integers")
    assert set(os.listdir(tmp_path)) <= {"hf"}  # no output folder was created by any of them


# ---------------------------------------------------------------- several processes

def _multi_process_config(tmp_path):
    config = tmp_path / "multi_process.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmixed_precision: 'no'\n"
                      "num_machines: 1\nmachine_rank: 0\nnum_processes: 2\nuse_cpu: false\n")
    return str(config)


@pytest.mark.multiproc
def test_distrib_64_pairs_two_processes_once_each_same_pixels_and_resume(tiny_flux, tmp_path):
    prompts = [f"a {c} {s} on a gray background" for c in ("red", "blue") for s in ("circle", "square", "stripes", "dot")]
    seeds = [str(s) for s in range(100, 108)]
    argv = ["--model_path", tiny_flux, "--seeds", *seeds, "--height", "16", "--width", "16",
            "--num_inference_steps", "1", "--dtype", "fp32"]
    for p in prompts:
        argv += ["--prompt", p]
    config = _multi_process_config(tmp_path)
    two = tmp_path / "two"
    proc = accelerate_launch([SCRIPTS["distrib"], *argv, "--output_dir", str(two)], num_processes=2, config=config, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = summary(two)
    assert (s["num_processes"], s["images_written"], s["images_per_process"]) == (2, 64, [32, 32])
    names = pngs(two)
    records = manifest(two)
    assert len(names) == 64 and sorted(r["file"] for r in records) == names
    assert sorted((r["prompt"], r["seed"]) for r in records) == sorted((p, int(x)) for p in prompts for x in seeds)

    one = tmp_path / "one"
    assert infer("DISTRIB", argv + ["--output_dir", one]) == 0
    assert pngs(one) == names and max_diff(one, two) == 0  # 1 vs 2 processes: identical pixels

    # Resume: remove 10 images (and damage the manifest); only those are rendered again.
    removed = names[5:15]
    for n in removed:
        os.remove(two / n)
    with open(two / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write("{half a line")
    proc = accelerate_launch([SCRIPTS["distrib"], *argv, "--output_dir", str(two)], num_processes=2, config=config, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = summary(two)
    assert (s["images_written"], s["images_skipped"], s["images_per_process"]) == (10, 54, [5, 5])
    assert pngs(two) == names and max_diff(one, two, removed) == 0
    assert manifest(two) == records


# ---------------------------------------------------------------- weights from our trainers

def _train(script, tiny_flux, sample_data, out, extra):
    """A few steps of one of our trainers, in-process (same flags as diffusers' scripts)."""
    import importlib.util

    from accelerate.state import AcceleratorState

    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(["--pretrained_model_name_or_path", tiny_flux, "--instance_data_dir", sample_data["instance_dir"],
                      "--instance_prompt", "a photo of sks dog", "--resolution", "32", "--train_batch_size", "1",
                      "--max_train_steps", "3", "--output_dir", str(out), "--seed", "0", "--report_to", "none",
                      "--lr_warmup_steps", "0", *extra])
    AcceleratorState._reset_state(reset_partial_state=True)
    assert rc == 0


@pytest.mark.cli
def test_lora_from_our_trainer(tiny_flux, sample_data, tmp_path):
    trained = tmp_path / "output_flux_dreambooth_lora"
    _train(os.path.join(ROOT, "train_flux_dreambooth_lora.py"), tiny_flux, sample_data, trained,
           ["--rank", "4", "--learning_rate", "5e-2"])
    common = ["--model_path", tiny_flux, "--prompt", "a photo of sks dog", "--seeds", "8", "23", *FAST]
    assert infer("BASE", common + ["--output_dir", tmp_path / "base"]) == 0
    # the LoRA script's default --lora_weights is the LoRA launcher's output folder, relative to the cwd
    proc = run_script([sys.executable, SCRIPTS["lora"], *map(str, common), "--output_dir", "lora"], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert infer("LORA", common + ["--lora_weights", trained, "--lora_scale", "0", "--output_dir", tmp_path / "zero"]) == 0
    base, lora, zero = tmp_path / "base", tmp_path / "lora", tmp_path / "zero"
    assert len(pngs(lora)) == 2
    assert min(int(np.abs(pixels(base / b) - pixels(lora / l)).max()) for b, l in zip(pngs(base), pngs(lora))) > 2
    assert all(np.array_equal(pixels(base / b), pixels(zero / z)) for b, z in zip(pngs(base), pngs(zero)))
    assert manifest(lora)[0]["lora"] == os.path.realpath(trained / "pytorch_lora_weights.safetensors")


def test_dreambooth_script_on_our_full_finetune(tiny_flux, sample_data, tmp_path):
    trained = tmp_path / "output_flux_dreambooth"
    _train(os.path.join(ROOT, "train_flux_dreambooth.py"), tiny_flux, sample_data, trained, ["--learning_rate", "1e-3"])
    common = ["--prompt", "a photo of sks dog", "--seeds", "8", *FAST]
    assert infer("BASE", common + ["--model_path", tiny_flux, "--output_dir", tmp_path / "base"]) == 0
    assert infer("DREAMBOOTH", common + ["--model_path", trained, "--output_dir", tmp_path / "tuned"]) == 0
    (b,), (t,) = pngs(tmp_path / "base"), pngs(tmp_path / "tuned")
    assert b != t and not np.array_equal(pixels(tmp_path / "base" / b), pixels(tmp_path / "tuned" / t))
    assert manifest(tmp_path / "tuned")[0]["model"] == os.path.realpath(trained)
