"""fluxkit benchmarks: `python -m bench [SUITE ...]` (or `python bench/run.py`).

Suites: flops, train-full, train-lora, infer, gpu. Each run prints a markdown table last and
writes bench/results/<time>-<suites>.json with the machine, versions, flags and git commit.
"""
