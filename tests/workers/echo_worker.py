"""Test worker: echo, sleep with cancellation reporting, sync/inline/async handlers, output."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trio

from multifrost_trio import ChildWorker, inline
from multifrost_trio._child import _caller


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for this one")


class EchoWorker(ChildWorker):
    def __init__(self) -> None:
        super().__init__()
        self.cancelled = trio.Event()
        self.flag = trio.Event()
        self.finally_ran = 0
        self.meetings: dict[str, list[Any]] = {}
        self.barriers: dict[str, threading.Barrier] = {}
        self.barriers_lock = threading.Lock()
        self.token: trio.lowlevel.TrioToken | None = None

    async def echo(self, value: Any) -> Any:
        return value

    def echo_sync(self, value: Any) -> Any:
        return value

    @inline
    def echo_inline(self, value: Any) -> Any:
        return value

    @inline
    def add(self, a: int, b: int) -> int:
        return a + b

    def add_sync(self, a: int, b: int) -> int:
        return a + b

    async def add_async(self, a: int, b: int) -> int:
        await trio.sleep(0)
        return a + b

    async def same_task(self) -> bool:
        """Whether the task that began this handler is the one that finishes it."""
        first = trio.lowlevel.current_task()
        await trio.sleep(0)
        return trio.lowlevel.current_task() is first

    async def began_in_drain(self) -> bool:
        """Whether this handler's first step ran inside the drain that read its call, the
        leader task's own."""
        return self._channel is not None and self._channel.leader_draining

    @inline
    def loop_token(self) -> bool:
        """Keep the event loop's token, for ``tasks_with_a_caller``."""
        self.token = trio.lowlevel.current_trio_token()
        return True

    def tasks_with_a_caller(self) -> int:
        """How many tasks would send printed text to a caller: counted from a worker
        thread (after ``loop_token``), so no pooled task is the one counting."""

        def count() -> int:
            found, tasks = 0, [trio.lowlevel.current_root_task()]
            while tasks:
                task = tasks.pop()
                if task is not None:
                    found += task.context.get(_caller) is not None
                    tasks.extend(t for n in task.child_nurseries for t in n.child_tasks)
            return found

        return trio.from_thread.run_sync(count, trio_token=self.token)

    async def scoped_nap(self, limit: float) -> bool:
        """A cancel scope of the handler's own, entered before its first await."""
        with trio.move_on_after(limit) as scope:
            await trio.sleep(10)
        return scope.cancelled_caught

    async def nursery_sum(self, count: int) -> int:
        """A nursery opened before the handler's first await, with children that await."""
        found: list[int] = []

        async def child(value: int) -> None:
            await trio.sleep(0)
            found.append(value)

        async with trio.open_nursery() as nursery:
            for value in range(count):
                nursery.start_soon(child, value)
        return sum(found)

    async def add_in_thread(self, a: int, b: int) -> int:
        return await trio.to_thread.run_sync(int.__add__, a, b)

    async def unsendable_async(self) -> object:
        return object()

    async def stall(self, seconds: float, marker: str) -> str:
        """After its first await, write ``marker`` and hold the whole event loop for
        ``seconds``: messages sent meanwhile wait to be read together."""
        await trio.sleep(0)
        Path(marker).write_text("stalling")  # noqa: ASYNC240 (holding the loop is the point)
        time.sleep(seconds)  # noqa: ASYNC251
        return "stalled"

    async def wait_flag(self) -> str:
        await self.flag.wait()
        self.flag = trio.Event()
        return "flagged"

    @inline
    def set_flag(self) -> str:
        self.flag.set()
        return "set"

    async def sleep(self, seconds: float) -> str:
        try:
            await trio.sleep(seconds)
            return "slept"
        finally:
            self.finally_ran += 1
            self.cancelled.set()

    async def wait_cancelled(self, timeout: float) -> bool:
        """True once a ``sleep`` handler's finally ran (waits at most ``timeout``)."""
        with trio.move_on_after(timeout):
            await self.cancelled.wait()
        self.cancelled = trio.Event()
        return self.finally_ran > 0

    async def meet(self, group: str, size: int) -> int:
        """Return only once ``size`` calls of ``group`` are running at the same time."""
        arrived = self.meetings.setdefault(group, [0, trio.Event()])
        arrived[0] += 1
        if arrived[0] == size:
            arrived[1].set()
        await arrived[1].wait()
        return size

    def meet_sync(self, group: str, size: int) -> int:
        """A sync ``meet``: each call blocks its thread until ``size`` calls of ``group`` run
        at once (so it needs ``size`` threads); gives up after 10 s."""
        with self.barriers_lock:
            barrier = self.barriers.setdefault(group, threading.Barrier(size, timeout=10))
        barrier.wait()
        return size

    def finally_count(self) -> int:
        return self.finally_ran

    def block(self, seconds: float) -> str:
        """A sync handler that holds its thread (sleep releases the GIL)."""
        print("block started", flush=True)
        time.sleep(seconds)
        return "blocked"

    def spin(self, seconds: float) -> int:
        """A sync handler that keeps the CPU busy (GIL held in bursts)."""
        print("spin started", flush=True)
        end = time.monotonic() + seconds
        count = 0
        while time.monotonic() < end:
            count += 1
        return count

    def thread_name(self) -> str:
        return threading.current_thread().name

    @inline
    def inline_thread_name(self) -> str:
        return threading.current_thread().name

    def print_later(self, delay: float, text: str) -> None:
        """Print from another thread after the reply has gone (output outside any call)."""
        threading.Timer(delay, print, args=(text,)).start()

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def fail_oddly(self, kind: str) -> None:
        """Raise what a careless handler might: SystemExit, or an exception whose str()
        itself raises."""
        if kind == "exit":
            raise SystemExit(3)
        raise _Unprintable()

    @inline
    def fail_oddly_inline(self) -> None:
        raise _Unprintable()

    async def fail_oddly_async(self) -> None:
        raise _Unprintable()

    def shout(self, text: str) -> str:
        print(text)
        print(f"err:{text}", file=sys.stderr)
        return text.upper()

    async def shout_async(self, text: str) -> str:
        return self.shout(text)

    @inline
    def shout_inline(self, text: str) -> str:
        return self.shout(text)

    def raw_write(self, size: int) -> int:
        """Write straight to fd 1 and 2, bypassing the forwarding."""
        os.write(1, b"o" * size + b"\n")
        os.write(2, b"e" * size + b"\n")
        return size

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, int]:
        from dataclasses import asdict

        return asdict(self.counters)

    def crash(self, code: int) -> None:
        os._exit(code)

    @inline
    def hog(self, seconds: float) -> str:
        """Never yields to the event loop for ``seconds`` (heartbeats go unanswered)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return "done"

    def flood(self, lines: int) -> int:
        """Print ``lines`` lines as fast as possible."""
        for i in range(lines):
            print(f"line {i}")
        return lines

    async def wait_abandoned(self, count: int, timeout: float) -> int:
        """Wait (at most ``timeout``) until ``count`` sync results were dropped."""
        with trio.move_on_after(timeout):
            while self.counters.abandoned_results < count:
                await trio.sleep(0.01)
        return self.counters.abandoned_results

    def _private(self) -> str:
        return "secret"


if __name__ == "__main__":
    EchoWorker().run()
