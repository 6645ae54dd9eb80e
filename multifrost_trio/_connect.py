"""Connect mode: call a worker that is already running (found by name, or at an address)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import zmq
from zmq.utils.monitor import parse_monitor_message

from . import _registry
from ._errors import WorkerDied, WorkerStartError, reraise_single
from ._health import heartbeat_loop
from ._parent import SpawnOptions, Worker, WorkerCore, log
from ._security import CurveClient
from ._transport import Channel, new_socket


@asynccontextmanager
async def connect_worker(
    service_id: str | None = None,
    *,
    endpoint: str | None = None,
    timeout: float = 5.0,
    options: SpawnOptions | None = None,
    curve: CurveClient | None = None,
    registry_dir: str | os.PathLike[str] | None = None,
) -> AsyncIterator[Worker]:
    """Connect to a running worker and yield a :class:`Worker` once it answers a heartbeat.

    Give ``service_id`` to find it in the service registry (waiting up to ``timeout`` for
    it to appear), or ``endpoint`` (``"tcp://host:port"``) to dial it directly. Raises
    :class:`ServiceNotFound` if the name never appears and :class:`WorkerStartError` if
    nothing answers at the address within ``timeout``. Leaving the block disconnects; the
    worker keeps running (it is shared).
    """
    if (service_id is None) == (endpoint is None):
        raise ValueError("give exactly one of service_id and endpoint")
    options = options or SpawnOptions()
    deadline = anyio.current_time() + timeout
    pid = None
    if service_id is not None:
        directory = Path(registry_dir) if registry_dir is not None else None
        entry = await _registry.discover(service_id, timeout=timeout, directory=directory)
        endpoint = f"tcp://127.0.0.1:{entry.port}"
        pid = entry.pid
    assert endpoint is not None
    name = service_id or endpoint
    core = WorkerCore(name, options)
    core.pid = pid
    sock = new_socket(zmq.DEALER)
    try:
        if curve is not None:
            curve.apply(sock)
        sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    channel = Channel(sock, core.on_frames, batch_sends=True)
    core.attach(channel)
    # A service that goes away is noticed when its connection drops, not only after
    # heartbeat_max_misses heartbeats (18 s with the defaults).
    monitor = Channel(
        sock.get_monitor_socket(zmq.EVENT_DISCONNECTED), partial(_on_monitor, core, endpoint)
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(channel.run)
            tg.start_soon(monitor.run)
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    await core.ping()
            except (TimeoutError, WorkerDied):
                where = endpoint if name == endpoint else f"{name} at {endpoint}"
                raise WorkerStartError(
                    f"{where} did not answer within {timeout} s "
                    "(not running, a stale registry entry, or refused by its security)"
                ) from None
            log.info("connected to %s at %s", name, endpoint, extra=core.log_extra())
            tg.start_soon(heartbeat_loop, core)
            try:
                yield Worker._for(core)
            finally:
                core.fail_all(lambda: WorkerDied(f"the connection to {name} was closed"))
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        reraise_single(group)
    finally:
        sock.disable_monitor()
        monitor.close()
        channel.close()


def _on_monitor(core: WorkerCore, endpoint: str, frames: list[bytes]) -> None:
    """The connection to the service dropped: fail what is pending now (zmq reconnects by
    itself, and heartbeats tell when the service answers again)."""
    try:
        event = parse_monitor_message(frames)["event"]
    except Exception:
        return
    if event == zmq.EVENT_DISCONNECTED and not core.failed:
        log.warning("lost the connection to %s at %s", core.name, endpoint, extra=core.log_extra())
        core.set_healthy(False)
        if core.pending_count:
            core.breaker.failure()
        where = endpoint if core.name == endpoint else f"{core.name} at {endpoint}"
        lost = f"the connection to {where} was lost"
        core.fail_pending(lambda: WorkerDied(lost))
