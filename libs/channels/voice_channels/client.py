"""``WebSocketService``: the seed's channel pub/sub client for the gateway's ``/ws/channels``.

The protocol is JSON text frames ``{"channel": name, "payload": {...}}``. Subscribing and
unsubscribing go through the ``subscription`` channel and are acknowledged by the server with
``action`` ``subscribed`` / ``unsubscribed``; anything sent to another channel is published to
every subscriber of that channel on every gateway replica. Errors arrive on the ``error`` channel.
A session's channel (named after its session id) is read-only and needs proof to follow: pass
``subscribe(channel, token=...)`` a channel token from the gateway (or an API key); the token is sent
in the subscribe payload and again on every resubscription.

The client keeps one connection, sends WebSocket ping frames every ``ping_interval`` (a missing
pong closes the connection), and when the connection is lost it reconnects by itself with a
bounded exponential backoff and subscribes again to every channel in ``subscribed_channels``.
Delivery is at most once: what is published while a subscriber is reconnecting is not replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import re
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from voice_channels.messages import (
    ERROR_CHANNEL,
    SUBSCRIPTION_CHANNEL,
    ChannelConnectionError,
    ChannelError,
    ChannelMessage,
    ChannelSendError,
    ChannelSubscriptionError,
    MessageCallback,
    MessageStream,
)

logger = logging.getLogger(__name__)

DEFAULT_URI = "ws://localhost:8080/ws/channels"
CHANNEL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
RESERVED_CHANNELS = frozenset({SUBSCRIPTION_CHANNEL, ERROR_CHANNEL})

_CONNECT_ERRORS = (OSError, TimeoutError, WebSocketException)
_SEND_ERRORS = (OSError, TimeoutError, ConnectionClosed)


class WebSocketService:
    """A channel pub/sub client that stays connected and subscribed by itself.

    Args:
        uri: The server's channels endpoint, e.g. ``ws://localhost:8080/ws/channels``.
        max_retries: Attempts per operation: ``connect()``, each subscribe/unsubscribe and each send.
        retry_delay: Seconds between those attempts; also the first reconnect backoff step.
        ping_interval: Seconds between WebSocket pings; ``None`` or ``0`` turns them off.
        ping_timeout: Seconds to wait for a pong before the connection counts as lost
            (default ``ping_interval``).
        max_retry_delay: Upper bound of the exponential reconnect backoff in seconds.
        max_reconnect_attempts: Consecutive failed reconnects after which the service gives up
            (streams end with :class:`ChannelConnectionError`); ``None`` retries forever.
        ack_timeout: Seconds to wait for the server to acknowledge a (re)subscription.
        open_timeout: Seconds one connection attempt (TCP and WebSocket handshake) may take.
        close_timeout: Seconds to wait for the peer's side of a closing handshake (also after a
            missing pong) before dropping the TCP connection.
        on_message: Called (sync or async) with every :class:`ChannelMessage` received, in order,
            from the receiving task: keep it short.
        queue_size: Buffer of each :meth:`messages` stream.

    Attributes:
        uri: As given.
        websocket: The current connection, ``None`` while disconnected.
        subscribed_channels: The channels subscribed to; resubscribed after every reconnect.
        max_retries: As given.
        retry_delay: As given.
        ping_interval: As given.
        reconnects: How many times the connection was re-established after a loss.
        last_error: The text of the last error the server reported, if any.
    """

    def __init__(
        self,
        uri: str = DEFAULT_URI,
        *,
        max_retries: int = 3,
        retry_delay: float = 1.0,
        ping_interval: float | None = 30.0,
        ping_timeout: float | None = None,
        max_retry_delay: float = 10.0,
        max_reconnect_attempts: int | None = None,
        ack_timeout: float = 10.0,
        open_timeout: float = 10.0,
        close_timeout: float = 5.0,
        on_message: MessageCallback | None = None,
        queue_size: int = 1000,
    ) -> None:
        self.uri = uri
        self.websocket: ClientConnection | None = None
        self.subscribed_channels: set[str] = set()
        # Proof (channel token or API key) per channel, sent with every (re)subscription; never logged.
        self._tokens: dict[str, str] = {}
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.ping_interval = ping_interval
        self.ping_timeout = ping_interval if ping_timeout is None else ping_timeout
        self.max_retry_delay = max_retry_delay
        self.max_reconnect_attempts = max_reconnect_attempts
        self.ack_timeout = ack_timeout
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.on_message = on_message
        self.queue_size = queue_size
        self.reconnects = 0
        self.last_error: str | None = None
        self._streams: set[MessageStream] = set()
        self._waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        self._changed = asyncio.Event()
        self._ready = False
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._failure: ChannelConnectionError | None = None

    @property
    def connected(self) -> bool:
        """Whether a connection is open right now."""
        return self.websocket is not None

    @property
    def _attempts(self) -> int:
        return max(1, self.max_retries)

    async def __aenter__(self) -> WebSocketService:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connects (up to ``max_retries`` attempts, ``retry_delay`` apart) and starts receiving.

        Channels already in ``subscribed_channels`` are subscribed again. Does nothing when already
        connected.

        Raises:
            ChannelConnectionError: No attempt succeeded.
        """
        if self._supervisor is not None and not self._supervisor.done():
            return
        self._closing = False
        self._failure = None
        last: BaseException | None = None
        for attempt in range(1, self._attempts + 1):
            try:
                websocket = await self._open()
                break
            except _CONNECT_ERRORS as exc:
                last = exc
                logger.warning("connect to %s failed (attempt %d/%d): %r", self.uri, attempt, self._attempts, exc)
            if attempt < self._attempts:
                await asyncio.sleep(self.retry_delay)
        else:
            raise ChannelConnectionError(
                f"could not connect to {self.uri} after {self._attempts} attempt(s): {last!r}"
            ) from last
        self._attach(websocket)
        self._supervisor = asyncio.create_task(self._supervise(websocket), name="voice-channels-connection")
        logger.info("connected to %s", self.uri)
        if self.subscribed_channels:
            try:
                await self.wait_ready(self.ack_timeout)
            except TimeoutError:
                logger.warning("resubscriptions on %s not acknowledged within %.1fs", self.uri, self.ack_timeout)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Waits until connected with every channel of ``subscribed_channels`` acknowledged.

        Args:
            timeout: Seconds to wait at most; ``None`` waits as long as it takes.

        Raises:
            TimeoutError: Not ready within ``timeout``.
            ChannelError: The service is closed or gave up reconnecting.
        """
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                self._check_open()
                if self._ready and self.websocket is not None:
                    return
                await changed.wait()

    async def subscribe(self, channel: str, *, timeout: float | None = None, token: str | None = None) -> None:
        """Subscribes to a channel and waits for the server's acknowledgement.

        The channel stays subscribed across reconnects until :meth:`unsubscribe`.

        Args:
            channel: 1-128 of ``[A-Za-z0-9_-]``, not ``subscription`` or ``error``.
            timeout: Seconds each attempt may take (default ``ack_timeout``).
            token: Proof of the right to a session's channel: a channel token the gateway issued for
                it, or an API key. Free channels need none.

        Raises:
            ValueError: Invalid channel name.
            ChannelSubscriptionError: Not acknowledged within ``max_retries`` attempts (the channel is
                then not in ``subscribed_channels``).
            ChannelError: Not connected (``connect()`` first) or closed.
        """
        _check_channel(channel)
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string")
        self._check_open()
        self.subscribed_channels.add(channel)
        previous = self._tokens.pop(channel, None)
        if token is not None:
            self._tokens[channel] = token
        try:
            await self._request("subscribe", "subscribed", channel, timeout)
        except BaseException:
            self.subscribed_channels.discard(channel)
            self._tokens.pop(channel, None)
            if previous is not None:
                self._tokens[channel] = previous
            raise

    async def unsubscribe(self, channel: str, *, timeout: float | None = None) -> None:
        """Unsubscribes from a channel and waits for the server's acknowledgement.

        Args:
            channel: A channel name.
            timeout: Seconds each attempt may take (default ``ack_timeout``).

        Raises:
            ValueError: Invalid channel name.
            ChannelSubscriptionError: Not acknowledged within ``max_retries`` attempts.
            ChannelError: Not connected or closed.
        """
        _check_channel(channel)
        self._check_open()
        self.subscribed_channels.discard(channel)
        self._tokens.pop(channel, None)
        await self._request("unsubscribe", "unsubscribed", channel, timeout)

    async def send_message(self, channel: str, payload: Mapping[str, Any], *, timeout: float = 5.0) -> None:
        """Publishes ``payload`` on ``channel`` to every subscriber (on every gateway replica).

        Each attempt waits for a connection and sends within ``timeout``; failed attempts are retried
        ``retry_delay`` apart, up to ``max_retries`` attempts. The server does not acknowledge
        publishes, so a send that fails as the connection drops may or may not have been delivered.

        Args:
            channel: 1-128 of ``[A-Za-z0-9_-]``, not ``subscription`` or ``error``.
            payload: A JSON-serialisable object.
            timeout: Seconds one attempt may take.

        Raises:
            ValueError: Invalid channel name.
            TypeError: ``payload`` is not a mapping or not JSON-serialisable.
            ChannelSendError: Every attempt failed.
            ChannelError: Not connected (``connect()`` first) or closed.
        """
        _check_channel(channel)
        if not isinstance(payload, Mapping):
            raise TypeError(f"payload must be a JSON object (a mapping), not {type(payload).__name__}")
        self._check_open()
        frame = json.dumps({"channel": channel, "payload": dict(payload)})
        last: BaseException | None = None
        for attempt in range(1, self._attempts + 1):
            try:
                async with asyncio.timeout(timeout):
                    websocket = await self._wait_connection()
                    await websocket.send(frame)
                return
            except _SEND_ERRORS as exc:
                last = exc
                logger.warning("send on %r failed (attempt %d/%d): %r", channel, attempt, self._attempts, exc)
            if attempt < self._attempts:
                await asyncio.sleep(self.retry_delay)
        raise ChannelSendError(f"could not send on {channel!r} after {self._attempts} attempt(s): {last!r}") from last

    def messages(self, maxsize: int | None = None) -> MessageStream:
        """A stream of every message received from now on: ``async for message in service.messages()``.

        Create it before subscribing so that nothing is missed. Each stream gets every message.

        Args:
            maxsize: Buffer size (default ``queue_size``); the oldest messages are dropped beyond it.

        Returns:
            The stream; :meth:`MessageStream.close` it when done.
        """
        stream = MessageStream(self, self.queue_size if maxsize is None else maxsize)
        if self._failure is not None:
            stream._finish(self._failure)
        else:
            self._streams.add(stream)
        return stream

    async def close(self) -> None:
        """Closes the connection, stops reconnecting and ends every message stream."""
        self._closing = True
        supervisor, self._supervisor = self._supervisor, None
        websocket = self.websocket
        if websocket is not None:
            with contextlib.suppress(Exception):
                await websocket.close()
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        self.websocket = None
        self._ready = False
        self._notify()
        self._fail_waiters(ChannelError("closed"))
        for stream in list(self._streams):
            stream._finish()
        self._streams.clear()
        logger.info("closed connection to %s", self.uri)

    async def disconnect(self) -> None:
        """Same as :meth:`close` (the seed's name)."""
        await self.close()

    async def _open(self) -> ClientConnection:
        interval = self.ping_interval or None
        return await ws_connect(
            self.uri,
            open_timeout=self.open_timeout,
            ping_interval=interval,
            ping_timeout=self.ping_timeout if interval else None,
            close_timeout=self.close_timeout,
        )

    def _check_open(self) -> None:
        if self._failure is not None:
            raise ChannelConnectionError(str(self._failure)) from self._failure
        if self._closing or self._supervisor is None:
            raise ChannelError("not connected: call connect() first" if not self._closing else "closed")

    def _notify(self) -> None:
        """Wakes everyone waiting for a change of state (connected, ready, lost, closed, failed)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _attach(self, websocket: ClientConnection) -> None:
        self.websocket = websocket
        self._ready = False
        self._notify()

    def _detach(self, websocket: ClientConnection) -> None:
        if self.websocket is websocket:
            self.websocket = None
            self._ready = False
            self._notify()

    async def _wait_connection(self) -> ClientConnection:
        while True:
            changed = self._changed
            self._check_open()
            if self.websocket is not None:
                return self.websocket
            await changed.wait()

    async def _supervise(self, websocket: ClientConnection) -> None:
        try:
            while True:
                resubscribe = asyncio.create_task(self._resubscribe(websocket))
                try:
                    await self._read(websocket)
                finally:
                    resubscribe.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await resubscribe
                    self._detach(websocket)
                if self._closing:
                    return
                logger.warning(
                    "connection to %s lost (code %s, %r); reconnecting",
                    self.uri,
                    websocket.close_code,
                    websocket.close_reason,
                )
                websocket = await self._reconnect()
                self.reconnects += 1
                self._attach(websocket)
                logger.info("reconnected to %s (reconnect %d)", self.uri, self.reconnects)
        except Exception as exc:
            if isinstance(exc, ChannelConnectionError):
                failure = exc
                logger.error("%s", exc)
            else:
                failure = ChannelConnectionError(f"connection to {self.uri} failed: {exc!r}")
                logger.exception("connection task for %s failed", self.uri)
            self._failure = failure
            self._notify()
            self._fail_waiters(failure)
            for stream in list(self._streams):
                stream._finish(failure)
            self._streams.clear()

    async def _reconnect(self) -> ClientConnection:
        attempt = 0
        last: BaseException | None = None
        while self.max_reconnect_attempts is None or attempt < self.max_reconnect_attempts:
            backoff = min(self.max_retry_delay, self.retry_delay * 2 ** min(attempt, 30))
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            attempt += 1
            try:
                return await self._open()
            except _CONNECT_ERRORS as exc:
                last = exc
                logger.info("reconnect to %s failed (attempt %d): %r", self.uri, attempt, exc)
        raise ChannelConnectionError(f"gave up reconnecting to {self.uri} after {attempt} attempt(s): {last!r}")

    async def _read(self, websocket: ClientConnection) -> None:
        try:
            async for raw in websocket:
                await self._dispatch(raw)
        except ConnectionClosed:
            return

    async def _resubscribe(self, websocket: ClientConnection) -> None:
        channels = sorted(self.subscribed_channels)
        futures = [(channel, self._expect("subscribed", channel)) for channel in channels]
        try:
            for channel in channels:
                await websocket.send(_subscription_frame("subscribe", channel, self._tokens.get(channel)))
            async with asyncio.timeout(self.ack_timeout):
                for _, future in futures:
                    await future
        except ConnectionClosed:
            return
        except TimeoutError:
            logger.error("resubscriptions on %s not acknowledged in %.1fs; reconnecting", self.uri, self.ack_timeout)
            await websocket.close()
            return
        finally:
            for channel, future in futures:
                self._discard("subscribed", channel, future)
        if channels:
            logger.info("resubscribed to %d channel(s) on %s", len(channels), self.uri)
        self._ready = True
        self._notify()

    async def _request(self, action: str, ack: str, channel: str, timeout: float | None) -> None:
        timeout = self.ack_timeout if timeout is None else timeout
        frame = _subscription_frame(action, channel, self._tokens.get(channel) if action == "subscribe" else None)
        last: BaseException | None = None
        for attempt in range(1, self._attempts + 1):
            future = self._expect(ack, channel)
            try:
                async with asyncio.timeout(timeout):
                    websocket = await self._wait_connection()
                    await websocket.send(frame)
                    await future
                return
            except _SEND_ERRORS as exc:
                last = exc
                logger.warning("%s %r failed (attempt %d/%d): %r", action, channel, attempt, self._attempts, exc)
            finally:
                self._discard(ack, channel, future)
            if attempt < self._attempts:
                await asyncio.sleep(self.retry_delay)
        detail = f"; server said: {self.last_error}" if self.last_error else ""
        raise ChannelSubscriptionError(
            f"{action} {channel!r} not acknowledged after {self._attempts} attempt(s): {last!r}{detail}"
        ) from last

    def _expect(self, ack: str, channel: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault((ack, channel), []).append(future)
        return future

    def _discard(self, ack: str, channel: str, future: asyncio.Future[None]) -> None:
        waiting = self._waiters.get((ack, channel))
        if waiting is None:
            return
        with contextlib.suppress(ValueError):
            waiting.remove(future)
        if not waiting:
            del self._waiters[(ack, channel)]
        if not future.done():
            future.cancel()

    def _resolve(self, ack: str, channel: str) -> None:
        for future in self._waiters.pop((ack, channel), []):
            if not future.done():
                future.set_result(None)

    def _fail_waiters(self, error: BaseException) -> None:
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    async def _dispatch(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            logger.warning("ignoring a binary frame of %d bytes", len(raw))
            return
        try:
            message = json.loads(raw)
        except ValueError:
            logger.warning("ignoring a frame that is not JSON: %.200s", raw)
            return
        if not isinstance(message, dict):
            logger.warning("ignoring a frame that is not a JSON object: %.200s", raw)
            return
        channel, payload = message.get("channel"), message.get("payload")
        if not isinstance(channel, str) or not isinstance(payload, dict):
            logger.warning("ignoring a frame without channel and payload: %.200s", raw)
            return
        if channel == SUBSCRIPTION_CHANNEL:
            action, name = payload.get("action"), payload.get("channel")
            if isinstance(action, str) and isinstance(name, str):
                self._resolve(action, name)
            return
        if channel == ERROR_CHANNEL:
            self.last_error = str(payload.get("error"))
            logger.warning("server error: %s", self.last_error)
        received = ChannelMessage(channel, payload)
        for stream in list(self._streams):
            stream._put(received)
        if self.on_message is not None:
            try:
                result = self.on_message(received)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("on_message callback failed")


def _check_channel(channel: str) -> None:
    if not isinstance(channel, str) or not CHANNEL_NAME.match(channel):
        raise ValueError(f"channel names are 1-128 letters, digits, '-' or '_', not {channel!r}")
    if channel in RESERVED_CHANNELS:
        raise ValueError(f"{channel!r} is reserved by the protocol")


def _subscription_frame(action: str, channel: str, token: str | None = None) -> str:
    payload = {"action": action, "channel": channel}
    if token is not None:
        payload["token"] = token
    return json.dumps({"channel": SUBSCRIPTION_CHANNEL, "payload": payload})
