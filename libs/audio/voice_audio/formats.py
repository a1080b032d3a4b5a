"""Audio format vocabulary shared by the gateway and the workers.

Names the sample encodings and container formats the platform accepts, and the
single exception type raised for every malformed or unsupported input.
"""

from __future__ import annotations

import enum
import operator

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000


class Encoding(enum.Enum):
    """How individual samples are stored in raw (container-less) audio."""

    PCM16 = "pcm16"
    MULAW = "mulaw"
    ALAW = "alaw"


class Container(enum.Enum):
    """How audio bytes are wrapped; ``AUTO`` lets the demuxer probe the format."""

    RAW = "raw"
    WAV = "wav"
    WEBM = "webm"
    OGG = "ogg"
    MP3 = "mp3"
    AUTO = "auto"


class AudioFormatError(ValueError):
    """Raised for audio that is empty, malformed, or in an unsupported format."""


def check_sample_rate(sample_rate: int, *, what: str = "sample rate") -> int:
    """Validate a sample rate against the range the platform supports.

    Args:
        sample_rate: Rate in Hz.
        what: Name used in the error message.

    Returns:
        The rate as a plain ``int``.

    Raises:
        AudioFormatError: If the rate is not an integer in [8000, 192000].
    """
    rate = _as_int(sample_rate)
    if rate is None or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioFormatError(
            f"absurd {what} {sample_rate!r}: expected an integer between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz"
        )
    return rate


def check_channels(channels: int) -> int:
    """Validate a channel count.

    Args:
        channels: Number of interleaved channels.

    Returns:
        The channel count as a plain ``int``.

    Raises:
        AudioFormatError: If the count is not an integer in [1, 8].
    """
    count = _as_int(channels)
    if count is None or not 1 <= count <= 8:
        raise AudioFormatError(f"unsupported channel count {channels!r}: expected 1 to 8")
    return count


def _as_int(value: object) -> int | None:
    """Return ``value`` as a plain int if it is integral (numpy ints included), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None
