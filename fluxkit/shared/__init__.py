"""The shared facts, one home each; the bottom layer: nothing here imports another fluxkit folder.

    errors        user mistakes as one `error:` line and exit status 2; FlagParser (nearest flag)
    environment   parse_bool (one yes/no truth table), env flags, HF offline, rank 0, hub ids, the
                  pipeline-folder rule, free ports, versions + git state of a run's record
    fsio          atomic writes, staging and publishing folders, the writable-folder probe
    host_runtime  runtime defaults for the host (OpenMP wait policy, torch extensions folder), set before torch loads
    device        npu > cuda > cpu, backends, the Accelerator, dtype names, zero_stage(source), the
                  torch.cuda/torch.npu dispatch (synchronize, empty_cache, memory statistics)
    flops         model FLOPs and device peaks
    quiet         known library noise, dropped by name (an ERROR with the same text still prints)
"""
