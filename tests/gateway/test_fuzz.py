"""Bad input for every dialect, generated with Hypothesis.

In process, the pure parsers and each dialect's message handling (on a fake socket) get arbitrary and
adversarial input: nothing may raise, every message gets its answer, what the gateway sends is strict
JSON (finite numbers, 64-bit integers, valid Unicode), and no log message carries a raw control
character. Then a bounded run against a real gateway process (no workers behind it): every dialect's
socket gets a few dozen sequences of bad and half-valid messages, must answer each as its protocol
says, must still answer a valid message afterwards, must leave the log of a call it did not create
exactly as it was (its id is among the ids the fuzzer tries), and the gateway's log must stay free of
tracebacks and forged lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import urllib.parse
from types import SimpleNamespace

import pytest
import websockets
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.websockets import WebSocketState

from tests.support.gateway import api_client
from voice_gateway.agents import Agent
from voice_gateway.api.auth import Authenticator, _b64, sign_token
from voice_gateway.api.limits import MAX_CLOSE_REASON_BYTES, Limits, LimitSettings
from voice_gateway.api.messages import InvalidJson, parse_json
from voice_gateway.config import DEFAULT_AGENT_FILE
from voice_gateway.dialects import browser, carrier, channels, chat, exotel, plivo, retell, telnyx, twilio, vonage
from voice_telemetry.logs import OneLineFormatter

KEY = "fuzz-key"
# A call log the fuzzing connections did not create: carriers and Retell try its id.
VICTIM = "victim-call-log"
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
SECRET = "fuzz-secret"
IN_PROCESS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
END_TO_END = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------------------------

NASTY_TEXT = [
    "",
    " ",
    "\n",
    "default\n",
    "a.b",
    "x*",
    "x>",
    "é",
    "٣",
    "²",
    "\ud800",
    "\x00",
    "a" * 300,
    "😀" * 70,
    "{{name}}",
    "default",
    "voice.calls.x",
    VICTIM,
    "MZ\nFORGED line",
]
nasty_text = st.sampled_from(NASTY_TEXT) | st.text(max_size=12)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | nasty_text
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(nasty_text, children, max_size=4),
    max_leaves=12,
)
NASTY_FRAMES = [
    "",
    "{",
    "[]",
    "null",
    "42",
    '"text"',
    "[" * 5000,
    '{"a":' * 5000,
    "1" * 5000,
    '{"x": NaN}',
    '{"x": Infinity}',
    '{"type": -Infinity}',
    '{"\\ud800": "\\udfff"}',
    "\x00\x01",
]
nasty_frames = st.sampled_from(NASTY_FRAMES) | st.text(max_size=40)


def shaped(keys: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict]:
    """Dicts with some of a dialect's keys (valid-looking or not) and some noise."""
    return st.fixed_dictionaries({}, optional=keys).flatmap(
        lambda known: st.dictionaries(nasty_text, json_values, max_size=2).map(lambda noise: {**noise, **known})
    )


def frames_of(messages: st.SearchStrategy[dict]) -> st.SearchStrategy[str]:
    return messages.map(json.dumps) | nasty_frames


