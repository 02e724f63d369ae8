"""The wire contract in Python: the generated hps.v1 stubs, the zero-copy LookupResponse codec and dtype maps.

Both hps_server and hps_client import it; it imports neither, and does no I/O.
"""
