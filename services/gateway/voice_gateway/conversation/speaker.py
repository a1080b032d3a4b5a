"""Sentence-to-speech: each sentence of an answer goes to the TTS workers at once (the requests run in
parallel) and its audio is emitted strictly in sentence order, as :class:`SpeechAudio` events: each piece
as it arrives (a worker sends a long sentence in pieces), the last one marked ``final``.

Fixed texts (an agent's greeting, its fallback message) are synthesized once per voice and output
format and then served from :class:`SpeechCache`, so a call's first words cost no TTS round trip.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from voice.v1 import audio_pb2, tts_pb2
from voice_bus.client import BusClient
from voice_gateway.agents import Agent
from voice_gateway.conversation.events import Emit, OutputFormat, SpeechAudio, SpeechCompleted
from voice_runtime.tasks import cancel_and_wait


class SpeechCache:
    """The synthesized audio of fixed texts, by voice, TTS settings, output format and text (least
    recently used entries go first).

    Args:
        max_entries: How many sentences it keeps.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self._entries: OrderedDict[tuple, tuple[bytes, int]] = OrderedDict()
        self._max_entries = max_entries

    def get(self, key: tuple) -> tuple[bytes, int] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple, audio: bytes, rate: int) -> None:
        if not audio:
            return
        self._entries[key] = (audio, rate)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class Speaker:
    """Synthesizes the sentences of one answer in parallel and emits their audio in order.

    Args:
        bus: Client of the TTS workers.
        timeout_s: Budget of each TTS request.
        agent: Whose voice and TTS settings to use.
        session_id: For the requests' traces and logs.
        output: Encoding and rate the dialect needs.
        emit: Where the audio goes.
        started: ``time.perf_counter()`` at the start of the turn, for ``first_audio_s``.
        cache: Where fixed texts' audio is kept (:meth:`say` with ``fixed=True``).
    """

    def __init__(
        self,
        bus: BusClient,
        timeout_s: float,
        agent: Agent,
        session_id: str,
        output: OutputFormat,
        emit: Emit,
        started: float,
        cache: SpeechCache | None = None,
    ) -> None:
        self._bus = bus
        self._cache = cache
        self._timeout_s = timeout_s
        self._agent = agent
        self._session_id = session_id
        self._output = output
        self._emit = emit
        self._started = started
        self._pending: list[asyncio.Task] = []
        self._player: asyncio.Task | None = None
        self._queue: asyncio.Queue[tuple[int, str, asyncio.Task, asyncio.Queue] | None] = asyncio.Queue()
        self._audio: list[bytes] = []
        self._rate = 0
        self.timings: dict[str, float] = {}

    def say(self, sentence: str, *, fixed: bool = False) -> None:
        """Starts synthesizing ``sentence``; its audio is emitted after the sentences said before it.

        Args:
            sentence: The text to speak.
            fixed: The text is the agent's own (greeting, fallback): its audio is cached and reused.
        """
        index = len(self._pending)
        pieces: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue()
        task = asyncio.create_task(self._synthesize(sentence, index, fixed, pieces))
        self._pending.append(task)
        self._queue.put_nowait((index, sentence, task, pieces))
        if self._player is None:
            self._player = asyncio.create_task(self._play())

    async def _synthesize(
        self, sentence: str, index: int, fixed: bool, pieces: asyncio.Queue[tuple[bytes, int] | None]
    ) -> None:
        """Puts the sentence's audio on ``pieces`` as it arrives, then ``None``."""
        agent = self._agent
        output = self._output
        key = (agent.voice, agent.tts.speaker, agent.tts.language, agent.tts.speed, output.encoding, output.sample_rate)
        key += (sentence,)
        if fixed and self._cache is not None and (cached := self._cache.get(key)) is not None:
            if index == 0:
                self.timings["tts_first_chunk_s"] = 0.0
            pieces.put_nowait(cached)
            pieces.put_nowait(None)
            return
        request = tts_pb2.SynthesizeRequest(
            text=sentence,
            voice=agent.voice,
            speaker=agent.tts.speaker,
            language=agent.tts.language,
            speed=agent.tts.speed,
            session_id=self._session_id,
            output_format=audio_pb2.AudioFormat(encoding=self._output.encoding, sample_rate=self._output.sample_rate),
        )
        received: list[bytes] = []
        rate = self._output.sample_rate
        requested = time.perf_counter()
        async for event in self._bus.stream("tts", request, timeout=self._timeout_s, session_id=self._session_id):
            if event.HasField("chunk") and event.chunk.audio:
                if index == 0 and not received:
                    self.timings["tts_first_chunk_s"] = time.perf_counter() - requested
                received.append(event.chunk.audio)
                rate = event.chunk.format.sample_rate
                pieces.put_nowait((event.chunk.audio, rate))
        if fixed and self._cache is not None:
            self._cache.put(key, b"".join(received), rate)
        pieces.put_nowait(None)

    async def _play(self) -> None:
        while (item := await self._queue.get()) is not None:
            index, sentence, task, pieces = item
            rate = 0
            while (piece := await self._next_piece(task, pieces)) is not None:
                audio, rate = piece
                if not self._audio:
                    self.timings["first_audio_s"] = time.perf_counter() - self._started
                self._audio.append(audio)
                self._rate = rate
                await self._emit(
                    SpeechAudio(audio=audio, sample_rate=rate, text=sentence, sentence_index=index, final=False)
                )
            if rate:
                await self._emit(SpeechAudio(sample_rate=rate, text=sentence, sentence_index=index, final=True))

    @staticmethod
    async def _next_piece(
        task: asyncio.Task, pieces: asyncio.Queue[tuple[bytes, int] | None]
    ) -> tuple[bytes, int] | None:
        """The sentence's next piece; ``None`` at its end; raises what its synthesis raised."""
        if pieces.empty() and not task.done():
            getter = asyncio.ensure_future(pieces.get())
            try:
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                return getter.result()
        if not pieces.empty():
            return pieces.get_nowait()
        await task
        return None

    async def finish(self) -> None:
        """Waits until every sentence said so far has been emitted, then reports the whole speech."""
        if self._player is None:
            return
        self._queue.put_nowait(None)
        await self._player
        self.timings["speech_s"] = time.perf_counter() - self._started
        await self._emit(SpeechCompleted(audio=b"".join(self._audio), sample_rate=self._rate))

    async def cancel(self) -> None:
        """Stops synthesis and playback of whatever is unfinished (the bus requests are cancelled)."""
        await cancel_and_wait(*self._pending, self._player)
        for task in (*self._pending, self._player):
            if task is not None and task.done() and not task.cancelled():
                # Marks a failure as seen: the first one already ended the turn through finish(); the
                # others (every sentence fails alike when TTS is down) would be logged as unretrieved.
                task.exception()
