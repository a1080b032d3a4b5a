"""The egress policy of webhook tools (SSRF): internal destinations are refused after DNS resolution, the
connection goes to the checked address, redirects are checked hop by hop, bodies are capped, and a refused
tool's answer never reaches the clients. Real local HTTP(S) servers; DNS answers come from a fake resolver
where the test needs them to differ from the system's."""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import ssl
import subprocess
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import nats
import pytest

from tests.gateway.client import BrowserClient
from tests.gateway.webhooks import WebhookServer
from tests.support.gateway import API_KEY, api_client
from voice.v1 import llm_pb2
from voice_bus.catalog import status_subject
from voice_gateway.agents import Agent
from voice_gateway.agents.egress import EgressPolicy, EgressRefused, address_class, host_class
from voice_gateway.agents.egress_client import EgressClient
from voice_gateway.agents.tools import MAX_RESULT_CHARS, Toolbox
from voice_gateway.config import Settings
from voice_runtime.config import ConfigError

LOOPBACK = ["127.0.0.1/32"]


@pytest.fixture(scope="module")
def webhooks():
    with WebhookServer() as server:
        yield server


def fixed(*answers: list[str]):
    """A resolver answering ``answers`` in turn (the last one again once they run out); ``calls`` records the
    names it was asked."""
    calls: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    resolver.calls = calls
    return resolver


def tool_agent(url: str, **extra) -> Agent:
    tool = {"name": "get_order", "parameters": {"type": "object", "properties": {}}, "url": url, **extra}
    return Agent.model_validate({"id": "a", "tools": [tool]})


async def run_tool(agent: Agent, egress: EgressClient):
    call = llm_pb2.ToolCall(id="call_1", name="get_order", arguments="{}")
    try:
        return await Toolbox(agent, egress).run(call, "session-1")
    finally:
        await egress.aclose()


def error_of(outcome) -> str:
    assert not outcome.successful
    return json.loads(outcome.content)["error"]


# The policy: which addresses and names pass.


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd00:ec2::254", "private"),
        ("100.64.0.1", "shared address space (CGNAT)"),
        ("100.100.100.200", "shared address space (CGNAT)"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("2001:db8::1", "reserved"),
        ("::ffff:127.0.0.1", "loopback (IPv4-mapped form of 127.0.0.1)"),
        ("::ffff:169.254.169.254", "link-local (IPv4-mapped form of 169.254.169.254)"),
        ("::ffff:10.0.0.1", "private (IPv4-mapped form of 10.0.0.1)"),
        ("::127.0.0.1", "loopback (IPv4-compatible form of 127.0.0.1)"),
        ("::8.8.8.8", "reserved (IPv4-compatible form)"),
        ("2002:7f00:1::1", "loopback (6to4 form of 127.0.0.1)"),
        ("64:ff9b::a9fe:a9fe", "link-local (NAT64 form of 169.254.169.254)"),
    ],
)
async def test_every_internal_address_class_is_refused(address, reason):
    assert address_class(ipaddress.ip_address(address)) == reason
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(EgressRefused) as refused:
        await EgressPolicy().check(httpx.URL(f"http://{host}:8222/varz"))
    assert refused.value.reason == reason
    assert refused.value.describe("get_order") == (
        f"the get_order service's address {ipaddress.ip_address(address)} is not allowed: {reason} "
        "(set GATEWAY_TOOL_ALLOWED_NETWORKS to allow it)"
    )


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
async def test_public_addresses_pass(address):
    assert address_class(ipaddress.ip_address(address)) is None
    resolver = fixed([address])
    destination = await EgressPolicy(resolver=resolver).check(httpx.URL("https://orders.example.com/lookup"))
    assert destination.addresses == (str(ipaddress.ip_address(address)),) and destination.port == 443
    assert resolver.calls == ["orders.example.com"]


@pytest.mark.parametrize(
    "host",
    ["localhost", "LOCALHOST.", "api.localhost", "nats", "metadata.google.internal", "orders.svc",
     "orders.default.svc.cluster.local", "printer.local"],
)  # fmt: skip
async def test_cluster_internal_names_are_refused_without_being_resolved(host):
    assert host_class(host) is not None
    resolver = fixed(["93.184.215.14"])
    with pytest.raises(EgressRefused) as refused:
        await EgressPolicy(resolver=resolver).check(httpx.URL(f"http://{host}/x"))
    assert refused.value.describe("get_order").startswith(
        f"the get_order service's host name {host.rstrip('.').lower()!r}"
    )
    assert "GATEWAY_TOOL_ALLOWED_HOSTS" in str(refused.value)
    assert resolver.calls == []


