"""The training data: what the trainer reads, before any model. Imports only fluxkit.shared.

    pairs     editing pairs (reference image, target, instruction) for Kontext and FLUX.2
    buckets   aspect-ratio buckets: the shapes, the sampler whose order depends only on (seed, epoch)
    scan      the up-front scan: image headers, captions, columns, enough samples per bucket
    dataset   the dataset streamed from the scan (images, captions, class images), the loader's collate
(The latent/text cache is fluxkit.cache, above the model families it keys by.)
"""
