"""Bridging blocking engine iterators (model inference in threads) into async streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


async def iterate_in_thread(produce: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Runs ``produce()`` in a worker thread and yields its items as they come.

    The engine behind ``produce`` must poll a stop flag (the request's ``should_stop``) between
    items: when the consumer stops early, the thread finishes its current item and ends there.
    Exceptions raised in the thread are re-raised in the consumer.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()

    def put(item: object, error: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))

    def pump() -> None:
        try:
            for item in produce():
                put(item)
        except BaseException as exc:
            put(None, exc)
        else:
            put(_DONE)

    loop.run_in_executor(None, pump)
    while True:
        item, error = await queue.get()
        if error is not None:
            raise error
        if item is _DONE:
            return
        yield item
