"""A real OTLP/HTTP trace receiver for the tests: processes export to it as they would to a collector.

The receiver itself is the library's (:mod:`voice_telemetry.collector`), the one ``voicectl up``
starts for the local trace view; the tests keep its spans in memory.
"""

from __future__ import annotations

from voice_telemetry.collector import OtlpReceiver

__all__ = ["OtlpReceiver"]
