"""Real-time calls, independent of dialect: continuous caller audio in, the agent's voice out, with voice
activity detection, endpointing and barge-in; the turns themselves run on the session's turn runner.

Caller audio is analysed at the carrier's own rate when the VAD supports it (8 or 16 kHz: no
resampling per frame); the utterance goes to STT at that rate and the STT worker resamples it once.
A streaming dialect (Twilio, Exotel, raw PCM) decodes its frames, hands the caller's audio to
:meth:`CallSession.on_audio`, forwards playback acknowledgements (:meth:`CallSession.on_mark`) and
DTMF, and implements :class:`~voice_gateway.conversation.playout.CallTransport` to send audio, marks
and ``clear`` its own way.

- Turn detection (the agent's ``turn_detection``): with ``semantic``, a gap in the speech starts the
  utterance's transcription and the short pause that may follow asks the end-of-turn model whether the
  caller has finished (:mod:`~voice_gateway.conversation.speculation`); the turn ends as soon as the
  model says yes, else after the maximum silence. With ``silence``, the turn ends after the silence
  alone, its transcription started at the gap as well. Either way the utterance becomes a turn: STT → LLM
  → TTS over the bus, the answer spoken clause and sentence by sentence.
- Playout: :class:`~voice_gateway.conversation.playout.Playout` paces the answer in real time.
- Barge-in: caller speech of at least ``min_speech_ms`` while the agent speaks cancels the running
  turn through the runner (its LLM and TTS requests on the bus), stops the audio (``clear``), and
  trims the assistant's message in the history to what the caller heard. Speech that starts after a
  spoken turn ended but before any of its answer was sent means the turn ended too soon: the runner
  gives that turn up (``continued``) and its audio joins the utterance now starting, which becomes one
  turn with one transcript (unless the turn's tools already ran: then it is a barge-in).

A dialect that shows the turn-taking to its client (OpenAI Realtime) sets :attr:`CallSession.listener`
(:class:`CallListener`): it is told of speech starts and ends, may hold an utterance instead of having it
answered at once, and gets every event of the call's turns. Such a dialect may also answer typed or held
input through :meth:`CallSession.respond` and change the call's audio formats and turn detection
mid-call (:meth:`CallSession.reconfigure`). Its client plays the audio and says what it played
(``conversation.item.truncate``), so caller speech barges in only while an answer is produced, and the
history keeps what was produced until the client truncates it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

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
    TURN_ENDINGS,
    TURNS_CONTINUED,
)
from voice_gateway.conversation.playout import CallStats, CallTransport, MediaFormat, Playout
from voice_gateway.conversation.runner import BARGE_IN, CONTINUED, Turn
from voice_gateway.conversation.session import GatewayContext, Session
from voice_gateway.conversation.speculation import TRANSCRIBE_AFTER_MS, Speculator, SpokenTurn
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
        self._spoken: SpokenTurn | None = None  # the last spoken turn submitted
        self._answer_sent_at: float | None = None  # when the running turn's answer first went to the caller
        self._closed = False

    def reconfigure(self, agent: Agent, media: MediaFormat, output_media: MediaFormat | None = None) -> None:
        """Changes the call's agent (turn detection, prompt, voice, tools), audio formats or both, mid-call.

        An utterance in progress is dropped and audio queued for playout is discarded (not ``clear``ed:
        the dialect says what its client hears); turns already queued keep the settings they had.
        """
        self._speculator.drop()
        self.session.agent = agent
        self.session.conversation.agent = agent
        if self._playout is not None:
            asyncio.get_running_loop().create_task(self._playout.close())
        self._stream_base_s += self._endpointer.stream_s
        self._configure(agent, media, output_media or media)

    def drop_utterance(self) -> None:
        """Forgets the caller's utterance in progress, if any (the client cleared its input): no turn comes
        of it, and what was started for it at a pause is cancelled. Later speech starts a new one."""
        self._speculator.drop()
        self._endpointer.reset()

    def _configure(self, agent: Agent, media: MediaFormat, output_media: MediaFormat) -> None:
        self._media = media
        pipeline = agent.pipeline
        detection = agent.turn_detection
        self._semantic = detection.type == "semantic"
        silence_ms = detection.silence_ms(pipeline)
        # Speculative STT in either mode: the silence that ends a turn without a model is long enough for it.
        gap_ms = min(TRANSCRIBE_AFTER_MS, detection.pause_ms if self._semantic else silence_ms - 1)
        vad_rate = media.sample_rate if media.sample_rate in VAD_SAMPLE_RATES else STT_RATE
        self._endpointer = Endpointer(
            EndpointingConfig(
                silence_ms=silence_ms,
                min_speech_ms=pipeline.min_speech_ms,
                max_utterance_s=pipeline.max_utterance_s,
                pre_roll_ms=detection.prefix_padding_ms,
                pause_ms=detection.pause_ms if self._semantic else None,
                transcribe_ms=gap_ms,
            ),
            sample_rate=vad_rate,
        )
        self._speculator = Speculator(self._transcribe, vad_rate, detection.threshold, self._end_now)
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

    @property
    def _talked_over(self) -> bool:
        """Whether caller speech now falls on the agent's answer: while it plays, or, for a listener's
        client (which plays the audio itself), while it is produced."""
        return self.session.runner.busy if self.listener is not None else self.agent_speaking

    @property
    def _not_listening(self) -> bool:
        """Caller speech now goes unheard: it falls on the answer and interruptions are off. A listener's
        client hears its speech either way (it was told the speech started): the turn waits its turn."""
        return self.listener is None and self.agent_speaking and not self._interruptions

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
                self._speculator.pause(event)
            elif isinstance(event, SpeechResumed):
                self._speculator.discard()
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
        if self._interruptions and self._talked_over:
            onset_wall = self._stream_to_wall(event.onset_s)
            asyncio.get_running_loop().create_task(self._barge_in(onset_wall))

    def _on_speech_ended(self, event: SpeechEnded, now: float, decision: str = "") -> None:
        ignored = self._not_listening
        event, transcript = self._speculator.take(event, use=not ignored and not event.capped)
        if ignored:
            return
        if not decision:
            decision = "max_utterance" if event.capped else "max_silence" if self._semantic else "silence"
        self._last_voiced_wall = self._stream_to_wall(event.last_voiced_s)
        # By the clock: a verdict lands between frames, after the last one counted in ``ended_s``.
        turn = self._utterance(event, transcript, decision, now - self._last_voiced_wall)
        if self.listener is None or self.listener.utterance(turn, event.last_voiced_s):
            self.session.submit(turn)

    def _utterance(
        self, event: SpeechEnded, transcript: asyncio.Task | None, decision: str, endpointing_s: float | None
    ) -> Turn:
        """The turn that answers an ended utterance (its transcription already started, or not)."""
        TURN_ENDINGS.labels(self.dialect, decision).inc()
        pcm = np.ascontiguousarray(event.audio, dtype="<i2").tobytes()
        turn = Turn(
            kind="audio",
            audio=pcm,
            audio_format=self._stt_format(),
            transcript=transcript,
            endpointing_s=endpointing_s,
            endpointing=decision,
            speech_s=(
                round(self._stream_base_s + event.onset_s, 3),
                round(self._stream_base_s + event.last_voiced_s, 3),
            ),
            attributes={"voice.audio.duration_s": round(len(pcm) / (2 * self._vad_rate), 3)},
            output=self._output,
            emit=self._on_event,
        )
        self._spoken = SpokenTurn(turn, event.start_s, event.onset_s)
        return turn

    def _stt_format(self) -> audio_pb2.AudioFormat:
        return audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=self._vad_rate)

    def _on_gap(self, event: SpeechGap) -> None:
        if self._not_listening:
            self._speculator.discard()
        else:
            self._speculator.gap(event)

    def _transcribe(self, pcm: bytes) -> Coroutine[Any, Any, str]:
        """The speculator's transcription of ``pcm`` (PCM16 at the endpointer's rate) over the bus."""
        session = self.session
        return session.engine.transcribe(session.conversation, pcm, self._stt_format())

    def _end_now(self) -> None:
        """The end-of-turn model heard a finished utterance at the pause: the turn ends now."""
        ended = self._endpointer.end_turn()
        if ended is not None:
            self._on_speech_ended(ended, time.perf_counter(), decision="semantic")

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
            self._answer_sent_at = None
            self._playout.begin_answer()
        elif isinstance(event, StageStarted) and event.kind == "llm_start" and self._answering == "audio":
            self._playout.answer_to(self._last_voiced_wall)
        elif isinstance(event, SpeechAudio):
            if self._answer_sent_at is None:
                self._answer_sent_at = time.perf_counter()
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
        """Caller speech while the agent speaks: stop everything and keep only what was heard (a listener's
        client says what it played itself)."""
        heard = self._playout.heard_text() if self.listener is None else None
        runner = self.session.runner
        answer_finished = runner.current is None
        unanswered = self._unanswered(onset_wall)
        await cancel_and_wait(self._finishing)
        await runner.cancel(BARGE_IN if unanswered is None else CONTINUED, heard=heard)
        await self._playout.flush()
        if unanswered is not None and unanswered.turn.cancel_reason == CONTINUED:
            self._speculator.carry, rate = unanswered, self._vad_rate
            TURNS_CONTINUED.labels(self.dialect).inc()
            self.session.span.add_event("turn_continued", {"voice.turn.audio_s": unanswered.audio.size / rate})
            logger.info("call %s: the caller went on before the answer; the turn joins what follows", self.session.id)
            return
        latency = time.perf_counter() - onset_wall
        self.stats.barge_ins += 1
        self.stats.barge_in_latency_s.append(latency)
        BARGE_INS.labels(self.dialect).inc()
        BARGE_IN_LATENCY.labels(self.dialect).observe(latency)
        attributes: dict[str, Any] = {"voice.barge_in.latency_s": round(latency, 4)}
        if heard is not None:
            self._trim_history(heard, trim_log=answer_finished)
            attributes["voice.barge_in.heard_chars"] = len(heard)
        self.session.span.add_event("barge_in", attributes)
        if heard is not None and capture_content():
            logger.info(
                "barge-in on call %s after %.0f ms; the caller heard %r", self.session.id, latency * 1000, heard
            )
        else:
            logger.info("barge-in on call %s after %.0f ms", self.session.id, latency * 1000)

    def _unanswered(self, onset_wall: float) -> SpokenTurn | None:
        """The running turn, when it is this call's last spoken turn and none of its answer was sent before
        the caller's speech began at ``onset_wall`` (its start is confirmed ``min_speech_ms`` later)."""
        spoken, current, sent = self._spoken, self.session.runner.current, self._answer_sent_at
        if self.listener is not None or spoken is None or current is not spoken.turn:
            return None
        return spoken if sent is None or sent > onset_wall else None

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
        """Ends the call: cancels the running turn and the playout, saves the call log.

        An utterance the caller had not finished (or whose end was not yet decided) ends with the call
        (``hang_up``): the session records what the caller said, unanswered. A dialect with a listener
        decides its client's utterances itself, and one in progress is dropped.
        """
        if self._closed:
            return
        self._closed = True
        ended = self._endpointer.flush() if self.listener is None else None
        if ended is not None and not self._not_listening:
            event, transcript = self._speculator.take(ended, use=True)
            self.session.submit(self._utterance(event, transcript, "hang_up", None))
        await self._speculator.close()
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
