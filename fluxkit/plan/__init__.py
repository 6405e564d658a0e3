"""Memory plan: the per-device memory of a configured training run, phase by phase, before
anything loads.

    python -m fluxkit.plan --pretrained_model_name_or_path DIR [--lora] [trainer flags]
                           [--num_processes N] [--zero_stage 0|2|3] [--zero_offload] [--warm_cache]
                           [--device_memory_gb G] [--json FILE]
    python -m fluxkit.plan.where        the "what fits where" table (docs/memory.md)

The parts:
    architecture  the model as numbers (parameter counts, nn.Linear shapes, blocks), from configs
    shape         the run as numbers (RunShape), from the trainer's flags and the launch
    terms         one named function per thing that takes memory, each unit-tested
    phases        the run's phases (encode, load, train, validate, save) and what each holds on
                  the device, host memory per process beside it; the peak is the largest phase
    fit           the fit check of the launchers and trainers, and the smallest change that fits
    calibrate     measures the activation constants again (--calibrate)
    where         the table of FLUX.1-dev runs on common cards, with published measurements

Library workspace (cuBLAS, the CUDA context, allocator fragmentation) is not counted: the fit
check keeps HEADROOM_FRACTION of the device.
"""

from .architecture import Architecture, lora_parameter_count, quantized_linear_bytes, read_architecture
from .calibrate import measure_activation_constants
from .cli import PlanRequest, build_parser, main, parse
from .fit import (accelerate_offload, check_fits, device_memory_bytes, launched_offload, launched_zero_stage, remedies,
                  smallest_change, text_on_host)
from .phases import GiB, HEADROOM_FRACTION, Phase, Plan, plan_memory, plan_shape
from .shape import RunShape, shape_from_args
from .terms import ACTIVATION_CONSTANTS, CPU_DEEPSPEED_BYTES, Item

__all__ = ["ACTIVATION_CONSTANTS", "accelerate_offload", "Architecture", "CPU_DEEPSPEED_BYTES", "GiB", "HEADROOM_FRACTION",
           "Item", "Phase", "Plan", "PlanRequest", "RunShape", "build_parser", "check_fits", "device_memory_bytes", "launched_offload",
           "launched_zero_stage", "lora_parameter_count", "main", "measure_activation_constants", "parse", "plan_memory",
           "plan_shape", "quantized_linear_bytes", "read_architecture", "remedies", "shape_from_args", "smallest_change", "text_on_host"]
