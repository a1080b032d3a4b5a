"""Real-time calls, independent of dialect: continuous caller audio in, the agent's voice out, paced in
real time, with voice activity detection, endpointing and barge-in.

Caller audio is analysed at the carrier's own rate when the VAD supports it (8 or 16 kHz: no
resampling per frame); the utterance goes to STT at that rate and the STT worker resamples it once.
A dialect (Twilio, Exotel, raw PCM) decodes its frames, hands the caller's audio to
:meth:`CallSession.on_audio`, forwards playback acknowledgements (:meth:`CallSession.on_mark`) and
DTMF, and implements :class:`CallTransport` to send audio, marks and ``clear`` its own way.

- Endpointing: when the caller stops talking for the agent's ``endpointing_silence_ms``, the
  utterance becomes a turn: STT → LLM → TTS over the bus, the answer spoken sentence by sentence.
- Pacing: the agent's audio is sent no faster than real time (a small lead keeps the carrier's
  buffer from running dry), so ``clear`` flushes little and the played position is known.
- Barge-in: caller speech of at least ``min_speech_ms`` while the agent speaks cancels the running
  turn (its LLM and TTS requests on the bus), stops the audio (``clear``), and trims the assistant's
  message in the history to what the caller heard: sentences whose mark came back, plus the played
  fraction of the current one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from prometheus_client import Counter, Histogram

from voice.v1 import audio_pb2
from voice_audio import Encoding, StreamResampler, alaw_decode, ulaw_decode
from voice_bus.errors import BusError
from voice_gateway.session import FIRST_AUDIO, TURNS, GatewayContext, Session
from voice_gateway.tools import CallAction
from voice_gateway.turns import (
    CallActionRequested,
    Event,
    OutputFormat,
    SpeechAudio,
    TurnFailed,
    TurnResult,
    describe,
)
from voice_gateway.vad import VAD_SAMPLE_RATES, Endpointer, EndpointingConfig, SpeechEnded, SpeechStarted
from voice_runtime.tasks import cancel_and_wait, wait_quietly
from voice_telemetry.metrics import LATENCY_BUCKETS_S
from voice_telemetry.tracing import capture_content

logger = logging.getLogger(__name__)

STT_RATE = 16000
# How long past the expected end of playout a hang-up waits for the far end's marks.
PLAYOUT_GRACE_S = 5.0

BARGE_INS = Counter("voice_gateway_barge_ins_total", "Caller speech that interrupted the agent", ["dialect"])
BARGE_IN_LATENCY = Histogram(
    "voice_gateway_barge_in_latency_seconds",
    "Caller speech onset to the agent's audio stopped (clear sent)",
    ["dialect"],
    buckets=LATENCY_BUCKETS_S,
)
VOICE_TO_VOICE = Histogram(
    "voice_gateway_voice_to_voice_seconds",
    "Caller's last voiced sample to the first byte of the answer's audio sent",
    ["dialect"],
    buckets=LATENCY_BUCKETS_S,
)
INBOUND_FRAME = Histogram(
    "voice_gateway_inbound_frame_seconds",
    "Time to handle one inbound media frame (decode, resample, VAD)",
    ["dialect"],
    buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05),
)
BAD_FRAMES = Counter("voice_gateway_bad_frames_total", "Malformed or unexpected frames, by kind", ["dialect", "kind"])

_DECODERS = {
    Encoding.MULAW: ulaw_decode,
    Encoding.ALAW: alaw_decode,
    Encoding.PCM16: lambda payload: np.frombuffer(payload[: len(payload) // 2 * 2], dtype="<i2"),
}
_PROTO_ENCODINGS = {
    Encoding.PCM16: audio_pb2.AUDIO_ENCODING_PCM16,
    Encoding.MULAW: audio_pb2.AUDIO_ENCODING_MULAW,
    Encoding.ALAW: audio_pb2.AUDIO_ENCODING_ALAW,
}


class CallTransport(Protocol):
    """What a dialect does for the call engine."""

    async def send_audio(self, audio: bytes) -> None:
        """Sends agent audio in the call's media format."""

    async def send_mark(self, name: str) -> bool:
        """Sends a playback mark after the audio sent so far; False if the dialect has none."""

    async def clear(self) -> None:
        """Asks the far end to drop audio it has not played yet (or just stops sending)."""

    async def hang_up(self, action: CallAction) -> None:
        """Ends the call from our side (``end_call``) or hands it to ``action.number`` (``transfer_call``)."""


