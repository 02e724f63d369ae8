"""Reproducible benchmarks that report results as ratios against baselines measured in the same run."""