utterances = shaped(
    {
        "role": st.sampled_from(["user", "agent", "system", "tool_call_invocation", "tool_call_result"]) | json_values,
        "content": nasty_text | json_values,
        "tool_call_id": st.sampled_from(["t1", "t2", ""]) | json_values,
        "name": nasty_text,
        "arguments": nasty_text | json_values,
    }
)
transcripts = st.lists(utterances | json_values, max_size=8) | json_values
browser_messages = shaped(
    {
        "type": st.sampled_from(["init", "audio", "text", "end", "dance"]) | json_values,
        "data": shaped(
            {
                "agentId": nasty_text | json_values,
                "callLogId": nasty_text | json_values,
                "audio": st.sampled_from(["", "%%%", "AAAA", "UklGRg==", "é"]) | nasty_text | json_values,
                "text": nasty_text | json_values,
            }
        ),
    }
)
carrier_messages = shaped(
    {
        "event": st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop", "dance"]) | json_values,
        "streamSid": nasty_text | json_values,
        "stream_sid": nasty_text | json_values,
        "start": shaped(
            {
                "streamSid": nasty_text,
                "callSid": nasty_text | json_values,
                "call_sid": nasty_text | json_values,
                "customParameters": shaped({"agent_id": nasty_text | json_values}) | json_values,
                "custom_parameters": shaped({"agent_id": nasty_text | json_values}) | json_values,
                "mediaFormat": shaped({"encoding": nasty_text}) | json_values,
            }
        )
        | json_values,
        "media": shaped(
            {
                "payload": st.sampled_from(["", "%%%", "AAAA", "AAA", "/w==", "é"]) | nasty_text | json_values,
                "track": st.sampled_from(["inbound", "outbound"]) | json_values,
            }
        )
        | json_values,
        "mark": shaped({"name": json_values}) | json_values,
        "dtmf": shaped({"digit": json_values}) | json_values,
    }
)
plivo_messages = shaped(
    {
        "event": st.sampled_from(["start", "media", "dtmf", "playedStream", "clearedAudio", "stop", "mark", "dance"])
        | json_values,
        "sequenceNumber": st.integers() | json_values,
        "streamId": nasty_text | json_values,
        "name": nasty_text | json_values,
        "extra_headers": st.sampled_from(["agent_id=default", "a=1,b", '{"agent_id": 1}', "=,="]) | json_values,
        "start": shaped(
            {
                "streamId": nasty_text | json_values,
                "callId": nasty_text | json_values,
                "extra_headers": nasty_text | json_values,
                "mediaFormat": shaped(
                    {
                        "encoding": st.sampled_from(["audio/x-mulaw", "audio/x-l16", "AUDIO/X-L16 "]) | json_values,
                        "sampleRate": st.sampled_from([8000, 16000, "16000", 8000.0, 24000, True]) | json_values,
                    }
                )
                | json_values,
            }
        )
        | json_values,
        "media": shaped(
            {
                "payload": st.sampled_from(["", "%%%", "AAAA", "AAA", "/w==", "é"]) | nasty_text | json_values,
                "track": st.sampled_from(["inbound", "outbound"]) | json_values,
                "chunk": st.integers() | json_values,
            }
        )
        | json_values,
        "dtmf": shaped({"digit": json_values}) | json_values,
    }
)
telnyx_messages = shaped(
    {
        "event": st.sampled_from(["connected", "start", "media", "mark", "dtmf", "error", "stop", "dance"])
        | json_values,
        "sequence_number": st.sampled_from(["1", "2", "3", "0", "-1", "99999999999999999999"])
        | st.integers()
        | json_values,
        "stream_id": nasty_text | json_values,
        "start": shaped(
            {
                "call_control_id": nasty_text | json_values,
                "custom_parameters": shaped({"agent_id": nasty_text | json_values})
                | st.lists(shaped({"name": nasty_text | json_values, "value": json_values}), max_size=3)
                | json_values,
                "media_format": shaped(
                    {
                        "encoding": st.sampled_from(["PCMU", "PCMA", "L16", "G722", "pcmu"]) | json_values,
                        "sample_rate": st.sampled_from([8000, "8000", 16000, 8000.0, True]) | json_values,
                        "channels": st.sampled_from([1, "1", 2]) | json_values,
                    }
                )
                | json_values,
            }
        )
        | json_values,
        "media": shaped(
            {
                "payload": st.sampled_from(["", "%%%", "AAAA", "AAA", "/w==", "é"]) | nasty_text | json_values,
                "track": st.sampled_from(["inbound", "outbound"]) | json_values,
                "chunk": nasty_text | json_values,
            }
        )
        | json_values,
        "payload": shaped({"code": json_values, "title": nasty_text | json_values}) | json_values,
        "mark": shaped({"name": json_values}) | json_values,
        "dtmf": shaped({"digit": json_values}) | json_values,
    }
)
vonage_messages = shaped(
    {
        "event": st.sampled_from(
            ["websocket:connected", "websocket:dtmf", "websocket:notify", "websocket:cleared", "start", "dance"]
        )
        | json_values,
        "content-type": st.sampled_from(["audio/l16;rate=16000", "audio/l16;rate=8000", "audio/L16; rate=8000"])
        | json_values,
        "uuid": nasty_text | json_values,
        "agent_id": nasty_text | json_values,
        "digit": nasty_text | json_values,
        "dtmf": shaped({"digit": json_values}) | json_values,
        "payload": shaped({"mark": json_values}) | json_values,
    }
)
# Vonage's audio: binary frames of any size (odd ones included) among its text events.
vonage_frames = st.one_of(
    frames_of(vonage_messages).map(lambda text: {"type": "websocket.receive", "text": text}),
    st.binary(max_size=700).map(lambda data: {"type": "websocket.receive", "bytes": data}),
)
retell_messages = shaped(
    {
        "interaction_type": st.sampled_from(
            ["ping_pong", "call_details", "update_only", "response_required", "reminder_required", "dance"]
        )
        | json_values,
        "timestamp": json_values,
        "response_id": st.integers(min_value=-2, max_value=5) | json_values,
        "transcript": transcripts,
        "transcript_with_tool_calls": transcripts,
        "call": shaped({"metadata": json_values, "retell_llm_dynamic_variables": json_values}) | json_values,
    }
)
chat_messages = shaped(
    {
        "type": st.sampled_from(["authorize", "chat_message", "interrupt_stream", "pong", "dance"]) | json_values,
        "token": st.sampled_from([KEY, "wrong", "", "a.b", sign_token(SECRET, "fuzz", ttl_s=600)]) | json_values,
        "content": nasty_text | json_values,
        "conversation_id": nasty_text | json_values,
        "agent_id": nasty_text | json_values,
        "audio": json_values,
    }
)
channel_messages = shaped(
    {
        "channel": st.sampled_from(["subscription", "error", "a", "b", "bad name", "a\n", ""]) | json_values,
        "payload": shaped(
            {
                "action": st.sampled_from(["subscribe", "unsubscribe", "dance"]) | json_values,
                "channel": st.sampled_from(["a", "b", "subscription", "error", "a\n", "x" * 200]) | json_values,
            }
        )
        | json_values,
    }
)


