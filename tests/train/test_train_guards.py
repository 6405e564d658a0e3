"""Guards for behaviour that a move of training code could break without any other test noticing
(issue 11): resume across epochs and with gradient accumulation, the latent and text caches,
captions and --repeats, the prior-preservation term, TensorBoard output, --compile, and the
ShardedTensor device mapping for hccl/nccl.

Every run is the tiny FLUX at 32 px, fp32, a few steps: seconds each.
"""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from conftest import ROOT, count_rows, run_entry_inprocess as train_inprocess, run_script
from test_reliability import (KILL_AT_STEP, LORA, SIGKILLED, assert_bit_identical, listing, log_lines,
                              steps_and_losses, train_args, train_subprocess, weights)


def losses(out):
    return [r["loss"] for r in log_lines(out)]


def captions(sample_data):
    import datasets

    return list(datasets.load_dataset(sample_data["dataset_name"], split="train")["text"])


def run_chain(tiny_flux, sample_data, tmp_path, steps, kills, **extra):
    """An uninterrupted run, and the same run SIGKILLed after each step in `kills` (resuming with
    'latest' each time) and then finished: (reference folder, crashed folder, listings after each kill)."""
    reference = tmp_path / "uninterrupted"
    assert train_inprocess(LORA, train_args(tiny_flux, sample_data, reference, steps, **extra)) == 0
    out = tmp_path / "crashed"
    args = train_args(tiny_flux, sample_data, out, steps, resume_from_checkpoint="latest", **extra)
    left = []
    for step in kills:
        proc = train_subprocess(LORA, args, env={KILL_AT_STEP: str(step)})
        assert proc.returncode == SIGKILLED, proc.stderr[-3000:]
        assert [r["step"] for r in log_lines(out)] == list(range(1, step + 1))
        left.append(listing(out))
    assert train_inprocess(LORA, args) == 0
    return reference, out, left


# ------------------------------------------------------------------ resume: epochs and accumulation

@pytest.mark.cli
def test_kill_resume_across_an_epoch_boundary_is_bit_identical(tiny_flux, sample_data, tmp_path):
    """4 samples, micro batch 1: 4 steps an epoch. Killed at step 5 (resumes from checkpoint-3 in
    epoch 0 and runs into epoch 1), then at step 7 (resumes from checkpoint-6 inside epoch 1)."""
    reference, out, left = run_chain(tiny_flux, sample_data, tmp_path, 8, kills=[5, 7], checkpointing_steps=3)
    assert left == [["checkpoint-3"], ["checkpoint-3", "checkpoint-6"]]
    assert steps_and_losses(out) == steps_and_losses(reference) and len(losses(out)) == 8
    assert_bit_identical(weights(out, LORA), weights(reference, LORA))


@pytest.mark.cli
def test_kill_resume_mid_epoch_with_gradient_accumulation_is_bit_identical(tiny_flux, sample_data, tmp_path):
    """Accumulation 2 over 4 samples: 2 optimizer steps an epoch. checkpoint-3 sits after the first
    step of epoch 1, so the resumed run must start in epoch 1 and skip 2 micro batches (not 1)."""
    reference, out, left = run_chain(tiny_flux, sample_data, tmp_path, 4, kills=[4], checkpointing_steps=3,
                                     gradient_accumulation_steps=2)
    assert left == [["checkpoint-3"]]
    assert steps_and_losses(out) == steps_and_losses(reference) and len(losses(out)) == 4
    assert_bit_identical(weights(out, LORA), weights(reference, LORA))


# ------------------------------------------------------------------ the caches, captions, repeats

@pytest.fixture
def encode_counts(monkeypatch):
    """Images the VAE encodes and prompts T5 encodes during a run (the real models run; we count rows)."""
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    counts = Counter()

    count_rows(monkeypatch, counts, AutoencoderKL, "encode", "images")
    count_rows(monkeypatch, counts, T5EncoderModel, "forward", "prompts")
    return counts


