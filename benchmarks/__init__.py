"""Reproducible benchmarks, each printing ratios against a baseline measured in the same run.

No server code lives here; the server never imports this package.
"""
