"""``voicectl load``: many concurrent real-time calls against a running gateway, turn after turn.

    voicectl load --calls 20 --dialect twilio --duration 120 --ramp 10 --barge-in-rate 0.2 --png load.png

Every call is a simulated caller speaking real speech in real time: the Twilio, Exotel and raw PCM carriers
of ``voicectl.callers``, driven by a ``CallScript`` that takes turns, or a small client of the browser
protocol at ``/ws`` (seed 001). The caller listens to the greeting, says one of a few questions rendered
once with Piper, waits for the answer, listens to it, pauses and asks again, until the run ends. A
fraction of the answers it interrupts (barge-in). Calls that fail or that the server ends are replaced
while time remains; all of them hang up when the run ends.

Measured at the caller:

* voice-to-voice: from the caller's last voiced sample to the first byte of the answer's audio (browser:
  from the ``audio`` message, sent when the caller stops talking, to the first ``audio_response``);
* barge-in: from the onset of the interrupting speech to the moment the agent's audio stops for the caller
  (the ``clear`` message on Twilio and Exotel; raw PCM has none: the end of playback). The browser protocol
  queues turns and has no barge-in.

Errors are counted by kind (``connect``, ``handshake HTTP 403``, ``no answer``, ``closed by server``,
``protocol``, …). The run ends with a table; ``--json`` and ``--png`` save the figures and a latency plot. Ctrl-C ends
the run early, with the table of what was measured so far.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import random
import shutil
import signal
import sys
import time
import urllib.parse
import wave
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from voice_audio import resample, wav_bytes
from voicectl.callers import CallScript, LiveCall, first_voiced_s, last_voiced_s
from voicectl.gateway_api import default_api_key, http_base
from voicectl.load_report import latency_figures, render_png, table

__all__ = [
    "DIALECTS",
    "LoadOptions",
    "LoadStats",
    "Progress",
    "Utterance",
    "add_parser",
    "render_utterances",
    "run",
    "run_load",
]

DIALECTS = ("twilio", "exotel", "pcm", "browser")
EXOTEL_RATES = (8000, 16000, 24000)
QUESTIONS = (
    "What time do you open tomorrow?",
    "Can you help me with my order?",
    "I would like to book a table for two people.",
    "Do you have any vegetarian dishes on the menu?",
)
INTERRUPTION = "Sorry, wait a moment please."
BROWSER_RATE = 16000
# The caller waits this long for a greeting before speaking first.
GREETING_WAIT_S = 4.0
# ... and pauses this long after the agent went quiet before speaking again.
THINK_S = 0.8
# A barge-in starts this long after the first audio of the answer it interrupts.
BARGE_IN_AFTER_S = 0.4
# No new question when the call would end before the answer could come.
END_ROOM_S = 4.0
# A replacement call is placed only when at least this much of the run is left (a first call: 1 s).
MIN_CALL_S = 5.0
RETRY_PAUSE_S = 1.0
PROGRESS_INTERVAL_S = 0.5
# How often the callers' own event-loop lag is probed.
LAG_PROBE_S = 0.05


@dataclass(frozen=True)
class Utterance:
    """Something the caller says: int16 mono speech with its voiced span.

    Attributes:
        text: The words.
        samples: int16 mono samples.
        rate: Their sample rate in Hz.
        onset_s: Offset of the first voiced 10 ms window.
        last_voiced_s: Offset of the end of the last voiced 10 ms window.
    """

    text: str
    samples: np.ndarray
    rate: int
    onset_s: float
    last_voiced_s: float

    @classmethod
    def of(cls, text: str, samples: np.ndarray, rate: int) -> Utterance:
        """Wrap speech, finding its voiced span.

        Raises:
            ValueError: If the speech is silent.
        """
        samples = np.ascontiguousarray(samples, dtype=np.int16).reshape(-1)
        onset, last = first_voiced_s(samples, rate), last_voiced_s(samples, rate)
        if onset is None or last is None:
            raise ValueError(f"the speech for {text!r} is silent")
        return cls(text, samples, rate, onset, last)

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return self.samples.size / self.rate

    def at(self, rate: int) -> Utterance:
        """The same speech resampled to ``rate``."""
        if rate == self.rate:
            return self
        return Utterance.of(self.text, resample(self.samples, self.rate, rate), rate)


async def render_utterances(texts: Sequence[str], *, nats_url: str = "", timeout: float = 60.0) -> list[Utterance]:
    """Speak ``texts`` once: with Piper in this process when it is installed, else with the TTS worker.

    Args:
        texts: What to say.
        nats_url: The bus, for the TTS worker fallback.
        timeout: Seconds to wait for each synthesis through the bus.

    Returns:
        One utterance per text, in order.

    Raises:
        RuntimeError: If neither Piper nor the TTS worker can speak.
    """
    from voicectl import speech

    if speech.piper_available():
        spoken = [await asyncio.to_thread(speech.speak, text) for text in texts]
        return [Utterance.of(text, samples, rate) for text, (samples, rate) in zip(texts, spoken, strict=True)]
    from voice.v1 import audio_pb2, tts_pb2
    from voice_bus.client import BusClient
    from voice_bus.connection import connect

    try:
        nc = await connect(nats_url, name="voicectl-load", connect_timeout_s=3)
    except Exception as exc:
        raise RuntimeError(f"Piper is not installed here and the bus at {nats_url} is unreachable: {exc}") from exc
    try:
        out = []
        for text in texts:
            request = tts_pb2.SynthesizeRequest(text=text, output_format=audio_pb2.AudioFormat(sample_rate=16000))
            events = await BusClient(nc).collect("tts", request, timeout=timeout)
            pcm = b"".join(event.chunk.audio for event in events if event.HasField("chunk"))
            out.append(Utterance.of(text, np.frombuffer(pcm, dtype="<i2"), 16000))
        return out
    finally:
        await nc.close()


@dataclass
class LoadOptions:
    """What to run.

    Attributes:
        gateway: The gateway's base URL.
        dialect: ``twilio``, ``exotel``, ``pcm`` or ``browser``.
        calls: Concurrent calls.
        duration_s: Length of the run, from the first call to the hang-ups.
        ramp_s: The calls start evenly spread over this many seconds.
        barge_in_rate: Fraction of the answers the caller interrupts (not for ``browser``).
        agent: The agent to call.
        api_key: Bearer key for the REST API (the PCM trigger).
        sample_rate: Exotel's sample rate.
        answer_timeout_s: An answer that has not started this long after the caller stopped is an error.
        seed: Seeds the choice of questions and of the answers to interrupt.
    """

    gateway: str = "http://127.0.0.1:8000"
    dialect: str = "twilio"
    calls: int = 4
    duration_s: float = 60.0
    ramp_s: float = 0.0
    barge_in_rate: float = 0.0
    agent: str = "default"
    api_key: str = ""
    sample_rate: int = 8000
    answer_timeout_s: float = 20.0
    seed: int | None = None


@dataclass
class LoadStats:
    """What the calls measured and what went wrong, as it happens.

    Attributes:
        turns: ``(call, run time the caller stopped talking, voice-to-voice s)`` of each answered turn.
        barge_ins: ``(call, run time of the interruption's onset, latency s or None if the agent went on)``.
        errors: Count of each kind of error.
        error_examples: The first message seen of each kind.
        calls_placed: Calls dialled (replacements included).
        calls_completed: Calls that lasted until the run's end.
        active: Calls up right now.
        underruns: Playback underruns the callers heard (agent audio arriving slower than real time).
        unplanned_interruptions: ``clear`` messages that no planned barge-in asked for.
        loop_lags: How late each probe of the callers' event loop woke up, in seconds.
    """

    turns: list[tuple[int, float, float]] = field(default_factory=list)
    barge_ins: list[tuple[int, float, float | None]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    calls_placed: int = 0
    calls_completed: int = 0
    active: int = 0
    underruns: int = 0
    unplanned_interruptions: int = 0
    loop_lags: list[float] = field(default_factory=list)

    def error(self, kind: str, message: str = "") -> None:
        """Count an error of ``kind``, keeping the first message of each kind."""
        self.errors[kind] += 1
        if message and kind not in self.error_examples:
            self.error_examples[kind] = message[:300]


@dataclass
class _Run:
    """What the calls of one run share."""

    options: LoadOptions
    stats: LoadStats
    questions: list[Utterance]
    interruption: Utterance
    started_at: float
    ends_at: float
    rng: random.Random

    def clock(self) -> float:
        return asyncio.get_running_loop().time()


@dataclass
class _Awaiting:
    """A caller utterance waiting for its answer (call seconds)."""

    last_voiced_at: float
    deadline: float


@dataclass
class _BargeIn:
    onset_at: float
    checked: bool = False
    attempted: bool = False
    latency_s: float | None = None


class _Conversation(CallScript):
    """The turn-taking caller of one carrier call: listen, ask, wait for the answer, maybe interrupt it."""

    def __init__(self, index: int, run: _Run, questions: list[Utterance], interruption: Utterance) -> None:
        self.index = index
        self.run = run
        self.questions = questions
        self.interruption = interruption
        self.next_question = run.rng.randrange(len(questions))
        self.state = "listening"
        self.heard_anything = False
        self.quiet_since: float | None = None
        self.awaiting: _Awaiting | None = None
        self.barge: _BargeIn | None = None
        self.offset = 0.0
        self.stop_event = "clear received"

    def on_start(self, call: LiveCall) -> None:
        self.offset = self.run.clock() - call.now() - self.run.started_at
        self.stop_event = "playback end" if call.dialect == "pcm" else "clear received"

    def _ask(self, call: LiveCall, t: float) -> None:
        question = self.questions[self.next_question % len(self.questions)]
        if t + question.duration_s + END_ROOM_S > call.end_s:
            self.state = "done"
            return
        self.next_question += 1
        start = call.say(question.samples)
        last = start + question.last_voiced_s
        self.awaiting = _Awaiting(last, last + self.run.options.answer_timeout_s)
        self.state = "awaiting"

    def on_tick(self, call: LiveCall, t: float) -> None:
        barge = self.barge
        if barge is not None and not barge.checked and t >= barge.onset_at:
            barge.checked = True
            barge.attempted = call.agent_playing or barge.latency_s is not None
        if self.state == "awaiting" and self.awaiting is not None and t > self.awaiting.deadline:
            timeout = self.run.options.answer_timeout_s
            self.run.stats.error("no answer", f"no agent audio {timeout:g} s after the caller stopped talking")
            self.awaiting = None
            self._finish_barge()
            self.state = "listening"
            self.quiet_since = None
        if self.state != "listening":
            return
        if call.agent_playing:
            self.heard_anything = True
            self.quiet_since = None
            return
        if self.quiet_since is None:
            self.quiet_since = t
        if not self.heard_anything and t < GREETING_WAIT_S:
            return
        if t - self.quiet_since >= THINK_S or not self.heard_anything:
            self._ask(call, t)

    def on_event(self, call: LiveCall, t: float, what: str, details: dict[str, Any]) -> None:
        stats = self.run.stats
        if what == "agent audio start":
            self.heard_anything = True
            awaiting = self.awaiting
            if self.state == "awaiting" and awaiting is not None and t >= awaiting.last_voiced_at:
                stats.turns.append((self.index, self.offset + awaiting.last_voiced_at, t - awaiting.last_voiced_at))
                self.awaiting = None
                self._finish_barge()
                if self.run.options.barge_in_rate > 0 and self.run.rng.random() < self.run.options.barge_in_rate:
                    self._interrupt(call, t)
                else:
                    self.state = "listening"
                    self.quiet_since = None
        elif what == "clear received" and not (self.barge and self.stop_event == what):
            stats.unplanned_interruptions += 1
        elif what == "playback end" and details.get("underruns"):
            stats.underruns += int(details["underruns"])
        barge = self.barge
        if what == self.stop_event and barge is not None and barge.latency_s is None and t >= barge.onset_at:
            if what == "clear received" or barge.attempted:
                barge.latency_s = t - barge.onset_at
                barge.attempted = True

    def _interrupt(self, call: LiveCall, t: float) -> None:
        speech = self.interruption
        if t + BARGE_IN_AFTER_S + speech.duration_s + END_ROOM_S > call.end_s:
            self.state = "done"
            return
        start = call.say(speech.samples, t + BARGE_IN_AFTER_S)
        last = start + speech.last_voiced_s
        self.barge = _BargeIn(start + speech.onset_s)
        self.awaiting = _Awaiting(last, last + self.run.options.answer_timeout_s)
        self.state = "awaiting"

    def _finish_barge(self) -> None:
        barge, self.barge = self.barge, None
        if barge is not None and barge.attempted:
            self.run.stats.barge_ins.append((self.index, self.offset + barge.onset_at, barge.latency_s))


def _error_kind(exc: BaseException) -> str:
    from websockets.exceptions import InvalidHandshake, InvalidStatus, WebSocketException

    from voicectl.callers import CallError

    if isinstance(exc, CallError):
        return "trigger failed"
    if isinstance(exc, InvalidStatus):
        return f"handshake HTTP {exc.response.status_code}"
    if isinstance(exc, InvalidHandshake):
        return "handshake"
    if isinstance(exc, TimeoutError):
        return "connect timeout"
    if isinstance(exc, OSError):
        return "connect"
    if isinstance(exc, WebSocketException):
        return "websocket"
    return type(exc).__name__


async def _carrier_calls(index: int, run: _Run) -> None:
    """One call slot of a carrier dialect: a call until the end of the run, replaced if it ends early."""
    from voicectl.callers import call

    options = run.options
    rate = {"twilio": 8000, "exotel": options.sample_rate, "pcm": 16000}[options.dialect]
    questions = [q.at(rate) for q in run.questions]
    interruption = run.interruption.at(rate)
    silence = np.zeros(0, np.int16)
    for attempt in itertools.count():
        if run.ends_at - run.clock() < (MIN_CALL_S if attempt else 1.0):
            return
        script = _Conversation(index, run, questions, interruption)
        run.stats.calls_placed += 1
        run.stats.active += 1
        try:
            result = await call(
                options.dialect,
                options.gateway,
                silence,
                rate,
                agent_id=options.agent,
                hang_up_after_s=run.ends_at - run.clock(),
                sample_rate=options.sample_rate,
                script=script,
                record=False,
                api_key=options.api_key or None,
            )
        except Exception as exc:
            run.stats.error(_error_kind(exc), str(exc) or type(exc).__name__)
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        finally:
            run.stats.active -= 1
        script._finish_barge()
        if result.problems:
            run.stats.error("protocol", "; ".join(result.problems))
        if result.closed_by == "server":
            run.stats.error("closed by server", f"close code {result.close_code}")
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        run.stats.calls_completed += 1
        return


def _browser_url(gateway: str) -> str:
    parts = urllib.parse.urlsplit(http_base(gateway))
    return urllib.parse.urlunsplit(({"http": "ws", "https": "wss"}[parts.scheme], parts.netloc, "/ws", "", ""))


def _wav_seconds(encoded: str) -> float:
    try:
        with wave.open(io.BytesIO(base64.b64decode(encoded))) as wav:
            return wav.getnframes() / wav.getframerate()
    except (ValueError, EOFError, wave.Error):
        return 0.0


class _BrowserCall:
    """One seed 001 session at ``/ws``: ``audio`` messages (a WAV per utterance), answers played in real time."""

    def __init__(self, index: int, run: _Run, clips: list[tuple[Utterance, str]]) -> None:
        self.index = index
        self.run = run
        self.clips = clips
        self.next_clip = run.rng.randrange(len(clips))
        self.events: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        self.playing_until = 0.0
        self.closed = False

    async def _read(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            async for text in ws:
                now = self.run.clock()
                try:
                    message = json.loads(text)
                except ValueError:
                    self.run.stats.error("protocol", f"not JSON: {str(text)[:80]!r}")
                    continue
                if not isinstance(message, dict):
                    continue
                data = message.get("data") if isinstance(message.get("data"), dict) else {}
                if message.get("type") == "audio_response" and isinstance(data.get("audio"), str):
                    self.playing_until = max(self.playing_until, now) + _wav_seconds(data["audio"])
                await self.events.put((now, message))
        self.closed = True
        await self.events.put((self.run.clock(), {"type": "_closed"}))

    async def _until(self, kinds: set[str], timeout: float) -> tuple[float, dict[str, Any]] | None:
        deadline = self.run.clock() + timeout
        while True:
            try:
                at, message = await asyncio.wait_for(self.events.get(), max(0.0, deadline - self.run.clock()))
            except TimeoutError:
                return None
            if message.get("type") in kinds or message.get("type") == "_closed":
                return at, message

    async def _quiet(self, at_least: float) -> None:
        while True:
            wait = max(self.playing_until, self.run.clock()) + at_least - self.run.clock()
            if wait <= 0 or self.run.clock() + wait > self.run.ends_at:
                return
            await asyncio.sleep(wait)
            if self.playing_until + at_least <= self.run.clock():
                return

    async def talk(self) -> bool:
        """Hold the conversation until the run ends; True if the session lasted until then."""
        import websockets

        run, stats = self.run, self.run.stats
        async with websockets.connect(
            _browser_url(run.options.gateway), max_size=None, open_timeout=10, compression=None
        ) as ws:
            reader = asyncio.create_task(self._read(ws))
            try:
                await ws.send(json.dumps({"type": "init", "data": {"agentId": run.options.agent}}))
                got = await self._until({"init_success", "error"}, 10)
                if got is None or got[1]["type"] != "init_success":
                    kind = "init failed" if got is None or got[1]["type"] == "_closed" else "server error"
                    stats.error(kind, json.dumps(got[1] if got else "no init_success in 10 s")[:300])
                    return False
                await self._until({"audio_response"}, GREETING_WAIT_S)
                await self._quiet(THINK_S)
                while not self.closed:
                    utterance, encoded = self.clips[self.next_clip % len(self.clips)]
                    if run.clock() + utterance.duration_s + END_ROOM_S > run.ends_at:
                        break
                    self.next_clip += 1
                    await asyncio.sleep(utterance.duration_s)  # the caller talks, the page records
                    while not self.events.empty():
                        self.events.get_nowait()
                    sent = run.clock()
                    await ws.send(json.dumps({"type": "audio", "data": {"audio": encoded}}))
                    await self._answer(sent)
                    await self._quiet(THINK_S)
                if self.closed:
                    stats.error("closed by server", f"close code {ws.close_code}")
                    return False
                remaining = run.ends_at - run.clock()
                if remaining > 0:
                    await asyncio.sleep(remaining)
                with contextlib.suppress(Exception):
                    await ws.send(json.dumps({"type": "end"}))
                    await self._until({"session_ended"}, 2)
                return True
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _answer(self, sent: float) -> bool:
        """Wait for the turn's answer; record its latency. False on an error (counted)."""
        run, stats = self.run, self.run.stats
        first_audio = None
        deadline = sent + run.options.answer_timeout_s
        while True:
            kinds = {"processing_complete", "error"} | ({"audio_response"} if first_audio is None else set())
            got = await self._until(kinds, max(0.0, deadline - run.clock()))
            if got is None:
                stats.error("no answer", f"no processing_complete {run.options.answer_timeout_s:g} s after audio")
                return False
            at, message = got
            kind = message["type"]
            if kind == "audio_response" and first_audio is None:
                first_audio = at
                stats.turns.append((self.index, sent - run.started_at, at - sent))
                deadline = max(deadline, at + run.options.answer_timeout_s)
            elif kind == "error":
                data = message.get("data") if isinstance(message.get("data"), dict) else {}
                stats.error("server error", str(data.get("error", message))[:300])
                return False
            elif kind == "_closed":
                return False
            elif kind == "processing_complete":
                if first_audio is None:
                    stats.error("no audio", "processing_complete without audio_response")
                    return False
                return True


async def _browser_calls(index: int, run: _Run) -> None:
    """One call slot of the browser dialect."""
    clips = [(q.at(BROWSER_RATE), "") for q in run.questions]
    clips = [(q, base64.b64encode(wav_bytes(q.samples, q.rate)).decode("ascii")) for q, _ in clips]
    for attempt in itertools.count():
        if run.ends_at - run.clock() < (MIN_CALL_S if attempt else 1.0):
            return
        run.stats.calls_placed += 1
        run.stats.active += 1
        try:
            completed = await _BrowserCall(index, run, clips).talk()
        except Exception as exc:
            run.stats.error(_error_kind(exc), str(exc) or type(exc).__name__)
            completed = False
        finally:
            run.stats.active -= 1
        if completed:
            run.stats.calls_completed += 1
            return
        await asyncio.sleep(RETRY_PAUSE_S)


class Progress:
    """A one-line progress bar on a terminal, redrawn in place with ``\\r``; silent elsewhere.

    Args:
        stream: Where to draw (stderr).
        enabled: Draw at all (default: when ``stream`` is a terminal).
    """

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool | None = None) -> None:
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self._width = 0

    def show(self, elapsed_s: float, total_s: float, stats: LoadStats, calls: int) -> None:
        """Redraw the line: elapsed time, calls up, turns, errors and the running voice-to-voice p50."""
        if not self.enabled:
            return
        fraction = min(1.0, max(0.0, elapsed_s / total_s)) if total_s > 0 else 1.0
        bar_width = 24
        done = round(fraction * bar_width)
        latencies = [latency for _, _, latency in stats.turns]
        p50 = f"  v2v p50 {float(np.percentile(latencies, 50)):.2f} s" if latencies else ""
        line = (
            f"[{'#' * done}{'.' * (bar_width - done)}] {fraction:4.0%} {elapsed_s:5.0f}/{total_s:g} s"
            f"  calls {stats.active}/{calls}  turns {len(stats.turns)}  errors {sum(stats.errors.values())}{p50}"
        )
        columns = shutil.get_terminal_size((100, 20)).columns
        line = line[: max(10, columns - 1)]
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def done(self) -> None:
        """End the line."""
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()


