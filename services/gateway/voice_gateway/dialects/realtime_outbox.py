"""The order of a realtime connection's server events: every event goes through one queue and one sender.

Events come from the client's messages, from the call's turn-taking (speech started and stopped, called
synchronously from the VAD) and from the turns' tasks; sending each on its own could reorder them where
two wait on the socket at once. :class:`Outbox` sends them strictly in the order they were put.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable


class Outbox:
    """Sends texts with ``send`` one after another, in the order :meth:`put` got them.

    Args:
        send: Sends one text frame (never raises once the socket is gone).
    """

    def __init__(self, send: Callable[[str], Awaitable[None]]) -> None:
        self._send = send
        self._queue: deque[str] = deque()
        self._task: asyncio.Task | None = None

    def put(self, text: str | None) -> None:
        """Queues ``text`` (``None`` is skipped) after everything queued before."""
        if not text:
            return
        self._queue.append(text)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._queue:
            await self._send(self._queue.popleft())

    async def drain(self) -> None:
        """Waits until everything queued so far has been sent."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Sends what is queued, then stops."""
        await self.drain()
