"""What the channel client hands its user: received messages, the stream of them, and its errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voice_channels.client import WebSocketService

logger = logging.getLogger(__name__)

SUBSCRIPTION_CHANNEL = "subscription"
ERROR_CHANNEL = "error"
_DROP_LOG_EVERY = 1000


class ChannelError(Exception):
    """Base class of the client's errors (also raised for use before ``connect()`` or after ``close()``)."""


class ChannelConnectionError(ChannelError, ConnectionError):
    """The server could not be reached within the allowed attempts."""


class ChannelSendError(ChannelError):
    """A message could not be sent within ``max_retries`` attempts."""


class ChannelSubscriptionError(ChannelError):
    """A subscribe or unsubscribe was not acknowledged within ``max_retries`` attempts."""


@dataclass(frozen=True, slots=True)
class ChannelMessage:
    """One message received on a subscribed channel (or on ``error``).

    Attributes:
        channel: The channel it was published on; ``error`` for the server's error reports.
        payload: The JSON object that was published.
    """

    channel: str
    payload: dict[str, Any]

    @property
    def is_error(self) -> bool:
        """Whether this is a server error report (``payload["error"]`` holds the text)."""
        return self.channel == ERROR_CHANNEL


MessageCallback = Callable[[ChannelMessage], Awaitable[None] | None]


class _End:
    """Marks the end of a :class:`MessageStream`."""


_END = _End()


class MessageStream:
    """Every message the service receives from the moment it was created, as an async iterator.

    Created by :meth:`WebSocketService.messages`. The buffer is bounded: when the consumer falls
    ``maxsize`` messages behind, the oldest are dropped (counted in ``dropped``). Iteration ends when
    the service is closed or the stream is closed, and raises :class:`ChannelConnectionError` when the
    service gave up reconnecting.
    """

    def __init__(self, service: WebSocketService, maxsize: int) -> None:
        self._service = service
        self._queue: asyncio.Queue[ChannelMessage | _End] = asyncio.Queue(max(1, maxsize))
        self._error: BaseException | None = None
        self._finished = False
        self.dropped = 0

    def _put(self, item: ChannelMessage | _End) -> None:
        if self._finished:
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            if self.dropped % _DROP_LOG_EVERY == 1:
                logger.warning("message stream is %d behind: dropped %d oldest", self._queue.maxsize, self.dropped)
        self._queue.put_nowait(item)

    def _finish(self, error: BaseException | None = None) -> None:
        if self._finished:
            return
        self._error = error
        self._put(_END)
        self._finished = True

    def close(self) -> None:
        """Stops receiving; iteration ends once what is buffered has been read."""
        self._service._streams.discard(self)
        self._finish()

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> ChannelMessage:
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)
            if self._error is not None:
                raise ChannelConnectionError(str(self._error)) from self._error
            raise StopAsyncIteration
        return item

    async def get(self, timeout: float | None = None) -> ChannelMessage:
        """The next message.

        Args:
            timeout: Seconds to wait at most; ``None`` waits until a message or the end.

        Returns:
            The next message.

        Raises:
            TimeoutError: Nothing arrived within ``timeout``.
            ChannelError: The stream has ended.
        """
        async with asyncio.timeout(timeout):
            try:
                return await self.__anext__()
            except StopAsyncIteration:
                raise ChannelError("message stream closed") from None
