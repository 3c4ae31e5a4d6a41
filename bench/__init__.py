"""Benchmarks of fedllm's hot paths at real adapter sizes; ``python -m bench`` runs them all (see README.md)."""
