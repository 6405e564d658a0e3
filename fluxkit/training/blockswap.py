"""--blocks_to_swap N (kohya's name): the last N transformer blocks keep their frozen weights in host
memory and visit the device only while they run.

The frozen weights of a swapped block (LoRA's base layers, quantized or not) live in host memory
(pinned on an accelerator); on the device each such parameter holds an empty placeholder. A
forward pre-hook on the block brings its weights in just before it runs and sends back the block
that ran before it, so at most VISITING swapped blocks are on the device at a time: the one that
runs and, on an accelerator, the next one, copied in on a side stream while the current one
computes (prefetch, in the direction the blocks are being visited: forward order during the
forward pass, reverse order while gradient checkpointing recomputes them in the backward pass).
The trained LoRA weights, their gradients and optimizer states never move.

Gradient checkpointing is required: without it autograd would keep every block's weights alive
for the backward pass, so nothing would leave the device. The full fine-tune is refused (every
weight trains; DeepSpeed ZeRO-3 with CPU offload is its rung), and so is DeepSpeed (its engine
owns the module's placement). On a CPU the host is the device: the weights stay where they are,
but the placeholders and the count of visiting blocks work the same, so the mechanism is tested.

Each optimizer step records how many blocks were on the device at most (`resident_blocks`):
(blocks - N) that never leave, plus the visiting ones.
"""

from __future__ import annotations

import torch

from ..shared.errors import UserError

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # in forward order
ATTRIBUTE = "_fluxkit_blockswap"  # where the transformer keeps its BlockSwap


def check_flags(args) -> None:
    """Refuse, in one line, what block swapping cannot serve."""
    n = args.blocks_to_swap
    if n < 0:
        raise UserError(f"--blocks_to_swap {n} must be 0 or more")
    if not args.lora:
        raise UserError(f"--blocks_to_swap {n} swaps frozen weights, and a full fine-tune trains every weight; for the "
                        "full fine-tune use DeepSpeed ZeRO-3 with CPU offload (pretrain_bf16_zero3_offload_accelerate_config.yaml)")
    if not args.gradient_checkpointing:
        raise UserError(f"--blocks_to_swap {n} needs --gradient_checkpointing (backward would otherwise keep every "
                        "block's weights alive on the device); add it")


def check_launch(args, deepspeed: bool, model_dir: str) -> None:
    """Refusals that need the launch (DeepSpeed) or the model (its block count, from its config)."""
    import json
    import os

    n = args.blocks_to_swap
    if not n:
        return
    try:
        with open(os.path.join(model_dir, "transformer", "config.json")) as f:
            config = json.load(f)
        blocks = int(config["num_layers"]) + int(config["num_single_layers"])
    except (OSError, ValueError, KeyError):
        return  # not a FLUX.1 folder layout: place() checks against the loaded model
    if deepspeed:
        raise UserError(f"--blocks_to_swap {n} cannot run under DeepSpeed (its engine places the whole module on the "
                        "device); launch without a DeepSpeed config, or use ZeRO-3 with CPU offload "
                        "(pretrain_bf16_zero3_offload_accelerate_config.yaml)")
    if n > blocks - 1:
        raise UserError(f"--blocks_to_swap {n} leaves no block on the device: this transformer has {blocks} blocks; "
                        f"give at most {blocks - 1}")


def blocks_of(transformer) -> list:
    return [b for name in BLOCK_LISTS for b in getattr(transformer, name)]