def test_cache_hits_in_epoch_two_and_changes_no_loss(tiny_flux, sample_data, tmp_path, encode_counts):
    """8 captioned samples with several prompts, batches of 2, 2 epochs: cached and uncached runs
    give the same losses; the cached run encodes each image and each distinct prompt once."""
    texts = captions(sample_data)
    assert len(texts) == 8 and len(set(texts)) >= 3
    common = dict(dataset_name=sample_data["dataset_name"], caption_column="text", train_batch_size=2,
                  weighting_scheme="logit_normal")
    assert train_inprocess(LORA, train_args(tiny_flux, sample_data, tmp_path / "cached", 8, **common)) == 0
    cached = dict(encode_counts)
    encode_counts.clear()
    assert train_inprocess(LORA, train_args(tiny_flux, sample_data, tmp_path / "uncached", 8, no_cache=True, **common)) == 0
    uncached = dict(encode_counts)

    assert len(losses(tmp_path / "cached")) == 8 and losses(tmp_path / "cached") == losses(tmp_path / "uncached")
    assert uncached == {"images": 16, "prompts": 16}  # every sample, both epochs
    assert cached == {"images": 8, "prompts": len(set(texts))}  # epoch 2 is all cache hits


def test_captions_and_repeats_reach_the_training_batches(tiny_flux, sample_data, tmp_path, monkeypatch):
    """--repeats 2 over 8 captioned images is one epoch of 16 samples, each caption twice, and the
    captions (not --instance_prompt) are what the text encoders read."""
    from transformers import PreTrainedTokenizerBase

    from fluxkit.data.dataset import DreamBoothDataset

    items, tokenized = [], []
    get_item, tokenize = DreamBoothDataset.__getitem__, PreTrainedTokenizerBase.__call__

    def spy_item(self, index):
        item = get_item(self, index)
        items.append((item["index"], item["prompt"]))
        return item

    def spy_tokenize(self, text=None, *args, **kwargs):
        tokenized.extend([text] if isinstance(text, str) else text)
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(DreamBoothDataset, "__getitem__", spy_item)
    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", spy_tokenize)
    args = train_args(tiny_flux, sample_data, tmp_path / "out", 16, dataset_name=sample_data["dataset_name"],
                      caption_column="text", repeats=2, no_cache=True)
    assert train_inprocess(LORA, args) == 0

    texts = captions(sample_data)
    assert sorted(i for i, _ in items) == list(range(16))  # one epoch holds 16 samples
    assert Counter(p for _, p in items) == Counter(texts * 2)
    # no cache: each step tokenizes its prompt for CLIP and for T5
    assert Counter(tokenized) == Counter(texts * 4)


# ------------------------------------------------------------------ prior preservation

