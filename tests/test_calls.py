"""Calls through a real worker process, on trio and asyncio."""

from __future__ import annotations

import collections
import math
import random
import sys
import types
from collections.abc import Generator
from typing import Any

import anyio
import pytest

import multifrost_trio as mf
from multifrost_trio._child import _first_step, _resume
from tests.conftest import worker_path

pytestmark = pytest.mark.anyio
ECHO = worker_path("echo_worker.py")
QUIET = mf.SpawnOptions(output=lambda stream, line: None)


PORTABLE_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -(2**63),
    2**63 - 1,
    1.5,
    -0.0,
    "",
    "héllo ✓",
    b"",
    b"\x00\xffbytes",
    [],
    [1, "two", 3.0, None, b"4"],
    {},
    {"nested": {"list": [1, [2, [3, {"deep": b"x"}]]], "empty": {}}},
]


async def test_portable_values_round_trip() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            for value in PORTABLE_VALUES:
                assert await worker.call("echo", value) == value
                assert await worker.call.echo_sync(value) == value


async def test_tuples_become_lists_and_non_finite_floats_become_none() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            sent = (1, (math.nan, math.inf), {"x": -math.inf, "y": [math.nan]})
            assert await worker.call.echo(sent) == [1, [None, None], {"x": None, "y": [None]}]


async def test_int_beyond_int64_raises_locally_before_sending() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            for bad in (2**63, -(2**63) - 1, [1, {"k": 2**70}]):
                with pytest.raises(mf.EncodeError, match="int64"):
                    await worker.call.echo(bad)
            with pytest.raises(mf.EncodeError, match="str"):
                await worker.call.echo({1: "x"})
            with pytest.raises(mf.EncodeError):
                await worker.call.echo(object())
            snapshot = worker.metrics()
            assert snapshot.requests_total == 0
            # Nothing reached the child: the only call it ever saw is this one.
            assert (await worker.call.stats())["calls_started"] == 1


async def test_remote_errors_carry_type_message_and_traceback() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            with pytest.raises(mf.RemoteCallError) as info:
                await worker.call.fail("it broke")
            error = info.value
            assert error.remote_type == "ValueError"
            assert error.remote_message == "it broke"
            assert "Traceback" in error.remote_traceback
            assert "raise ValueError" in error.remote_traceback
            assert isinstance(error, mf.MultifrostError)
            assert await worker.call.add(1, 2) == 3


@pytest.mark.parametrize(
    ("function", "args", "remote_type"),
    [
        ("fail_oddly", ["exit"], "SystemExit"),
        ("fail_oddly", ["unprintable"], "_Unprintable"),
        ("fail_oddly_inline", [], "_Unprintable"),
        ("fail_oddly_async", [], "_Unprintable"),
    ],
)
async def test_odd_exceptions_from_handlers_become_error_replies(
    function: str, args: list[str], remote_type: str
) -> None:
    """SystemExit in a sync handler, or an exception whose str() raises, is answered like
    any error; ten in a row leave the thread pool (8 threads) whole."""
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            for _ in range(10):
                with pytest.raises(mf.RemoteCallError) as info:
                    await worker.call(function, *args)
                assert info.value.remote_type == remote_type
            assert await worker.call.add_sync(1, 2) == 3


async def test_child_error_texts_for_bad_function_names() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            with pytest.raises(mf.RemoteCallError, match="not found"):
                await worker.call.nope()
            with pytest.raises(mf.RemoteCallError, match="private"):
                await worker.call("_private")
            for base_helper in ("run", "serve"):
                with pytest.raises(mf.RemoteCallError, match="not found"):
                    await worker.call(base_helper)
            with pytest.raises(mf.RemoteCallError, match="TypeError"):
                await worker.call.add(1)
            functions = await worker.list_functions()
            assert "echo" in functions
            assert "list_functions" in functions
            assert not {"run", "serve", "_private"} & set(functions)


