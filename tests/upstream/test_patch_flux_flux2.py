"""patch_flux.py on diffusers' FLUX.2 / FLUX.2 [klein] / Kontext LoRA scripts: the fixes those scripts
need, on an upstream-shaped fixture (tests/fixtures/train_lora_flux2_shape.py) and in process."""

import ast
import json
import os
import re
import sys

import pytest
import torch

from conftest import ROOT, accelerate_launch

RUNNER = os.path.join(ROOT, "patch_flux.py")
FLUX2_SHAPE = os.path.join(ROOT, "tests", "fixtures", "train_lora_flux2_shape.py")
CACHED_PAIRS = os.path.join(ROOT, "tests", "fixtures", "train_cached_pairs_shape.py")


def _fix(source, name="train_dreambooth_lora_flux2_klein.py"):
    from fluxkit.upstream.script_fixes import fix_script

    tree = ast.parse(source)
    return tree, {r.name: r.status for r in fix_script(tree, name)}


# ------------------------------------------------------------------ source fixes

def test_flux2_shape_gets_transformer_only_lora_hooks():
    with open(FLUX2_SHAPE) as f:
        source = f.read()
    tree, results = _fix(source)
    assert results == {"checkpoint-io-rank0": "applied", "checkpoint-every-rank": "applied", "validation-dtype": "already fixed",
                       "lora-save-hook": "applied", "lora-load-hook": "applied", "cache-by-sample": "not needed", "patch-import": "not needed"}
    text = ast.unparse(tree)
    assert "upstream_lora_hooks(accelerator, transformer, None, args, weight_dtype)[0]" in text
    assert "(accelerator.is_main_process or __fluxkit_fixes__.collective_checkpoint(accelerator)) or is_fsdp" in text

    # A script that can train its text encoder must still name it: the hook would silently drop its adapter.
    trains_te = source.replace('p.add_argument("--seed"', 'p.add_argument("--train_text_encoder", action="store_true")\n    p.add_argument("--seed"')
    from fluxkit.shared.errors import UserError

    with pytest.raises(UserError, match=r"transform 'lora-save-hook'.*text_encoder_one"):
        _fix(trains_te)


# ------------------------------------------------------------------ caches read by step (Kontext, FLUX.1, FLUX.2 img2img)

