"""A minimal HTTP/1.1 keep-alive client for load generation.

On a 2-core machine the load generator shares the CPU with the server it measures; httpx
spends about 1-2 ms of CPU per request, as much as the API itself, so at the issue's rates
it took a third of a core or more that the system under test then lacked. This client writes
each request in one call and reads the answer by Content-Length: a small fraction of that.
It speaks only what conveyor's API answers (Content-Length bodies, keep-alive, `Connection:
close` honoured) and fails loudly on anything else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

#: What a failed exchange raises (the caller counts it as a failed request).
TransportError = (OSError, asyncio.IncompleteReadError, ValueError)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.closed = False

    async def exchange(self, request: bytes) -> int:
        self.writer.write(request)
        status_line = await self.reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.1 answer: {status_line[:80]!r}")
        length = None
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                self.closed = True
            elif name == b"transfer-encoding":
                raise ValueError("chunked answers are not supported by this client")
        if length is None:
            raise ValueError("an answer without Content-Length")
        await self.reader.readexactly(length)
        return int(parts[1])

    def close(self) -> None:
        self.closed = True
        self.writer.close()


class Pool:
    """Up to `size` connections to host:port, each carrying one request at a time; a request
    waits for a free connection (that wait is part of its latency)."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self._slots: asyncio.Queue[_Connection | None] = asyncio.Queue()
        for _ in range(size):
            self._slots.put_nowait(None)  # opened on first use

    async def request(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes = b""
    ) -> int:
        """The answer's status code; raises one of TransportError when the exchange fails."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        conn = await self._slots.get()
        try:
            if conn is None or conn.closed:
                conn = _Connection(*await asyncio.open_connection(self.host, self.port))
            return await conn.exchange(request)
        except TransportError:
            if conn is not None:
                conn.close()
            conn = None
            raise
        finally:
            self._slots.put_nowait(conn)

    async def aclose(self) -> None:
        while not self._slots.empty():
            conn = self._slots.get_nowait()
            if conn is not None:
                conn.close()
