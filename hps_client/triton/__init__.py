"""hps on Triton Inference Server: the lookup model for the Python backend, its repository writer, a local server.

Importable anywhere; only model.py needs Triton's stub and is never imported outside it.
"""

from hps_client.triton.batching import KeyLayoutError, LookupBatch, key_counts
from hps_client.triton.environment import TritonEnvironment, TritonSetupError, setup
from hps_client.triton.repository import write_lookup_model
from hps_client.triton.tritonserver import TritonEndpoint, TritonStartError, running

__all__ = [
    "KeyLayoutError",
    "LookupBatch",
    "TritonEndpoint",
    "TritonEnvironment",
    "TritonSetupError",
    "TritonStartError",
    "key_counts",
    "running",
    "setup",
    "write_lookup_model",
]