class _MessageLines(logging.Handler):
    """Keeps each record's message as the services' formatter writes it (tracebacks aside)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(OneLineFormatter("%(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.message = record.getMessage()
        self.lines.append(self.formatter.formatMessage(record))


@contextlib.contextmanager
def one_line_logs():
    """Asserts that no log message written inside the block holds a raw control character."""
    handler, root = _MessageLines(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    forged = [line for line in handler.lines if CONTROL.search(line)]
    assert not forged, forged


# -- fakes for the in-process runs --------------------------------------------------------------------------


class FakeWebSocket:
    """What the dialects use of a Starlette WebSocket; checks what a real connection would refuse."""

    def __init__(self, frames=(), query: dict | None = None) -> None:
        self.frames = list(frames)
        self.sent: list = []
        self.closed: tuple[int, str] | None = None
        self.application_state = WebSocketState.CONNECTED
        self.client_state = WebSocketState.CONNECTED
        self.query_params = query or {}

    async def accept(self) -> None:
        return None

    async def receive(self) -> dict:
        if self.frames:
            return self.frames.pop(0)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send_text(self, text: str) -> None:
        assert self.application_state == WebSocketState.CONNECTED
        text.encode()  # no lone surrogates: they cannot go on the wire
        self.sent.append(parse_json(text))  # strict JSON only: no NaN, no Infinity

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if len(reason.encode()) > MAX_CLOSE_REASON_BYTES:
            raise AssertionError(f"close reason of {len(reason.encode())} bytes cannot be sent")
        self.closed = (code, reason)
        self.application_state = WebSocketState.DISCONNECTED


class NoAgents:
    async def get(self, agent_id: str):
        return None


class NoCalls:
    async def get(self, call_log_id: str):
        return None

    async def save(self, log) -> None:
        return None


class RecordingNats:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        assert "\n" not in subject and " " not in subject, subject
        self.published.append((subject, data))

    async def subscribe(self, subject: str, cb):
        assert "\n" not in subject and " " not in subject, subject
        return SimpleNamespace(unsubscribe=_nothing)

    async def flush(self) -> None:
        return None


async def _nothing() -> None:
    return None


class StubSession:
    """A browser session that records the turns it is given."""

    def __init__(self) -> None:
        self.agent = Agent.model_validate_json(DEFAULT_AGENT_FILE.read_text())
        self.id = "stub-session"
        self.turns: list[str] = []

    def submit(self, turn) -> None:
        assert (isinstance(turn.audio, bytes) and turn.audio) or (isinstance(turn.text, str) and turn.text.strip())
        self.turns.append(turn.kind)

    async def close(self, status: str = "completed") -> None:
        return None


def context() -> SimpleNamespace:
    return SimpleNamespace(agents=NoAgents(), calls=NoCalls(), registry=None, engine=None, bus=None, observers=[])


def guard(websocket, dialect: str):
    return Limits(LimitSettings()).admit(websocket, dialect)


def run(coroutine):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def text_frame(text: str) -> dict:
    return {"type": "websocket.receive", "text": text}


# -- in process ---------------------------------------------------------------------------------------------


@IN_PROCESS
@given(nasty_frames | json_values.map(json.dumps))
@example("[" * 100_000)
@example("9" * 10_000)
@example('{"a": NaN}')
@example('{"\\ud800": ["\\udfff"]}')
def test_parse_json_raises_nothing_but_invalid_json(text):
    try:
        value = parse_json(text)
    except InvalidJson as error:
        assert str(error)
    else:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()  # strict JSON, valid Unicode


@IN_PROCESS
@given(transcripts)
def test_retell_history_is_always_a_well_formed_chat(transcript):
    messages = retell.history_from_transcript(transcript)
    calls: set[str] = set()
    for message in messages:
        assert message["role"] in ("user", "assistant", "tool")
        assert isinstance(message["content"], str)
        for call in message.get("tool_calls", ()):
            assert all(isinstance(call[key], str) and call[key] for key in ("id", "name"))
            calls.add(call["id"])
        if message["role"] == "tool":
            assert message["tool_call_id"] in calls
    answered = {m["tool_call_id"] for m in messages if m["role"] == "tool"}
    assert calls <= answered


@IN_PROCESS
@given(carrier_messages, st.dictionaries(nasty_text, nasty_text, max_size=3))
def test_carrier_start_events_always_parse(message, query):
    for start in (
        twilio.parse_start(message, lambda kind: None),
        exotel.parse_start(message, lambda kind: None, query),
    ):
        assert isinstance(start.stream_sid, str) and isinstance(start.agent_id, str) and start.agent_id
        assert isinstance(start.call_sid, str) and isinstance(start.variables, dict)


@IN_PROCESS
@given(json_values | st.sampled_from(["AAAA", "AAA", "/w==", "A" * 100_000]))
def test_media_payloads_decode_or_are_counted(payload):
    bad: list[str] = []
    audio = carrier.decode_payload(payload, bad.append)
    assert (audio is None) == bool(bad) and (audio is None or isinstance(audio, bytes))


@IN_PROCESS
@given(json_values, json_values)
@example("\ud800", None)
@example("é.é", None)
@example(None, {"sub": "x", "exp": "tomorrow"})
@example(None, {"sub": ["x"], "exp": 1e308})
@example(None, {"exp": float("inf")})
def test_authenticator_never_raises(token, claims):
    auth = Authenticator((KEY,), SECRET)
    for candidate in (token, _signed(claims)):
        for check in (auth.check, auth.check_api_key):
            ok, detail = check(candidate)
            assert isinstance(ok, bool) and isinstance(detail, str) and detail


def _signed(claims) -> str:
    import hashlib
    import hmac

    try:
        body = _b64(json.dumps(claims).encode())
    except ValueError:
        body = _b64(b"{}")
    return body + "." + _b64(hmac.new(SECRET.encode(), body.encode(), hashlib.sha256).digest())


@IN_PROCESS
@given(st.lists(frames_of(carrier_messages), max_size=8), st.sampled_from(["twilio", "exotel"]))
def test_carrier_streams_count_bad_frames_and_never_raise(frames, dialect):
    websocket = FakeWebSocket([text_frame(f) for f in frames] + [{"type": "websocket.receive", "bytes": b"\x00"}])
    serve = twilio.serve_twilio if dialect == "twilio" else exotel.serve_exotel
    with one_line_logs():
        run(serve(websocket, context(), Limits(LimitSettings())))
    assert websocket.closed is not None and websocket.closed[0] in (1000, 1008)


@IN_PROCESS
@given(plivo_messages, st.dictionaries(nasty_text, nasty_text, max_size=3))
def test_plivo_start_events_always_parse(message, query):
    start = plivo.parse_start(message, lambda kind: None, query)
    assert isinstance(start.stream_sid, str) and isinstance(start.agent_id, str) and start.agent_id
    assert isinstance(start.call_sid, str) and isinstance(start.variables, dict)
    assert (start.media is None) == bool(start.refusal)


@IN_PROCESS
@given(st.lists(frames_of(plivo_messages), max_size=8))
def test_plivo_streams_count_bad_frames_and_never_raise(frames):
    websocket = FakeWebSocket([text_frame(f) for f in frames] + [{"type": "websocket.receive", "bytes": b"\x00"}])
    with one_line_logs():
        run(plivo.serve_plivo(websocket, context(), Limits(LimitSettings())))
    # 1000 when the socket closes; 1008 when a start named an agent that does not exist.
    assert websocket.closed is not None and websocket.closed[0] in (1000, 1008)


@IN_PROCESS
@given(telnyx_messages, st.dictionaries(nasty_text, nasty_text, max_size=3))
def test_telnyx_start_events_always_parse(message, query):
    start = telnyx.parse_start(message, lambda kind: None, query)
    assert isinstance(start.stream_sid, str) and isinstance(start.agent_id, str) and start.agent_id
    assert isinstance(start.call_sid, str) and isinstance(start.variables, dict)
    assert (start.media is None) == bool(start.refusal)


@IN_PROCESS
@given(st.lists(frames_of(telnyx_messages), max_size=8))
def test_telnyx_streams_count_bad_frames_and_never_raise(frames):
    websocket = FakeWebSocket([text_frame(f) for f in frames] + [{"type": "websocket.receive", "bytes": b"\x00"}])
    with one_line_logs():
        run(telnyx.serve_telnyx(websocket, context(), Limits(LimitSettings())))
    # 1000 when the socket closes or after stop; 1008 when a start named an agent that does not exist.
    assert websocket.closed is not None and websocket.closed[0] in (1000, 1008)


@IN_PROCESS
@given(vonage_messages, st.dictionaries(nasty_text, nasty_text, max_size=3))
def test_vonage_connected_events_always_parse(message, query):
    start = vonage.parse_connected(message, lambda kind: None, query)
    assert isinstance(start.stream_sid, str) and isinstance(start.agent_id, str) and start.agent_id
    assert isinstance(start.call_sid, str) and isinstance(start.variables, dict)
    assert (start.media is None) == bool(start.refusal)


@IN_PROCESS
@given(st.lists(vonage_frames, max_size=8))
def test_vonage_streams_count_bad_frames_and_never_raise(frames):
    websocket = FakeWebSocket(frames)
    with one_line_logs():
        run(vonage.serve_vonage(websocket, context(), Limits(LimitSettings())))
    # 1000 when the socket closes; 1008 when the headers named an agent that does not exist.
    assert websocket.closed is not None and websocket.closed[0] in (1000, 1008)


@IN_PROCESS
@given(st.lists(frames_of(browser_messages), min_size=1, max_size=6), st.booleans())
def test_every_browser_message_gets_an_answer(frames, initialised):
    async def scenario() -> None:
        websocket = FakeWebSocket()
        connection = browser.BrowserConnection(websocket, context(), guard(websocket, "browser"), max_utterance_s=60)
        session = StubSession()
        if initialised:
            connection._session = session
        for text in frames:
            before = len(websocket.sent), len(session.turns)
            await connection.handle_frame(text_frame(text))
            assert (len(websocket.sent), len(session.turns)) != before, f"no answer to {text[:80]!r}"
        for event in websocket.sent:
            assert event["type"] in ("error", "session_ended"), event

    with one_line_logs():
        run(scenario())


@IN_PROCESS
@given(st.lists(frames_of(chat_messages), min_size=1, max_size=6))
def test_every_chat_message_gets_an_answer(frames):
    async def scenario() -> None:
        websocket = FakeWebSocket()
        connection = chat.ChatConnection(
            websocket,
            context(),
            Authenticator((KEY,), SECRET),
            guard(websocket, "chat"),
            ping_interval_s=20,
            pong_timeout_s=10,
        )
        for text in frames:
            if connection._close is not None:
                break
            before = len(websocket.sent)
            await connection.handle_frame(text_frame(text))
            message = _loads(text)
            quiet = connection._authorized and isinstance(message, dict) and message.get("type") == "pong"
            assert quiet or len(websocket.sent) > before, f"no answer to {text[:80]!r}"
        if connection._close is not None:
            assert connection._close[0] in (4401, 1013)

    with one_line_logs():
        run(scenario())


@IN_PROCESS
@given(st.lists(frames_of(channel_messages), min_size=1, max_size=6))
def test_every_channels_message_gets_an_answer_or_is_published(frames):
    async def scenario() -> None:
        websocket, nats = FakeWebSocket(), RecordingNats()
        connection = channels.ChannelConnection(websocket, nats, guard(websocket, "channels"))
        for text in frames:
            before = len(websocket.sent) + len(nats.published)
            await connection.handle_frame(text_frame(text))
            assert len(websocket.sent) + len(nats.published) > before, f"no answer to {text[:80]!r}"

    run(scenario())


@IN_PROCESS
@given(st.lists(frames_of(retell_messages), min_size=1, max_size=6))
def test_retell_events_never_raise_in_dispatch_or_their_tasks(frames):
    async def scenario() -> None:
        websocket = FakeWebSocket()
        connection = retell.RetellConnection(websocket, context(), guard(websocket, "retell"), "call_fuzz")
        for text in frames:
            await connection.handle_frame(text_frame(text))
        tasks = list(connection._tasks)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes

    with one_line_logs():
        run(scenario())


def _loads(text: str):
    try:
        return parse_json(text)
    except InvalidJson:
        return None


# -- against a real gateway ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(start_bare_gateway):
    return start_bare_gateway(
        GATEWAY_API_KEYS=KEY,
        GATEWAY_TOKEN_SECRET=SECRET,
        GATEWAY_HANDSHAKE_TIMEOUT_SECONDS="20",
        GATEWAY_MAX_FRAME_BYTES="65536",
    )


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def no_tracebacks(gateway, since: int = 0) -> None:
    """The gateway logged no traceback, and no line a client forged, after offset ``since`` of its log."""
    log = gateway.log.getvalue()[since:]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert not [line for line in log.splitlines() if line.startswith("FORGED")], log[-3000:]


@pytest.fixture(scope="module")
def victim(fuzzed, loop):
    """A finished Retell call's log, as the REST API shows it; the fuzzing connections must leave it so."""

    async def create() -> dict:
        async with websockets.connect(ws_url(fuzzed, f"/ws-default/{VICTIM}")) as ws:
            await ws.send(json.dumps({"interaction_type": "call_details", "call": {}}))
            await receive_until(ws, lambda e: e.get("response_id") == 0)
        async with api_client(fuzzed.url, KEY) as http:
            for _ in range(100):
                response = await http.get(f"/api/calls/{VICTIM}")
                if response.status_code == 200 and response.json()["status"] == "completed":
                    return response.json()
                await asyncio.sleep(0.1)
        raise AssertionError("the victim's call log was never completed")

    return loop.run_until_complete(create())


