"""The simulated Plivo caller: Audio Streaming, bidirectional (``<Stream bidirectional="true">``).

JSON text frames with camelCase ids (``streamId``, ``callId``) and a numeric ``sequenceNumber``; no
``connected``: ``start`` (with ``mediaFormat`` and ``extra_headers``) comes first, then a ``media`` message
every 20 ms (base64 μ-law 8 kHz, or 16-bit little-endian L16 at 8 or 16 kHz, as the stream's
``contentType`` says); ``dtmf``; and no ``stop``: hanging up closes the socket. From the server it takes
``playAudio`` (checked against the stream's ``contentType`` and ``sampleRate``), ``checkpoint`` (answered
with ``playedStream`` once played) and ``clearAudio`` (answered with ``clearedAudio``, every pending
checkpoint acknowledged).
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any

import numpy as np

from voice_audio import ulaw_decode, ulaw_encode
from voicectl.callers.carrier import CarrierCall

__all__ = ["PLIVO_CONTENT_TYPES", "PlivoCall", "plivo_content_type"]

PLIVO_CONTENT_TYPES = ("audio/x-mulaw;rate=8000", "audio/x-l16;rate=8000", "audio/x-l16;rate=16000")


def plivo_content_type(sample_rate: int, content_type: str | None = None) -> str:
    """The stream's ``contentType``: ``content_type`` if given, else μ-law at 8 kHz or L16 at 16 kHz.

    Raises:
        ValueError: For a content type Plivo does not offer, or a rate other than 8000 or 16000.
    """
    if content_type:
        if content_type not in PLIVO_CONTENT_TYPES:
            raise ValueError(f"Plivo contentType must be one of {', '.join(PLIVO_CONTENT_TYPES)}")
        return content_type
    if sample_rate not in (8000, 16000):
        raise ValueError(f"Plivo's sample rate must be 8000 (μ-law) or 16000 (L16), got {sample_rate}")
    return PLIVO_CONTENT_TYPES[0] if sample_rate == 8000 else PLIVO_CONTENT_TYPES[2]


class PlivoCall(CarrierCall):
    """A call as Plivo's Audio Streaming places it.

    Args:
        content_type: The stream's ``contentType`` (one of ``PLIVO_CONTENT_TYPES``).
    """

    dialect = "plivo"
    frame_ms = 20
    keep_current_on_clear = False
    echo_marks_on_clear = True
    sequence_key = "sequenceNumber"
    sid_key = "streamId"

    def __init__(self, *args: Any, content_type: str = PLIVO_CONTENT_TYPES[0], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.content_type = content_type
        self.encoding = content_type.split(";", 1)[0]
        self._chunk = 0

    def new_sids(self) -> tuple[str, str, str]:
        return str(uuid.uuid4()), str(uuid.uuid4()), "MA" + uuid.uuid4().hex[:18].upper()

    def message(self, event: str, **body: Any) -> dict[str, Any]:
        self._seq += 1
        return {"event": event, "sequenceNumber": self._seq, "streamId": self.stream_sid, **body}

    async def on_open(self) -> None:
        headers = ",".join(f"{key}={value}" for key, value in self.custom_parameters.items())
        start = {
            "callId": self.call_sid,
            "streamId": self.stream_sid,
            "accountId": self.account_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": self.encoding, "sampleRate": self.rate},
        }
        await self.send_json(lambda: self.message("start", start=start, extra_headers=headers))
        self.timeline.add(self.now(), "sent start", streamId=self.stream_sid, callId=self.call_sid)

    async def send_frame(self, k: int, samples: np.ndarray) -> bool:
        audio = ulaw_encode(samples) if self.encoding == "audio/x-mulaw" else samples.astype("<i2").tobytes()
        self._chunk += 1
        media = {
            "track": "inbound",
            "timestamp": str(int(time.time() * 1000)),
            "chunk": self._chunk,
            "payload": base64.b64encode(audio).decode("ascii"),
        }
        return await self.send_json(lambda: self.message("media", media=media))

    def dtmf_message(self, digit: str) -> dict[str, Any]:
        return self.message("dtmf", dtmf={"digit": digit})

    async def echo_mark(self, name: str) -> None:
        await self.send_json(lambda: self.message("playedStream", name=name))

    async def send_stop(self) -> None:
        """Plivo sends nothing on hang-up: the socket closes."""

    async def on_json(self, now: float, message: dict[str, Any]) -> None:
        event = message.get("event")
        if message.get("streamId") != self.stream_sid:
            self.problem(f"{event!r} message without the stream's streamId")
        if event == "playAudio":
            await self._play(now, message)
        elif event == "checkpoint":
            name = message.get("name")
            if not isinstance(name, str):
                self.problem("checkpoint without a name string")
                return
            await self.agent_mark(now, name)
        elif event == "clearAudio":
            await self.agent_clear(now)
            await self.send_json(lambda: self.message("clearedAudio"))
        else:
            self.problem(f"unknown event {event!r}")
            self.timeline.add(now, "text received", text=str(message)[:120])

    async def _play(self, now: float, message: dict[str, Any]) -> None:
        media = message.get("media") if isinstance(message.get("media"), dict) else {}
        if media.get("contentType") != self.encoding or media.get("sampleRate") != self.rate:
            self.problem(
                f"playAudio as {media.get('contentType')!r} at {media.get('sampleRate')!r} Hz, "
                f"not the stream's {self.encoding} at {self.rate}"
            )
        payload = media.get("payload")
        try:
            data = base64.b64decode(payload, validate=True) if isinstance(payload, str) else None
        except (binascii.Error, ValueError):
            data = None
        if data is None:
            self.problem("playAudio without a valid base64 media.payload")
            return
        if self.encoding == "audio/x-mulaw":
            await self.on_agent_audio(now, ulaw_decode(data), len(data))
            return
        if len(data) % 2:
            self.problem("L16 playAudio with an odd number of bytes")
        usable = len(data) - len(data) % 2
        await self.on_agent_audio(now, np.frombuffer(data[:usable], dtype="<i2").astype(np.int16), len(data))
