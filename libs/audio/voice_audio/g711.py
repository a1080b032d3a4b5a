"""G.711 μ-law and A-law codecs, vectorised with numpy lookup tables.

Bit-exact with CPython's ``audioop`` (``lin2ulaw``/``ulaw2lin``/``lin2alaw``/
``alaw2lin``). Every table is built once at import, so each call is a single
fancy-indexing pass over the frame.
"""

from __future__ import annotations

import numpy as np

from voice_audio.formats import AudioFormatError

__all__ = ["alaw_decode", "alaw_encode", "ulaw_decode", "ulaw_encode"]

_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)
_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159


def _build_ulaw_encode_table() -> np.ndarray:
    # Indexed by the int16 sample reinterpreted as uint16; the algorithm works on 14-bit values.
    pcm = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32) >> 2
    negative = pcm < 0
    mask = np.where(negative, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, magnitude, side="left")
    coded = (np.minimum(seg, 7) << 4) | ((magnitude >> (np.minimum(seg, 7) + 1)) & 0xF)
    coded = np.where(seg >= 8, 0x7F, coded)
    return (coded ^ mask).astype(np.uint8)


def _build_ulaw_decode_table() -> np.ndarray:
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((code & 0x0F) << 3) + _ULAW_BIAS) << ((code & 0x70) >> 4)
    return np.where(code & 0x80, _ULAW_BIAS - magnitude, magnitude - _ULAW_BIAS).astype(np.int16)


def _build_alaw_encode_table() -> np.ndarray:
    # Same indexing as μ-law; A-law works on 13-bit values.
    pcm = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32) >> 3
    negative = pcm < 0
    mask = np.where(negative, 0x55, 0xD5)
    magnitude = np.where(negative, -pcm - 1, pcm)
    seg = np.searchsorted(_ALAW_SEG_END, magnitude, side="left")
    shift = np.where(seg < 2, 1, seg)
    coded = (seg << 4) | ((magnitude >> shift) & 0xF)
    return (coded ^ mask).astype(np.uint8)


def _build_alaw_decode_table() -> np.ndarray:
    code = np.arange(256, dtype=np.int32) ^ 0x55
    mantissa = (code & 0x0F) << 4
    seg = (code & 0x70) >> 4
    magnitude = np.where(
        seg == 0,
        mantissa + 8,
        (mantissa + 0x108) << np.maximum(seg - 1, 0),
    )
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)


_ULAW_ENCODE = _build_ulaw_encode_table()
_ULAW_DECODE = _build_ulaw_decode_table()
_ALAW_ENCODE = _build_alaw_encode_table()
_ALAW_DECODE = _build_alaw_decode_table()


def _as_index(samples: np.ndarray) -> np.ndarray:
    if not isinstance(samples, np.ndarray) or samples.dtype != np.int16:
        raise AudioFormatError(
            f"G.711 encoding needs an int16 numpy array, got {type(samples).__name__}"
            + (f" of {samples.dtype}" if isinstance(samples, np.ndarray) else "")
        )
    return samples.reshape(-1).view(np.uint16)


def _as_codes(data: bytes | bytearray | memoryview) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def ulaw_encode(samples: np.ndarray) -> bytes:
    """Encode linear PCM to G.711 μ-law.

    Args:
        samples: int16 samples (any shape; flattened in C order).

    Returns:
        One μ-law byte per sample.

    Raises:
        AudioFormatError: If ``samples`` is not an int16 array.
    """
    return _ULAW_ENCODE[_as_index(samples)].tobytes()


def ulaw_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode G.711 μ-law to linear PCM.

    Args:
        data: μ-law bytes, one per sample.

    Returns:
        A new int16 array with one sample per input byte.
    """
    return _ULAW_DECODE[_as_codes(data)]


def alaw_encode(samples: np.ndarray) -> bytes:
    """Encode linear PCM to G.711 A-law.

    Args:
        samples: int16 samples (any shape; flattened in C order).

    Returns:
        One A-law byte per sample.

    Raises:
        AudioFormatError: If ``samples`` is not an int16 array.
    """
    return _ALAW_ENCODE[_as_index(samples)].tobytes()


def alaw_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode G.711 A-law to linear PCM.

    Args:
        data: A-law bytes, one per sample.

    Returns:
        A new int16 array with one sample per input byte.
    """
    return _ALAW_DECODE[_as_codes(data)]
