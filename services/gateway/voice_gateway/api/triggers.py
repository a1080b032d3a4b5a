"""Calls triggered through the REST API and not yet connected, counted per API key.

A trigger announces a call that its backend connects within ``CONNECT_WITHIN_S``; until then it holds
nothing but a KV entry, so without a bound one key could announce calls without end. Each gateway
process counts the triggers it accepted per key and refuses more than ``GATEWAY_MAX_PENDING_TRIGGERS_PER_KEY``
(429): a trigger stops counting when its call connects to this process, or when its announcement
expires. Like every limit, it is per process.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

from voice_gateway.storage.registry import CONNECT_WITHIN_S


class PendingTriggers:
    """Triggered calls not yet connected, per credential.

    Args:
        limit: Most pending calls per credential.
        clock: Time source (seconds).
    """

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._pending: dict[str, dict[str, float]] = defaultdict(dict)
        self._owners: dict[str, str] = {}

    def count(self, identity: str) -> int:
        """Pending calls of ``identity`` now (expired ones are dropped)."""
        now = self._clock()
        calls = self._pending.get(identity, {})
        for session_id in [s for s, expires in calls.items() if expires <= now]:
            del calls[session_id]
            self._owners.pop(session_id, None)
        if not calls:
            self._pending.pop(identity, None)
        return len(calls)

    def full(self, identity: str) -> bool:
        """Whether ``identity`` may trigger no more calls now."""
        return self.count(identity) >= self.limit

    def add(self, identity: str, session_id: str) -> None:
        """Counts a triggered call until it connects or its announcement expires."""
        self._pending[identity][session_id] = self._clock() + CONNECT_WITHIN_S
        self._owners[session_id] = identity

    def connected(self, session_id: str) -> None:
        """The call connected (to this process): it no longer counts."""
        identity = self._owners.pop(session_id, None)
        if identity is not None:
            self._pending.get(identity, {}).pop(session_id, None)
