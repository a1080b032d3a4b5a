"""Every response type of Retell's custom-LLM socket (issue #15, protocols.md §1.4): the call actions of the
final ``response`` and their precedence, ``agent_interrupt`` and its ids, ``no_interruption_allowed``,
``metadata``, and ``transcript_with_tool_calls`` as the LLM's history.

The wire tests run the real gateway with the real model; tool calls are forced with ``tool_choice``, and
a webhook that answers only when the test lets it holds an answer mid-way, so a ``reminder_required``
always finds it running.
"""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from tests.gateway.test_drain import requests_to
from tests.gateway.test_retell import RetellPeer, transcript
from tests.gateway.test_tools import agent_with, call, loopback_egress, put_agent
from tests.gateway.webhooks import WebhookServer
from tests.support.gateway import API_KEY, api_client
from voice_gateway.agents import Agent
from voice_gateway.agents.tools import CallAction, Toolbox
from voice_gateway.dialects.retell import action_fields, history_from_transcript

TICKET = {"type": "object", "properties": {"ticket": {"type": "string"}}, "required": ["ticket"]}
CHUNK_KEYS = {"response_type", "response_id", "content", "content_complete"}
INTERRUPT_KEYS = {"response_type", "interrupt_id", "content", "content_complete", "no_interruption_allowed"}


@pytest.fixture(scope="module")
def hooks():
    with WebhookServer() as server:
        yield server


async def opened(retell: RetellPeer) -> dict:
    """Reads ``config``, sends ``call_details`` and returns the begin message."""
    assert (await retell.next())["response_type"] == "config"
    await retell.send(interaction_type="call_details", call={})
    begin = await retell.next()
    assert begin["response_type"] == "response" and begin["response_id"] == 0
    return begin


async def until_complete(retell: RetellPeer, response_type: str, id_: int, timeout: float = 120) -> list[dict]:
    """Every message until the ``content_complete`` chunk of ``response_type`` with id ``id_``, and the
    ``metadata`` after it when that chunk is an answer's last."""
    id_key = "interrupt_id" if response_type == "agent_interrupt" else "response_id"
    messages = []
    while True:
        message = await retell.next(timeout)
        messages.append(message)
        if message.get("response_type") == response_type and message.get(id_key) == id_:
            if message["content_complete"] is True:
                return messages


# -- in process ---------------------------------------------------------------------------------------------


def test_tool_calls_in_the_transcript_become_a_well_formed_history():
    items = [
        {"role": "user", "content": "Where are orders A-1 and A-2?"},
        {"role": "agent", "content": "Let me look."},
        {"role": "tool_call_invocation", "tool_call_id": "c1", "name": "get_order", "arguments": '{"id":"A-1"}'},
        {"role": "tool_call_invocation", "tool_call_id": "c2", "name": "get_order", "arguments": '{"id":"A-2"}'},
        {"role": "tool_call_result", "tool_call_id": "c2", "content": "A-2 shipped"},
        {"role": "tool_call_result", "tool_call_id": "c1", "content": "A-1 pending"},
        {"role": "tool_call_invocation", "tool_call_id": "c3", "name": "get_order", "arguments": "{}"},
        {"role": "agent", "content": "A-1 is pending and A-2 shipped."},
        {"role": "tool_call_result", "tool_call_id": "c9", "content": "a result of no call"},
        {"role": "dtmf", "digit": "5"},
        {"role": "node_transition", "former_node_id": "a", "new_node_id": "b"},
        {"role": "user", "content": "Thanks."},
    ]
    assert history_from_transcript(items) == [
        {"role": "user", "content": "Where are orders A-1 and A-2?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "c1", "name": "get_order", "arguments": '{"id":"A-1"}'},
                {"id": "c2", "name": "get_order", "arguments": '{"id":"A-2"}'},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "A-1 pending"},
        {"role": "tool", "tool_call_id": "c2", "content": "A-2 shipped"},
        {"role": "assistant", "content": "A-1 is pending and A-2 shipped."},
        {"role": "user", "content": "[The caller pressed 5 on the keypad] Thanks."},
    ]


def test_sequential_tool_rounds_stay_separate_and_a_repeated_id_counts_once():
    items = [
        {"role": "user", "content": "Hi"},
        {"role": "tool_call_invocation", "tool_call_id": "a", "name": "one", "arguments": ""},
        {"role": "tool_call_result", "tool_call_id": "a", "content": "1"},
        {"role": "tool_call_invocation", "tool_call_id": "a", "name": "one", "arguments": "{}"},
        {"role": "tool_call_invocation", "tool_call_id": "b", "name": "two", "arguments": "{}"},
        {"role": "tool_call_result", "tool_call_id": "b", "content": "2"},
    ]
    history = history_from_transcript(items)
    assert [(m["role"], [c["id"] for c in m.get("tool_calls", ())]) for m in history] == [
        ("user", []),
        ("assistant", ["a"]),
        ("tool", []),
        ("assistant", ["b"]),
        ("tool", []),
    ]
    assert history[1]["tool_calls"][0]["arguments"] == "{}"