async def test_every_resolved_address_must_pass():
    resolver = fixed(["93.184.215.14", "10.0.0.5"])
    with pytest.raises(EgressRefused, match=r"address 10\.0\.0\.5 is not allowed: private"):
        await EgressPolicy(resolver=resolver).check(httpx.URL("http://orders.example.com/"))


async def test_the_allow_lists_admit_internal_destinations():
    internal = EgressPolicy(["10.0.0.0/8"], resolver=fixed(["10.1.2.3"]))
    assert (await internal.check(httpx.URL("http://10.9.9.9/"))).addresses == ("10.9.9.9",)
    mapped = await internal.check(httpx.URL("http://[::ffff:10.9.9.9]/"))
    assert ipaddress.ip_address(mapped.addresses[0]).ipv4_mapped == ipaddress.ip_address("10.9.9.9")
    # A cluster-internal name passes when every address it resolves to is in an allowed network...
    assert (await internal.check(httpx.URL("http://orders.svc.cluster.local:8080/"))).addresses == ("10.1.2.3",)
    # ...and not otherwise; nor do other private addresses.
    elsewhere = EgressPolicy(["10.0.0.0/8"], resolver=fixed(["192.168.0.7"]))
    with pytest.raises(EgressRefused, match=r"host name 'orders\.svc'"):
        await elsewhere.check(httpx.URL("http://orders.svc/"))
    with pytest.raises(EgressRefused, match=r"address 192\.168\.0\.7 is not allowed: private"):
        await elsewhere.check(httpx.URL("http://orders.example.com/"))
    # An allowed host name passes whatever it resolves to; other names are checked as usual.
    hosts = EgressPolicy(allowed_hosts=["Tools.Internal"], resolver=fixed(["192.168.0.7"]))
    assert (await hosts.check(httpx.URL("https://tools.internal/x"))).addresses == ("192.168.0.7",)
    with pytest.raises(EgressRefused):
        await hosts.check(httpx.URL("https://other.example.com/x"))


def test_the_allow_lists_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("GATEWAY_TOOL_ALLOWED_NETWORKS", "10.0.0.0/8, 127.0.0.1")
    monkeypatch.setenv("GATEWAY_TOOL_ALLOWED_HOSTS", "Orders.Internal., nats")
    settings = Settings.from_env()
    assert settings.tool_allowed_networks == ("10.0.0.0/8", "127.0.0.1/32")
    assert settings.tool_allowed_hosts == ("orders.internal", "nats")
    for variable, value in (
        ("GATEWAY_TOOL_ALLOWED_NETWORKS", "10.0.0.0/33"),
        ("GATEWAY_TOOL_ALLOWED_HOSTS", "http://x/"),
    ):
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigError, match=variable):
            Settings.from_env()
        monkeypatch.delenv(variable)


# Through the toolbox, with a real HTTP server.


