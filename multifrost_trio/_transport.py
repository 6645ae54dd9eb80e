"""A pyzmq socket driven from an event loop through ``anyio.wait_readable``.

libzmq's ``ZMQ_FD`` only signals when the socket's command mailbox changes, and any zmq call
(send, recv, reading ``EVENTS``) may consume that signal while messages stay queued. So:
every zmq call made here is followed by a drain (receive until nothing is queued) before
anyone may sleep on the fd again (on trio a send leaves it owed, and an instrument settles
it before the scheduler sleeps); a sender that meets a full queue waits for a reader to see
``POLLOUT``. A drain runs for a bounded time and schedules its own continuation, so a peer
that sends without pause cannot hold the event loop. On trio, a task waiting for its own
message while the loop has nothing else to do waits in ``poll`` without the scheduler
(``_IdleWait``). Flags are plain ints and frames go through the socket's base
``send``/``recv``: pyzmq's enum arithmetic and keyword handling are measurable on this path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import anyio
import trio
import zmq

from ._messages import MAX_MESSAGE_BYTES

log = logging.getLogger("multifrost_trio.transport")

_NOBLOCK: Final = int(zmq.NOBLOCK)
_SNDMORE: Final = int(zmq.SNDMORE)
_EVENTS: Final = int(zmq.EVENTS)
_POLLIN: Final = int(zmq.POLLIN)
_POLLOUT: Final = int(zmq.POLLOUT)
_AGAIN: Final = zmq.Again
_BaseSocket: Final = zmq.backend.Socket

DRAIN_SLICE: Final = 0.002
"""Seconds one drain may run before it lets other tasks run: a hundred replies here, or
fewer messages when each carries printed lines for a slow output sink."""

ROOM_RETRY_FIRST: Final = 0.001
ROOM_RETRY_LAST: Final = 0.02
"""Pauses (growing from first to last) between retries of a send to a ROUTER peer that has
no room while another peer has: libzmq then reports room, and says nothing when the full
peer reads (a ROUTER's ``POLLOUT`` means room at some peer)."""

CLOSE_LINGER_MS: Final = 200
"""How long libzmq keeps trying to deliver queued frames (e.g. a final ``shutdown``) after
close; it never blocks the caller, the io thread does it."""

FrameHandler = Callable[[list[bytes]], None]


def context() -> zmq.Context[zmq.Socket[bytes]]:
    """The process-wide zmq context (never terminated on an event loop thread)."""
    return zmq.Context.instance()


def new_socket(kind: int) -> zmq.Socket[bytes]:
    """A socket with the options every socket here needs."""
    sock = context().socket(kind)
    sock.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
    # libzmq refuses (and disconnects) far larger frames before allocating them; frames
    # between the two bounds are dropped and counted by the decoder.
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * MAX_MESSAGE_BYTES)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


def bind_ephemeral(sock: zmq.Socket[bytes], host: str = "127.0.0.1") -> int:
    """Bind to an OS-chosen port in one step and return it (no find-a-free-port race)."""
    sock.bind(f"tcp://{host}:0")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])


class ChannelClosed(Exception):
    """The channel was closed while a sender waited."""


class Waiter:
    """A one-shot wake-up for one task (any anyio backend), with a value or an error to
    hand over."""

    __slots__ = ("_event", "done", "error", "value")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None

    def wake(self) -> None:
        self.done = True
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


class TrioWaiter:
    """The same on trio, parking the task directly: an ``anyio.Event`` costs several
    times more to create and wait on, and one is needed per call."""

    __slots__ = ("_task", "done", "error", "value")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None

    def wake(self) -> None:
        self.done = True
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


def waiter_type() -> type[Waiter | TrioWaiter]:
    """The cheapest waiter for the running event loop."""
    return TrioWaiter if trio.lowlevel.in_trio_run() else Waiter


class _SendWaiter:
    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.error: BaseException | None = None


_CLOSED_ERRORS: Final = (anyio.ClosedResourceError, trio.ClosedResourceError, OSError)


