"""Running diffusers' own FLUX training scripts unmodified (entry: patch_flux.py).

    patches        runtime patches (NPU attention and RoPE, DeepSpeed-aware saving, CPU device counts)
    script_fixes   source fixes for the upstream scripts, each named, applied by the runner
    cache_pairing  the caches those scripts read by step number, read by the batch's samples (cache-by-sample)
"""
