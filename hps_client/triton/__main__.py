"""`python -m hps_client.triton setup|model|serve`: prepare Triton, write the lookup model, run a local server.

It parses arguments and prints for people; the work lives in environment.py, repository.py and tritonserver.py.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Sequence

from hps_client.triton import environment, repository, tritonserver


def _setup(args: argparse.Namespace) -> int:
    prepared = environment.setup(args.dir, args.python)
    print(f"tritonserver: {prepared.tritonserver}")
    print(f"backends:     {prepared.backends}")
    return 0


def _model(args: argparse.Namespace) -> int:
    folder = repository.write_lookup_model(
        args.repository,
        name=args.name,
        hps_address=args.hps_address,
        hps_model=args.hps_model,
        tables=[t for t in args.tables.split(",") if t],
        max_batch_size=args.max_batch_size,
        queue_delay_us=args.queue_delay_us,
        instances=args.instances,
        reply_dtype=args.reply_dtype,
        security={key: getattr(args, key) for key in repository.SECURITY_PARAMETERS if getattr(args, key)},
    )
    print(f"wrote {folder}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    prepared = environment.setup(args.dir, args.python)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with tritonserver.running(prepared, args.repository, log_dir=args.log_dir) as endpoint:
        print(f"Triton serving {args.repository}: gRPC {endpoint.grpc_target}, HTTP {endpoint.http_url}")
        print(f"log: {endpoint.log_file}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hps_client.triton", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_environment(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", help="environment folder (default $HPS_TRITON_HOME or ~/.cache/hps/triton)")
        p.add_argument("--python", default=environment.DEFAULT_PYTHON, help="Debian's python3 (default %(default)s)")

    p = commands.add_parser("setup", help="install tritonserver and a Python-backend environment (idempotent)")
    with_environment(p)
    p.set_defaults(run=_setup)

    p = commands.add_parser("model", help="write the hps lookup model into a Triton model repository")
    p.add_argument("--repository", required=True, help="the model repository folder")
    p.add_argument("--name", default="hps_embedding", help="Triton model name (default %(default)s)")
    p.add_argument("--hps-address", required=True, help="host:port of the hps server")
    p.add_argument("--hps-model", required=True, help="model name on the hps server")
    p.add_argument("--tables", default="", help="comma-separated tables in NUMKEYS order (default: all)")
    p.add_argument("--max-batch-size", type=int, default=1024, help="<= the hps model's max_batch_size")
    p.add_argument("--queue-delay-us", type=int, default=100, help="dynamic batching max queue delay")
    p.add_argument("--instances", type=int, default=1, help="model instances (processes) in Triton")
    p.add_argument("--reply-dtype", choices=("float32", "float16"), default="float32", help="vectors on the wire")
    p.add_argument("--tls-ca-file", help="PEM CAs to trust for a TLS hps server (default: $HPS_TLS_CA_FILE in Triton)")
    p.add_argument("--tls-cert-file", help="client certificate for mutual TLS (default: $HPS_TLS_CERT_FILE)")
    p.add_argument("--tls-key-file", help="its private key (default: $HPS_TLS_KEY_FILE)")
    p.add_argument("--tls-server-name", help="name to check in the server's certificate (default: the host)")
    p.add_argument("--token-file", help="file holding the bearer token (default: $HPS_TOKEN in Triton)")
    p.set_defaults(run=_model)

    p = commands.add_parser("serve", help="run tritonserver over a model repository on loopback, free ports")
    with_environment(p)
    p.add_argument("--repository", required=True, help="the model repository folder")
    p.add_argument("--log-dir", help="where tritonserver.log goes (default: a temporary folder)")
    p.set_defaults(run=_serve)

    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (environment.TritonSetupError, tritonserver.TritonStartError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
