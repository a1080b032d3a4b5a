"""The simulated Vonage caller: the Voice API WebSocket (an NCCO ``connect`` to a ``websocket`` endpoint).

The first message is text: ``websocket:connected`` with the ``content-type`` (``audio/l16;rate=16000`` or
``;rate=8000``) and the NCCO's headers (``agent_id``, the call's ``uuid``) flattened into it. Then the
caller's audio goes out as binary 20 ms frames of 16-bit little-endian PCM; DTMF as ``websocket:dtmf``;
and nothing on hang-up but the socket closing. From the server it takes binary frames (checked to be
exact 20 ms frames), ``{"action": "notify"}`` (answered with ``websocket:notify`` and the same payload
once played) and ``{"action": "clear"}`` (answered with ``websocket:cleared``, pending notifies echoed).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np

from voicectl.callers.base import SimulatedCall

__all__ = ["VONAGE_RATES", "VonageCall"]

VONAGE_RATES = (8000, 16000)


class VonageCall(SimulatedCall):
    """A call as Vonage's Voice API places it on a WebSocket.

    Args:
        headers: The NCCO endpoint's headers (``agent_id`` and template variables).
    """

    dialect = "vonage"
    frame_ms = 20
    keep_current_on_clear = False
    echo_marks_on_clear = True

    def __init__(self, *args: Any, headers: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.call_uuid = str(uuid.uuid4())
        self.headers = headers
        self._payloads: dict[str, Any] = {}

    @property
    def session_id(self) -> str | None:
        """The call's id at the gateway: the call's ``uuid``."""
        return self.call_uuid

    async def on_open(self) -> None:
        content_type = f"audio/l16;rate={self.rate}"
        message = {"event": "websocket:connected", "content-type": content_type, **self.headers, "uuid": self.call_uuid}
        await self.send(json.dumps(message))
        self.timeline.add(self.now(), "sent start", uuid=self.call_uuid, content_type=content_type)

    async def send_frame(self, k: int, samples: np.ndarray) -> bool:
        return await self.send(samples.astype("<i2").tobytes())

    async def send_dtmf(self, digit: str) -> None:
        await self.send(json.dumps({"event": "websocket:dtmf", "digit": digit, "duration": 260}))
        self.timeline.add(self.now(), "dtmf sent", digit=digit)

    async def echo_mark(self, name: str) -> None:
        payload = self._payloads.pop(name, {"mark": name})
        await self.send(json.dumps({"event": "websocket:notify", "payload": payload}))

    async def on_binary(self, now: float, data: bytes) -> None:
        frame = self.rate * 2 * self.frame_ms // 1000
        if len(data) != frame:
            self.problem(f"binary frame of {len(data)} bytes, not one 20 ms frame of {frame}")
        usable = len(data) - len(data) % 2
        await self.on_agent_audio(now, np.frombuffer(data[:usable], dtype="<i2").astype(np.int16), len(data))

    async def on_json(self, now: float, message: dict[str, Any]) -> None:
        action = message.get("action")
        if action == "notify":
            payload = message.get("payload")
            name = payload.get("mark") if isinstance(payload, dict) else None
            if not isinstance(name, str):
                self.problem("notify without a payload.mark string")
                return
            self._payloads[name] = payload
            await self.agent_mark(now, name)
        elif action == "clear":
            await self.agent_clear(now)
            await self.send(json.dumps({"event": "websocket:cleared"}))
        else:
            self.problem(f"unknown action {action!r}")
            self.timeline.add(now, "text received", text=json.dumps(message)[:120])
