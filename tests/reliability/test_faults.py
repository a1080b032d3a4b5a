"""Faults a Kubernetes cluster produces every day, injected into the loopback cluster (``make cluster``)
with calls in flight: each test asserts the exact outcome (turns completed, call logs without lost or
repeated turns, nothing left on the bus) and leaves the cluster whole for the next one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import urllib.request
import uuid

import httpx
import pytest
import websockets

from tests.gateway.test_calls import bus_is_idle
from voice_channels.client import WebSocketService
from voice_gateway.agents import DEFAULT_FALLBACK_MESSAGE
from voicectl.cluster import LoopbackCluster
from voicectl.local import WorkerProcess

API_KEY = "test-key"
LONG_PROMPT = "Tell me a story about a lighthouse keeper and his cat, in five sentences."
CLOSE_SERVICE_RESTART = 1012
NATS_RESTART_TIMEOUT_S = 120.0

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(llama_server, tmp_path_factory):
    """Three NATS nodes, two gateways behind the balancer, two workers of each service."""
    with LoopbackCluster(
        llm_base_url=llama_server,
        env={"OTEL_TRACES_EXPORTER": "none", "GATEWAY_API_KEYS": API_KEY},
        state_dir=str(tmp_path_factory.mktemp("cluster")),
    ) as started:
        yield started


def metric(port: int, name: str, **labels: str) -> float:
    """One sample of a process's Prometheus metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0].split("{")[1].split(",") == wanted.split(","):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def busy_worker(cluster: LoopbackCluster, service: str, timeout_s: float = 60) -> WorkerProcess:
    """The worker of ``service`` that has a bus request in flight, as soon as one has."""
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        for worker in cluster.live_workers(service):
            if metric(worker.metrics_port, "voice_worker_in_flight", service=service, transport="bus") >= 1:
                return worker
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no {service} worker took the request within {timeout_s:.0f} s")


def replace(cluster: LoopbackCluster, worker: WorkerProcess) -> None:
    """Puts the cluster back to two live workers of the service after a test took one away."""
    worker.child.stop(timeout_s=5)
    cluster.workers[worker.service].remove(worker)
    cluster.add_worker(worker.service)


class Chat:
    """The authorized chat stream (seed 004) through the balancer."""

    def __init__(self, cluster: LoopbackCluster, conversation_id: str) -> None:
        self.url = cluster.ws_url + "/v1/chat/stream"
        self.conversation_id = conversation_id

    async def __aenter__(self) -> Chat:
        self.ws = await websockets.connect(self.url)
        await self.send(type="authorize", token=API_KEY)
        assert (await self.next())["type"] == "authorize_success"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    async def send(self, **message) -> None:
        await self.ws.send(json.dumps(message))

    async def next(self, timeout: float = 90) -> dict:
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
            if message.get("type") == "ping":
                await self.send(type="pong")
                continue
            return message

    async def ask(self, content: str, *, on_first_chunk=None) -> dict:
        """Sends one message; returns ``stream_end`` after checking the chunks add up to its content."""
        await self.send(type="chat_message", content=content, conversation_id=self.conversation_id)
        chunks: list[str] = []
        while True:
            event = await self.next()
            assert event["type"] != "error", event
            if event["type"] == "tts_ready_chunk":
                chunks.append(event["chunk"])
                if len(chunks) == 1 and on_first_chunk is not None:
                    await on_first_chunk()
            if event["type"] == "stream_end":
                assert event["interrupted"] is False
                assert " ".join(chunks).split() == event["content"].split(), (chunks, event["content"])
                return event


async def call_log(cluster: LoopbackCluster, call_log_id: str) -> dict:
    async with httpx.AsyncClient(base_url=cluster.url, headers={"X-API-Key": API_KEY}, timeout=10) as client:
        response = await client.get(f"/api/calls/{call_log_id}")
    assert response.status_code == 200, response.text
    return response.json()


def assert_turns(log: dict, users: list[str]) -> None:
    """The call log holds exactly these user turns, in order, each answered without an error."""
    turns = [turn for turn in log["turns"] if turn["kind"] != "greeting"]
    assert [turn["user"] for turn in turns] == users
    assert all(turn["assistant"].strip() and not turn["error"] for turn in turns), turns


