"""--text_encoder_quantization (fluxkit.weights.quant, loaded through each family's load_component): the
tiny FLUX.2 [dev] (Mistral3) and FLUX.2 [klein] (Qwen3) text encoders quantized by bitsandbytes on this
CPU: prompt embeddings close to the full-precision ones, a LoRA run over them whose loss moves, the memory
plan's term against the bytes the loaded encoder holds, and the bad combinations as one error line."""

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, assert_user_error, run_entry_inprocess, run_inprocess, trainer_args

LORA = os.path.join(ROOT, "train_flux_dreambooth_lora.py")
PROMPTS = ["a photo of sks dog", "a red car in the snow", "an astronaut riding a horse on the moon"]
TOKENS = 48  # the tiny dev tokenizer's system message takes 33 tokens: room for the prompt after it


@pytest.fixture(scope="module")
def folders(tiny_flux2_dev, tiny_klein):
    return {"flux2": tiny_flux2_dev, "flux2-klein": tiny_klein}


def _config(model, quantization, *extra):
    from fluxkit.training.train_args import parse

    return parse(["--pretrained_model_name_or_path", model, "--max_sequence_length", str(TOKENS),
                  "--text_encoder_quantization", quantization, *extra], lora=True, need_data=False)


def _text_models(model, quantization):
    from fluxkit.training.models import load_models

    args = _config(model, quantization)
    return args, load_models(args, model, without=("transformer", "vae"), weight_dtype=torch.float32)


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the loaded model holds: parameters and buffers as stored (packed for
    bitsandbytes' layers), their quantization states (NF4: absmax and code table) and LLM.int8's
    per-row scales (on the weight until the first forward, on the layer's state after it)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for p in model.parameters() if getattr(p, "quant_state", None) is not None
                for v in vars(p.quant_state).values()]
    tensors += [getattr(p, "SCB", None) for p in model.parameters()]
    tensors += [getattr(getattr(m, "state", None), "SCB", None) for m in model.modules()]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.mark.tiny
@pytest.mark.parametrize("family", ["flux2", "flux2-klein"])
def test_4bit_prompt_embeddings_stay_close_and_the_plan_counts_the_encoder(family, folders):
    """Tolerance: each prompt's NF4 embedding within 0.3 relative (L2) of its full-precision one (cosine
    >= 0.95), and nearer to it than to any other prompt's. Why: NF4 keeps each weight within about 10%
    (RMS) of its value; the random 30+-layer encoders of the tiny models compound that to 0.18-0.27 here
    (LLM.int8: 0.01). Packed weights garbled (each layer's rows shifted by one) land at 0.70; a
    quantization that did nothing at 0. The bound tells NF4 from a broken encoder, not from another
    4-bit code: bitsandbytes' fp4 gives 0.25-0.28 on klein.
    The plan: architecture.quantized_text_bytes within 15% of held_bytes for nf4 and int8."""
    import bitsandbytes as bnb

    from fluxkit.plan import terms
    from fluxkit.plan.architecture import read_architecture
    from fluxkit.plan.shape import RunShape

    model = folders[family]
    arch = read_architecture(model)
    embeds = {}
    for quantization in ("none", "nf4", "int8"):
        args, m = _text_models(model, quantization)
        layers = {type(x).__name__ for x in m.text_encoder.modules() if isinstance(x, (torch.nn.Linear, bnb.nn.Linear4bit))}
        if quantization != "none":  # every Linear but the (tied or kept) output head is bitsandbytes'
            assert layers <= {"Linear4bit", "Linear8bitLt", "Linear"}, layers
            kind = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}[quantization]
            assert sum(isinstance(x, kind) for x in m.text_encoder.modules()) == arch.text_encoders[0]["quant_layers"]
        with torch.no_grad():
            embeds[quantization] = m.family.encode_prompts(m, PROMPTS, args, torch.device("cpu"))[0]
        planned = terms.text_encoder_weights(RunShape(text_quant=quantization, mixed="no"), arch.text_encoders[0]).bytes
        measured = held_bytes(m.text_encoder)
        print(f"{family} {quantization}: planned {planned} B, held {measured} B ({planned / measured - 1:+.1%})")
        assert abs(planned / measured - 1) <= 0.15, (quantization, planned, measured)
    full = embeds["none"]
    for quantization, bound in (("nf4", 0.3), ("int8", 0.03)):
        got = embeds[quantization]
        for i in range(len(PROMPTS)):
            error = ((got[i] - full[i]).norm() / full[i].norm()).item()
            others = min((got[i] - full[j]).norm().item() for j in range(len(PROMPTS)) if j != i)
            print(f"{family} {quantization} prompt {i}: relative error {error:.3f}")
            assert 0 < error <= bound, (quantization, i, error)
            assert (got[i] - full[i]).norm().item() < others, (quantization, i)


