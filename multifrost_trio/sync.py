"""Blocking API: use a worker from plain scripts and threads, no ``async`` needed.

``with open_worker("w.py") as w: w.call("add", 1, 2)`` runs a trio event loop in a
background thread (an anyio blocking portal) and enters the async
:func:`multifrost_trio.open_worker` there; every blocking method hands its work to that loop
and waits for the answer. The options, the timeouts and the errors are the async API's
(:class:`~multifrost_trio.RemoteCallError`, :class:`~multifrost_trio.CallTimeout`,
:class:`~multifrost_trio.WorkerDied`, ...), raised as themselves. Any number of threads may
call one worker at once. Leaving the block stops the worker and joins the loop's thread.
``connect_worker`` does the same for a running worker (connect mode).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from typing import Any, Final

import trio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from . import _connect, _spawn
from ._errors import WorkerDied
from ._metrics import MetricsSnapshot
from ._parent import _UNSET, SpawnOptions, Worker
from ._security import CurveClient

__all__ = ["BlockingCallProxy", "BlockingWorker", "connect_worker", "open_worker"]

_THREAD_NAME_PREFIX: Final = "multifrost-trio-portal"
"""Name prefix of the thread that runs a blocking worker's event loop."""

_thread_numbers = itertools.count(1)


def _refuse_inside_event_loop() -> None:
    """Raise instead of deadlocking when called from a thread that runs an event loop.

    A blocking call there would stop the very loop it waits on (or, in the portal's own
    thread, wait for itself).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "multifrost_trio.sync cannot be used inside a running asyncio event loop; "
            "use the async API inside an event loop (async with multifrost_trio.open_worker)"
        )
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "multifrost_trio.sync cannot be used inside a running trio event loop; "
            "use the async API inside an event loop (async with multifrost_trio.open_worker)"
        )


class _Session:
    """The loop thread's portal, shared by every view of one blocking worker."""

    __slots__ = ("name", "portal", "running")

    def __init__(self, portal: BlockingPortal, name: str) -> None:
        self.portal = portal
        self.name = name
        self.running = True

    def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func(*args)`` (awaited if it is async) in the loop and wait for its result.

        If the waiting thread is interrupted (KeyboardInterrupt), the task in the loop is
        cancelled, which also cancels the remote handler.
        """
        _refuse_inside_event_loop()
        if not self.running:
            raise WorkerDied(f"worker {self.name} was stopped")
        try:
            future: Future[Any] = self.portal.start_task_soon(func, *args)
        except RuntimeError:  # the portal stopped between the check and the call
            raise WorkerDied(f"worker {self.name} was stopped") from None
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise


class BlockingCallProxy:
    """``w.call(name, *args)`` and ``w.call.name(*args)``, blocking until the result."""

    __slots__ = ("_session", "_worker")

    def __init__(self, session: _Session, worker: Worker) -> None:
        self._session = session
        self._worker = worker

    def __call__(self, function: str, *args: Any) -> Any:
        """Call ``function`` on the worker with ``args`` and return its result."""
        return self._session.run(self._worker.call, function, *args)

    def __getattr__(self, function: str) -> Callable[..., Any]:
        if function.startswith("__"):
            raise AttributeError(function)

        def call(*args: Any) -> Any:
            return self(function, *args)

        call.__name__ = function
        return call


class BlockingWorker:
    """A blocking handle on a running worker, yielded by :func:`open_worker`.

    Wraps the async :class:`~multifrost_trio.Worker`; methods are safe to call from any
    thread that does not run an event loop. Views made by :meth:`with_options` share the
    worker and its loop thread.
    """

    __slots__ = ("_session", "_worker")

    def __init__(self, session: _Session, worker: Worker) -> None:
        self._session = session
        self._worker = worker

    @property
    def call(self) -> BlockingCallProxy:
        """Call a function: ``w.call("add", 1, 2)`` or ``w.call.add(1, 2)``."""
        return BlockingCallProxy(self._session, self._worker)

    def with_options(
        self,
        *,
        timeout: float | None = _UNSET,
        namespace: str = _UNSET,
        client_name: str | None = _UNSET,
    ) -> BlockingWorker:
        """A new blocking view of the same worker with other call options.

        Same arguments as :meth:`multifrost_trio.Worker.with_options`; a call that outlives
        ``timeout`` raises :class:`~multifrost_trio.CallTimeout` on time and the worker is
        told to cancel its handler.
        """
        view = self._worker.with_options(
            timeout=timeout, namespace=namespace, client_name=client_name
        )
        return BlockingWorker(self._session, view)

    def list_functions(self) -> list[str]:
        """The function names the worker exposes."""
        result: list[str] = self._session.run(self._worker.list_functions)
        return result

    def metrics(self) -> MetricsSnapshot:
        """A frozen snapshot of this worker's counters and latencies.

        Taken in the loop's thread while it runs, so the counters are consistent.
        """
        if self._session.running:
            try:
                snapshot: MetricsSnapshot = self._session.run(self._worker.metrics)
                return snapshot
            except WorkerDied:
                pass  # stopped meanwhile: the loop is gone, nothing changes the counters
        return self._worker.metrics()

    @property
    def name(self) -> str:
        """The worker's display name (its script's file name)."""
        return self._worker.name

    @property
    def pid(self) -> int | None:
        """The child's process id in spawn mode, else None."""
        return self._worker.pid

    @property
    def timeout(self) -> float | None:
        """This view's per-call timeout in seconds (None: no timeout)."""
        return self._worker.timeout

    @property
    def namespace(self) -> str:
        """This view's namespace."""
        return self._worker.namespace

    @property
    def is_healthy(self) -> bool:
        """False once the worker died, was stopped or missed too many heartbeats."""
        return self._session.running and self._worker.is_healthy

    @property
    def last_heartbeat_rtt_ms(self) -> float | None:
        """Round trip of the last answered heartbeat, in milliseconds."""
        return self._worker.last_heartbeat_rtt_ms

    @property
    def pending_calls(self) -> int:
        """Calls sent and not yet answered (from all threads)."""
        return self._worker.pending_calls

    def __repr__(self) -> str:
        return f"<BlockingWorker {self.name!r} pid={self.pid} namespace={self.namespace!r}>"


