"""The worker side: ``ChildWorker``, dispatch, sync-handler threads, output forwarding.

The child owns its process and runs trio directly. One nursery holds the reader, the output
pump, the parent-death watch and the pooled tasks that run async calls; heartbeats are echoed
by whoever reads the socket, so a busy handler never looks like a dead worker.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import inspect
import io
import itertools
import logging
import os
import queue
import select
import signal
import stat
import sys
import threading
import traceback
import types
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, TypeVar

import msgpack
import trio
import zmq

from . import _messages as m
from . import _registry
from ._errors import MultifrostError
from ._security import CurveServer
from ._transport import ROOM_RETRY_FIRST, ROOM_RETRY_LAST, Channel, TrioWaiter, new_socket

log = logging.getLogger("multifrost_trio.child")

PORT_ENV: Final = "COMLINK_ZMQ_PORT"
WORKER_MODE_ENV: Final = "COMLINK_WORKER_MODE"
PARENT_FD_ENV: Final = "MULTIFROST_TRIO_PARENT_FD"
"""Read end of a pipe whose write end only the parent holds: EOF means the parent died."""

_PPID_POLL_SECONDS: Final = 1.0
"""Parent-death check for parents that pass no pipe (other implementations)."""
IDLE_THREAD_SECONDS: Final = 30.0
"""A sync thread other than the first ends after waiting this long for a job: the threads
of a burst do not stay for good."""
_OUTPUT_BUFFER_LIMIT: Final = 8 * 1024 * 1024
"""Bytes of forwarded print() output kept while the parent is slow; older text is dropped."""
_OUTPUT_CHUNK: Final = 16 * 1024
"""Printed text merged into one message at most: the parent hands a message's lines to its
output sink in one go, so this bounds how long one message holds the parent's loop."""

_INLINE_ATTR: Final = "__multifrost_inline__"
F = TypeVar("F", bound=Callable[..., Any])
Kind = Literal["async", "inline", "thread"]


def inline(func: F) -> F:
    """Mark a sync worker method to run on the event loop instead of a worker thread.

    For tiny functions only (microseconds): the thread hand-off would cost more than the
    work. While an inline method runs, nothing else in the worker runs, heartbeats included;
    replies of inline calls read in the same burst just before it (from any parent) leave
    together after it.
    """
    setattr(func, _INLINE_ATTR, True)
    return func


@dataclass
class ChildCounters:
    """What a worker counts about itself (readable from handlers as ``self.counters``).

    A sync handler's outcome is counted when the loop books its call: at once when the loop
    sends the reply or calls wait for a slot, else (the handler's thread sent the reply) as
    the next message arrives, before it is handled, so that a sequential round trip costs
    the loop no wake-up beside its reply.
    """

    calls_started: int = 0
    calls_succeeded: int = 0
    calls_failed: int = 0
    calls_cancelled: int = 0
    messages_dropped: int = 0
    """Frames that were malformed, foreign, too large or for another namespace."""
    replies_undeliverable: int = 0
    """Replies whose parent had gone away."""
    abandoned_results: int = 0
    """Sync handlers that finished after their caller gave up; the result was dropped."""
    output_dropped_bytes: int = 0


class _SyncJob:
    __slots__ = ("abandoned", "call", "failed", "identity", "method", "payload", "sent")

    def __init__(self, identity: bytes, call: m.CallRequest, method: Callable[..., Any]) -> None:
        self.identity = identity
        self.call = call
        self.method = method
        self.abandoned = False
        self.failed = False
        self.payload = b""
        self.sent = False
        """The worker thread sent the reply itself, or is sending it (see ``_ThreadRunner``)."""


