"""The training run and its parts (entry: train_flux_dreambooth*.py -> train_args.parse -> train.train).

    train_args  the trainers' one parser (each concern adds its flags) and parse() -> TrainConfig
    train       the run, read top to bottom: setup, resume, loop, finish around one `Run`
    preflight   what can fail early, in the launcher and in every trainer process
    startup     where a run's start-up goes: named marks (imports, plan, scan, ... first step)
    models      loading the FLUX pipeline's components; what trains (full or LoRA)
    optim       the optimizer's and schedule's flags, checks and construction
    encode      the encoders (VAE moments, the family's text encoders), a batch's encoding through the cache
    loss        the flow-matching loss on tensors (latents, embeddings) with prior preservation
    offload     --offload_encoders: the encoders on the host between encodings
    blockswap   --blocks_to_swap: frozen transformer blocks kept on the host, swapped in per step
    pivotal     pivotal tuning (--train_text_encoder_ti): new tokens and their embeddings
    runcontrol  SIGINT/SIGTERM as "checkpoint, then stop"; throughput and MFU
    outputs     class images, validation grids, final weights, model card, hub upload
"""
