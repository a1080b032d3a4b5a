"""The gRPC front door of the TTS worker: ``voice.v1.TextToSpeech``."""

from __future__ import annotations

import grpc

from voice.v1 import tts_pb2, tts_pb2_grpc
from voice_runtime.grpc_bridge import stream_from_handler
from voice_tts.handler import SynthesizeHandler

SERVICE_NAME = tts_pb2.DESCRIPTOR.services_by_name["TextToSpeech"].full_name


class TextToSpeechServicer(tts_pb2_grpc.TextToSpeechServicer):
    """Serves Synthesize with the same handler the NATS worker runs, and ListVoices."""

    def __init__(self, handler: SynthesizeHandler) -> None:
        self._handler = handler

    async def Synthesize(self, request: tts_pb2.SynthesizeRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        async for event in stream_from_handler(self._handler, request, context, "grpc.Synthesize", service="tts"):
            yield event

    async def ListVoices(self, request: tts_pb2.ListVoicesRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        return tts_pb2.ListVoicesResponse(voices=self._handler.voices())


def add_to_server(server: grpc.aio.Server, handler: SynthesizeHandler) -> None:
    """Registers the TTS servicer on a gRPC server."""
    tts_pb2_grpc.add_TextToSpeechServicer_to_server(TextToSpeechServicer(handler), server)
