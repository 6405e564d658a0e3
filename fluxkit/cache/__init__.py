"""The persistent latent / text-embedding cache: encode each image and caption once, ever.

Layout (--latent_cache_dir, default OUTPUT_DIR's parent/.fluxkit-cache; a flag of its own because
diffusers' --cache_dir already names the hub download cache):

    CACHE/v1/latents/VAE_ID/shard-HASH.safetensors     VAE latent moments (mean, logvar) per image variant
    CACHE/v1/text/TEXT_ID/shard-HASH.safetensors       T5 sequence + CLIP pooled embeddings per prompt
    CACHE/v1/unreadable/KEY.json                       an image whose header scanned but whose pixels do
                                                       not decode (keyed by its bytes and Pillow's version)

The parts, each in its own module:

    store    immutable shards named by the hash of their bytes; the unreadable-image records
    keys     the encoders' identity (a cache from another model is never read) and content keys
    facade   the Cache the loss reads through (fluxkit.training.encode), build(), prepare_data() (the
             dataset, its cache and prompts: shared by the trainer and the cache command)
    fill     encoding what is missing ahead of training, each process its share
    admin    size, least-recently-used pruning, pruning to one run's entries
    command  python -m fluxkit.cache

Each image is encoded alone (batch of 1), cached or not: on CPU (and with some GPU kernels) a
VAE's output depends slightly on which other images share the batch, and a cached latent must be a
pure function of its key. With that, cached and uncached runs give identical losses.
"""

from .admin import prune_to_size, prune_unused, usage
from .command import main
from .facade import Cache, build, cache_root, check_cache_dir, default_cache_dir, prepare_data
from .fill import fill
from .keys import ImageHashes, image_hashes, latent_keys, text_identity, text_key, training_prompts, vae_identity
from .store import FORMAT, ShardStore

__all__ = ["Cache", "FORMAT", "ImageHashes", "ShardStore", "build", "cache_root", "check_cache_dir", "default_cache_dir",
           "fill", "image_hashes", "latent_keys", "main", "prepare_data", "prune_to_size", "prune_unused", "text_identity",
           "text_key", "training_prompts", "usage", "vae_identity"]