@dataclass(frozen=True)
class MediaFormat:
    """The call's audio both ways.

    Attributes:
        encoding: Sample encoding on the wire.
        sample_rate: Samples per second on the wire.
        chunk_bytes: Outbound chunk size (the dialect's rules, e.g. Exotel's multiples of 320 B).
        pad_to: Outbound chunks are zero-padded to a multiple of this many bytes (0: no padding).
        min_chunk_bytes: A shorter last chunk is zero-padded up to this size.
        lead_s: How far ahead of real time audio may be sent (the far end buffers it).
    """

    encoding: Encoding
    sample_rate: int
    chunk_bytes: int
    pad_to: int = 0
    min_chunk_bytes: int = 0
    lead_s: float = 0.3

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * (2 if self.encoding == Encoding.PCM16 else 1)


@dataclass
class _Spoken:
    """One sentence queued or played."""

    text: str
    audio: bytes
    mark: str
    duration_s: float
    started_at: float | None = None
    played: bool = False


@dataclass
class CallStats:
    """Figures of one call, for the call log, metrics and tests."""

    voice_to_voice_s: list[float] = field(default_factory=list)
    barge_in_latency_s: list[float] = field(default_factory=list)
    barge_ins: int = 0
    bad_frames: int = 0


class CallSession:
    """One phone call with one agent.

    Args:
        context: Shared gateway services.
        session: The underlying session (agent, history, call log, trace).
        media: The call's audio format.
        transport: How the dialect sends audio, marks and ``clear``.
    """

    def __init__(self, context: GatewayContext, session: Session, media: MediaFormat, transport: CallTransport) -> None:
        self._context = context
        self.session = session
        self._media = media
        self._transport = transport
        pipeline = session.agent.pipeline
        vad_rate = media.sample_rate if media.sample_rate in VAD_SAMPLE_RATES else STT_RATE
        self._endpointer = Endpointer(
            EndpointingConfig(
                silence_ms=pipeline.endpointing_silence_ms,
                min_speech_ms=pipeline.min_speech_ms,
                max_utterance_s=pipeline.max_utterance_s,
            ),
            sample_rate=vad_rate,
        )
        self._interruptions = pipeline.enable_interruptions and pipeline.vad_enabled
        self._decode = _DECODERS[media.encoding]
        self._vad_rate = vad_rate
        self._resampler = (
            StreamResampler(media.sample_rate, self._vad_rate) if media.sample_rate != self._vad_rate else None
        )
        self._output = OutputFormat(encoding=_PROTO_ENCODINGS[media.encoding], sample_rate=media.sample_rate)
        self._queue: asyncio.Queue[_Spoken | None] = asyncio.Queue()
        self._spoken: list[_Spoken] = []
        self._playing: _Spoken | None = None
        self._player = asyncio.create_task(self._play())
        self._turn: asyncio.Task | None = None
        self._turn_index = 0
        self._mark_seq = 0
        self._last_voiced_wall: float | None = None
        self._first_audio_pending = False
        self._heard_at_barge_in: str | None = None
        self._frame_seconds = INBOUND_FRAME.labels(session.dialect)
        self.stats = CallStats()
        self.action: CallAction | None = None
        self._finishing: asyncio.Task | None = None
        self._closed = False

    @property
    def dialect(self) -> str:
        return self.session.dialect

    @property
    def agent_speaking(self) -> bool:
        """The agent has audio queued or playing, or a turn is producing its answer."""
        return (
            self._playing is not None
            or not self._queue.empty()
            or any(not s.played for s in self._spoken)
            or (self._turn is not None and not self._turn.done())
        )

    async def start(self) -> None:
        """Records the call and speaks the greeting."""
        await self.session.start()
        if self.session.agent.greeting:
            self._turn = asyncio.create_task(self._greet())

    async def _greet(self) -> None:
        with self.session.turn_span("greeting") as span:
            try:
                result = await self._context.engine.speak(
                    self.session.conversation, self.session.agent.greeting, self._output, self._on_event
                )
            except BusError as exc:
                # Nobody awaits the greeting: a failure is logged and recorded here, and the call goes on.
                logger.warning("greeting failed in call %s: %s", self.session.id, exc)
                span.set_attribute("voice.error", exc.code_name)
                result = TurnResult(error=describe(exc, "the greeting"))
        await self.session.record("greeting", result)

    def on_audio(self, payload: bytes) -> None:
        """Handles one inbound frame of caller audio (in the call's media format)."""
        started = time.perf_counter()
        samples = self._decode(payload)
        if self._resampler is not None:
            samples = self._resampler.process(samples)
        for event in self._endpointer.process(samples):
            if isinstance(event, SpeechStarted):
                self._on_speech_started(event, started)
            elif isinstance(event, SpeechEnded):
                self._on_speech_ended(event, started)
        self._frame_seconds.observe(time.perf_counter() - started)

    def bad_frame(self, kind: str) -> None:
        """Counts a malformed or unexpected frame (the call goes on)."""
        self.stats.bad_frames += 1
        BAD_FRAMES.labels(self.dialect, kind).inc()

    def on_mark(self, name: str) -> None:
        """The far end played everything up to mark ``name``."""
        for spoken in self._spoken:
            if spoken.mark == name:
                spoken.played = True
                break

    def on_dtmf(self, digit: str) -> None:
        """A key press reaches the agent as a user message."""
        if digit and len(digit) <= 4:
            self._start_turn(text=f"[The caller pressed {digit} on the keypad]")

    def _stream_to_wall(self, stream_s: float, now: float) -> float:
        return now - (self._endpointer.stream_s - stream_s)

    def _on_speech_started(self, event: SpeechStarted, now: float) -> None:
        if self._interruptions and self.agent_speaking:
            onset_wall = self._stream_to_wall(event.onset_s, now)
            asyncio.get_running_loop().create_task(self._barge_in(onset_wall))

    def _on_speech_ended(self, event: SpeechEnded, now: float) -> None:
        if self.agent_speaking and not self._interruptions:
            return
        self._last_voiced_wall = self._stream_to_wall(event.last_voiced_s, now)
        pcm = np.ascontiguousarray(event.audio, dtype="<i2").tobytes()
        self._start_turn(audio=pcm, endpoint_wait_s=event.ended_s - event.last_voiced_s)

    def _start_turn(self, *, audio: bytes | None = None, text: str | None = None, endpoint_wait_s: float = 0.0) -> None:
        previous = self._turn
        self._turn_index += 1
        self._turn = asyncio.create_task(self._run_turn(previous, audio, text, endpoint_wait_s))

    async def _run_turn(self, previous: asyncio.Task | None, audio: bytes | None, text: str | None, wait_s: float):
        await wait_quietly(previous)
        started = time.perf_counter()
        kind = "audio" if audio is not None else "dtmf"
        session = self.session
        with session.turn_span(kind) as span:
            if audio is not None:
                span.set_attribute("voice.audio.duration_s", round(len(audio) / (2 * self._vad_rate), 3))
                span.add_event("endpointing", {"voice.endpointing.wait_s": round(wait_s, 4)})
            timings: dict[str, float] = {"endpointing_s": wait_s}
            user_text = text or ""
            outcome = "ok"
            try:
                if audio is not None:
                    fmt = audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=self._vad_rate)
                    user_text = await self._context.engine.transcribe(session.conversation, audio, fmt)
                    timings["stt_s"] = time.perf_counter() - started
                    if not user_text:
                        outcome = "no_speech"
                        return
                self._first_audio_pending = audio is not None
                result = await self._context.engine.respond(
                    session.conversation, user_text, self._output, self._on_event, started
                )
                result.timings.update(timings)
                if result.error_code:
                    # Answered with the agent's fallback message: still counted as the LLM's failure.
                    outcome = result.error_code.lower()
                span.set_attribute("voice.time_to_first_audio_s", result.timings.get("first_audio_s", -1.0))
                if "first_audio_s" in result.timings:
                    FIRST_AUDIO.labels(self.dialect, kind).observe(result.timings["first_audio_s"])
                await session.record(kind, result)
            except asyncio.CancelledError:
                outcome = "cancelled"
                reason = "barge_in" if self._heard_at_barge_in is not None else "call_ended"
                span.add_event("cancelled", {"voice.cancel.reason": reason})
                if self._heard_at_barge_in is not None:
                    result = TurnResult(user_text=user_text, assistant_text=self._heard_at_barge_in, timings=timings)
                    await session.record(kind, result, interrupted=True)
                elif self._closed and user_text:
                    result = TurnResult(user_text=user_text, timings=timings, error="the call ended before the answer")
                    await session.record(kind, result, interrupted=True)
                raise
            except BusError as exc:
                outcome = exc.code_name.lower()
                logger.warning("turn failed in call %s: %s", session.id, exc)
                span.set_attribute("voice.error", exc.code_name)
                await session.record(kind, TurnResult(user_text=user_text, timings=timings, error=str(exc)))
            finally:
                TURNS.labels(self.dialect, kind, outcome).inc()

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, SpeechAudio) and event.audio:
            self._mark_seq += 1
            spoken = _Spoken(
                text=event.text,
                audio=event.audio,
                mark=f"t{self._turn_index}-s{event.sentence_index}-{self._mark_seq}",
                duration_s=len(event.audio) / self._media.bytes_per_second,
            )
            self._spoken.append(spoken)
            self._queue.put_nowait(spoken)
        elif isinstance(event, CallActionRequested) and event.action is not None:
            self._finishing = asyncio.create_task(self._finish_call(event.action))
        elif isinstance(event, TurnFailed):
            logger.warning("call %s: %s", self.session.id, event.error)

    async def _finish_call(self, action: CallAction) -> None:
        """Hangs up or transfers once the caller has heard the answer (a barge-in first discards it)."""
        deadline = time.monotonic() + PLAYOUT_GRACE_S + sum(s.duration_s for s in self._spoken)
        while time.monotonic() < deadline and (
            self._playing is not None or not self._queue.empty() or any(not s.played for s in self._spoken)
        ):
            await asyncio.sleep(0.05)
        self.action = action
        if capture_content():
            logger.info("call %s: %s by the agent %s", self.session.id, action.kind, action.number)
        else:
            logger.info("call %s: %s by the agent", self.session.id, action.kind)
        await self._transport.hang_up(action)

    async def _play(self) -> None:
        """Sends queued sentences in chunks, never more than the media's ``lead_s`` ahead of real time."""
        clock_start: float | None = None
        sent_s = 0.0
        chunk = self._media.chunk_bytes
        while (spoken := await self._queue.get()) is not None:
            now = time.monotonic()
            if clock_start is None or now > clock_start + sent_s:
                clock_start, sent_s = now, 0.0
            self._playing = spoken
            spoken.started_at = clock_start + sent_s
            for offset in range(0, len(spoken.audio), chunk):
                piece = spoken.audio[offset : offset + chunk]
                piece = self._pad(piece)
                ahead = clock_start + sent_s - time.monotonic() - self._media.lead_s
                if ahead > 0:
                    await asyncio.sleep(ahead)
                if self._first_audio_pending and self._last_voiced_wall is not None:
                    self._first_audio_pending = False
                    latency = time.perf_counter() - self._last_voiced_wall
                    self.stats.voice_to_voice_s.append(latency)
                    VOICE_TO_VOICE.labels(self.dialect).observe(latency)
                await self._transport.send_audio(piece)
                sent_s += len(piece) / self._media.bytes_per_second
            if not await self._transport.send_mark(spoken.mark):
                end = spoken.started_at + spoken.duration_s
                asyncio.get_running_loop().call_at(
                    asyncio.get_running_loop().time() + max(0.0, end - time.monotonic()),
                    self.on_mark,
                    spoken.mark,
                )
            self._playing = None

    def _pad(self, piece: bytes) -> bytes:
        media = self._media
        size = max(len(piece), media.min_chunk_bytes)
        if media.pad_to and size % media.pad_to:
            size += media.pad_to - size % media.pad_to
        return piece + b"\x00" * (size - len(piece)) if size > len(piece) else piece

    async def _barge_in(self, onset_wall: float) -> None:
        """Caller speech while the agent speaks: stop everything and keep only what was heard."""
        heard = self._heard_text()
        turn = self._turn
        answer_finished = turn is None or turn.done()
        await cancel_and_wait(self._finishing)
        if not answer_finished:
            self._heard_at_barge_in = heard
            await cancel_and_wait(turn)
            self._heard_at_barge_in = None
        while not self._queue.empty():
            self._queue.get_nowait()
        await cancel_and_wait(self._player)
        self._playing = None
        await self._transport.clear()
        latency = time.perf_counter() - onset_wall
        self.stats.barge_ins += 1
        self.stats.barge_in_latency_s.append(latency)
        BARGE_INS.labels(self.dialect).inc()
        BARGE_IN_LATENCY.labels(self.dialect).observe(latency)
        self._trim_history(heard, trim_log=answer_finished)
        self._spoken.clear()
        self._player = asyncio.create_task(self._play())
        self.session.span.add_event(
            "barge_in", {"voice.barge_in.latency_s": round(latency, 4), "voice.barge_in.heard_chars": len(heard)}
        )
        if capture_content():
            logger.info(
                "barge-in on call %s after %.0f ms; the caller heard %r", self.session.id, latency * 1000, heard
            )
        else:
            logger.info("barge-in on call %s after %.0f ms", self.session.id, latency * 1000)

    def _heard_text(self) -> str:
        """What the caller heard of the agent's current answer: played sentences and the played part
        of the one being played."""
        now = time.monotonic()
        parts: list[str] = []
        for spoken in self._spoken:
            if spoken.played:
                parts.append(spoken.text)
            elif spoken.started_at is not None and spoken.started_at < now:
                fraction = min(1.0, (now - spoken.started_at) / max(spoken.duration_s, 1e-3))
                words = spoken.text.split()
                parts.append(" ".join(words[: int(len(words) * fraction)]))
                break
            else:
                break
        return " ".join(p for p in parts if p).strip()

    def _trim_history(self, heard: str, *, trim_log: bool) -> None:
        history = self.session.conversation.history
        if history and history[-1]["role"] == "assistant":
            history[-1] = {"role": "assistant", "content": heard}
            if not heard:
                history.pop()
        log = self.session.call_log
        if trim_log and log.turns:
            log.turns[-1].assistant = heard
            log.turns[-1].interrupted = True

    async def close(self, status: str = "completed") -> None:
        """Ends the call: cancels the running turn and the playout, saves the call log."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(self._turn, self._player, self._finishing)
        if self.action is not None and self.action.kind == "transfer_call":
            status = "transferred"
        await self.session.close(status)
