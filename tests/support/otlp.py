"""A real OTLP/HTTP trace receiver for the tests: processes export to it as they would to a collector.

The receiver itself is the CLI's (:mod:`voicectl.otlp_receiver`), the one ``voicectl up``
starts for the local trace view; the tests keep its spans in memory.
"""

from __future__ import annotations

from voicectl.otlp_receiver import OtlpReceiver

__all__ = ["OtlpReceiver"]
