"""Runs in phases (fluxkit.training.train.prepare_models): the encoders fill the cache and are gone before
the transformer is read, so a text encoder and the transformer never share the device (on a CPU
host the device is the host: "on the device" is "alive in the process"). Recorded with hooks on
the real loaders and on the encoders' forward, for unquantized and quantized bases."""

import gc
import weakref

import pytest
import torch

from conftest import run_entry_inprocess as train_inprocess, trainer_args

LORA, FULL = "train_flux_dreambooth_lora.py", "train_flux_dreambooth.py"


class Recorder:
    """Weak references to every text encoder and transformer the run builds, and an event log."""

    def __init__(self):
        self.encoders, self.transformers, self.events = [], [], []

    def alive(self, refs):
        gc.collect()
        return [r() for r in refs if r() is not None]

    def encoder_built(self, module):
        self.encoders.append(weakref.ref(module))
        self.events.append(("load", type(module).__name__))
        module.register_forward_pre_hook(self.encoder_runs)

    def encoder_runs(self, module, inputs):
        # a text encoder at work: no transformer parameter may exist
        assert not self.alive(self.transformers), "a transformer exists while a text encoder encodes"
        self.events.append(("encode", type(module).__name__))

    def transformer_built(self, module):
        # the transformer arrives: every text encoder must be gone already
        self.events.append(("load transformer", [type(m).__name__ for m in self.alive(self.encoders)]))
        assert not self.alive(self.encoders), "a text encoder still exists as the transformer loads"
        self.transformers.append(weakref.ref(module))


@pytest.fixture
def recorder(monkeypatch):
    from transformers import CLIPTextModel, T5EncoderModel

    from fluxkit.weights import quant

    rec = Recorder()
    for cls in (CLIPTextModel, T5EncoderModel):
        original = cls.from_pretrained.__func__

        def loaded(klass, *a, _original=original, **kw):
            module = _original(klass, *a, **kw)
            rec.encoder_built(module)
            return module

        monkeypatch.setattr(cls, "from_pretrained", classmethod(loaded))
    load = quant.load_transformer

    def load_transformer(*a, **kw):
        rec.events.append(("reading transformer", [type(m).__name__ for m in rec.alive(rec.encoders)]))
        assert not rec.alive(rec.encoders), "a text encoder still exists as the transformer is read"
        module = load(*a, **kw)
        rec.transformer_built(module)
        return module

    monkeypatch.setattr(quant, "load_transformer", load_transformer)
    return rec


@pytest.mark.parametrize("script,quantization", [(LORA, "none"), (LORA, "nf4"), (LORA, "int8"), (FULL, "none")])
def test_encoders_leave_before_the_transformer_loads(tiny_flux, sample_data, tmp_path, recorder, script, quantization):
    extra = {"base_quantization": quantization} if quantization != "none" else {}
    args = trainer_args(tiny_flux, sample_data, tmp_path / "out", steps=1, validation_prompt="a sks dog on a hill",
                        num_validation_images=1, **extra)
    assert train_inprocess(script, args) == 0
    kinds = [e[0] for e in recorder.events]
    assert kinds.count("load") == 2 and "encode" in kinds  # CLIP and T5 loaded, then encoded
    # the transformer is read once, after the last encoding, with no encoder alive; validation
    # renders from the cached prompt embeddings, so no encoder comes back afterwards
    assert kinds.count("reading transformer") == 1
    read = kinds.index("reading transformer")
    assert max(i for i, k in enumerate(kinds) if k in ("load", "encode")) < read
    assert recorder.events[read] == ("reading transformer", [])
    if quantization != "none":
        assert getattr(recorder.alive(recorder.transformers)[0] if recorder.alive(recorder.transformers) else None,
                       "is_quantized", True)


def test_warm_cache_loads_no_text_encoder(tiny_flux, sample_data, tmp_path, recorder):
    args = trainer_args(tiny_flux, sample_data, tmp_path / "first", steps=1, cache_dir=tmp_path / "cache")
    assert train_inprocess(LORA, args) == 0
    recorder.events.clear()
    args = trainer_args(tiny_flux, sample_data, tmp_path / "second", steps=1, cache_dir=tmp_path / "cache")
    assert train_inprocess(LORA, args) == 0
    assert [e[0] for e in recorder.events] == ["reading transformer", "load transformer"]


def test_lora_base_is_read_in_the_compute_dtype(tiny_flux, sample_data, tmp_path, monkeypatch):
    """A LoRA base is read straight into bf16 (never widened to fp32 in host memory first)."""
    from fluxkit.weights import quant

    seen = []
    load = quant.load_transformer

    def spy(path, quantization, dtype, *a, **kw):
        seen.append(dtype)
        return load(path, quantization, dtype, *a, **kw)

    monkeypatch.setattr(quant, "load_transformer", spy)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier in-process runs set fp32 mixed precision
    args = trainer_args(tiny_flux, sample_data, tmp_path / "out", steps=1, mixed_precision="bf16")
    assert train_inprocess(LORA, args) == 0
    assert seen == [torch.bfloat16]
    seen.clear()
    assert train_inprocess(FULL, trainer_args(tiny_flux, sample_data, tmp_path / "full", steps=1, mixed_precision="bf16")) == 0
    assert seen == [torch.float32]  # outside DeepSpeed the module holds the fp32 masters
    AcceleratorState._reset_state(reset_partial_state=True)


