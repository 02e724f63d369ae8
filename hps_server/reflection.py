"""gRPC server reflection under both grpc.reflection.v1 and v1alpha, so every reflection client (grpcurl,
grpc_cli, Postman) can describe hps.v1; it serves descriptors only and knows nothing of hps itself.

grpcio-reflection implements v1alpha alone. v1's messages are v1alpha's, field for field, under another
package name, so v1alpha's servicer answers v1 calls too, their bytes read and written as v1alpha messages.
It also cannot find the file of a method (`grpcurl describe hps.v1.LookupService.Lookup` asks for
exactly that: protobuf's upb pool looks up services, not their methods); _Servicer answers with the
service's file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE_NAME: Final = reflection.SERVICE_NAME
V1_SERVICE_NAME: Final = "grpc.reflection.v1.ServerReflection"
_V1_FILE: Final = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor() -> None:
    """Adds v1's file (v1alpha's renamed) to the default pool, so reflection can describe v1 itself."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    v1 = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(v1)
    v1.name, v1.package = _V1_FILE, "grpc.reflection.v1"
    for method in v1.service[0].method:
        method.input_type = method.input_type.replace(".v1alpha.", ".v1.")
        method.output_type = method.output_type.replace(".v1alpha.", ".v1.")
    for message in v1.message_type:
        for message_field in message.field:
            if message_field.HasField("type_name"):
                message_field.type_name = message_field.type_name.replace(".v1alpha.", ".v1.")
    pool.Add(v1)


class _Servicer(reflection.ReflectionServicer):
    """grpcio-reflection's servicer, also finding the file of a `package.Service.Method` symbol."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        # Overrides grpcio-reflection's private hook (tests/test_reflection.py notices if it goes away).
        service, _, method = fully_qualified_name.rpartition(".")
        try:
            if method in self._pool.FindServiceByName(service).methods_by_name:
                fully_qualified_name = service
        except KeyError:
            pass  # not a method: looked up as it is
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable_reflection(server: grpc.Server, service_names: Iterable[str]) -> None:
    """Serves reflection (v1 and v1alpha) listing `service_names` and both reflection services."""
    _register_v1_descriptor()
    servicer = _Servicer((*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": v1}),)
    )