class _ReaderWatch(trio.abc.Instrument):
    """Before each wait of the trio scheduler for I/O, makes sure someone reads the socket
    and that no drain is owed.

    Rescheduling a task there would not end a sleep that follows, so the parked reader is
    woken through ``run_sync_soon`` (which does), and only when no task reads. An owed
    drain is settled here by asking ``EVENTS`` alone; messages found are handed over by a
    drain scheduled the same way (no message is handed over inside the scheduler).
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._token = trio.lowlevel.current_trio_token()

    def before_io_wait(self, timeout: float) -> None:
        channel = self._channel
        if channel._closed:
            return
        if channel._sent_this_pass:
            channel.flush_deferred()
        if channel._parked_reader is not None and channel._leader is None:
            self._token.run_sync_soon(channel.unpark_reader_if_needed, idempotent=True)
        elif channel._drain_owed:
            channel.settle_owed_drain()


class _IdleWait:
    """Waits for the socket's fd in ``poll``, beside trio's own I/O handle, while the trio
    run loop has nothing else to do.

    The scheduler would do the same wait, and then a pass of its own: re-arming the fd,
    rescheduling the task and switching back to it, plus the instruments around the wait.
    Skipping that pass took a sequential round trip from 1.29x to about 1.1x raw pyzmq. It
    only starts when no other task is scheduled (in the run queue or later in the batch
    that runs now), no callback is queued, no Ctrl-C waits to be delivered, nobody waits
    for the loop to be idle and the task is not cancelled; it calls the instruments as the
    scheduler does; it ends at the loop's next deadline and as soon as anything else the
    loop waits for (another fd, a thread's callback, a signal) is ready, and the task then
    waits through the scheduler. So it stands for a checkpoint, and is counted as one
    (``trio.testing.assert_checkpoints`` sees it); a task step, though, now includes the
    wait. It reads trio's run-loop internals, and is used only with the trio versions it
    was checked against, the default clock, epoll and no guest mode.
    """

    def __init__(self, runner: Any, fd: int, io_handle: int) -> None:
        self._runner = runner
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._poll.register(io_handle, select.POLLIN)

    @classmethod
    def for_current_run(cls, fd: int) -> _IdleWait | None:
        """An idle wait on ``fd`` for the running trio loop, or None where none can be used."""
        if not trio_version_checked():
            return None
        try:
            from trio._core import _run

            runner = _run.GLOBAL_RUN_CONTEXT.runner
            io_handle = runner.io_manager._epoll.fileno()
            current = trio.lowlevel.current_task()
            usable = (
                type(runner.clock) is _run.SystemClock
                and not runner.is_guest
                and runner.clock_autojump_threshold == math.inf
                and current in runner.tasks
                and current._next_send_fn is None
                and type(current._cancel_points) is int
                and type(current._schedule_points) is int
                and type(runner.ki_pending) is bool
                and isinstance(runner.runq, collections.deque)
                and isinstance(runner.entry_queue.queue, collections.deque)
                and isinstance(runner.entry_queue.idempotent_queue, dict)
                and callable(runner.deadlines.next_deadline)
                and callable(runner.instruments.call)
                and len(runner.waiting_for_idle) >= 0
                and isinstance(current._cancel_status.effectively_cancelled, bool)
            )
        except (AttributeError, ImportError, TypeError):
            return None
        return cls(runner, fd, io_handle) if usable else None

    def _loop_is_idle(self) -> bool:
        """No other work for the loop now: no task scheduled, in the run queue or still in
        the batch being run (trio marks a scheduled task by its ``_next_send_fn``), no
        queued callback or pending Ctrl-C, nobody waiting for idleness, and the running
        task not cancelled."""
        runner = self._runner
        entries = runner.entry_queue
        if (
            runner.runq
            or entries.queue
            or entries.idempotent_queue
            or runner.ki_pending
            or runner.waiting_for_idle
            or len(runner.tasks) > IDLE_WAIT_MOST_TASKS
        ):
            return False
        if any(task._next_send_fn is not None for task in runner.tasks):
            return False
        return not trio.lowlevel.current_task()._cancel_status.effectively_cancelled

    @trio.lowlevel.enable_ki_protection
    def wait(self, waiter: Waiter | TrioWaiter) -> bool:
        """Wait if the loop is idle; True once the fd is readable. False, perhaps at once:
        unless an instrument called here woke ``waiter``, wait through the scheduler
        instead. Ctrl-C during the wait is handed to trio, which raises it as usual."""
        if not self._loop_is_idle():
            return False
        runner = self._runner
        timeout = runner.deadlines.next_deadline() - runner.clock.current_time()
        if timeout <= 0:
            return False
        timeout = min(timeout, _LONGEST_IDLE_WAIT)
        instruments = runner.instruments
        watched = "before_io_wait" in instruments
        if watched:
            instruments.call("before_io_wait", timeout)
        try:
            if waiter.done or (watched and not self._loop_is_idle()):
                return False  # an instrument woke the waiter, or scheduled something
            ready = self._poll.poll(math.ceil(timeout * 1000))
        finally:
            if "after_io_wait" in instruments:
                instruments.call("after_io_wait", timeout)
        if len(ready) == 1 and ready[0][0] == self._fd:
            task = trio.lowlevel.current_task()
            task._cancel_points += 1
            task._schedule_points += 1
            return True
        return False


IDLE_WAIT_MOST_TASKS: Final = 100
"""Above this many tasks the loop is not checked for idleness (the check looks at every
task): the task waits through the scheduler."""
IDLE_WAIT_TRIO_VERSIONS: Final = ((0, 35), (0, 36))
"""The trio versions (from, up to but not including) whose run loop ``_IdleWait`` was
checked against; with others, tasks wait through the scheduler."""
_LONGEST_IDLE_WAIT: Final = 86400.0
"""Seconds; trio's own longest sleep."""


def trio_version_checked() -> bool:
    """Whether the installed trio is one ``_IdleWait`` was checked against."""
    try:
        version = tuple(int(part) for part in trio.__version__.split(".")[:2])
    except ValueError:
        return False
    return IDLE_WAIT_TRIO_VERSIONS[0] <= version < IDLE_WAIT_TRIO_VERSIONS[1]


class Channel:
    """One zmq socket, its readers and its senders.

    ``on_frames`` is called synchronously for every received multipart message, from
    whichever task drained the socket; it must not block or raise. ``on_drained``, if
    given, is called the same way at the end of every drain, after its last ``on_frames``
    (a receiver may hold back work for it, to do it once per burst of messages).
    ``batch_sends`` (for a DEALER, whose messages all go to one peer) holds the later sends
    of a scheduler pass until it ends (see ``try_send``).

    On trio a task waiting for its own message (``wait_for``) reads the socket itself and is
    woken by the fd directly: a sequential round trip then costs one task switch instead of
    two (reader, then caller), measured as about a quarter of the library's latency; while
    the loop has nothing else to do, it waits without the scheduler (``_IdleWait``) and
    costs none. The background reader (``run``) parks off the fd while such a task reads,
    so a message wakes one task, not two; and it stays parked after that task leaves, until
    the scheduler is about to sleep with nobody reading (a trio instrument watches for
    that). A caller that calls again at once, the usual loop, is reading again long before.
    The reader sleeps on a duplicate of the fd number: trio allows one sleeper per number.
    """

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        on_frames: FrameHandler,
        on_drained: Callable[[], None] | None = None,
        *,
        batch_sends: bool = False,
    ) -> None:
        self.sock = sock
        self._on_frames = on_frames
        self._on_drained = on_drained
        self._fd = int(sock.getsockopt(zmq.FD))
        self._reader_fd = os.dup(self._fd)
        # The socket's own getsockopt, typed for the int options read on the hot path.
        self._int_option: Callable[[int], int] = sock.getsockopt  # type: ignore[assignment]
        # The base class's send/recv skip the sugar layer's per-call keyword handling.
        self._send_frame: Callable[[bytes, int], Any] = _BaseSocket.send.__get__(sock)
        self._recv_frame: Callable[[int, bool], zmq.Frame] = _BaseSocket.recv.__get__(sock)
        self._draining = False
        # The zmq calls above (and the caller's) may have taken the fd's signal.
        self._drain_owed = True
        self._stop_requested = False
        self._closed = False
        self._send_waiters: list[_SendWaiter] = []
        self._on_trio = trio.lowlevel.in_trio_run()
        self._leader: Waiter | TrioWaiter | None = None
        self._leader_sleeping = False
        self.leader_draining = False
        """The drain running now is the leader's own, in the leader's task (read by
        ``on_frames``: work begun here is the leader task's)."""
        self._parked_reader: trio.lowlevel.Task | None = None
        self._lock = threading.Lock()
        """Held around every use of the socket: threads may send on it (``send_from_thread``)."""
        self._token = trio.lowlevel.current_trio_token() if self._on_trio else None
        self._idle_wait = _IdleWait.for_current_run(self._fd) if self._on_trio else None
        self._continuation_scheduled = False
        self._batch_sends = batch_sends
        self._sent_this_pass = False
        self._deferred: collections.deque[Sequence[bytes]] = collections.deque()
        """Messages sent during a scheduler pass after its first send, in order; they go
        out together when the pass ends (``_ReaderWatch``), or wait there for room."""
        self._held_without_room = False
        """Held messages found no room: until they leave, a send waits like any sender
        that finds no room (``send``), so the queue keeps its bound."""
        self._watched = False
        """A ``_ReaderWatch`` runs (the background reader is running on trio)."""

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def leader(self) -> Waiter | TrioWaiter | None:
        """The waiter whose task is reading the socket for itself, if any."""
        return self._leader

    def drain(
        self, *, expect_message: bool = False, until: Waiter | TrioWaiter | None = None
    ) -> None:
        """Receive and hand over messages already queued; never sleeps.

        Runs for at most about ``DRAIN_SLICE``; if more may be queued the drain is owed and
        its continuation scheduled, so other tasks run in between. ``expect_message``: the
        fd just fired, so try to receive before asking ``EVENTS`` (a failed receive costs
        more than the question, a successful one less). ``until``: stop as soon as this
        waiter is woken; the drain is then owed, and paid by the next reader or before the
        scheduler sleeps (a reply is not kept waiting behind the question whether more is
        queued, nor behind a flood of other messages).
        """
        if self._draining or self._closed:
            return
        lock = self._lock
        getsockopt = self._int_option
        on_frames = self._on_frames
        clock = time.monotonic
        deadline = clock() + DRAIN_SLICE
        events = 0
        self._draining = True  # right before the try: a Ctrl-C just after must not leave it set
        try:
            if expect_message:
                with lock:
                    try:
                        frames = self._receive_one()
                    except _AGAIN:
                        frames = None
                if frames is not None:
                    on_frames(frames)
            while True:
                if self._stop_requested:
                    self._stop_requested = False
                    self._drain_owed = True
                    return
                if until is not None and until.done and not self._send_waiters:
                    self._drain_owed = True
                    return
                if clock() >= deadline:
                    self._drain_owed = True
                    self._schedule_continuation()
                    return
                with lock:
                    events = getsockopt(_EVENTS)
                    if not events & _POLLIN:
                        break
                    frames = self._receive_one()
                on_frames(frames)
            self._drain_owed = False
        finally:
            self._draining = False
            if self._on_drained is not None:
                self._on_drained()
        if self._send_waiters and events & _POLLOUT:
            self._wake_senders(None)

    def stop_draining(self) -> None:
        """Make the running drain return once the message it is handing over is handled
        (called from ``on_frames``): its task has to go on before it reads anything more.
        The drain is then owed, and paid as usual."""
        self._stop_requested = True

    def _schedule_continuation(self) -> None:
        """Drain again once the tasks already runnable have had their turn."""
        if self._token is not None:
            self._token.run_sync_soon(self._continue_drain, idempotent=True)
        elif not self._continuation_scheduled:
            self._continuation_scheduled = True
            asyncio.get_running_loop().call_soon(self._continue_drain)

    def settle_owed_drain(self, *, drain_now: bool = False) -> None:
        """Pay an owed drain's question; only if it finds messages (or room for waiting
        senders) does a drain follow: at once with ``drain_now``, else through
        ``run_sync_soon``, which also keeps the scheduler from sleeping (``_ReaderWatch``
        calls this where no task may be woken)."""
        try:
            with self._lock:
                events = self._int_option(_EVENTS)
        except zmq.ZMQError:
            if drain_now:
                raise
            return  # closed under the channel: its reader meets the same error
        if events & _POLLIN or (events & _POLLOUT and self._waits_for_room()):
            if drain_now:
                self.drain(expect_message=bool(events & _POLLIN))
            else:
                self._schedule_continuation()
        else:
            self._drain_owed = False

    def _continue_drain(self) -> None:
        self._continuation_scheduled = False
        try:
            self.drain()
        except zmq.ZMQError:
            # Only a socket closed under the channel fails here; its reader meets the same
            # error and reports it.
            log.debug("drain continuation failed", exc_info=True)

    @trio.lowlevel.enable_ki_protection
    def _receive_one(self) -> list[bytes]:
        """One whole multipart message (Ctrl-C waits until it is read: a message cut short
        would leave its last frames to be read as a message of their own)."""
        recv = self._recv_frame
        frame = recv(_NOBLOCK, False)
        frames = [frame.bytes]
        while frame.more:
            frame = recv(_NOBLOCK, False)
            frames.append(frame.bytes)
        return frames

    async def run(self) -> None:
        """The background reader. Returns once the channel is closed."""
        fd = self._reader_fd
        wait_readable = trio.lowlevel.wait_readable if self._on_trio else anyio.wait_readable
        watch = _ReaderWatch(self) if self._on_trio else None
        if watch is not None:
            trio.lowlevel.add_instrument(watch)
            self._watched = True
        try:
            woken = False
            while not self._closed:
                if self._leader is not None:
                    await self._park_reader()
                    woken = False
                    continue
                self.drain(expect_message=woken)
                try:
                    await wait_readable(fd)
                except _CLOSED_ERRORS:
                    if self._closed:
                        return
                    raise
                woken = True
        finally:
            if watch is not None:
                self._watched = False
                trio.lowlevel.remove_instrument(watch)

    async def _park_reader(self) -> None:
        """Sleep off the fd while a caller reads, and after (see the class docstring)."""
        self._parked_reader = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._parked_reader = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def unpark_reader_if_needed(self) -> None:
        """Wake the parked reader if still nobody reads the socket (``_ReaderWatch`` asks
        for this through ``run_sync_soon``; a caller may have started reading since)."""
        if self._leader is None:
            self._unpark_reader()

    def _unpark_reader(self) -> None:
        task, self._parked_reader = self._parked_reader, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait_for(self, waiter: Waiter | TrioWaiter, *, checkpoint: bool = True) -> bool:
        """Wait until ``waiter`` is woken (by ``on_frames`` or anyone else).

        On trio, if no other caller is reading, read the socket meanwhile (see the class
        docstring). Whoever wakes the waiter must do so through :meth:`wake`. Returns
        whether it passed a checkpoint: always, except with ``checkpoint=False`` when the
        waiter was woken before any sleep (by messages already queued); the caller then
        either continues what a handler began in this very step, or checkpoints itself.
        """
        if self._leader is not None or not self._on_trio or self._closed or waiter.done:
            await waiter.wait()
            return True
        fd = self._fd
        slept = False
        try:
            self._leader = waiter  # inside the try: a Ctrl-C just after must not leave it set
            # Every zmq call here is followed by a drain, or leaves one owed.
            if self._drain_owed:
                self.leader_draining = True
                self.settle_owed_drain(drain_now=True)
                self.leader_draining = False
            idle_wait = self._idle_wait
            while not waiter.done and not self._closed:
                if idle_wait is not None and idle_wait.wait(waiter):
                    # It counts as the checkpoint: the task was not cancelled when it began,
                    # and anything that would have run meanwhile ended it.
                    slept = True
                elif waiter.done:  # woken by an instrument the idle wait called
                    break
                else:
                    slept = True
                    self._leader_sleeping = True
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except _CLOSED_ERRORS:
                        if not waiter.done and not self._closed:
                            raise
                        continue
                    finally:
                        self._leader_sleeping = False
                self.leader_draining = True
                self.drain(expect_message=True, until=waiter)
                self.leader_draining = False
        finally:
            self._leader = None
            self.leader_draining = False
        if not slept and checkpoint:
            await trio.lowlevel.checkpoint()
            slept = True
        if not waiter.done:
            raise ChannelClosed("channel is closed")
        return slept

    def wake(self, waiter: Waiter | TrioWaiter) -> None:
        """Wake ``waiter``; if its task is sleeping on the socket, stop that too.

        Another task's drain may take a caller's reply while that caller sleeps on the fd
        (the fd then never fires for it). ``notify_closing`` on the caller's fd number is
        trio's one way to wake a task sleeping on an fd; the fd stays open and usable, and
        the background reader sleeps on another number, so it is not disturbed.
        """
        waiter.wake()
        if waiter is self._leader and self._leader_sleeping and not self._closed:
            self._leader_sleeping = False
            trio.lowlevel.notify_closing(self._fd)

    def try_send(self, frames: Sequence[bytes]) -> bool:
        """Send without waiting; False when the peer's queue is full (or no peer yet).

        With ``batch_sends`` on trio, only the first send of a scheduler pass goes at once;
        later ones are held and leave together, in order, when the pass ends (True: they
        will go), unless held messages still wait for room (False, as for a full queue).
        Raises ``zmq.ZMQError`` (EHOSTUNREACH) when a ROUTER names an unknown peer.
        """
        if self._closed:
            raise ChannelClosed("channel is closed")
        if self._sent_this_pass:
            if self._held_without_room:
                return False
            # Later sends of a scheduler pass leave together when it ends: many sends in a
            # row wake zmq's I/O thread once, not once each.
            self._deferred.append(frames)
            return True
        with self._lock:
            sent = self._send_all(frames)
        if self._watched:
            # Settled before the scheduler sleeps (``_ReaderWatch``): one question for all
            # the sends of a scheduler pass instead of one per send.
            self._drain_owed = True
            self._sent_this_pass = self._batch_sends and sent
        else:
            self.drain()
        return sent

    def flush_deferred(self) -> None:
        """Send the messages held back during a scheduler pass, in order (``_ReaderWatch``
        calls this when the pass ends). What finds no room waits for the next pass, and
        keeps later sends behind it; zmq's fd fires when room comes, so a pass follows."""
        deferred = self._deferred
        if deferred:
            with self._lock:
                while deferred:
                    try:
                        if not self._send_all(deferred[0]):
                            break
                    except Exception:  # e.g. closed under us; this runs in an instrument
                        log.debug("dropped a held message", exc_info=True)
                    deferred.popleft()
            self._drain_owed = True
        self._sent_this_pass = self._held_without_room = bool(deferred)

    def discard_held(self) -> None:
        """Forget held messages (their peer is gone, and their callers were failed)."""
        self._deferred.clear()
        self._sent_this_pass = self._held_without_room = False

    @trio.lowlevel.enable_ki_protection
    def _send_all(self, frames: Sequence[bytes]) -> bool:
        """Send one multipart message (Ctrl-C waits until it is sent: a message cut short
        would take the next send's frames as its own)."""
        send = self._send_frame
        last = len(frames) - 1
        try:
            send(frames[0], _NOBLOCK | _SNDMORE if last else _NOBLOCK)
        except _AGAIN:
            return False
        for index in range(1, last + 1):
            send(frames[index], _NOBLOCK | _SNDMORE if index < last else _NOBLOCK)
        return True

    def send_from_thread(self, frames: Sequence[bytes]) -> bool:
        """Send from a thread other than the event loop's, without waiting.

        False when the frames could not go now (channel closed, queue full, unknown peer):
        the caller then hands the send to the loop. The socket lock makes the socket's use
        from two threads safe; the loop is asked to drain when this send may have consumed
        the fd's signal for messages that are now queued.
        """
        if self._token is None:
            return False
        with self._lock:
            if self._closed:
                return False
            try:
                sent = self._send_all(frames)
            except zmq.ZMQError:
                return False
            events = self._int_option(_EVENTS)
        if events & _POLLIN or (events & _POLLOUT and self._waits_for_room()):
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._continue_drain, idempotent=True)
        return sent

    async def send(self, frames: Sequence[bytes]) -> None:
        """Send, waiting (cancellably) while the peer's queue is full."""
        pause = ROOM_RETRY_FIRST
        while not self.try_send(frames):
            await self.wait_room(pause)
            pause = min(pause * 2, ROOM_RETRY_LAST)

    async def wait_room(self, pause: float) -> None:
        """Wait after a send found no room: until the socket has room again, or, when it
        has room already (room at another peer of a ROUTER), for ``pause`` seconds."""
        with self._lock:
            events = self._int_option(_EVENTS)
        if events & _POLLOUT:
            if events & _POLLIN:
                self.drain()  # the question may have taken the fd's signal
            await anyio.sleep(pause)
            return
        waiter = _SendWaiter()
        self._send_waiters.append(waiter)
        try:
            self.drain()  # the question above may have taken the fd's signal
            await waiter.event.wait()
            if waiter.error is not None:
                raise waiter.error
        finally:
            if waiter in self._send_waiters:
                self._send_waiters.remove(waiter)

    def _waits_for_room(self) -> bool:
        """A sender waits for room, or held messages do (``flush_deferred``)."""
        return bool(self._send_waiters or self._deferred)

    def _wake_senders(self, error: BaseException | None) -> None:
        waiters, self._send_waiters = self._send_waiters, []
        for waiter in waiters:
            waiter.error = error
            waiter.event.set()

    def abort_senders(self, error: BaseException) -> None:
        """Make every sender currently waiting for room raise ``error`` (e.g. the peer died)."""
        self._wake_senders(error)

    def close(self) -> None:
        """Wake every task sleeping on the socket, then close it (bounded linger)."""
        if self._closed:
            return
        try:
            self.flush_deferred()  # a last ``shutdown`` may be among them
        finally:  # even if Ctrl-C came during the flush
            self._closed = True
            self._wake_senders(ChannelClosed("channel is closed"))
            self._unpark_reader()
            anyio.notify_closing(self._fd)
            anyio.notify_closing(self._reader_fd)
            with self._lock:
                self.sock.close(linger=CLOSE_LINGER_MS)
            os.close(self._reader_fd)
