"""Calls announced by ``POST /api/calls/trigger`` and not yet connected, in the KV bucket ``sessions``
so that any gateway replica can take the WebSocket; and carrier calls the agent transferred, for the
carrier's follow-up request (which may reach another replica)."""

from __future__ import annotations

import json
import time

from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from voice_gateway.calls import valid_call_log_id

BUCKET = "sessions"
CONNECT_WITHIN_S = 300
TRANSFER_PREFIX = "transfer-"


class CallRegistry:
    """Pending call sessions: agent id and template variables, kept until connected or expired."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js) -> CallRegistry:
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(bucket=BUCKET, storage=StorageType.FILE, ttl=CONNECT_WITHIN_S * 4)
            )
        return cls(kv)

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
        try:
            entry = await self._kv.get(TRANSFER_PREFIX + call_sid)
        except KeyNotFoundError:
            return None
        return json.loads(entry.value)["number"] if entry.value else None

    async def claim(self, session_id: str) -> dict | None:
        """The pending call, marked connected; ``None`` when unknown, expired or already connected."""
        if not valid_call_log_id(session_id):
            return None
        try:
            entry = await self._kv.get(session_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        record = json.loads(entry.value)
        if record.get("state") != "initialized" or time.time() - record["created_at"] > CONNECT_WITHIN_S:
            return None
        record["state"] = "connected"
        try:
            await self._kv.update(session_id, json.dumps(record).encode(), last=entry.revision)
        except Exception:
            return None
        return record