async def test_many_concurrent_calls_are_neither_lost_nor_crossed() -> None:
    """10,000 calls from 100 tasks with unique payloads; the pending table ends empty.
    Async, threaded and inline handlers take turns (inline replies of calls read together
    are held to the end of the read: none may be lost or given to another caller)."""
    results: dict[tuple[int, int], Any] = {}
    kinds = ["echo", "echo_sync", "echo_inline"]

    async def caller(worker: mf.Worker, task: int) -> None:
        for i in range(100):
            payload = {"task": task, "i": i, "blob": f"{task}-{i}".encode()}
            results[(task, i)] = await worker.call(kinds[(task + i) % 3], payload)

    with anyio.fail_after(120):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            async with anyio.create_task_group() as tg:
                for task in range(100):
                    tg.start_soon(caller, worker, task)
            assert worker.pending_calls == 0
            metrics = worker.metrics()
    assert len(results) == 10_000
    for (task, i), value in results.items():
        assert value == {"task": task, "i": i, "blob": f"{task}-{i}".encode()}
    assert metrics.requests_success == 10_000
    assert metrics.requests_failed == 0


@pytest.mark.parametrize("size", [2, 50])
async def test_async_handlers_that_block_run_at_the_same_time(size: int) -> None:
    """Calls arriving together may share a task while they do not block; once one blocks,
    the others still start: ``meet`` returns only when all ``size`` calls run at once."""
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:

            async def meet(group: str, results: list[int]) -> None:
                results.append(await worker.call.meet(group, size))

            for round_ in range(3):
                results: list[int] = []
                async with anyio.create_task_group() as tg:
                    for _ in range(size):
                        tg.start_soon(meet, f"round {round_}", results)
                    for index in range(20):  # quick calls in between are answered too
                        assert await worker.call.add_async(index, 1) == index + 1
                assert results == [size] * size


async def test_async_handlers_keep_their_task_scopes_and_nurseries_past_their_first_await() -> None:
    """An async handler's first step may run in the drain that read its call (in the task
    that then finishes it): whatever it set up before its first await keeps working, one
    call at a time and with many at once."""
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            assert await worker.call.add_async(1, 1) == 2  # its task then reads the socket
            assert await worker.call.began_in_drain() is True
            assert await worker.call.loop_token() is True
            for _ in range(3):
                assert await worker.call.same_task() is True
                assert await worker.call.scoped_nap(0.01) is True
                assert await worker.call.nursery_sum(5) == 10
                assert await worker.call.add_in_thread(2, 3) == 5
                assert await worker.call.add_async(2, 3) == 5
            # Printed text of a task between calls belongs to no caller: after calls that
            # finished in their first step, after ones resumed, and after many at once.
            assert await worker.call.echo(1) == 1
            assert await worker.call.tasks_with_a_caller() == 0
            results: list[Any] = []

            async def one(index: int) -> None:
                results.append(await worker.call.same_task())
                results.append(await worker.call.nursery_sum(index % 4) == sum(range(index % 4)))
                results.append(await worker.call.add_in_thread(index, 1) == index + 1)

            async with anyio.create_task_group() as tg:
                for index in range(40):
                    tg.start_soon(one, index)
            assert results == [True] * 120
            assert await worker.call.tasks_with_a_caller() == 0
            stats = await worker.call.stats()
            assert stats["calls_failed"] == 0


