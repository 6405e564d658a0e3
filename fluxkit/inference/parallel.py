"""How an inference run spreads over processes: the grid, the attention backend, context parallelism.

N processes (from `accelerate launch --multi_gpu --num_processes N`) form a grid of N / (U * R)
data-parallel groups of U * R processes each (U = --ulysses_degree, R = --ring_degree, xDiT's
names). Every group renders its own share of the (prompt, seed) pairs; inside a group one image is
split over its U * R processes by diffusers' context parallelism (`ContextParallelConfig` and
`transformer.enable_parallelism`): the transformer's image and text tokens are cut along the
sequence, Ulysses exchanges heads for tokens with all-to-all around attention, ring attention
passes key/value blocks round the group. Every member of a group runs the same pipeline call with
the same generators, so each ends with the whole image; the group's first member writes it.

Ranks are laid out group-major: rank = group * U * R + ring_index * U + ulysses_index, the layout
of the device mesh ("data", "ring", "ulysses") handed to diffusers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..shared.errors import UserError

# Attention backends whose kernels return no log-sum-exp, which ring attention needs to merge the
# partial results of its key/value blocks (diffusers 0.42 raises "... does not support return_lse"
# for these once a ring is asked for).
NO_RING_BACKENDS = frozenset({"native", "_native_npu", "_native_efficient", "_native_math", "_native_xla",
                              "xformers", "sage_varlen"})
LAUNCH_HINT = "accelerate launch --multi_gpu --num_processes {n} SCRIPT ..."


@dataclass(frozen=True)
class Grid:
    processes: int
    ulysses: int = 1
    ring: int = 1

    @property
    def group_size(self) -> int:
        """Processes that share one image."""
        return self.ulysses * self.ring

    @property
    def groups(self) -> int:
        """Data-parallel groups, each rendering its own share of the images."""
        return self.processes // self.group_size

    def place(self, rank: int) -> tuple[int, int]:
        """(data-parallel group, member within the group) of a rank."""
        return divmod(rank, self.group_size)

    def describe(self) -> str:
        return f"{self.groups} data-parallel x ulysses {self.ulysses} x ring {self.ring}"

    def as_dict(self) -> dict:
        return {"data_parallel": self.groups, "ulysses_degree": self.ulysses, "ring_degree": self.ring}


def world_size() -> int:
    """Processes of this launch as torchrun/accelerate set them (1 for a plain `python` run)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def plan_grid(processes: int, ulysses: int, ring: int) -> Grid:
    size = ulysses * ring
    if processes % size:
        if processes == 1:
            raise UserError(f"--ulysses_degree {ulysses} --ring_degree {ring} split each image over {size} processes but "
                            f"this run has one; launch it with {LAUNCH_HINT.format(n=size)} (or a multiple of {size})")
        raise UserError(f"--ulysses_degree {ulysses} x --ring_degree {ring} = {size} does not divide the {processes} "
                        f"processes of this launch; launch a multiple of {size} processes or choose degrees whose "
                        f"product divides {processes}")
    return Grid(processes, ulysses, ring)


def choose_attention_backend(requested: str, device_type: str, npu_fused: bool, grid: Grid) -> str:
    """The diffusers attention backend for this device and grid; a UserError for a bad combination.

    auto: torch's SDPA ("native") on CPU and CUDA, torch_npu's fused kernel ("_native_npu") on Ascend
    unless --no-npu_flash_attention. Anything else (flash, _native_cudnn, sage, ...) only when asked.
    """
    from diffusers.models import attention_dispatch as dispatch

    if requested == "auto":
        return "_native_npu" if device_type == "npu" and npu_fused else "native"
    known = sorted(b.value for b in dispatch.AttentionBackendName)
    if requested not in known:
        raise UserError(f"--attention_backend {requested!r} is not a diffusers attention backend; use auto or one of "
                        f"{', '.join(known)}")
    try:
        dispatch._check_attention_backend_requirements(dispatch.AttentionBackendName(requested))
    except (RuntimeError, ImportError) as err:
        raise UserError(f"--attention_backend {requested} cannot run here: {str(err).splitlines()[0]}") from None
    if grid.group_size > 1:
        supports = getattr(dispatch._AttentionBackendRegistry, "_supports_context_parallel", None)
        if supports is not None and requested not in supports:
            raise UserError(f"--attention_backend {requested} does not support context parallelism "
                            f"(--ulysses_degree/--ring_degree); use one of {', '.join(sorted(supports))}")
    return requested


def check_backend_for_grid(backend: str, grid: Grid) -> None:
    if grid.ring > 1 and backend in NO_RING_BACKENDS:
        raise UserError(f"--ring_degree {grid.ring} needs an attention backend that returns log-sum-exp, and {backend} "
                        f"does not; use --ulysses_degree {grid.group_size} instead, or --attention_backend flash "
                        f"(CUDA with flash-attn) or _native_cudnn (CUDA)")


