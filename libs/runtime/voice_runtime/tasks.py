"""Stopping and awaiting asyncio tasks without swallowing the caller's own cancellation.

``with suppress(CancelledError): await task`` after ``task.cancel()`` is a trap: if the *caller*
is cancelled while it waits, that suppress eats the caller's cancellation too, and the caller
carries on as if nothing happened (a turn that cannot be interrupted, a close that never ends).
These helpers wait with :func:`asyncio.wait`, which never raises the awaited tasks' outcome, so
the only ``CancelledError`` that can come out of them is the caller's own.
"""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)


async def wait_quietly(*tasks: asyncio.Task | None, timeout: float | None = None) -> bool:
    """Waits for ``tasks`` to end, however they end (their errors are logged, not raised).

    Returns:
        True when every task ended within ``timeout``.
    """
    pending = [task for task in tasks if task is not None]
    if not pending:
        return True
    _, still_running = await asyncio.wait(pending, timeout=timeout)
    for task in pending:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            logger.debug("task %s ended with %r", task.get_name(), error)
    return not still_running


async def cancel_and_wait(*tasks: asyncio.Task | None, timeout: float | None = None) -> bool:
    """Cancels ``tasks`` and waits for them to finish unwinding.

    Returns:
        True when every task ended within ``timeout``; False leaves the stragglers running.
    """
    running = [task for task in tasks if task is not None and not task.done()]
    for task in running:
        task.cancel()
    return await wait_quietly(*running, timeout=timeout)
