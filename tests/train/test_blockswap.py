"""--blocks_to_swap (fluxkit.training.blockswap): swapped blocks' frozen weights are placeholders on the device
except while they run; the losses and the LoRA equal those of the run without it (bit for bit in
fp32) on unquantized, NF4 and int8 bases; a run killed and resumed across it equals the uninterrupted
one; each step records how many blocks were on the device, which is what the flag promises; what it
cannot serve is refused in one line."""

import dataclasses
import sys

import pytest
import torch

from conftest import assert_user_error, run_entry_inprocess as train_inprocess, run_inprocess, run_script, trainer_args
from test_reliability import LORA, assert_bit_identical, log_lines, weights
from test_train_guards import run_chain

BLOCKS, SWAP = 5, 3  # 2 double-stream + 3 single-stream blocks; the last 3 are swapped


@pytest.fixture(scope="module")
def five_blocks(tmp_path_factory):
    from fluxkit.tiny.build import PRESETS, _transformer, build_pipeline

    tiny = PRESETS["tiny"]
    preset = dataclasses.replace(tiny, name="tiny5", transformer=_transformer(16, 2, 3, 16, 2, 32, 32, (4, 6, 6)))
    return build_pipeline(str(tmp_path_factory.mktemp("models") / "tiny5"), preset, seed=0)


def test_swapped_weights_visit_one_block_at_a_time(five_blocks):
    from argparse import Namespace

    from diffusers import FluxTransformer2DModel

    from fluxkit.training.blockswap import blocks_of, place

    t = FluxTransformer2DModel.from_pretrained(five_blocks, subfolder="transformer").requires_grad_(False)
    swap = place(Namespace(blocks_to_swap=SWAP), t, torch.device("cpu"))
    blocks = blocks_of(t)
    on_device = lambda: [i for i, b in enumerate(blocks) if all(p.numel() for p in b.parameters())]  # noqa: E731
    assert on_device() == [0, 1]  # the swapped ones hold empty placeholders
    seen = []
    for b in blocks:
        b.register_forward_hook(lambda m, a, o: seen.append(on_device()))
    c = t.config
    t(hidden_states=torch.randn(1, 16, c.in_channels), encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim),
      pooled_projections=torch.randn(1, c.pooled_projection_dim), timestep=torch.rand(1), guidance=torch.ones(1),
      img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    assert seen == [[0, 1], [0, 1], [0, 1, 2], [0, 1, 3], [0, 1, 4]]
    assert swap.resident_blocks() == BLOCKS - SWAP + 1 == swap.promise()


def _run(model, data, out, steps=3, **extra):
    args = trainer_args(model, data, out, steps=steps, gradient_checkpointing=True, checkpointing_steps=2, **extra)
    assert train_inprocess(LORA, args) == 0
    return [(r["step"], r["loss"]) for r in log_lines(out)], weights(out, LORA)


@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
def test_same_losses_and_lora_as_without_it(five_blocks, sample_data, tmp_path, quantization):
    extra = {} if quantization == "none" else {"base_quantization": quantization}
    plain_losses, plain_lora = _run(five_blocks, sample_data, tmp_path / "plain", **extra)
    swap_losses, swap_lora = _run(five_blocks, sample_data, tmp_path / "swap", blocks_to_swap=SWAP, **extra)
    assert swap_losses == plain_losses  # fp32 (the trainer's default precision): bit for bit
    assert_bit_identical(swap_lora, plain_lora)
    records = log_lines(tmp_path / "swap")
    assert {(r["resident_blocks"], r["blocks_promised"]) for r in records} == {(BLOCKS - SWAP + 1, BLOCKS - SWAP + 1)}
    assert "resident_blocks" not in log_lines(tmp_path / "plain")[0]


@pytest.mark.cli
def test_kill_and_resume_across_it(five_blocks, sample_data, tmp_path):
    reference, out, left = run_chain(five_blocks, sample_data, tmp_path, 4, kills=[3], checkpointing_steps=2,
                                     gradient_checkpointing=True, blocks_to_swap=SWAP)
    assert left == [["checkpoint-2"]]
    assert [(r["step"], r["loss"]) for r in log_lines(out)] == [(r["step"], r["loss"]) for r in log_lines(reference)]
    assert_bit_identical(weights(out, LORA), weights(reference, LORA))


@pytest.mark.parametrize("script,flags,needle", [
    ("train_flux_dreambooth.py", ["--blocks_to_swap", "2", "--gradient_checkpointing"], "ZeRO-3 with CPU offload"),
    (LORA, ["--blocks_to_swap", "2"], "needs --gradient_checkpointing"),
    (LORA, ["--blocks_to_swap", "5", "--gradient_checkpointing"], "give at most 4"),
    (LORA, ["--blocks_to_swap", "-1"], "must be 0 or more"),
])
def test_refusals_are_one_line(five_blocks, sample_data, tmp_path, script, flags, needle):
    proc = run_inprocess([sys.executable, script, *trainer_args(five_blocks, sample_data, tmp_path / "out", steps=1), *flags])
    assert_user_error(proc, "--blocks_to_swap", needle)
    assert not (tmp_path / "out").exists()


def test_refused_under_deepspeed(five_blocks, monkeypatch):
    from argparse import Namespace

    from fluxkit.training.blockswap import check_launch
    from fluxkit.shared.errors import UserError

    with pytest.raises(UserError, match="cannot run under DeepSpeed.*zero3_offload"):
        check_launch(Namespace(blocks_to_swap=2), True, five_blocks)
