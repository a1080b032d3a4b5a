"""The simulated Telnyx caller: Media Streaming, bidirectional RTP mode (TeXML ``<Connect><Stream>``).

JSON text frames with snake_case keys; ``connected`` then ``start`` (top-level ``stream_id``,
``start.call_control_id``, ``start.custom_parameters`` carrying ``agent_id``, ``start.media_format`` PCMU
8000 Hz), then a ``media`` message every 20 ms (160 bytes of base64 μ-law) with string ``sequence_number``,
``chunk`` and ``timestamp``; ``dtmf``; ``stop`` on hang-up. The agent's ``media``, ``mark`` and ``clear``
must carry no stream id. Marks are echoed when playback reaches them; a ``clear`` drops all unplayed
audio and echoes every pending mark (as Twilio).
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from typing import Any

import numpy as np

from voice_audio import ulaw_decode, ulaw_encode
from voicectl.callers.carrier import CarrierCall

__all__ = ["TELNYX_RATE", "TelnyxCall"]

TELNYX_RATE = 8000


class TelnyxCall(CarrierCall):
    """A call as Telnyx Media Streaming places it."""

    dialect = "telnyx"
    frame_ms = 20
    keep_current_on_clear = False
    echo_marks_on_clear = True
    sequence_key = "sequence_number"
    sid_key = "stream_id"

    def new_sids(self) -> tuple[str, str, str]:
        return str(uuid.uuid4()), "v3:" + secrets.token_urlsafe(24), str(uuid.uuid4())

    async def on_open(self) -> None:
        await self.send(json.dumps({"event": "connected", "version": "1.0.0"}))
        self.timeline.add(self.now(), "sent connected")
        start = {
            "user_id": self.account_sid,
            "call_control_id": self.call_sid,
            "call_session_id": str(uuid.uuid4()),
            "from": "+13125550100",
            "to": "+13125550199",
            "tags": [],
            "client_state": "",
            "custom_parameters": dict(self.custom_parameters),
            "media_format": {"encoding": "PCMU", "sample_rate": TELNYX_RATE, "channels": 1},
        }
        await self.send_json(lambda: self.message("start", start=start))
        self.timeline.add(self.now(), "sent start", stream_id=self.stream_sid, call_control_id=self.call_sid)

    async def send_frame(self, k: int, samples: np.ndarray) -> bool:
        payload = base64.b64encode(ulaw_encode(samples)).decode("ascii")
        media = {"track": "inbound", "chunk": str(k + 1), "timestamp": str(k * self.frame_ms), "payload": payload}
        return await self.send_json(lambda: self.message("media", media=media))

    def dtmf_message(self, digit: str) -> dict[str, Any]:
        return self.message("dtmf", dtmf={"digit": digit})

    def stop_body(self) -> dict[str, Any]:
        return {"user_id": self.account_sid, "call_control_id": self.call_sid}

    def message_sid(self, message: dict[str, Any]) -> Any:
        if "stream_id" in message:
            self.problem("Telnyx expects no stream_id on the agent's messages")
        return self.stream_sid

    async def on_media(self, now: float, data: bytes) -> None:
        if len(data) < 160:
            self.problem(f"media chunk of {len(data)} bytes is under Telnyx's 20 ms RTP minimum")
        await self.on_agent_audio(now, ulaw_decode(data), len(data))

    async def on_binary(self, now: float, data: bytes) -> None:
        self.problem("binary frame (Telnyx expects JSON media messages)")