def test_cached_captions_and_latents_stay_with_their_images(tmp_path, monkeypatch):
    """Kontext's shape: captions cached in one pass, latents (target and reference) in another, both read as
    cache[step] while the bucket sampler reshuffles on every pass. Unfixed, steps train on another image's
    caption; with `cache-by-sample` every step's caption, latents and reference latents are its batch's."""
    from accelerate.state import AcceleratorState

    from conftest import run_inprocess
    from fluxkit.upstream import patches
    from fluxkit.upstream.cache_pairing import ENV_LOG

    monkeypatch.setattr(patches, "_LEFT_OUT", set())
    monkeypatch.setattr(sys, "path", list(sys.path))  # the runner puts the script's folder first
    no_runtime_patches = [a for p in patches.PATCHES for a in ("--skip", p.name)]  # none is needed; this process stays as it is
    log = tmp_path / "pairs.jsonl"

    def run(*flags, fix=True):
        AcceleratorState._reset_state(reset_partial_state=True)
        proc = run_inprocess([sys.executable, RUNNER, *no_runtime_patches, *([] if fix else ["--skip", "cache-by-sample"]),
                              CACHED_PAIRS, "--output_dir", str(tmp_path / "out"), *flags], env={ENV_LOG: str(log)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["steps"]

    def paired(s):
        return s["batch"] == s["caption"] == s["pooled"] == s["latent"] == s.get("cond", s["batch"])

    kontext = ("--cache_latents", "--cond_image_column", "cond_image", "--num_samples", "8", "--train_batch_size", "2",
               "--num_train_epochs", "2")
    upstream = run(*kontext, fix=False)
    assert not log.exists(), "unfixed, nothing reads through the fix"
    assert any(s["caption"] != s["batch"] for s in upstream if s["epoch"] == 0), "the caption pass and the latent pass differ"
    assert any(s["latent"] != s["batch"] for s in upstream), "each training pass reshuffles again"
    assert all(s["latent"] == s["cond"] for s in upstream), "target and reference latents come from one cache pass"

    fixed = run(*kontext)
    assert all(paired(s) for s in fixed), fixed
    assert [s["batch"] for s in fixed] == [s["batch"] for s in upstream], "the same batches train, only their inputs changed"
    for epoch in (0, 1):
        assert sorted(i for s in fixed if s["epoch"] == epoch for i in s["batch"]) == list(range(8))
    reads = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["cache"] for r in reads} == {"cached_text_embeddings", "latents_cache", "cond_latents_cache"}
    assert [r["batch"] for r in reads if r["cache"] == "latents_cache"] == [s["batch"] for s in fixed]
    assert any(r["by_step"] != r["batch"] for r in reads), "the log names the batch cache[step] would have read"

    # FLUX.1's LoRA scripts: DataLoader(batch_size=, shuffle=True) regroups samples each pass (7 samples: a last batch of 1)
    flux1 = run("--cache_latents", "--shuffle_loader", "--num_samples", "7", "--train_batch_size", "3")
    assert all(paired(s) for s in flux1), flux1
    assert sorted(len(s["batch"]) for s in flux1) == [1, 1, 3, 3, 3, 3]

    check = run_inprocess([sys.executable, RUNNER, "--check", CACHED_PAIRS])
    assert re.search(r"cache-by-sample +applied +cached_text_embeddings, cond_latents_cache, latents_cache read by", check.stdout)


def test_cache_pairing_regroups_samples_and_refuses_what_it_cannot_pair():
    from torch.utils.data import DataLoader

    from fluxkit.upstream import cache_pairing
    from fluxkit.shared.errors import UserError

    with pytest.raises(UserError, match="has no batch sampler.*--skip cache-by-sample"):
        cache_pairing.keyed_batches(DataLoader(range(4), batch_size=None))
    cache = []
    for batch in cache_pairing.keyed_batches(DataLoader(range(4), batch_size=2)):  # (0, 1), (2, 3)
        cache_pairing.cache_append(cache, torch.cat([batch * 10, batch * 10 + 100]))  # instance rows, then class rows
    batches = iter(cache_pairing.keyed_batches(DataLoader(range(6), batch_size=3)))
    next(batches)  # (0, 1, 2): rows of both entries, still instance rows first
    assert cache_pairing.cached(cache, 0, "cache").tolist() == [0, 10, 20, 100, 110, 120]
    next(batches)  # (3, 4, 5): 4 and 5 were never cached
    with pytest.raises(UserError, match="sample 4 of the batch at step 1 is in no entry of cache"):
        cache_pairing.cached(cache, 1, "cache")


# ------------------------------------------------------------------ the runner's launch check

def test_unconnected_processes_are_refused_before_anything_runs(tmp_path, monkeypatch):
    """`accelerate launch --config_file <DeepSpeed> --multi_gpu` on a CPU host: accelerate exports no
    ACCELERATE_USE_DEEPSPEED and every process gets DistributedType.NO (seen with the klein script)."""
    import patch_flux
    from conftest import assert_user_error, run_inprocess

    out = tmp_path / "out"
    multi_gpu = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "RANK": "0", "ACCELERATE_USE_DEEPSPEED": None}
    proc = run_inprocess([sys.executable, RUNNER, FLUX2_SHAPE, "--pretrained_model_name_or_path", "x",
                          "--instance_data_dir", "x", "--output_dir", str(out)], env=multi_gpu)
    assert_user_error(proc, "2 processes", "--multi_gpu", "--num_processes 2")
    assert not out.exists()
    for key, value in {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}.items():
        monkeypatch.setenv(key, value)
    patch_flux.check_processes()  # DeepSpeed connects them
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    patch_flux.check_processes()  # one process: nothing to connect


# ------------------------------------------------------------------ runtime patches, in process

def test_sampler_batch_size_reads_bucket_samplers():
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from fluxkit.upstream.patches import sampler_batch_size

    data = list(range(8))
    bucketed = DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 3, drop_last=False))
    plain = DataLoader(data, batch_size=2)
    assert bucketed.batch_size is None and sampler_batch_size([bucketed, "optimizer"]) == 3
    assert sampler_batch_size([plain]) is None  # accelerate reads batch_size itself
    odd = DataLoader(data, batch_sampler=[[0, 1], [2, 3]])  # no batch_size to read: leave accelerate's error
    assert sampler_batch_size([bucketed, odd]) is None


@pytest.fixture
def restore(monkeypatch):
    """Undo a runtime patch after the test: restore(owner, attr)."""
    import inspect

    return lambda owner, attr: monkeypatch.setattr(owner, attr, inspect.getattr_static(owner, attr))


