"""The simulated raw PCM caller (seed 003): ``POST /api/calls/trigger``, then ``/ws/pcm/{session_id}``.

The trigger's answer gives the ``websocket_url`` (``urls.trigger``); then binary PCM16 16 kHz mono frames go
both ways, 20 ms each from the caller. There are no marks, no ``clear`` and no DTMF: a barge-in shows as
the end of playback. Text frames from the server are noted on the timeline.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import numpy as np

from voicectl.callers.base import SimulatedCall

__all__ = ["PCM_RATE", "PcmCall"]

PCM_RATE = 16000


class PcmCall(SimulatedCall):
    """A call on the raw PCM transport, once triggered."""

    dialect = "pcm"
    frame_ms = 20

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._carry = b""

    @property
    def session_id(self) -> str | None:
        """The call's id at the gateway: the triggered session's id, the last part of the socket's path."""
        return urllib.parse.urlsplit(self.ws_url).path.rstrip("/").rsplit("/", 1)[-1] or None

    async def send_frame(self, k: int, samples: np.ndarray) -> bool:
        return await self.send(samples.astype("<i2").tobytes())

    async def on_binary(self, now: float, data: bytes) -> None:
        data = self._carry + data
        usable = len(data) - len(data) % 2
        self._carry = data[usable:]
        if self._carry:
            self.problem("binary frame with an odd number of bytes")
        await self.on_agent_audio(now, np.frombuffer(data[:usable], dtype="<i2").astype(np.int16), usable)

    async def on_json(self, now: float, message: dict[str, Any]) -> None:
        self.timeline.add(now, "text received", text=json.dumps(message)[:120])

    async def on_text(self, now: float, text: str) -> None:
        self.timeline.add(now, "text received", text=text[:120])
