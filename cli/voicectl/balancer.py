"""``voicectl balance``: a small TCP load balancer in front of several gateways, as a Kubernetes Service is.

Each new client connection goes, round-robin, to a gateway whose ``/readyz`` answers 200; a gateway
that drains (after SIGTERM it answers 503) or does not answer gets no new connections, while the
connections it already holds stay open until it closes them. Bytes are relayed unchanged, so
WebSockets, HTTP and health probes all pass through.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger("voicectl.balance")

CHECK_INTERVAL_S = 0.25
CHECK_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 2.0
CHUNK_BYTES = 64 * 1024


@dataclass
class Backend:
    """One gateway behind the balancer."""

    host: str
    port: int
    ready: bool = False

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


def parse_backend(text: str) -> Backend:
    """``host:port`` (or ``port``) as a :class:`Backend`; raises ``ValueError`` otherwise."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"backend {text!r} is not host:port")
    return Backend(host or "127.0.0.1", int(port))


class Balancer:
    """Round-robin TCP relay over ready backends.

    Args:
        backends: The gateways.
        host: Interface to listen on.
        port: Port to listen on.
    """

    def __init__(self, backends: Sequence[Backend], host: str = "127.0.0.1", port: int = 8000) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends = list(backends)
        self.host, self.port = host, port
        self._next = 0
        self._server: asyncio.AbstractServer | None = None
        self._checker: asyncio.Task | None = None
        self._relays: set[asyncio.Task] = set()

    async def start(self) -> None:
        await asyncio.gather(*(self._check(backend) for backend in self.backends))
        self._checker = asyncio.create_task(self._check_loop())
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        logger.info("balancing :%d over %s", self.port, ", ".join(b.name for b in self.backends))

    async def stop(self) -> None:
        if self._checker:
            self._checker.cancel()
        if self._server:
            self._server.close()
            await self._server.wait_closed()
        for relay in list(self._relays):
            relay.cancel()

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            await asyncio.gather(*(self._check(backend) for backend in self.backends))

    async def _check(self, backend: Backend) -> None:
        ready = False
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(backend.host, backend.port)
                try:
                    writer.write(f"GET /readyz HTTP/1.1\r\nHost: {backend.name}\r\nConnection: close\r\n\r\n".encode())
                    await writer.drain()
                    status_line = await reader.readline()
                    ready = status_line.split(b" ")[1:2] == [b"200"]
                finally:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
        except (OSError, TimeoutError, IndexError):
            ready = False
        if ready != backend.ready:
            logger.info("%s is %s", backend.name, "ready" if ready else "out of rotation")
        backend.ready = ready

    def _pick(self) -> list[Backend]:
        """Ready backends, starting with the next in turn."""
        count = len(self.backends)
        start, self._next = self._next, (self._next + 1) % count
        return [self.backends[(start + i) % count] for i in range(count) if self.backends[(start + i) % count].ready]

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._relays.add(task)
        try:
            for backend in self._pick():
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        reader, writer = await asyncio.open_connection(backend.host, backend.port)
                except (OSError, TimeoutError):
                    backend.ready = False
                    continue
                await self._relay(client_reader, client_writer, reader, writer)
                return
            client_writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 24\r\n"
                b"Connection: close\r\n\r\nno gateway is ready now\n"
            )
            with contextlib.suppress(OSError):
                await client_writer.drain()
        finally:
            client_writer.close()
            self._relays.discard(task)

    async def _relay(self, client_reader, client_writer, backend_reader, backend_writer) -> None:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(CHUNK_BYTES):
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()

        upstream = asyncio.create_task(pipe(client_reader, backend_writer))
        downstream = asyncio.create_task(pipe(backend_reader, client_writer))
        try:
            await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.wait({upstream, downstream}, timeout=5)
        finally:
            upstream.cancel()
            downstream.cancel()
            backend_writer.close()


async def serve(balancer: Balancer) -> None:
    """Runs ``balancer`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await balancer.start()
    print(f"balancer on {balancer.host}:{balancer.port}", flush=True)
    await stop.wait()
    await balancer.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voicectl balance", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--backend", action="append", required=True, help="a gateway's host:port (repeat)")
    args = parser.parse_args(argv)
    try:
        backends = [parse_backend(text) for text in args.backend]
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    asyncio.run(serve(Balancer(backends, args.host, args.listen)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