def test_a_handler_resumed_after_its_first_step_gets_what_await_would_give_it() -> None:
    """``_resume`` hands the first step's trap on unchanged, then passes every value and
    exception sent in to the handler, and closes it when closed."""
    closed: list[str] = []

    @types.coroutine
    def pause(label: str) -> Generator[str, Any, Any]:
        return (yield label)

    async def handler() -> tuple[Any, str, Any]:
        try:
            first = await pause("a")
            try:
                await pause("b")
            except ValueError as exc:
                caught = str(exc)
            else:
                await pause("c")
                caught = "not thrown"
            return first, caught, sys.exc_info()[1]  # nothing is being handled any more
        finally:
            closed.append("finally")

    steps = handler()
    trap = steps.send(None)  # the first step, as the drain that read the call runs it
    resumed = _resume(steps, trap)
    assert resumed.send(None) == "a"
    assert resumed.send(1) == "b"
    with pytest.raises(StopIteration) as done:
        resumed.throw(ValueError("boom"))
    assert done.value.value == (1, "boom", None)

    steps = handler()
    resumed = _resume(steps, steps.send(None))
    assert resumed.send(None) == "a"
    resumed.close()
    assert closed == ["finally", "finally"]


def test_a_first_step_gives_the_result_trap_or_error_of_any_awaitable() -> None:
    """``_first_step`` runs a handler's first step under ``for``: a handler that returns at
    once ends the loop with its result kept, one that awaits hands over its trap and then
    goes on when sent to, and one that raises raises from the loop."""

    async def returns_at_once() -> int:
        return 5

    async def raises_at_once() -> None:
        raise ValueError("first step")

    class Doubling:  # an awaitable that is not a coroutine
        def __await__(self) -> Generator[str, int, int]:
            value = yield "trap"
            return value * 2

    returned: list[Any] = []
    assert list(_first_step(returns_at_once(), returned)) == []
    assert returned == [5]

    with pytest.raises(ValueError, match="first step"):
        list(_first_step(raises_at_once(), []))

    returned = []
    steps = _first_step(Doubling(), returned)
    assert next(iter(steps)) == "trap"
    with pytest.raises(StopIteration):
        steps.send(21)
    assert returned == [42]


async def test_an_async_handler_whose_result_cannot_be_sent_gets_an_error_reply() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            with pytest.raises(mf.RemoteCallError, match="cannot be sent") as info:
                await worker.call.unsendable_async()
            assert info.value.remote_type == "EncodeError"
            assert await worker.call.add_async(1, 1) == 2


async def test_sync_handlers_that_block_get_threads_of_their_own() -> None:
    """Sync handlers that block run at once, each on a thread (up to ``sync_threads``, 8
    here): ``meet_sync`` returns only when all ``size`` calls run at the same time."""
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            for index in range(50):  # short calls first
                assert await worker.call.add_sync(index, 1) == index + 1
            for round_, size in enumerate([2, 8]):
                results: list[int] = []

                async def meet(group: str, out: list[int], size: int = size) -> None:
                    out.append(await worker.call.meet_sync(group, size))

                async with anyio.create_task_group() as tg:
                    for _ in range(size):
                        tg.start_soon(meet, f"round {round_}", results)
                assert results == [size] * size
            assert await worker.call.add_sync(1, 1) == 2


async def test_one_sync_call_at_a_time_runs_on_the_same_thread_after_a_burst() -> None:
    """Once a burst started several threads, calls made one at a time run on one of them
    (the first, whose memory is warm), not on each idle thread in turn (3 calls each).

    Only nearly all: a thread that sent its reply registers as idle just after, and a
    thread preempted in between (a loaded machine) misses the next call."""
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            for round_ in range(3):
                async with anyio.create_task_group() as tg:  # needs 4 threads at once
                    for _ in range(4):
                        tg.start_soon(worker.call.meet_sync, f"burst {round_}", 4)
                names = collections.Counter([await worker.call.thread_name() for _ in range(12)])
                (name, count), *_ = names.most_common(1)
                assert name.startswith("multifrost-sync-")
                assert count >= 10, names


