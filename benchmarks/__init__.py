"""Benchmark scripts that print the tables in README.md and docs/: run each from the repository
root as `python -m benchmarks.NAME` (e.g. `python -m benchmarks.runtime_decode`)."""
