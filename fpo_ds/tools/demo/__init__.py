"""The demo: the embedded tiny world, the whole pipeline per seed, `fpo-ds eval` and the report."""