async def test_cancelled_call_cancels_the_handler_and_the_worker_goes_on() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            before = anyio.current_time()
            with anyio.move_on_after(0.1) as scope:
                await worker.call.sleep(10)
            assert scope.cancelled_caught
            assert anyio.current_time() - before < 1.0
            # The handler's finally runs within 200 ms of the caller giving up.
            assert await worker.call.wait_cancelled(0.2) is True
            assert await worker.call.add(2, 3) == 5
            assert worker.pending_calls == 0
            assert worker.metrics().requests_cancelled == 1


async def test_random_cancellation_through_a_narrow_worker_leaves_its_accounting_at_zero() -> None:
    """20,000 calls from 50 tasks, most cancelled at random points, through a worker with
    room for 4 handlers (so calls wait in its backlog and ready queue): every call that is
    not cancelled gets its own result, and once all is quiet the worker's accounting of calls
    in progress is back at zero and it goes on answering."""
    narrow = worker_path("narrow_worker.py")
    rng = random.Random(11)
    finished = 0

    async def caller(worker: mf.Worker, task: int) -> None:
        nonlocal finished
        for i in range(400):
            pick = rng.random()
            with anyio.move_on_after(rng.choice([0.0002, 0.001, 0.005, 0.05])):
                if pick < 0.4:
                    assert await worker.call.add_async(task, i) == task + i
                elif pick < 0.7:
                    assert await worker.call.nap(rng.random() * 0.003, i) == i
                else:
                    assert await worker.call.add_sync(task, i) == task + i
                finished += 1

    with anyio.fail_after(120):
        async with mf.open_worker(narrow, options=QUIET) as worker:
            async with anyio.create_task_group() as tg:
                for task in range(50):
                    tg.start_soon(caller, worker, task)
            assert worker.pending_calls == 0
            assert 0 < finished < 20_000
            # Cancelled threaded calls finish on their threads a little later: poll.
            while any((await worker.call.bookkeeping()).values()):
                await anyio.sleep(0.05)
            for i in range(100):
                assert await worker.call.nap(0, i) == i


async def test_timeout_option_raises_call_timeout_and_cancels_the_handler() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            quick = worker.with_options(timeout=0.1)
            assert quick.timeout == 0.1
            assert worker.timeout is None  # views never share mutable state
            with pytest.raises(mf.CallTimeout) as info:
                await quick.call.sleep(10)
            assert isinstance(info.value, TimeoutError)
            assert await worker.call.wait_cancelled(0.2) is True
            assert await quick.call.add(1, 1) == 2
            assert worker.metrics().requests_timeout == 1


async def test_cancel_storm_leaves_nothing_pending() -> None:
    """1,000 calls cancelled at random points; afterwards calls work and nothing leaks."""
    rng = random.Random(1234)
    with anyio.fail_after(120):
        async with mf.open_worker(ECHO, options=QUIET) as worker:

            async def one(delay: float, seconds: float) -> None:
                with anyio.move_on_after(delay):
                    await worker.call.sleep(seconds)

            async with anyio.create_task_group() as tg:
                for _ in range(1000):
                    tg.start_soon(one, rng.uniform(0, 0.05), rng.choice([0, 0.001, 0.02, 5]))
            assert worker.pending_calls == 0
            assert await worker.call.add(40, 2) == 42
            metrics = worker.metrics()
            assert metrics.in_flight == 0
            assert metrics.requests_total == 1001
            counters = await worker.call.stats()
            # Every handler that was not answered was cancelled in the child.
            assert counters["calls_started"] == 1002


async def test_sync_handlers_run_off_the_loop() -> None:
    """While a sync handler blocks or computes, other calls and heartbeats are answered."""
    started: dict[str, anyio.Event] = {"block": anyio.Event(), "spin": anyio.Event()}

    def output(stream: str, line: str) -> None:
        name = line.removesuffix(" started")
        if name in started:
            started[name].set()

    with anyio.fail_after(60):
        async with mf.open_worker(ECHO, options=mf.SpawnOptions(output=output)) as worker:
            assert (await worker.call.thread_name()).startswith("multifrost-sync")
            assert await worker.call.inline_thread_name() == "MainThread"
            for busy in ("block", "spin"):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(worker.call, busy, 5)
                    await started[busy].wait()  # the handler is running on its thread
                    with anyio.fail_after(1.0):
                        assert await worker.call.add(1, 2) == 3
                        assert await worker.call.add_sync(1, 2) == 3
                        rtt = await worker.ping()
                    assert rtt < 1000
                    assert worker.pending_calls == 1  # the busy call is still running
                    tg.cancel_scope.cancel()


