"""infer_flux_text2img_distrib.py's main, recording what context parallelism must change and what it must not.

    accelerate launch ... tests/scripts/infer_recorded.py RECORD_DIR [SCRIPT FLAGS]

Each rank writes RECORD_DIR/rank<R>.npz: the token counts (image, text) the first double-stream
block saw per call, and the latents each pipeline call handed to the VAE (float, before the
8-bit PNG rounding). The same recorder runs in-process for single-process references (install()).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def install():
    """Wrap the first FLUX block and the VAE decoder; returns the lists they fill."""
    from diffusers import AutoencoderKL
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    seen, latents = [], []
    block_forward, decode = FluxTransformerBlock.forward, AutoencoderKL.decode

    def forward(self, hidden_states, encoder_hidden_states, *args, **kwargs):
        seen.append((hidden_states.shape[1], encoder_hidden_states.shape[1]))
        return block_forward(self, hidden_states, encoder_hidden_states, *args, **kwargs)

    def vae_decode(self, z, *args, **kwargs):
        latents.append(z.detach().float().cpu().numpy())
        return decode(self, z, *args, **kwargs)

    FluxTransformerBlock.forward, AutoencoderKL.decode = forward, vae_decode

    def uninstall():
        FluxTransformerBlock.forward, AutoencoderKL.decode = block_forward, decode

    return seen, latents, uninstall


def save(path, seen, latents):
    np.savez(path, seen=np.array(seen, dtype=np.int64).reshape(-1, 2),
             latents=np.concatenate(latents) if latents else np.zeros((0,)))


if __name__ == "__main__":
    from fluxkit.shared.errors import cli
    from fluxkit.inference.args import DISTRIB
    from fluxkit.inference.run import main

    record_dir, argv = sys.argv[1], sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    seen, latents, _ = install()
    rc = cli(main)(DISTRIB, argv)
    save(os.path.join(record_dir, f"rank{rank}.npz"), seen, latents)
    sys.exit(rc)
