"""Benchmarks of the voice platform (`make bench`): figures reported, nothing asserted."""
