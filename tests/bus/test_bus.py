"""The work bus against a real nats-server: streaming, slots, deadlines, cancellation, errors, tracing."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry import trace

from voice.v1 import events_pb2, llm_pb2, tts_pb2
from voice_bus.catalog import HEADER_DEADLINE, HEADER_REPLY, HEADER_REQUEST_ID, SERVICES
from voice_bus.connection import MAX_DELIVER
from voice_bus.dead_letters import watch_dead_letters
from voice_bus.errors import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    UNAVAILABLE,
    BusError,
)
from voice_bus.worker import Worker
from voice_telemetry.tracing import setup_tracing


def request(text: str = "hi") -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(messages=[llm_pb2.ChatMessage(role="user", content=text)])


def delta(text: str) -> llm_pb2.GenerateEvent:
    return llm_pb2.GenerateEvent(delta=llm_pb2.TokenDelta(text=text))


def completion(text: str) -> llm_pb2.GenerateEvent:
    return llm_pb2.GenerateEvent(completion=llm_pb2.Completion(text=text, finish_reason="stop"))


async def echo(req, ctx):
    words = req.messages[-1].content.split()
    for word in words:
        yield delta(word)
    yield completion(" ".join(words))


async def test_streams_events_in_order_until_final(bus, running_worker):
    async with running_worker("llm", echo):
        events = [e async for e in bus.stream("llm", request("one two three"), timeout=10)]
    assert [e.delta.text for e in events[:-1]] == ["one", "two", "three"]
    assert events[-1].completion.text == "one two three"


async def test_no_worker_fails_fast_with_unavailable(bus):
    started = time.monotonic()
    with pytest.raises(BusError) as err:
        await bus.collect("tts", tts_pb2.SynthesizeRequest(text="hello"), timeout=30)
    assert err.value.code == UNAVAILABLE
    assert "no tts worker" in err.value.message
    assert time.monotonic() - started < 2


async def test_one_slot_never_holds_more_than_one_unacked_message(bus, nc, running_worker):
    active = 0
    peak = 0

    async def slow(req, ctx):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.4)
        active -= 1
        yield completion(req.messages[-1].content)

    js = nc.jetstream()
    samples = []
    async with running_worker("llm", slow, concurrency=1) as worker:
        runs = [asyncio.create_task(bus.collect("llm", request(str(i)), timeout=20)) for i in range(3)]
        while not all(r.done() for r in runs):
            info = await js.consumer_info("VOICE_LLM", "llm")
            samples.append(info.num_ack_pending)
            await asyncio.sleep(0.05)
        results = [r.result()[-1].completion.text for r in runs]
    assert sorted(results) == ["0", "1", "2"]
    assert peak == 1
    assert worker.max_unacked_seen == 1
    assert max(samples) <= 1


async def test_expired_deadline_is_answered_without_running(nc, running_worker):
    ran = []

    async def handler(req, ctx):
        ran.append(req.request_id)
        yield completion("ran")

    inbox = nc.new_inbox()
    replies = await nc.subscribe(inbox)
    async with running_worker("llm", handler):
        headers = {
            HEADER_REPLY: inbox,
            HEADER_REQUEST_ID: "expired-1",
            HEADER_DEADLINE: str(int(time.time() * 1000) - 1000),
        }
        await nc.jetstream().publish(SERVICES["llm"].subject, request().SerializeToString(), headers=headers)
        reply = events_pb2.Reply.FromString((await replies.next_msg(timeout=5)).data)
    assert reply.final and reply.error.code == DEADLINE_EXCEEDED
    assert ran == []


async def test_queued_past_its_deadline_never_runs(bus, running_worker):
    ran = []

    async def handler(req, ctx):
        ran.append(req.messages[-1].content)
        await asyncio.sleep(1.0)
        yield completion("done")

    async with running_worker("llm", handler, concurrency=1):
        first = asyncio.create_task(bus.collect("llm", request("first"), timeout=10))
        await asyncio.sleep(0.1)
        with pytest.raises(BusError) as err:
            await bus.collect("llm", request("second"), timeout=0.3)
        assert err.value.code == DEADLINE_EXCEEDED
        await first
        await asyncio.sleep(0.3)
    assert ran == ["first"]


async def test_cancelling_mid_stream_stops_the_handler_and_frees_the_slot(bus, running_worker):
    stopped = asyncio.Event()

    async def endless(req, ctx):
        try:
            for i in range(10_000):
                yield delta(str(i))
                await asyncio.sleep(0.02)
        finally:
            stopped.set()

    async with running_worker("llm", endless) as worker:
        received = 0
        async for _event in bus.stream("llm", request(), timeout=30):
            received += 1
            if received == 3:
                break
        cancel_sent = time.monotonic()
        await asyncio.wait_for(stopped.wait(), 1.0)
        stop_latency = time.monotonic() - cancel_sent
        while worker.in_flight:
            await asyncio.sleep(0.01)
        freed_latency = time.monotonic() - cancel_sent
    assert stop_latency < 0.3
    assert freed_latency < 0.3


async def test_a_cancelled_consumer_always_ends_cancelled(bus, running_worker):
    """Cancelling the task that reads a busy stream must end it: the cancellation may land while a
    reply is arriving or while the abandoned request is being cleaned up, and is never swallowed."""

    async def flood(req, ctx):
        for i in range(100_000):
            yield delta(str(i))
            if i % 50 == 0:
                await asyncio.sleep(0)
        yield completion("flood")

    async def consume() -> None:
        async for _event in bus.stream("llm", request(), timeout=30):
            pass

    async with running_worker("llm", flood, concurrency=4):
        for delay in (0.0, 0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2):
            task = asyncio.create_task(consume())
            await asyncio.sleep(0.3 + delay)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=5)
            assert task in done, f"the consumer cancelled after {delay}s kept running"
            assert task.cancelled()


async def test_handler_errors_carry_codes_and_the_worker_keeps_serving(bus, running_worker):
    async def handler(req, ctx):
        text = req.messages[-1].content
        if text == "bad":
            raise ValueError("text must not be 'bad'")
        if text == "boom":
            raise RuntimeError("engine exploded")
        if text == "silent":
            return
        yield completion(text)

    async with running_worker("llm", handler):
        for text, code in [("bad", INVALID_ARGUMENT), ("boom", INTERNAL), ("silent", INTERNAL)]:
            with pytest.raises(BusError) as err:
                await bus.collect("llm", request(text), timeout=10)
            assert err.value.code == code
        assert (await bus.collect("llm", request("fine"), timeout=10))[-1].completion.text == "fine"


async def test_garbage_payload_is_invalid_argument(nc, running_worker):
    inbox = nc.new_inbox()
    replies = await nc.subscribe(inbox)
    async with running_worker("llm", echo):
        await nc.jetstream().publish(
            SERVICES["llm"].subject, b"\xff\xfe not a protobuf", headers={HEADER_REPLY: inbox, HEADER_REQUEST_ID: "g"}
        )
        reply = events_pb2.Reply.FromString((await replies.next_msg(timeout=5)).data)
    assert reply.error.code == INVALID_ARGUMENT


async def test_work_whose_every_delivery_is_lost_is_answered_unavailable_and_removed(bus, nc):
    spec = SERVICES["llm"]
    js = nc.jetstream()

    async def present(msg):
        await msg.respond(b'{"worker":"loser","slots":1,"in_flight":0}')

    subscriptions = [
        await nc.subscribe(spec.presence_subject, cb=present),
        await watch_dead_letters(nc, spec),
        await js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream),
    ]

    async def lose_every_delivery():
        for _ in range(MAX_DELIVER):
            (msg,) = await subscriptions[-1].fetch(1, timeout=10)
            await msg.nak()
        # NATS gives up on the message when a worker asks for work once more.
        with pytest.raises(NatsTimeoutError):
            await subscriptions[-1].fetch(1, timeout=1)

    loser = asyncio.create_task(lose_every_delivery())
    try:
        with pytest.raises(BusError) as err:
            await bus.collect("llm", request("anyone there?"), timeout=20)
        await loser
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()
    assert err.value.code == UNAVAILABLE
    assert f"{MAX_DELIVER} deliveries" in err.value.message
    assert (await js.stream_info(spec.stream)).state.messages == 0


async def test_a_request_a_stopping_worker_cuts_off_goes_on_at_another_worker(bus, nc, running_worker):
    async def stalls(req, ctx):
        yield delta("first")
        await asyncio.sleep(60)
        yield completion("never")

    stopping = Worker(nc, "llm", stalls, name="test-stopping")
    await stopping.start()
    answer = asyncio.create_task(bus.collect("llm", request("one two"), timeout=30))
    async with asyncio.timeout(10):
        while not stopping.in_flight:
            await asyncio.sleep(0.05)
    async with running_worker("llm", echo):
        await asyncio.wait_for(stopping.stop(grace_s=0.5), 10)
        events = await asyncio.wait_for(answer, 20)
    assert events[0].delta.text == "first"
    assert events[-1].completion.text == "one two"


class _DeafLagWorker(Worker):
    """A worker whose consumer check ignores cancellation, as Python 3.11's ``wait_for`` does when a NATS
    answer arrives together with the cancellation."""

    async def _record_lag(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(1.0)


async def test_a_worker_stops_even_when_its_consumer_check_loses_the_cancellation(nc):
    worker = _DeafLagWorker(nc, "llm", echo, name="test-deaf-lag")
    await worker.start()
    await asyncio.sleep(0.2)
    stopping = asyncio.ensure_future(worker.stop(grace_s=1))
    done, _ = await asyncio.wait({stopping}, timeout=10)
    assert stopping in done, "the worker never stopped"


async def test_cancel_before_start_is_answered_cancelled(bus, nc, running_worker):
    ran = []

    async def handler(req, ctx):
        ran.append(req.messages[-1].content)
        await asyncio.sleep(0.5)
        yield completion("x")

    async with running_worker("llm", handler, concurrency=1):
        first = asyncio.create_task(bus.collect("llm", request("first"), timeout=10))
        await asyncio.sleep(0.1)
        second = request("second")
        second.request_id = uuid.uuid4().hex
        queued = asyncio.create_task(bus.collect("llm", second, timeout=10))
        await asyncio.sleep(0.1)
        await bus.cancel(second.request_id)
        with pytest.raises(BusError) as err:
            await queued
        assert err.value.code == CANCELLED
        await first
    assert ran == ["first"]


async def test_trace_context_crosses_the_bus(bus, running_worker):
    setup_tracing("bus-test")
    seen = {}

    async def handler(req, ctx):
        seen["trace_id"] = trace.get_current_span().get_span_context().trace_id
        yield completion("traced")

    tracer = trace.get_tracer("test")
    async with running_worker("llm", handler):
        with tracer.start_as_current_span("caller") as span:
            await bus.collect("llm", request(), timeout=10)
            caller_trace = span.get_span_context().trace_id
    assert seen["trace_id"] == caller_trace != 0
