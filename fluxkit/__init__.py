"""fluxkit: the shared library behind the FLUX.1 toolkit's entry scripts.

Entry scripts (train_*.py, infer_*.py, the finetune_*.sh launchers, make_tiny_flux.py,
patch_flux.py) stay thin: parse, call a module here, exit. The folders are the floor plan, bottom
up (each imports only the ones below it; tests/shared/test_structure.py checks; each folder's
__init__ lists its modules, docs/architecture.md has one line per module):

    shared/     the shared facts, one home each: errors, environment, fsio, host_runtime, device,
                flops, quiet
    data/       the training data before any model: pairs, buckets, scan, dataset
    weights/    how weights are held, for training and inference: zero3, lora, quant
    families/   what differs between FLUX.1, Kontext, FLUX.2 [dev] and [klein] (one module each)
    tiny/       random pipelines of any family and sample data, offline: build, flux2, common
    upstream/   diffusers' own training scripts run unmodified: patches, script_fixes,
                cache_pairing (patch_flux.py)
The rooms a run is made of, on top:
    training/   the training run and its parts: train_args, train, preflight, startup, models, optim,
                encode, loss, offload, blockswap, pivotal, runcontrol, outputs
    cache/      the latent/text cache: store, keys, facade, fill, admin, command (python -m fluxkit.cache)
    checkpoint/ complete-or-absent checkpoint-STEP folders, verified resume (python -m fluxkit.checkpoint)
    plan/       the memory plan before anything loads (python -m fluxkit.plan)
    inference/  the infer_*.py scripts: args, parallel, run
    launch/     the launchers behind the finetune_*.sh scripts (python -m fluxkit.launch)
"""

__version__ = "0.1.0"
