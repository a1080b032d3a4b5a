"""The seed 001 client the tests use: ``voicectl``'s, so the CLI, the benchmarks and the tests share one.

``BrowserClient(gateway_url)`` opens ``/ws``; ``send(type, **data)``, ``send_raw``, ``next()`` and
``until(type)`` (the events up to and including the first of that type) as before.
"""

from __future__ import annotations

from voicectl.callers import BrowserClient

__all__ = ["BrowserClient"]