async def test_kill_9_of_the_llm_worker_mid_answer_still_completes_the_turn(cluster):
    conversation = f"kill-{uuid.uuid4().hex[:8]}"
    killed: list[WorkerProcess] = []

    async def kill_the_busy_worker() -> None:
        worker = await busy_worker(cluster, "llm")
        worker.child.process.kill()
        killed.append(worker)

    async with Chat(cluster, conversation) as chat:
        end = await chat.ask(LONG_PROMPT, on_first_chunk=kill_the_busy_worker)
    assert killed and killed[0].child.process.wait(10) == -signal.SIGKILL
    assert len(end["content"].split()) > 10
    log = await call_log(cluster, conversation)
    assert_turns(log, [LONG_PROMPT])
    assert log["turns"][-1]["assistant"].split() == end["content"].split()
    assert await bus_is_idle(cluster.nats.url)
    replace(cluster, killed[0])


async def test_sigterm_of_a_worker_finishes_its_work_then_exits(cluster):
    conversation = f"term-{uuid.uuid4().hex[:8]}"
    stopped: list[WorkerProcess] = []

    async def stop_the_busy_worker() -> None:
        worker = await busy_worker(cluster, "llm")
        worker.child.signal(signal.SIGTERM)
        stopped.append(worker)

    async with Chat(cluster, conversation) as chat:
        end = await chat.ask(LONG_PROMPT, on_first_chunk=stop_the_busy_worker)
    worker = stopped[0]
    assert worker.child.wait(30) == 0, "a draining worker exits cleanly"
    log = await call_log(cluster, conversation)
    assert_turns(log, [LONG_PROMPT])
    assert log["turns"][-1]["assistant"].split() == end["content"].split()
    assert await bus_is_idle(cluster.nats.url)
    replace(cluster, worker)


async def test_a_stopped_nats_node_loses_no_turn(cluster):
    conversation = f"node-{uuid.uuid4().hex[:8]}"
    questions = [f"Question {n}: name a colour." for n in range(1, 5)]
    async with Chat(cluster, conversation) as chat:
        await chat.ask(questions[0])
        stop = asyncio.get_running_loop().run_in_executor(None, cluster.nats.stop_node, 0)
        for question in questions[1:3]:
            await chat.ask(question)
        await stop
        await chat.ask(questions[3])
    log = await call_log(cluster, conversation)
    assert_turns(log, questions)
    await asyncio.get_running_loop().run_in_executor(None, cluster.nats.start_node, 0)
    assert await bus_is_idle(cluster.nats.url)