def check_sequence_split(pipe, grid: Grid, height: int, width: int, max_sequence_length: int,
                         references: list = ()) -> None:
    """Ulysses hands each process a share of the heads, and both modes a share of the tokens: both
    must divide evenly (checked on the loaded model, before any image is rendered). Editing
    families append a reference image's tokens to the image tokens (references: their (width,
    height) sizes; the pipelines patchify them at their own size, up to 1 MP), so the sum must divide."""
    if grid.group_size == 1:
        return
    heads = pipe.transformer.config.num_attention_heads
    if heads % grid.ulysses:
        raise UserError(f"--ulysses_degree {grid.ulysses} does not divide this model's {heads} attention heads; "
                        f"choose a divisor of {heads}")
    patch = pipe.vae_scale_factor * 2
    image_tokens = (height // patch) * (width // patch)
    counts = [("image tokens (--height x --width)", image_tokens)]
    counts += [(f"image tokens (--height x --width, plus a {w}x{h} reference image's {(w // patch) * (h // patch)})",
                image_tokens + (w // patch) * (h // patch)) for w, h in references]
    for what, tokens in counts + [("text tokens (--max_sequence_length)", max_sequence_length)]:
        if tokens % grid.group_size:
            raise UserError(f"{tokens} {what} cannot be split evenly over {grid.group_size} processes "
                            f"(--ulysses_degree x --ring_degree); choose sizes whose token count is a multiple of "
                            f"{grid.group_size}")


def enable_context_parallel(transformer, grid: Grid, backend: str, device_type: str) -> list:
    """Split the transformer's attention over each group's processes (only the backend for groups
    of one). Returns the runtime patches it asked for as (name, applied, why)."""
    import torch
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from ..upstream import patches

    transformer.set_attention_backend(backend)
    if grid.group_size == 1:
        return []
    applied = patches.apply(["context-parallel-cpu-device"])
    # One mesh over all processes: diffusers takes the ("ring", "ulysses") part for this rank's group.
    mesh = init_device_mesh(device_type, (grid.groups, grid.ring, grid.ulysses),
                            mesh_dim_names=("data", "ring", "ulysses"))
    with torch.no_grad():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=grid.ulysses, ring_degree=grid.ring,
                                                                    mesh=mesh))
    return applied


def distributed_state(device_type: str):
    from accelerate import PartialState

    if device_type == "cpu":
        # Without an accelerator, several processes talk over gloo.
        return PartialState(cpu=True, **({"backend": "gloo"} if world_size() > 1 else {}))
    return PartialState()


# ---------------------------------------------------------------- launches that start fewer processes

_NUM_PROCESSES_FLAG = re.compile(r"^--num[_-]processes(?:=(\d+))?$")
_CONFIG_FLAG = re.compile(r"^--config[_-]file(?:=(.+))?$")


def _launcher_argv() -> list[str] | None:
    """The `accelerate launch` command line that started this process, when its parent is one."""
    if not any(k.startswith("ACCELERATE_") for k in os.environ):
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:  # not Linux, or the parent is gone
        return None
    # `accelerate launch ...` or `python -m accelerate.commands.launch ...`
    starts = [i for i, a in enumerate(argv) if a == "launch" or a.endswith("accelerate.commands.launch")]
    return argv[starts[0] + 1:] if starts else None


def _value_after(argv: list[str], pattern: re.Pattern) -> str | None:
    for i, arg in enumerate(argv):
        m = pattern.match(arg)
        if m:
            return m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def processes_asked(argv: list[str]) -> int | None:
    """How many processes an `accelerate launch` command line asks for (its flag, else its config)."""
    flag = _value_after(argv, _NUM_PROCESSES_FLAG)
    if flag and flag.isdigit():
        return int(flag)
    config = _value_after(argv, _CONFIG_FLAG)
    if config is None:
        try:
            from accelerate.commands.config import default_config_file as config
        except ImportError:
            return None
    try:
        import yaml

        with open(config, encoding="utf-8") as f:
            value = (yaml.safe_load(f) or {}).get("num_processes")
    except (OSError, ValueError, AttributeError, ImportError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def launch_shortfall(processes: int, device_type: str, device_count: int) -> str | None:
    """Why this launch runs fewer processes than it was asked for (or than the devices here), or None."""
    argv = _launcher_argv()
    asked = processes_asked(argv) if argv else None
    if asked and asked > processes:
        return (f"accelerate launch was asked for {asked} processes but started {processes}: without --multi_gpu "
                f"(or a config with distributed_type MULTI_GPU) it starts one; on CPU, GPU and NPU alike use "
                f"{LAUNCH_HINT.format(n=asked)}")
    if device_type != "cpu" and device_count > processes:
        return (f"{processes} process(es) for {device_count} {device_type} devices: the others stay idle; "
                f"{LAUNCH_HINT.format(n=device_count)} uses them all")
    return None

