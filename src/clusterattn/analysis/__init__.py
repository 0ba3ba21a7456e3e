"""Profiling (per-task num_block) and analysis of attention clusters during decoding."""
