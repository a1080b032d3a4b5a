"""A real local HTTP server standing in for an agent's webhook tools, recording what it was sent.

Paths: ``/order`` answers JSON about the order, ``/slow`` answers only after ``slow_s`` seconds,
``/hold`` and ``/pause`` answer once :attr:`WebhookServer.released` or :attr:`WebhookServer.resumed` is
set (at most 60 s), ``/fail`` answers 500, ``/redirect?to=URL`` answers 302 to ``URL`` (``status``
another code), ``/loop`` redirects to itself, ``/endless`` streams a body that never ends, anything else 404.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from urllib.parse import parse_qs, urlparse


class WebhookServer:
    """Runs in a thread; ``requests`` holds ``(method, path, query, headers, body)`` of each call."""

    def __init__(self, slow_s: float = 4.0, host: str = "127.0.0.1") -> None:
        """Binds a free port on ``host`` (``0.0.0.0`` for containers to reach it); ``url`` names 127.0.0.1."""
        self.slow_s = slow_s
        self.requests: list[dict] = []
        self.released = threading.Event()
        self.resumed = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urlparse(self.path)
                server.requests.append(
                    {
                        "method": self.command,
                        "path": url.path,
                        "query": {k: v[0] for k, v in parse_qs(url.query).items()},
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": json.loads(body) if body else None,
                    }
                )
                if url.path == "/slow":
                    time.sleep(server.slow_s)
                if url.path in ("/hold", "/pause"):
                    (server.released if url.path == "/hold" else server.resumed).wait(60)
                query = parse_qs(url.query)
                if url.path == "/redirect":
                    self._redirect(int(query.get("status", ["302"])[0]), query.get("to", ["/no-target"])[0])
                elif url.path == "/loop":
                    self._redirect(302, "/loop")
                elif url.path == "/endless":
                    self._endless()
                elif url.path in ("/order", "/slow", "/hold", "/pause"):
                    self._reply(200, {"order": "A-42", "status": "shipped", "eta": "tomorrow"})
                elif url.path == "/fail":
                    self._reply(500, {"error": "database down"})
                else:
                    self._reply(404, {"error": "no such path"})

            def _reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _redirect(self, status: int, location: str) -> None:
                self.send_response(status)
                self.send_header("location", location)
                self.send_header("content-length", "0")
                self.end_headers()

            def _endless(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.end_headers()
                try:
                    for line in count():
                        self.wfile.write(f"line {line} of a body that never ends\n".encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815 (http.server dispatches on these)

            def log_message(self, *args) -> None:
                pass

        self._httpd = ThreadingHTTPServer((host, 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> WebhookServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
