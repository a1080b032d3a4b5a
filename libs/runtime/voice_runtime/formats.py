"""Translation between the ``voice.v1.AudioFormat`` protobuf and the audio library's enums."""

from __future__ import annotations

from voice.v1 import audio_pb2
from voice_audio import AudioFormatError, Container, Encoding

ENCODINGS = {
    audio_pb2.AUDIO_ENCODING_PCM16: Encoding.PCM16,
    audio_pb2.AUDIO_ENCODING_MULAW: Encoding.MULAW,
    audio_pb2.AUDIO_ENCODING_ALAW: Encoding.ALAW,
}
PROTO_ENCODINGS = {value: key for key, value in ENCODINGS.items()}
CONTAINERS = {
    audio_pb2.AUDIO_CONTAINER_RAW: Container.RAW,
    audio_pb2.AUDIO_CONTAINER_WAV: Container.WAV,
    audio_pb2.AUDIO_CONTAINER_WEBM: Container.WEBM,
    audio_pb2.AUDIO_CONTAINER_OGG: Container.OGG,
    audio_pb2.AUDIO_CONTAINER_MP3: Container.MP3,
    audio_pb2.AUDIO_CONTAINER_AUTO: Container.AUTO,
}


def encoding_of(fmt: audio_pb2.AudioFormat, *, default: Encoding | None = None) -> Encoding:
    """The sample encoding a format names; UNSPECIFIED gives ``default`` or an AudioFormatError."""
    if fmt.encoding == audio_pb2.AUDIO_ENCODING_UNSPECIFIED and default is not None:
        return default
    try:
        return ENCODINGS[fmt.encoding]
    except KeyError:
        name = (
            audio_pb2.AudioEncoding.Name(fmt.encoding)
            if fmt.encoding in audio_pb2.AudioEncoding.values()
            else fmt.encoding
        )
        raise AudioFormatError(f"unsupported audio encoding {name}; use PCM16, MULAW or ALAW") from None


def container_of(fmt: audio_pb2.AudioFormat) -> Container:
    """The container a format names, or an AudioFormatError for an unknown value."""
    try:
        return CONTAINERS[fmt.container]
    except KeyError:
        raise AudioFormatError(f"unsupported audio container {fmt.container}") from None


def proto_format(encoding: Encoding, sample_rate: int) -> audio_pb2.AudioFormat:
    """A raw mono ``AudioFormat`` message."""
    return audio_pb2.AudioFormat(
        encoding=PROTO_ENCODINGS[encoding],
        sample_rate=sample_rate,
        channels=1,
        container=audio_pb2.AUDIO_CONTAINER_RAW,
    )
