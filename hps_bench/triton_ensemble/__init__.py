"""A DLRM-shaped Triton ensemble (hps lookup model -> NumPy dense model), shared by `hps bench triton` and the
tutorial in examples/triton_ensemble; it writes model files and runs the dense part, and never starts a server.
"""
