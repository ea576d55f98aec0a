"""Benchmarks: measured step time, memory and start-up of fpo-ds, alone and side by side with TRL."""
