"""The agent's voice on a real-time call: sentences sent no faster than real time, playback marks, what
the caller has heard, and the voice-to-voice figure.

Pacing: audio is sent at most the media's ``lead_s`` ahead of real time (a small lead keeps the
carrier's buffer from running dry), so ``clear`` flushes little and the played position is known.
A sentence may come in pieces: each is sent as it comes, except bytes the dialect would pad (short of its
``pad_to`` multiple or ``min_chunk_bytes``), which wait for the next piece so no padding falls inside a
sentence; the sentence's mark follows its last piece.
What the caller heard is the sentences whose mark came back, plus the played fraction of the current one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from voice_audio import Encoding
from voice_gateway.agents.tools import CallAction
from voice_gateway.conversation.metrics import VOICE_TO_VOICE
from voice_runtime.tasks import cancel_and_wait


class CallTransport(Protocol):
    """What a streaming dialect does for the call engine."""

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
        pad_byte: The byte padding is made of: silence in the encoding (0 for PCM16, 0xFF for μ-law).
        lead_s: How far ahead of real time audio may be sent (the far end buffers it).
    """

    encoding: Encoding
    sample_rate: int
    chunk_bytes: int
    pad_to: int = 0
    min_chunk_bytes: int = 0
    lead_s: float = 0.3
    pad_byte: int = 0

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * (2 if self.encoding == Encoding.PCM16 else 1)


@dataclass
class CallStats:
    """Figures of one call, for the call log, metrics and tests."""

    voice_to_voice_s: list[float] = field(default_factory=list)
    barge_in_latency_s: list[float] = field(default_factory=list)
    barge_ins: int = 0
    bad_frames: int = 0


SPEECH_MS_PER_WORD = 400.0
"""What a sentence whose last piece has not come is taken to last, at least, per word (150 words a minute)."""


def words_heard(text: str, heard_ms: float, audio_ms: float, *, complete: bool) -> str:
    """The words of a sentence that ``heard_ms`` of its audio speak, by their share of its audio.

    Args:
        text: The sentence.
        heard_ms: How much of its audio was played.
        audio_ms: How much of its audio there is (so far, when it is not ``complete``).
        complete: Its last piece came; otherwise it is never heard whole, and is taken to last at least
            ``SPEECH_MS_PER_WORD`` a word.

    Returns:
        The first words of ``text`` heard.
    """
    words = text.split()
    total = audio_ms if complete else max(audio_ms, len(words) * SPEECH_MS_PER_WORD)
    count = int(len(words) * min(1.0, max(0.0, heard_ms) / max(total, 1e-3)))
    return " ".join(words[: count if complete else min(count, len(words) - 1)])


@dataclass
class _Spoken:
    """One sentence queued or played."""

    text: str
    label: str
    mark: str
    duration_s: float = 0.0
    started_at: float | None = None
    complete: bool = False
    played: bool = False


@dataclass
class _Piece:
    """Audio of one sentence waiting to be sent; ``final``: the sentence's last."""

    spoken: _Spoken
    audio: bytes
    final: bool


