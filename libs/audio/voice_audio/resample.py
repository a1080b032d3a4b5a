"""Sample-rate conversion with libsoxr, one-shot and streaming.

``resample`` converts a whole buffer; ``StreamResampler`` converts a stream
chunk by chunk while keeping the filter state between chunks, so frame
boundaries leave no clicks or gaps.
"""

from __future__ import annotations

import numpy as np
import soxr

from voice_audio.formats import AudioFormatError, check_sample_rate

__all__ = ["StreamResampler", "resample"]

_SUPPORTED_DTYPES = (np.dtype(np.int16), np.dtype(np.float32))


def _check_samples(samples: np.ndarray) -> None:
    if not isinstance(samples, np.ndarray) or samples.dtype not in _SUPPORTED_DTYPES:
        raise AudioFormatError(
            "resampling needs an int16 or float32 numpy array, got "
            + (f"dtype {samples.dtype}" if isinstance(samples, np.ndarray) else type(samples).__name__)
        )
    if samples.ndim != 1:
        raise AudioFormatError(f"resampling needs mono 1-D samples, got shape {samples.shape}")


def resample(samples: np.ndarray, from_rate: int, to_rate: int, *, quality: str = "HQ") -> np.ndarray:
    """Resample a complete mono buffer.

    Args:
        samples: 1-D int16 or float32 samples.
        from_rate: Rate of ``samples`` in Hz.
        to_rate: Wanted rate in Hz.
        quality: soxr quality recipe ("QQ", "LQ", "MQ", "HQ", "VHQ").

    Returns:
        Samples at ``to_rate`` with the input's dtype; the input object itself
        when the rates are equal.

    Raises:
        AudioFormatError: For an unsupported dtype or shape, or an absurd rate.
    """
    _check_samples(samples)
    from_rate = check_sample_rate(from_rate, what="source sample rate")
    to_rate = check_sample_rate(to_rate, what="target sample rate")
    if from_rate == to_rate or samples.size == 0:
        return samples
    return soxr.resample(samples, from_rate, to_rate, quality=quality)


class StreamResampler:
    """Resample a mono stream chunk by chunk with continuity across chunks.

    Not thread-safe: use one instance per stream.

    Example:
        >>> rs = StreamResampler(8000, 16000)
        >>> out = [rs.process(chunk) for chunk in chunks] + [rs.flush()]
    """

    def __init__(
        self,
        from_rate: int,
        to_rate: int,
        *,
        dtype: type[np.int16] | type[np.float32] = np.int16,
        quality: str = "HQ",
    ) -> None:
        """Create a stream resampler.

        Args:
            from_rate: Input rate in Hz.
            to_rate: Output rate in Hz.
            dtype: Sample type of every chunk, ``np.int16`` or ``np.float32``.
            quality: soxr quality recipe ("QQ", "LQ", "MQ", "HQ", "VHQ").

        Raises:
            AudioFormatError: For an absurd rate or an unsupported dtype.
        """
        self.from_rate = check_sample_rate(from_rate, what="source sample rate")
        self.to_rate = check_sample_rate(to_rate, what="target sample rate")
        self.dtype = np.dtype(dtype)
        if self.dtype not in _SUPPORTED_DTYPES:
            raise AudioFormatError(f"StreamResampler supports int16 or float32, not {self.dtype}")
        self._passthrough = self.from_rate == self.to_rate
        self._stream = (
            None
            if self._passthrough
            else soxr.ResampleStream(self.from_rate, self.to_rate, 1, dtype=self.dtype.name, quality=quality)
        )
        self._finished = False

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Resample the next chunk of the stream.

        Args:
            chunk: 1-D samples of the resampler's dtype; any length, even 0.

        Returns:
            The output samples available so far (may be shorter or empty
            because of filter delay; the remainder comes out of ``flush``).

        Raises:
            AudioFormatError: If the chunk has the wrong dtype or shape, or the
                stream was already flushed.
        """
        self._check_chunk(chunk)
        if self._stream is None:
            return chunk
        return self._stream.resample_chunk(chunk, last=False)

    def flush(self) -> np.ndarray:
        """End the stream and return the samples still held in the filter.

        Returns:
            The remaining output samples; after this the resampler is finished.
        """
        if self._finished:
            return np.zeros(0, dtype=self.dtype)
        self._finished = True
        if self._stream is None:
            return np.zeros(0, dtype=self.dtype)
        return self._stream.resample_chunk(np.zeros(0, dtype=self.dtype), last=True)

    def _check_chunk(self, chunk: np.ndarray) -> None:
        if self._finished:
            raise AudioFormatError("StreamResampler was already flushed")
        if not isinstance(chunk, np.ndarray) or chunk.dtype != self.dtype or chunk.ndim != 1:
            raise AudioFormatError(
                f"StreamResampler expects 1-D {self.dtype} chunks, got "
                + (f"{chunk.dtype} with shape {chunk.shape}" if isinstance(chunk, np.ndarray) else type(chunk).__name__)
            )
