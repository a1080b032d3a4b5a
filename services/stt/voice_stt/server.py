"""The gRPC front door of the STT worker: ``voice.v1.SpeechToText``."""

from __future__ import annotations

import grpc

from voice.v1 import stt_pb2, stt_pb2_grpc
from voice_runtime.grpc_bridge import stream_from_handler
from voice_stt.handler import TranscribeHandler

SERVICE_NAME = stt_pb2.DESCRIPTOR.services_by_name["SpeechToText"].full_name


class SpeechToTextServicer(stt_pb2_grpc.SpeechToTextServicer):
    """Serves Transcribe with the same handler the NATS worker runs."""

    def __init__(self, handler: TranscribeHandler) -> None:
        self._handler = handler

    async def Transcribe(self, request: stt_pb2.TranscribeRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        async for event in stream_from_handler(self._handler, request, context, "grpc.Transcribe", service="stt"):
            yield event


def add_to_server(server: grpc.aio.Server, handler: TranscribeHandler) -> None:
    """Registers the STT servicer on a gRPC server."""
    stt_pb2_grpc.add_SpeechToTextServicer_to_server(SpeechToTextServicer(handler), server)
