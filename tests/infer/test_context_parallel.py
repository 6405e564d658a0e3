"""Context-parallel inference (--ulysses_degree / --ring_degree) and the distributed-inference defects
of issue 14: the process grid, bad combinations, the CPU device-count patch, launches that start
fewer processes, missing model components, nothing left behind, umask, batch size in names.

2-process runs are few and tiny (32x32, 2 steps): one Ulysses run in fp32, one data-parallel run,
one Ulysses run in bf16; everything else runs in this process.
"""

import json
import os
import shutil
import stat
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, accelerate_launch, run_script
# the in-process runner, its state reset and the small readers are test_inference's
from test_inference import FAST, PROMPTS, _fresh_process_state, infer, pixels, pngs  # noqa: F401

sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))

DISTRIB = os.path.join(ROOT, "infer_flux_text2img_distrib.py")
RECORDED = os.path.join(ROOT, "tests", "scripts", "infer_recorded.py")


def max_diff(a, b):
    return max(int(np.abs(pixels(os.path.join(a, n)) - pixels(os.path.join(b, n))).max()) for n in pngs(a))


def summary(folder):
    with open(os.path.join(folder, "infer_summary.json"), encoding="utf-8") as f:
        return json.load(f)


def manifest(folder):
    with open(os.path.join(folder, "manifest.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def error_lines(text):
    return [line for line in text.splitlines() if "error:" in line]


def two_process_config(tmp_path):
    config = tmp_path / "two.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmixed_precision: 'no'\n"
                      "num_machines: 1\nmachine_rank: 0\nnum_processes: 2\nuse_cpu: false\n")
    return str(config)


# ---------------------------------------------------------------- the grid (pure logic)

def test_grid_places_every_rank_and_shares_cover_each_pair_once():
    from fluxkit.inference.run import shard
    from fluxkit.inference.parallel import plan_grid

    pairs = list(range(23))
    for processes, ulysses, ring in [(1, 1, 1), (2, 1, 1), (2, 2, 1), (4, 2, 1), (4, 1, 2), (6, 3, 1), (8, 2, 2), (8, 4, 2)]:
        grid = plan_grid(processes, ulysses, ring)
        assert grid.groups * grid.group_size == processes
        places = [grid.place(r) for r in range(processes)]
        assert sorted(places) == [(g, m) for g in range(grid.groups) for m in range(grid.group_size)]
        # the group must be the rank's "data" coordinate in the (data, ring, ulysses) device mesh
        mesh = np.arange(processes).reshape(grid.groups, ring, ulysses)
        assert [int(np.argwhere(mesh == r)[0][0]) for r in range(processes)] == [g for g, _ in places]
        shares = [shard(pairs, g, grid.groups) for g in range(grid.groups)]
        assert sorted(sum(shares, [])) == pairs  # each pair rendered by exactly one group


def test_processes_asked_of_accelerate(tmp_path):
    from fluxkit.inference.parallel import processes_asked

    config = tmp_path / "c.yaml"
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 3\n")
    assert processes_asked(["--num_processes", "4", "x.py"]) == 4
    assert processes_asked(["--num-processes=2", "x.py"]) == 2
    assert processes_asked(["--config_file", str(config), "x.py"]) == 3
    assert processes_asked([f"--config-file={config}", "--num_processes", "5", "x.py"]) == 5


# ---------------------------------------------------------------- bad combinations: one line, before the model loads

def test_bad_combinations_one_line_before_loading(tiny_flux, tmp_path, capfd, monkeypatch):
    ok = ["--model_path", tiny_flux, "--prompt", "x", "--seeds", "1", *FAST]
    cases = [  # (WORLD_SIZE, extra flags, what the line must say)
        (1, ["--ulysses_degree", "2"], "accelerate launch --multi_gpu --num_processes 2"),
        (3, ["--ulysses_degree", "2"], "does not divide the 3 processes"),
        (4, ["--ulysses_degree", "2", "--ring_degree", "3"], "does not divide the 4 processes"),
        (2, ["--ring_degree", "2"], "--ring_degree 2 needs an attention backend that returns log-sum-exp"),
        (2, ["--ring_degree", "2", "--attention_backend", "_native_npu"], "cannot run here"),
        (2, ["--ulysses_degree", "2", "--attention_backend", "_native_math"], "does not support context parallelism"),
        (2, ["--ulysses_degree", "2", "--attention_backend", "nonsense"], "not a diffusers attention backend"),
        (1, ["--attention_backend", "flash"], "cannot run here"),
        (2, ["--ulysses_degree", "2", "--first_block_cache", "0.1"], "--first_block_cache cannot be combined"),
        (1, ["--ulysses_degree", "0"], "--ulysses_degree 0 must be at least 1"),
        (1, ["--ring_degree", "-1"], "--ring_degree -1 must be at least 1"),
    ]
    # the other three scripts take the same flags
    cases += [(1, ["--ulysses_degree", "2"], "accelerate launch --multi_gpu --num_processes 2", s) for s in ("BASE", "DREAMBOOTH")]
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "lora.safetensors"  # checked only for being a LoRA file before the grid is
    save_file({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, str(lora))
    cases += [(2, ["--ring_degree", "2", "--lora_weights", lora], "--ring_degree 2 needs", "LORA")]
    for world, extra, needle, *script in cases:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        out = tmp_path / "never"
        rc = infer(script[0] if script else "DISTRIB", ok + ["--output_dir", out] + extra)
        err = capfd.readouterr().err
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (extra, err[-2000:])
        assert "Loading pipeline components" not in err and "Traceback" not in err, extra
        assert not out.exists()


def test_split_must_divide_heads_and_tokens(tiny_flux):
    from diffusers import FluxPipeline

    from fluxkit.shared.errors import UserError
    from fluxkit.inference.parallel import Grid, check_sequence_split

    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    heads = pipe.transformer.config.num_attention_heads  # 2 in the tiny preset
    check_sequence_split(pipe, Grid(2, 2, 1), 32, 32, 8)
    with pytest.raises(UserError, match=f"does not divide this model's {heads} attention heads"):
        check_sequence_split(pipe, Grid(2 * heads, 2 * heads, 1), 64, 64, 8)
    with pytest.raises(UserError, match="image tokens"):
        check_sequence_split(pipe, Grid(2, 1, 2), 12, 4, 8)  # 3 image tokens (the tiny VAE halves, FLUX packs 2x2)
    with pytest.raises(UserError, match="text tokens"):
        check_sequence_split(pipe, Grid(2, 2, 1), 32, 32, 7)


@pytest.mark.cli
def test_cpu_device_count_patch():
    """Listed by patch_flux.py --list; applies here (no accelerator); makes enable_parallelism's
    device choice finite, and only while that call runs."""
    import torch
    from diffusers.models.modeling_utils import ModelMixin

    from fluxkit.upstream import patches

    proc = run_script([sys.executable, os.path.join(ROOT, "patch_flux.py"), "--list"], timeout=120)
    line = next(l for l in proc.stdout.splitlines() if l.strip().startswith("context-parallel-cpu-device"))
    assert "APPLIES" in line and "device_count" in line
    assert patches.apply(["context-parallel-cpu-device"])[0][1]
    assert patches.apply(["context-parallel-cpu-device"])[0][1]  # idempotent: still reported, wrapped once
    method = ModelMixin._resolve_parallel_config
    assert method.__wrapped__.__name__ == "_resolve_parallel_config" and not hasattr(method.__wrapped__, "__wrapped__")
    assert torch.accelerator.device_count() == 0  # untouched outside the call


# ---------------------------------------------------------------- 2 processes, Ulysses 2 vs 1 process

@pytest.fixture(scope="module")
def single_process(tiny_flux, tmp_path_factory):
    """The single-process reference: PNGs plus the float latents and token counts of every call."""
    import infer_recorded

    out = tmp_path_factory.mktemp("single") / "out"
    seen, latents, uninstall = infer_recorded.install()
    try:
        argv = ["--model_path", tiny_flux, "--seeds", "8", "23", "--output_dir", out, *FAST]
        for p in PROMPTS:
            argv += ["--prompt", p]
        assert infer("DISTRIB", argv) == 0
    finally:
        uninstall()
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    return out, np.array(seen), np.concatenate(latents), argv


@pytest.mark.multiproc
def test_ulysses_two_processes_match_one(single_process, tmp_path):
    one, seen_one, latents_one, argv = single_process
    argv = [str(a) for a in argv]
    out, record = tmp_path / "ulysses", tmp_path / "record"
    record.mkdir()
    argv[argv.index("--output_dir") + 1] = str(out)
    proc = accelerate_launch([RECORDED, str(record), *argv, "--ulysses_degree", "2"], num_processes=2,
                             config=two_process_config(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert "wrote 4 images" in last and "2 process(es), grid 1 data-parallel x ulysses 2 x ring 1" in last
    s = summary(out)
    assert s["grid"] == {"data_parallel": 1, "ulysses_degree": 2, "ring_degree": 1} and s["num_processes"] == 2
    assert s["images_per_process"] == [4, 0] and s["attention_backend"] == "native"
    assert "patch context-parallel-cpu-device: applied" in proc.stdout

    assert pngs(out) == pngs(one) and len(pngs(out)) == 4  # identical names
    assert max_diff(one, out) <= 1
    assert manifest(out) == manifest(one)
    for rank in (0, 1):
        rec = np.load(record / f"rank{rank}.npz")
        # each process's transformer saw half of every call's image and text tokens ...
        assert len(rec["seen"]) == len(seen_one) and (rec["seen"] * 2 == seen_one).all(), (rec["seen"], seen_one)
        # ... and both end with the single-process latents
        assert np.abs(rec["latents"] - latents_one).max() < 1e-5


@pytest.mark.multiproc
def test_grid_2x1_and_1x2_cover_the_same_pairs(single_process, tmp_path):
    """Two processes data-parallel (2 groups of 1) render each pair once, like one group of two."""
    one, _, _, argv = single_process
    argv = [str(a) for a in argv]
    out = tmp_path / "dp"
    argv[argv.index("--output_dir") + 1] = str(out)
    proc = accelerate_launch([DISTRIB, *argv], num_processes=2, config=two_process_config(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es), grid 2 data-parallel x ulysses 1 x ring 1" in proc.stdout.strip().splitlines()[-1]
    s = summary(out)
    assert (s["images_written"], s["images_per_process"], s["images_per_group"]) == (4, [2, 2], [2, 2])
    assert pngs(out) == pngs(one) and max_diff(one, out) == 0
    assert sorted((r["prompt"], r["seed"]) for r in manifest(out)) == sorted((p, s) for p in PROMPTS for s in (8, 23))


@pytest.mark.multiproc
def test_ulysses_bf16_within_two_levels(tiny_flux, tmp_path):
    argv = ["--model_path", tiny_flux, "--prompt", PROMPTS[0], "--seeds", "8", "--height", "32", "--width", "32",
            "--num_inference_steps", "2", "--dtype", "bf16"]
    assert infer("DISTRIB", argv + ["--output_dir", tmp_path / "one"]) == 0
    proc = accelerate_launch([DISTRIB, *argv, "--output_dir", str(tmp_path / "two"), "--ulysses_degree", "2"],
                             num_processes=2, config=two_process_config(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert pngs(tmp_path / "one") == pngs(tmp_path / "two")
    assert max_diff(tmp_path / "one", tmp_path / "two") <= 2


# ---------------------------------------------------------------- the defects

@pytest.mark.cli
def test_launch_that_starts_fewer_processes_is_reported(tiny_flux, tmp_path):
    """`accelerate launch --num_processes 2` without --multi_gpu starts one process on a CPU host: say so."""
    env = {"HF_HOME": str(tmp_path / "hf")}  # no default accelerate config
    out = tmp_path / "out"
    proc = run_script([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", DISTRIB,
                       "--model_path", tiny_flux, "--prompt", "x", "--seeds", "1", "--output_dir", str(out), *FAST],
                      env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [l for l in proc.stderr.splitlines() if l.startswith("warning: accelerate launch")]
    assert warning and "asked for 2 processes but started 1" in warning[0], proc.stderr[-3000:]
    assert "accelerate launch --multi_gpu --num_processes 2" in warning[0]
    assert "1 process(es), grid 1 data-parallel" in proc.stdout.strip().splitlines()[-1]
    assert summary(out)["num_processes"] == 1


def _without(tiny_flux, tmp_path, component):
    """A copy of the tiny pipeline (links to its components) that lacks one component folder."""
    broken = tmp_path / f"no_{component}"
    broken.mkdir()
    for name in os.listdir(tiny_flux):
        if name != component:
            os.symlink(os.path.join(tiny_flux, name), broken / name)
    return broken


def test_failures_before_rendering_name_the_culprit_and_leave_nothing(tiny_flux, tmp_path, capfd):
    import torch
    from safetensors.torch import save_file

    from test_inference import _peft_lora

    lora = _peft_lora(tiny_flux, tmp_path / "lora")
    wrong_size = tmp_path / "wrong_size.safetensors"
    from safetensors.torch import load_file

    save_file({k: (torch.ones(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v) for k, v in load_file(lora).items()},
              str(wrong_size))
    elsewhere = tmp_path / "elsewhere.safetensors"
    save_file({"unet.mid.proj.lora_A.weight": torch.ones(4, 8), "unet.mid.proj.lora_B.weight": torch.ones(8, 4)},
              str(elsewhere))
    cases = [
        (["--model_path", _without(tiny_flux, tmp_path, "text_encoder")], "text_encoder/"),
        (["--model_path", _without(tiny_flux, tmp_path, "vae")], "vae/"),
        (["--model_path", tiny_flux, "--lora_weights", wrong_size], "another model size"),
        (["--model_path", tiny_flux, "--lora_weights", elsewhere], "attached to no layer"),
    ]
    for extra, needle in cases:
        out = tmp_path / "deep" / "out"
        rc = infer("LORA" if "--lora_weights" in extra else "BASE",
                   ["--prompt", "x", "--seeds", "1", "--output_dir", out, *FAST, *map(str, extra)])
        err = capfd.readouterr().err
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (extra, err[-2000:])
        assert not (tmp_path / "deep").exists(), f"{extra} left {out} behind"


def test_outputs_honour_the_umask(tiny_flux, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert infer("BASE", ["--model_path", tiny_flux, "--prompt", "x", "--seeds", "1", "--output_dir", out, *FAST]) == 0
    finally:
        os.umask(old)
    modes = {n: stat.S_IMODE(os.stat(out / n).st_mode) for n in os.listdir(out)}
    assert len(modes) == 3 and set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


def test_batch_size_is_in_bf16_names_and_a_name_is_its_pixels(tiny_flux, tmp_path):
    """bf16 batching moves pixels, so it is part of the name; and an image resumed alone (padded to a
    full batch) has exactly the pixels of the one first rendered with two others."""
    common = ["--model_path", tiny_flux, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompt", "a red circle",
              "--seeds", "8", "--height", "32", "--width", "32", "--num_inference_steps", "2", "--dtype", "bf16"]
    assert infer("BASE", common + ["--output_dir", tmp_path / "b1"]) == 0
    assert infer("BASE", common + ["--output_dir", tmp_path / "b3", "--batch_size", "3"]) == 0
    assert not set(pngs(tmp_path / "b1")) & set(pngs(tmp_path / "b3"))
    with Image.open(tmp_path / "b3" / pngs(tmp_path / "b3")[0]) as im:
        assert im.text["batch_size"] == "3"

    shutil.copytree(tmp_path / "b3", tmp_path / "first")
    victim = pngs(tmp_path / "b3")[1]
    os.remove(tmp_path / "b3" / victim)
    assert infer("BASE", common + ["--output_dir", tmp_path / "b3", "--batch_size", "3"]) == 0
    assert summary(tmp_path / "b3")["images_written"] == 1
    assert np.array_equal(pixels(tmp_path / "b3" / victim), pixels(tmp_path / "first" / victim))


@pytest.mark.cli
def test_hub_cache_copy_missing_a_component_is_named(tiny_flux, tmp_path):
    """A hub id whose cached snapshot lacks text_encoder/: the line names the component, not a file in the root."""
    snapshot = tmp_path / "hf" / "hub" / "models--org--flux" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "hf" / "hub" / "models--org--flux" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "models--org--flux" / "refs" / "main").write_text("0" * 40)
    for name in os.listdir(tiny_flux):
        if name != "text_encoder":
            os.symlink(os.path.join(tiny_flux, name), snapshot / name)
    out = tmp_path / "out"
    proc = run_script([sys.executable, os.path.join(ROOT, "infer_flux_text2img_bf16.py"), "--model_path", "org/flux",
                       "--prompt", "x", "--seeds", "1", "--output_dir", str(out), *FAST],
                      env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, cwd=str(tmp_path))
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "text_encoder/" in lines[0] and "cache" in lines[0], proc.stderr[-2000:]
    assert not out.exists()