class Playout:
    """Plays the agent's sentences on one call.

    Args:
        transport: How the dialect sends audio, marks and ``clear``.
        media: The call's audio format.
        dialect: For the voice-to-voice metric.
        stats: Where the call's figures go.
    """

    def __init__(self, transport: CallTransport, media: MediaFormat, dialect: str, stats: CallStats) -> None:
        self._transport = transport
        self._media = media
        self._voice_to_voice = VOICE_TO_VOICE.labels(dialect)
        self._stats = stats
        self._queue: asyncio.Queue[_Piece | None] = asyncio.Queue()
        self._spoken: list[_Spoken] = []
        self._open: _Spoken | None = None
        self._playing: _Spoken | None = None
        self._mark_seq = 0
        self._answer_to: float | None = None
        self._player = asyncio.create_task(self._play())

    @property
    def pending(self) -> bool:
        """Audio is queued, playing, or sent but not yet confirmed played."""
        return self._playing is not None or not self._queue.empty() or any(not s.played for s in self._spoken)

    def answer_to(self, last_voiced_wall: float | None) -> None:
        """The next audio sent answers speech whose last voiced sample was at ``last_voiced_wall``
        (``time.perf_counter()``): its first byte sets the voice-to-voice figure."""
        self._answer_to = last_voiced_wall

    def begin_answer(self) -> None:
        """A new answer (turn) starts: sentences already played belong to earlier answers and are forgotten,
        so :meth:`heard_text` and :meth:`remaining_s` speak of this answer only."""
        self._spoken = [spoken for spoken in self._spoken if not spoken.played]

    def enqueue(self, text: str, audio: bytes, label: str, *, final: bool = True) -> None:
        """Queues a piece of one sentence of speech (the whole of it by default).

        Args:
            text: The sentence.
            audio: This piece's audio, in the call's media format (may be empty).
            label: Names the sentence and its mark (a sequence number is added); pieces of one sentence share it.
            final: This is the sentence's last piece: its mark follows it.
        """
        spoken = self._open
        if spoken is not None and spoken.label != label:
            # Its last piece never came (its turn was cut off): the sentence ends with what was queued.
            self._close_open()
            spoken = None
        if spoken is None:
            if not audio and final:
                return
            self._mark_seq += 1
            spoken = _Spoken(text=text, label=label, mark=f"{label}-{self._mark_seq}")
            self._spoken.append(spoken)
        spoken.duration_s += len(audio) / self._media.bytes_per_second
        spoken.complete = final
        self._open = None if final else spoken
        self._queue.put_nowait(_Piece(spoken, audio, final))

    def _close_open(self) -> None:
        if self._open is not None:
            self._open.complete = True
            self._queue.put_nowait(_Piece(self._open, b"", True))
            self._open = None

    def on_mark(self, name: str) -> None:
        """The far end played everything up to mark ``name``."""
        for spoken in self._spoken:
            if spoken.mark == name:
                spoken.played = True
                break

    def heard_text(self) -> str:
        """What the caller heard of the agent's current answer (since :meth:`begin_answer`): played sentences
        and the played part of the one being played (see :func:`words_heard`)."""
        now = time.monotonic()
        parts: list[str] = []
        for spoken in self._spoken:
            if spoken.played:
                parts.append(spoken.text)
            elif spoken.started_at is not None and spoken.started_at < now:
                played_ms = (now - spoken.started_at) * 1000
                parts.append(words_heard(spoken.text, played_ms, spoken.duration_s * 1000, complete=spoken.complete))
                break
            else:
                break
        return " ".join(p for p in parts if p).strip()

    def remaining_s(self) -> float:
        """Seconds of the current answer's audio queued or sent (since :meth:`begin_answer` or a flush)."""
        return sum(s.duration_s for s in self._spoken)

    async def flush(self) -> None:
        """Drops everything unplayed and asks the far end to do the same (``clear``)."""
        while not self._queue.empty():
            self._queue.get_nowait()
        await cancel_and_wait(self._player)
        self._playing = None
        self._open = None
        await self._transport.clear()
        self._spoken.clear()
        self._player = asyncio.create_task(self._play())

    async def close(self) -> None:
        await cancel_and_wait(self._player)

    async def _play(self) -> None:
        """Sends queued pieces in chunks, never more than the media's ``lead_s`` ahead of real time."""
        clock_start: float | None = None
        sent_s = 0.0
        media = self._media
        held = b""
        while (piece := await self._queue.get()) is not None:
            spoken = piece.spoken
            now = time.monotonic()
            if clock_start is None or now > clock_start + sent_s:
                clock_start, sent_s = now, 0.0
            self._playing = spoken
            if spoken.started_at is None:
                spoken.started_at = clock_start + sent_s
            audio = held + piece.audio
            cut = len(audio) if piece.final else self._unpadded(len(audio))
            audio, held = audio[:cut], audio[cut:]
            for offset in range(0, len(audio), media.chunk_bytes):
                chunk = self._pad(audio[offset : offset + media.chunk_bytes])
                ahead = clock_start + sent_s - time.monotonic() - media.lead_s
                if ahead > 0:
                    await asyncio.sleep(ahead)
                if self._answer_to is not None:
                    latency = time.perf_counter() - self._answer_to
                    self._answer_to = None
                    self._stats.voice_to_voice_s.append(latency)
                    self._voice_to_voice.observe(latency)
                await self._transport.send_audio(chunk)
                sent_s += len(chunk) / media.bytes_per_second
            if not piece.final:
                continue
            if not await self._transport.send_mark(spoken.mark):
                end = spoken.started_at + spoken.duration_s
                loop = asyncio.get_running_loop()
                loop.call_at(loop.time() + max(0.0, end - time.monotonic()), self.on_mark, spoken.mark)
            self._playing = None

    def _unpadded(self, size: int) -> int:
        """How many of ``size`` bytes go out in chunks that need no padding (the rest waits for more)."""
        media = self._media
        size -= size % media.pad_to if media.pad_to else 0
        tail = size % media.chunk_bytes
        return size - tail if tail < media.min_chunk_bytes else size

    def _pad(self, piece: bytes) -> bytes:
        media = self._media
        size = max(len(piece), media.min_chunk_bytes)
        if media.pad_to and size % media.pad_to:
            size += media.pad_to - size % media.pad_to
        return piece + bytes([media.pad_byte]) * (size - len(piece)) if size > len(piece) else piece
