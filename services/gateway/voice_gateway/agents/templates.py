"""Template variables in agents' prompts, greetings and fallback messages: ``{{driver_name}}`` becomes the
call's value."""

from __future__ import annotations

import re

from voice_gateway.agents.store import Agent

_VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def render(text: str, variables: dict[str, object]) -> str:
    """Replaces ``{{name}}`` with ``variables[name]``; unknown names are left as they are."""
    return _VARIABLE.sub(lambda m: str(variables[m.group(1)]) if m.group(1) in variables else m.group(0), text)


def personalise(agent: Agent, variables: dict[str, object]) -> Agent:
    """The agent with its system prompt, greeting and fallback message rendered for one call."""
    if not variables:
        return agent
    return agent.model_copy(
        update={
            "system_prompt": render(agent.system_prompt, variables),
            "greeting": render(agent.greeting, variables),
            "fallback_message": render(agent.fallback_message, variables),
        }
    )
