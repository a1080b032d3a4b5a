"""The gRPC front door of the LLM worker: ``voice.v1.LanguageModel``."""

from __future__ import annotations

import grpc

from voice.v1 import llm_pb2, llm_pb2_grpc
from voice_llm.handler import GenerateHandler
from voice_runtime.grpc_bridge import stream_from_handler

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LanguageModel"].full_name


class LanguageModelServicer(llm_pb2_grpc.LanguageModelServicer):
    """Serves Generate with the same handler the NATS worker runs."""

    def __init__(self, handler: GenerateHandler) -> None:
        self._handler = handler

    async def Generate(self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        async for event in stream_from_handler(self._handler, request, context, "grpc.Generate", service="llm"):
            yield event


def add_to_server(server: grpc.aio.Server, handler: GenerateHandler) -> None:
    """Registers the LLM servicer on a gRPC server."""
    llm_pb2_grpc.add_LanguageModelServicer_to_server(LanguageModelServicer(handler), server)
