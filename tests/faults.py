"""A fault-injection model server: a raw asyncio HTTP server in a thread, whose answer to
``POST /v2/models/<fault>/infer`` is the fault named in the path. Raw sockets, not a web framework, so
it can break the protocol the ways real servers and networks do (close mid-answer, lie about sizes,
trickle, hang).

    with FaultServer(classes=3) as server:
        url = server.url   # the gateway's MAGNET_UPSTREAM; MAGNET_UPSTREAM_MODEL picks the fault
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading

FAULTS = ("ok", "nan", "inf", "cols5", "cols1000", "huge", "huge_chunked", "broken", "reset", "hang",
          "trickle", "error500", "garbage")
LEAK = "internal detail http://10.1.2.3:8000/secret"  # what an error page might hold; must not reach clients


class FaultServer:
    def __init__(self, classes: int = 3) -> None:
        self.classes = classes
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FaultServer":
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        async def shutdown() -> None:  # end the hanging and trickling handlers while the loop still runs
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                rows = self._rows(body, headers)
                fault = path.split("/")[3] if path.startswith("/v2/models/") else "ok"
                if path.endswith("/ready"):
                    await self._send(writer, 200, b"{}")
                    continue
                if not await self._answer(fault, rows, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _rows(body: bytes, headers: dict) -> int:
        n = int(headers.get("inference-header-content-length", len(body)))
        try:
            return int(json.loads(body[:n])["inputs"][0]["shape"][0])
        except (ValueError, KeyError, IndexError):
            return 1

    @staticmethod
    async def _send(writer, status: int, body: bytes, extra: str = "") -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"{extra}\r\n".encode() + body)
        await writer.drain()

    def _json(self, rows: int, cols: int, value: str = "0.5") -> bytes:
        data = ",".join([value] * (rows * cols))
        return (f'{{"outputs":[{{"name":"logits","datatype":"FP32","shape":[{rows},{cols}],'
                f'"data":[{data}]}}]}}').encode()

    async def _answer(self, fault: str, rows: int, writer) -> bool:
        """Answer one request with ``fault``; False when the connection is to be dropped."""
        k = self.classes
        if fault == "ok":
            await self._send(writer, 200, self._json(rows, k))
        elif fault == "inf":  # 1e39 overflows float32: infinite logits in a well-formed answer
            await self._send(writer, 200, self._json(rows, k, "1e39"))
        elif fault == "cols5":
            await self._send(writer, 200, self._json(rows, 5))
        elif fault == "cols1000":
            await self._send(writer, 200, self._json(rows, 1000))
        elif fault == "nan":  # NaN can only travel as binary data
            raw = struct.pack(f"<{rows * k}f", *([float("nan")] * (rows * k)))
            header = json.dumps({"outputs": [{"name": "logits", "datatype": "FP32", "shape": [rows, k],
                                              "parameters": {"binary_data_size": len(raw)}}]}).encode()
            await self._send(writer, 200, header + raw, f"Inference-Header-Content-Length: {len(header)}\r\n")
        elif fault == "huge":  # declares 512 MiB, then streams it
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 536870912\r\n\r\n")
            await self._stream(writer, 512 * 2**20)
            return False
        elif fault == "huge_chunked":  # no declared size: the cap must hold while reading
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b" " * 65536
            for _ in range(8192):  # 512 MiB
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
            return False
        elif fault == "broken":  # declares 1000 bytes, sends 100, closes
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                         + self._json(rows, k)[:100])
            await writer.drain()
            return False
        elif fault == "reset":  # closes without answering
            return False
        elif fault == "hang":
            await asyncio.sleep(3600)
        elif fault == "trickle":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
            for _ in range(100000):
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.1)
        elif fault == "error500":
            await self._send(writer, 500, LEAK.encode())
        elif fault == "garbage":
            await self._send(writer, 200, b"<html>" + LEAK.encode() + b"</html>")
        return True

    @staticmethod
    async def _stream(writer, size: int) -> None:
        chunk = b" " * 65536
        try:
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
