"""Run a trainer as if each process were on a machine of its own that shares no filesystem with
the others: every process gets its own latent cache folder (the run's folder + /machine-RANK).

    accelerate launch ... tests/scripts/cache_per_machine.py TRAINER.py [ARGS]

A test-only wrapper (fluxkit has no hook for it): it replaces fluxkit.cache.facade.cache_root (build's and check_cache_dir's), then runs
the trainer unchanged.
"""

import os
import runpy
import sys

import fluxkit.cache.facade as cache

shared_root = cache.cache_root


def per_machine_root(args):
    root = shared_root(args)
    return None if root is None else os.path.join(root, f"machine-{os.environ.get('RANK', '0')}")


cache.cache_root = per_machine_root
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
