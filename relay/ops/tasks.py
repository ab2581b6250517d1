"""Ending a set of in-flight tasks within a grace period (the drain on SIGTERM)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Set

log = logging.getLogger(__name__)


async def drain_tasks(tasks: Set[asyncio.Task[object]], grace: float, what: str) -> int:
    """Let `tasks` finish within `grace` seconds, then cancel the rest and wait for them.

    Returns how many had to be cancelled. `tasks` may shrink meanwhile (done callbacks).
    """
    if tasks:
        await asyncio.wait(set(tasks), timeout=grace)
    left = set(tasks)
    for task in left:
        task.cancel()
    if left:
        log.warning("grace period over, cancelling", extra={"what": what, "n": len(left)})
        await asyncio.gather(*left, return_exceptions=True)
    return len(left)
