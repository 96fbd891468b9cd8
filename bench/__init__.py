"""Benchmarks: one script per claim, each a ratio against a baseline measured in the same run."""
