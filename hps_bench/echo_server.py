"""A raw-bytes gRPC echo server: the baseline every lookup benchmark is divided by.

It replies to each call with as many bytes (random, cached per size) as the request's first 8 bytes ask for,
with no decoding, so a same-size exchange shows what Python gRPC alone costs on this machine (over TLS too,
given a certificate and key: the baseline of `hps bench lookup --tls`). A request can ask for a fresh reply
instead: the cached bytes copied once per call, the least any server that builds each reply must do (hps
copies its vectors once, into the reply). Run: python -m hps_bench.echo_server.
"""

from __future__ import annotations

import argparse
import sys
from concurrent import futures
from functools import lru_cache
from pathlib import Path

import grpc
import numpy as np

METHOD = "/hps.bench.Echo/Call"
MAX_MESSAGE = 256 * 1024 * 1024
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


@lru_cache(maxsize=16)
def _reply(size: int) -> bytes:
    # Real bytes, as any server sends. An all-zero reply (bytes(size)) is calloc'd memory never written:
    # its pages all map the kernel's one zero page, so sending it reads one cached page over and over;
    # measured on 13.6 MB replies, that made the echo 25-35 % faster than any reply of real data.
    return np.random.default_rng(size).bytes(size)


_FRESH = 1 << 63  # in the size word: copy the reply for this call


def _call(request: bytes, context: grpc.ServicerContext) -> bytes:
    word = int.from_bytes(request[:8], "little")
    reply = _reply(word & ~_FRESH)
    return bytes(memoryview(reply)) if word & _FRESH else reply


def request(reply_bytes: int, request_bytes: int, fresh: bool = False) -> bytes:
    """A request of `request_bytes` bytes asking for a reply of `reply_bytes` bytes (`fresh`: copied for it)."""
    word = reply_bytes | (_FRESH if fresh else 0)
    return word.to_bytes(8, "little") + bytes(max(0, request_bytes - 8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--cert-file", type=Path, help="PEM certificate: serve TLS (with --key-file)")
    parser.add_argument("--key-file", type=Path, help="its PEM private key")
    args = parser.parse_args(argv)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "hps.bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(_call)}
    )
    server.add_generic_rpc_handlers((handler,))
    address = f"127.0.0.1:{args.port}"
    if args.cert_file is None:
        port = server.add_insecure_port(address)
    else:
        pair = (args.key_file.read_bytes(), args.cert_file.read_bytes())
        port = server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
