"""Inference: the infer_*.py scripts' run (entry: infer_*.py -> run.main).

    args       the inference scripts' flags, defaults per script (ScriptDefaults), prompt lists
    parallel   the process grid (data-parallel groups x Ulysses x ring), attention backend, context
               parallelism, launches that start fewer processes
    run        the run: jobs, pipeline, LoRA, split over processes, images and manifest
"""
