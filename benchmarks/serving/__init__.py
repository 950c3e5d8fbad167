"""Serving benchmark: `python -m benchmarks.serving` (see __main__.py)."""
