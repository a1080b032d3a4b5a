"""Audio codecs, resampling and container decoding."""

from voice_audio.decode import decode_to_float, decode_to_pcm16
from voice_audio.encode import encode_pcm16, read_wav, wav_bytes
from voice_audio.formats import AudioFormatError, Container, Encoding
from voice_audio.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from voice_audio.resample import StreamResampler, resample

__all__ = [
    "AudioFormatError",
    "Container",
    "Encoding",
    "StreamResampler",
    "alaw_decode",
    "alaw_encode",
    "decode_to_float",
    "decode_to_pcm16",
    "encode_pcm16",
    "read_wav",
    "resample",
    "ulaw_decode",
    "ulaw_encode",
    "wav_bytes",
]
