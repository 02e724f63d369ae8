"""The wire contract in Python: the generated hps.v1 stubs, the zero-copy LookupResponse codec, dtype maps, the
update stream's message format, and how a caller connects (TLS and a bearer token: security.py).

Both hps_server and hps_client import it; it imports neither, and opens no connection itself (security.py
builds gRPC channel objects from the PEM files it is given).
"""
