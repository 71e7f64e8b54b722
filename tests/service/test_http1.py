"""The gateway's upstream HTTP/1.1 client (service/upstream/http1.py) against raw asyncio servers: keep-alive
reuse, the connection limit, answers delimited by chunks or by the end of the connection, ``Connection:
close``, and a reused connection that the server closed while it sat idle. (Each way an answer can be bad
is in test_upstream_faults.py, through the gateway.)"""

from __future__ import annotations

import asyncio

import pytest

from service.upstream import http1


class Server:
    """Answers every request with ``answer(n)`` (raw bytes, n = the request's number on its connection);
    counts connections and the most requests in flight at once."""

    def __init__(self, answer, delay_s: float = 0.0) -> None:
        self.answer, self.delay_s = answer, delay_s
        self.connections, self.in_flight, self.most_in_flight = 0, 0, 0
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Server":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        for w in self.writers:
            w.close()
        self.server.close()

    async def _handle(self, reader, writer) -> None:
        self.connections += 1
        self.writers.append(writer)
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                await asyncio.sleep(self.delay_s)
                self.in_flight -= 1
                data = self.answer(n)
                n += 1
                if data is None:  # close without answering
                    break
                writer.write(data)
                await writer.drain()
                if b"Connection: close" in data or b"Content-Length" not in data and b"chunked" not in data:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def ok(body: bytes = b'{"ok":1}', extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def run(coro):
    return asyncio.run(coro)


def test_one_connection_serves_sequential_requests():
    async def main():
        async with Server(lambda n: ok(b"answer %d" % n)) as s:
            client = http1.Http1Client(s.url)
            bodies = [(await client.request("POST", "/x", b"{}")).body for _ in range(5)]
            await client.close()
            return bodies, s.connections

    bodies, connections = run(main())
    assert bodies == [b"answer %d" % n for n in range(5)] and connections == 1


def test_concurrent_requests_stay_within_the_connection_limit():
    async def main():
        async with Server(lambda n: ok(), delay_s=0.02) as s:
            client = http1.Http1Client(s.url, max_connections=3)
            answers = await asyncio.gather(*[client.request("POST", "/x", b"{}") for _ in range(12)])
            await client.close()
            return answers, s.connections, s.most_in_flight

    answers, connections, most = run(main())
    assert all(a.status == 200 for a in answers) and connections == 3 and most == 3


def test_chunked_and_connection_delimited_answers():
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"

    async def main():
        out = []
        for answer in (chunked, until_close):
            async with Server(lambda n, a=answer: a) as s:
                client = http1.Http1Client(s.url)
                out.append((await client.request("GET", "/y")).body)
                await client.close()
        return out

    assert run(main()) == [b"abcde", b"all of it"]


def test_connection_close_is_not_reused():
    async def main():
        async with Server(lambda n: ok(extra="Connection: close\r\n")) as s:
            client = http1.Http1Client(s.url)
            for _ in range(3):
                assert (await client.request("POST", "/x", b"{}")).status == 200
            await client.close()
            return s.connections

    assert run(main()) == 3


def test_a_reused_connection_closed_by_the_server_is_retried_once_on_a_new_one():
    # the server answers the first request, then drops the connection when the second arrives (as a
    # keep-alive timeout racing a new request does): the client sends it again on a new connection
    async def main():
        async with Server(lambda n: ok(b"first") if n == 0 else None) as s:
            client = http1.Http1Client(s.url)
            first = await client.request("POST", "/x", b"{}")
            second = await client.request("POST", "/x", b"{}")
            await client.close()
            return first.body, second.body, s.connections

    assert run(main()) == (b"first", b"first", 2)


def test_a_fresh_connection_closed_before_an_answer_is_unreachable_not_retried():
    async def main():
        async with Server(lambda n: None) as s:
            client = http1.Http1Client(s.url)
            with pytest.raises(http1.Unreachable):
                await client.request("POST", "/x", b"{}")
            await client.close()
            return s.connections

    assert run(main()) == 1


def test_timeout_and_unreachable():
    async def main():
        async with Server(lambda n: ok(), delay_s=5) as s:
            client = http1.Http1Client(s.url, timeout_s=0.2)
            loop = asyncio.get_running_loop()
            t = loop.time()
            with pytest.raises(http1.Timeout):
                await client.request("POST", "/x", b"{}")
            assert loop.time() - t < 1.0
            await client.close()
        with pytest.raises(http1.Unreachable):
            await http1.Http1Client(s.url, timeout_s=1).request("GET", "/")

    run(main())


def test_request_head_carries_host_length_and_headers():
    client = http1.Http1Client("http://model:8080/prefix")
    head = client._head("POST", "/v2/models/m/infer", 12, {"Content-Type": "application/json"})
    assert head.startswith(b"POST /prefix/v2/models/m/infer HTTP/1.1\r\nHost: model:8080\r\n")
    assert b"\r\nContent-Length: 12\r\n" in head and head.endswith(b"Content-Type: application/json\r\n\r\n")
    assert b"Host: model\r\n" in http1.Http1Client("http://model")._head("GET", "/", 0, {})
    with pytest.raises(ValueError):
        http1.Http1Client("ftp://model")


def test_waiting_for_a_free_connection_counts_against_the_deadline():
    async def main():
        async with Server(lambda n: ok(), delay_s=0.5) as s:
            client = http1.Http1Client(s.url, timeout_s=0.2, max_connections=1)
            first = asyncio.create_task(client.request("POST", "/x", b"{}", timeout_s=2))
            await asyncio.sleep(0.05)  # the only connection is busy for 0.5 s
            loop = asyncio.get_running_loop()
            t = loop.time()
            with pytest.raises(http1.Timeout, match="no free connection"):
                await client.request("POST", "/x", b"{}")
            waited = loop.time() - t
            assert (await first).status == 200
            await client.close()
            return waited

    assert 0.15 < run(main()) < 0.45
