"""Heartbeats: a sibling task of every worker that measures round trips and counts misses."""

from __future__ import annotations

import anyio

from ._errors import WorkerDied
from ._parent import WorkerCore, log


async def heartbeat_loop(core: WorkerCore) -> None:
    """Every ``heartbeat_interval`` send a heartbeat and wait ``heartbeat_timeout`` for its echo.

    ``heartbeat_max_misses`` consecutive misses mark the worker unhealthy: every pending
    call fails with :class:`WorkerDied` and new calls are refused. Interval 0 disables it.
    """
    options = core.options
    if options.heartbeat_interval <= 0:
        return
    misses = 0
    while not core.failed:
        await anyio.sleep(options.heartbeat_interval)
        if core.failed:
            return
        with anyio.move_on_after(options.heartbeat_timeout):
            try:
                await core.ping()
            except WorkerDied:
                return
            misses = 0
            continue
        misses += 1
        core.metrics.heartbeat_misses += 1
        log.warning(
            "worker %s missed a heartbeat (%d in a row)",
            core.name,
            misses,
            extra={"worker": core.name, "pid": core.pid, "misses": misses},
        )
        if misses >= options.heartbeat_max_misses:
            lost = f"worker {core.name} missed {misses} heartbeats in a row"
            core.fail_all(lambda: WorkerDied(lost))  # noqa: B023 (returns right after)
            return
