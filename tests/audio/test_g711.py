"""G.711 μ-law / A-law codecs: bit-exact with CPython's audioop over every input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from voice_audio import AudioFormatError, alaw_decode, alaw_encode, ulaw_decode, ulaw_encode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ALL_INT16 = np.arange(65536, dtype=np.uint16).view(np.int16)
ALL_BYTES = bytes(range(256))


def test_ulaw_encode_matches_audioop_for_every_int16() -> None:
    assert ulaw_encode(ALL_INT16) == audioop.lin2ulaw(ALL_INT16.astype("<i2").tobytes(), 2)


def test_alaw_encode_matches_audioop_for_every_int16() -> None:
    assert alaw_encode(ALL_INT16) == audioop.lin2alaw(ALL_INT16.astype("<i2").tobytes(), 2)


def test_ulaw_decode_matches_audioop_for_every_byte() -> None:
    decoded = ulaw_decode(ALL_BYTES)
    assert decoded.dtype == np.int16
    assert decoded.astype("<i2").tobytes() == audioop.ulaw2lin(ALL_BYTES, 2)


def test_alaw_decode_matches_audioop_for_every_byte() -> None:
    decoded = alaw_decode(ALL_BYTES)
    assert decoded.dtype == np.int16
    assert decoded.astype("<i2").tobytes() == audioop.alaw2lin(ALL_BYTES, 2)


@pytest.mark.parametrize(
    ("encode", "decode", "lin2x", "x2lin"),
    [
        (ulaw_encode, ulaw_decode, audioop.lin2ulaw, audioop.ulaw2lin),
        (alaw_encode, alaw_decode, audioop.lin2alaw, audioop.alaw2lin),
    ],
    ids=["ulaw", "alaw"],
)
def test_round_trip_matches_audioop_on_random_frames(encode, decode, lin2x, x2lin) -> None:
    rng = np.random.default_rng(711)
    frame = rng.integers(-32768, 32768, size=4000, dtype=np.int16)
    coded = encode(frame)
    assert len(coded) == frame.size
    assert coded == lin2x(frame.astype("<i2").tobytes(), 2)
    assert decode(coded).astype("<i2").tobytes() == x2lin(coded, 2)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = bytearray(b"\x00\x7f\x80\xff")
    assert np.array_equal(ulaw_decode(data), ulaw_decode(memoryview(bytes(data))))


def test_empty_frame_round_trips() -> None:
    assert ulaw_encode(np.zeros(0, dtype=np.int16)) == b""
    assert alaw_decode(b"").size == 0


@pytest.mark.parametrize("bad", [np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.int32), b"\x00\x00"])
def test_encode_rejects_non_int16(bad) -> None:
    with pytest.raises(AudioFormatError, match="int16"):
        ulaw_encode(bad)
    with pytest.raises(AudioFormatError, match="int16"):
        alaw_encode(bad)
