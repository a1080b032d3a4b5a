"""Calls announced by ``POST /api/calls/trigger`` and not yet connected, in the KV bucket ``sessions``
so that any gateway replica can take the WebSocket; and carrier calls the agent transferred, for the
carrier's follow-up request (which may reach another replica)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from nats.js.api import KeyValueConfig, StorageType

from voice_gateway.storage.buckets import Bucket
from voice_gateway.storage.call_log import valid_call_log_id

BUCKET = "sessions"
CONNECT_WITHIN_S = 300
TRANSFER_PREFIX = "transfer-"


class CallRegistry:
    """Pending call sessions: agent id and template variables, kept until connected or expired.

    The bucket is created again when NATS lost it (a restart with an empty store).
    """

    def __init__(self, bucket: Bucket) -> None:
        self._kv = bucket
        # Told the session id of every call this process connects (the pending-trigger count).
        self.on_claim: Callable[[str], None] | None = None

    @classmethod
    async def open(cls, js, *, replicas: int = 1) -> CallRegistry:
        """Opens the bucket ``sessions``, creating it the first time.

        Args:
            js: A JetStream context.
            replicas: Replicas of the bucket (``NATS_STREAM_REPLICAS``).
        """
        config = KeyValueConfig(bucket=BUCKET, storage=StorageType.FILE, ttl=CONNECT_WITHIN_S * 4, replicas=replicas)
        return cls(await Bucket.open(js, config))

    async def announce(self, session_id: str, agent_id: str, variables: dict, owner: str | None = None) -> None:
        """Records a pending call; ``owner`` is the identity of the API key that triggered it (never the key),
        which the call's session then counts against."""
        record = {"agent_id": agent_id, "variables": variables, "created_at": time.time(), "state": "initialized"}
        if owner:
            record["owner"] = owner
        await self._kv.put(session_id, json.dumps(record).encode())

    async def note_transfer(self, call_sid: str, number: str) -> None:
        """Remembers that the agent transferred carrier call ``call_sid`` to ``number``."""
        await self._kv.put(TRANSFER_PREFIX + call_sid, json.dumps({"number": number, "at": time.time()}).encode())

    async def transfer_of(self, call_sid: str) -> str | None:
        """The number carrier call ``call_sid`` was transferred to, if the agent transferred it."""
        if not valid_call_log_id(call_sid):
            return None
        entry = await self._kv.get(TRANSFER_PREFIX + call_sid)
        return json.loads(entry.value)["number"] if entry is not None and entry.value else None

    async def claim(self, session_id: str) -> dict | None:
        """The pending call, marked connected; ``None`` when unknown, expired or already connected."""
        if not valid_call_log_id(session_id):
            return None
        entry = await self._kv.get(session_id)
        if entry is None or entry.value is None:
            return None
        record = json.loads(entry.value)
        if record.get("state") != "initialized" or time.time() - record["created_at"] > CONNECT_WITHIN_S:
            return None
        record["state"] = "connected"
        try:
            await self._kv.update(session_id, json.dumps(record).encode(), last=entry.revision)
        except Exception:
            return None
        if self.on_claim is not None:
            self.on_claim(session_id)
        return record
