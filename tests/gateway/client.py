"""A small seed 001 client for the tests: send messages, collect server events in order."""

from __future__ import annotations

import asyncio
import json
import time

import websockets


class BrowserClient:
    """A WebSocket client of ``/ws`` that records every event with its arrival time."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("http://", "ws://") + "/ws"
        self.events: list[dict] = []
        self._ws = None

    async def __aenter__(self) -> BrowserClient:
        self._ws = await websockets.connect(self.url, max_size=None)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._ws.close()

    async def send(self, type_: str, **data) -> None:
        await self._ws.send(json.dumps({"type": type_, "data": data}))

    async def send_raw(self, text: str | bytes) -> None:
        await self._ws.send(text)

    async def next(self, timeout: float = 60) -> dict:
        event = json.loads(await asyncio.wait_for(self._ws.recv(), timeout))
        event["at"] = time.monotonic()
        self.events.append(event)
        return event

    async def until(self, type_: str, timeout: float = 90) -> list[dict]:
        """Events up to and including the first of ``type_``."""
        collected = []
        deadline = time.monotonic() + timeout
        while True:
            event = await self.next(max(0.1, deadline - time.monotonic()))
            collected.append(event)
            if event["type"] == type_:
                return collected

    async def close_abruptly(self) -> None:
        self._ws.transport.abort() if hasattr(self._ws, "transport") else await self._ws.close()