async def run_load(
    options: LoadOptions,
    questions: Sequence[Utterance],
    interruption: Utterance,
    *,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Run the calls and return the report (what ``--json`` writes).

    Args:
        options: What to run.
        questions: What the callers ask, in turn (a different first question for each call).
        interruption: What a caller says to barge in.
        progress: Where to show progress, or None.
        stop: Set it to end the run early (the calls are dropped; the report covers what was measured).

    Returns:
        The report: ``config``, ``calls_placed``, ``calls_completed``, ``turns``, ``errors`` (by kind),
        ``error_examples``, ``voice_to_voice_s`` (``n``, ``p50``, ``p95``, ``p99``, ``mean``, ``min``,
        ``max``), ``barge_ins`` (``attempted``, ``stopped``, ``latency_s``; None for the browser),
        ``underruns``, ``unplanned_interruptions``, ``caller_loop_lag_s`` (how late the callers' own
        event loop woke up: over tens of milliseconds, this machine is too busy to measure), ``elapsed_s``,
        ``stopped_early`` and ``samples`` (every turn and barge-in with its call and run time).
    """
    if options.dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {options.dialect!r}; expected one of {', '.join(DIALECTS)}")
    if not questions:
        raise ValueError("no questions to ask")
    loop = asyncio.get_running_loop()
    started = loop.time()
    stats = LoadStats()
    run = _Run(
        options,
        stats,
        list(questions),
        interruption,
        started_at=started,
        ends_at=started + options.duration_s,
        rng=random.Random(options.seed),
    )
    slot: Callable[[int, _Run], Any] = _browser_calls if options.dialect == "browser" else _carrier_calls
    spacing = options.ramp_s / options.calls if options.calls else 0.0

    async def delayed(index: int) -> None:
        await asyncio.sleep(index * spacing)
        await slot(index, run)

    async def watch_loop() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_PROBE_S)
            stats.loop_lags.append(max(0.0, loop.time() - before - LAG_PROBE_S))

    tasks = [asyncio.create_task(delayed(index)) for index in range(options.calls)]
    everything = asyncio.gather(*tasks)
    watcher = asyncio.create_task(watch_loop())
    stopped_early = False
    try:
        while not everything.done():
            if stop is not None and stop.is_set():
                stopped_early = True
                break
            if progress is not None:
                progress.show(loop.time() - started, options.duration_s, stats, options.calls)
            await asyncio.wait([everything], timeout=PROGRESS_INTERVAL_S)
        if not stopped_early:
            await everything
    finally:
        for task in [*tasks, watcher]:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await everything
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if progress is not None:
            progress.show(loop.time() - started, options.duration_s, stats, options.calls)
            progress.done()
    report = _report(options, stats, loop.time() - started)
    report["stopped_early"] = stopped_early
    return report


def _report(options: LoadOptions, stats: LoadStats, elapsed_s: float) -> dict[str, Any]:
    carrier = options.dialect != "browser"
    stopped = [latency for _, _, latency in stats.barge_ins if latency is not None]
    return {
        "config": {
            "gateway": options.gateway,
            "dialect": options.dialect,
            "calls": options.calls,
            "duration_s": options.duration_s,
            "ramp_s": options.ramp_s,
            "barge_in_rate": options.barge_in_rate if carrier else 0.0,
            "agent": options.agent,
            "sample_rate": options.sample_rate if options.dialect == "exotel" else None,
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": elapsed_s,
        "calls_placed": stats.calls_placed,
        "calls_completed": stats.calls_completed,
        "turns": len(stats.turns),
        "errors": dict(stats.errors),
        "error_examples": dict(stats.error_examples),
        "voice_to_voice_s": latency_figures([latency for _, _, latency in stats.turns]),
        "barge_ins": (
            {"attempted": len(stats.barge_ins), "stopped": len(stopped), "latency_s": latency_figures(stopped)}
            if carrier
            else None
        ),
        "underruns": stats.underruns if carrier else None,
        "unplanned_interruptions": stats.unplanned_interruptions if carrier else None,
        "caller_loop_lag_s": {
            name: value for name, value in latency_figures(stats.loop_lags).items() if name in ("p50", "p99", "max")
        },
        "stopped_early": False,
        "samples": {
            "turns": [{"call": c, "t_s": round(t, 3), "latency_s": round(v, 4)} for c, t, v in stats.turns],
            "barge_ins": [
                {"call": c, "t_s": round(t, 3), "latency_s": None if v is None else round(v, 4)}
                for c, t, v in stats.barge_ins
            ],
        },
    }


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``load`` subcommand to ``sub`` (the result of ``add_subparsers``).

    Args:
        sub: The subparsers action of the ``voicectl`` parser.

    Returns:
        The ``load`` parser.
    """
    parser = sub.add_parser(
        "load",
        help="run N concurrent real-time calls against the gateway and report voice-to-voice latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=4, help="concurrent calls (default 4)")
    parser.add_argument(
        "--dialect", choices=DIALECTS, default="twilio", help="how the callers connect (default twilio)"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds the run lasts (default 60)")
    parser.add_argument(
        "--gateway", "--url", default="http://127.0.0.1:8000", help="the gateway (default http://127.0.0.1:8000)"
    )
    parser.add_argument("--ramp", type=float, default=0.0, help="spread the call starts over this many seconds")
    parser.add_argument(
        "--barge-in-rate", type=float, default=0.0, metavar="P", help="fraction of answers to interrupt (0 to 1)"
    )
    parser.add_argument("--agent", default="default", help="agent id (default: default)")
    parser.add_argument(
        "--api-key",
        default=None,
        help="REST API key, sent as Authorization: Bearer (default $GATEWAY_API_KEY or dev-key)",
    )
    parser.add_argument(
        "--sample-rate", type=int, choices=EXOTEL_RATES, default=8000, help="Exotel's ?sample-rate= (default 8000)"
    )
    parser.add_argument(
        "--say",
        action="append",
        default=[],
        metavar="TEXT",
        help="a question the callers ask (repeatable; default: four built-in questions)",
    )
    parser.add_argument(
        "--answer-timeout", type=float, default=20.0, help="seconds an answer may take before it is an error"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the questions' order and the barge-ins")
    parser.add_argument("--png", default="", metavar="OUT.png", help="write a latency plot")
    parser.add_argument("--json", default="", metavar="OUT.json", help="write the figures and every sample")
    return parser


def _check(args: argparse.Namespace) -> str:
    if args.calls < 1:
        return "--calls must be at least 1"
    if args.duration < 2:
        return "--duration must be at least 2 s"
    if not 0 <= args.ramp < args.duration:
        return "--ramp must be at least 0 and shorter than --duration"
    if not 0.0 <= args.barge_in_rate <= 1.0:
        return "--barge-in-rate must be between 0 and 1"
    if args.answer_timeout <= 0:
        return "--answer-timeout must be positive"
    return ""


async def run(args: argparse.Namespace) -> int:
    """Run ``voicectl load``: render the speech, run the calls, print the table, write JSON and PNG.

    Args:
        args: The parsed ``load`` arguments (and the global ``--nats`` and ``--timeout``).

    Returns:
        The exit code: 0 if turns were answered and nothing went wrong, 1 otherwise, 2 for bad options,
        130 when stopped early with Ctrl-C.
    """
    problem = _check(args)
    if problem:
        print(f"voicectl load: {problem}", file=sys.stderr)
        return 2
    try:
        http_base(args.gateway)
    except ValueError as exc:
        print(f"voicectl load: {exc}", file=sys.stderr)
        return 2
    if args.dialect == "browser" and args.barge_in_rate:
        print("voicectl load: the browser protocol queues turns and has no barge-in; ignoring it", file=sys.stderr)
    options = LoadOptions(
        gateway=args.gateway,
        dialect=args.dialect,
        calls=args.calls,
        duration_s=args.duration,
        ramp_s=args.ramp,
        barge_in_rate=0.0 if args.dialect == "browser" else args.barge_in_rate,
        agent=args.agent,
        api_key=args.api_key if args.api_key is not None else default_api_key(),
        sample_rate=args.sample_rate,
        answer_timeout_s=args.answer_timeout,
        seed=args.seed,
    )
    texts = list(args.say) or list(QUESTIONS)
    try:
        spoken = await render_utterances([*texts, INTERRUPTION], nats_url=args.nats, timeout=args.timeout)
    except (RuntimeError, ValueError) as exc:
        print(f"voicectl load: cannot make the callers' speech: {exc}", file=sys.stderr)
        return 1
    print(
        f"{options.calls} {options.dialect} call(s) to {options.gateway} for {options.duration_s:g} s, "
        f"asking {len(texts)} question(s) …",
        file=sys.stderr,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupted() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once

    try:
        loop.add_signal_handler(signal.SIGINT, interrupted)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        pass
    try:
        report = await run_load(options, spoken[:-1], spoken[-1], progress=Progress(), stop=stop)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.png:
        render_png(report, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    if report["stopped_early"]:
        return 130
    return 0 if report["turns"] and not report["errors"] else 1
