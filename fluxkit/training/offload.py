"""--offload_encoders: the frozen text encoders and the VAE live in host memory and visit the
device only while they encode.

FLUX.1-dev's T5-XXL alone is 9.5 GB in bf16; a run whose latents and text embeddings are all
cached after the first epoch does not need it on the device afterwards, and a run that cannot
cache everything up front (many captions, --no_cache) needs it only for the moments it encodes.
The price is the transfer on every visit (host-to-device copies of the encoder weights), paid
only when the cache misses. A CLIP that trains (--train_text_encoder) is no encoder to offload:
it stays on the device with the transformer.
"""

from __future__ import annotations

import contextlib


def frozen_encoders(args, m) -> list:
    """The modules --offload_encoders keeps in host memory (m: the run's Models)."""
    found = [m.vae, m.text_encoder_2] + ([] if args.train_text_encoder else [m.text_encoder])
    return [mod for mod in found if mod is not None]  # text encoders are None once the cache holds all they make


def resident(args, m) -> list:
    """The modules that live on the device for the whole run."""
    away = frozen_encoders(args, m) if args.offload_encoders else []
    return [mod for mod in (m.vae, m.text_encoder_2, m.text_encoder, m.transformer)
            if mod is not None and not any(mod is a for a in away)]


def text_encoders(m) -> list:
    return [mod for mod in (m.text_encoder_2, m.text_encoder) if mod is not None]


@contextlib.contextmanager
def encoders_visiting(args, m, device, text: bool = True):
    """With --offload_encoders, the frozen encoders on `device` for the duration and back in host
    memory after it (also when encoding fails); without it they already live on `device`. text=False:
    the text encoders stay in host memory (they encode there: fluxkit.training.train.encode_phase)."""
    if not args.offload_encoders:
        yield
        return
    visitors = [mod for mod in frozen_encoders(args, m) if text or not any(mod is t for t in text_encoders(m))]
    for mod in visitors:
        mod.to(device)
    try:
        yield
    finally:
        for mod in visitors:
            mod.to("cpu")


def add_flags(g) -> None:
    g.add_argument("--offload_encoders", action="store_true",
                   help="(ours) keep the frozen text encoders and the VAE in host memory; they visit the device only while encoding")
