"""A realtime session's input audio buffer: ``input_audio_buffer.append`` decoded and checked, kept until a
commit (push-to-talk) or, under server VAD, as a bounded window while the call's VAD hears it.

Appended audio is base64 in the session's input format (``audio/pcm`` 24 kHz, ``audio/pcmu``,
``audio/pcma``); a commit hands the turn PCM16 at the input rate (the STT worker resamples once).
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from voice.v1 import audio_pb2
from voice_audio import Encoding, alaw_decode, ulaw_decode
from voice_gateway.conversation.playout import MediaFormat
from voice_gateway.dialects.realtime_session import ConfigError

_DECODE = {Encoding.MULAW: ulaw_decode, Encoding.ALAW: alaw_decode}
MIN_COMMIT_S = 0.1


class InputAudio:
    """The input audio buffer of one session.

    Args:
        max_s: The most audio it holds (the agent's ``max_utterance_s``).
    """

    def __init__(self, max_s: float) -> None:
        self._max_s = max_s
        self._chunks: list[np.ndarray] = []
        self._samples = 0

    def decode(self, message: dict, param: str, media: MediaFormat) -> tuple[np.ndarray, bytes]:
        """The base64 ``audio`` of ``message``: PCM16 samples at the input rate, and the bytes as sent.

        Raises:
            ConfigError: Not base64, or not whole samples of the input format.
        """
        audio = message.get("audio")
        if not isinstance(audio, str) or not audio:
            raise ConfigError(f"{param} must be base64 audio", param)
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{param} is not valid base64", param) from None
        if media.encoding == Encoding.PCM16:
            if len(data) % 2:
                raise ConfigError(f"{param}: audio/pcm must be whole 16-bit samples (an even byte count)", param)
            return np.frombuffer(data, dtype="<i2"), data
        return _DECODE[media.encoding](data), data

    def append(self, samples: np.ndarray, media: MediaFormat, *, rolling: bool) -> None:
        """Adds ``samples``; ``rolling`` (server VAD) drops the oldest past the maximum instead of refusing.

        Raises:
            ConfigError: The buffer is full (push-to-talk).
        """
        limit = int(self._max_s * media.sample_rate)
        if not rolling and self._samples + len(samples) > limit:
            raise ConfigError(f"the input audio buffer is full ({self._max_s:g} s)", "audio")
        self._chunks.append(samples)
        self._samples += len(samples)
        while self._samples > limit and len(self._chunks) > 1:
            self._samples -= len(self._chunks.pop(0))

    def commit(self, media: MediaFormat) -> tuple[bytes, audio_pb2.AudioFormat]:
        """The buffered audio as PCM16 and its format, and an empty buffer.

        Raises:
            ConfigError: Less than 100 ms of audio.
        """
        if self._samples < media.sample_rate * MIN_COMMIT_S:
            raise ConfigError("buffer too small: expected at least 100 ms of audio", "input_audio_buffer")
        pcm = np.concatenate(self._chunks).astype("<i2").tobytes()
        self.clear()
        return pcm, audio_pb2.AudioFormat(encoding=audio_pb2.AUDIO_ENCODING_PCM16, sample_rate=media.sample_rate)

    def clear(self) -> None:
        self._chunks, self._samples = [], 0
