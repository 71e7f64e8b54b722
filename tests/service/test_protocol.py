"""The gateway's HTTP/1.1 protocol sends a response's head and body in one write (service/protocol.py).

uvicorn's protocol is driven here in-process with a transport that records every write, so the number of
writes (one send each on a real socket) is seen exactly; uvicorn alone writes the head and the body apart.
"""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from uvicorn.server import ServerState

from service.protocol import GuardedHttpTools, HeadWithBody


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def plain(scope, receive, send):
    if scope["type"] != "http":
        return
    await receive()
    body = b"hello"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


async def streaming(scope, receive, send):
    """A head, then body chunks that only come after the event loop has run other work."""
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await asyncio.sleep(0.05)
    await send({"type": "http.response.body", "body": b"one", "more_body": True})
    await send({"type": "http.response.body", "body": b"two"})


def connect(app) -> tuple[GuardedHttpTools, RecordingTransport]:
    """The gateway's protocol serving ``app`` on a new recording transport (call in a running loop)."""
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    protocol = GuardedHttpTools(config=config, server_state=ServerState(), app_state={},
                                _loop=asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def exchange(app, request: bytes, wait_s: float = 0.3) -> tuple[RecordingTransport, list[bytes]]:
    """Feed ``request`` to the gateway's protocol serving ``app``; the writes seen after ``wait_s``."""
    protocol, transport = connect(app)
    protocol.data_received(request)
    await asyncio.sleep(wait_s)
    protocol.connection_lost(None)
    return transport, transport.writes


GET = b"GET /x HTTP/1.1\r\nhost: test\r\n\r\n"


def test_head_and_body_leave_in_one_write():
    async def main():
        _, writes = await exchange(plain, GET)
        return writes

    writes = asyncio.run(main())
    assert len(writes) == 1, writes
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\nhello")


def test_a_head_whose_body_comes_later_is_not_held_back():
    async def main():
        protocol, transport = connect(streaming)
        protocol.data_received(GET)
        await asyncio.sleep(0.02)  # the app is sleeping between its head and its body
        seen_while_waiting = list(transport.writes)
        await asyncio.sleep(0.2)
        protocol.connection_lost(None)
        return seen_while_waiting, transport.writes

    early, writes = asyncio.run(main())
    assert len(early) == 1 and early[0].startswith(b"HTTP/1.1 200 OK\r\n") and early[0].endswith(b"\r\n\r\n")
    assert b"".join(writes[1:]) == b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n"


def test_interim_answers_pass_straight_through_and_close_sends_a_held_head():
    async def main():
        loop = asyncio.get_running_loop()
        transport = RecordingTransport()
        wrapped = HeadWithBody(transport, loop)
        wrapped.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        passed = list(transport.writes)
        wrapped.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        held = list(transport.writes)
        wrapped.close()
        return passed, held, transport.writes, transport.closed, wrapped.is_closing()

    passed, held, writes, closed, closing = asyncio.run(main())
    assert passed == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert held == passed  # the 200's head waits for its body ...
    assert writes[-1] == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" and closed and closing  # ... or the close


@pytest.mark.parametrize("request_bytes", [GET, b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nabc"])
def test_keep_alive_requests_each_get_one_write(request_bytes):
    async def main():
        protocol, transport = connect(plain)
        for _ in range(3):
            protocol.data_received(request_bytes)
            await asyncio.sleep(0.05)
        protocol.connection_lost(None)
        return transport.writes

    writes = asyncio.run(main())
    assert len(writes) == 3 and all(w.endswith(b"\r\n\r\nhello") for w in writes), writes


def test_a_held_head_is_dropped_when_the_client_has_gone():
    async def main():
        transport = RecordingTransport()
        wrapped = HeadWithBody(transport, asyncio.get_running_loop())
        wrapped.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.closed = True  # the peer reset the connection before the next turn of the loop
        await asyncio.sleep(0.01)
        return transport.writes

    assert asyncio.run(main()) == []