# --------------------------------------------------------------- phases in a sampled RSS timeline (CPU)

@pytest.fixture(scope="module")
def devlike(tmp_path_factory):
    """FLUX.1-dev's proportions (T5 0.40 of the transformer), stored in bf16 like FLUX.1-dev's files."""
    from fluxkit.tiny.build import build_datasets, build_pipeline

    root = tmp_path_factory.mktemp("devlike")
    model = build_pipeline(str(root / "devlike"), "devlike", seed=0, dtype="bf16")
    data = build_datasets(str(root / "data"), seed=0, resolution=256)
    return model, data["instance_dir"]


@pytest.mark.cli
def test_cache_fill_and_training_peak_apart_as_planned(devlike, tmp_path):
    """On a CPU the host is the device: the RSS timeline shows the encode phase (T5 and friends) and
    the training phase (the transformer) peak separately, each within 15% of the plan's phase, and the
    run's peak is the larger of the two, not their sum."""
    import json
    import sys

    from conftest import ROOT, run_script

    sys.path.insert(0, ROOT)
    from bench.suites import memory

    from fluxkit.plan import plan_memory
    from fluxkit.training.train_args import parse

    model, instance = devlike
    flags = memory.trainer_flags(model, instance, str(tmp_path / "out"), "lora", 256, 1, False)
    flags += ["--max_train_steps", "1", "--latent_cache_dir", str(tmp_path / "cache")]
    prefix = str(tmp_path / "probe")
    proc = run_script([sys.executable, "-m", "bench.memprobe", prefix, memory.SCRIPTS["lora"], *flags],
                      env={**memory.PROBE_ENV, "OMP_NUM_THREADS": "2"}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(prefix + ".rank0.json") as f:
        probe = json.load(f)
    base, peaks = probe["baseline_resident_bytes"], probe["phase_peak_bytes"]
    measured = {"encode": peaks["encode+file"] - base, "train": peaks["train+file"] - base}
    plan = plan_memory(parse(flags, lora=True), 1, 0, "cpu")
    planned = {"encode": plan.phase("encode").bytes,
               "train": max(p.bytes for p in plan.phases if p.name.startswith("train"))}
    for phase in ("encode", "train"):
        assert abs(planned[phase] / measured[phase] - 1) <= memory.TOLERANCE, (phase, planned, measured)
    run_peak = probe["run_peak_resident_bytes"] - base
    assert run_peak <= 1.02 * max(measured.values()) < 0.9 * sum(measured.values())
    # the timeline runs encode -> load -> train, never back
    order = [p for i, (_, _, _, p) in enumerate(probe["timeline"]) if i == 0 or probe["timeline"][i - 1][3] != p]
    assert order[-3:] == ["encode", "load", "train"], order


def test_prompts_encoded_on_the_host_when_the_plan_says_so(tiny_flux, sample_data, tmp_path, monkeypatch, caplog):
    """The plan's decision reaches the run: the text encoders are never moved to the device (on this CPU
    host the device is the CPU too, so the path is what is checked: the log line and a complete run)."""
    import logging

    from fluxkit import plan

    monkeypatch.setattr(plan, "text_on_host", lambda memory_plan: True)
    moved = []
    from transformers import T5EncoderModel

    original = T5EncoderModel.to
    monkeypatch.setattr(T5EncoderModel, "to", lambda self, *a, **kw: moved.append((a, kw)) or original(self, *a, **kw))
    with caplog.at_level(logging.INFO, logger="fluxkit.training.train"):
        assert train_inprocess(LORA, trainer_args(tiny_flux, sample_data, tmp_path / "out", steps=1)) == 0
    assert any("prompts are encoded on the host CPU" in r.getMessage() for r in caplog.records)
    assert not [a for a, kw in moved if a and not isinstance(a[0], torch.dtype)]  # only dtype casts, no device moves


def test_reading_in_the_compute_dtype_equals_casting_after(tiny_flux):
    """A base read straight in bf16 holds exactly the weights an fp32 read cast to bf16 holds (what the
    LoRA base and DeepSpeed's engine did before), so runs are unchanged by the cheaper read."""
    from fluxkit.training.models import load_transformer, transformer_load_dtype
    from fluxkit.training.train_args import parse

    args = parse(["--pretrained_model_name_or_path", tiny_flux, "--instance_prompt", "p", "--instance_data_dir", "d"])
    assert transformer_load_dtype(args, torch.bfloat16, deepspeed=True) == torch.bfloat16
    assert transformer_load_dtype(args, torch.bfloat16, deepspeed=False) == torch.float32
    direct = load_transformer(args, tiny_flux, torch.bfloat16, "cpu", deepspeed=True).state_dict()
    cast = load_transformer(args, tiny_flux, torch.bfloat16, "cpu", deepspeed=False).to(torch.bfloat16).state_dict()
    assert direct.keys() == cast.keys() and all(torch.equal(direct[k], cast[k]) for k in direct)
