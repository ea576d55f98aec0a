"""The planner: per-rank bytes, link times, compute and memory of a recipe at a cluster size (`fpo-ds plan`)."""