@pytest.mark.tiny
@pytest.mark.parametrize("name", ["flux2", "flux2-klein"])
def test_lora_trains_over_a_4bit_text_encoder(name, folders, sample_data, tmp_path, monkeypatch):
    """A LoRA run of FLUX.2 [dev] (and klein): its prompts encoded by the NF4 Mistral3 / Qwen3 (seen at the
    encode), the loss moves, the LoRA file is written, the setting is recorded, and the text cache is
    another namespace than an unquantized run's."""
    from fluxkit import families

    family = families.get(name)
    seen = []
    original = type(family).encode_prompts

    def encode_prompts(self, m, prompts, args, device):
        seen.append({type(x).__name__ for x in m.text_encoder.modules() if "Linear" in type(x).__name__})
        return original(self, m, prompts, args, device)

    monkeypatch.setattr(type(family), "encode_prompts", encode_prompts)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = trainer_args(folders[name], sample_data, out, steps=4, max_sequence_length=TOKENS, mixed_precision="no",
                        text_encoder_quantization="nf4", learning_rate="1e-3", latent_cache_dir=cache)
    assert run_entry_inprocess(LORA, args) == 0
    assert seen and all("Linear4bit" in s for s in seen), seen
    losses = [json.loads(line)["loss"] for line in open(out / "train_log.jsonl")]
    assert len(losses) == 4 and len(set(losses)) > 1 and all(l == l for l in losses), losses
    assert os.path.getsize(out / "pytorch_lora_weights.safetensors") > 0
    # recorded with the run: a resume with the encoder quantized otherwise is refused like another base
    from fluxkit.checkpoint.folders import changed_settings

    recorded = json.loads((out / "run_config.json").read_text())["settings"]
    assert recorded["text_encoder_quantization"] == "nf4"
    assert changed_settings(recorded, dict(recorded, text_encoder_quantization="none")) == ["text_encoder_quantization nf4 -> none"]
    # the quantized encoder's embeddings are cached under their own identity
    from fluxkit.cache import text_identity

    quantized, plain = (_config(folders[name], q) for q in ("nf4", "none"))
    ids = {text_identity(folders[name], torch.float32, family, family.text_settings(a)) for a in (quantized, plain)}
    assert len(ids) == 2
    text_namespaces = os.listdir(cache / "v1" / "text")
    assert len(text_namespaces) == 1


# ------------------------------------------------------------------------------------------ the plan


@pytest.mark.unit
def test_the_plan_term_packs_only_what_bitsandbytes_converts():
    """nf4: half a byte per converted weight + an fp32 absmax per 64 + a 64-byte code table per layer;
    int8: a byte per weight + an fp32 scale per row; everything else in the compute dtype."""
    from fluxkit.plan import terms
    from fluxkit.plan.architecture import quantized_text_bytes
    from fluxkit.plan.shape import RunShape

    t = {"label": "Mistral3", "role": "sequence", "params": 1000 + 6400, "quant_numel": 6400, "quant_rows": 80,
         "quant_layers": 2, "largest_linear": 3200, "largest_param": 3200}
    assert quantized_text_bytes(t, "none", 2) == 7400 * 2
    assert quantized_text_bytes(t, "nf4", 2) == 3200 + 100 * 4 + 2 * 64 + 1000 * 2
    assert quantized_text_bytes(t, "int8", 2) == 6400 + 80 * 4 + 1000 * 2
    item = terms.text_encoder_weights(RunShape(text_quant="nf4"), t)
    assert item.bytes == quantized_text_bytes(t, "nf4", 2) and "nf4" in item.note and " text encoder " in item.name
    # while it loads, bitsandbytes quantizes one weight at a time through temporaries of it
    arch = SimpleNamespace(text_encoders=[t])
    assert terms.text_quantizing(RunShape(text_quant="nf4"), arch).bytes == 3200 * terms.QUANTIZING_BYTES["nf4"]
    assert terms.text_quantizing(RunShape(), arch).bytes == 0