def untouched(gateway, loop, log: dict) -> None:
    """The victim's call log is exactly as it was."""

    async def read() -> dict:
        async with api_client(gateway.url, KEY) as http:
            return (await http.get(f"/api/calls/{VICTIM}")).json()

    assert loop.run_until_complete(read()) == log


async def receive_until(ws, done, timeout: float = 10.0) -> list:
    """Messages (decoded) up to and including the first for which ``done`` is true."""
    received = []
    deadline = time.monotonic() + timeout
    while True:
        raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        message = json.loads(raw) if isinstance(raw, str) else raw
        received.append(message)
        if done(message):
            return received


def ws_url(gateway, path: str) -> str:
    return gateway.url.replace("http://", "ws://") + path


@END_TO_END
@given(st.lists(frames_of(browser_messages), min_size=1, max_size=6))
def test_browser_socket_survives_fuzz(fuzzed, loop, victim, frames):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        async with websockets.connect(ws_url(fuzzed, "/ws"), max_size=None) as ws:
            for text in frames:
                await ws.send(text)
            await ws.send(json.dumps({"type": "probe"}))
            events = await receive_until(ws, lambda e: "'probe'" in e.get("data", {}).get("error", ""))
            assert len(events) >= len(frames) + 1, (frames, events)

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)
    untouched(fuzzed, loop, victim)


