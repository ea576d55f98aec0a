"""Tools around the trainer, one sub-package per job; the core (fpo_ds/*.py) never imports from here.

- ``planner``: how long will a step take and how much memory will it need at N nodes (`fpo-ds plan`).
- ``benchmarks``: how fast is fpo-ds, measured, alone and against TRL (`fpo-ds bench`).
- ``demo``: the embedded tiny world, the end-to-end demo, `fpo-ds eval` and the demo's report.
- ``comparison``: the paper's comparison as a Slurm job graph and its table (`fpo-ds compare-report`).
"""
