"""Real-time calls, independent of dialect: continuous caller audio in, the agent's voice out, with voice
activity detection, endpointing and barge-in; the turns themselves run on the session's turn runner.

Caller audio is analysed at the carrier's own rate when the VAD supports it (8 or 16 kHz: no
resampling per frame); the utterance goes to STT at that rate and the STT worker resamples it once.
A streaming dialect (Twilio, Exotel, raw PCM) decodes its frames, hands the caller's audio to
:meth:`CallSession.on_audio`, forwards playback acknowledgements (:meth:`CallSession.on_mark`) and
DTMF, and implements :class:`~voice_gateway.conversation.playout.CallTransport` to send audio, marks
and ``clear`` its own way.

- Turn detection (the agent's ``turn_detection``): with ``semantic``, a gap of ``TRANSCRIBE_AFTER_MS``
  starts the utterance's transcription (speculative STT), and the short pause that may follow asks the
  end-of-turn model (:mod:`~voice_gateway.conversation.turn_model`) whether the caller has finished; the
  turn ends as soon as the model says yes, else after the maximum silence, and the transcript is ready
  or nearly. When the caller goes on, both are cancelled and nothing of them reaches the LLM. With
  ``silence``, the turn ends after the silence alone. Either way the utterance becomes a turn: STT → LLM
  → TTS over the bus, the answer spoken clause and sentence by sentence.
- Playout: :class:`~voice_gateway.conversation.playout.Playout` paces the answer in real time.
- Barge-in: caller speech of at least ``min_speech_ms`` while the agent speaks cancels the running
  turn through the runner (its LLM and TTS requests on the bus), stops the audio (``clear``), and
  trims the assistant's message in the history to what the caller heard.

A dialect that shows the turn-taking to its client (OpenAI Realtime) sets :attr:`CallSession.listener`
(:class:`CallListener`): it is told of speech starts and ends, may hold an utterance instead of having it
answered at once, and gets every event of the call's turns. Such a dialect may also answer typed or held
input through :meth:`CallSession.respond` and change the call's audio formats and turn detection
mid-call (:meth:`CallSession.reconfigure`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from voice.v1 import audio_pb2
from voice_audio import Encoding, StreamResampler, alaw_decode, ulaw_decode
from voice_gateway.agents import Agent
from voice_gateway.agents.templates import personalise
from voice_gateway.agents.tools import CallAction
from voice_gateway.conversation.events import (
    CallActionRequested,
    Event,
    OutputFormat,
    SpeechAudio,
    StageStarted,
    TurnFailed,
    TurnStarted,
)
from voice_gateway.conversation.metrics import (
    BAD_FRAMES,
    BARGE_IN_LATENCY,
    BARGE_INS,
    INBOUND_FRAME,
    SPECULATIONS,
    TURN_ENDINGS,
)
from voice_gateway.conversation.playout import CallStats, CallTransport, MediaFormat, Playout
from voice_gateway.conversation.runner import BARGE_IN, Turn
from voice_gateway.conversation.session import GatewayContext, Session
from voice_gateway.conversation.turn_model import SmartTurn
from voice_gateway.conversation.vad import (
    VAD_SAMPLE_RATES,
    Endpointer,
    EndpointingConfig,
    SpeechEnded,
    SpeechGap,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
)
from voice_runtime.tasks import cancel_and_wait
from voice_telemetry.tracing import capture_content

logger = logging.getLogger(__name__)

STT_RATE = 16000
# How long past the expected end of playout a hang-up waits for the far end's marks.
PLAYOUT_GRACE_S = 5.0
# With semantic turn detection, the speculative transcription starts after this much non-speech (or at
# the pause, if that is sooner); the end-of-turn model is still asked at the pause. Whisper's transcripts
# of 18 Piper sentences were the same with 40, 60, 100 or 150 ms kept after the last voiced frame, and
# 22 utterances had 8 gaps of 100 ms inside them against 7 of 150 ms (docs/latency.md, run I).
TRANSCRIBE_AFTER_MS = 100

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

__all__ = ["CallListener", "CallSession", "CallStats", "CallTransport", "MediaFormat", "open_call"]


class CallListener(Protocol):
    """What a dialect that shows the call's turn-taking to its client is told (see the module's docstring)."""

    def speech_started(self, onset_s: float) -> None:
        """The caller started speaking (``onset_s``: stream time of the first voiced audio)."""

    def utterance(self, turn: Turn, last_voiced_s: float) -> bool:
        """The caller's turn ended; ``turn`` answers it. Returns whether to answer it now: a listener that
        returns False holds it, and may pass it to :meth:`CallSession.respond` later. It may change the
        turn's ``output`` (None: answer in text only) or ``agent``."""

    async def on_event(self, event: Event) -> None:
        """An event of one of the call's turns, after the call has handled it."""


