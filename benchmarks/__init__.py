"""Benchmarks: `python -m benchmarks score` (see benchmarks/README.md)."""
