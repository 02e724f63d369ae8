"""Generated protobuf and gRPC stubs for hps.v1 (tools/generate_proto.py writes them)."""
