"""Simulated telephony carriers: the calling side of a phone call to the gateway, as the real carrier speaks it.

Three dialects are simulated:

* ``twilio``: Twilio Media Streams, bidirectional (``<Connect><Stream>``). JSON text frames; ``connected``
  then ``start`` (camelCase ids ``MZ…``/``CA…``/``AC…``, ``customParameters`` carrying ``agent_id``), then
  a ``media`` message every 20 ms (160 bytes of base64 μ-law 8 kHz, ``0xFF`` when the caller is quiet)
  with string ``sequenceNumber``/``chunk``/``timestamp``; ``dtmf``; ``stop`` on hang-up. Marks are echoed
  when playback reaches them, and a ``clear`` drops all unplayed audio and echoes every pending mark.
* ``exotel``: Exotel Voicebot (AgentStream, bidirectional). JSON text frames with snake_case keys as in
  Exotel's documentation; ``?sample-rate=`` on the URL picks 8000, 16000 or 24000 Hz; base64 PCM16 LE in
  100 ms ``media`` chunks; ``stop`` with ``reason: "callended"`` on hang-up. Marks are echoed when played;
  a ``clear`` drops the queued chunks but lets the chunk being played finish, and (the documentation is
  silent on it) does not echo the pending marks unless asked to.
* ``pcm``: the raw PCM transport: ``POST /api/calls/trigger`` gives a ``websocket_url``; then binary
  PCM16 16 kHz mono frames both ways, 20 ms each from the caller.

The caller's audio is streamed in real time on a fixed frame clock that starts when the WebSocket opens.
Agent audio goes through a simulated playback buffer that plays in real time, so ``CallResult.agent_audio``
is what the caller actually heard. Every wait is bounded: the call lasts until the last caller speech ends
plus ``listen_s`` (or ``hang_up_after_s``), or until the server closes the socket.

What the caller says is either scripted up front (``caller_audio`` and ``extra_speech`` at fixed times) or
decided during the call by a ``CallScript``, which sees every timeline event as it happens and can ``say``
more (turn-taking and barging in: what ``voicectl load`` does).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import contextlib
import json
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import websockets
from websockets.exceptions import ConnectionClosed

from voice_audio import resample, ulaw_decode, ulaw_encode

__all__ = [
    "DIALECTS",
    "CallError",
    "CallResult",
    "CallScript",
    "CallTimeline",
    "LiveCall",
    "call",
    "dialect_url",
    "first_voiced_s",
    "last_voiced_s",
]

DIALECTS = ("twilio", "exotel", "pcm")
EXOTEL_RATES = (8000, 16000, 24000)
DEFAULT_PATHS = {"twilio": "/twilio/media", "exotel": "/exotel/media"}

_OPEN_TIMEOUT_S = 10.0
_HTTP_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 2.0
_TICK_S = 0.01
_BURST_GAP_S = 0.3
_UNDERRUN_S = 0.25
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_EXOTEL_MIN_CHUNK = 3200
_EXOTEL_MAX_CHUNK = 100_000
_EXOTEL_CHUNK_MULTIPLE = 320


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

    def turn_latencies(self) -> list[float | None]:
        """Voice-to-voice latency of every caller utterance, in the order they ended.

        Returns:
            For each utterance with a voiced sample: seconds from its last voiced sample to the first burst
            of agent audio starting at or after it, or None where no agent audio followed.
        """
        starts = self.timeline.times("agent audio start")
        latencies: list[float | None] = []
        for _, what, details in self.timeline.events:
            if what != "caller speech end" or details.get("last_voiced_ms") is None:
                continue
            end = details["last_voiced_ms"] / 1000
            answer = next((t for t in starts if t >= end), None)
            latencies.append(None if answer is None else answer - end)
        return latencies


def _voiced_windows(samples: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    window = max(1, rate // 100)
    count = samples.size // window
    if count == 0:
        return np.zeros(0, np.int64), window
    frames = samples[: count * window].astype(np.float32).reshape(count, window)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    threshold = max(100.0, float(rms.max()) / 32.0)
    return np.flatnonzero(rms >= threshold), window


def last_voiced_s(samples: np.ndarray, rate: int) -> float | None:
    """Offset in seconds of the end of the last voiced 10 ms window in ``samples``.

    A window is voiced when its RMS is at least 1/32 of the loudest window's (-30 dB) and at least 100
    (about -50 dBFS). Returns None for silence.
    """
    voiced, window = _voiced_windows(samples, rate)
    if voiced.size == 0:
        return None
    return float((voiced[-1] + 1) * window) / rate


def first_voiced_s(samples: np.ndarray, rate: int) -> float | None:
    """Offset in seconds of the start of the first voiced 10 ms window in ``samples`` (the speech onset).

    Voiced as in ``last_voiced_s``. Returns None for silence.
    """
    voiced, window = _voiced_windows(samples, rate)
    if voiced.size == 0:
        return None
    return float(voiced[0] * window) / rate


class LiveCall(Protocol):
    """What a ``CallScript`` sees of a call in progress.

    Attributes:
        dialect: ``"twilio"``, ``"exotel"`` or ``"pcm"``.
        rate: The caller's (and the heard audio's) sample rate in Hz.
        end_s: When the caller hangs up, in seconds after connect.
    """

    dialect: str
    rate: int
    end_s: float

    def now(self) -> float:
        """Seconds since the WebSocket opened."""
        ...

    @property
    def agent_playing(self) -> bool:
        """Whether agent audio is playing or queued for playback right now."""
        ...

    def say(self, samples: np.ndarray, at_s: float | None = None) -> float:
        """Speak ``samples`` (int16 mono at ``rate``), mixed over anything else the caller is saying.

        Args:
            samples: What to say.
            at_s: When to start, in call seconds; by default (and at the earliest) the next frame not yet sent.

        Returns:
            When the speech starts, in call seconds (speech starting after ``end_s`` is never sent).
        """
        ...


class CallScript:
    """Decides during a call what the caller says; subclass and override what you need.

    The methods run on the call's event loop and must not block; they may call ``call.say``. An exception
    raised by one ends the call and propagates out of ``call()``.
    """

    def on_start(self, call: LiveCall) -> None:
        """The WebSocket is open and the carrier's opening messages were sent."""

    def on_event(self, call: LiveCall, t: float, what: str, details: dict[str, Any]) -> None:
        """An event was added to the call's timeline (see ``CallTimeline``) at ``t`` call seconds."""

    def on_tick(self, call: LiveCall, t: float) -> None:
        """Called about every 10 ms while the call is up."""


