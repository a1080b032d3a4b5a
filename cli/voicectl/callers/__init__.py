"""Simulated callers: the calling side of a call to the gateway, as the real carrier or page speaks it.

Three phone dialects are simulated (one module each, over the shared call loop in ``base.py``; Twilio and
Exotel also share the JSON carrier loop in ``carrier.py``):

* ``twilio``: Twilio Media Streams, bidirectional, μ-law 8 kHz in 20 ms ``media`` messages (``twilio.py``).
* ``exotel``: Exotel Voicebot (AgentStream), PCM16 at 8, 16 or 24 kHz in 100 ms chunks (``exotel.py``).
* ``telnyx``: Telnyx Media Streaming (RTP mode), PCMU 8 kHz in 20 ms ``media`` messages, no stream id on the
  agent's messages (``telnyx.py``, over ``carrier.py``).
* ``plivo``: Plivo Audio Streaming, μ-law 8 kHz or L16 8/16 kHz in 20 ms ``media`` messages (``plivo.py``).
* ``vonage``: the Vonage Voice API WebSocket, binary L16 8 or 16 kHz in 20 ms frames (``vonage.py``).
* ``pcm``: the raw PCM transport: ``POST /api/calls/trigger``, then binary PCM16 16 kHz frames (``pcm.py``).

The caller's audio is streamed in real time on a fixed frame clock that starts when the WebSocket opens.
Agent audio goes through a simulated playback buffer that plays in real time (``player.py``), so
``CallResult.agent_audio`` is what the caller actually heard. Every wait is bounded: the call lasts until
the last caller speech ends plus ``listen_s`` (or ``hang_up_after_s``), or until the server closes the socket.

What the caller says is either scripted up front (``caller_audio`` and ``extra_speech`` at fixed times) or
decided during the call by a ``CallScript`` (``script.py``), which sees every timeline event as it happens
and can ``say`` more (turn-taking and barging in: what ``voicectl load`` does), or hang up sooner
(``HangUpWhenAnswered``: once the agent's answer has played).

``BrowserClient`` (``browser.py``) is the client of the browser protocol at ``/ws`` (seed 001) that
``voicectl load``, the benchmarks and the tests share.
"""

from __future__ import annotations

from voicectl.callers.audio import first_voiced_s, last_voiced_s
from voicectl.callers.browser import BrowserClient
from voicectl.callers.dial import DIALECTS, call, dialect_rate
from voicectl.callers.exotel import EXOTEL_RATES
from voicectl.callers.result import CallError, CallResult, CallTimeline
from voicectl.callers.script import CallScript, HangUpWhenAnswered, LiveCall
from voicectl.callers.urls import browser_url, dialect_url, trigger

__all__ = [
    "DIALECTS",
    "EXOTEL_RATES",
    "BrowserClient",
    "CallError",
    "CallResult",
    "CallScript",
    "CallTimeline",
    "HangUpWhenAnswered",
    "LiveCall",
    "browser_url",
    "call",
    "dialect_rate",
    "dialect_url",
    "first_voiced_s",
    "last_voiced_s",
    "trigger",
]
