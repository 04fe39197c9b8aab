"""Benchmarks: scripts that print tables (run as `python -m bench.<name>`); never timed tests."""
