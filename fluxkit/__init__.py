"""fluxkit: the shared library behind the FLUX.1 toolkit's entry scripts.

Entry scripts (train_*.py, infer_*.py, the finetune_*.sh launchers, make_tiny_flux.py,
patch_flux.py) stay thin: parse, call a module here, exit. One module per idea:

Training
    train        the run, read top to bottom: setup, resume, loop, finish around one `Run`
    train_args   the trainers' one parser (each concern adds its flags) and parse() -> TrainConfig,
                 a frozen dataclass with a field per flag
    optim        the optimizer's and schedule's flags and checks
    models       loading the FLUX pipeline's components; what trains (full or LoRA); the optimizer
    families/    what differs between FLUX.1, Kontext, FLUX.2 [dev] and [klein]: components, prompt
                 encoding, latent tokens and position ids, LoRA targets, pipeline class (one module each)
    pairs        editing pairs (reference image, target, instruction) for Kontext and FLUX.2
    loss         the flow-matching loss on tensors (latents, embeddings) with prior preservation
    encode       the encoders (VAE moments, the family's text encoders) and a batch's encoding through the cache
    cache/       latent/text cache keyed by sample index and prompt: store, keys, facade (Cache, build,
                 prepare_data), fill, admin (size, pruning), command (python -m fluxkit.cache)
    data, scan, buckets   the dataset (streamed, scanned up front), aspect-ratio buckets
    checkpoint   complete-or-absent checkpoint-STEP folders with a manifest, verified resume, pruning,
                 save/load hooks; python -m fluxkit.checkpoint verify
    outputs      class images, validation grids, final weights, model card, hub upload
    runcontrol   SIGINT/SIGTERM as "checkpoint, then stop"; throughput and MFU
Inference
    infer_args   the inference scripts' flags, defaults per script, prompt lists
    inference    the run: jobs, pipeline, split over processes, images and manifest
    infer_parallel   the process grid (data-parallel groups x Ulysses x ring), attention backend,
                 context parallelism, launches that start fewer processes
    lora         LoRA files: writing (training) and reading, checking, attaching (inference)
Launching
    launch/      the launchers: spec, keys, checks, command, console, demo, record (run_config.json),
                 report (the closing report), __main__ (the run in steps); quiet (known library noise)
Shared facts, one home each
    device       npu > cuda > cpu, backends, the Accelerator, dtype names, zero_stage(source), the
                 torch.cuda/torch.npu dispatch (synchronize, empty_cache, memory statistics)
    environment  parse_bool (one yes/no truth table), env flags, HF offline, rank 0, hub ids, the
                 pipeline-folder rule, free ports, versions + git state of a run's record
    fsio         atomic writes, staging and publishing folders, the writable-folder probe
    errors       user mistakes as one `error:` line and exit status 2; FlagParser (nearest flag)
    flops        model FLOPs and device peaks
    patches, script_fixes   runtime patches and source fixes for upstream scripts (patch_flux.py);
    cache_pairing           what the cache-by-sample fix calls: caches read by the batch's samples
    tiny, tiny_flux2   random FLUX.1/Kontext and FLUX.2 [dev]/[klein] pipelines and sample data, offline

docs/architecture.md follows a launcher call to checkpoints and an inference call to images.
"""

__version__ = "0.1.0"
