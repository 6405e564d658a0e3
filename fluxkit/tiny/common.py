"""What every tiny FLUX builder shares (fluxkit.tiny.build for FLUX.1/Kontext, fluxkit.tiny.flux2 for
FLUX.2 [klein]): the VAE config, FLUX's scheduler config and the corpus tokenizers are trained on."""

from __future__ import annotations

import random


def _vae(block_out_channels, latent_channels, groups, layers_per_block=1, scaling=0.3611, shift=0.1159):
    n = len(block_out_channels)
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
        latent_channels=latent_channels, norm_num_groups=groups, act_fn="silu",
        sample_size=1024, scaling_factor=scaling, shift_factor=shift,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
    )


SCHEDULER_CONFIG = dict(  # FLUX.1-dev's flow-matching scheduler
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)

_WORDS = (
    "a photo of sks dog cat bird person face toy car house tree flower mountain river city street "
    "red green blue yellow black white orange purple pink brown gray small big tiny large cute old new "
    "sitting standing running flying on in the with and at by near under over of painting drawing "
    "style portrait landscape close up picture image render cartoon pokemon creature monster dragon "
    "sunset beach forest snow night day light dark bright colorful simple detailed high quality"
).split()


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(3, 12))) for _ in range(n)] + [" ".join(_WORDS)]