async def test_threaded_handlers_are_counted_once_however_their_reply_went() -> None:
    """A worker thread sends its reply itself when the loop has nothing queued, else the
    loop sends it in a batch; the worker's counters settle on the exact numbers either way."""

    async def calls(count: int) -> None:
        for index in range(count):
            assert await worker.call.add_sync(index, 1) == index + 1
        with pytest.raises(mf.RemoteCallError, match="boom"):
            await worker.call.fail("boom")

    with anyio.fail_after(60):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            before = await worker.call.stats()
            await calls(50)  # one at a time: the threads send
            async with anyio.create_task_group() as tg:  # 200 at once: the loop sends most
                for _ in range(20):
                    tg.start_soon(calls, 10)
            # The loop books a thread's call just after its reply left: poll until it has.
            # Each ``stats`` call is an inline call the next one counts as succeeded.
            polls = 0
            while True:
                stats = await worker.call.stats()
                polls += 1
                settled = stats["calls_failed"] == before["calls_failed"] + 21
                if settled and stats["calls_succeeded"] == before["calls_succeeded"] + 250 + polls:
                    break
                assert stats["calls_succeeded"] <= before["calls_succeeded"] + 250 + polls
                await anyio.sleep(0.01)
            assert stats["abandoned_results"] == before["abandoned_results"]


async def test_child_print_reaches_the_parent_with_a_prefix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO) as worker:
            assert await worker.call.shout("hello") == "HELLO"
    out, err = capsys.readouterr()
    assert "[echo_worker.py STDOUT]: hello" in out.splitlines()
    assert "[echo_worker.py STDERR]: err:hello" in err.splitlines()


async def test_output_callback_and_raw_fd_writes_never_block() -> None:
    lines: list[tuple[str, str]] = []
    options = mf.SpawnOptions(output=lambda stream, line: lines.append((stream, line)))
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=options) as worker:
            # 1 MiB per stream: far more than a pipe holds, so the parent must drain it.
            for _ in range(4):
                assert await worker.call.raw_write(256 * 1024) == 256 * 1024
            assert await worker.call.shout("x") == "X"
    assert ("stdout", "x") in lines
    assert ("stdout", "o" * 256 * 1024) in lines
    assert ("stderr", "e" * 256 * 1024) in lines


@pytest.mark.parametrize("function", ["shout", "shout_async", "shout_inline"])
async def test_a_calls_printed_lines_arrive_before_its_result(function: str) -> None:
    """Whichever way the handler runs (and a thread may send its reply itself), the lines
    it printed reach the sink before the call returns."""
    lines: list[tuple[str, str]] = []
    options = mf.SpawnOptions(output=lambda stream, line: lines.append((stream, line)))
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=options) as worker:
            for index in range(100):
                assert await worker.call(function, f"n{index}") == f"N{index}"
                assert lines[-2:] == [("stdout", f"n{index}"), ("stderr", f"err:n{index}")]


async def test_output_arriving_while_no_call_is_in_flight_is_read_at_once() -> None:
    """Between calls nobody waits for a reply, yet the parent must keep reading: printed
    lines that arrive then are handed to the sink without waiting for another call."""
    send, receive = anyio.create_memory_object_stream[tuple[str, str]](10)
    options = mf.SpawnOptions(output=lambda stream, line: send.send_nowait((stream, line)))
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=options) as worker:
            for round_ in range(3):
                assert await worker.call.add(1, 2) == 3  # a caller read the socket last
                await worker.call.print_later(0.05, f"later {round_}")
                with anyio.fail_after(5):
                    assert await receive.receive() == ("stdout", f"later {round_}")
    send.close()
    receive.close()