class _ThreadRunner:
    """Persistent worker threads for sync handlers.

    A job reaches a thread once the loop is about to wait (``put_submitted``); the thread
    runs the handler, encodes the reply and, when no finished job awaits the loop, sends it
    itself (``send``: no trip through the event loop before the reply leaves), unless the
    call was cancelled first (``abandon``). Finished jobs go back to the loop for
    bookkeeping (and the sends left to it) in batches. The loop is woken for them, through
    one ``run_sync_soon`` per batch, only when it must act: a send was left to it, or calls
    wait for a slot (``waiting_calls()``). Else they wait for the loop's next message
    (``book_finished``), and a sequential call's round trip costs no wake of the loop
    beside its reply. No task and no thread is created per call; a thread is added only
    when a job arrives and no idle thread is left for it (up to ``max_threads``), and a
    thread other than the first ends after ``idle_seconds`` without a job.

    One thread, the first, has a queue of its own and gets every job it is idle for; the
    others share a queue. A sequential caller's jobs then all run on one thread whose
    memory is warm, not on each idle thread in turn (a shared queue wakes its longest
    waiting thread first). Measured with paired blocks, once a burst had started 8
    threads: sequential sync calls 0.92-0.97x the time, 100 in flight unchanged.

    Idle threads are counted as the loop hands out jobs, not as threads take them: jobs
    arriving together must not count one idle thread, still waking, once for each.
    """

    def __init__(
        self,
        max_threads: int,
        send: Callable[[_SyncJob], bool],
        on_done: Callable[[_SyncJob], None],
        waiting_calls: Callable[[], int],
        idle_seconds: float = IDLE_THREAD_SECONDS,
    ) -> None:
        self._max_threads = max_threads
        self._idle_seconds = idle_seconds
        self._send = send
        self._on_done = on_done
        self._waiting_calls = waiting_calls
        self._jobs: queue.SimpleQueue[_SyncJob] = queue.SimpleQueue()
        self._first_jobs: queue.SimpleQueue[_SyncJob] = queue.SimpleQueue()
        """The first thread's own queue."""
        self._done: collections.deque[_SyncJob] = collections.deque()
        self._lock = threading.Lock()
        self._threads = 0
        self._first_running = False
        self._first_idle = False
        """The first thread waits on its own queue for a job that none is meant for yet."""
        self._idle = 0
        """Other threads waiting for a job that no queued job is meant for yet."""
        self._unassigned = 0
        """Queued jobs meant for whichever busy thread gets free first."""
        self._to_put: collections.deque[tuple[Callable[[_SyncJob], None], _SyncJob]] = (
            collections.deque()
        )
        """Submitted jobs not yet queued for the threads (see ``put_submitted``)."""
        self._delivery_scheduled = False
        self._token: trio.lowlevel.TrioToken | None = None

    def submit(self, job: _SyncJob) -> None:
        """Count ``job`` in (starting a thread if none is left for it); it reaches the
        threads at the next ``put_submitted``."""
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        spawn = first = False
        with self._lock:
            if self._first_idle:
                self._first_idle = False
                first = True
            elif self._idle:
                self._idle -= 1
            elif self._threads < self._max_threads:
                self._threads += 1
                spawn = True
                first = not self._first_running
                self._first_running |= first
            else:
                self._unassigned += 1
        if spawn:
            name = f"multifrost-sync-{next(_thread_numbers)}"
            threading.Thread(target=self._work, args=(first,), name=name, daemon=True).start()
        self._to_put.append(((self._first_jobs if first else self._jobs).put, job))

    def put_submitted(self) -> None:
        """Hand the jobs submitted since the last call to the threads.

        ``_ReadyWatch`` calls this right before the scheduler waits for I/O, which lets go
        of the GIL: a thread woken then runs at once, instead of waking while the loop ends
        its pass and waking again when the loop lets go. Measured with paired blocks:
        sequential sync calls 0.93-0.97x, 100 in flight 1.21-1.24x calls/s.
        """
        to_put = self._to_put
        while to_put:
            put, job = to_put.popleft()
            put(job)

    def _work(self, first: bool) -> None:
        done, lock = self._done, self._lock
        jobs = self._first_jobs if first else self._jobs
        idle_seconds = None if first else self._idle_seconds
        while True:
            try:
                job = jobs.get(timeout=idle_seconds)  # a thread starts for a job
            except queue.Empty:
                with lock:
                    if not self._idle:
                        continue  # every idle thread is promised a job: one is on its way
                    self._idle -= 1  # another idle thread takes this one's place
                    self._threads -= 1
                return
            if not job.abandoned:
                self._run(job)
                # While finished jobs wait for their booking (jobs finishing close together)
                # the loop sends the reply: under load it sends replies in batches, cheaper
                # than threads contending for the socket and the GIL.
                if not done and self._claim_send(job):
                    job.sent = self._send(job)
                # The job may wait long for its booking: it keeps neither the arguments nor
                # a reply already sent.
                job.call.args = []
                if job.sent:
                    job.payload = b""
            done.append(job)  # before asking for waiting calls: see ``_on_call``
            if (not job.sent or self._waiting_calls()) and not self._delivery_scheduled:
                self._delivery_scheduled = True
                token = self._token  # read once: ``stop_serving`` may clear it meanwhile
                try:
                    if token is None:
                        raise trio.RunFinishedError
                    token.run_sync_soon(self.book_finished)
                except trio.RunFinishedError:  # the worker stopped serving: so does the thread
                    with lock:
                        self._delivery_scheduled = False
                        self._threads -= 1
                        self._first_running &= not first
                    return
            with lock:
                if self._unassigned:
                    self._unassigned -= 1
                    jobs = self._jobs
                elif first:
                    self._first_idle = True
                    jobs = self._first_jobs
                else:
                    self._idle += 1

    def _claim_send(self, job: _SyncJob) -> bool:
        """Take the send of ``job``'s reply for its thread, unless the call was cancelled;
        a ``cancel`` read from now on comes too late (see ``abandon``)."""
        with self._lock:
            if job.abandoned:
                return False
            job.sent = True  # ``_work`` resets it if the send fails: the loop sends it then
            return True

    def abandon(self, job: _SyncJob) -> bool:
        """The call was cancelled: drop its reply, unless already sent or being sent.
        True if the job is now abandoned (count it as cancelled)."""
        with self._lock:
            if job.sent or job.abandoned:
                return False
            job.abandoned = True
            return True

    @staticmethod
    def _run(job: _SyncJob) -> None:
        """Run the handler and encode its reply; whatever it raises becomes an error reply
        (a thread that died here would leave its call unanswered and the pool one short)."""
        call = job.call
        _thread_caller.identity = job.identity
        try:
            job.payload = m.encode(m.make_response(call.id, job.method(*call.args)))
        except BaseException as exc:  # SystemExit too: it would end only this thread
            job.failed = True
            error = m.make_error(call.id, m.format_exception_text(exc, traceback.format_exc()))
            job.payload = m.encode(error)
        finally:
            _thread_caller.identity = None

    def stop_serving(self) -> None:
        """The worker stopped serving: book what finished, queue what was submitted, and
        take the next run's trio token when it starts (a worker may be served again)."""
        self.book_finished()
        self.put_submitted()
        self._token = None
        self._delivery_scheduled = False

    @property
    def finished(self) -> bool:
        """Finished jobs wait for their booking."""
        return bool(self._done)

    def book_finished(self) -> None:
        """Hand the finished jobs to ``on_done`` (on the loop's thread)."""
        self._delivery_scheduled = False
        done, on_done = self._done, self._on_done
        while done:
            on_done(done.popleft())


class _ReadyWatch(trio.abc.Instrument):
    """Before each wait of the trio scheduler for I/O: hands submitted sync jobs to the
    threads; if async calls wait in the ready queue with no task summoned for them (every
    runner is blocked in a handler), summons one, through ``run_sync_soon`` (rescheduling
    a task here would not end the wait)."""

    def __init__(self, worker: ChildWorker) -> None:
        self._worker = worker
        self._token = trio.lowlevel.current_trio_token()

    def before_io_wait(self, timeout: float) -> None:
        worker = self._worker
        if worker._threads._to_put:
            worker._threads.put_submitted()
        if worker._ready and not worker._summoned:
            self._token.run_sync_soon(worker._summon_if_stalled, idempotent=True)


Stream = Literal["stdout", "stderr"]
_Chunk = tuple[Stream, "bytes | None", str]
"""Printed text: stream, the caller it belongs to (None: no call), text."""

