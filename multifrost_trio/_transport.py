"""A pyzmq socket driven from an event loop through ``anyio.wait_readable``.

libzmq's ``ZMQ_FD`` only signals when the socket's command mailbox changes, and any zmq call
(send, recv, reading ``EVENTS``) may consume that signal while messages stay queued. So:
exactly one task (``run``) sleeps on the fd; every zmq call made here is followed by a drain
(``recv`` until ``Again``) before anyone may sleep again; a sender that meets ``Again`` waits
for the reader to see ``POLLOUT``. Flags are plain ints: pyzmq's enum arithmetic is
measurable on this path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Final

import anyio
import trio
import zmq

from ._messages import MAX_MESSAGE_BYTES

log = logging.getLogger("multifrost_trio.transport")

_NOBLOCK: Final = int(zmq.NOBLOCK)
_SNDMORE: Final = int(zmq.SNDMORE)
_RCVMORE: Final = int(zmq.RCVMORE)
_EVENTS: Final = int(zmq.EVENTS)
_POLLIN: Final = int(zmq.POLLIN)
_POLLOUT: Final = int(zmq.POLLOUT)
_AGAIN: Final = zmq.Again

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
    """A one-shot wake-up for one task (any anyio backend), with a value to hand over."""

    __slots__ = ("_event", "done", "value")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self.done = False
        self.value: Any = None

    def wake(self) -> None:
        self.done = True
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


class TrioWaiter:
    """The same on trio, parking the task directly: an ``anyio.Event`` costs several
    times more to create and wait on, and one is needed per call."""

    __slots__ = ("_task", "done", "value")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self.done = False
        self.value: Any = None

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


class Channel:
    """One zmq socket, its readers and its senders.

    ``on_frames`` is called synchronously for every received multipart message, from
    whichever task drained the socket; it must not block or raise.

    Two tasks at most sleep on the socket, each on its own fd number: the background
    reader (``run``, on a duplicate of the zmq fd) and, on trio, one caller waiting for its
    own reply (``wait_for``, on the original). A caller that reads for itself is woken by
    its reply directly instead of by the reader: a sequential round trip then costs one
    scheduler pass instead of two, measured as about a quarter of the library's latency.
    """

    def __init__(self, sock: zmq.Socket[bytes], on_frames: FrameHandler) -> None:
        self.sock = sock
        self._on_frames = on_frames
        self._fd = int(sock.getsockopt(zmq.FD))
        self._reader_fd = os.dup(self._fd)
        # The socket's own getsockopt, typed for the int options read on the hot path.
        self._int_option: Callable[[int], int] = sock.getsockopt  # type: ignore[assignment]
        self._draining = False
        self._closed = False
        self._send_waiters: list[_SendWaiter] = []
        self._on_trio = trio.lowlevel.in_trio_run()
        self._leader: Waiter | TrioWaiter | None = None
        self._leader_sleeping = False

    @property
    def closed(self) -> bool:
        return self._closed

    def drain(self) -> None:
        """Receive and hand over every message already queued; never sleeps."""
        if self._draining or self._closed:
            return
        self._draining = True
        sock = self.sock
        recv = sock.recv
        getsockopt = self._int_option
        on_frames = self._on_frames
        try:
            # Reading EVENTS is cheaper than provoking zmq.Again, whose construction is slow.
            while (events := getsockopt(_EVENTS)) & _POLLIN:
                frames = [recv(_NOBLOCK)]
                while getsockopt(_RCVMORE):
                    frames.append(recv(_NOBLOCK))
                on_frames(frames)
        finally:
            self._draining = False
        if self._send_waiters and events & _POLLOUT:
            self._wake_senders(None)

    async def run(self) -> None:
        """The background reader. Returns once the channel is closed."""
        fd = self._reader_fd
        wait_readable = trio.lowlevel.wait_readable if self._on_trio else anyio.wait_readable
        while not self._closed:
            # A caller sleeping on the same socket was woken by the same event and will
            # drain for itself; draining here too would only pull its reply away from it.
            if not self._leader_sleeping:
                self.drain()
            try:
                await wait_readable(fd)
            except _CLOSED_ERRORS:
                if self._closed:
                    return
                raise

    async def wait_for(self, waiter: Waiter | TrioWaiter) -> None:
        """Wait until ``waiter`` is woken (by ``on_frames`` or anyone else).

        On trio, if no other caller is reading, read the socket meanwhile (see the class
        docstring). Whoever wakes the waiter must do so through :meth:`wake`.
        """
        if self._leader is not None or not self._on_trio or self._closed or waiter.done:
            await waiter.wait()
            return
        self._leader = waiter
        fd = self._fd
        slept = False
        try:
            # No drain before sleeping: every zmq call here is already followed by one.
            while not waiter.done and not self._closed:
                slept = True
                self._leader_sleeping = True
                try:
                    await trio.lowlevel.wait_readable(fd)
                except _CLOSED_ERRORS:
                    if not waiter.done and not self._closed:
                        raise
                finally:
                    self._leader_sleeping = False
                self.drain()
        finally:
            self._leader = None
        if not slept:
            await trio.lowlevel.checkpoint()
        if not waiter.done:
            raise ChannelClosed("channel is closed")

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

        Raises ``zmq.ZMQError`` (EHOSTUNREACH) when a ROUTER names an unknown peer.
        """
        if self._closed:
            raise ChannelClosed("channel is closed")
        send = self.sock.send
        last = len(frames) - 1
        try:
            send(frames[0], _NOBLOCK | _SNDMORE if last else _NOBLOCK)
        except _AGAIN:
            self.drain()
            return False
        for index in range(1, last + 1):
            send(frames[index], _NOBLOCK | _SNDMORE if index < last else _NOBLOCK)
        self.drain()
        return True

    async def send(self, frames: Sequence[bytes]) -> None:
        """Send, waiting (cancellably) while the peer's queue is full."""
        while not self.try_send(frames):
            await self._wait_writable()

    async def _wait_writable(self) -> None:
        waiter = _SendWaiter()
        self._send_waiters.append(waiter)
        try:
            if self._int_option(_EVENTS) & _POLLOUT:
                return
            self.drain()
            await waiter.event.wait()
            if waiter.error is not None:
                raise waiter.error
        finally:
            if waiter in self._send_waiters:
                self._send_waiters.remove(waiter)

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
        self._closed = True
        self._wake_senders(ChannelClosed("channel is closed"))
        anyio.notify_closing(self._fd)
        anyio.notify_closing(self._reader_fd)
        self.sock.close(linger=CLOSE_LINGER_MS)
        os.close(self._reader_fd)
