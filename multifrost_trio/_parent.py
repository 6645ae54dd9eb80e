"""The parent side of one worker: options, pending calls, ``call`` and its views.

Written against anyio so it runs unchanged on trio and asyncio. A call registers its id,
sends, and waits on its own waiter; the reader (the channel's ``on_frames``) resolves them
synchronously as replies are drained. Whatever ends a wait removes the id in a ``finally``;
a caller that gave up after sending tells the child with a ``cancel`` message.
"""

from __future__ import annotations

import collections
import functools
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from . import _messages as m
from ._errors import CallTimeout, CircuitOpenError, RemoteCallError, WorkerDied
from ._health import CircuitBreaker, CircuitState
from ._metrics import Metrics, MetricsSnapshot, Outcome
from ._transport import Channel, ChannelClosed, TrioWaiter, Waiter, waiter_type

log = logging.getLogger("multifrost_trio")

Stream = Literal["stdout", "stderr"]
OutputSink = Callable[[Stream, str], None]
"""Receives each line a worker printed: ``sink("stdout" | "stderr", line)``."""


class SpawnOptions(BaseModel):
    """How to start, talk to and stop a worker (frozen, validated; connect mode reuses it)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", arbitrary_types_allowed=True, use_attribute_docstrings=True
    )

    timeout: float | None = Field(default=None, gt=0)
    """Default per-call timeout in seconds (None: wait as long as the caller's scope allows)."""
    namespace: str = m.DEFAULT_NAMESPACE
    """Namespace sent with every call; a worker ignores calls for another namespace."""
    client_name: str | None = None
    """Optional name sent with every call (``client_name`` on the wire)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables for the child, on top of this process's environment."""
    cwd: Path | None = None
    """Working directory of the child (default: this process's)."""
    max_in_flight: int = Field(default=1000, ge=1)
    """Calls sent and not yet answered at once; further calls wait for room."""
    start_timeout: float = Field(default=10.0, gt=0)
    """Seconds for the child to start and answer its first heartbeat."""
    shutdown_grace: float = Field(default=2.0, ge=0)
    """Seconds the child gets to exit after ``shutdown`` before it is sent SIGTERM."""
    kill_grace: float = Field(default=2.0, ge=0)
    """Seconds after SIGTERM before SIGKILL."""
    heartbeat_interval: float = Field(default=5.0, ge=0)
    """Seconds between heartbeats (0 disables them)."""
    heartbeat_timeout: float = Field(default=3.0, gt=0)
    """Seconds to wait for a heartbeat's echo before counting a miss."""
    heartbeat_max_misses: int = Field(default=3, ge=1)
    """Consecutive misses after which the worker is unhealthy and its pending calls fail."""
    circuit_threshold: int = Field(default=5, ge=1)
    """Consecutive transport failures (timeouts, worker death, heartbeat loss) that open
    the circuit breaker."""
    circuit_cooldown: float = Field(default=10.0, ge=0)
    """Seconds an open circuit refuses calls before letting one probe through."""
    circuit_counts_remote_errors: bool = False
    """Whether a handler's own exception counts as a failure for the breaker."""
    max_restarts: int = Field(default=0, ge=0)
    """Spawn mode: restart a child that died, at most this many times per
    ``restart_window`` (0: never restart)."""
    restart_window: float = Field(default=60.0, gt=0)
    """Seconds over which ``max_restarts`` is counted."""
    restart_backoff: float = Field(default=0.1, ge=0)
    """Seconds before the first restart; doubles on each restart in a row, up to 5 s."""
    output: OutputSink | logging.Logger | None = None
    """Where the worker's printed lines go: a callable ``(stream, line)``, a logger
    (stdout at INFO, stderr at WARNING), or by default this process's stdout/stderr with a
    ``[<script> STDOUT]: `` / ``[<script> STDERR]: `` prefix."""


_UNSET: Final[Any] = object()


class WorkerCore:
    """State shared by every view of one worker: channel, pending calls, metrics."""

    def __init__(self, name: str, options: SpawnOptions) -> None:
        self.name = name
        self.options = options
        self.channel: Channel | None = None
        self.metrics = Metrics()
        self.pid: int | None = None
        self.last_rtt_ms: float | None = None
        self._new_waiter = waiter_type()
        self._pending: dict[str, Waiter | TrioWaiter] = {}
        self._heartbeats: dict[str, Waiter | TrioWaiter] = {}
        self._failure: Callable[[], BaseException] | None = None
        self._restarted: anyio.Event | None = None
        self._room_waiters: collections.deque[anyio.Event] = collections.deque()
        self._cancelled_exc = anyio.get_cancelled_exc_class()
        self._healthy = True
        self.starting = False
        """A child is starting; its readiness heartbeat is the only one that counts."""
        self.breaker = CircuitBreaker(
            options.circuit_threshold, options.circuit_cooldown, self._circuit_changed
        )
        sink = options.output
        if isinstance(sink, logging.Logger):
            self._sink: OutputSink = functools.partial(_log_output, sink, name)
        else:
            self._sink = sink if sink is not None else self._print_output

    # ------------------------------------------------------------------ state

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def restarting(self) -> bool:
        """The child died and a new one is being started; calls wait for it."""
        return self._restarted is not None

    @property
    def healthy(self) -> bool:
        return self._failure is None and self._healthy

    def set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy

    def log_extra(self) -> dict[str, Any]:
        """Structured fields every log record about this worker carries."""
        return {"worker": self.name, "pid": self.pid}

    def _circuit_changed(self, old: CircuitState, new: CircuitState) -> None:
        level = logging.WARNING if new is CircuitState.OPEN else logging.INFO
        log.log(
            level,
            "circuit of worker %s: %s -> %s",
            self.name,
            old.value,
            new.value,
            extra={**self.log_extra(), "circuit_state": new.value},
        )

    def attach(self, channel: Channel) -> None:
        """Use ``channel`` for traffic and accept calls again (a fresh start or a restart)."""
        self.channel = channel
        self._failure = None
        self._healthy = True
        self._end_restart()

    def fail_all(
        self, make_error: Callable[[], BaseException], *, restarting: bool = False
    ) -> None:
        """Fail every pending call and heartbeat now. New calls wait for the restart when
        ``restarting``, else they are refused until ``attach``."""
        self._failure = make_error
        if restarting:
            if self._restarted is None:
                self._restarted = anyio.Event()
        else:
            self._end_restart()
        self.fail_pending(make_error)

    def _end_restart(self) -> None:
        if self._restarted is not None:
            self._restarted.set()
            self._restarted = None

    async def _check_usable(self) -> None:
        """Raise the worker's failure; while it restarts, wait for the new child instead."""
        while self._failure is not None:
            restarted = self._restarted
            if restarted is None:
                raise self._failure()
            await restarted.wait()

    def fail_pending(self, make_error: Callable[[], BaseException]) -> None:
        """Fail every pending call and heartbeat now (new calls are still accepted)."""
        pending = list(self._pending.values()) + list(self._heartbeats.values())
        self._pending.clear()
        self._heartbeats.clear()
        channel = self.channel
        for waiter in pending:
            waiter.error = make_error()
            self._wake(waiter)
        if channel is not None:
            channel.discard_held()  # stale: a replacement child must not get them
            channel.abort_senders(make_error())
        while self._room_waiters:
            self._room_waiters.popleft().set()

    # ------------------------------------------------------------------ receiving

    def on_frames(self, frames: list[bytes]) -> None:
        """The reader's callback: resolve the call or heartbeat a message answers."""
        try:
            raw = m.unpack(frames[-1])
            # A plain response is read directly (it needs nothing but its id and result).
            if (
                raw["type"] == "response"
                and type(call_id := raw.get("id")) is str
                and m.plain_core(raw)
            ):
                waiter = self._pending.pop(call_id, None)
                if waiter is None:
                    self.metrics.messages_dropped += 1
                else:
                    waiter.value = raw.get("result")
                    self._wake(waiter)
                return
            message = m.validate(raw)
        except Exception as exc:  # DecodeError, or a decoder bug: never kill the reader
            self.metrics.messages_dropped += 1
            log.debug("dropped a message from %s: %s", self.name, exc)
            return
        if message is None:
            return
        kind = message.type
        if kind == "error":
            waiter = self._pending.pop(message.id, None)
            if waiter is not None:
                waiter.error = RemoteCallError.from_wire(message.error)  # type: ignore[union-attr]
                self._wake(waiter)
                return
        elif kind == "heartbeat":
            waiter = self._heartbeats.pop(message.id, None)
            if waiter is not None:
                self._wake(waiter)
                return
        elif kind == "stdout" or kind == "stderr":
            text: str = message.output  # type: ignore[union-attr]
            for line in text.removesuffix("\n").splitlines() if text else ():
                self.emit_output(kind, line)
            return
        else:
            return
        self.metrics.messages_dropped += 1

    def _wake(self, waiter: Waiter | TrioWaiter) -> None:
        if self.channel is not None:
            self.channel.wake(waiter)
        else:
            waiter.wake()

    def emit_output(self, stream: Stream, line: str) -> None:
        """Hand one line of the worker's output to the sink (never raises)."""
        try:
            self._sink(stream, line)
        except Exception:
            log.exception("output sink of %s raised", self.name)

    def _print_output(self, stream: Stream, line: str) -> None:
        target = sys.stdout if stream == "stdout" else sys.stderr
        print(f"[{self.name} {stream.upper()}]: {line}", file=target, flush=True)

    # ------------------------------------------------------------------ calling

    async def call(
        self,
        function: str,
        args: tuple[Any, ...],
        timeout: float | None,
        namespace: str,
        client_name: str | None,
    ) -> Any:
        if self._failure is not None:
            await self._check_usable()
        message = m.make_call(function, args, namespace, client_name)
        probe = self.breaker.try_acquire()
        if probe is None:
            raise CircuitOpenError(
                f"circuit of worker {self.name} is open: call {function!r} refused"
            )
        frames = (b"", m.encode(message))
        started = time.perf_counter()
        self.metrics.in_flight += 1
        try:
            if timeout is None:
                result = await self._exchange(message["id"], frames)
            else:
                result = await self._exchange_within(timeout, function, message["id"], frames)
        except BaseException as exc:
            self._call_failed(function, probe, started, exc)
            raise
        metrics = self.metrics
        metrics.in_flight -= 1
        metrics.record_success(function, time.perf_counter() - started)
        self.breaker.success(probe)
        return result

    def _call_failed(self, function: str, probe: bool, started: float, exc: BaseException) -> None:
        """Count a call that raised ``exc`` and tell the breaker what it says of the
        transport: a timeout or a dead worker is a failure, a cancel says nothing, and a
        handler's own error counts only if the options say so."""
        transport_ok: bool | None
        if isinstance(exc, CallTimeout):
            outcome: Outcome = "timeout"
            transport_ok = False
        elif isinstance(exc, self._cancelled_exc):
            outcome, transport_ok = "cancelled", None
        else:
            outcome = "failed"
            transport_ok = isinstance(exc, RemoteCallError) and (
                not self.options.circuit_counts_remote_errors
            )
        self.metrics.in_flight -= 1
        self.metrics.record(function, outcome, time.perf_counter() - started)
        if transport_ok is None:
            self.breaker.neutral(probe)
        elif transport_ok:
            self.breaker.success(probe)
        else:
            self.breaker.failure(probe)

    async def _exchange_within(
        self, timeout: float, function: str, call_id: str, frames: tuple[bytes, bytes]
    ) -> Any:
        """``_exchange`` bounded by ``timeout`` seconds (raises :class:`CallTimeout`)."""
        with anyio.move_on_after(timeout):
            return await self._exchange(call_id, frames)
        log.debug(
            "call %s to %s timed out",
            function,
            self.name,
            extra={
                **self.log_extra(),
                "call_id": call_id,
                "function": function,
                "duration": timeout,
            },
        )
        raise CallTimeout(f"call {function!r} to {self.name} timed out after {timeout} s")

    async def _exchange(self, call_id: str, frames: tuple[bytes, bytes]) -> Any:
        channel = self.channel
        assert channel is not None
        if len(self._pending) >= self.options.max_in_flight:
            await self._wait_for_room()
        waiter = self._new_waiter()
        self._pending[call_id] = waiter
        sent = False
        try:
            if not channel.try_send(frames):
                await channel.send(frames)
            sent = True
            await channel.wait_for(waiter)
        except ChannelClosed:
            if self._failure is not None:
                raise self._failure() from None
            raise WorkerDied(f"worker {self.name} is closed") from None
        finally:
            if self._pending.pop(call_id, None) is not None and sent:
                self._send_cancel(call_id)
            if self._room_waiters:
                self._room_waiters.popleft().set()
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    async def _wait_for_room(self) -> None:
        while len(self._pending) >= self.options.max_in_flight:
            if self._failure is not None:
                raise self._failure()
            event = anyio.Event()
            self._room_waiters.append(event)
            try:
                await event.wait()
            finally:
                if event in self._room_waiters:
                    self._room_waiters.remove(event)
                elif self._room_waiters and len(self._pending) < self.options.max_in_flight:
                    self._room_waiters.popleft().set()

    def _send_cancel(self, call_id: str) -> None:
        channel = self.channel
        if channel is None or channel.closed:
            return
        try:
            channel.try_send((b"", m.encode(m.make_cancel(call_id))))
        except Exception:
            log.debug("could not send cancel for %s", call_id)

    def send_nowait(self, message: m.WireMap) -> bool:
        """Best-effort send without waiting (shutdown); False if it could not go out."""
        channel = self.channel
        if channel is None or channel.closed:
            return False
        try:
            return channel.try_send((b"", m.encode(message)))
        except Exception:
            return False

    async def ping(self) -> float:
        """Send a heartbeat and wait for its echo; returns the round trip in ms."""
        if self._failure is not None:
            raise self._failure()
        channel = self.channel
        assert channel is not None
        message = m.make_heartbeat()
        heartbeat_id: str = message["id"]
        waiter = self._new_waiter()
        self._heartbeats[heartbeat_id] = waiter
        try:
            await channel.send((b"", m.encode(message)))
            await channel.wait_for(waiter)
        finally:
            self._heartbeats.pop(heartbeat_id, None)
        if waiter.error is not None:
            raise waiter.error
        sent_at: float = message["timestamp"]
        rtt_ms = max(0.0, (time.time() - sent_at) * 1000.0)
        self.last_rtt_ms = rtt_ms
        self._healthy = True
        self.metrics.heartbeat_rtts.append(rtt_ms)
        return rtt_ms


def _log_output(logger: logging.Logger, worker: str, stream: Stream, line: str) -> None:
    level = logging.INFO if stream == "stdout" else logging.WARNING
    logger.log(level, "%s", line, extra={"worker": worker, "stream": stream})


class _CallProxy:
    """``worker.call(name, *args)`` and ``worker.call.name(*args)``."""

    __slots__ = ("_worker",)

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def __call__(self, function: str, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        # A plain function returning the call's coroutine: one coroutine less per call.
        if kwargs:
            raise TypeError(
                f"call {function!r}: keyword arguments cannot be sent "
                f"({', '.join(kwargs)}); the protocol carries positional arguments only"
            )
        worker = self._worker
        return worker._core.call(
            function, args, worker._timeout, worker._namespace, worker._client_name
        )

    def __getattr__(self, function: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        if function.startswith("__"):
            raise AttributeError(function)
        return functools.partial(self.__call__, function)


class Worker:
    """A handle on a running worker, yielded by ``open_worker`` / ``connect_worker``.

    Views made by :meth:`with_options` share the worker and differ only in call options.
    """

    __slots__ = ("_client_name", "_core", "_namespace", "_timeout")

    def __init__(
        self,
        core: WorkerCore,
        *,
        timeout: float | None = None,
        namespace: str | None = None,
        client_name: str | None = None,
    ) -> None:
        self._core = core
        self._timeout = timeout
        self._namespace = namespace if namespace is not None else core.options.namespace
        self._client_name = client_name

    @classmethod
    def _for(cls, core: WorkerCore) -> Worker:
        options = core.options
        return cls(
            core,
            timeout=options.timeout,
            namespace=options.namespace,
            client_name=options.client_name,
        )

    @property
    def call(self) -> _CallProxy:
        """Call a function: ``await w.call("add", 1, 2)`` or ``await w.call.add(1, 2)``."""
        return _CallProxy(self)

    def with_options(
        self,
        *,
        timeout: float | None = _UNSET,
        namespace: str = _UNSET,
        client_name: str | None = _UNSET,
    ) -> Worker:
        """A new view of the same worker with other call options (this one is unchanged).

        ``timeout`` in seconds (None: no timeout) raises :class:`CallTimeout` when exceeded.
        """
        if timeout is not _UNSET and timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive (or None)")
        return Worker(
            self._core,
            timeout=self._timeout if timeout is _UNSET else timeout,
            namespace=self._namespace if namespace is _UNSET else namespace,
            client_name=self._client_name if client_name is _UNSET else client_name,
        )

    async def ping(self) -> float:
        """Send a heartbeat now and return its round trip in milliseconds.

        Raises :class:`WorkerDied` if the worker is gone; bound it with a cancel scope.
        """
        return await self._core.ping()

    async def list_functions(self) -> list[str]:
        """The function names the worker exposes."""
        result = await self.call("list_functions")
        return [str(name) for name in result]

    def metrics(self) -> MetricsSnapshot:
        """A frozen snapshot of this worker's counters and latencies."""
        breaker = self._core.breaker
        return self._core.metrics.snapshot(
            circuit_state=breaker.state.value, circuit_trips=breaker.trips
        )

    @property
    def name(self) -> str:
        """The worker's display name (its script's file name or its service id)."""
        return self._core.name

    @property
    def pid(self) -> int | None:
        """The child's process id in spawn mode, else None."""
        return self._core.pid

    @property
    def timeout(self) -> float | None:
        """This view's per-call timeout in seconds."""
        return self._timeout

    @property
    def namespace(self) -> str:
        """This view's namespace."""
        return self._namespace

    @property
    def is_healthy(self) -> bool:
        """False while the worker is dead (or restarting) or missing heartbeats."""
        return self._core.healthy

    @property
    def circuit_open(self) -> bool:
        """True while the circuit breaker refuses calls (open; half-open with its probe out
        counts as open too)."""
        return self._core.breaker.state is not CircuitState.CLOSED

    @property
    def last_heartbeat_rtt_ms(self) -> float | None:
        """Round trip of the last answered heartbeat, in milliseconds."""
        return self._core.last_rtt_ms

    @property
    def pending_calls(self) -> int:
        """Calls sent and not yet answered."""
        return self._core.pending_count

    def __repr__(self) -> str:
        return f"<Worker {self.name!r} pid={self.pid} namespace={self._namespace!r}>"