def test_actions_map_to_one_retell_field_by_precedence():
    end, digit = CallAction("end_call"), CallAction("press_digit", digit="#")
    transfer = CallAction("transfer_call", number="+15550100", show_transferee_as_caller=True)
    assert end.outranks(transfer) and end.outranks(digit) and transfer.outranks(digit) and digit.outranks(None)
    assert not digit.outranks(transfer) and not transfer.outranks(end) and not end.outranks(CallAction("end_call"))
    assert action_fields(end) == {"end_call": True}
    assert action_fields(transfer) == {"transfer_number": "+15550100", "show_transferee_as_caller": True}
    assert action_fields(transfer, agent_interrupt=True) == {"transfer_number": "+15550100"}
    assert action_fields(CallAction("transfer_call", number="+1")) == {"transfer_number": "+1"}
    assert action_fields(digit) == {"digit_to_press": "#"}
    assert action_fields(None) == {}
    assert not digit.ends_call and end.ends_call and transfer.ends_call


async def test_press_digit_and_transfer_options_are_tool_outcomes():
    tools = [{"name": "press_digit"}, {"name": "transfer_call", "show_transferee_as_caller": True}]
    agent = Agent.model_validate(agent_with("a", tools, "auto"))
    async with loopback_egress() as egress:
        toolbox = Toolbox(agent, egress)
        pressed = await toolbox.run(call("press_digit", '{"digit": "7"}'), "s")
        refused = [await toolbox.run(call("press_digit", json.dumps({"digit": d})), "s") for d in ("12", "x", "")]
        transferred = await toolbox.run(call("transfer_call", '{"number": "+15550100"}'), "s")
    assert pressed.successful and pressed.action == CallAction("press_digit", digit="7")
    assert all(not r.successful and r.action is None and "0-9, * or #" in r.content for r in refused)
    assert transferred.action.show_transferee_as_caller is True and transferred.action.number == "+15550100"
    assert agent.tools[0].parameters["required"] == ["digit"]
    with pytest.raises(ValidationError, match="transfer_call only"):
        Agent.model_validate(agent_with("a", [{"name": "end_call", "show_transferee_as_caller": True}], "auto"))


# -- a gateway without workers: no turn has to finish -------------------------------------------------------


async def test_an_agent_without_interruptions_sends_no_interruption_allowed(start_bare_gateway):
    gateway = start_bare_gateway(GATEWAY_API_KEYS=API_KEY)
    async with api_client(gateway.url) as http:
        agent = {"name": "Calm", "greeting": "Hello there.", "pipeline": {"enable_interruptions": False}}
        assert (await http.put("/api/agents/calm", json=agent)).status_code == 200
    calm = RetellPeer(gateway.url, "call_calm1")
    calm.url += "?agent_id=calm"
    async with calm:
        begin = await opened(calm)
    assert begin == {
        "response_type": "response",
        "response_id": 0,
        "content": "Hello there.",
        "content_complete": True,
        "no_interruption_allowed": True,
    }
    async with RetellPeer(gateway.url, "call_default1") as retell:
        assert set(await opened(retell)) == CHUNK_KEYS


# -- the real model -----------------------------------------------------------------------------------------


async def test_transfer_fields_metadata_and_history_with_tool_calls(gateway_url):
    tools = [{"name": "transfer_call", "transfer_number": "+15550100", "show_transferee_as_caller": True}]
    await put_agent(
        gateway_url,
        agent_with("retell-transfer", tools, "transfer_call", pipeline={"enable_interruptions": False}),
    )
    retell = RetellPeer(gateway_url, "call_transfer1")
    retell.url += "?agent_id=retell-transfer"
    earlier = [
        {"role": "user", "content": "Where is order A-42?"},
        {"role": "tool_call_invocation", "tool_call_id": "c1", "name": "get_order", "arguments": '{"order_id":"A-42"}'},
        {"role": "tool_call_result", "tool_call_id": "c1", "content": '{"status": "shipped"}'},
        {"role": "agent", "content": "It has shipped."},
    ]
    async with retell:
        await opened(retell)
        await retell.send(
            interaction_type="response_required",
            response_id=1,
            transcript=transcript(("user", "Where is order A-42?")),
            transcript_with_tool_calls=[*earlier, {"role": "user", "content": "Please put me through to a person."}],
        )
        messages = await until_complete(retell, "response", 1)
        metadata = await retell.next()
    kinds = [m["response_type"] for m in messages]
    assert kinds.index("tool_call_invocation") < kinds.index("tool_call_result") < len(kinds) - 1
    chunks = [m for m in messages if m["response_type"] == "response"]
    assert all(c["no_interruption_allowed"] is True and c["response_id"] == 1 for c in chunks)
    final = chunks[-1]
    assert final["transfer_number"] == "+15550100" and final["show_transferee_as_caller"] is True
    assert "end_call" not in final and "digit_to_press" not in final
    invocation = next(m for m in messages if m["response_type"] == "tool_call_invocation")
    assert metadata == {
        "response_type": "metadata",
        "metadata": {
            "call_log_id": "call_transfer1",
            "response_id": 1,
            "tools": [{"tool_call_id": invocation["tool_call_id"], "name": "transfer_call", "successful": True}],
            "action": "transfer_call",
        },
    }
    async with api_client(gateway_url) as http:
        log = (await http.get("/api/calls/call_transfer1")).json()
    assert log["turns"][-1]["user"] == "Please put me through to a person.", "the history is transcript_with_tool_calls"