@END_TO_END
@given(st.lists(frames_of(chat_messages), min_size=1, max_size=6))
def test_chat_socket_survives_fuzz(fuzzed, loop, victim, frames):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        async with websockets.connect(ws_url(fuzzed, "/v1/chat/stream")) as ws:
            for text in frames:
                await ws.send(text)
            await ws.send(json.dumps({"type": "probe"}))
            try:
                await receive_until(ws, lambda e: e.get("type") == "error" and "'probe'" in e.get("error", ""))
            except websockets.ConnectionClosed as closed:
                # A bad token is answered with an error and the close the protocol defines.
                assert closed.rcvd.code == 4401, closed
                assert any('"authorize"' in text for text in frames)

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)
    untouched(fuzzed, loop, victim)


@END_TO_END
@given(st.lists(frames_of(channel_messages), min_size=1, max_size=6))
def test_channels_socket_survives_fuzz(fuzzed, loop, frames):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        async with websockets.connect(ws_url(fuzzed, "/ws/channels")) as ws:
            for text in frames:
                await ws.send(text)
            probe = {"channel": "subscription", "payload": {"action": "subscribe", "channel": "probe"}}
            await ws.send(json.dumps(probe))
            await receive_until(ws, lambda e: e.get("payload", {}).get("channel") == "probe")

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)


