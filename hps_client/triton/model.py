"""The hps lookup model for Triton's Python backend: each batch of KEYS/NUMKEYS requests becomes one Lookup RPC.

Copied into a model repository by `python -m hps_client.triton model`; it runs only inside Triton's Python
backend stub. Its parameters (config.pbtxt): hps_address, hps_model, hps_tables (comma-separated, NUMKEYS order;
all the model's tables when empty), hps_reply_dtype (float32 | float16 on the wire), hps_timeout_seconds, and
for a server with TLS or auth on hps_tls_ca_file, hps_tls_cert_file, hps_tls_key_file, hps_tls_server_name and
hps_token_file (a file holding the token; the HPS_TLS_* and HPS_TOKEN environment variables otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import triton_python_backend_utils as pb_utils

from hps_client import TLS, Client, HpsError
from hps_client.triton.batching import KeyLayoutError, LookupBatch, key_counts
from hps_wire.security import token_from_environment

_TRITON_CODES = {
    grpc.StatusCode.NOT_FOUND: "NOT_FOUND",
    grpc.StatusCode.INVALID_ARGUMENT: "INVALID_ARG",
    grpc.StatusCode.UNAVAILABLE: "UNAVAILABLE",
}


def _error(message: str, code: str = "INVALID_ARG") -> Any:
    return pb_utils.TritonError(message, getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL))


def _tls(params: dict[str, str]) -> TLS | None:
    files = [params.get(f"hps_tls_{name}") or None for name in ("ca_file", "cert_file", "key_file", "server_name")]
    return TLS(*files) if any(files) else TLS.from_environment()


def _token(params: dict[str, str]) -> str | None:
    path = params.get("hps_token_file")
    if not path:
        return token_from_environment()
    try:
        return Path(path).read_text().strip() or None
    except OSError as e:
        raise pb_utils.TritonModelException(f"hps_token_file: cannot read it ({e.strerror})") from None


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        missing = [key for key in ("hps_address", "hps_model") if not params.get(key)]
        if missing:
            raise pb_utils.TritonModelException(f"config.pbtxt parameters: {', '.join(missing)} must be set")
        self.model = params["hps_model"]
        self.reply_dtype = params.get("hps_reply_dtype", "float32")
        self.client = Client(
            params["hps_address"],
            timeout=float(params.get("hps_timeout_seconds", "30")),
            tls=_tls(params),
            token=_token(params),
        )
        try:
            info = self.client.describe(self.model)
        except HpsError as e:
            raise pb_utils.TritonModelException(f"hps server {params['hps_address']}: {e}") from None
        dims = {table.name: table.dim for table in info.tables}
        self.tables = [t.strip() for t in params.get("hps_tables", "").split(",") if t.strip()] or list(dims)
        unknown = sorted(set(self.tables) - set(dims))
        if unknown:
            raise pb_utils.TritonModelException(f"hps_tables: model {self.model!r} has no table(s) {unknown}")

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        valid = []
        for i, request in enumerate(requests):
            keys = pb_utils.get_input_tensor_by_name(request, "KEYS").as_numpy()
            numkeys = pb_utils.get_input_tensor_by_name(request, "NUMKEYS").as_numpy()
            try:
                valid.append((i, keys, key_counts(keys, numkeys, len(self.tables))))
            except KeyLayoutError as e:
                responses[i] = pb_utils.InferenceResponse(error=_error(str(e)))
        if valid:
            batch = LookupBatch(self.tables, [(keys, counts) for _, keys, counts in valid])
            try:
                results = self.client.lookup_tables(self.model, batch.keys_by_table(), dtype=self.reply_dtype)
            except HpsError as e:
                error = _error(f"hps lookup failed: {e}", _TRITON_CODES.get(e.code, "INTERNAL"))
                for i, _, _ in valid:
                    responses[i] = pb_utils.InferenceResponse(error=error)
            else:
                outputs = batch.outputs({table: result.vectors for table, result in results.items()})
                for (i, _, _), output in zip(valid, outputs, strict=True):
                    responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", output)])
        return responses

    def finalize(self) -> None:
        self.client.close()
