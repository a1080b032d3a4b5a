"""llama-cpp-python's OpenAI-compatible server, with our chat handler registered and OpenAI requests accepted.

``python -m llama_cpp.server`` only knows the chat formats llama-cpp-python registers itself. This
module is the same server (same command-line options, built by ``llama_cpp.server``'s own settings,
app factory and uvicorn) run after importing :mod:`voice_llm.embedded_chat`, which registers the
``voice-chatml-tools`` chat format; :func:`voice_llm.embedded.llama_server_command` starts it.

It also mends two places where llama-cpp-python's request schema refuses what OpenAI clients
(the ``openai`` package among them) send, before the request reaches it: an assistant message with
``tool_calls`` and ``"content": null`` (the schema wants a string: the content becomes ``""``), and
the ``developer`` role (it becomes ``system``); system, assistant and tool contents given as lists of
text parts become strings. See :func:`normalize_chat_request`.

Run it as ``python -m voice_llm.embedded_server --model FILE --chat_format voice-chatml-tools ...``
(``--help`` lists llama-cpp-python's options), or better through ``python -m voice_llm.embedded``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

logger = logging.getLogger(__name__)

CHAT_COMPLETIONS_PATH = "/chat/completions"
_STRING_CONTENT_ROLES = frozenset({"system", "assistant", "tool"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def normalize_chat_request(body: Any) -> Any:
    """Rewrites a decoded chat completion request into the shape llama-cpp-python's schema accepts.

    Args:
        body: The decoded JSON body; anything but a dict with a ``messages`` list is returned as is.

    Returns:
        The same object, its messages changed in place: ``developer`` becomes ``system``, a
        ``null`` assistant content becomes ``""``, and a list of parts in a system, assistant or
        tool message becomes the text of its text parts, joined by newlines.
    """
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return body
    for message in body["messages"]:
        if not isinstance(message, dict):
            continue
        if message.get("role") == "developer":
            message["role"] = "system"
        role = message.get("role")
        content = message.get("content")
        if role == "assistant" and "content" in message and content is None:
            message["content"] = ""
        elif role in _STRING_CONTENT_ROLES and isinstance(content, list):
            message["content"] = "\n".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
            )
    return body


class ChatRequestNormalizer:
    """ASGI middleware that applies :func:`normalize_chat_request` to ``POST .../chat/completions`` bodies.

    Everything after the body (notably the ``http.disconnect`` that tells the server its client has
    gone) still comes from the real ``receive``.
    """

    def __init__(self, app: ASGIApp) -> None:
        """Wraps ``app``.

        Args:
            app: The ASGI application to forward to.
        """
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handles one ASGI connection."""
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or not scope.get("path", "").endswith(CHAT_COMPLETIONS_PATH)
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body = json.dumps(normalize_chat_request(json.loads(body))).encode()
        except ValueError:
            pass  # not JSON: the server answers it
        headers = [(name, value) for name, value in scope.get("headers", []) if name.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": headers}, replay, send)


def main(argv: list[str] | None = None) -> None:
    """Runs the server until interrupted.

    Args:
        argv: llama-cpp-python server options (defaults to ``sys.argv[1:]``).
    """
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

    import voice_llm.embedded_chat  # noqa: F401  (registers the chat handler)

    parser = argparse.ArgumentParser(prog="python -m voice_llm.embedded_server", description=__doc__)
    add_args_from_model(parser, Settings)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    server_settings = parse_model_from_args(ServerSettings, args)
    model_settings = parse_model_from_args(ModelSettings, args)
    app = create_app(server_settings=server_settings, model_settings=[model_settings])
    app.add_middleware(ChatRequestNormalizer)
    logger.info("chat format %s, model %s", model_settings.chat_format, model_settings.model)
    uvicorn.run(
        app,
        host=server_settings.host,
        port=server_settings.port,
        ssl_keyfile=server_settings.ssl_keyfile,
        ssl_certfile=server_settings.ssl_certfile,
    )


if __name__ == "__main__":
    main()
