"""Errors that travel on the bus: one exception type carrying a ``voice.v1.ErrorCode``."""

from __future__ import annotations

from voice.v1 import events_pb2

ErrorCode = events_pb2.ErrorCode

_NAMES = {
    events_pb2.ERROR_CODE_INVALID_ARGUMENT: "INVALID_ARGUMENT",
    events_pb2.ERROR_CODE_DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    events_pb2.ERROR_CODE_UNAVAILABLE: "UNAVAILABLE",
    events_pb2.ERROR_CODE_CANCELLED: "CANCELLED",
    events_pb2.ERROR_CODE_INTERNAL: "INTERNAL",
}

INVALID_ARGUMENT = events_pb2.ERROR_CODE_INVALID_ARGUMENT
DEADLINE_EXCEEDED = events_pb2.ERROR_CODE_DEADLINE_EXCEEDED
UNAVAILABLE = events_pb2.ERROR_CODE_UNAVAILABLE
CANCELLED = events_pb2.ERROR_CODE_CANCELLED
INTERNAL = events_pb2.ERROR_CODE_INTERNAL


class BusError(Exception):
    """A request failed with a code a client can act on.

    Attributes:
        code: A ``voice.v1.ErrorCode`` value.
        message: Human-readable reason.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code_name(code)}: {message}")
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return code_name(self.code)

    def to_proto(self) -> events_pb2.Error:
        return events_pb2.Error(code=self.code, message=self.message)

    @classmethod
    def from_proto(cls, error: events_pb2.Error) -> BusError:
        return cls(error.code or INTERNAL, error.message)


def code_name(code: int) -> str:
    """``INVALID_ARGUMENT`` style name of an error code (also the gRPC status name)."""
    return _NAMES.get(code, "INTERNAL")