_caller: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "multifrost_caller", default=None
)
"""The parent whose call is running in this task (async and inline handlers)."""
_thread_numbers = itertools.count(1)
"""Numbers the sync threads' names, for tracebacks and debuggers."""
_thread_caller = threading.local()
"""The same for a sync handler's worker thread (``identity`` attribute)."""


def _current_caller() -> bytes | None:
    identity: bytes | None = getattr(_thread_caller, "identity", None)
    return identity if identity is not None else _caller.get()


class _OutputForwarder(io.TextIOBase):
    """Replaces ``sys.stdout``/``sys.stderr``: printed text goes to the parent whose call
    printed it, as ``stdout``/``stderr`` messages.

    Thread-safe; ``write`` never blocks (text is buffered and the loop is nudged). Lines are
    kept whole per caller (print() writes text and newline apart).
    """

    def __init__(self, stream: Stream, pump: _OutputPump, original: Any) -> None:
        super().__init__()
        self.stream: Stream = stream
        self._pump = pump
        self._original = original
        self._partial: dict[bytes | None, str] = {}
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not text:
            return 0
        caller = _current_caller()
        with self._lock:
            buffered = self._partial.pop(caller, "") + text
            cut = buffered.rfind("\n") + 1
            if cut < len(buffered):
                self._partial[caller] = buffered[cut:]
        if cut:
            self._pump.push(self.stream, caller, buffered[:cut])
        return len(text)

    def flush(self) -> None:
        with self._lock:
            rests, self._partial = self._partial, {}
        for caller, rest in rests.items():
            self._pump.push(self.stream, caller, rest)

    def fileno(self) -> int:
        return int(self._original.fileno())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


class _QueuedReply:
    """A reply that waits in the output pump's queue, behind printed text for the same
    parent or for room at its parent; ``sent`` is set once it left."""

    __slots__ = ("identity", "payload", "sent")

    def __init__(self, identity: bytes, payload: bytes) -> None:
        self.identity = identity
        self.payload = payload
        self.sent = trio.Event()


class _OutputPump:
    """Sends printed text (collected from any thread) from the trio thread, and with it
    the replies that could not go at once: a call's printed lines always reach its parent
    before its result. Order is kept per parent; a parent that does not read holds back
    only what is for it."""

    def __init__(self, worker: ChildWorker, originals: dict[Stream, Any]) -> None:
        self._worker = worker
        self._originals = originals
        self._lock = threading.Lock()
        self._pending: list[_Chunk | _QueuedReply] = []
        self._pending_bytes = 0
        self._queued_for: collections.Counter[bytes | None] = collections.Counter()
        """Pending items per parent (None: printed outside any call)."""
        self._passing = False
        self._wakeup = trio.Event()
        self._token = trio.lowlevel.current_trio_token()

    def push(self, stream: Stream, caller: bytes | None, text: str) -> None:
        with self._lock:
            self._pending.append((stream, caller, text))
            self._pending_bytes += len(text)
            self._queued_for[caller] += 1
            if self._pending_bytes > _OUTPUT_BUFFER_LIMIT:
                self._drop_oldest_text()
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._wake, idempotent=True)

    def _drop_oldest_text(self) -> None:
        """Drop the oldest printed text until the rest fits (never a reply, never the
        newest text); called with the lock held."""
        pending = self._pending
        index = 0
        while self._pending_bytes > _OUTPUT_BUFFER_LIMIT and index < len(pending) - 1:
            item = pending[index]
            if isinstance(item, _QueuedReply):
                index += 1
                continue
            del pending[index]
            self._pending_bytes -= len(item[2])
            self._queued_for[item[1]] -= 1
            self._worker.counters.output_dropped_bytes += len(item[2])

    def queue_reply(self, identity: bytes, payload: bytes, *, urgent: bool) -> _QueuedReply:
        """Queue a reply (trio thread only): behind what waits for its parent, or, when
        ``urgent`` (nothing was printed for it: heartbeat echoes, errors), before."""
        reply = _QueuedReply(identity, payload)
        with self._lock:
            if urgent:
                self._pending.insert(0, reply)
            else:
                self._pending.append(reply)
            self._queued_for[identity] += 1
        self._wakeup.set()
        return reply

    def _wake(self) -> None:
        self._wakeup.set()

    @property
    def idle(self) -> bool:
        """Nothing is waiting or being sent (read from any thread)."""
        return not self._pending and not self._passing

    def holds(self, identity: bytes) -> bool:
        """Something for this parent waits to go (a reply to it must go behind)."""
        queued = self._queued_for
        return (
            self._passing
            or queued[identity] > 0
            or (queued[None] > 0 and not self._worker.connect_mode)
        )

    def _take(self) -> list[_Chunk | _QueuedReply]:
        """Everything pending; consecutive text of one stream and caller merged into
        messages of up to ``_OUTPUT_CHUNK`` characters."""
        with self._lock:
            batch, self._pending = self._pending, []
            self._pending_bytes = 0
            self._queued_for.clear()
        merged: list[_Chunk | _QueuedReply] = []
        key: tuple[Stream, bytes | None] | None = None
        texts: list[str] = []
        size = 0
        for item in batch:
            if not isinstance(item, _QueuedReply) and item[:2] == key and size < _OUTPUT_CHUNK:
                texts.append(item[2])
                size += len(item[2])
                continue
            if key is not None:
                merged.append((*key, "".join(texts)))
                key = None
            if isinstance(item, _QueuedReply):
                merged.append(item)
            else:
                key, texts, size = item[:2], [item[2]], len(item[2])
        if key is not None:
            merged.append((*key, "".join(texts)))
        return merged

    def _targets(self, stream: Stream, caller: bytes | None, text: str) -> list[bytes]:
        """Who gets this text: its caller; text printed outside any call goes to the parent
        in spawn mode, and stays local in connect mode (it belongs to no caller there)."""
        if caller is not None:
            return [caller]
        if self._worker.connect_mode:
            with contextlib.suppress(OSError, ValueError):  # a closed stdout loses the text
                self._originals[stream].write(text)
                self._originals[stream].flush()
            return []
        return list(self._worker._parents)

    def flush_now(self) -> None:
        """Send what is pending and has room, without waiting (before a reply, so a call's
        printed lines reach the parent before its result); the rest waits for ``run``."""
        if self._pending and not self._passing:
            self._send_pass()

    def _send_pass(self) -> tuple[bool, bool]:
        """One pass over everything pending: what a parent has room for goes, in order per
        parent; the rest goes back to the front. Returns (anything sent, anything left)."""
        worker = self._worker
        sent = False
        left: list[_Chunk | _QueuedReply] = []
        blocked: set[bytes] = set()
        self._passing = True
        try:
            for item in self._take():
                if isinstance(item, _QueuedReply):
                    if item.identity not in blocked and worker._try_send_to(
                        item.identity, item.payload, reply=True
                    ):
                        item.sent.set()
                        sent = True
                    else:
                        blocked.add(item.identity)
                        left.append(item)
                    continue
                stream, caller, text = item
                payload = b""
                for target in self._targets(stream, caller, text):
                    if target not in blocked:
                        payload = payload or m.encode(m.make_output(stream, text))
                        if worker._try_send_to(target, payload, reply=False):
                            sent = True
                            continue
                        blocked.add(target)
                    left.append((stream, target, text))
        finally:
            self._passing = False
        if left:
            with self._lock:
                self._pending[:0] = left
                for entry in left:
                    if isinstance(entry, _QueuedReply):
                        self._queued_for[entry.identity] += 1
                    else:
                        self._pending_bytes += len(entry[2])
                        self._queued_for[entry[1]] += 1
        return sent, bool(left)

    async def run(self) -> None:
        channel = self._worker._channel
        assert channel is not None
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            pause = ROOM_RETRY_FIRST
            while True:
                sent, left = self._send_pass()
                if not left:
                    break
                if sent:
                    pause = ROOM_RETRY_FIRST
                await channel.wait_room(pause)
                pause = min(pause * 2, ROOM_RETRY_LAST)