class RetellCall:
    """Retell's side of one call through the balancer; reconnects as ``auto_reconnect`` asks."""

    def __init__(self, cluster: LoopbackCluster, call_id: str) -> None:
        self.url = f"{cluster.ws_url}/ws-default/{call_id}"
        self.call_id = call_id
        self.greetings = 0

    async def connect(self) -> None:
        """Connects, retrying refused handshakes for a while as Retell does (a draining gateway refuses
        them until the balancer takes it out of rotation)."""
        give_up = time.monotonic() + 10
        while True:
            try:
                self.ws = await websockets.connect(self.url)
                break
            except (OSError, websockets.InvalidHandshake):
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.2)
        config = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
        assert config["response_type"] == "config" and config["config"]["auto_reconnect"] is True
        await self.ws.send(json.dumps({"interaction_type": "call_details", "call": {"call_id": self.call_id}}))

    async def respond(self, response_id: int, transcript: list[dict]) -> str:
        await self.ws.send(
            json.dumps({"interaction_type": "response_required", "response_id": response_id, "transcript": transcript})
        )
        content = []
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), 90))
            if message.get("response_type") != "response":
                continue
            if message["response_id"] == 0:
                self.greetings += 1
                continue
            if message["response_id"] == response_id:
                content.append(message["content"])
                if message["content_complete"]:
                    return "".join(content)

    async def closed_code(self, timeout: float = 60) -> int:
        """Waits for the server to close the socket; returns the close code."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), timeout)
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else 1006


async def gateway_holding(cluster: LoopbackCluster, dialect: str):
    for gateway in cluster.gateways:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as client:
            if (await client.get("/readyz")).json()["by_dialect"].get(dialect):
                return gateway
    raise AssertionError(f"no gateway holds a {dialect} session")


async def test_sigterm_of_a_gateway_hands_its_sessions_to_the_other_one(cluster):
    call_id = f"call_{uuid.uuid4().hex[:12]}"
    user = ["What is the capital of France?", "And of Italy?"]
    events: list[dict] = []
    subscribers = [WebSocketService(cluster.ws_url + "/ws/channels", retry_delay=0.2, ping_interval=5) for _ in (1, 2)]
    for subscriber in subscribers:
        subscriber.on_message = lambda message: events.append(message.payload)
        await subscriber.connect()
        await subscriber.subscribe(call_id, token=API_KEY)

    retell = RetellCall(cluster, call_id)
    await retell.connect()
    first = await retell.respond(1, [{"role": "user", "content": user[0]}])
    assert first.strip() and retell.greetings == 1
    draining = await gateway_holding(cluster, "retell")
    draining.child.signal(signal.SIGTERM)
    assert await retell.closed_code() == CLOSE_SERVICE_RESTART
    assert draining.child.wait(30) is not None

    await retell.connect()
    transcript = [
        {"role": "user", "content": user[0]},
        {"role": "agent", "content": first},
        {"role": "user", "content": user[1]},
    ]
    second = await retell.respond(2, transcript)
    assert second.strip()
    assert retell.greetings == 1, "a resumed call is not greeted again"
    await retell.ws.close()

    log = await call_log(cluster, call_id)
    assert [turn["kind"] for turn in log["turns"]] == ["response", "response"]
    assert log["status"] == "completed"
    assert_turns(log, user)

    def answers() -> list[str]:
        return sorted(e["message"] for e in events if e.get("final_message") is True)

    expected = sorted([first, first, second, second])
    give_up = time.monotonic() + 10
    while answers() != expected and time.monotonic() < give_up:
        await asyncio.sleep(0.1)
    assert answers() == expected, "both channel clients follow the whole call, each answer once"
    assert sum(subscriber.reconnects for subscriber in subscribers) >= 1
    for subscriber in subscribers:
        await subscriber.close()

    assert await bus_is_idle(cluster.nats.url)
    cluster.gateways.remove(draining)
    cluster.add_gateway(draining.port)


class Forwarder:
    """A TCP forwarder to the LLM backend that the test can cut: the backend "goes down" for the workers
    behind it (new connections refused, open ones dropped) and comes back on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers |= {writer, upstream_writer}
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
            self._writers -= {writer, upstream_writer}

        self._server = await asyncio.start_server(accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()


async def test_the_llm_backend_down_gives_the_fallback_message_and_the_call_goes_on(cluster, llama_server):
    forwarder = Forwarder(int(llama_server.rsplit(":", 1)[1].split("/")[0]))
    await forwarder.up()
    loop = asyncio.get_running_loop()
    fragile = await loop.run_in_executor(
        None, lambda: cluster.add_worker("llm", env={"LLM_BASE_URL": f"http://127.0.0.1:{forwarder.port}/v1"})
    )
    healthy = [worker for worker in cluster.live_workers("llm") if worker is not fragile]
    for worker in healthy:
        worker.child.signal(signal.SIGTERM)
    for worker in healthy:
        assert await loop.run_in_executor(None, worker.child.wait, 60) == 0
        cluster.workers["llm"].remove(worker)

    conversation = f"down-{uuid.uuid4().hex[:8]}"
    questions = ["What time do you open?", "Are you there?", "What time do you close?"]
    async with Chat(cluster, conversation) as chat:
        await forwarder.down()
        first = await chat.ask(questions[0])
        second = await chat.ask(questions[1])
        await forwarder.up()
        third = await chat.ask(questions[2])
    assert first["content"] == second["content"] == DEFAULT_FALLBACK_MESSAGE
    assert third["content"].strip()
    log = await call_log(cluster, conversation)
    turns = log["turns"]
    assert [turn["user"] for turn in turns] == questions
    assert [turn["assistant"] for turn in turns[:2]] == [DEFAULT_FALLBACK_MESSAGE] * 2
    assert all(turn["error"] and turn.get("fallback") for turn in turns[:2])
    assert not turns[2]["error"] and not turns[2].get("fallback"), "the backend is back: a real answer"
    assert await bus_is_idle(cluster.nats.url)

    for _ in healthy:
        await loop.run_in_executor(None, cluster.add_worker, "llm")
    fragile.child.stop(timeout_s=30)
    cluster.workers["llm"].remove(fragile)
    await forwarder.down()


async def test_a_restarted_nats_recovers_without_a_manual_step(cluster):
    conversation = f"restart-{uuid.uuid4().hex[:8]}"
    async with Chat(cluster, conversation) as chat:
        await chat.ask("Say hello.")
    loop = asyncio.get_running_loop()
    for index in range(len(cluster.nats.nodes)):
        await loop.run_in_executor(None, cluster.nats.stop_node, index)
    # A whole cluster elects its JetStream meta leader again; on a busy 2-core machine that can pass 30 s.
    await loop.run_in_executor(None, cluster.nats.start, NATS_RESTART_TIMEOUT_S)

    give_up = time.monotonic() + 60
    while True:
        try:
            async with Chat(cluster, conversation) as chat:
                await chat.ask("Say goodbye.")
            break
        except (AssertionError, OSError, TimeoutError, websockets.WebSocketException):
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(1)
    log = await call_log(cluster, conversation)
    assert_turns(log, ["Say hello.", "Say goodbye."])
    assert await bus_is_idle(cluster.nats.url)
