"""Random FLUX pipelines and sample data, fully offline (entry: make_tiny_flux.py; the tests' models).

    build    a random FLUX.1/Kontext pipeline of a chosen size (presets), any family's by name, sample datasets
    flux2    random FLUX.2 [dev] and [klein] pipelines (Mistral3 / Qwen3 text encoders, FLUX.2 VAE)
    common   what the builders share (VAE, scheduler config, tokenizer corpus)
"""
