"""The engine for any OpenAI-compatible backend: Chat Completions through the ``openai`` client.

The same code drives OpenAI itself, vLLM, llama.cpp's server or the embedded llama-cpp-python server
(:mod:`voice_llm.embedded`). It streams a completion as :class:`~voice_llm.engine.TokenDelta` events
and one :class:`~voice_llm.engine.Completion`, and maps the client's failures onto
:class:`~voice_llm.engine.InvalidRequest` and :class:`~voice_llm.engine.BackendUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import openai

from voice_llm.engine import (
    BackendUnavailable,
    ChatEngine,
    Completion,
    InvalidRequest,
    TokenDelta,
    ToolCallAssembler,
    Usage,
    validate_request,
)

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 2.0
# Opening a TCP (and TLS) connection to a live backend takes milliseconds even when it is busy
# generating; waiting longer only delays the UNAVAILABLE of a backend that is gone.
DEFAULT_CONNECT_TIMEOUT_S = 2.0
# Statuses that say "try again later" rather than "this request is wrong".
_TRANSIENT_4XX = frozenset({408, 409, 429})


class OpenAIChatEngine(ChatEngine):
    """A :class:`ChatEngine` over any OpenAI-compatible ``/chat/completions`` endpoint.

    Usage is requested with ``stream_options={"include_usage": True}``. Backends that ignore the
    option (llama-cpp-python) yield ``usage=None``; a backend that rejects it with a 4xx is asked
    again without it, and never asked with it again.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "sk-no-key",
        timeout_s: float = 60.0,
        max_retries: int = 0,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        """Configures the engine; no connection is made until the first request.

        A backend that is down fails fast: a refused connection is retried once at once (a pooled
        keep-alive connection may have gone stale), an unanswered connect gives up after
        ``connect_timeout_s``, and the ``openai`` client's own retries (with back-off) are off by
        default, since the caller is waiting on a live call. A backend that is up but slow is only
        bound by ``timeout_s``, the longest wait for the next byte of its answer.

        Args:
            base_url: The API root, e.g. ``http://127.0.0.1:8080/v1``.
            model: The default model name sent with each request.
            api_key: Bearer token; local servers accept anything.
            timeout_s: Longest wait for the backend's answer to start, and between its streamed chunks.
            max_retries: Retries of failed requests done by the ``openai`` client.
            connect_timeout_s: Longest wait to open a connection to the backend (at most ``timeout_s``).
        """
        self.base_url = base_url
        self.model = model
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._max_retries = max_retries
        self._connect_timeout_s = min(timeout_s, connect_timeout_s)
        self._client: openai.AsyncOpenAI | None = None
        self._stream_options_supported = True

    async def start(self) -> None:
        """Creates the HTTP client. Idempotent; :meth:`stream` calls it when needed."""
        if self._client is None:
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._api_key,
                timeout=openai.Timeout(self._timeout_s, connect=self._connect_timeout_s),
                max_retries=self._max_retries,
            )

    async def close(self) -> None:
        """Closes the HTTP client and its connections. Idempotent."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def ready(self) -> bool:
        """Returns whether ``GET /models`` succeeds within two seconds."""
        await self.start()
        assert self._client is not None
        client = self._client.with_options(timeout=min(self._timeout_s, _READY_TIMEOUT_S), max_retries=0)
        try:
            await client.models.list()
        except openai.OpenAIError as exc:
            logger.debug("backend %s not ready: %s", self.base_url, exc)
            return False
        return True

    async def stream(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> AsyncIterator[TokenDelta | Completion]:
        """Streams one chat completion; see :meth:`ChatEngine.stream`."""
        wire_tool_choice = validate_request(
            messages,
            tools=tools,
            tool_choice=tool_choice,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
        )
        request: dict[str, Any] = {"model": model or self.model, "messages": messages}
        optional = {
            "tools": tools or None,
            "tool_choice": wire_tool_choice,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": stop or None,
            "seed": seed,
        }
        request.update({key: value for key, value in optional.items() if value is not None})
        await self.start()

        started = time.perf_counter()
        upstream = await self._open(request)
        first_token_at: float | None = None
        text: list[str] = []
        assembler = ToolCallAssembler()
        finish_reason: str | None = None
        usage: Usage | None = None
        model_name = request["model"]
        try:
            async for chunk in upstream:
                model_name = chunk.model or model_name
                if chunk.usage is not None:
                    usage = Usage(
                        prompt_tokens=chunk.usage.prompt_tokens,
                        completion_tokens=chunk.usage.completion_tokens,
                        total_tokens=chunk.usage.total_tokens,
                    )
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    delta = choice.delta
                    if delta is not None and (delta.content or delta.tool_calls):
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        assembler.feed(delta.tool_calls)
                        if delta.content:
                            text.append(delta.content)
                            yield TokenDelta(delta.content)
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
        except openai.APIError as exc:
            raise BackendUnavailable(f"stream from {self.base_url} failed: {exc}") from exc
        finally:
            # Shielded so that a second cancellation cannot leave the connection open.
            await asyncio.shield(upstream.close())

        finished_at = time.perf_counter()
        if finish_reason is None:
            raise BackendUnavailable(f"stream from {self.base_url} ended without a finish_reason")
        yield Completion(
            text="".join(text),
            tool_calls=assembler.result(),
            finish_reason=finish_reason,
            usage=usage,
            model=model_name,
            time_to_first_token_s=(first_token_at or finished_at) - started,
            total_time_s=finished_at - started,
        )

    async def _open(self, request: dict[str, Any]) -> openai.AsyncStream[Any]:
        """Sends the request and returns the open stream, once the backend has answered 2xx."""
        assert self._client is not None
        if self._stream_options_supported:
            try:
                return await self._create({**request, "stream_options": {"include_usage": True}})
            except InvalidRequest as exc:
                if "stream_options" not in str(exc):
                    raise
                logger.info("%s rejects stream_options; not asking for usage", self.base_url)
                self._stream_options_supported = False
        return await self._create(request)

    async def _create(self, request: dict[str, Any]) -> openai.AsyncStream[Any]:
        assert self._client is not None
        try:
            try:
                return await self._client.chat.completions.create(stream=True, **request)
            except openai.APIConnectionError as exc:
                if isinstance(exc, openai.APITimeoutError):
                    raise
                # A server may drop a pooled keep-alive connection (llama-cpp-python does after
                # an error mid-stream); nothing was generated yet, so one fresh attempt is safe.
                logger.debug("retrying on a new connection after: %r", exc.__cause__)
                return await self._client.chat.completions.create(stream=True, **request)
        except openai.APIStatusError as exc:
            message = _backend_message(exc)
            if 400 <= exc.status_code < 500 and exc.status_code not in _TRANSIENT_4XX:
                raise InvalidRequest(message) from exc
            raise BackendUnavailable(f"{self.base_url} answered {exc.status_code}: {message}") from exc
        except openai.APIError as exc:
            raise BackendUnavailable(f"{self.base_url} unreachable: {exc}") from exc


def _backend_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, Mapping):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message
        detail = body.get("detail")
        if detail:
            return str(detail)
    return exc.message
