"""Benchmarks of insight-orchestrator: run each with ``python -m benchmarks.<name>``."""
