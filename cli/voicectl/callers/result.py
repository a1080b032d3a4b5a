"""What a simulated call produces: its ``CallTimeline`` and ``CallResult``, and ``CallError`` when it cannot start.

Times are seconds since the call's WebSocket opened; the result's properties turn the timeline into the
figures ``voicectl call``, ``voicectl load`` and the benchmarks report (first agent audio, voice-to-voice
latency per caller utterance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CallError", "CallResult", "CallTimeline"]


class CallError(RuntimeError):
    """The call could not be set up (the trigger request failed or returned something unusable)."""


@dataclass
class CallTimeline:
    """What happened during a call, in order.

    Attributes:
        events: ``(seconds since the WebSocket opened, what, details)`` triples. Events before the
            WebSocket opened (the PCM trigger request) have negative times. ``what`` is one of
            ``"trigger"``, ``"connected"``, ``"sent connected"``, ``"sent start"``,
            ``"caller speech start"``, ``"caller speech end"``, ``"dtmf sent"``,
            ``"agent audio first byte"``, ``"agent audio start"`` (a new burst of agent audio),
            ``"playback start"``, ``"playback end"``, ``"mark received"``, ``"mark echoed"``,
            ``"clear received"``, ``"text received"``, ``"problem"``, ``"stop sent"``, ``"hang up"``,
            ``"server closed"``.
    """

    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)

    def add(self, t: float, what: str, **details: Any) -> None:
        """Record an event at ``t`` seconds since connect."""
        self.events.append((t, what, details))

    def times(self, what: str) -> list[float]:
        """Times of every event named ``what``, in order."""
        return [t for t, name, _ in self.events if name == what]

    def first(self, what: str) -> float | None:
        """Time of the first event named ``what``, or None if there was none."""
        times = self.times(what)
        return times[0] if times else None

    def table(self) -> str:
        """The timeline as a fixed-width text table: relative ms, event, details."""
        rows = [f"{'ms':>8}  {'event':<24}  details"]
        for t, what, details in sorted(self.events, key=lambda event: event[0]):
            text = "  ".join(f"{key}={value}" for key, value in details.items())
            rows.append(f"{t * 1000:>8.0f}  {what:<24}  {text}")
        return "\n".join(rows)


@dataclass
class CallResult:
    """The outcome of a simulated call.

    Attributes:
        agent_audio: int16 PCM at ``sample_rate``: the agent audio the caller actually heard, played
            pieces back to back (audio a ``clear`` dropped, or still queued at hang-up, is not in it).
        sample_rate: Rate of ``agent_audio`` (8000 for Twilio, the chosen rate for Exotel, 16000 for PCM).
        timeline: Everything that happened, timed from the moment the WebSocket opened.
        marks_echoed: Names of the marks echoed back to the server, in order.
        clears: How many ``clear`` messages the server sent.
        raw_received: Every message received: the parsed JSON object for a text frame (``{"text": …}``
            if it was not JSON), ``{"binary": size}`` for a binary frame.
        heard_track: The same heard audio placed on the call's clock (index 0 is connect), silence
            where nothing played; what a recording of the caller's earpiece would hold.
        caller_last_voiced_s: Call time of the caller's last voiced sample (across all speech), or None.
        problems: Protocol deviations the simulated carrier noticed in what the server sent.
        closed_by: ``"caller"`` if the caller hung up, ``"server"`` if the server closed the socket first.
        close_code: The WebSocket close code when the server closed it, else None.
        underruns: How often playback ran dry and resumed within 0.25 s (audio sent slower than real
            time: the caller hears a glitch). Longer pauses end a stretch of playback instead.
        underrun_s: The total length of those gaps.
        session_id: The call's id at the gateway: the stream sid (Twilio, Exotel) or the triggered session
            id (PCM).
    """

    agent_audio: np.ndarray
    sample_rate: int
    timeline: CallTimeline
    marks_echoed: list[str]
    clears: int
    raw_received: list[dict[str, Any]]
    heard_track: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    caller_last_voiced_s: float | None = None
    problems: list[str] = field(default_factory=list)
    closed_by: str = "caller"
    close_code: int | None = None
    underruns: int = 0
    underrun_s: float = 0.0
    session_id: str | None = None

    @property
    def first_agent_audio_s(self) -> float | None:
        """Seconds from connect to the first byte of agent audio, or None if none came."""
        return self.timeline.first("agent audio first byte")

    @property
    def voice_to_voice_s(self) -> float | None:
        """Seconds from the caller's last voiced sample to the first byte of the answer's audio.

        The answer is the first burst of agent audio that starts after the caller's last voiced sample
        (a burst starts when audio arrives after playback went idle, after a ``clear``, or after a
        gap of at least 0.3 s). None if the caller said nothing or no answer came.
        """
        if self.caller_last_voiced_s is None:
            return None
        for t in self.timeline.times("agent audio start"):
            if t >= self.caller_last_voiced_s:
                return t - self.caller_last_voiced_s
        return None

    @property
    def heard_s(self) -> float:
        """Seconds of agent audio the caller heard."""
        return self.agent_audio.size / self.sample_rate

    def caller_speech_ends(self) -> list[float]:
        """The call-clock time of each caller utterance's last voiced sample, in the order they ended.

        The call's clock is also its stream time: a frame is sent when the audio it holds has been
        spoken, so these place each utterance in the audio the far end received (as the gateway's call
        log does with ``speech_end_s``). Utterances without a voiced sample are left out.
        """
        return [
            details["last_voiced_ms"] / 1000
            for _, what, details in self.timeline.events
            if what == "caller speech end" and details.get("last_voiced_ms") is not None
        ]

    def turn_latencies(self) -> list[float | None]:
        """Voice-to-voice latency of every caller utterance, in the order they ended.

        Returns:
            For each of ``caller_speech_ends``: seconds from that last voiced sample to the first burst of
            agent audio starting at or after it, or None where no agent audio followed.
        """
        starts = self.timeline.times("agent audio start")
        latencies: list[float | None] = []
        for end in self.caller_speech_ends():
            answer = next((t for t in starts if t >= end), None)
            latencies.append(None if answer is None else answer - end)
        return latencies
