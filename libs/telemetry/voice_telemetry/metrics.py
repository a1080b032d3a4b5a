"""Prometheus metrics: the shared histogram buckets for speech latencies and the metrics HTTP port."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

logger = logging.getLogger(__name__)

# From tens of milliseconds (bus hops, first tokens) to seconds (whole utterances).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
# Real-time factors: processing time divided by audio duration.
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serves ``/metrics`` on ``port`` from a background thread; port 0 disables it."""
    if port:
        start_http_server(port, addr=host)
        logger.info("metrics on :%d/metrics", port)
