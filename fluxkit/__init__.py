"""fluxkit: the shared library behind the FLUX.1 toolkit's entry scripts.

Entry scripts (train_*.py, infer_*.py, make_tiny_flux.py, patch_flux.py) stay thin and call
into the modules here: `device` picks hardware, `tiny` builds random FLUX pipelines offline,
`errors` turns user mistakes into one-line errors.
"""

__version__ = "0.1.0"