def test_cpu_model_offload_keeps_the_pipeline_on_cpu(tiny_flux, restore):
    from diffusers import DiffusionPipeline, FluxPipeline

    from fluxkit.upstream import patches

    restore(DiffusionPipeline, "enable_model_cpu_offload")
    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    with pytest.raises(RuntimeError, match="requires accelerator"):
        pipe.enable_model_cpu_offload()  # what the FLUX.2 scripts' validation hits on this host
    (name, applied, why), = patches.apply(["cpu-model-offload"])
    assert applied and "no accelerator" in why
    patches.apply(["cpu-model-offload"])  # idempotent
    assert pipe.enable_model_cpu_offload() is pipe and pipe.device.type == "cpu"
    image = pipe("a dog", num_inference_steps=1, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def _tiny_flux2_transformer():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4),
                                   timestep_guidance_channels=32).to(torch.bfloat16)


def test_flux2_input_dtype_casts_only_where_it_would_fail(restore):
    from diffusers import Flux2Transformer2DModel

    from fluxkit.upstream import patches

    restore(Flux2Transformer2DModel, "forward")
    model = _tiny_flux2_transformer()
    ids = torch.zeros(1, 16, 4)
    ids[0, :, 2], ids[0, :, 3] = torch.arange(16) // 4, torch.arange(16) % 4
    x = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 48), timestep=torch.tensor([0.5]),
             img_ids=ids, txt_ids=torch.zeros(1, 8, 4), return_dict=False)  # float32, as the FLUX.2 scripts pass them
    with torch.no_grad(), pytest.raises(RuntimeError, match="dtype"):
        model(**x)  # DeepSpeed's bf16 engine: no autocast
    with torch.no_grad():
        expected = model(**{**x, "hidden_states": x["hidden_states"].bfloat16(),
                            "encoder_hidden_states": x["encoder_hidden_states"].bfloat16()})[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_before = model(**x)[0]
    patches.apply(["flux2-input-dtype"])
    patches.apply(["flux2-input-dtype"])  # idempotent
    with torch.no_grad():
        assert torch.equal(model(**x)[0], expected)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(**x)[0], autocast_before), "under autocast the patch must not act"


# ------------------------------------------------------------------ end to end under DeepSpeed

@pytest.mark.multiproc
def test_flux2_shape_runs_under_deepspeed_keeps_the_limit_and_its_lora_changes_klein(tiny_klein, sample_data, tmp_path):
    import numpy as np
    from diffusers import Flux2KleinPipeline
    from safetensors import safe_open

    out = tmp_path / "out"
    proc = accelerate_launch([RUNNER, FLUX2_SHAPE, "--pretrained_model_name_or_path", tiny_klein, "--instance_data_dir",
                              sample_data["instance_dir"], "--output_dir", str(out), "--max_train_steps", "6",
                              "--checkpoints_total_limit", "2", "--main_process_delay", "2", "--mixed_precision", "bf16",
                              "--validation_prompt", "a photo of sks dog"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = [l for l in proc.stderr.splitlines() if l.startswith("patch_flux.py: ")]
    assert len(summary) == 1, proc.stderr[-3000:]
    for name in ("deepspeed-batch-sampler", "checkpoint-save-barrier", "flux2-input-dtype", "cpu-model-offload"):
        assert name in summary[0].split("; fixes applied")[0], summary[0]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_processes"] == 2 and result["distributed_type"].endswith("DEEPSPEED") and result["global_step"] == 6
    assert result["input_dtypes"] == ["torch.float32"], "the fixture must feed float32 latents to the bf16 engine"
    # limit 2 at step 6 keeps 4 and 6; without the barrier rank 1's fresh checkpoint-6 is counted and 4 deleted too
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]
    assert (out / "checkpoint-6" / "pytorch_model").is_dir()  # DeepSpeed's own checkpoint, every rank's shard
    assert len(list((out / "checkpoint-6" / "pytorch_model").glob("*optim_states.pt"))) == 2
    assert list(out.glob("validation-*.png"))  # validation ran through enable_model_cpu_offload

    with safe_open(str(out / "checkpoint-6" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a photo of sks dog", height=32, width=32, num_inference_steps=2, output_type="np", max_sequence_length=8)
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    pipe.load_lora_weights(str(out / "checkpoint-6"))
    tuned = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(tuned - base).max() > 1e-4, "the LoRA trained under DeepSpeed must change klein's output"