@contextmanager
def _run_blocking(
    name: str, enter: Callable[[], AbstractAsyncContextManager[Worker]]
) -> Iterator[BlockingWorker]:
    """Start a trio loop thread, enter ``enter()`` in it, yield a blocking view, clean up.

    Shared by every way of getting a worker: ``enter`` makes the async context manager
    (called in this thread, entered in the loop's).
    """
    _refuse_inside_event_loop()
    thread_name = f"{_THREAD_NAME_PREFIX}-{name}-{next(_thread_numbers)}"
    # start_blocking_portal joins the thread on the way out; an exception escaping from
    # here (start error, KeyboardInterrupt while waiting) cancels what still runs there,
    # and the async context manager's own clean-up stops the worker.
    with start_blocking_portal("trio", name=thread_name) as portal:
        async_cm = portal.wrap_async_context_manager(enter())
        worker = async_cm.__enter__()
        session = _Session(portal, worker.name)
        try:
            yield BlockingWorker(session, worker)
        finally:
            session.running = False
            # The body's exception (if any) belongs to this thread: it is not thrown into
            # the loop's task, which would re-raise and alter it there. Stopping does not
            # depend on it.
            async_cm.__exit__(None, None, None)


def open_worker(
    script: str | os.PathLike[str],
    executable: str | None = None,
    *,
    options: SpawnOptions | None = None,
) -> AbstractContextManager[BlockingWorker]:
    """Start ``script`` as a worker process; a plain context manager yielding a
    :class:`BlockingWorker` once the worker answers.

    Arguments, defaults and errors are those of the async
    :func:`multifrost_trio.open_worker` (:class:`~multifrost_trio.WorkerStartError` if it
    cannot start). Leaving the block stops the worker, reaps the child and joins the loop's
    thread. Raises :class:`RuntimeError` when called inside a running event loop: use the
    async API there.
    """
    name = os.path.basename(os.fspath(script))
    return _run_blocking(name, lambda: _spawn.open_worker(script, executable, options=options))


def connect_worker(
    service_id: str | None = None,
    *,
    endpoint: str | None = None,
    timeout: float = 5.0,
    options: SpawnOptions | None = None,
    curve: CurveClient | None = None,
    registry_dir: str | os.PathLike[str] | None = None,
) -> AbstractContextManager[BlockingWorker]:
    """Connect to a running worker (by service name or ``endpoint``); a plain context
    manager yielding a :class:`BlockingWorker` once it answers.

    Arguments, defaults and errors are those of the async
    :func:`multifrost_trio.connect_worker`. Leaving the block disconnects (the worker keeps
    running) and joins the loop's thread.
    """
    name = service_id or endpoint or "worker"
    return _run_blocking(
        name,
        lambda: _connect.connect_worker(
            service_id,
            endpoint=endpoint,
            timeout=timeout,
            options=options,
            curve=curve,
            registry_dir=registry_dir,
        ),
    )
