"""The TTS worker's handler sends a sentence's pieces as they come, resampled as one stream: joined, they
are the sentence resampled in one go (no click where two pieces meet)."""

from __future__ import annotations

import numpy as np

from voice.v1 import audio_pb2, tts_pb2
from voice_audio import resample
from voice_bus.worker import RequestContext
from voice_tts.engine import SpeechPieces, TextToSpeechEngine, Voice
from voice_tts.handler import SynthesizeHandler

RATE = 22050
TONE = (8000 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE)).astype(np.int16)
CUTS = (6144, 18432)


class ThreePieces(TextToSpeechEngine):
    """Speaks every sentence as one second of a 440 Hz tone, in three pieces."""

    name = "tone"

    def load(self) -> None:
        return None

    @property
    def loaded(self) -> bool:
        return True

    def voices(self) -> list[Voice]:
        return [Voice(name="tone", engine=self.name, language="en", sample_rate=RATE)]

    def _prepare(self, voice, speaker, language):
        def pieces(sentence: str, speed: float) -> SpeechPieces:
            parts = np.split(TONE, CUTS)
            for number, part in enumerate(parts):
                yield part, number == len(parts) - 1

        return RATE, pieces


async def test_pieces_are_sent_as_they_come_and_resampled_as_one_stream():
    handler = SynthesizeHandler(ThreePieces())
    request = tts_pb2.SynthesizeRequest(
        text="One. Two.",
        output_format=audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=8000),
    )
    chunks = [event.chunk async for event in handler(request, RequestContext(request_id="r1")) if event.chunk.audio]
    assert [c.sentence_index for c in chunks] == [0, 0, 0, 1, 1, 1]
    assert [c.text for c in chunks] == ["One."] * 3 + ["Two."] * 3
    expected = resample(TONE, RATE, 8000).astype(np.float64)
    for sentence in (chunks[:3], chunks[3:]):
        joined = np.frombuffer(b"".join(c.audio for c in sentence), dtype="<i2").astype(np.float64)
        assert abs(joined.size - expected.size) <= 2
        size = min(joined.size, expected.size)
        assert np.max(np.abs(joined[:size] - expected[:size])) < 40, "a step where two pieces meet"
