"""The in-memory cache of a training run: VAE latent distributions per sample, text embeddings
per prompt. It knows nothing of models: callers pass the function that encodes what is missing.

Keys are sample indices (class samples have negative keys) and prompt strings, never step
numbers, so a shuffled loader can never pair a caption with another image's latents. Filling on
first use spreads the encoding over the first epoch and over processes.
"""

from __future__ import annotations

from typing import Callable

import torch

TensorPair = tuple[torch.Tensor, torch.Tensor]


class Cache:
    """latent_moments(keys, pixels, encode) and text_embeddings(prompts, encode); off = encode every time."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.latents: dict[int, TensorPair] = {}
        self.text: dict[str, TensorPair] = {}

    def latent_moments(self, keys: list[int], pixels: torch.Tensor, encode: Callable[[torch.Tensor], TensorPair]) -> TensorPair:
        """(mean, logvar) for each sample key; encode(pixels of the missing ones) -> (mean, logvar)."""
        missing = [i for i, k in enumerate(keys) if k not in self.latents] if self.enabled else list(range(len(keys)))
        fresh = {}
        if missing:
            with torch.no_grad():
                mean, logvar = encode(pixels[missing])
            for j, i in enumerate(missing):
                fresh[i] = (mean[j], logvar[j])
                if self.enabled:
                    self.latents[keys[i]] = fresh[i]
        pairs = [fresh[i] if i in fresh else self.latents[k] for i, k in enumerate(keys)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def text_embeddings(self, prompts: list[str], encode: Callable[[list[str]], TensorPair]) -> TensorPair:
        """(sequence, pooled) embeddings per prompt; encode(distinct missing prompts) -> (sequence, pooled)."""
        if not self.enabled:
            with torch.no_grad():
                return encode(prompts)
        todo = sorted({p for p in prompts if p not in self.text})
        if todo:
            with torch.no_grad():
                seq, pooled = encode(todo)
            for i, p in enumerate(todo):
                self.text[p] = (seq[i], pooled[i])
        return torch.stack([self.text[p][0] for p in prompts]), torch.stack([self.text[p][1] for p in prompts])
