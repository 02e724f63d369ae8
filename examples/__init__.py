"""Runnable examples of hps workflows: each module or sub-package is one tutorial.

Examples import hps like a user would; nothing in hps imports them.
"""