@END_TO_END
@given(st.lists(frames_of(retell_messages), min_size=1, max_size=6), st.sampled_from(["call_fuzz", VICTIM]))
@example([json.dumps({"interaction_type": "call_details", "call": {}})], VICTIM)
def test_retell_socket_survives_fuzz(fuzzed, loop, victim, frames, call_id):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        async with websockets.connect(ws_url(fuzzed, f"/ws-default/{call_id}")) as ws:
            for text in frames:
                await ws.send(text)
            await ws.send(json.dumps({"interaction_type": "ping_pong", "timestamp": 424242}))
            await receive_until(ws, lambda e: e == {"response_type": "ping_pong", "timestamp": 424242})

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)
    untouched(fuzzed, loop, victim)


@END_TO_END
@given(st.lists(frames_of(carrier_messages), min_size=1, max_size=6), st.sampled_from(["twilio", "exotel"]))
@example([json.dumps({"event": "start", "streamSid": VICTIM, "stream_sid": VICTIM, "start": {}})], "twilio")
@example([json.dumps({"event": "start", "streamSid": VICTIM, "stream_sid": VICTIM, "start": {}})], "exotel")
def test_carrier_sockets_survive_fuzz(fuzzed, loop, victim, frames, dialect):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        path = "/twilio/media" if dialect == "twilio" else "/exotel/media?sample-rate=8000"
        async with websockets.connect(ws_url(fuzzed, path)) as ws:
            for text in frames:
                await ws.send(text)
            await ws.send(json.dumps({"event": "stop", "stop": {}}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await receive_until(ws, lambda e: False)
        code = closed.value.rcvd.code
        # 1000 after stop; 1008 when a start named an agent that does not exist.
        assert code == 1000 or (code == 1008 and "unknown agent" in closed.value.rcvd.reason), closed.value

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)
    untouched(fuzzed, loop, victim)


@END_TO_END
@given(st.lists(frames_of(plivo_messages), min_size=1, max_size=6))
@example([json.dumps({"event": "start", "start": {"streamId": VICTIM}})])
@example(
    [json.dumps({"event": "start", "start": {"streamId": VICTIM, "mediaFormat": {"encoding": "x", "sampleRate": 1}}})]
)
def test_plivo_socket_survives_fuzz(fuzzed, loop, victim, frames):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        async with websockets.connect(ws_url(fuzzed, "/plivo/media")) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                for text in frames:
                    await ws.send(text)
                await ws.send(json.dumps({"event": "stop"}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await receive_until(ws, lambda e: False)
        code, reason = closed.value.rcvd.code, closed.value.rcvd.reason
        # 1000 after stop; 1008 for an agent that does not exist; 1003 for a mediaFormat the gateway cannot serve.
        assert code == 1000 or (code, reason[:7]) in ((1008, "unknown"), (1003, "unsuppo")), closed.value

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)
    untouched(fuzzed, loop, victim)


@END_TO_END
@given(st.lists(frames_of(telnyx_messages), min_size=1, max_size=6))
@example([json.dumps({"event": "start", "sequence_number": "1", "stream_id": VICTIM, "start": {}})])
@example([json.dumps({"event": "start", "stream_id": VICTIM, "start": {"media_format": {"encoding": "G722"}}})])
def test_telnyx_socket_survives_fuzz(fuzzed, loop, victim, frames):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        async with websockets.connect(ws_url(fuzzed, "/telnyx/media")) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                for text in frames:
                    await ws.send(text)
                await ws.send(json.dumps({"event": "stop", "stop": {}}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await receive_until(ws, lambda e: False)
        code, reason = closed.value.rcvd.code, closed.value.rcvd.reason
        # 1000 after stop; 1008 for an agent that does not exist; 1003 for a media_format the gateway cannot speak.
        assert code == 1000 or (code, reason[:7]) in ((1008, "unknown"), (1003, "unsuppo")), closed.value

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)
    untouched(fuzzed, loop, victim)


@END_TO_END
@given(st.lists(vonage_frames, min_size=1, max_size=6))
@example([{"type": "websocket.receive", "text": json.dumps({"event": "websocket:connected", "uuid": VICTIM})}])
def test_vonage_socket_survives_fuzz(fuzzed, loop, victim, frames):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        async with websockets.connect(ws_url(fuzzed, "/vonage/media")) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                for frame in frames:
                    await ws.send(frame["text"] if "text" in frame else frame["bytes"])
                await ws.send(json.dumps({"event": "websocket:cleared"}))
                await ws.close()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await receive_until(ws, lambda e: False)
        rcvd = closed.value.rcvd
        code, reason = (rcvd.code, rcvd.reason) if rcvd is not None else (1000, "")
        # 1000 on hang-up; 1008 for an agent that does not exist; 1003 for a content-type it cannot serve.
        assert code == 1000 or (code, reason[:7]) in ((1008, "unknown"), (1003, "unsuppo")), closed.value

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)
    untouched(fuzzed, loop, victim)


@END_TO_END
@given(st.lists(st.binary(max_size=700) | st.text(max_size=20), min_size=1, max_size=8))
def test_raw_pcm_socket_survives_fuzz(fuzzed, loop, frames):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        async with api_client(fuzzed.url, KEY) as http:
            session = (await http.post("/api/calls/trigger", json={"agent_id": "default"})).json()["session_id"]
        async with websockets.connect(ws_url(fuzzed, f"/ws/pcm/{session}")) as ws:
            for frame in frames:
                await ws.send(frame)
            await asyncio.wait_for(await ws.ping(), 5)
            assert ws.close_code is None

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)


def test_ids_with_a_trailing_newline_reach_no_nats_subject(fuzzed, loop):
    """`$` in a Python regex matches before a final newline: ids are matched whole."""

    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        async with websockets.connect(ws_url(fuzzed, "/ws/channels")) as ws:
            await ws.send(json.dumps({"channel": "a\n", "payload": {"x": 1}}))
            assert "channel names" in json.loads(await ws.recv())["payload"]["error"]
        async with websockets.connect(ws_url(fuzzed, "/ws")) as ws:
            await ws.send(json.dumps({"type": "init", "data": {"agentId": "default\n"}}))
            assert "unknown agent" in json.loads(await ws.recv())["data"]["error"]
            await ws.send(json.dumps({"type": "init", "data": {"callLogId": "x\r\nPUB y 1"}}))
            assert "unknown callLogId" in json.loads(await ws.recv())["data"]["error"]
        async with websockets.connect(ws_url(fuzzed, "/ws/pcm/abc%0A")) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd.code == 4404
        async with api_client(fuzzed.url, KEY) as http:
            assert (await http.get("/api/agents/default%0A")).status_code == 404
            assert (await http.get("/healthz")).status_code == 200

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)


