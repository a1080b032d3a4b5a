#!/usr/bin/env python
"""Container health checks and the gateway's pre-stop drain, shipped in every image as ``voice-probe``.

Docker's ``HEALTHCHECK`` and Kubernetes' ``preStop`` hook run it; it needs only the standard library
(and ``grpcio-health-checking`` for ``grpc``, which every worker image has)::

    voice-probe grpc [--port N]     exit 0 when grpc.health.v1 answers SERVING (port: $GRPC_PORT)
    voice-probe http URL            exit 0 when URL answers 2xx
    voice-probe drain [--url URL] [--min-seconds S] [--max-seconds S]
                                    wait until the gateway holds no session (its
                                    voice_gateway_active_sessions gauge reads 0), at least S
                                    seconds and at most the maximum, then exit 0

Kubernetes removes a terminating pod from its Service's endpoints while ``drain`` waits, so no
new call lands on it, and only then sends SIGTERM: calls in progress finish on the old pod.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request

ACTIVE_SESSIONS = "voice_gateway_active_sessions"
POLL_S = 1.0


def check_grpc(port: int, timeout_s: float) -> bool:
    """Asks the gRPC health service on ``127.0.0.1:port`` about the server as a whole.

    Args:
        port: The worker's gRPC port.
        timeout_s: Deadline of the call.

    Returns:
        Whether the answer is SERVING.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def check_http(url: str, timeout_s: float) -> bool:
    """Whether ``url`` answers with a 2xx status within ``timeout_s``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def active_sessions(metrics_text: str, metric: str = ACTIVE_SESSIONS) -> float:
    """Sums every sample of ``metric`` (one per dialect label) in Prometheus text exposition.

    Args:
        metrics_text: The body of a ``/metrics`` answer.
        metric: The gauge's name.

    Returns:
        The total, 0 when the metric is absent.
    """
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(metric):
            continue
        name, _, rest = line.partition(" ")
        if name != metric and not name.startswith(metric + "{"):
            continue
        if "{" in name and "}" not in name:
            # A label value with a space: the value follows the closing brace.
            rest = line.rsplit("}", 1)[-1]
        try:
            total += float(rest.split()[0])
        except (IndexError, ValueError):
            continue
    return total


def drain(url: str, min_s: float, max_s: float) -> float | None:
    """Waits until the gateway at ``url`` has no active session.

    Args:
        url: The gateway's Prometheus endpoint.
        min_s: Wait at least this long (endpoint removal takes a few seconds to propagate).
        max_s: Give up after this long; the pod then stops with whatever sessions remain.

    Returns:
        The last session count seen (``None`` when the endpoint never answered).
    """
    started = time.monotonic()
    sessions: float | None = None
    while True:
        elapsed = time.monotonic() - started
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                sessions = active_sessions(response.read().decode("utf-8", "replace"))
        except (urllib.error.URLError, OSError):
            sessions = None
        if elapsed >= min_s and (sessions is None or sessions <= 0):
            return sessions
        if elapsed >= max_s:
            return sessions
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    """Runs one probe; the exit status is the result.

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).

    Returns:
        0 on success, 1 otherwise.
    """
    parser = argparse.ArgumentParser(prog="voice-probe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    grpc_parser = sub.add_parser("grpc", help="gRPC health of a worker")
    grpc_parser.add_argument("--port", type=int, default=int(os.environ.get("GRPC_PORT") or 50051))
    grpc_parser.add_argument("--timeout", type=float, default=3.0)
    http_parser = sub.add_parser("http", help="an HTTP endpoint answers 2xx")
    http_parser.add_argument("url")
    http_parser.add_argument("--timeout", type=float, default=3.0)
    drain_parser = sub.add_parser("drain", help="wait until the gateway holds no session")
    port = os.environ.get("GATEWAY_PORT") or "8000"
    drain_parser.add_argument("--url", default=f"http://127.0.0.1:{port}/metrics/")
    drain_parser.add_argument("--min-seconds", type=float, default=5.0)
    drain_parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)

    if args.command == "grpc":
        return 0 if check_grpc(args.port, args.timeout) else 1
    if args.command == "http":
        return 0 if check_http(args.url, args.timeout) else 1
    left = drain(args.url, args.min_seconds, max(args.min_seconds, args.max_seconds))
    print(f"voice-probe drain: {left if left is not None else 'unknown'} session(s) left", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