async def test_namespace_option_reaches_the_child() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            other = worker.with_options(namespace="elsewhere", timeout=0.3)
            with pytest.raises(mf.CallTimeout):
                await other.call.add(1, 2)  # ignored by the child: no reply at all
            counters = await worker.call.stats()
            assert counters["messages_dropped"] >= 1
            assert other.namespace == "elsewhere"
            assert worker.namespace == "default"


async def test_a_burst_beyond_the_high_water_marks_loses_no_reply() -> None:
    """5,000 calls at once: more than zmq queues (1,000 per direction) hold, so senders on
    both sides must wait for room (ROUTER_MANDATORY on the child) instead of dropping."""
    results: dict[int, Any] = {}

    async def one(worker: mf.Worker, i: int) -> None:
        results[i] = await worker.call.add(i, 1)

    options = mf.SpawnOptions(max_in_flight=10_000, output=lambda stream, line: None)
    with anyio.fail_after(120):
        async with mf.open_worker(ECHO, options=options) as worker:
            async with anyio.create_task_group() as tg:
                for i in range(5_000):
                    tg.start_soon(one, worker, i)
            assert worker.pending_calls == 0
            stats = await worker.call.stats()
    assert results == {i: i + 1 for i in range(5_000)}
    assert stats["replies_undeliverable"] == 0


async def test_max_in_flight_bounds_calls_sent_and_unanswered() -> None:
    options = mf.SpawnOptions(max_in_flight=3, output=lambda stream, line: None)
    peak = 0

    async def one(worker: mf.Worker) -> None:
        nonlocal peak
        await worker.call.sleep(0.05)
        peak = max(peak, worker.pending_calls)

    with anyio.fail_after(60):
        async with mf.open_worker(ECHO, options=options) as worker:
            async with anyio.create_task_group() as tg:
                for _ in range(30):
                    tg.start_soon(one, worker)
                while worker.pending_calls < 3:
                    await anyio.sleep(0.01)
                assert worker.pending_calls == 3  # the other 27 wait for room
            assert worker.metrics().requests_success == 30
    assert peak <= 3


@pytest.mark.parametrize("name", ["counters", "endpoint", "service_id"])
def test_a_method_named_like_a_worker_attribute_is_refused(name: str) -> None:
    """Such a method would be listed but never callable (the attribute hides it)."""
    worker_class = type("Clashing", (mf.ChildWorker,), {name: lambda self: None})
    with pytest.raises(TypeError, match=name):
        worker_class()


async def test_calls_waiting_for_a_slot_start_when_a_thread_frees_it_and_nothing_arrives() -> None:
    """A thread that sent its reply itself wakes the worker's loop when calls wait for its
    slot (here no heartbeat or other message would), and the next message books every
    finished job."""
    narrow = worker_path("narrow_worker.py")
    options = mf.SpawnOptions(heartbeat_interval=0, output=lambda stream, line: None)

    async def add(worker: mf.Worker, a: int, results: dict[int, int]) -> None:
        results[a] = await worker.call.add_sync(a, 1000)

    with anyio.fail_after(60):
        async with mf.open_worker(narrow, options=options) as worker:
            for burst in range(30):
                results: dict[int, int] = {}
                async with anyio.create_task_group() as tg:
                    for a in range(burst, burst + 12):  # room for 4: 8 wait in the backlog
                        tg.start_soon(add, worker, a, results)
                assert results == {a: a + 1000 for a in range(burst, burst + 12)}
            # A thread queues its job for booking just after its reply left: poll.
            while any((await worker.call.bookkeeping()).values()):
                await anyio.sleep(0.01)
