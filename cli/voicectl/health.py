"""Waiting on a worker's standard gRPC health check."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout_s: float = 2.0) -> str:
    """The health status name (``SERVING``, ``NOT_SERVING``, ...) of ``service`` at ``target``."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_serving(target: str, timeout_s: float, service: str = "", alive=lambda: True) -> None:
    """Waits until ``target`` reports SERVING; raises TimeoutError (or RuntimeError if ``alive`` fails)."""
    give_up = time.monotonic() + timeout_s
    last = "unreachable"
    while time.monotonic() < give_up:
        if not alive():
            raise RuntimeError(f"{target} exited before SERVING (last status {last})")
        try:
            last = check(target, service)
            if last == "SERVING":
                return
        except grpc.RpcError as exc:
            last = exc.code().name
        time.sleep(0.1)
    raise TimeoutError(f"{target} not SERVING after {timeout_s:.0f}s (last status {last})")
