"""The loop Twilio and Exotel share: a JSON carrier stream with sids, sequence numbers, marks and ``clear``.

Both carriers open with ``connected`` and ``start``, number every message they send, echo the marks the
server sends once playback reaches them, send DTMF and a ``stop`` on hang-up, and receive base64 ``media``,
``mark`` and ``clear`` carrying the stream's sid. What differs is declared by the subclass (``twilio.py``,
``exotel.py``): the key names, the sids, the opening messages, the caller frames and the audio encoding.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from voicectl.callers.base import SimulatedCall

__all__ = ["CarrierCall"]


class CarrierCall(SimulatedCall):
    """A call through a JSON carrier; subclasses name the keys and speak the dialect's media.

    Args:
        custom_parameters: The call's custom parameters (``agent_id`` and template variables).
    """

    sequence_key = ""
    sid_key = ""
    stop_reason = ""

    def __init__(self, *args: Any, custom_parameters: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_sid, self.call_sid, self.account_sid = self.new_sids()
        self.custom_parameters = custom_parameters
        self._seq = 0

    def new_sids(self) -> tuple[str, str, str]:
        """Fresh ``(stream sid, call sid, account sid)`` as the carrier makes them."""
        raise NotImplementedError

    @property
    def session_id(self) -> str | None:
        """The call's id at the gateway: the stream sid."""
        return self.stream_sid

    def _next(self) -> str:
        self._seq += 1
        return str(self._seq)

    def message(self, event: str, **body: Any) -> dict[str, Any]:
        """A message to send: ``event``, the next sequence number, the stream sid, then ``body``.

        Call it only inside ``send_json``'s builder, so that sequence numbers go out in order.
        """
        return {"event": event, self.sequence_key: self._next(), self.sid_key: self.stream_sid, **body}

    def dtmf_message(self, digit: str) -> dict[str, Any]:
        """The ``dtmf`` message for ``digit``."""
        raise NotImplementedError

    def stop_body(self) -> dict[str, Any]:
        """The ``stop`` object of the goodbye message."""
        raise NotImplementedError

    async def on_media(self, now: float, data: bytes) -> None:
        """Handle the decoded payload of a ``media`` message from the server."""
        raise NotImplementedError

    def message_sid(self, message: dict[str, Any]) -> Any:
        """The stream sid a message from the server carries."""
        return message.get(self.sid_key)

    async def send_dtmf(self, digit: str) -> None:
        await self.send_json(lambda: self.dtmf_message(digit))
        self.timeline.add(self.now(), "dtmf sent", digit=digit)

    async def echo_mark(self, name: str) -> None:
        await self.send_json(lambda: self.message("mark", mark={"name": name}))

    async def send_stop(self) -> None:
        await self.send_json(lambda: self.message("stop", stop=self.stop_body()))
        self.timeline.add(self.now(), "stop sent", **({"reason": self.stop_reason} if self.stop_reason else {}))

    def _decode_payload(self, message: dict[str, Any]) -> bytes | None:
        media = message.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            self.problem("media without media.payload string")
            return None
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            self.problem("media.payload is not valid base64")
            return None

    async def on_json(self, now: float, message: dict[str, Any]) -> None:
        event = message.get("event")
        if self.message_sid(message) != self.stream_sid:
            self.problem(f"{event!r} message without the stream's {self.sid_key}")
        if event == "media":
            data = self._decode_payload(message)
            if data is not None:
                await self.on_media(now, data)
        elif event == "mark":
            mark = message.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str):
                self.problem("mark without mark.name string")
                return
            await self.agent_mark(now, name)
        elif event == "clear":
            await self.agent_clear(now)
        else:
            self.problem(f"unknown event {event!r}")
            await super().on_json(now, message)