class _ScriptedTimeline(CallTimeline):
    """A timeline that also tells a callback about every event as it is added."""

    def __init__(self, notify: Callable[[float, str, dict[str, Any]], None]) -> None:
        super().__init__()
        self._notify = notify

    def add(self, t: float, what: str, **details: Any) -> None:
        """Record an event at ``t`` seconds since connect and pass it on."""
        super().add(t, what, **details)
        self._notify(t, what, details)


@dataclass
class _Chunk:
    samples: np.ndarray
    pos: int = 0

    @property
    def remaining(self) -> int:
        return self.samples.size - self.pos


class _Player:
    """A real-time playback buffer on the call clock: audio chunks and marks, played in order.

    Playback that runs dry and resumes within ``_UNDERRUN_S`` is one stretch with an underrun, not two.
    With ``keep=False`` the played audio is not kept (``heard`` and ``track`` are empty).
    """

    def __init__(self, rate: int, on_event: Callable[[float, str, dict[str, Any]], None], keep: bool = True) -> None:
        self.rate = rate
        self.keep = keep
        self.pieces: list[tuple[int, np.ndarray]] = []
        self.underruns = 0
        self.underrun_s = 0.0
        self._on_event = on_event
        self._queue: deque[_Chunk | str] = deque()
        self._cursor = 0
        self._playing = False
        self._ended_at: float | None = None
        self._stretch_underruns = 0
        self._stretch_gap_s = 0.0

    @property
    def playing(self) -> bool:
        return self._playing

    def queued_samples(self) -> int:
        return sum(item.remaining for item in self._queue if isinstance(item, _Chunk))

    def _end(self, t: float, **details: Any) -> None:
        if self._stretch_underruns:
            details.update(underruns=self._stretch_underruns, underrun_ms=round(self._stretch_gap_s * 1000))
        self._on_event(t, "playback end", details)
        self._stretch_underruns = 0
        self._stretch_gap_s = 0.0

    def flush(self, now: float) -> None:
        """Report a pending end of playback once it is certainly not an underrun (or at the end)."""
        if self._ended_at is not None and not self._playing:
            self._end(self._ended_at)
            self._ended_at = None

    def advance(self, now: float) -> list[str]:
        """Play everything due up to ``now``; returns the marks playback reached."""
        target = int(now * self.rate)
        reached: list[str] = []
        while self._queue:
            head = self._queue[0]
            if isinstance(head, str):
                reached.append(self._queue.popleft())
                continue
            room = target - self._cursor
            if room <= 0:
                break
            take = min(room, head.remaining)
            if self.keep:
                self.pieces.append((self._cursor, head.samples[head.pos : head.pos + take]))
            head.pos += take
            self._cursor += take
            if head.remaining == 0:
                self._queue.popleft()
        if self._playing and not any(isinstance(item, _Chunk) for item in self._queue):
            self._playing = False
            self._ended_at = self._cursor / self.rate
        if self._ended_at is not None and now - self._ended_at >= _UNDERRUN_S:
            self.flush(now)
        return reached

    def push_audio(self, now: float, samples: np.ndarray) -> list[str]:
        """Queue received audio; returns the marks reached while catching up to ``now``."""
        reached = self.advance(now)
        if samples.size == 0:
            return reached
        if not self._playing:
            if self._ended_at is not None:
                gap = now - self._ended_at
                self.underruns += 1
                self.underrun_s += gap
                self._stretch_underruns += 1
                self._stretch_gap_s += gap
                self._ended_at = None
            else:
                self._on_event(now, "playback start", {})
            self._cursor = max(self._cursor, int(now * self.rate))
            self._playing = True
        self._queue.append(_Chunk(samples))
        return reached

    def push_mark(self, now: float, name: str) -> list[str]:
        """Queue a mark; returns the marks reached (this one too if nothing is left to play before it)."""
        reached = self.advance(now)
        self._queue.append(name)
        return reached + self.advance(now)

    def clear(self, now: float, *, keep_current: bool) -> tuple[list[str], int, list[str]]:
        """Drop unplayed audio.

        Returns:
            ``(marks reached before the clear, samples dropped, pending marks dropped)``.
        """
        reached = self.advance(now)
        self.flush(now)
        kept: _Chunk | None = None
        if keep_current and self._queue and isinstance(self._queue[0], _Chunk) and self._queue[0].pos > 0:
            kept = self._queue.popleft()
        dropped = self.queued_samples()
        pending = [item for item in self._queue if isinstance(item, str)]
        self._queue.clear()
        if kept is not None:
            self._queue.append(kept)
        elif self._playing:
            self._playing = False
            self._end(now, cut=True)
        return reached, dropped, pending

    def heard(self) -> np.ndarray:
        if not self.pieces:
            return np.zeros(0, np.int16)
        return np.concatenate([piece for _, piece in self.pieces]).astype(np.int16, copy=False)

    def track(self, duration_s: float) -> np.ndarray:
        if not self.keep:
            return np.zeros(0, np.int16)
        end = max([int(duration_s * self.rate)] + [pos + piece.size for pos, piece in self.pieces])
        out = np.zeros(end, np.int16)
        for pos, piece in self.pieces:
            out[pos : pos + piece.size] = piece
        return out


