"""The echo baseline answers a request with the reply size it asks for: the cached bytes, or (fresh) a copy of
them made for the call, which is what the fresh-reply ratio of `hps bench lookup` measures."""

from __future__ import annotations

import grpc

from hps_bench import echo_server, servers


def test_echo_replies_the_asked_size_and_a_fresh_reply_is_a_new_copy_of_the_same_bytes() -> None:
    with (
        servers.echo_server(workers=2) as target,
        grpc.insecure_channel(target, options=echo_server.OPTIONS) as channel,
    ):
        call = channel.unary_unary(echo_server.METHOD)
        cached = call(echo_server.request(100_000, 64))
        fresh = call(echo_server.request(100_000, 64, fresh=True))
        assert len(cached) == len(fresh) == 100_000
        assert fresh == cached == call(echo_server.request(100_000, 16))
    assert echo_server._call(echo_server.request(4096, 8), None) is echo_server._reply(4096)  # type: ignore[arg-type]
    copied = echo_server._call(echo_server.request(4096, 8, fresh=True), None)  # type: ignore[arg-type]
    assert copied == echo_server._reply(4096) and copied is not echo_server._reply(4096)