@pytest.mark.unit
def test_flux2_dev_with_a_4bit_encoder_plans_it_on_the_device_not_the_host():
    """FLUX.2 [dev]'s 24B Mistral3 (its 0.67B-parameter output head, 0.44B vision tower and the 9 layers past
    the deepest one prompts read never loaded: families.prompt_encoders): 33.3 GiB in bf16 (the host reads it
    whole); with nf4 10.3 GiB (the 0.67B-parameter embedding stays bf16), beside the VAE on a 24 GB card, and the host
    holds one tensor at a time while it quantizes onto the device (unless it encodes on the host)."""
    from dataclasses import replace

    from fluxkit.plan import terms
    from fluxkit.plan.architecture import read_architecture
    from fluxkit.plan.phases import GiB, plan_shape
    from fluxkit.plan.where import LORA_1024

    arch = read_architecture("black-forest-labs/FLUX.2-dev")
    mistral = arch.text_encoder("sequence")
    s = replace(LORA_1024, targets=("to_q",), text_quant="nf4", quant="nf4", checkpointing=True, optimizer="adamw8bit")
    packed = terms.text_encoder_weights(s, mistral).bytes
    assert 10 * GiB < packed < 10.5 * GiB and 33 * GiB < mistral["params"] * 2 < 33.5 * GiB
    plan = plan_shape(s, arch, 24 * GiB)
    encode = plan.phase("encode")
    assert not plan.shape.text_on_host and any(i.bytes == packed for i in encode.items)
    assert encode.host_bytes < 2 * GiB  # the VAE and the largest tensor (the embedding) in bf16
    # python -m fluxkit.plan lists it so
    proc = run_inprocess([sys.executable, "-m", "fluxkit.plan", "--lora", "--pretrained_model_name_or_path",
                          "black-forest-labs/FLUX.2-dev", "--resolution", "1024", "--train_batch_size", "1", "--mixed_precision", "bf16",
                          "--text_encoder_quantization", "nf4", "--device_memory_gb", "24"])
    line = next(l for l in proc.stdout.splitlines() if "Mistral3 text encoder (frozen)" in l)
    assert f"{packed / GiB:.3f}" in line and "Linear weights nf4" in line, line
    assert "quantizing the text encoder" in proc.stdout  # its 1.9 GiB outweigh one 1024 px image's VAE encoding
    unquantized = plan_shape(replace(s, text_quant="none"), arch, 24 * GiB)
    assert unquantized.shape.text_on_host and unquantized.phase("encode").host_bytes > 33 * GiB
    # encoding on the host: the packed encoder there, with one weight's quantizing temporaries (a 168M-element
    # feed-forward weight x 12 B: 1.9 GiB) and the encoding working set
    on_host = plan_shape(replace(s, text_on_host=True), arch, 24 * GiB).phase("encode")
    assert packed + 1.8 * GiB < on_host.host_bytes < packed + 4 * GiB


# ------------------------------------------------------------------------------------ bad combinations


@pytest.mark.tiny
@pytest.mark.parametrize("mistake", ["trains the text encoder", "bitsandbytes missing"])
def test_bad_combinations_are_one_line_and_write_nothing(mistake, tiny_flux, sample_data, tmp_path, monkeypatch):
    """A quantized text encoder that would train, and bitsandbytes missing (its import blocked, as Python
    does for a None in sys.modules): exit 2, one error line, no output or cache folder; the cache fill
    command refuses the same before it writes its cache."""
    import sys

    out, cache = tmp_path / "out", tmp_path / "cache"
    args = trainer_args(tiny_flux, sample_data, out, steps=1, text_encoder_quantization="nf4", latent_cache_dir=cache)
    if mistake == "bitsandbytes missing":
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)
        needle = "needs bitsandbytes"
    else:
        args.append("--train_text_encoder")
        needle = "--train_text_encoder"
    for command in ([sys.executable, LORA, *args], [sys.executable, "-m", "fluxkit.cache", *args]):
        proc = run_inprocess(command)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert_user_error(proc, "--text_encoder_quantization nf4", needle)
        assert not out.exists() and not cache.exists()


@pytest.mark.unit
def test_the_smallest_change_can_quantize_the_text_encoders():
    """A FLUX.1 [dev] LoRA without a cache keeps T5 and CLIP on a 16 GB card for the whole run: the plan's
    way to fit it quantizes them (int8, the smaller step, is enough), beside the base."""
    from dataclasses import replace

    from fluxkit.plan.architecture import default_lora_targets, read_architecture
    from fluxkit.plan.fit import smallest_change
    from fluxkit.plan.phases import GiB, plan_shape
    from fluxkit.plan.where import LORA

    arch = read_architecture("black-forest-labs/FLUX.1-dev")
    s = replace(LORA, caching=False, targets=tuple(default_lora_targets(arch)))
    flags, fitting = smallest_change(plan_shape(s, arch, 16 * GiB))
    assert "--text_encoder_quantization int8" in flags and fitting.fits, flags
    assert fitting.shape.text_quant == "int8"


@pytest.mark.unit
def test_an_npu_run_is_refused_and_none_is_always_fine():
    """bitsandbytes 0.50 has no Ascend NPU backend: one line before anything loads; none needs nothing."""
    from fluxkit.shared.errors import UserError
    from fluxkit.weights import quant

    with pytest.raises(UserError, match="--text_encoder_quantization int8: bitsandbytes has no Ascend NPU backend"):
        quant.check_text_encoder("int8", "npu")
    for device in ("npu", "cuda", "cpu"):
        quant.check_text_encoder("none", device)
    quant.refuse_trained_text_encoder("none", True)