@dataclass
class _Segment:
    index: int
    start_s: float
    samples: np.ndarray
    last_voiced_s: float | None
    first_frame: int = 0
    last_frame: int = 0
    start: int = 0
    stop: int = 0


class _Call:
    """One call: the shared engine; subclasses speak a dialect."""

    dialect = ""
    frame_ms = 20
    keep_current_on_clear = False
    echo_marks_on_clear = False

    def __init__(
        self,
        ws_url: str,
        rate: int,
        segments: list[_Segment],
        end_s: float,
        dtmf: list[tuple[float, str]],
        *,
        script: CallScript | None = None,
        record: bool = True,
    ):
        self.ws_url = ws_url
        self.rate = rate
        self.frame = rate * self.frame_ms // 1000
        self.segments: list[_Segment] = []
        self.end_s = end_s
        self.dtmf = sorted(dtmf)
        self.script = script
        self.record = record
        self.timeline = CallTimeline() if script is None else _ScriptedTimeline(self._notify)
        self.raw: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.marks_echoed: list[str] = []
        self.clears = 0
        self.player = _Player(rate, lambda t, what, details: self.timeline.add(t, what, **details), keep=record)
        # The caller's track is mixed frame by frame from its segments: those yet to start (by start
        # sample) and those sounding now.
        self._track_length = int(np.ceil(self.end_s * self.rate / self.frame)) * self.frame + self.frame
        self._upcoming: list[_Segment] = []
        self._active: list[_Segment] = []
        self._silence = np.zeros(self.frame, np.int16)
        self._next_frame = 0
        for seg in segments:
            self._place(seg)
        self._ws: Any = None
        self._t0 = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._hanging_up = False
        self._closed_by = "caller"
        self._stream_end = end_s
        self._close_code: int | None = None
        self._last_audio_at: float | None = None
        self._burst_pending = True
        self._problem_counts: dict[str, int] = {}

    def _place(self, seg: _Segment) -> None:
        """Put a segment on the caller's track (clipped at the end of the call)."""
        self.segments.append(seg)
        seg.start = round(seg.start_s * self.rate)
        seg.stop = min(self._track_length, seg.start + seg.samples.size)
        if seg.stop > seg.start:
            seg.first_frame = seg.start // self.frame
            seg.last_frame = (seg.stop - 1) // self.frame
            bisect.insort(self._upcoming, seg, key=lambda other: other.start)
        else:
            seg.first_frame = seg.last_frame = -1

    def _frame_audio(self, k: int) -> tuple[np.ndarray, list[_Segment]]:
        """Caller frame ``k`` and the segments sounding in it."""
        lo = k * self.frame
        hi = lo + self.frame
        while self._upcoming and self._upcoming[0].start < hi:
            self._active.append(self._upcoming.pop(0))
        sounding = self._active
        if not sounding:
            return self._silence, []
        self._active = [seg for seg in sounding if seg.last_frame > k]
        if len(sounding) == 1 and sounding[0].start <= lo and sounding[0].stop >= hi:
            seg = sounding[0]
            return seg.samples[lo - seg.start : hi - seg.start], sounding
        mix = np.zeros(self.frame, np.int32)
        for seg in sounding:
            a, b = max(lo, seg.start), min(hi, seg.stop)
            if b > a:
                mix[a - lo : b - lo] += seg.samples[a - seg.start : b - seg.start]
        return np.clip(mix, -32768, 32767).astype(np.int16), sounding

    def _notify(self, t: float, what: str, details: dict[str, Any]) -> None:
        if self.script is not None:
            self.script.on_event(self, t, what, details)

    @property
    def agent_playing(self) -> bool:
        """Whether agent audio is playing or queued for playback right now."""
        return self.player.playing or self.player.queued_samples() > 0

    def say(self, samples: np.ndarray, at_s: float | None = None) -> float:
        """Speak ``samples`` (int16 mono at ``self.rate``) from ``at_s`` (by default and at the earliest:
        the next frame not yet sent); returns the call time the speech starts at."""
        samples = _int16(samples, "samples")
        earliest = self._next_frame * self.frame / self.rate
        start_s = max(earliest, self.now() if at_s is None else float(at_s))
        self._place(_Segment(len(self.segments), start_s, samples, last_voiced_s(samples, self.rate)))
        return start_s

    @property
    def session_id(self) -> str | None:
        """The call's id at the gateway."""
        return None

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time() - self._t0

    def problem(self, text: str) -> None:
        """Note a protocol deviation (each distinct text is recorded on the timeline once)."""
        self._problem_counts[text] = self._problem_counts.get(text, 0) + 1
        if self._problem_counts[text] == 1:
            self.problems.append(text)
            self.timeline.add(self.now(), "problem", text=text)

    async def send(self, message: str | bytes) -> bool:
        """Send one frame; False if the socket is gone."""
        if self._closed.is_set():
            return False
        try:
            await self._ws.send(message)
        except ConnectionClosed:
            self._closed.set()
            return False
        return True

    async def send_json(self, build: Callable[[], dict[str, Any]]) -> bool:
        """Build and send a JSON message under the send lock, so sequence numbers go out in order."""
        async with self._send_lock:
            return await self.send(json.dumps(build(), separators=(",", ":")))

    async def run(self, pre_events: list[tuple[float, str, dict[str, Any]]]) -> CallResult:
        """Dial, play the caller's part and listen until hang-up; ``pre_events`` carry event-loop times."""
        self._loop = asyncio.get_running_loop()
        async with websockets.connect(
            self.ws_url,
            open_timeout=_OPEN_TIMEOUT_S,
            close_timeout=_CLOSE_TIMEOUT_S,
            max_size=_MAX_MESSAGE_BYTES,
            compression=None,
        ) as ws:
            self._ws = ws
            self._t0 = self._loop.time()
            for t, what, details in pre_events:
                self.timeline.add(t - self._t0, what, **details)
            self.timeline.add(0.0, "connected", url=self.ws_url)
            await self.on_open()
            if self.script is not None:
                self.script.on_start(self)
            receiver = asyncio.create_task(self._receive())
            ticker = asyncio.create_task(self._tick())
            try:
                await self._stream()
                self._stream_end = self.now()
                await self._hang_up()
            finally:
                self._closed.set()
                for task in (receiver, ticker):
                    task.cancel()
                for task in (receiver, ticker):
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        duration = self.now()
        self.player.flush(duration)
        self.timeline.events.sort(key=lambda event: event[0])
        return CallResult(
            agent_audio=self.player.heard(),
            sample_rate=self.rate,
            timeline=self.timeline,
            marks_echoed=self.marks_echoed,
            clears=self.clears,
            raw_received=self.raw,
            heard_track=self.player.track(duration),
            caller_last_voiced_s=self._last_voiced(),
            problems=self.problems,
            closed_by=self._closed_by,
            close_code=self._close_code,
            underruns=self.player.underruns,
            underrun_s=self.player.underrun_s,
            session_id=self.session_id,
        )

    def _last_voiced(self) -> float | None:
        """Call time of the last voiced sample the caller got to say before the stream ended."""
        ends = [
            min(seg.start_s + seg.last_voiced_s, self._stream_end)
            for seg in self.segments
            if seg.last_voiced_s is not None and seg.start_s < self._stream_end
        ]
        return max(ends, default=None)

    async def _sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout=delay)

    async def _stream(self) -> None:
        """Send the caller's frames on the frame clock, DTMF when due, until the end of the call."""
        frame_s = self.frame / self.rate
        dtmf = deque(self.dtmf)
        k = 0
        while not self._closed.is_set():
            due = (k + 1) * frame_s
            if due > self.end_s:
                break
            await self._sleep_until(due)
            if self._closed.is_set():
                break
            samples, sounding = self._frame_audio(k)
            self._next_frame = k + 1
            if not await self.send_frame(k, samples):
                break
            for seg in sounding:
                if seg.first_frame == k:
                    self.timeline.add(
                        self.now(),
                        "caller speech start",
                        segment=seg.index,
                        at_ms=round(seg.start_s * 1000),
                        duration_ms=round(seg.samples.size * 1000 / self.rate),
                    )
                if seg.last_frame == k:
                    voiced = None if seg.last_voiced_s is None else round((seg.start_s + seg.last_voiced_s) * 1000)
                    self.timeline.add(self.now(), "caller speech end", segment=seg.index, last_voiced_ms=voiced)
            while dtmf and dtmf[0][0] <= self.now():
                _, digit = dtmf.popleft()
                await self.send_dtmf(digit)
            k += 1
        if not self._closed.is_set():
            await self._sleep_until(self.end_s)

    async def _hang_up(self) -> None:
        now = self.now()
        await self._deliver(self.player.advance(now))
        unplayed_ms = round(self.player.queued_samples() * 1000 / self.rate)
        if self._closed.is_set():
            self.timeline.add(now, "call ended", unplayed_ms=unplayed_ms)
            return
        self._hanging_up = True
        self.timeline.add(now, "hang up", unplayed_ms=unplayed_ms)
        await self.send_stop()
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            await asyncio.wait_for(self._ws.close(), timeout=_CLOSE_TIMEOUT_S + 1)

    async def _receive(self) -> None:
        try:
            await self._receive_until_closed()
            if not self._hanging_up:
                self._closed_by = "server"
                self._close_code = self._ws.close_code
                self.timeline.add(self.now(), "server closed", code=self._ws.close_code, reason=self._ws.close_reason)
        finally:
            self._closed.set()

    async def _receive_until_closed(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self._ws:
                now = self.now()
                if isinstance(message, bytes):
                    if self.record:
                        self.raw.append({"binary": len(message)})
                    await self.on_binary(now, message)
                    continue
                try:
                    parsed = json.loads(message)
                except ValueError:
                    parsed = None
                if not isinstance(parsed, dict):
                    if self.record:
                        self.raw.append({"text": message})
                    await self.on_text(now, message)
                    continue
                if self.record:
                    self.raw.append(parsed)
                await self.on_json(now, parsed)

    async def _tick(self) -> None:
        while not self._closed.is_set():
            await self._deliver(self.player.advance(self.now()))
            if self.script is not None:
                self.script.on_tick(self, self.now())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout=_TICK_S)

    async def _deliver(self, marks: list[str], *, via: str = "played") -> None:
        if self._hanging_up:
            return
        for name in marks:
            self.marks_echoed.append(name)
            self.timeline.add(self.now(), "mark echoed", name=name, via=via)
            await self.echo_mark(name)

    async def on_agent_audio(self, now: float, samples: np.ndarray, size: int) -> None:
        """Queue agent audio for playback and note first bytes and the start of bursts."""
        if self._last_audio_at is None:
            self.timeline.add(now, "agent audio first byte", bytes=size)
        gap = None if self._last_audio_at is None else now - self._last_audio_at
        if self._burst_pending or gap is None or gap >= _BURST_GAP_S:
            queued_ms = round(self.player.queued_samples() * 1000 / self.rate)
            self.timeline.add(now, "agent audio start", bytes=size, queued_ms=queued_ms)
        self._burst_pending = False
        self._last_audio_at = now
        await self._deliver(self.player.push_audio(now, samples))

    async def agent_mark(self, now: float, name: str) -> None:
        self.timeline.add(now, "mark received", name=name)
        await self._deliver(self.player.push_mark(now, name))

    async def agent_clear(self, now: float) -> None:
        self.clears += 1
        reached, dropped, pending = self.player.clear(now, keep_current=self.keep_current_on_clear)
        await self._deliver(reached)
        self.timeline.add(
            now,
            "clear received",
            dropped_ms=round(dropped * 1000 / self.rate),
            pending_marks=len(pending),
            kept_ms=round(self.player.queued_samples() * 1000 / self.rate),
        )
        self._burst_pending = True
        if self.echo_marks_on_clear:
            await self._deliver(pending, via="clear")

    async def on_open(self) -> None:
        """Send what the carrier sends right after the WebSocket opens."""

    async def send_frame(self, k: int, samples: np.ndarray) -> bool:
        """Send caller frame ``k`` (0-based); False if the socket is gone."""
        raise NotImplementedError

    async def send_dtmf(self, digit: str) -> None:
        """Send a DTMF digit."""
        self.timeline.add(self.now(), "dtmf skipped", digit=digit, reason=f"{self.dialect} has no DTMF")

    async def send_stop(self) -> None:
        """Say goodbye before closing the socket on hang-up."""

    async def echo_mark(self, name: str) -> None:
        """Tell the server that playback reached mark ``name``."""

    async def on_json(self, now: float, message: dict[str, Any]) -> None:
        """Handle a JSON object from the server."""
        self.timeline.add(now, "text received", text=json.dumps(message)[:120])

    async def on_text(self, now: float, text: str) -> None:
        """Handle a text frame that is not a JSON object."""
        self.problem("text frame that is not a JSON object")
        self.timeline.add(now, "text received", text=text[:120])

    async def on_binary(self, now: float, data: bytes) -> None:
        """Handle a binary frame."""
        self.problem("binary frame on a JSON-only stream")