async def test_press_digit_becomes_digit_to_press(gateway_url):
    agent = agent_with("retell-ivr", [{"name": "press_digit"}], "press_digit")
    agent["system_prompt"] = "You navigate phone menus. The menu says: for sales press 2. Always press 2."
    await put_agent(gateway_url, agent)
    retell = RetellPeer(gateway_url, "call_ivr1")
    retell.url += "?agent_id=retell-ivr"
    async with retell:
        await opened(retell)
        await retell.send(
            interaction_type="response_required",
            response_id=1,
            transcript=transcript(("user", "Welcome. For sales, press 2. For support, press 3.")),
        )
        messages = await until_complete(retell, "response", 1)
        metadata = await retell.next()
    invocation = next(m for m in messages if m["response_type"] == "tool_call_invocation")
    result = next(m for m in messages if m["response_type"] == "tool_call_result")
    final = messages[-1]
    assert "end_call" not in final and "transfer_number" not in final
    if result["successful"]:
        assert final["digit_to_press"] == json.loads(invocation["arguments"])["digit"]
        assert metadata["metadata"]["action"] == "press_digit"
    else:
        assert "digit_to_press" not in final and "action" not in metadata["metadata"]
    assert metadata["response_type"] == "metadata" and metadata["metadata"]["tools"][0]["name"] == "press_digit"


async def test_a_reminder_during_a_slow_tool_turns_the_answer_into_agent_interrupts(gateway_url, hooks):
    tool = {"name": "check_ticket", "description": "Check a support ticket.", "parameters": TICKET}
    tools = [{**tool, "url": hooks.url + "/pause", "timeout_s": 60}]
    agent = agent_with(f"slow_{uuid.uuid4().hex[:6]}", tools, "check_ticket")
    agent["llm"]["max_tool_rounds"] = 1
    await put_agent(gateway_url, agent)
    retell = RetellPeer(gateway_url, f"call_{uuid.uuid4().hex[:8]}")
    retell.url += f"?agent_id={agent['id']}"
    said = [("user", "Check ticket T-1 please.")]

    async def held_answer(response_id: int, reminder_id: int) -> list[dict]:
        """Asks for an answer and reminds while its tool is held; the messages until the reminder's answer."""
        hooks.resumed.clear()
        paused = len([r for r in hooks.requests if r["path"] == "/pause"])
        await retell.send(interaction_type="response_required", response_id=response_id, transcript=transcript(*said))
        await requests_to(hooks, "/pause", paused + 1)
        await retell.send(interaction_type="reminder_required", response_id=reminder_id, transcript=transcript(*said))
        return await until_complete(retell, "response", reminder_id)

    async with retell:
        await opened(retell)
        first = await held_answer(1, 2)
        assert first[-1] == {"response_type": "response", "response_id": 2, "content": "", "content_complete": True}
        hooks.resumed.set()
        interrupts = await until_complete(retell, "agent_interrupt", 1)
        metadata = await retell.next()

        second = await held_answer(3, 4)
        hooks.resumed.set()
        newer = await until_complete(retell, "agent_interrupt", 2)
        await retell.next()

        third = await held_answer(5, 6)
        await retell.send(interaction_type="response_required", response_id=7, transcript=transcript(*said))
        hooks.resumed.set()
        superseded = await until_complete(retell, "response", 7)
    assert [m["response_type"] for m in first][:-1] == ["tool_call_invocation"]
    kinds = [m["response_type"] for m in interrupts]
    assert kinds[0] == "tool_call_result" and set(kinds[1:]) == {"agent_interrupt"}, kinds
    for chunk in interrupts[1:]:
        assert set(chunk) == INTERRUPT_KEYS and chunk["interrupt_id"] == 1
        assert chunk["no_interruption_allowed"] is True and type(chunk["content_complete"]) is bool
    assert "".join(c["content"] for c in interrupts[1:]).strip(), "the held answer is spoken as an interrupt"
    assert metadata["metadata"]["response_id"] == 1 and metadata["metadata"]["interrupt_id"] == 1
    tool_seen = metadata["metadata"]["tools"][0]
    assert tool_seen["name"] == "check_ticket" and "result" not in tool_seen
    assert second[-1]["response_id"] == 4 and not [m for m in second if m["response_type"] == "agent_interrupt"]
    assert {m["interrupt_id"] for m in newer if m["response_type"] == "agent_interrupt"} == {2}
    assert third[-1]["response_id"] == 6
    assert not [m for m in superseded if m["response_type"] == "agent_interrupt"], "a newer request ends the interrupt"
    assert {m["response_id"] for m in superseded if m["response_type"] == "response"} == {7}
