from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_PCM16: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_MULAW: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_ALAW: _ClassVar[AudioEncoding]

class AudioContainer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_CONTAINER_RAW: _ClassVar[AudioContainer]
    AUDIO_CONTAINER_WAV: _ClassVar[AudioContainer]
    AUDIO_CONTAINER_WEBM: _ClassVar[AudioContainer]
    AUDIO_CONTAINER_OGG: _ClassVar[AudioContainer]
    AUDIO_CONTAINER_MP3: _ClassVar[AudioContainer]
    AUDIO_CONTAINER_AUTO: _ClassVar[AudioContainer]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
AUDIO_ENCODING_PCM16: AudioEncoding
AUDIO_ENCODING_MULAW: AudioEncoding
AUDIO_ENCODING_ALAW: AudioEncoding
AUDIO_CONTAINER_RAW: AudioContainer
AUDIO_CONTAINER_WAV: AudioContainer
AUDIO_CONTAINER_WEBM: AudioContainer
AUDIO_CONTAINER_OGG: AudioContainer
AUDIO_CONTAINER_MP3: AudioContainer
AUDIO_CONTAINER_AUTO: AudioContainer

class AudioFormat(_message.Message):
    __slots__ = ("encoding", "sample_rate", "channels", "container")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate: int
    channels: int
    container: AudioContainer
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate: _Optional[int] = ..., channels: _Optional[int] = ..., container: _Optional[_Union[AudioContainer, str]] = ...) -> None: ...