async def test_a_refused_url_is_a_tool_error_result_and_a_warning(webhooks, caplog):
    before = len(webhooks.requests)
    with caplog.at_level(logging.WARNING, logger="voice_gateway.agents.tools"):
        outcome = await run_tool(tool_agent(webhooks.url + "/order"), EgressClient())
    assert error_of(outcome) == (
        "the get_order service's address 127.0.0.1 is not allowed: loopback "
        "(set GATEWAY_TOOL_ALLOWED_NETWORKS to allow it)"
    )
    assert "detail" not in json.loads(outcome.content)
    assert len(webhooks.requests) == before
    assert any("is not allowed: loopback" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


async def test_the_request_goes_to_the_checked_address_under_the_urls_host_name(webhooks):
    """``webhooks.test`` exists only in the fake resolver: the transport never resolves the name itself."""
    port = httpx.URL(webhooks.url).port
    egress = EgressClient(EgressPolicy(LOOPBACK, resolver=fixed(["127.0.0.1"])))
    outcome = await run_tool(tool_agent(f"http://webhooks.test:{port}/order"), egress)
    assert outcome.successful and json.loads(outcome.content)["status"] == "shipped"
    assert webhooks.requests[-1]["headers"]["host"] == f"webhooks.test:{port}"


async def test_a_resolver_that_answers_a_passing_address_then_a_private_one_cannot_reach_the_private_one(webhooks):
    """DNS rebinding: the first answer (127.0.0.2, allowed here; nothing listens there) is checked, the
    next (127.0.0.1, where the server is, and what the system resolves ``localhost`` to) would not pass.
    The request is pinned to the first answer, so it never reaches the server."""
    port = httpx.URL(webhooks.url).port
    resolver = fixed(["127.0.0.2"], ["127.0.0.1"])
    before = len(webhooks.requests)
    outcome = await run_tool(
        tool_agent(f"http://localhost:{port}/order"), EgressClient(EgressPolicy(["127.0.0.2/32"], resolver=resolver))
    )
    assert "could not be reached" in error_of(outcome)
    assert resolver.calls == ["localhost"]
    assert len(webhooks.requests) == before


async def test_each_redirect_hop_is_checked(webhooks):
    port = httpx.URL(webhooks.url).port
    internal = f"http://127.0.0.1:{port}/order"
    egress = EgressClient(EgressPolicy(allowed_hosts=["webhooks.test"], resolver=fixed(["127.0.0.1"])))
    before = len(webhooks.requests)
    outcome = await run_tool(
        tool_agent(f"http://webhooks.test:{port}/redirect?to={urllib.parse.quote(internal)}"), egress
    )
    assert error_of(outcome) == (
        "the get_order service redirected to address 127.0.0.1, which is not allowed: loopback "
        "(set GATEWAY_TOOL_ALLOWED_NETWORKS to allow it)"
    )
    assert [r["path"] for r in webhooks.requests[before:]] == ["/redirect"]
    refused_scheme = await run_tool(
        tool_agent(f"{webhooks.url}/redirect?to={urllib.parse.quote('file:///etc/passwd')}"),
        EgressClient(EgressPolicy(LOOPBACK)),
    )
    assert "redirected to a file: URL" in error_of(refused_scheme)


async def test_redirects_are_followed_a_few_times_and_the_tools_headers_stay_with_its_origin(webhooks):
    port = httpx.URL(webhooks.url).port
    policy = EgressPolicy(LOOPBACK, resolver=fixed(["127.0.0.1"]))
    other_origin = f"http://webhooks.test:{port}/order"
    second_hop = "/redirect?to=" + urllib.parse.quote(other_origin)
    url = f"{webhooks.url}/redirect?status=307&to={urllib.parse.quote(second_hop)}"
    before = len(webhooks.requests)
    outcome = await run_tool(tool_agent(url, headers={"Authorization": "Bearer hook-secret"}), EgressClient(policy))
    assert outcome.successful and json.loads(outcome.content)["status"] == "shipped"
    hops = webhooks.requests[before:]
    assert [(r["method"], r["path"]) for r in hops] == [("POST", "/redirect"), ("POST", "/redirect"), ("GET", "/order")]
    assert hops[1]["body"]["name"] == "get_order"
    assert [r["headers"].get("authorization") for r in hops] == ["Bearer hook-secret", "Bearer hook-secret", None]
    too_many = await run_tool(tool_agent(f"{webhooks.url}/loop", method="GET"), EgressClient(policy))
    assert error_of(too_many) == "the get_order service redirected more than 3 times"


async def test_a_get_tool_keeps_its_urls_query_beside_the_arguments(webhooks):
    agent = tool_agent(webhooks.url + "/order?source=voice", method="GET")
    call = llm_pb2.ToolCall(id="call_1", name="get_order", arguments='{"order_id": "A-42"}')
    egress = EgressClient(EgressPolicy(LOOPBACK))
    try:
        outcome = await Toolbox(agent, egress).run(call, "s")
    finally:
        await egress.aclose()
    assert outcome.successful
    assert webhooks.requests[-1]["query"] == {"source": "voice", "order_id": "A-42"}


async def test_bodies_are_capped_while_they_are_read(webhooks):
    """``/endless`` never ends: reading it all first would only end at the tool's timeout."""
    outcome = await run_tool(tool_agent(webhooks.url + "/endless", timeout_s=30), EgressClient(EgressPolicy(LOOPBACK)))
    assert outcome.successful
    assert len(outcome.content) == MAX_RESULT_CHARS and outcome.content.startswith("line 0 of a body")


# HTTPS: the connection to the checked address still verifies the certificate for the URL's host name.


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a certificate for ``webhooks.test`` from a test CA; ``sni`` lists the
    server names clients sent."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the test certificates")
    d = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca_extensions = ("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Test CA",
             *ca_extensions, cwd=d)  # fmt: skip
    _openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=webhooks.test", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:webhooks.test\n")
    _openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "leaf.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)  # fmt: skip
    sni: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(d / "leaf.pem", d / "leaf.key")
    context.sni_callback = lambda sock, name, ctx: sni.append(name)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = json.dumps({"host": self.headers.get("host")}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address) -> None:
            pass  # a client that refuses the certificate

    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    trusted = ssl.create_default_context(cafile=str(d / "ca.pem"))
    yield httpd.server_address[1], trusted, sni
    httpd.shutdown()
    httpd.server_close()