class BlockSwap:
    """Hooks that keep the frozen weights of `swapped` blocks in host memory between their visits."""

    def __init__(self, blocks: list, n: int, device: torch.device):
        self.device = torch.device(device)
        self.total, self.n = len(blocks), n
        self.swapped = blocks[len(blocks) - n:]
        self.host_is_device = self.device.type == "cpu"
        self.visiting_limit = 1 if self.host_is_device else 2
        self.backend = None if self.host_is_device else getattr(torch, self.device.type)  # torch.cuda, torch.npu
        self.stream = None if self.host_is_device else self.backend.Stream(device=self.device)
        self.frozen = [[p for p in b.parameters() if not p.requires_grad] for b in self.swapped]
        self.host = [[_to_host(p.data, pin=not self.host_is_device) for p in ps] for ps in self.frozen]
        self.visiting: list[int] = []  # swapped block indexes on the device, oldest first
        self.pending: dict[int, object] = {}  # index -> copy-stream event of a prefetch
        self.last = -1
        self.step_max = 0
        for i in range(n):
            self._leave(i)
        self.handles = [b.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(self.swapped)]

    # ------------------------------------------------------------------ moving
    def _arrive(self, i: int) -> None:
        for p, h in zip(self.frozen[i], self.host[i]):
            p.data = h if self.host_is_device else h.to(self.device, non_blocking=True)

    def _leave(self, i: int) -> None:
        for p, h in zip(self.frozen[i], self.host[i]):
            p.data = torch.empty(0, dtype=h.dtype, device=self.device)

    def _hook(self, i: int):
        def visit(module, args):
            self.fetch(i)
        return visit

    def fetch(self, i: int) -> None:
        """Block i on the device before it runs; the oldest visitor leaves when too many are there."""
        direction = 1 if i >= self.last else -1
        self.last = i
        if i in self.pending:
            current = self.backend.current_stream(self.device)
            current.wait_event(self.pending.pop(i))
            for p in self.frozen[i]:
                p.data.record_stream(current)  # made on the side stream, used on this one
        elif i not in self.visiting:
            self._arrive(i)
            self.visiting.append(i)
        self._make_room(keep=i)
        nxt = i + direction
        if self.stream is not None and 0 <= nxt < self.n and nxt not in self.visiting:
            self._make_room(keep=i, room_for=1)
            with self.backend.stream(self.stream):
                self._arrive(nxt)
                self.pending[nxt] = self.stream.record_event()
            self.visiting.append(nxt)
        self.step_max = max(self.step_max, len(self.visiting))

    def _make_room(self, keep: int, room_for: int = 0) -> None:
        while len(self.visiting) + room_for > self.visiting_limit:
            old = next(j for j in self.visiting if j != keep)
            self.visiting.remove(old)
            self.pending.pop(old, None)
            self._leave(old)

    # ------------------------------------------------------------------ records
    def resident_blocks(self) -> int:
        """Blocks on the device at most since the last call: (blocks - N) + the visiting ones."""
        count, self.step_max = self.total - self.n + self.step_max, len(self.visiting)
        return count

    def promise(self) -> int:
        return self.total - self.n + self.visiting_limit


def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A host copy (pinned on an accelerator host, for asynchronous copies); on a CPU device the tensor itself."""
    if not pin:
        return t.detach()
    return t.detach().to("cpu").pin_memory()


def place(args, transformer, device) -> BlockSwap | None:
    """Move the transformer to `device`, keeping the frozen weights of the last --blocks_to_swap blocks
    in host memory behind hooks (they never reach the device whole). None without the flag."""
    n = args.blocks_to_swap
    if not n:
        transformer.to(device)
        return None
    blocks = blocks_of(transformer)
    if n > len(blocks) - 1:
        raise UserError(f"--blocks_to_swap {n} leaves no block on the device: this transformer has {len(blocks)} "
                        f"blocks; give at most {len(blocks) - 1}")
    swapped = blocks[len(blocks) - n:]
    # everything but the swapped blocks moves the library's own way (module.to: quantized tensors
    # and their quantization state move with their weights)
    for name, child in transformer.named_children():
        for module in (child if name in BLOCK_LISTS else [child]):
            if not any(module is b for b in swapped):
                module.to(device)
    for block in swapped:  # of a swapped block only what trains (LoRA) and its buffers go now
        for p in block.parameters():
            if p.requires_grad:
                p.data = p.data.to(device)
            elif getattr(p, "quant_state", None) is not None:
                p.quant_state.to(device)  # bitsandbytes' absmax etc.: small, stays on the device
        for b in block.buffers():
            b.data = b.data.to(device)
    swap = BlockSwap(blocks, n, device)
    setattr(transformer, ATTRIBUTE, swap)
    return swap


def step_record(transformer) -> dict:
    """What the step log records for block swapping (nothing without it)."""
    from ..weights.lora import unwrap_model

    swap = getattr(unwrap_model(transformer), ATTRIBUTE, None)
    return {} if swap is None else {"resident_blocks": swap.resident_blocks(), "blocks_promised": swap.promise()}
