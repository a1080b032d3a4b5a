"""Agents: what a caller talks to (prompt, greeting, voice, model settings, tools, turn-taking
options), their KV store, template variables and the tools they may call."""

from voice_gateway.agents.store import AGENT_ID, DEFAULT_FALLBACK_MESSAGE, Agent, AgentStore

__all__ = ["AGENT_ID", "DEFAULT_FALLBACK_MESSAGE", "Agent", "AgentStore"]
