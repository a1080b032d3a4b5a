"""The call loop every simulated caller shares.

``SimulatedCall`` dials the WebSocket, sends the caller's frames on a fixed frame clock that starts when
the socket opens, plays the agent audio it receives through the real-time ``Player``, echoes marks, notes
protocol problems and hangs up when the call's time is over (or notices that the server hung up). A
subclass speaks one dialect: what goes out right after the socket opens, how a caller frame, a DTMF digit,
a mark echo and the goodbye are sent, and what the server's messages mean (``carrier.py``, ``pcm.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import websockets
from websockets.exceptions import ConnectionClosed

from voicectl.callers.audio import as_int16, last_voiced_s
from voicectl.callers.player import Player
from voicectl.callers.result import CallResult, CallTimeline
from voicectl.callers.script import CallScript, ScriptedTimeline
from voicectl.callers.track import CallerTrack, Segment

__all__ = ["SimulatedCall"]

_OPEN_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 2.0
_TICK_S = 0.01
_BURST_GAP_S = 0.3
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class SimulatedCall:
    """One call: the shared engine; subclasses speak a dialect."""

    dialect = ""
    frame_ms = 20
    keep_current_on_clear = False
    echo_marks_on_clear = False

    def __init__(
        self,
        ws_url: str,
        rate: int,
        segments: list[Segment],
        end_s: float,
        dtmf: list[tuple[float, str]],
        *,
        script: CallScript | None = None,
        record: bool = True,
    ):
        self.ws_url = ws_url
        self.rate = rate
        self.frame = rate * self.frame_ms // 1000
        self.end_s = end_s
        self.dtmf = sorted(dtmf)
        self.script = script
        self.record = record
        self.timeline = CallTimeline() if script is None else ScriptedTimeline(self._notify)
        self.raw: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.marks_echoed: list[str] = []
        self.clears = 0
        self.player = Player(rate, lambda t, what, details: self.timeline.add(t, what, **details), keep=record)
        self.track = CallerTrack(rate, self.frame, end_s, segments)
        self._next_frame = 0
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
        samples = as_int16(samples, "samples")
        earliest = self._next_frame * self.frame / self.rate
        start_s = max(earliest, self.now() if at_s is None else float(at_s))
        self.track.place(Segment(len(self.track.segments), start_s, samples, last_voiced_s(samples, self.rate)))
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
            caller_last_voiced_s=self.track.last_voiced(self._stream_end),
            problems=self.problems,
            closed_by=self._closed_by,
            close_code=self._close_code,
            underruns=self.player.underruns,
            underrun_s=self.player.underrun_s,
            session_id=self.session_id,
        )

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
            samples, sounding = self.track.frame_audio(k)
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
