"""The simulated Twilio caller: Media Streams, bidirectional (``<Connect><Stream>``).

JSON text frames; ``connected`` then ``start`` (camelCase ids ``MZ…``/``CA…``/``AC…``, ``customParameters``
carrying ``agent_id``), then a ``media`` message every 20 ms (160 bytes of base64 μ-law 8 kHz, ``0xFF`` when
the caller is quiet) with string ``sequenceNumber``/``chunk``/``timestamp``; ``dtmf``; ``stop`` on hang-up.
Marks are echoed when playback reaches them, and a ``clear`` drops all unplayed audio and echoes every
pending mark.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import numpy as np

from voice_audio import ulaw_decode, ulaw_encode
from voicectl.callers.carrier import CarrierCall

__all__ = ["TWILIO_RATE", "TwilioCall"]

TWILIO_RATE = 8000


class TwilioCall(CarrierCall):
    """A call as Twilio Media Streams places it."""

    dialect = "twilio"
    frame_ms = 20
    keep_current_on_clear = False
    echo_marks_on_clear = True
    sequence_key = "sequenceNumber"
    sid_key = "streamSid"

    def new_sids(self) -> tuple[str, str, str]:
        return "MZ" + secrets.token_hex(16), "CA" + secrets.token_hex(16), "AC" + secrets.token_hex(16)

    async def on_open(self) -> None:
        await self.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        self.timeline.add(self.now(), "sent connected")
        await self.send_json(
            lambda: {
                "event": "start",
                "sequenceNumber": self._next(),
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": dict(self.custom_parameters),
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
                "streamSid": self.stream_sid,
            }
        )
        self.timeline.add(self.now(), "sent start", streamSid=self.stream_sid, callSid=self.call_sid)

    async def send_frame(self, k: int, samples: np.ndarray) -> bool:
        payload = base64.b64encode(ulaw_encode(samples)).decode("ascii")
        return await self.send_json(
            lambda: {
                "event": "media",
                "sequenceNumber": self._next(),
                "media": {
                    "track": "inbound",
                    "chunk": str(k + 1),
                    "timestamp": str(k * self.frame_ms),
                    "payload": payload,
                },
                "streamSid": self.stream_sid,
            }
        )

    def dtmf_message(self, digit: str) -> dict[str, Any]:
        return {
            "event": "dtmf",
            "streamSid": self.stream_sid,
            "sequenceNumber": self._next(),
            "dtmf": {"track": "inbound_track", "digit": digit},
        }

    def stop_body(self) -> dict[str, Any]:
        return {"accountSid": self.account_sid, "callSid": self.call_sid}

    async def on_media(self, now: float, data: bytes) -> None:
        await self.on_agent_audio(now, ulaw_decode(data), len(data))

    async def on_binary(self, now: float, data: bytes) -> None:
        self.problem("binary frame (Twilio warning 31950, Malformed Message)")
