"""A client of the browser protocol (seed 001) at ``/ws``: the page's side of a session, for tools and tests.

JSON text frames ``{"type": …, "data": {…}}`` both ways: the client sends ``init`` (``agentId``), ``audio``
(a base64 WAV per utterance), ``text`` and ``end``; the gateway answers ``init_success``, ``audio_response``
(a base64 WAV per sentence), ``stt_complete``, ``llm_chunk``, ``processing_complete``, ``error``, ….
``voicectl load --dialect browser``, the benchmarks and the gateway's tests all talk through this class.

A reader task takes every event off the socket as it arrives and stamps it with the event loop's clock, so
arrival times hold even while the caller is busy (say, speaking), and it keeps track of when the agent audio
received so far would end if played in real time (``playing_until``), as the page plays it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import wave
from collections.abc import Callable
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed

from voicectl.callers.urls import browser_url

__all__ = ["BrowserClient", "wav_seconds"]


def wav_seconds(encoded: str) -> float:
    """Length in seconds of a base64 WAV file; 0.0 if it is not one."""
    try:
        with wave.open(io.BytesIO(base64.b64decode(encoded))) as wav:
            return wav.getnframes() / wav.getframerate()
    except (ValueError, EOFError, wave.Error):
        return 0.0


class BrowserClient:
    """One session at the gateway's ``/ws``. Use it as an async context manager (or ``open`` and ``close``).

    Args:
        url: The gateway, any URL of it (only the scheme, host and port are used).
        open_timeout: Seconds the WebSocket may take to open.
        compression: The WebSocket's per-message compression: ``"deflate"`` (websockets' default) or None.
        on_problem: Called with a description of each frame that is not JSON (it is then skipped); frames that
            are JSON but not an object are skipped silently.

    Attributes:
        url: The ``ws(s)://…/ws`` URL.
        playing_until: Event-loop time at which the agent audio received so far ends when played in real time.
        closed: Whether the server's side of the socket is gone (every event before that is still readable).
    """

    def __init__(
        self,
        url: str,
        *,
        open_timeout: float = 10.0,
        compression: str | None = "deflate",
        on_problem: Callable[[str], None] | None = None,
    ) -> None:
        self.url = browser_url(url)
        self.open_timeout = open_timeout
        self.compression = compression
        self.on_problem = on_problem
        self.playing_until = 0.0
        self.closed = False
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        # (arrival time, event); None as the event once the socket is closed, and that item stays last.
        self._events: asyncio.Queue[tuple[float, dict[str, Any] | None]] = asyncio.Queue()

    async def open(self) -> BrowserClient:
        """Open the WebSocket and start reading.

        Raises:
            OSError, TimeoutError, websockets.exceptions.InvalidHandshake: If it cannot be opened.
        """
        self._ws = await websockets.connect(
            self.url, max_size=None, open_timeout=self.open_timeout, compression=self.compression
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def close(self) -> None:
        """Stop reading and close the WebSocket."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()

    async def __aenter__(self) -> BrowserClient:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close_abruptly(self) -> None:
        """Drop the connection without a closing handshake (as a crashed page would)."""
        self._ws.transport.abort() if hasattr(self._ws, "transport") else await self._ws.close()

    @property
    def close_code(self) -> int | None:
        """The WebSocket close code, once it is closed."""
        return self._ws.close_code

    @staticmethod
    def clock() -> float:
        """The clock events are stamped with: the running event loop's."""
        return asyncio.get_running_loop().time()

    async def _read(self) -> None:
        try:
            with contextlib.suppress(ConnectionClosed):
                async for frame in self._ws:
                    now = self.clock()
                    try:
                        event = json.loads(frame)
                    except ValueError:
                        if self.on_problem is not None:
                            self.on_problem(f"not JSON: {str(frame)[:80]!r}")
                        continue
                    if not isinstance(event, dict):
                        continue
                    data = event.get("data") if isinstance(event.get("data"), dict) else {}
                    if event.get("type") == "audio_response" and isinstance(data.get("audio"), str):
                        self.playing_until = max(self.playing_until, now) + wav_seconds(data["audio"])
                    self._events.put_nowait((now, event))
        finally:
            self.closed = True
            self._events.put_nowait((self.clock(), None))

    async def send(self, type_: str, **data: Any) -> None:
        """Send a ``{"type": type_, "data": data}`` message."""
        await self._ws.send(json.dumps({"type": type_, "data": data}))

    async def send_raw(self, message: str | bytes) -> None:
        """Send a frame as it is."""
        await self._ws.send(message)

    async def receive(self, timeout: float = 60) -> tuple[float, dict[str, Any]]:
        """The next event and when it arrived (``clock()``).

        Raises:
            TimeoutError: If none arrives in ``timeout`` seconds (none at all when ``timeout`` <= 0).
            websockets.exceptions.ConnectionClosed: If the socket is closed and every event was read.
        """
        at, event = await asyncio.wait_for(self._events.get(), timeout)
        if event is None:
            self._events.put_nowait((at, None))
            await self._ws.recv()  # raises ConnectionClosed, with the close code and reason
            raise RuntimeError("the browser session's socket is closed")
        return at, event

    async def next(self, timeout: float = 60) -> dict[str, Any]:
        """The next event (see ``receive``)."""
        return (await self.receive(timeout))[1]

    async def timed_until(self, *types: str, timeout: float = 90) -> list[tuple[float, dict[str, Any]]]:
        """Events with their arrival times, up to and including the first of one of ``types``.

        Raises:
            TimeoutError: If none of ``types`` arrives in ``timeout`` seconds.
            websockets.exceptions.ConnectionClosed: If the socket closes first.
        """
        collected = []
        deadline = self.clock() + timeout
        while True:
            at, event = await self.receive(max(0.1, deadline - self.clock()))
            collected.append((at, event))
            if event.get("type") in types:
                return collected

    async def until(self, *types: str, timeout: float = 90) -> list[dict[str, Any]]:
        """Events up to and including the first of one of ``types`` (see ``timed_until``)."""
        return [event for _, event in await self.timed_until(*types, timeout=timeout)]

    def discard_pending(self) -> None:
        """Forget the events received but not read yet (the end of the socket is kept)."""
        while not self._events.empty():
            at, event = self._events.get_nowait()
            if event is None:
                self._events.put_nowait((at, None))
                return
