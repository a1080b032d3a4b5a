"""``call()``: place one simulated phone call of any dialect and play the caller's part in real time.

It resamples the caller's speech to the dialect's rate, works out when the caller hangs up, builds the
dialect's caller (Twilio, Exotel, Plivo, Telnyx, or PCM after its trigger request) and runs it.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from voice_audio import resample
from voicectl.callers.audio import as_int16, last_voiced_s
from voicectl.callers.base import SimulatedCall
from voicectl.callers.exotel import EXOTEL_RATES, ExotelCall
from voicectl.callers.pcm import PCM_RATE, PcmCall
from voicectl.callers.plivo import PlivoCall, plivo_content_type
from voicectl.callers.result import CallResult
from voicectl.callers.script import CallScript
from voicectl.callers.telnyx import TELNYX_RATE, TelnyxCall
from voicectl.callers.track import Segment
from voicectl.callers.twilio import TWILIO_RATE, TwilioCall
from voicectl.callers.urls import dialect_url, trigger
from voicectl.callers.vonage import VONAGE_RATES, VonageCall

__all__ = ["DIALECTS", "call", "dialect_rate"]

DIALECTS = ("twilio", "exotel", "pcm", "plivo", "telnyx", "vonage")


def dialect_rate(dialect: str, sample_rate: int = 8000) -> int:
    """The sample rate a caller of ``dialect`` speaks and hears at (``sample_rate`` is Exotel's and Plivo's)."""
    rates = {"twilio": TWILIO_RATE, "exotel": sample_rate, "pcm": PCM_RATE, "plivo": sample_rate}
    return {**rates, "telnyx": TELNYX_RATE, "vonage": sample_rate}[dialect]


async def call(
    dialect: str,
    url: str,
    caller_audio: np.ndarray,
    caller_rate: int,
    *,
    agent_id: str = "default",
    speech_at_s: float = 1.0,
    extra_speech: Sequence[tuple[float, np.ndarray]] = (),
    dtmf: Sequence[tuple[float, str]] = (),
    hang_up_after_s: float | None = None,
    listen_s: float = 10.0,
    sample_rate: int = 8000,
    parameters: Mapping[str, str] | None = None,
    script: CallScript | None = None,
    record: bool = True,
    api_key: str | None = None,
) -> CallResult:
    """Place a simulated phone call to the gateway and play the caller's part in real time.

    Args:
        dialect: ``"twilio"``, ``"exotel"`` or ``"pcm"``.
        url: The gateway, as a base URL (``http://127.0.0.1:8000``, the dialect's path is added) or the
            full ``ws://`` URL to dial. For ``pcm`` only the scheme, host and port are used.
        caller_audio: What the caller says: int16 mono samples at ``caller_rate``.
        caller_rate: Rate of ``caller_audio`` and of ``extra_speech`` in Hz.
        agent_id: The agent to talk to (Twilio ``customParameters``, Exotel ``custom_parameters`` and
            query string, PCM trigger body).
        speech_at_s: When the caller starts speaking, in seconds after the WebSocket opens.
        extra_speech: More ``(at_s, int16 samples)`` utterances, e.g. to barge in; overlapping speech is mixed.
        dtmf: ``(at_s, digit)`` key presses (Twilio and Exotel; noted and skipped for PCM).
        hang_up_after_s: Hang up this many seconds after connect, whatever is happening.
        listen_s: Otherwise, stay on the line this long after the last caller speech ends.
        sample_rate: Exotel's sample rate (8000, 16000 or 24000); Plivo's (8000: μ-law, 16000: L16, unless
            the URL's ``?content_type=`` names one, e.g. ``audio/x-l16;rate=8000``); Vonage's (8000 or 16000);
            ignored for the others.
        parameters: More call fields (the agent's template variables, e.g. ``{"driver_name": "John"}``):
            Twilio ``customParameters``, Exotel custom parameters (query string and ``custom_parameters``),
            extra fields of the PCM trigger body.
        script: Decides during the call what else the caller says, or that it hangs up sooner (see
            ``CallScript``, ``HangUpWhenAnswered``).
        record: Keep what the caller heard and every message received; False for long calls under load
            (``agent_audio``, ``heard_track`` and ``raw_received`` are then empty).
        api_key: Sent as ``Authorization: Bearer`` on the PCM trigger request.

    Returns:
        The call's result: what the caller heard, the timeline and every message received.

    Raises:
        ValueError: For an unknown dialect, a bad Exotel rate or non-int16 audio.
        CallError: If the PCM trigger request fails.
        OSError, websockets.exceptions.InvalidHandshake, TimeoutError: If the WebSocket cannot be opened.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    if dialect == "exotel" and sample_rate not in EXOTEL_RATES:
        raise ValueError(f"Exotel sample rate must be one of {EXOTEL_RATES}, got {sample_rate}")
    if dialect == "vonage" and sample_rate not in VONAGE_RATES:
        raise ValueError(f"Vonage sample rate must be one of {VONAGE_RATES}, got {sample_rate}")
    content_type = ""
    if dialect == "plivo":
        asked = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)).get("content_type")
        content_type = plivo_content_type(sample_rate, asked)
        sample_rate = int(content_type.rsplit("=", 1)[1])
    rate = dialect_rate(dialect, sample_rate)
    utterances = [(speech_at_s, as_int16(caller_audio, "caller_audio"))]
    utterances += [(at, as_int16(samples, "extra_speech audio")) for at, samples in extra_speech]
    segments = []
    for index, (at, samples) in enumerate(utterances):
        converted = resample(samples, caller_rate, rate)
        segments.append(Segment(index, max(0.0, float(at)), converted, last_voiced_s(samples, caller_rate)))
    speech_end = max((seg.start_s + seg.samples.size / rate for seg in segments), default=0.0)
    end_s = float(hang_up_after_s) if hang_up_after_s is not None else speech_end + listen_s
    common: tuple[Any, ...] = (rate, segments, end_s, list(dtmf))
    options: dict[str, Any] = {"script": script, "record": record}

    fields = {"agent_id": agent_id, **{key: str(value) for key, value in (parameters or {}).items()}}
    loop = asyncio.get_running_loop()
    pre_events: list[tuple[float, str, dict[str, Any]]] = []
    runner: SimulatedCall
    if dialect == "twilio":
        runner = TwilioCall(dialect_url("twilio", url), *common, custom_parameters=fields, **options)
    elif dialect == "telnyx":
        runner = TelnyxCall(dialect_url("telnyx", url), *common, custom_parameters=fields, **options)
    elif dialect == "plivo":
        ws_url = dialect_url("plivo", url, parameters={"agent_id": agent_id})
        parts = urllib.parse.urlsplit(ws_url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        query = urllib.parse.urlencode([(key, value) for key, value in query if key != "content_type"])
        runner = PlivoCall(
            urllib.parse.urlunsplit(parts._replace(query=query)),
            *common,
            custom_parameters=fields,
            content_type=content_type,
            **options,
        )
    elif dialect == "vonage":
        runner = VonageCall(dialect_url("vonage", url), *common, headers=fields, **options)
    elif dialect == "exotel":
        ws_url = dialect_url("exotel", url, sample_rate=sample_rate, parameters=fields)
        query = urllib.parse.parse_qsl(urllib.parse.urlsplit(ws_url).query)
        custom = {key: value for key, value in query if key not in ("sample-rate", "sample_rate")}
        runner = ExotelCall(ws_url, *common, custom_parameters=custom, **options)
    else:
        started = loop.time()
        ws_url, body = await asyncio.to_thread(trigger, url, fields, api_key)
        pre_events.append((started, "trigger", {"agent_id": agent_id}))
        pre_events.append(
            (loop.time(), "trigger answered", {"session_id": body.get("session_id"), "status": body.get("status")})
        )
        runner = PcmCall(ws_url, *common, **options)
    return await runner.run(pre_events)