def _decode_payload(call: _Call, message: dict[str, Any]) -> bytes | None:
    media = message.get("media")
    payload = media.get("payload") if isinstance(media, dict) else None
    if not isinstance(payload, str):
        call.problem("media without media.payload string")
        return None
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        call.problem("media.payload is not valid base64")
        return None


class _TwilioCall(_Call):
    dialect = "twilio"
    frame_ms = 20
    keep_current_on_clear = False
    echo_marks_on_clear = True

    def __init__(self, *args: Any, custom_parameters: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.call_sid = "CA" + secrets.token_hex(16)
        self.account_sid = "AC" + secrets.token_hex(16)
        self.custom_parameters = custom_parameters
        self._seq = 0

    @property
    def session_id(self) -> str | None:
        """The call's id at the gateway: the stream sid."""
        return self.stream_sid

    def _next(self) -> str:
        self._seq += 1
        return str(self._seq)

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

    async def send_dtmf(self, digit: str) -> None:
        await self.send_json(
            lambda: {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": self._next(),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )
        self.timeline.add(self.now(), "dtmf sent", digit=digit)

    async def echo_mark(self, name: str) -> None:
        await self.send_json(
            lambda: {
                "event": "mark",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "mark": {"name": name},
            }
        )

    async def send_stop(self) -> None:
        await self.send_json(
            lambda: {
                "event": "stop",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
            }
        )
        self.timeline.add(self.now(), "stop sent")

    async def on_json(self, now: float, message: dict[str, Any]) -> None:
        event = message.get("event")
        if message.get("streamSid") != self.stream_sid:
            self.problem(f"{event!r} message without the stream's streamSid")
        if event == "media":
            data = _decode_payload(self, message)
            if data is not None:
                await self.on_agent_audio(now, ulaw_decode(data), len(data))
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

    async def on_binary(self, now: float, data: bytes) -> None:
        self.problem("binary frame (Twilio warning 31950, Malformed Message)")


class _ExotelCall(_Call):
    dialect = "exotel"
    frame_ms = 100
    keep_current_on_clear = True
    echo_marks_on_clear = False

    def __init__(self, *args: Any, custom_parameters: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_sid = secrets.token_hex(16)
        self.call_sid = secrets.token_hex(16)
        self.account_sid = "voicectl" + secrets.token_hex(2)
        self.custom_parameters = custom_parameters
        self._seq = 0

    @property
    def session_id(self) -> str | None:
        """The call's id at the gateway: the stream sid."""
        return self.stream_sid

    def _next(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def on_open(self) -> None:
        await self.send(json.dumps({"event": "connected"}))
        self.timeline.add(self.now(), "sent connected")
        await self.send_json(
            lambda: {
                "event": "start",
                "sequence_number": self._next(),
                "stream_sid": self.stream_sid,
                "start": {
                    "stream_sid": self.stream_sid,
                    "call_sid": self.call_sid,
                    "account_sid": self.account_sid,
                    "from": "+919876543210",
                    "to": "+918047491899",
                    "custom_parameters": dict(self.custom_parameters),
                    "media_format": {"encoding": "audio/x-raw", "sample_rate": str(self.rate), "bit_rate": "16"},
                },
            }
        )
        self.timeline.add(self.now(), "sent start", stream_sid=self.stream_sid, sample_rate=self.rate)

    async def send_frame(self, k: int, samples: np.ndarray) -> bool:
        payload = base64.b64encode(samples.astype("<i2").tobytes()).decode("ascii")
        return await self.send_json(
            lambda: {
                "event": "media",
                "sequence_number": self._next(),
                "stream_sid": self.stream_sid,
                "media": {"chunk": str(k + 1), "timestamp": str((k + 1) * self.frame_ms), "payload": payload},
            }
        )

    async def send_dtmf(self, digit: str) -> None:
        await self.send_json(
            lambda: {
                "event": "dtmf",
                "sequence_number": self._next(),
                "stream_sid": self.stream_sid,
                "dtmf": {"digit": digit, "duration": "100"},
            }
        )
        self.timeline.add(self.now(), "dtmf sent", digit=digit)

    async def echo_mark(self, name: str) -> None:
        await self.send_json(
            lambda: {
                "event": "mark",
                "sequence_number": self._next(),
                "stream_sid": self.stream_sid,
                "mark": {"name": name},
            }
        )

    async def send_stop(self) -> None:
        await self.send_json(
            lambda: {
                "event": "stop",
                "sequence_number": self._next(),
                "stream_sid": self.stream_sid,
                "stop": {"call_sid": self.call_sid, "account_sid": self.account_sid, "reason": "callended"},
            }
        )
        self.timeline.add(self.now(), "stop sent", reason="callended")

    async def on_json(self, now: float, message: dict[str, Any]) -> None:
        event = message.get("event")
        sid = message.get("stream_sid", message.get("streamSid"))
        if sid != self.stream_sid:
            self.problem(f"{event!r} message without the stream's stream_sid")
        if event == "media":
            data = _decode_payload(self, message)
            if data is None:
                return
            if len(data) % _EXOTEL_CHUNK_MULTIPLE:
                self.problem(f"media chunk of {len(data)} bytes is not a multiple of {_EXOTEL_CHUNK_MULTIPLE}")
            if len(data) < _EXOTEL_MIN_CHUNK:
                self.problem(f"media chunk of {len(data)} bytes is below the {_EXOTEL_MIN_CHUNK}-byte minimum")
            if len(data) > _EXOTEL_MAX_CHUNK:
                self.problem(f"media chunk of {len(data)} bytes is above the {_EXOTEL_MAX_CHUNK}-byte maximum")
            usable = len(data) - len(data) % 2
            samples = np.frombuffer(data[:usable], dtype="<i2").astype(np.int16)
            await self.on_agent_audio(now, samples, len(data))
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


class _PcmCall(_Call):
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


def _split_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https", "ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r}")
    return parts


def _ws_scheme(scheme: str) -> str:
    return {"http": "ws", "https": "wss"}.get(scheme, scheme)


def _http_scheme(scheme: str) -> str:
    return {"ws": "http", "wss": "https"}.get(scheme, scheme)


def dialect_url(dialect: str, url: str, *, sample_rate: int = 8000, parameters: Mapping[str, str] | None = None) -> str:
    """The WebSocket URL a carrier of ``dialect`` would dial, from a base or full URL.

    A URL with no path (``http://127.0.0.1:8000``) gets the dialect's default path; a path given is kept.
    Twilio URLs carry no query string (Twilio does not support one). Exotel URLs get ``sample-rate`` and
    the custom ``parameters`` (Exotel passes custom parameters in the query string) unless already there.

    Args:
        dialect: ``"twilio"`` or ``"exotel"``.
        url: ``http(s)://`` or ``ws(s)://`` URL.
        sample_rate: Exotel's sample rate.
        parameters: Exotel's custom parameters, e.g. ``{"agent_id": "default"}``.

    Returns:
        The ``ws://`` or ``wss://`` URL.
    """
    parts = _split_url(url)
    path = parts.path if parts.path not in ("", "/") else DEFAULT_PATHS[dialect]
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if dialect == "twilio":
        query = []
    else:
        keys = {key for key, _ in query}
        if "sample-rate" not in keys and "sample_rate" not in keys:
            query.append(("sample-rate", str(sample_rate)))
        query += [(key, str(value)) for key, value in (parameters or {}).items() if key not in keys]
    return urllib.parse.urlunsplit((_ws_scheme(parts.scheme), parts.netloc, path, urllib.parse.urlencode(query), ""))


def _trigger(url: str, fields: dict[str, Any], api_key: str | None = None) -> tuple[str, dict[str, Any]]:
    """POST /api/calls/trigger; returns the absolute WebSocket URL and the response."""
    parts = _split_url(url)
    base = urllib.parse.urlunsplit((_http_scheme(parts.scheme), parts.netloc, "", "", ""))
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        base + "/api/calls/trigger", data=json.dumps(fields).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S) as response:
            body = json.loads(response.read().decode() or "null")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise CallError(f"POST {base}/api/calls/trigger: HTTP {exc.code} {detail}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CallError(f"POST {base}/api/calls/trigger failed: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("websocket_url"), str):
        raise CallError(f"POST {base}/api/calls/trigger returned no websocket_url: {body!r}")
    ws_url = body["websocket_url"]
    if "://" in ws_url:
        ws_parts = urllib.parse.urlsplit(ws_url)
        ws_url = urllib.parse.urlunsplit((_ws_scheme(ws_parts.scheme), *ws_parts[1:]))
    else:
        ws_url = urllib.parse.urljoin(f"{_ws_scheme(_http_scheme(parts.scheme))}://{parts.netloc}/", ws_url)
    return ws_url, body


def _int16(samples: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(samples, np.ndarray) or samples.dtype != np.int16:
        raise ValueError(f"{what} must be an int16 numpy array")
    return samples.reshape(-1)


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
        sample_rate: Exotel's sample rate (8000, 16000 or 24000); ignored for the other dialects.
        parameters: More call fields (the agent's template variables, e.g. ``{"driver_name": "John"}``):
            Twilio ``customParameters``, Exotel custom parameters (query string and ``custom_parameters``),
            extra fields of the PCM trigger body.
        script: Decides during the call what else the caller says (see ``CallScript``).
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
    rate = {"twilio": 8000, "exotel": sample_rate, "pcm": 16000}[dialect]
    utterances = [(speech_at_s, _int16(caller_audio, "caller_audio"))]
    utterances += [(at, _int16(samples, "extra_speech audio")) for at, samples in extra_speech]
    segments = []
    for index, (at, samples) in enumerate(utterances):
        converted = resample(samples, caller_rate, rate)
        segments.append(_Segment(index, max(0.0, float(at)), converted, last_voiced_s(samples, caller_rate)))
    speech_end = max((seg.start_s + seg.samples.size / rate for seg in segments), default=0.0)
    end_s = float(hang_up_after_s) if hang_up_after_s is not None else speech_end + listen_s
    common: tuple[Any, ...] = (rate, segments, end_s, list(dtmf))
    options: dict[str, Any] = {"script": script, "record": record}

    fields = {"agent_id": agent_id, **{key: str(value) for key, value in (parameters or {}).items()}}
    loop = asyncio.get_running_loop()
    pre_events: list[tuple[float, str, dict[str, Any]]] = []
    runner: _Call
    if dialect == "twilio":
        runner = _TwilioCall(dialect_url("twilio", url), *common, custom_parameters=fields, **options)
    elif dialect == "exotel":
        ws_url = dialect_url("exotel", url, sample_rate=sample_rate, parameters=fields)
        query = urllib.parse.parse_qsl(urllib.parse.urlsplit(ws_url).query)
        custom = {key: value for key, value in query if key not in ("sample-rate", "sample_rate")}
        runner = _ExotelCall(ws_url, *common, custom_parameters=custom, **options)
    else:
        started = loop.time()
        ws_url, body = await asyncio.to_thread(_trigger, url, fields, api_key)
        pre_events.append((started, "trigger", {"agent_id": agent_id}))
        pre_events.append(
            (loop.time(), "trigger answered", {"session_id": body.get("session_id"), "status": body.get("status")})
        )
        runner = _PcmCall(ws_url, *common, **options)
    return await runner.run(pre_events)