def test_a_long_agent_id_closes_the_stream_with_a_reason_that_fits(fuzzed, loop):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        agent = "x" * 300
        start = {"event": "start", "streamSid": "MZlong", "start": {"customParameters": {"agent_id": agent}}}
        async with websockets.connect(ws_url(fuzzed, "/twilio/media")) as ws:
            await ws.send(json.dumps(start))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd.code == 1008 and closed.value.rcvd.reason.startswith("unknown agent 'xxx")
        async with websockets.connect(ws_url(fuzzed, "/exotel/media?sample-rate=²")) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd.code == 1008

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)


def test_deeply_nested_json_is_an_error_event_not_a_crash(fuzzed, loop):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        deep = "[" * 50_000
        async with websockets.connect(ws_url(fuzzed, "/ws")) as ws:
            await ws.send(deep)
            assert "nested too deeply" in json.loads(await ws.recv())["data"]["error"]
        async with websockets.connect(ws_url(fuzzed, "/ws-default/call_deep")) as ws:
            await ws.recv()
            await ws.send(deep)
            await ws.send(json.dumps({"interaction_type": "ping_pong", "timestamp": 1}))
            await receive_until(ws, lambda e: e.get("response_type") == "ping_pong")

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)


agent_bodies = shaped(
    {
        "name": nasty_text | json_values,
        "greeting": nasty_text | json_values,
        "system_prompt": nasty_text | json_values,
        "llm": shaped({"temperature": json_values, "max_tokens": json_values, "tool_choice": json_values}),
        "tools": st.lists(shaped({"name": nasty_text, "url": nasty_text, "headers": json_values}), max_size=2),
        "pipeline": shaped({"endpointing_silence_ms": json_values, "max_utterance_s": json_values}),
    }
)
rest_bodies = agent_bodies.map(json.dumps) | nasty_frames | st.sampled_from(['{"llm": {"temperature": NaN}}'])


@END_TO_END
@given(nasty_text, rest_bodies, rest_bodies)
def test_rest_api_answers_bad_input_with_4xx(fuzzed, loop, agent_id, agent_body, trigger_body):
    since = len(fuzzed.log.getvalue())

    async def scenario() -> None:
        headers = {"content-type": "application/json"}
        path = "/api/agents/" + urllib.parse.quote((agent_id or "x").encode("utf-8", "surrogatepass"), safe="")
        async with api_client(fuzzed.url, KEY) as http:
            put = await http.put(path, content=agent_body.encode("utf-8", "surrogatepass"), headers=headers)
            trigger = await http.post(
                "/api/calls/trigger", content=trigger_body.encode("utf-8", "surrogatepass"), headers=headers
            )
            read = await http.get(path)
        for response in (put, trigger, read):
            assert response.status_code < 500, (response.request.url, response.text)
            response.json()

    loop.run_until_complete(scenario())
    no_tracebacks(fuzzed, since)