def test_prior_loss_weight_scales_the_class_term(tiny_flux, sample_data, tmp_path):
    from PIL import Image

    cls = tmp_path / "class"
    cls.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # enough class images already: nothing is generated
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(cls / f"class_{i:05d}.png")
    runs = {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"w{weight}"
        assert train_inprocess(LORA, train_args(tiny_flux, sample_data, out, 3, with_prior_preservation=True,
                                                class_data_dir=cls, class_prompt="a photo of dog", num_class_images=2,
                                                prior_loss_weight=weight)) == 0
        runs[weight] = losses(out)
    # step 1 starts from the same weights with the same noise: the weighted class term is all that differs
    assert runs[1.0][0] > runs[0.0][0] and runs[1.0] != runs[0.0]


# ------------------------------------------------------------------ TensorBoard

def test_tensorboard_gets_loss_lr_and_validation_images(tiny_flux, sample_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    args = train_args(tiny_flux, sample_data, out, 8, validation_prompt="a photo of sks dog", validation_epochs=1,
                      num_validation_images=2, num_validation_steps=1, lr_scheduler="linear")
    args[args.index("--report_to") + 1] = "tensorboard"
    assert train_inprocess(LORA, args) == 0

    runs = []  # accelerate's tracker also writes the run's flags (hparams) into a sub-run of its own
    for folder in sorted({d for d, _, fs in os.walk(out / "logs") for f in fs if f.startswith("events.out.tfevents")}):
        run = EventAccumulator(folder, size_guidance={"scalars": 0, "images": 0})
        run.Reload()
        if "loss" in run.Tags()["scalars"]:
            runs.append(run)
    assert len(runs) == 1
    events = runs[0]
    logged = log_lines(out)
    for key in ("loss", "lr"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [r["step"] for r in logged]
        assert np.allclose([s.value for s in scalars], [r[key] for r in logged], rtol=1e-6, atol=0)
    assert len({r["lr"] for r in logged}) > 1  # a schedule that moves, so lr is really read back

    images = events.Images("validation")
    assert {i.step for i in images} >= {1}  # after epoch 1 (and the final one)
    from PIL import Image
    import io

    for i in images:
        grid = Image.open(io.BytesIO(i.encoded_image_string))
        assert grid.size == (i.width, i.height) == (64, 32)  # two 32 px images side by side


# ------------------------------------------------------------------ --compile (inference)

def test_compile_really_runs_the_transformer_through_dynamo(tiny_flux, tmp_path, monkeypatch):
    """A backend registered here counts the graphs dynamo hands it: --compile must produce some,
    and the image must match the uncompiled one. The real entry script runs in this process."""
    import runpy

    import torch
    from PIL import Image

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    name = "fluxkit_test_counting"
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(counting_backend, name=name)
    else:
        torch._dynamo.backends.registry._COMPILER_FNS[name] = counting_backend
    common = ["--model_path", tiny_flux, "--prompt", "a photo of sks dog", "--seeds", "8", "--height", "32",
              "--width", "32", "--num_inference_steps", "2", "--dtype", "fp32"]

    def infer(*argv):
        script = os.path.join(ROOT, "infer_flux_text2img_bf16.py")
        monkeypatch.setattr(sys, "argv", [script, *common, *argv])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(script, run_name="__main__")
        return done.value.code

    try:
        assert infer("--output_dir", str(tmp_path / "plain")) == 0
        assert not graphs
        assert infer("--output_dir", str(tmp_path / "compiled"), "--compile", "--compile_backend", name) == 0
    finally:
        torch._dynamo.reset()
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert graphs, "--compile never reached the dynamo backend"

    def image(folder):
        (png,) = [f for f in os.listdir(folder) if f.endswith(".png")]
        with Image.open(folder / png) as im:
            return np.asarray(im.convert("RGB"), dtype=np.int16)

    assert np.abs(image(tmp_path / "compiled") - image(tmp_path / "plain")).max() <= 1


# ------------------------------------------------------------------ ShardedTensor device mapping

_SHARDED_DEVICE = r"""
import json, sys, types
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor.api import ShardedTensor

from fluxkit.upstream import patches

# stand-ins for what torch_npu and a CUDA build provide: an "npu" device type and current devices
torch.utils.rename_privateuse1_backend("npu")
torch.npu = types.SimpleNamespace(current_device=lambda: 3)
torch.cuda.current_device = lambda: 1
patches.BY_NAME["npu-sharded-tensor-device"].install()
holder = types.SimpleNamespace(_process_group=None)
found = {}
for backend in ("hccl", "nccl", "gloo"):
    dist.get_backend = lambda group=None, name=backend: name  # the collective backend of the group
    found[backend] = str(ShardedTensor._get_preferred_device(holder))
print(json.dumps(found))
"""


@pytest.mark.cli
def test_sharded_tensor_device_follows_hccl_and_nccl():
    proc = run_script([sys.executable, "-c", _SHARDED_DEVICE], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"hccl": "npu:3", "nccl": "cuda:1", "gloo": "cpu"}
