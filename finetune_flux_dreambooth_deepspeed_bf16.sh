#!/usr/bin/env bash
# Full DreamBooth fine-tune of FLUX.1 with DeepSpeed ZeRO-2 bf16 (accelerate), on NPU, GPU or CPU.
# Defaults are the reference's (fluxkit/launch/spec.py, LAUNCHERS["full"]); every one is a --key=value
# override. Run with --help.
set -euo pipefail
FK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FK_PYTHON="${PYTHON:-python3}"
if ! command -v "$FK_PYTHON" >/dev/null; then
    echo "$(basename "$0"): error: '$FK_PYTHON' not found; activate the toolkit's environment or set PYTHON=/path/to/python" >&2
    exit 2
fi
# fluxkit is imported by the launcher, the trainers and patch_flux wherever the caller stands
export PYTHONPATH="$FK_ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$FK_PYTHON" -m fluxkit.launch --launcher full "$0" "$@"
