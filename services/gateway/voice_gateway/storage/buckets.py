"""JetStream KV buckets that declare themselves again when NATS lost them.

A nats-server restarted with an empty store (a new volume, memory storage) comes back without the
gateway's buckets. The first use after that finds the bucket missing, creates it again (with the
configured replicas), lets its owner put back what must always be there, and carries on: no
operator has to step in, and the gateway does not have to restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from voice_bus.connection import ensure_key_value, is_missing

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Bucket:
    """A KV bucket that is created again, once, when it is found missing.

    Args:
        js: A JetStream context.
        config: The bucket's configuration (its replica count included).
        kv: The opened bucket.

    Attributes:
        on_recreate: Awaited with the new bucket right after it was created again, before any
            other use of it, to put back what must always be there.
    """

    def __init__(self, js: JetStreamContext, config: KeyValueConfig, kv: KeyValue) -> None:
        self._js = js
        self._config = config
        self._kv = kv
        self._lock = asyncio.Lock()
        self.on_recreate: Callable[[KeyValue], Awaitable[None]] | None = None

    @classmethod
    async def open(cls, js: JetStreamContext, config: KeyValueConfig) -> Bucket:
        """Opens the bucket, creating it (or changing its replica count) as ``config`` says."""
        return cls(js, config, await ensure_key_value(js, config))

    @property
    def name(self) -> str:
        return self._config.bucket

    async def get(self, key: str) -> KeyValue.Entry | None:
        """The key's latest entry, or ``None`` when it has none (never set, deleted, or lost)."""
        try:
            return await self._kv.get(key)
        except KeyNotFoundError:
            # A missing bucket answers "no such key" too; only the stream can tell the two apart.
            if await self._exists():
                return None
        await self._recreate()
        try:
            return await self._kv.get(key)
        except KeyNotFoundError:
            return None

    async def put(self, key: str, value: bytes) -> int:
        """Stores ``value``; returns its revision."""
        return await self._retrying(lambda kv: kv.put(key, value))

    async def update(self, key: str, value: bytes, last: int) -> int:
        """Stores ``value`` if the key's revision is still ``last``; returns the new revision."""
        return await self._retrying(lambda kv: kv.update(key, value, last=last))

    async def delete(self, key: str) -> None:
        """Deletes the key."""
        await self._retrying(lambda kv: kv.delete(key))

    async def _retrying(self, operation: Callable[[KeyValue], Awaitable[T]]) -> T:
        try:
            return await operation(self._kv)
        except Exception as exc:
            if not is_missing(exc):
                raise
        await self._recreate()
        return await operation(self._kv)

    async def _exists(self) -> bool:
        try:
            await self._js.stream_info(f"KV_{self._config.bucket}")
        except NotFoundError:
            return False
        return True

    async def _recreate(self) -> None:
        async with self._lock:
            if await self._exists():
                return
            logger.warning("KV bucket %s is gone (NATS lost its store?); creating it again", self._config.bucket)
            self._kv = await ensure_key_value(self._js, self._config)
            if self.on_recreate is not None:
                await self.on_recreate(self._kv)
