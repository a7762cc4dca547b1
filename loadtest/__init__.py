"""Benchmarks and load generators for hub; run each as `python -m loadtest.<name>`."""