class ChildWorker:
    """Subclass this in a worker script; its public methods become callable by parents.

    Callable: methods defined on the subclass (sync or async) whose names do not start
    with ``_``, plus ``list_functions``. Async methods run as trio tasks and are cancelled
    when their caller gives up; sync methods run on worker threads unless marked with
    :func:`inline`. Start it with ``MyWorker().run()`` (blocking) or
    ``await MyWorker().serve()`` inside a trio program.

    Spawn mode (the default) serves the parent that started this process. Connect mode,
    chosen by ``service_id`` and/or ``bind``: the worker binds (``bind``, default
    ``tcp://127.0.0.1:0``, an ephemeral loopback port), registers ``service_id`` in the
    service registry (``registry_dir`` overrides its location), serves any number of
    parents, and unregisters on exit. ``curve`` turns on CURVE encryption and a client
    allow-list. ``allow_remote_shutdown``: whether a ``shutdown`` message stops the worker
    (default: yes in spawn mode, no in connect mode, where callers share it).
    """

    namespace: str = m.DEFAULT_NAMESPACE
    """Calls for another namespace are ignored (override per class or in ``__init__``)."""
    max_concurrency: int = 1000
    """Async and threaded calls in progress at once; further ones wait in arrival order.
    Inline calls count for none, nor does an async call whose handler returns without
    awaiting when it starts in the read that took it (see the README); heartbeats never
    wait."""
    sync_threads: int = 8
    """Most worker threads used for sync handlers at once."""

    _functions_cache: ClassVar[dict[str, Kind] | None] = None

    def __init__(
        self,
        *,
        namespace: str | None = None,
        max_concurrency: int | None = None,
        sync_threads: int | None = None,
        service_id: str | None = None,
        bind: str | None = None,
        registry_dir: str | os.PathLike[str] | None = None,
        curve: CurveServer | None = None,
        allow_remote_shutdown: bool | None = None,
    ) -> None:
        if namespace is not None:
            self.namespace = namespace
        if max_concurrency is not None:
            self.max_concurrency = max_concurrency
        if sync_threads is not None:
            self.sync_threads = sync_threads
        if self.max_concurrency < 1 or self.sync_threads < 1:
            raise ValueError("max_concurrency and sync_threads must be at least 1")
        self.service_id = service_id
        self.bind = bind
        self.registry_dir = Path(registry_dir) if registry_dir is not None else None
        self.curve = curve
        self.connect_mode = service_id is not None or bind is not None
        self.allow_remote_shutdown = (
            not self.connect_mode if allow_remote_shutdown is None else allow_remote_shutdown
        )
        self.endpoint: str | None = None
        """The address this worker serves on, once serving (connect mode: what it bound)."""
        self.counters = ChildCounters()
        self._functions = type(self)._callable_functions()
        self._channel: Channel | None = None
        self._parents: dict[bytes, None] = {}
        self._running: dict[str, trio.CancelScope] = {}
        self._sync_jobs: dict[str, _SyncJob] = {}
        self._idle_tasks: dict[TrioWaiter, trio.CancelScope] = {}
        """Idle pooled tasks: the waiter each waits on, and its cancel scope."""
        self._ready: collections.deque[tuple[bytes, m.CallRequest]] = collections.deque()
        """Admitted async calls waiting for a pooled task to take them."""
        self._runners = 0
        """Pooled tasks taking calls from ``_ready`` (running one, or about to take one)."""
        self._summoned = 0
        """Idle or new pooled tasks asked to take calls that have not started yet."""
        self._backlog: collections.deque[tuple[bytes, m.CallRequest]] = collections.deque()
        self._active = 0
        self._held_replies: collections.deque[tuple[bytes, bytes]] = collections.deque()
        """Inline replies waiting for the end of the drain that read their calls."""
        self._replied_in_drain = False
        self._nursery: trio.Nursery | None = None
        self._threads = _ThreadRunner(
            self.sync_threads, self._send_from_thread, self._sync_done, self._backlog.__len__
        )
        self._exit_scope: trio.CancelScope | None = None
        self._output: _OutputPump | None = None

    # ------------------------------------------------------------------ public surface

    def list_functions(self) -> list[str]:
        """The names parents may call on this worker."""
        return sorted(self._functions)

    def run(self) -> None:
        """Serve until ``shutdown`` (when honoured), the parent's death (spawn mode), or
        SIGTERM/SIGINT (blocking).

        A start-up problem (a bad ``COMLINK_ZMQ_PORT``, a service name owned by a live
        process, an unusable key file or address) prints one clear line to stderr and
        exits with status 1.
        """
        try:
            trio.run(self.serve)
        except (ValueError, MultifrostError, zmq.ZMQError) as exc:
            print(f"multifrost_trio worker: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve inside the current trio run (see :meth:`run`).

        With ``await nursery.start(worker.serve)`` the start returns :attr:`endpoint` once
        the worker is bound (and registered) or connected to its parent.
        """
        if self.connect_mode:
            await self._serve_bound(task_status)
        else:
            port = _port_from_env()
            sock = new_socket(zmq.ROUTER)
            self.endpoint = f"tcp://127.0.0.1:{port}"
            sock.connect(self.endpoint)
            await self._serve_socket(sock, task_status, spawned=True)

    # ------------------------------------------------------------------ serving

    @classmethod
    def _callable_functions(cls) -> dict[str, Kind]:
        cached = cls.__dict__.get("_functions_cache")
        if cached is not None:
            return dict(cached)
        found: dict[str, Kind] = {"list_functions": "inline"}
        for klass in reversed(cls.__mro__):
            if klass is ChildWorker or not issubclass(klass, ChildWorker):
                continue
            for name, attr in vars(klass).items():
                if name.startswith("_") or name in _BASE_NAMES:
                    continue
                if name in _RESERVED_NAMES:
                    raise TypeError(
                        f"{klass.__name__}.{name}: {name!r} is an attribute of every "
                        "ChildWorker and cannot be a worker function"
                    )
                func = attr.__func__ if isinstance(attr, staticmethod | classmethod) else attr
                if not callable(func) or isinstance(func, type):
                    continue
                if inspect.iscoroutinefunction(func):
                    found[name] = "async"
                elif getattr(func, _INLINE_ATTR, False):
                    found[name] = "inline"
                else:
                    found[name] = "thread"
        cls._functions_cache = found
        return dict(found)

    async def _serve_bound(self, task_status: trio.TaskStatus[str]) -> None:
        """Connect mode: bind, register, serve, and always unregister."""
        sock = new_socket(zmq.ROUTER)
        authenticator = None
        try:
            if self.curve is not None:
                authenticator = self.curve.apply(sock)
            sock.bind(self.bind or "tcp://127.0.0.1:0")
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if self.service_id is not None:
                port = int(self.endpoint.rsplit(":", 1)[1])
                await _registry.aregister(self.service_id, port, directory=self.registry_dir)
        except BaseException:
            sock.close(linger=0)
            if authenticator is not None:
                authenticator.stop()
            raise
        try:
            log.info(
                "worker serving on %s",
                self.endpoint,
                extra={"service_id": self.service_id, "pid": os.getpid()},
            )
            await self._serve_socket(sock, task_status, spawned=False)
        finally:
            with trio.CancelScope(shield=True):
                if self.service_id is not None:
                    await _registry.aunregister(self.service_id, directory=self.registry_dir)
            if authenticator is not None:
                authenticator.stop()

    async def _serve_socket(
        self, sock: zmq.Socket[bytes], task_status: trio.TaskStatus[str], *, spawned: bool
    ) -> None:
        channel = Channel(sock, self._on_frames, self._end_of_drain)
        self._channel = channel
        original_streams = sys.stdout, sys.stderr
        watch = _ReadyWatch(self)
        trio.lowlevel.add_instrument(watch)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._exit_scope = nursery.cancel_scope
                pump = self._output = _OutputPump(
                    self, {"stdout": original_streams[0], "stderr": original_streams[1]}
                )
                sys.stdout = _OutputForwarder("stdout", pump, original_streams[0])
                sys.stderr = _OutputForwarder("stderr", pump, original_streams[1])
                nursery.start_soon(pump.run)
                nursery.start_soon(channel.run)
                if threading.current_thread() is threading.main_thread():
                    nursery.start_soon(self._watch_signals)
                if spawned or os.environ.get(WORKER_MODE_ENV) == "1":
                    nursery.start_soon(self._watch_parent)
                task_status.started(self.endpoint or "")
        finally:
            self._nursery = None  # the last flush may read a call: it must start no task
            for forwarder in (sys.stdout, sys.stderr):
                if isinstance(forwarder, _OutputForwarder):
                    forwarder.flush()
            if self._output is not None:
                self._output.flush_now()
            sys.stdout, sys.stderr = original_streams
            self._output = None
            trio.lowlevel.remove_instrument(watch)
            self._threads.stop_serving()  # queues what the last flush read
            channel.close()

    def _stop(self) -> None:
        if self._exit_scope is not None:
            self._exit_scope.cancel()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.debug("worker stopping on signal", extra={"signal": signum})
                self._stop()
                return

    async def _watch_parent(self) -> None:
        fd = _parent_pipe()
        if fd is not None:
            os.set_blocking(fd, False)
            try:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    if not os.read(fd, 4096):
                        break
            except BlockingIOError:
                pass
            except OSError:
                fd = None
        if fd is None:
            parent = os.getppid()
            while os.getppid() == parent:
                await trio.sleep(_PPID_POLL_SECONDS)
        log.debug("parent process is gone; worker exiting")
        self._stop()

    # ------------------------------------------------------------------ receiving

    def _on_frames(self, frames: list[bytes]) -> None:
        if self._threads.finished:  # a message may cancel, count or wait for their slots
            self._threads.book_finished()
        if len(frames) < 3:
            self.counters.messages_dropped += 1
            return
        identity = frames[0]
        try:
            raw = m.unpack(frames[-1])
            call = m.CallRequest.from_raw(raw) if raw["type"] == "call" else None
            message = m.validate(raw) if call is None else None
        except m.DecodeError as exc:
            self.counters.messages_dropped += 1
            log.debug("dropped a message: %s", exc)
            if exc.call_id is not None and exc.namespace == self.namespace:
                self._note_parent(identity)
                error = m.make_error(exc.call_id, f"ValueError: {exc}\n")
                self._reply_now(identity, error, urgent=True)
            return
        except Exception:  # a decoder bug must not take the worker down
            self.counters.messages_dropped += 1
            log.exception("could not decode a message")
            return
        if call is not None:
            self._note_parent(identity)
            self._on_call(identity, call)
            return
        if message is None:
            return
        self._note_parent(identity)
        kind = message.type
        if kind == "call":
            self._on_call(identity, m.CallRequest.from_message(message))  # type: ignore[arg-type]
        elif kind == "heartbeat":
            meta = message.metadata or {}
            if not meta.get("hb_response"):
                echo = m.make_heartbeat_echo(message)  # type: ignore[arg-type]
                self._reply_now(identity, echo, urgent=True)
        elif kind == "cancel":
            scope = self._running.get(message.id)
            if scope is not None:
                scope.cancel()
            job = self._sync_jobs.get(message.id)
            if job is not None and self._threads.abandon(job):
                self.counters.calls_cancelled += 1
        elif kind == "shutdown":
            if self.allow_remote_shutdown:
                log.debug("shutdown requested")
                self._stop()
            else:
                self.counters.messages_dropped += 1
                log.info("ignored a shutdown request: this worker is shared")

    def _end_of_drain(self) -> None:
        """End of a drain: send the inline replies held back during it, in order.

        The first inline reply of a drain goes at once (a lone call waits for nothing); the
        others wait for the drain's end and leave in one burst, which wakes zmq's I/O thread
        and the parent less often than one send between each two receives. The drain is the
        worker's, not a parent's: with several parents, one's burst may hold back another's
        reply for up to a drain's time slice plus the handlers run in it. A reply is also
        held while earlier ones still are (a send here may drain the socket again).
        """
        self._replied_in_drain = False
        held = self._held_replies
        while held:
            identity, payload = held.popleft()
            self._send_reply(identity, payload)

    def _note_parent(self, identity: bytes) -> None:
        """Spawn mode: remember the parent, so output printed outside any call reaches it."""
        if not self.connect_mode:
            self._parents[identity] = None

    def _on_call(self, identity: bytes, call: m.CallRequest) -> None:
        if call.namespace != self.namespace:
            self.counters.messages_dropped += 1
            return
        self.counters.calls_started += 1
        name = call.function
        kind = self._functions.get(name) if name is not None else None
        if kind is None:
            self.counters.calls_failed += 1
            self._reply_now(identity, m.make_error(call.id, _lookup_error(name)), urgent=True)
        elif kind == "inline":
            token = _caller.set(identity)
            try:
                reply = self._run_inline(call, name)  # type: ignore[arg-type]
            finally:
                _caller.reset(token)
            self._answer_in_drain(identity, reply)
        elif self._active >= self.max_concurrency:
            self._backlog.append((identity, call))
            # A thread that finished just before the append saw no call waiting (it asks
            # after queueing its job) and did not wake the loop: its slot is freed here.
            if self._threads.finished:
                self._threads.book_finished()
        elif (
            kind == "thread" or self._ready or self._backlog or not self._start_here(identity, call)
        ):
            self._dispatch(identity, call, kind)

    def _dispatch(self, identity: bytes, call: m.CallRequest, kind: Kind) -> None:
        """Start a thread job, or queue an async call for a pooled task; the caller has
        checked capacity."""
        if self._channel is None or self._channel.closed:
            return  # a call left in the backlog after the worker stopped: none can reply
        self._active += 1
        if kind == "thread":
            job = _SyncJob(identity, call, getattr(self, call.function or ""))
            self._sync_jobs[call.id] = job
            self._threads.submit(job)
        else:
            self._ready.append((identity, call))
            if not self._runners and not self._summoned:
                self._summon_runner()

    def _start_here(self, identity: bytes, call: m.CallRequest) -> bool:
        """Run an async call's first step at once when this task is the idle pooled task
        reading the socket (the usual case for a caller that waits for each reply).

        A handler that returns without awaiting is answered right here, like an inline
        one, with no task switch and no trip out of the drain. One that awaits was
        started in the right task: its task takes it over from ``_wait_idle`` and
        resumes it where it stopped. False when the drain is not such a task's own; the
        caller then queues the call. Only a call that awaits takes a ``max_concurrency``
        slot; one answered here is done before anything could ask for its slot.
        """
        channel = self._channel
        if channel is None or not channel.leader_draining:
            return False
        # The leader is an idle task's waiter, unless it was summoned earlier in this drain.
        leader: TrioWaiter = channel.leader  # type: ignore[assignment]
        if (scope := self._idle_tasks.get(leader)) is None:
            return False
        _caller.set(identity)  # this task is the pooled task that runs the call
        returned: list[Any] = []
        try:
            steps = _first_step(getattr(self, call.function or "")(*call.args), returned)
            for trap in steps:  # one step: a return ends the loop (without StopIteration)
                # Nothing may run in this task before it hands ``trap`` to trio: code that
                # reschedules it (an inline handler setting what it waits for) or delivers
                # a cancel would find trio's record of its wait not yet made.
                channel.stop_draining()
                self._active += 1
                self._running[call.id] = scope
                del self._idle_tasks[leader]
                leader.value = _Started(identity, call, steps, trap, returned)
                self._summoned += 1
                channel.wake(leader)
                return True
            reply = self._reply_to_returned(call.id, returned[0])
        except Exception as exc:
            reply = self._reply_to_raised(call.id, exc)
        _caller.set(None)  # the task is idle again: later output of it is nobody's
        self._answer_in_drain(identity, reply)
        return True

    def _summon_runner(self) -> None:
        """Get a pooled task to take calls from ``_ready``: the idle task reading the
        socket if there is one (it goes on without a task switch), another idle one, or a
        new one."""
        self._summoned += 1
        if self._idle_tasks and self._channel is not None:
            idle, leader = self._idle_tasks, self._channel.leader
            waiter = (
                leader
                if isinstance(leader, TrioWaiter) and leader in idle
                else next(reversed(idle))
            )
            del idle[waiter]
            self._channel.wake(waiter)
        elif self._nursery is not None:
            self._nursery.start_soon(self._async_loop)

    def _summon_if_stalled(self) -> None:
        """Calls wait in ``_ready`` while every runner is blocked in a handler: one more
        task takes them (asked for by ``_ReadyWatch`` before the scheduler waits)."""
        if self._ready and not self._summoned:
            self._summon_runner()

    def _release(self) -> None:
        """A handler finished: start the oldest waiting call, if any."""
        self._active -= 1
        backlog = self._backlog
        while backlog and self._active < self.max_concurrency:
            identity, call = backlog.popleft()
            self._dispatch(identity, call, self._functions.get(call.function or "", "thread"))

    def _answer_in_drain(self, identity: bytes, reply: m.WireMap) -> None:
        """Answer a call handled within the drain that read it: the first reply of a drain
        goes at once, later ones wait for its end (see ``_end_of_drain``)."""
        payload = m.encode(reply)
        if self._replied_in_drain or self._held_replies:
            self._held_replies.append((identity, payload))
        else:
            self._replied_in_drain = True
            self._send_reply(identity, payload)

    def _run_inline(self, call: m.CallRequest, name: str) -> m.WireMap:
        try:
            return self._reply_to_returned(call.id, getattr(self, name)(*call.args))
        except Exception as exc:
            return self._reply_to_raised(call.id, exc)

    def _reply_to_returned(self, call_id: str, result: Any) -> m.WireMap:
        """The reply to a handler that returned (raises EncodeError for a result that
        cannot be sent)."""
        reply = m.make_response(call_id, result)
        self.counters.calls_succeeded += 1
        return reply

    def _reply_to_raised(self, call_id: str, exc: Exception) -> m.WireMap:
        """The reply to a handler that raised ``exc`` (call while handling it)."""
        self.counters.calls_failed += 1
        return m.make_error(call_id, m.format_exception_text(exc, traceback.format_exc()))

    def _send_from_thread(self, job: _SyncJob) -> bool:
        """A worker thread's reply goes out directly unless the loop must send it: the reply
        is oversized, or printed output waits to go before it."""
        channel, output = self._channel, self._output
        if channel is None or len(job.payload) > m.MAX_MESSAGE_BYTES:
            return False
        if output is not None and not output.idle:
            return False
        return channel.send_from_thread([job.identity, b"", job.payload])

    def _sync_done(self, job: _SyncJob) -> None:
        """A thread finished ``job`` (called on the trio thread, in batches)."""
        self._sync_jobs.pop(job.call.id, None)
        if job.abandoned and not job.sent:
            self.counters.abandoned_results += 1
        else:
            if job.failed:
                self.counters.calls_failed += 1
            else:
                self.counters.calls_succeeded += 1
            if not job.sent:
                self._send_reply(job.identity, job.payload)
        self._release()

    async def _async_loop(self) -> None:
        """A pooled handler task: take calls from ``_ready`` until none is left, then wait
        idle until summoned again.

        Calls that arrive together run one after another in the task that takes them, in
        one task step when their handlers do not block; when one blocks, ``_ReadyWatch``
        sees calls waiting before the scheduler waits and summons another task for them.
        Waking a waiting task is far cheaper than starting one per call, and an idle task
        that reads the socket itself (``Channel.wait_for``) runs the first step of a call
        it reads right away, without any task switch (``_start_here``). One cancel scope
        serves call after call until a ``cancel`` message uses it up: entering a trio
        cancel scope costs more (about 13 us) than a short handler.
        """
        ready = self._ready
        self._summoned -= 1
        started: _Started | None = None
        while True:
            with trio.CancelScope() as scope:
                while True:
                    self._runners += 1
                    try:
                        if started is not None:  # first, with no checkpoint before it
                            first, started = started, None
                            await self._run_async(first.identity, first.call, scope, first)
                            self._release()
                        while ready and not scope.cancel_called:
                            identity, call = ready.popleft()
                            await self._run_async(identity, call, scope)
                            self._release()
                    finally:
                        self._runners -= 1
                    if scope.cancel_called:  # came too late to stop its handler: renew
                        break
                    started = await self._wait_idle(scope)
            if scope.cancelled_caught:
                self.counters.calls_cancelled += 1
                self._release()

    async def _wait_idle(self, scope: trio.CancelScope) -> _Started | None:
        """Wait until summoned (see ``_summon_runner``); returns the call whose first step
        ran in this task meanwhile, if one did (see ``_start_here``)."""
        channel = self._channel
        assert channel is not None
        waiter = TrioWaiter()
        idle = self._idle_tasks
        idle[waiter] = scope
        try:
            checkpointed = await channel.wait_for(waiter, checkpoint=False)
        except BaseException:
            if isinstance(waiter.value, _Started):  # the worker is going down: end it
                with contextlib.suppress(RuntimeError):
                    waiter.value.steps.close()
            raise
        finally:
            if not waiter.done:
                del idle[waiter]
        self._summoned -= 1
        started: _Started | None = waiter.value
        if started is None and not checkpointed:
            await trio.lowlevel.checkpoint()
        return started

    async def _run_async(
        self,
        identity: bytes,
        call: m.CallRequest,
        scope: trio.CancelScope,
        started: _Started | None = None,
    ) -> None:
        """Run one call in ``scope`` (a ``cancel`` message for it cancels the scope), or
        finish one whose first step already ran in this task."""
        self._running[call.id] = scope
        try:
            if started is None:
                _caller.set(identity)  # this pooled task runs one call at a time
                result = await getattr(self, call.function or "")(*call.args)
            else:
                await _resume(started.steps, started.trap)
                result = started.returned[0]
            reply = self._reply_to_returned(call.id, result)
        except Exception as exc:
            reply = self._reply_to_raised(call.id, exc)
        finally:
            self._running.pop(call.id, None)
            _caller.set(None)
        queued = self._send_reply(identity, m.encode(reply))
        if queued is not None:
            await queued.sent.wait()  # backpressure: the slot stays taken until it left

    # ------------------------------------------------------------------ sending

    def _reply_now(self, identity: bytes, message: m.WireMap, *, urgent: bool = False) -> None:
        """Send from a sync context (queued if it cannot go at once). ``urgent``: nothing
        was printed for it, so it may pass printed text waiting for the same parent."""
        self._send_reply(identity, m.encode(message), urgent=urgent)

    def _send_reply(
        self, identity: bytes, payload: bytes, *, urgent: bool = False
    ) -> _QueuedReply | None:
        """Send a reply now unless printed text for its parent waits to go first or the
        parent has no room; then it is queued and the returned entry says when it left."""
        if len(payload) > m.MAX_MESSAGE_BYTES:
            payload = _oversized_reply(payload)
        output = self._output
        if output is not None and not urgent and not output.idle:
            output.flush_now()
            if output.holds(identity):
                return output.queue_reply(identity, payload, urgent=False)
        if self._try_send_to(identity, payload, reply=True) or output is None:
            return None
        return output.queue_reply(identity, payload, urgent=urgent)

    def _try_send_to(self, identity: bytes, payload: bytes, *, reply: bool) -> bool:
        """Send without waiting; False if that parent had no room. A parent that is gone
        is forgotten (and a reply to it counted)."""
        channel = self._channel
        if channel is None or channel.closed:
            return True
        try:
            return channel.try_send([identity, b"", payload])
        except zmq.ZMQError:
            if reply:
                self.counters.replies_undeliverable += 1
            self._parents.pop(identity, None)
            return True


@dataclass(slots=True)
class _Started:
    """An async call whose first step ran in the drain that read it, and awaits: the task
    that ran it resumes it (``_resume``) with ``trap``, what the step handed to trio."""

    identity: bytes
    call: m.CallRequest
    steps: Generator[Any, Any, None]
    trap: Any
    returned: list[Any]
    """Receives the handler's result when it returns."""


@types.coroutine
def _first_step(awaitable: Any, returned: list[Any]) -> Generator[Any, Any, None]:
    """Step an async handler's result (a coroutine, or another awaitable from a function
    marked as a coroutine function) and put its result in ``returned``.

    Iterated with ``for``, a handler that returns at once ends the loop with no exception
    made (``send`` would raise StopIteration: about 40 % of a step's cost); one that awaits
    hands over its trap, and this generator is then resumed like the handler.
    """
    steps: Any = awaitable if type(awaitable) is types.CoroutineType else awaitable.__await__()
    returned.append((yield from steps))


@types.coroutine
def _resume(
    steps: Coroutine[Any, Any, Any] | Generator[Any, Any, Any], trap: Any
) -> Generator[Any, Any, Any]:
    """Finish a handler whose first step already ran in this task, as ``await`` would:
    hand trio the step's ``trap``, then pass what trio sends or throws back to the handler,
    until it returns."""
    while True:
        sent: Any = None
        thrown: BaseException | None = None
        try:
            sent = yield trap
        except GeneratorExit:
            steps.close()
            raise
        except BaseException as exc:
            thrown = exc  # thrown in below, once this handler no longer shows as active
        try:
            trap = steps.send(sent) if thrown is None else steps.throw(thrown)
        except StopIteration as done:
            return done.value


_RESERVED_NAMES: Final = frozenset(
    {
        "counters",
        "service_id",
        "bind",
        "registry_dir",
        "curve",
        "connect_mode",
        "allow_remote_shutdown",
        "endpoint",
    }
)
"""Instance attributes of every ChildWorker: a method of that name could never be called."""
_BASE_NAMES: Final = frozenset(name for name in vars(ChildWorker) if not name.startswith("_")) - {
    "list_functions"
}


def _oversized_reply(payload: bytes) -> bytes:
    """A reply the parent would drop for its size becomes an error reply it can read."""
    try:
        call_id = msgpack.unpackb(payload, raw=False).get("id", "")
    except Exception:
        return payload
    text = f"ValueError: reply of {len(payload)} bytes exceeds {m.MAX_MESSAGE_BYTES}\n"
    return m.encode(m.make_error(str(call_id), text))


def _lookup_error(name: str | None) -> str:
    if name is None:
        return "ValueError: Call message is missing the 'function' field\n"
    if name.startswith("_"):
        return f"AttributeError: Cannot call private method '{name}'\n"
    return f"AttributeError: Function '{name}' not found\n"


def _parent_pipe() -> int | None:
    """The parent-death pipe, if our own parent passed one (``<fd>:<parent pid>``).

    The variable is removed so that our own children never mistake it for theirs. An fd
    that is not a pipe is ignored (the ppid poll is used instead), and so is a pipe from a
    process other than our parent, unless it has already ended: then our parent died
    before we looked (we now have another parent), and the watch ends at once.
    """
    text = os.environ.pop(PARENT_FD_ENV, "")
    fd_text, _, pid_text = text.partition(":")
    if not (fd_text.isdigit() and pid_text.isdigit()):
        return None
    fd = int(fd_text)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
        if int(pid_text) != os.getppid() and not _pipe_has_ended(fd):
            return None
    except OSError:
        return None
    return fd


def _pipe_has_ended(fd: int) -> bool:
    """Whether a pipe's writers are all gone and nothing is left to read; asked without
    reading or changing it (the fd may be another process's, if a variable was stale)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    events = dict(poller.poll(0)).get(fd, 0)
    return events == select.POLLHUP


def _port_from_env() -> int:
    text = os.environ.get(PORT_ENV)
    if text is None:
        raise ValueError(f"{PORT_ENV} is not set: start this worker from a parent process")
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"{PORT_ENV}={text!r} is not a port number") from None
    if not 1024 <= port <= 65535:
        raise ValueError(f"{PORT_ENV}={port} is outside 1024..65535")
    return port