@dataclass(eq=False)
class _Speculation:
    """What a gap or pause started: the utterance's transcription and the end-of-turn model's verdict."""

    transcript: asyncio.Task
    verdict: asyncio.Task | None = None


def _seen(task: asyncio.Task) -> None:
    """Retrieves a speculative task's failure: a discarded one is nobody's to report."""
    if not task.cancelled():
        task.exception()


class CallSession:
    """One phone call with one agent.

    Args:
        session: The underlying session (agent, history, call log, trace, turn runner).
        media: The call's audio format.
        transport: How the dialect sends audio, marks and ``clear``.
    """

    def __init__(
        self, session: Session, media: MediaFormat, transport: CallTransport, output_media: MediaFormat | None = None
    ) -> None:
        self.session = session
        self._transport = transport
        self.listener: CallListener | None = None
        self.stats = CallStats()
        self._playout: Playout | None = None
        self._stream_base_s = 0.0  # the call's inbound audio before the current endpointer's
        self._configure(session.agent, media, output_media or media)
        self._turn_index = 0
        self._answering = ""
        self._last_voiced_wall: float | None = None
        self._audio_wall = time.perf_counter()  # when the audio fed last to the endpointer arrived
        self._frame_seconds = INBOUND_FRAME.labels(session.dialect)
        self.action: CallAction | None = None
        self._finishing: asyncio.Task | None = None
        self._closed = False

    def reconfigure(self, agent: Agent, media: MediaFormat, output_media: MediaFormat | None = None) -> None:
        """Changes the call's agent (turn detection, prompt, voice, tools), audio formats or both, mid-call.

        An utterance in progress is dropped and audio queued for playout is discarded (not ``clear``ed:
        the dialect says what its client hears); turns already queued keep the settings they had.
        """
        self._discard_speculation()
        self.session.agent = agent
        self.session.conversation.agent = agent
        if self._playout is not None:
            asyncio.get_running_loop().create_task(self._playout.close())
        self._stream_base_s += self._endpointer.stream_s
        self._configure(agent, media, output_media or media)

    def drop_utterance(self) -> None:
        """Forgets the caller's utterance in progress, if any (the client cleared its input): no turn comes
        of it, and what was started for it at a pause is cancelled. Later speech starts a new one."""
        self._discard_speculation()
        self._endpointer.reset()

    def _configure(self, agent: Agent, media: MediaFormat, output_media: MediaFormat) -> None:
        self._media = media
        pipeline = agent.pipeline
        detection = agent.turn_detection
        self._semantic = detection.type == "semantic"
        self._threshold = detection.threshold
        vad_rate = media.sample_rate if media.sample_rate in VAD_SAMPLE_RATES else STT_RATE
        self._endpointer = Endpointer(
            EndpointingConfig(
                silence_ms=detection.silence_ms(pipeline),
                min_speech_ms=pipeline.min_speech_ms,
                max_utterance_s=pipeline.max_utterance_s,
                pre_roll_ms=detection.prefix_padding_ms,
                pause_ms=detection.pause_ms if self._semantic else None,
                transcribe_ms=min(TRANSCRIBE_AFTER_MS, detection.pause_ms) if self._semantic else None,
            ),
            sample_rate=vad_rate,
        )
        self._speculation: _Speculation | None = None
        self._interruptions = pipeline.enable_interruptions and pipeline.vad_enabled
        self._decode = _DECODERS[media.encoding]
        self._vad_rate = vad_rate
        self._resampler = StreamResampler(media.sample_rate, vad_rate) if media.sample_rate != vad_rate else None
        self._output = OutputFormat(
            encoding=_PROTO_ENCODINGS[output_media.encoding], sample_rate=output_media.sample_rate
        )
        self._playout = Playout(self._transport, output_media, self.session.dialect, self.stats)

    @property
    def dialect(self) -> str:
        return self.session.dialect

    @property
    def agent_speaking(self) -> bool:
        """The agent has audio queued or playing, or a turn is producing its answer."""
        return self._playout.pending or self.session.runner.busy

    async def start(self) -> None:
        """Records the call and speaks the greeting."""
        await self.session.start()
        self.session.greet(self._output, self._on_event)

    def on_audio(self, payload: bytes) -> None:
        """Handles one inbound frame of caller audio (in the call's media format)."""
        started = self._audio_wall = time.perf_counter()
        samples = self._decode(payload)
        if self._resampler is not None:
            samples = self._resampler.process(samples)
        for event in self._endpointer.process(samples):
            if isinstance(event, SpeechStarted):
                self._on_speech_started(event)
            elif isinstance(event, SpeechEnded):
                self._on_speech_ended(event, started)
            elif isinstance(event, SpeechGap):
                self._on_gap(event)
            elif isinstance(event, SpeechPaused):
                self._on_pause(event)
            elif isinstance(event, SpeechResumed):
                self._discard_speculation()
        self._frame_seconds.observe(time.perf_counter() - started)

    def bad_frame(self, kind: str) -> None:
        """Counts a malformed or unexpected frame (the call goes on)."""
        self.stats.bad_frames += 1
        BAD_FRAMES.labels(self.dialect, kind).inc()

    def on_mark(self, name: str) -> None:
        """The far end played everything up to mark ``name``."""
        self._playout.on_mark(name)

    def on_dtmf(self, digit: str) -> None:
        """A key press reaches the agent as a user message."""
        if digit and len(digit) <= 4:
            self._submit(Turn(kind="dtmf", text=f"[The caller pressed {digit} on the keypad]", emit=self._on_event))

    def _stream_to_wall(self, stream_s: float) -> float:
        """The ``time.perf_counter()`` at which the caller's audio at stream time ``stream_s`` arrived."""
        return self._audio_wall - (self._endpointer.stream_s - stream_s)

    def _on_speech_started(self, event: SpeechStarted) -> None:
        if self.listener is not None:
            self.listener.speech_started(event.onset_s)
        if self._interruptions and self.agent_speaking:
            onset_wall = self._stream_to_wall(event.onset_s)
            asyncio.get_running_loop().create_task(self._barge_in(onset_wall))

    def _on_speech_ended(self, event: SpeechEnded, now: float, decision: str = "") -> None:
        speculation, self._speculation = self._speculation, None
        if speculation is not None and speculation.verdict not in (None, asyncio.current_task()):
            speculation.verdict.cancel()
        if self.agent_speaking and not self._interruptions:
            if speculation is not None:
                speculation.transcript.cancel()
                SPECULATIONS.labels("discarded").inc()
            return
        if not decision:
            decision = "max_utterance" if event.capped else "max_silence" if self._semantic else "silence"
        transcript = None
        if speculation is not None and not event.capped:
            transcript = speculation.transcript
            SPECULATIONS.labels("used").inc()
        elif speculation is not None:
            speculation.transcript.cancel()
            SPECULATIONS.labels("discarded").inc()
        TURN_ENDINGS.labels(self.dialect, decision).inc()
        self._last_voiced_wall = self._stream_to_wall(event.last_voiced_s)
        pcm = np.ascontiguousarray(event.audio, dtype="<i2").tobytes()
        turn = Turn(
            kind="audio",
            audio=pcm,
            audio_format=self._stt_format(),
            transcript=transcript,
            # By the clock: a verdict lands between frames, after the last one counted in ``ended_s``.
            endpointing_s=now - self._last_voiced_wall,
            endpointing=decision,
            speech_s=(
                round(self._stream_base_s + event.onset_s, 3),
                round(self._stream_base_s + event.last_voiced_s, 3),
            ),
            attributes={"voice.audio.duration_s": round(len(pcm) / (2 * self._vad_rate), 3)},
            output=self._output,
            emit=self._on_event,
        )
        if self.listener is None or self.listener.utterance(turn, event.last_voiced_s):
            self.session.submit(turn)

    def _stt_format(self) -> audio_pb2.AudioFormat:
        return audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=self._vad_rate)

    def _on_gap(self, event: SpeechGap) -> None:
        """A gap in the speech: transcribe what was said so far, in case the pause that may follow ends the turn."""
        self._discard_speculation()
        if self.agent_speaking and not self._interruptions:
            return
        session = self.session
        pcm = np.ascontiguousarray(event.audio, dtype="<i2").tobytes()
        transcript = asyncio.create_task(session.engine.transcribe(session.conversation, pcm, self._stt_format()))
        transcript.add_done_callback(_seen)
        self._speculation = _Speculation(transcript=transcript)

    def _on_pause(self, event: SpeechPaused) -> None:
        """A short pause: ask the end-of-turn model, while the transcription started at the gap goes on."""
        speculation = self._speculation
        if speculation is None or speculation.verdict is not None:
            return
        speculation.verdict = asyncio.create_task(self._judge(speculation, event.audio))
        speculation.verdict.add_done_callback(_seen)

    async def _judge(self, speculation: _Speculation, audio: np.ndarray) -> None:
        """Ends the turn now when the end-of-turn model hears a finished utterance (and nothing changed)."""
        probability = await asyncio.to_thread(SmartTurn.load().probability, audio, self._vad_rate)
        if speculation is not self._speculation or probability < self._threshold:
            return
        ended = self._endpointer.end_turn()
        if ended is not None:
            self._on_speech_ended(ended, time.perf_counter(), decision="semantic")

    def _discard_speculation(self) -> None:
        """The caller went on: what started at the pause is void and its bus work is cancelled."""
        speculation, self._speculation = self._speculation, None
        if speculation is not None:
            if speculation.verdict is not None:
                speculation.verdict.cancel()
            speculation.transcript.cancel()
            SPECULATIONS.labels("discarded").inc()

    def _submit(self, turn: Turn) -> None:
        turn.output = self._output
        self.session.submit(turn)

    def respond(self, turn: Turn, *, speak: bool = True) -> None:
        """Queues a turn the dialect made (typed input, an utterance it held, a request to answer the history
        as it is); its events go through the call, like a spoken turn's. ``speak``: answer in the call's
        output format, else in text only."""
        turn.emit = self._on_event
        turn.output = self._output if speak else None
        self.session.submit(turn)

    async def _on_event(self, event: Event) -> None:
        if isinstance(event, TurnStarted):
            self._turn_index += 1
            self._answering = event.turn_kind
            self._playout.begin_answer()
        elif isinstance(event, StageStarted) and event.kind == "llm_start" and self._answering == "audio":
            self._playout.answer_to(self._last_voiced_wall)
        elif isinstance(event, SpeechAudio):
            label = f"t{self._turn_index}-s{event.sentence_index}"
            self._playout.enqueue(event.text, event.audio, label, final=event.final)
        elif isinstance(event, CallActionRequested) and event.action is not None:
            self._finishing = asyncio.create_task(self._finish_call(event.action))
        elif isinstance(event, TurnFailed) and event.code != "NO_SPEECH":
            logger.warning("call %s: %s", self.session.id, event.error)
        if self.listener is not None:
            await self.listener.on_event(event)

    async def _finish_call(self, action: CallAction) -> None:
        """Hangs up or transfers once the caller has heard the answer (a barge-in first discards it)."""
        deadline = time.monotonic() + PLAYOUT_GRACE_S + self._playout.remaining_s()
        while time.monotonic() < deadline and self._playout.pending:
            await asyncio.sleep(0.05)
        self.action = action
        if capture_content():
            logger.info("call %s: %s by the agent %s", self.session.id, action.kind, action.number)
        else:
            logger.info("call %s: %s by the agent", self.session.id, action.kind)
        await self._transport.hang_up(action)

    async def _barge_in(self, onset_wall: float) -> None:
        """Caller speech while the agent speaks: stop everything and keep only what was heard."""
        heard = self._playout.heard_text()
        runner = self.session.runner
        answer_finished = runner.current is None
        await cancel_and_wait(self._finishing)
        await runner.cancel(BARGE_IN, heard=heard)
        await self._playout.flush()
        latency = time.perf_counter() - onset_wall
        self.stats.barge_ins += 1
        self.stats.barge_in_latency_s.append(latency)
        BARGE_INS.labels(self.dialect).inc()
        BARGE_IN_LATENCY.labels(self.dialect).observe(latency)
        self._trim_history(heard, trim_log=answer_finished)
        self.session.span.add_event(
            "barge_in", {"voice.barge_in.latency_s": round(latency, 4), "voice.barge_in.heard_chars": len(heard)}
        )
        if capture_content():
            logger.info(
                "barge-in on call %s after %.0f ms; the caller heard %r", self.session.id, latency * 1000, heard
            )
        else:
            logger.info("barge-in on call %s after %.0f ms", self.session.id, latency * 1000)

    def _trim_history(self, heard: str, *, trim_log: bool) -> None:
        history = self.session.conversation.history
        if history and history[-1]["role"] == "assistant":
            # In place: a dialect that keeps the entry (OpenAI Realtime's items) sees the trim.
            history[-1]["content"] = heard
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
        speculation, self._speculation = self._speculation, None
        if speculation is not None:
            await cancel_and_wait(speculation.verdict, speculation.transcript)
        await cancel_and_wait(self._finishing)
        await self._playout.close()
        if self.action is not None and self.action.kind == "transfer_call":
            status = "transferred"
        await self.session.close(status)


async def open_call(
    context: GatewayContext,
    dialect: str,
    agent_id: str,
    variables: dict,
    media: MediaFormat,
    transport: CallTransport,
    session_id: str | None = None,
) -> CallSession | None:
    """Starts a call with the agent (its prompt and greeting personalised); ``None`` for an unknown agent."""
    agent = await context.agents.get(agent_id)
    if agent is None:
        return None
    call = CallSession(
        Session(context, personalise(agent, variables), dialect, session_id=session_id), media, transport
    )
    await call.start()
    return call
