"""The simulated Exotel caller: Voicebot (AgentStream), bidirectional.

JSON text frames with snake_case keys as in Exotel's documentation; ``?sample-rate=`` on the URL picks
8000, 16000 or 24000 Hz; base64 PCM16 LE in 100 ms ``media`` chunks; ``stop`` with ``reason: "callended"``
on hang-up. Marks are echoed when played; a ``clear`` drops the queued chunks but lets the chunk being
played finish, and (the documentation is silent on it) does not echo the pending marks unless asked to.
The agent's chunks are checked against Exotel's size rules (a multiple of 320 bytes, 3.2 kB to 100 kB).
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import numpy as np

from voicectl.callers.carrier import CarrierCall

__all__ = ["EXOTEL_RATES", "ExotelCall"]

EXOTEL_RATES = (8000, 16000, 24000)
_EXOTEL_MIN_CHUNK = 3200
_EXOTEL_MAX_CHUNK = 100_000
_EXOTEL_CHUNK_MULTIPLE = 320


class ExotelCall(CarrierCall):
    """A call as Exotel's Voicebot applet places it."""

    dialect = "exotel"
    frame_ms = 100
    keep_current_on_clear = True
    echo_marks_on_clear = False
    sequence_key = "sequence_number"
    sid_key = "stream_sid"
    stop_reason = "callended"

    def new_sids(self) -> tuple[str, str, str]:
        return secrets.token_hex(16), secrets.token_hex(16), "voicectl" + secrets.token_hex(2)

    async def on_open(self) -> None:
        await self.send(json.dumps({"event": "connected"}))
        self.timeline.add(self.now(), "sent connected")
        start = {
            "stream_sid": self.stream_sid,
            "call_sid": self.call_sid,
            "account_sid": self.account_sid,
            "from": "+919876543210",
            "to": "+918047491899",
            "custom_parameters": dict(self.custom_parameters),
            "media_format": {"encoding": "audio/x-raw", "sample_rate": str(self.rate), "bit_rate": "16"},
        }
        await self.send_json(lambda: self.message("start", start=start))
        self.timeline.add(self.now(), "sent start", stream_sid=self.stream_sid, sample_rate=self.rate)

    async def send_frame(self, k: int, samples: np.ndarray) -> bool:
        payload = base64.b64encode(samples.astype("<i2").tobytes()).decode("ascii")
        media = {"chunk": str(k + 1), "timestamp": str((k + 1) * self.frame_ms), "payload": payload}
        return await self.send_json(lambda: self.message("media", media=media))

    def dtmf_message(self, digit: str) -> dict[str, Any]:
        return self.message("dtmf", dtmf={"digit": digit, "duration": "100"})

    def stop_body(self) -> dict[str, Any]:
        return {"call_sid": self.call_sid, "account_sid": self.account_sid, "reason": self.stop_reason}

    def message_sid(self, message: dict[str, Any]) -> Any:
        return message.get("stream_sid", message.get("streamSid"))

    async def on_media(self, now: float, data: bytes) -> None:
        if len(data) % _EXOTEL_CHUNK_MULTIPLE:
            self.problem(f"media chunk of {len(data)} bytes is not a multiple of {_EXOTEL_CHUNK_MULTIPLE}")
        if len(data) < _EXOTEL_MIN_CHUNK:
            self.problem(f"media chunk of {len(data)} bytes is below the {_EXOTEL_MIN_CHUNK}-byte minimum")
        if len(data) > _EXOTEL_MAX_CHUNK:
            self.problem(f"media chunk of {len(data)} bytes is above the {_EXOTEL_MAX_CHUNK}-byte maximum")
        usable = len(data) - len(data) % 2
        samples = np.frombuffer(data[:usable], dtype="<i2").astype(np.int16)
        await self.on_agent_audio(now, samples, len(data))
