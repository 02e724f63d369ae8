"""The HPS Triton ensemble tutorial with hps: lookup model (hps) + dense model (Python backend) + ensemble.

See README.md beside this file; run it with `python -m examples.triton_ensemble`.
"""
