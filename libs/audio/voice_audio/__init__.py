"""Audio codecs, resampling and container decoding."""
