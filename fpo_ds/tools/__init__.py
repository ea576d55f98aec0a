"""Tools around the trainer: demo world and pipeline, benchmarks, planner, evaluation, reports.

The core (fpo_ds/*.py) never imports from here.
"""
