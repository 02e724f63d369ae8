"""hps server: a hierarchical parameter server answering embedding lookups over gRPC."""

__version__ = "0.1.0"