async def test_https_keeps_sni_and_certificate_verification_for_the_urls_host_name(tls_server):
    port, trusted, sni = tls_server
    policy = EgressPolicy(LOOPBACK, resolver=fixed(["127.0.0.1"]))
    outcome = await run_tool(
        tool_agent(f"https://webhooks.test:{port}/status", method="GET"), EgressClient(policy, ssl_context=trusted)
    )
    assert outcome.successful and json.loads(outcome.content) == {"host": f"webhooks.test:{port}"}
    assert sni[-1] == "webhooks.test"
    # The same address under another name: the certificate is not that name's, so the request fails.
    other = await run_tool(
        tool_agent(f"https://other.test:{port}/status", method="GET"), EgressClient(policy, ssl_context=trusted)
    )
    assert "could not be reached" in error_of(other)
    assert sni[-1] == "other.test"


# The attack end to end: a real gateway, a real model calling the tool, the real NATS monitor.


def varz_agent(agent_id: str, url: str) -> dict:
    return {
        "id": agent_id,
        "name": "Status",
        "system_prompt": "You report the server status. Use the tool.",
        "greeting": "",
        "llm": {"tool_choice": "server_status", "temperature": 0.0, "max_tokens": 24, "max_tool_rounds": 1},
        "pipeline": {"respond_with_audio": False},
        "tools": [
            {
                "name": "server_status",
                "description": "Get the server status.",
                "parameters": {"type": "object", "properties": {}},
                "url": url,
                "method": "GET",
            }
        ],
    }


async def browser_turn(gateway_url: str, nats_url: str, agent: dict) -> tuple[list[dict], list[dict], dict]:
    """Puts ``agent``, runs one typed turn on ``/ws`` and returns the socket's events, the session's channel
    statuses and its call log."""
    async with api_client(gateway_url) as http:
        response = await http.put(f"/api/agents/{agent['id']}", json=agent)
        assert response.status_code == 200, response.text
    nc = await nats.connect(nats_url)
    statuses: list[dict] = []

    async def on_status(msg) -> None:
        statuses.append(json.loads(msg.data))

    try:
        async with BrowserClient(gateway_url) as client:
            await client.send("init", agentId=agent["id"])
            session_id = (await client.next())["data"]["callLogId"]
            await nc.subscribe(status_subject(session_id), cb=on_status)
            await nc.flush()
            await client.send("text", text="What is the server status?")
            events = await client.until("text_response", "error", timeout=120)
        await nc.flush()
    finally:
        await nc.close()
    async with api_client(gateway_url) as http:
        log = (await http.get(f"/api/calls/{session_id}")).json()
    return events, statuses, log


@pytest.fixture(scope="module")
def nats_monitor(nats_server) -> tuple[str, str]:
    """The NATS monitor's ``/varz`` URL and the server id it discloses."""
    url = f"http://127.0.0.1:{nats_server.monitor_port}/varz"
    return url, httpx.get(url, timeout=10).json()["server_id"]


@pytest.fixture(scope="module")
def open_gateway(start_bare_gateway, llm_worker):
    """A gateway as deployed by default: no allow-list."""
    return start_bare_gateway(GATEWAY_API_KEYS=API_KEY)


