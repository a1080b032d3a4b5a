"""Running ``voicectl load``: the call slots of each dialect, replaced when a call ends early, and ``run_load``.

Each of the ``--calls`` slots keeps one call up until the run ends: a simulated carrier driven by a
``Conversation`` (Twilio, Exotel, PCM), or a browser session at ``/ws`` taking the same turns with ``audio``
messages. A call that fails or that the server ends is counted as an error and replaced while time remains.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import random
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, WebSocketException

from voice_audio import wav_bytes
from voicectl.callers import BrowserClient, CallError, call, dialect_rate
from voicectl.load.report import build_report
from voicectl.load.scenario import (
    END_ROOM_S,
    GREETING_WAIT_S,
    THINK_S,
    Conversation,
    LoadOptions,
    LoadStats,
    Run,
    Utterance,
)

__all__ = ["DIALECTS", "Progress", "run_load"]

DIALECTS = ("twilio", "exotel", "pcm", "plivo", "telnyx", "vonage", "browser")
BROWSER_RATE = 16000
# A replacement call is placed only when at least this much of the run is left (a first call: 1 s).
MIN_CALL_S = 5.0
RETRY_PAUSE_S = 1.0
PROGRESS_INTERVAL_S = 0.5
# How often the callers' own event-loop lag is probed.
LAG_PROBE_S = 0.05


def _error_kind(exc: BaseException) -> str:
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


async def _slot(run: Run, place: Callable[[], Awaitable[bool]]) -> None:
    """One call slot: ``place`` a call (True if it lasted until the end of the run), again if it ended early."""
    for attempt in itertools.count():
        if run.ends_at - run.clock() < (MIN_CALL_S if attempt else 1.0):
            return
        run.stats.calls_placed += 1
        run.stats.active += 1
        try:
            completed = await place()
        except Exception as exc:
            run.stats.error(_error_kind(exc), str(exc) or type(exc).__name__)
            completed = False
        finally:
            run.stats.active -= 1
        if completed:
            run.stats.calls_completed += 1
            return
        await asyncio.sleep(RETRY_PAUSE_S)


async def _carrier_calls(index: int, run: Run) -> None:
    """One call slot of a carrier dialect: a call until the end of the run, replaced if it ends early."""
    options = run.options
    rate = dialect_rate(options.dialect, options.sample_rate)
    questions = [q.at(rate) for q in run.questions]
    interruption = run.interruption.at(rate)
    silence = np.zeros(0, np.int16)

    async def place() -> bool:
        script = Conversation(index, run, questions, interruption)
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
        script.finish_barge()
        if result.problems:
            run.stats.error("protocol", "; ".join(result.problems))
        if result.closed_by == "server":
            run.stats.error("closed by server", f"close code {result.close_code}")
            return False
        return True

    await _slot(run, place)


class _BrowserCall:
    """One seed 001 session at ``/ws``: ``audio`` messages (a WAV per utterance), answers played in real time."""

    def __init__(self, index: int, run: Run, clips: list[tuple[Utterance, str]]) -> None:
        self.index = index
        self.run = run
        self.clips = clips
        self.next_clip = run.rng.randrange(len(clips))
        self.client = BrowserClient(
            run.options.gateway, compression=None, on_problem=lambda text: run.stats.error("protocol", text)
        )

    async def _until(self, kinds: set[str], timeout: float) -> tuple[float, dict[str, Any]] | None:
        """The first event of one of ``kinds`` (``_closed`` when the socket closes), or None after ``timeout``."""
        deadline = self.run.clock() + timeout
        while True:
            try:
                at, message = await self.client.receive(max(0.0, deadline - self.run.clock()))
            except TimeoutError:
                return None
            except ConnectionClosed:
                return self.run.clock(), {"type": "_closed"}
            if message.get("type") in kinds:
                return at, message

    async def _quiet(self, at_least: float) -> None:
        while True:
            wait = max(self.client.playing_until, self.run.clock()) + at_least - self.run.clock()
            if wait <= 0 or self.run.clock() + wait > self.run.ends_at:
                return
            await asyncio.sleep(wait)
            if self.client.playing_until + at_least <= self.run.clock():
                return

    async def talk(self) -> bool:
        """Hold the conversation until the run ends; True if the session lasted until then."""
        run, stats = self.run, self.run.stats
        async with self.client as client:
            await client.send("init", agentId=run.options.agent)
            got = await self._until({"init_success", "error"}, 10)
            if got is None or got[1]["type"] != "init_success":
                kind = "init failed" if got is None or got[1]["type"] == "_closed" else "server error"
                stats.error(kind, json.dumps(got[1] if got else "no init_success in 10 s")[:300])
                return False
            await self._until({"audio_response"}, GREETING_WAIT_S)
            await self._quiet(THINK_S)
            while not client.closed:
                utterance, encoded = self.clips[self.next_clip % len(self.clips)]
                if run.clock() + utterance.duration_s + END_ROOM_S > run.ends_at:
                    break
                self.next_clip += 1
                await asyncio.sleep(utterance.duration_s)  # the caller talks, the page records
                client.discard_pending()
                sent = run.clock()
                await client.send("audio", audio=encoded)
                await self._answer(sent)
                await self._quiet(THINK_S)
            if client.closed:
                stats.error("closed by server", f"close code {client.close_code}")
                return False
            remaining = run.ends_at - run.clock()
            if remaining > 0:
                await asyncio.sleep(remaining)
            with contextlib.suppress(Exception):
                await client.send_raw(json.dumps({"type": "end"}))
                await self._until({"session_ended"}, 2)
            return True

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


async def _browser_calls(index: int, run: Run) -> None:
    """One call slot of the browser dialect."""
    clips = [q.at(BROWSER_RATE) for q in run.questions]
    encoded = [(q, base64.b64encode(wav_bytes(q.samples, q.rate)).decode("ascii")) for q in clips]
    await _slot(run, lambda: _BrowserCall(index, run, encoded).talk())


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
    run = Run(
        options,
        stats,
        list(questions),
        interruption,
        started_at=started,
        ends_at=started + options.duration_s,
        rng=random.Random(options.seed),
    )
    slot: Callable[[int, Run], Any] = _browser_calls if options.dialect == "browser" else _carrier_calls
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
    report = build_report(options, stats, loop.time() - started)
    report["stopped_early"] = stopped_early
    return report
