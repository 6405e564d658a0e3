"""fluxkit.weights.lora: LoRA files in diffusers' FLUX format, copies not in-place casts, accelerate hooks."""

import json
import os

import pytest
import torch

from conftest import ROOT, accelerate_launch

TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _with_lora(model, targets, r=4, alpha=8, seed=1):
    """Add a LoRA adapter whose B matrices are non-zero, so it changes the model's output."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _transformer_inputs(transformer, seed=0):
    cfg = transformer.config
    gen = torch.Generator().manual_seed(seed)
    n_img, n_txt = 16, 8
    return dict(
        hidden_states=torch.randn(1, n_img, cfg.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(1, n_txt, cfg.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3), return_dict=False,
    )


def _out(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs)[0]


@pytest.fixture
def pipe(tiny_flux):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)


def test_unwrap_model_strips_wrappers():
    from fluxkit.weights.lora import unwrap_model

    model = torch.nn.Linear(2, 2)
    assert unwrap_model(model) is model
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(torch.compile(torch.nn.DataParallel(model))) is model


def test_state_dict_is_a_cast_copy_and_live_model_untouched(pipe):
    from fluxkit.weights.lora import lora_state_dict

    transformer = _with_lora(pipe.transformer, TRANSFORMER_TARGETS).to(torch.bfloat16)
    state = lora_state_dict(torch.nn.DataParallel(transformer), dtype=torch.float32)
    assert state and all("lora" in k and not k.startswith("module.") for k in state)
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}, "live model must stay bf16"
    key = next(k for k in state if "lora_B" in k)
    before = dict(transformer.named_parameters())[key.replace(".weight", ".default.weight")].detach().clone()
    state[key].add_(1.0)
    after = dict(transformer.named_parameters())[key.replace(".weight", ".default.weight")]
    assert torch.equal(before, after), "the returned state must not alias the model"


def test_save_writes_diffusers_format_with_rank_and_alpha(pipe, tmp_path):
    from safetensors import safe_open

    from fluxkit.weights.lora import save_lora

    _with_lora(pipe.transformer, TRANSFORMER_TARGETS, r=4, alpha=8)
    _with_lora(pipe.text_encoder, CLIP_TARGETS, r=2, alpha=1)
    path = save_lora(str(tmp_path), pipe.transformer, pipe.text_encoder, dtype=torch.float16)
    assert path == str(tmp_path / "pytorch_lora_weights.safetensors")
    assert os.listdir(tmp_path) == ["pytorch_lora_weights.safetensors"], "no partial files left behind"
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    assert all("lora" in k and k.split(".")[0] in ("transformer", "text_encoder") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("transformer.") for k in keys)
    assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (4, 8)
    assert (meta["text_encoder.r"], meta["text_encoder.lora_alpha"]) == (2, 1)


def test_flux_pipeline_loads_saved_lora_with_its_scale(tiny_flux, pipe, tmp_path):
    """alpha != rank: if the metadata were dropped diffusers would assume alpha = rank and the outputs would differ."""
    from diffusers import FluxPipeline

    from fluxkit.weights.lora import save_lora

    inputs = _transformer_inputs(pipe.transformer)
    base = _out(pipe.transformer, inputs)
    ids = pipe.tokenizer(["a photo of sks dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        text_base = pipe.text_encoder(ids).last_hidden_state
    _with_lora(pipe.transformer, TRANSFORMER_TARGETS, r=4, alpha=16)
    _with_lora(pipe.text_encoder, CLIP_TARGETS, r=2, alpha=8)
    tuned = _out(pipe.transformer, inputs)
    with torch.no_grad():
        text_tuned = pipe.text_encoder(ids).last_hidden_state
    save_lora(str(tmp_path), pipe.transformer, pipe.text_encoder)

    fresh = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    fresh.load_lora_weights(str(tmp_path))
    loaded = _out(fresh.transformer, inputs)
    with torch.no_grad():
        text_loaded = fresh.text_encoder(ids).last_hidden_state
    assert (tuned - base).abs().max() > 1e-2
    torch.testing.assert_close(loaded, tuned, rtol=1e-4, atol=1e-5)
    assert (text_tuned - text_base).abs().max() > 1e-2
    torch.testing.assert_close(text_loaded, text_tuned, rtol=1e-4, atol=1e-5)


def test_load_lora_restores_weights_and_rejects_mismatches(pipe, tiny_flux, tmp_path):
    from diffusers import FluxTransformer2DModel

    from fluxkit.shared.errors import UserError
    from fluxkit.weights.lora import load_lora, save_lora

    _with_lora(pipe.transformer, TRANSFORMER_TARGETS, r=4, alpha=8, seed=1)
    inputs = _transformer_inputs(pipe.transformer)
    save_lora(str(tmp_path), pipe.transformer)

    other = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    _with_lora(other, TRANSFORMER_TARGETS, r=4, alpha=8, seed=2)
    assert not torch.allclose(_out(other, inputs), _out(pipe.transformer, inputs))
    load_lora(str(tmp_path), other)
    torch.testing.assert_close(_out(other, inputs), _out(pipe.transformer, inputs))

    wrong_rank = _with_lora(FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer"), TRANSFORMER_TARGETS, r=2)
    with pytest.raises(UserError, match="r=4"):
        load_lora(str(tmp_path), wrong_rank)
    with pytest.raises(UserError, match="not found"):
        load_lora(str(tmp_path / "nowhere"), other)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pytorch_lora_weights.safetensors").write_text("not safetensors")
    with pytest.raises(UserError, match="cannot be read"):
        load_lora(str(tmp_path / "bad"), other)
    with pytest.raises(UserError, match="no LoRA adapter"):
        save_lora(str(tmp_path / "none"), FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer"))
    assert not (tmp_path / "none").exists() or not os.listdir(tmp_path / "none")


def test_hooks_with_plain_accelerate_replace_full_model_file(pipe, tmp_path):
    from accelerate import Accelerator

    from fluxkit.weights.lora import lora_save_load_hooks

    transformer = _with_lora(pipe.transformer, TRANSFORMER_TARGETS)
    acc = Accelerator(cpu=True)
    prepared = acc.prepare(transformer)
    save_hook, load_hook = lora_save_load_hooks(acc, prepared, dtype=torch.float32)
    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)
    inputs = _transformer_inputs(transformer)
    expected = _out(transformer, inputs)
    acc.save_state(str(tmp_path / "checkpoint-1"))
    files = os.listdir(tmp_path / "checkpoint-1")
    assert "pytorch_lora_weights.safetensors" in files
    assert not any(f.startswith("model") for f in files), files
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.zero_()
    assert not torch.allclose(_out(transformer, inputs), expected)
    acc.load_state(str(tmp_path / "checkpoint-1"))
    torch.testing.assert_close(_out(transformer, inputs), expected)


@pytest.mark.multiproc
def test_hooks_under_deepspeed_two_processes(tiny_flux, tmp_path):
    """Both ranks call save_state (no hang), rank 0 writes a clean file, resume loads it back."""
    from diffusers import FluxPipeline

    out = tmp_path / "run"
    script = os.path.join(ROOT, "tests", "fixtures", "lora_hooks_deepspeed.py")
    proc = accelerate_launch([script, tiny_flux, str(out)], num_processes=2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["num_processes"] == 2 and result["distributed_type"].endswith("DEEPSPEED")
    assert result["resumed_equal"] is True
    ckpt = out / "checkpoint-2"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.endswith(".safetensors")) == ["pytorch_lora_weights.safetensors"]

    base = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    inputs = _transformer_inputs(base.transformer)
    before = _out(base.transformer, inputs)
    base.load_lora_weights(str(ckpt))
    after = _out(base.transformer, inputs)
    assert (after - before).abs().max() > 1e-3, "trained LoRA must change the output"