@pytest.fixture(scope="module")
def localhost_gateway(start_bare_gateway, llm_worker):
    """A gateway that lets tools reach the host name ``localhost`` (and nothing else internal): the test
    webhook server stands in for a public one."""
    return start_bare_gateway(GATEWAY_API_KEYS=API_KEY, GATEWAY_TOOL_ALLOWED_HOSTS="localhost")


def localhost_url(webhooks: WebhookServer, path: str) -> str:
    return f"http://localhost:{httpx.URL(webhooks.url).port}{path}"


async def test_a_tool_at_the_nats_monitor_is_refused_and_its_body_never_reaches_the_client(
    open_gateway, nats_url, nats_monitor
):
    gateway = open_gateway
    varz_url, server_id = nats_monitor
    agent = varz_agent(f"ssrf-{uuid.uuid4().hex[:6]}", varz_url)
    events, statuses, log = await browser_turn(gateway.url, nats_url, agent)
    expected = (
        "the server_status service's address 127.0.0.1 is not allowed: loopback "
        "(set GATEWAY_TOOL_ALLOWED_NETWORKS to allow it)"
    )
    kinds = [e["type"] for e in events]
    assert kinds.index("llm_tool_call") < kinds.index("llm_tool_result") < kinds.index("text_response")
    result = events[kinds.index("llm_tool_result")]["data"]
    assert result["name"] == "server_status" and result["toolCallId"]
    assert result["successful"] is False and json.loads(result["result"]) == {"successful": False}
    assert server_id not in json.dumps(events) and server_id not in json.dumps(statuses)
    tool = log["turns"][-1]["tools"][0]
    assert tool["successful"] is False and json.loads(tool["result"]) == {"error": expected}
    failed = [s for s in statuses if s["type"] == "tool" and s["status"] == "error"]
    assert failed and failed[0]["error_details"] == expected
    assert expected in gateway.log.getvalue()


async def test_a_redirect_to_the_nats_monitor_is_refused(localhost_gateway, nats_url, nats_monitor, webhooks):
    """The webhook's own host is allowed; its redirect to the monitor's address is checked again and refused."""
    varz_url, server_id = nats_monitor
    url = localhost_url(webhooks, f"/redirect?to={urllib.parse.quote(varz_url)}")
    before = len(webhooks.requests)
    agent = varz_agent(f"ssrf-{uuid.uuid4().hex[:6]}", url)
    events, statuses, log = await browser_turn(localhost_gateway.url, nats_url, agent)
    assert [r["path"] for r in webhooks.requests[before:]] == ["/redirect"]
    result = next(e["data"] for e in events if e["type"] == "llm_tool_result")
    assert result["successful"] is False and json.loads(result["result"]) == {"successful": False}
    assert server_id not in json.dumps(events) and server_id not in json.dumps(statuses)
    assert json.loads(log["turns"][-1]["tools"][0]["result"]) == {
        "error": "the server_status service redirected to address 127.0.0.1, which is not allowed: loopback "
        "(set GATEWAY_TOOL_ALLOWED_NETWORKS to allow it)"
    }


async def test_an_agent_can_expose_a_tools_result_to_browser_clients(localhost_gateway, nats_url, webhooks):
    agent = varz_agent(f"exposed-{uuid.uuid4().hex[:6]}", localhost_url(webhooks, "/order"))
    agent["tools"][0]["expose_result"] = True
    events, _, _ = await browser_turn(localhost_gateway.url, nats_url, agent)
    result = next(e["data"] for e in events if e["type"] == "llm_tool_result")
    assert result["successful"] is True and json.loads(result["result"])["status"] == "shipped"


async def test_a_failed_tools_channel_status_has_its_error_without_the_services_body(
    localhost_gateway, nats_url, webhooks
):
    agent = varz_agent(f"failing-{uuid.uuid4().hex[:6]}", localhost_url(webhooks, "/fail"))
    events, statuses, log = await browser_turn(localhost_gateway.url, nats_url, agent)
    failed = [s for s in statuses if s["type"] == "tool" and s["status"] == "error"]
    assert failed and failed[0]["error_details"] == "the server_status service answered HTTP 500"
    assert "database down" not in json.dumps(statuses) and "database down" not in json.dumps(events)
    # The model still reads the body.
    assert json.loads(log["turns"][-1]["tools"][0]["result"])["detail"] == '{"error": "database down"}'
