"""Heartbeats, circuit breaker, metrics, restarts and output handling."""

from __future__ import annotations

import io
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import trio
import trio.testing

import multifrost_trio as mf
from multifrost_trio._health import CircuitBreaker, CircuitState, heartbeat_loop
from multifrost_trio._metrics import LATENCY_SAMPLES, Metrics
from multifrost_trio._parent import SpawnOptions, WorkerCore
from tests.conftest import worker_path

ECHO = worker_path("echo_worker.py")
QUIET = mf.SpawnOptions(output=lambda stream, line: None)


def run_with_mock_clock(test: Callable[[], Any]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


# ---------------------------------------------------------------- breaker (mock clock)


def test_breaker_opens_after_threshold_and_recovers_through_one_probe() -> None:
    async def scenario() -> None:
        changes: list[tuple[str, str]] = []
        breaker = CircuitBreaker(3, 10.0, lambda old, new: changes.append((old, new)))
        for _ in range(2):
            assert breaker.try_acquire() is False
            breaker.failure()
        assert breaker.state is CircuitState.CLOSED
        breaker.failure()
        assert breaker.state is CircuitState.OPEN
        assert breaker.trips == 1
        assert breaker.try_acquire() is None  # refused while open
        await trio.sleep(9.9)
        assert breaker.try_acquire() is None
        await trio.sleep(0.1)
        assert breaker.state is CircuitState.HALF_OPEN
        assert breaker.try_acquire() is True  # the one probe
        assert breaker.try_acquire() is None  # no second probe
        breaker.success(probe=True)
        assert breaker.state is CircuitState.CLOSED
        assert breaker.try_acquire() is False
        assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]

    run_with_mock_clock(scenario)


def test_breaker_failed_probe_reopens_and_cancelled_probe_frees_the_slot() -> None:
    async def scenario() -> None:
        breaker = CircuitBreaker(1, 5.0)
        breaker.failure()
        await trio.sleep(5)
        assert breaker.try_acquire() is True
        breaker.neutral(probe=True)  # the caller gave up: another probe may go
        assert breaker.try_acquire() is True
        breaker.failure(probe=True)
        assert breaker.state is CircuitState.OPEN
        assert breaker.trips == 2
        await trio.sleep(4.9)
        assert breaker.state is CircuitState.OPEN
        await trio.sleep(0.1)
        assert breaker.state is CircuitState.HALF_OPEN

    run_with_mock_clock(scenario)


def test_breaker_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(3, 1.0)

    async def scenario() -> None:
        for _ in range(10):
            breaker.failure()
            breaker.failure()
            breaker.success()
        assert breaker.state is CircuitState.CLOSED
        assert breaker.trips == 0

    run_with_mock_clock(scenario)


# ------------------------------------------------------------- heartbeats (mock clock)


class _FakeCore:
    """Just what ``heartbeat_loop`` uses of a WorkerCore; ``ping`` answers or hangs."""

    def __init__(self, options: SpawnOptions) -> None:
        real = WorkerCore("fake", options)
        self.name = "fake"
        self.pid = None
        self.options = options
        self.metrics = real.metrics
        self.breaker = real.breaker
        self.failed = False
        self.starting = False
        self.answering = True
        self.healthy = True
        self.failures: list[float] = []

    def log_extra(self) -> dict[str, Any]:
        return {}

    def set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy

    async def ping(self) -> float:
        if not self.answering:
            await trio.sleep_forever()
        return 1.0

    def fail_pending(self, make_error: Callable[[], BaseException]) -> None:
        assert isinstance(make_error(), mf.WorkerDied)
        self.failures.append(trio.current_time())


def test_heartbeat_misses_are_detected_in_interval_times_misses_plus_timeout() -> None:
    options = SpawnOptions(heartbeat_interval=5.0, heartbeat_timeout=3.0, heartbeat_max_misses=3)

    async def scenario() -> None:
        core = _FakeCore(options)
        lost: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat_loop, core, lambda: lost.append(trio.current_time()))
            await trio.sleep(12)  # two answered heartbeats
            assert core.metrics.heartbeat_misses == 0
            hung_at = trio.current_time()
            core.answering = False
            await trio.sleep(40)
            assert core.failures
            assert lost == core.failures[:1]
            detected_after = core.failures[0] - hung_at
            # The bound the issue states: interval x misses + timeout.
            assert detected_after <= 5.0 * 3 + 3.0
            assert not core.healthy
            assert core.metrics.heartbeat_misses >= 3
            # Recovery without restarting anything: the next echo makes it healthy again.
            core.answering = True
            await trio.sleep(8.1)
            assert core.healthy
            nursery.cancel_scope.cancel()

    run_with_mock_clock(scenario)


def test_heartbeat_interval_zero_disables_them() -> None:
    async def scenario() -> None:
        core = _FakeCore(SpawnOptions(heartbeat_interval=0))
        with trio.move_on_after(1):
            await heartbeat_loop(core)  # type: ignore[arg-type]
            return
        pytest.fail("heartbeat loop kept running with interval 0")

    run_with_mock_clock(scenario)


def test_heartbeat_closes_a_half_open_circuit() -> None:
    options = SpawnOptions(heartbeat_interval=1.0, circuit_threshold=1, circuit_cooldown=2.0)

    async def scenario() -> None:
        core = _FakeCore(options)
        core.breaker.failure()
        assert core.breaker.state is CircuitState.OPEN
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat_loop, core)
            await trio.sleep(1.5)
            assert core.breaker.state is CircuitState.OPEN  # cool-down not over
            await trio.sleep(1.0)
            assert core.breaker.state is CircuitState.CLOSED
            nursery.cancel_scope.cancel()

    run_with_mock_clock(scenario)


# --------------------------------------------------------------------------- metrics


def test_latency_samples_are_bounded() -> None:
    metrics = Metrics()
    for i in range(LATENCY_SAMPLES * 3):
        metrics.record("f", "success", i / 1e6)
    snapshot = metrics.snapshot()
    assert snapshot.requests_total == LATENCY_SAMPLES * 3
    assert len(metrics._latencies) == LATENCY_SAMPLES
    assert snapshot.latency_min_ms == 0.0
    assert snapshot.latency_max_ms == pytest.approx((LATENCY_SAMPLES * 3 - 1) / 1e3)


@pytest.mark.anyio
async def test_counters_are_exact() -> None:
    """N ok, M remote errors, K timeouts and J cancels are counted exactly."""
    n, m_, k, j = 7, 3, 2, 4
    with anyio.fail_after(60):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            for i in range(n):
                await worker.call.add(i, 1)
            for _ in range(m_):
                with pytest.raises(mf.RemoteCallError):
                    await worker.call.fail("x")
            for _ in range(k):
                with pytest.raises(mf.CallTimeout):
                    await worker.with_options(timeout=0.05).call.sleep(5)
            for _ in range(j):
                with anyio.move_on_after(0.05):
                    await worker.call.sleep(5)
            snapshot = worker.metrics()
    assert snapshot.requests_total == n + m_ + k + j
    assert snapshot.requests_success == n
    assert snapshot.requests_failed == m_
    assert snapshot.requests_timeout == k
    assert snapshot.requests_cancelled == j
    assert snapshot.success_rate == pytest.approx(n / (n + m_ + k + j))
    assert snapshot.functions["add"].requests_success == n
    assert snapshot.functions["fail"].requests_failed == m_
    assert snapshot.functions["sleep"].requests_total == k + j
    assert snapshot.in_flight == 0
    assert snapshot.circuit_breaker_state == "closed"
    assert snapshot.heartbeat_rtt_last_ms is not None  # the readiness heartbeat


# --------------------------------------------------------------------------- real processes


@pytest.mark.anyio
async def test_circuit_opens_on_timeouts_and_recovers() -> None:
    options = SpawnOptions(
        circuit_threshold=3, circuit_cooldown=0.3, heartbeat_interval=0, output=lambda s, x: None
    )
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=options) as worker:
            quick = worker.with_options(timeout=0.05)
            for _ in range(3):
                with pytest.raises(mf.CallTimeout):
                    await quick.call.sleep(5)
            assert worker.circuit_open
            started = worker.metrics().requests_total
            with pytest.raises(mf.CircuitOpenError):
                await worker.call.add(1, 2)
            assert worker.metrics().requests_total == started  # refused without sending
            await anyio.sleep(0.35)  # the cool-down itself
            assert await worker.call.add(1, 2) == 3  # the probe
            assert not worker.circuit_open
            snapshot = worker.metrics()
            assert snapshot.circuit_breaker_trips == 1
            # A remote error does not count by default.
            for _ in range(5):
                with pytest.raises(mf.RemoteCallError):
                    await worker.call.fail("app error")
            assert not worker.circuit_open


@pytest.mark.anyio
async def test_remote_errors_count_when_asked() -> None:
    options = SpawnOptions(
        circuit_threshold=2, circuit_counts_remote_errors=True, output=lambda s, x: None
    )
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=options) as worker:
            for _ in range(2):
                with pytest.raises(mf.RemoteCallError):
                    await worker.call.fail("x")
            assert worker.circuit_open


@pytest.mark.anyio
@pytest.mark.parametrize("hang", ["sigstop", "busy_loop"])
async def test_a_hung_child_is_detected_and_pending_calls_fail(hang: str) -> None:
    interval, timeout, misses = 0.2, 0.2, 2
    options = SpawnOptions(
        heartbeat_interval=interval,
        heartbeat_timeout=timeout,
        heartbeat_max_misses=misses,
        output=lambda s, x: None,
    )
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=options) as worker:
            assert worker.pid is not None
            pid = worker.pid
            failed: list[float] = []

            async def pending(function: str, *args: Any) -> None:
                with pytest.raises(mf.WorkerDied, match="heartbeats"):
                    await worker.call(function, *args)
                failed.append(anyio.current_time())

            async with anyio.create_task_group() as tg:
                tg.start_soon(pending, "sleep", 30)
                while worker.pending_calls < 1:
                    await anyio.sleep(0.01)
                hung_at = anyio.current_time()
                if hang == "sigstop":
                    os.kill(pid, signal.SIGSTOP)
                else:
                    tg.start_soon(pending, "hog", 2.0)
            # interval x misses + timeout, plus one interval of phase and some slack.
            assert failed[0] - hung_at < interval * (misses + 1) + timeout + 0.5
            assert not worker.is_healthy
            if hang == "sigstop":
                os.kill(pid, signal.SIGCONT)
            with anyio.fail_after(5):
                await worker.ping()
            assert worker.is_healthy
            assert await worker.call.add(1, 1) == 2
            assert worker.metrics().heartbeat_misses >= misses


@pytest.mark.anyio
async def test_restarts_keep_the_worker_usable_then_give_up() -> None:
    options = SpawnOptions(max_restarts=5, restart_backoff=0.01, output=lambda s, x: None)
    with anyio.fail_after(60):
        async with mf.open_worker(ECHO, options=options) as worker:
            pids = {worker.pid}
            for _ in range(5):
                with pytest.raises(mf.WorkerDied):
                    await worker.call.crash(1)
                # Calls made while the child restarts wait for the new one.
                assert await worker.call.add(2, 2) == 4
                pids.add(worker.pid)
            assert len(pids) == 6
            assert worker.metrics().restarts == 5
            with pytest.raises(mf.WorkerDied):
                await worker.call.crash(1)
            with pytest.raises(mf.WorkerDied, match="not restarting"):
                await worker.call.add(1, 1)
            assert worker.circuit_open
            assert not worker.is_healthy


@pytest.mark.anyio
async def test_a_hung_child_is_replaced_when_restarts_are_on() -> None:
    options = SpawnOptions(
        max_restarts=1,
        heartbeat_interval=0.2,
        heartbeat_timeout=0.2,
        heartbeat_max_misses=2,
        output=lambda s, x: None,
    )
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=options) as worker:
            first = worker.pid
            assert first is not None
            os.kill(first, signal.SIGSTOP)
            with pytest.raises(mf.WorkerDied):
                await worker.call.sleep(30)
            assert await worker.call.add(3, 4) == 7
            assert worker.pid != first


@pytest.mark.anyio
async def test_a_sync_handler_outliving_its_deadline_is_dropped_and_counted() -> None:
    """Policy: the thread is not interrupted; it finishes and its result is dropped."""
    with anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            started = anyio.current_time()
            with pytest.raises(mf.CallTimeout):
                await worker.with_options(timeout=0.1).call.block(0.5)
            assert anyio.current_time() - started < 0.4  # released on time
            assert await worker.call.wait_abandoned(1, 5.0) == 1
            stats = await worker.call.stats()
            assert stats["calls_cancelled"] == 1
            assert stats["calls_succeeded"] >= 1


@pytest.mark.anyio
async def test_output_flood_neither_blocks_calls_nor_loses_lines() -> None:
    lines: list[str] = []
    options = SpawnOptions(output=lambda stream, line: lines.append(line))
    with anyio.fail_after(120):
        async with mf.open_worker(ECHO, options=options) as worker:
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.call.flood, 100_000)
                for i in range(200):
                    with anyio.fail_after(2):  # no call waits behind the flood
                        assert await worker.call.add(i, 1) == i + 1
            assert await worker.call.add(0, 0) == 0
    assert len(lines) == 100_000
    assert lines[0] == "line 0"
    assert lines[-1] == "line 99999"


class _ParentQueues:
    """Stands in for the child's channel: each parent's queue is full until given room,
    and what left is recorded in order. Like a zmq ROUTER, it only tells waiting senders
    that some parent has room, not which."""

    closed = False

    def __init__(self) -> None:
        self.room: set[bytes] = set()
        self.sent: list[tuple[bytes, str]] = []
        self.messages: list[dict[str, Any]] = []
        self._changed = trio.Event()

    def try_send(self, frames: list[bytes]) -> bool:
        if frames[0] not in self.room:
            return False
        message = mf._messages.unpack(frames[2])
        self.sent.append((frames[0], message["type"]))
        self.messages.append(message)
        return True

    async def wait_room(self, pause: float) -> None:
        if self.room:
            await trio.sleep(pause)
        else:
            await self._changed.wait()

    def make_room(self, parent: bytes, *, tell_waiting_senders: bool = True) -> None:
        self.room.add(parent)
        if tell_waiting_senders:
            self._changed.set()
            self._changed = trio.Event()

    def received(self, parent: bytes) -> list[str]:
        return [kind for who, kind in self.sent if who == parent]


def _child_with_parent_queues(
    parents: list[bytes], worker: mf.ChildWorker | None = None
) -> tuple[mf.ChildWorker, mf._child._OutputPump, _ParentQueues]:
    worker = worker if worker is not None else mf.ChildWorker()
    queues = _ParentQueues()
    worker._channel = queues  # type: ignore[assignment]
    worker._parents.update(dict.fromkeys(parents))
    pump = mf._child._OutputPump(worker, {"stdout": sys.stdout, "stderr": sys.stderr})
    worker._output = pump
    return worker, pump, queues


def _response() -> bytes:
    return mf._messages.encode(mf._messages.make_response("call-1", 3))


class _InlineAdder(mf.ChildWorker):
    @mf.inline
    def add(self, a: int, b: int) -> int:
        return a + b


def test_inline_replies_of_one_drain_go_the_first_at_once_the_others_at_its_end() -> None:
    """A lone inline call waits for nothing; calls read together reply in one burst."""

    async def main() -> None:
        worker, _, queues = _child_with_parent_queues([b"parent"], _InlineAdder())
        queues.make_room(b"parent")
        calls = [mf._messages.make_call("add", (i, 1)) for i in range(3)]
        for call in calls:
            worker._on_frames([b"parent", b"", mf._messages.encode(call)])
        assert [reply["id"] for reply in queues.messages] == [calls[0]["id"]]
        worker._end_of_drain()  # the channel's end-of-drain hook
        assert [(reply["id"], reply["result"]) for reply in queues.messages] == [
            (call["id"], index + 1) for index, call in enumerate(calls)
        ]
        worker._on_frames([b"parent", b"", mf._messages.encode(calls[0])])
        assert len(queues.messages) == 4  # the next drain's first reply goes at once again

    run_with_mock_clock(main)


def test_a_drain_inside_the_send_of_held_replies_keeps_their_order() -> None:
    """Off trio a send drains the socket again; a call read there replies after the ones
    still held, not before them."""

    async def main() -> None:
        worker, _, queues = _child_with_parent_queues([b"parent"], _InlineAdder())
        queues.make_room(b"parent")
        calls = [mf._messages.make_call("add", (i, 1)) for i in range(4)]
        plain_send = queues.try_send

        def send_then_drain(frames: list[bytes]) -> bool:
            sent = plain_send(frames)
            if len(queues.messages) == 2:  # the first held reply just left: read one more
                worker._on_frames([b"parent", b"", mf._messages.encode(calls[3])])
                worker._end_of_drain()
            return sent

        queues.try_send = send_then_drain  # type: ignore[method-assign]
        for call in calls[:3]:
            worker._on_frames([b"parent", b"", mf._messages.encode(call)])
        worker._end_of_drain()
        assert [reply["id"] for reply in queues.messages] == [call["id"] for call in calls]

    run_with_mock_clock(main)


def test_a_reply_never_overtakes_printed_text_waiting_for_room() -> None:
    """The parent's queue was full while a call printed; room appears just as its reply
    is ready (before the pump waiting for room has noticed): the text still goes first."""

    async def main() -> None:
        worker, pump, queues = _child_with_parent_queues([b"parent"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            pump.push("stdout", b"parent", "printed by the call\n")
            await trio.testing.wait_all_tasks_blocked()  # the pump now waits for room
            queues.make_room(b"parent", tell_waiting_senders=False)
            assert worker._send_reply(b"parent", _response()) is None  # left at once
            nursery.cancel_scope.cancel()
        assert queues.received(b"parent") == ["stdout", "response"]

    run_with_mock_clock(main)


def test_a_parent_that_does_not_read_holds_back_only_what_is_for_it() -> None:
    async def main() -> None:
        worker, pump, queues = _child_with_parent_queues([b"stuck", b"reading"])
        queues.make_room(b"reading")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            pump.push("stdout", b"stuck", "for the parent that does not read\n")
            await trio.testing.wait_all_tasks_blocked()
            assert worker._send_reply(b"reading", _response()) is None
            assert queues.received(b"reading") == ["response"]
            queued = worker._send_reply(b"stuck", _response())
            assert queued is not None  # behind its parent's text
            queues.make_room(b"stuck")
            with trio.fail_after(5):
                await queued.sent.wait()
            nursery.cancel_scope.cancel()
        assert queues.received(b"stuck") == ["stdout", "response"]

    run_with_mock_clock(main)


def test_a_heartbeat_echo_passes_printed_text_waiting_for_its_parent() -> None:
    """Printed text may wait a long time for a slow parent; the echo must not, or the
    parent would take a live worker for a hung one."""

    async def main() -> None:
        worker, pump, queues = _child_with_parent_queues([b"parent"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            for i in range(100):
                pump.push("stdout", b"parent", f"line {i}\n")
            await trio.testing.wait_all_tasks_blocked()
            heartbeat = mf._messages.encode(mf._messages.make_heartbeat())
            worker._on_frames([b"parent", b"", heartbeat])
            queues.make_room(b"parent")
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert queues.received(b"parent")[:2] == ["heartbeat", "stdout"]
        assert pump.idle

    run_with_mock_clock(main)


def test_text_for_several_parents_reaches_each_once_when_one_had_no_room() -> None:
    async def main() -> None:
        _, pump, queues = _child_with_parent_queues([b"served", b"full"])
        queues.make_room(b"served")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            pump.push("stdout", None, "printed outside any call\n")
            pump.flush_now()
            assert queues.received(b"served") == ["stdout"]
            queues.make_room(b"full")
            await trio.testing.wait_all_tasks_blocked()
            assert pump.idle
            nursery.cancel_scope.cancel()
        assert queues.received(b"served") == ["stdout"]
        assert queues.received(b"full") == ["stdout"]

    run_with_mock_clock(main)


def test_text_printed_outside_calls_to_a_broken_stdout_is_lost_not_fatal() -> None:
    """Connect mode keeps such text local; a closed pipe there must not stop the worker
    (the text may be sent from inside a drain, where an error would end the event loop)."""

    class BrokenPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    async def main() -> None:
        worker, pump, queues = _child_with_parent_queues([b"parent"])
        worker.connect_mode = True
        pump._originals["stdout"] = BrokenPipe()
        queues.make_room(b"parent")
        pump.push("stdout", None, "nobody's text\n")
        pump.push("stdout", b"parent", "the caller's text\n")
        pump.flush_now()
        assert queues.received(b"parent") == ["stdout"]
        assert pump.idle

    run_with_mock_clock(main)


@pytest.mark.anyio
async def test_output_can_go_to_a_logger(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.worker_output")
    options = SpawnOptions(output=logger)
    with caplog.at_level(logging.INFO, logger="tests.worker_output"), anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=options) as worker:
            await worker.call.shout("logged")
    records = [r for r in caplog.records if r.name == "tests.worker_output"]
    assert ("logged", logging.INFO) in [(r.getMessage(), r.levelno) for r in records]
    assert ("err:logged", logging.WARNING) in [(r.getMessage(), r.levelno) for r in records]
    assert all(getattr(r, "worker", None) == "echo_worker.py" for r in records)


@pytest.mark.anyio
async def test_lifecycle_events_are_logged_with_structured_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="multifrost_trio"), anyio.fail_after(30):
        async with mf.open_worker(ECHO, options=QUIET) as worker:
            pid = worker.pid
    ours = [r for r in caplog.records if r.name.startswith("multifrost_trio")]
    messages = [r.getMessage() for r in ours]
    assert any("ready" in text for text in messages)
    assert any("stopped" in text for text in messages)
    assert all(getattr(r, "pid", pid) == pid for r in ours if hasattr(r, "worker"))


def test_ctrl_c_in_a_parent_with_three_workers() -> None:
    parent = subprocess.Popen(
        [sys.executable, worker_path("ctrl_c_parent.py"), ECHO],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        ready, _, _ = select.select([parent.stdout], [], [], 30)
        assert ready, "parent never reported its workers"
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3
        pidfds = [os.pidfd_open(pid) for pid in pids]
        try:
            parent.send_signal(signal.SIGINT)
            # Three children stop one after another: about 0.7 s here, over 2 s on a busy
            # machine; the bound is for a hang, not for speed.
            parent.wait(timeout=15)
            assert "KeyboardInterrupt" in (parent.stderr.read() if parent.stderr else "")
            for pidfd in pidfds:  # the children were reaped by the parent: already gone
                done, _, _ = select.select([pidfd], [], [], 0)
                assert done
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
    finally:
        parent.kill()
        parent.wait(timeout=10)


def _sync_job(method: Callable[..., Any], *args: Any) -> Any:
    """A job for a ``_ThreadRunner``, as the worker makes one for a call."""
    request = mf._messages.CallRequest("call-id", "method", list(args), "default")
    return mf._child._SyncJob(b"parent", request, method)


def test_the_sync_thread_pool_serves_again_after_a_run_ended() -> None:
    """A worker may be served again in a new trio run: its threads deliver finished jobs
    to that run, and a thread that finishes after a run ended leaves the pool's count."""
    child = mf._child
    finished: list[trio.Event] = []

    def deliver(_: Any) -> None:
        finished[-1].set()

    runner = child._ThreadRunner(2, send=lambda _: False, on_done=deliver, waiting_calls=lambda: 0)

    async def one_call(method: Callable[[], Any]) -> None:
        finished.append(trio.Event())
        with trio.fail_after(10):
            runner.submit(_sync_job(method))
            runner.put_submitted()  # what the worker's instrument does before waiting
            await finished[-1].wait()

    trio.run(one_call, lambda: 1)
    runner.stop_serving()
    trio.run(one_call, lambda: 2)  # the thread left from the first run delivers here

    started, release = threading.Event(), threading.Event()
    straggler: list[threading.Thread] = []

    def block_until_released() -> None:
        straggler.append(threading.current_thread())
        started.set()
        release.wait(10)

    async def submit_only() -> None:
        runner.submit(_sync_job(block_until_released))
        runner.put_submitted()

    trio.run(submit_only)
    runner.stop_serving()
    assert started.wait(10)
    threads_before = runner._threads
    release.set()  # it finishes with no run to deliver to, and leaves
    straggler[0].join(10)
    assert not straggler[0].is_alive()
    assert runner._threads == threads_before - 1
    trio.run(one_call, lambda: 3)


@pytest.mark.parametrize(
    ("sent", "waiting", "woken"), [(True, 0, False), (True, 1, True), (False, 0, True)]
)
def test_a_thread_wakes_the_loop_for_a_finished_job_only_when_it_must(
    sent: bool, waiting: int, woken: bool
) -> None:
    """A job whose reply its thread sent waits for the loop's next message, unless calls
    wait for a slot; a job whose send was left to the loop always wakes it. A job waiting
    for its booking keeps neither its arguments nor a reply already sent."""
    child = mf._child
    booked: list[Any] = []
    replied = threading.Event()

    def send(_: Any) -> bool:
        replied.set()
        return sent

    runner = child._ThreadRunner(1, send=send, on_done=booked.append, waiting_calls=lambda: waiting)
    job = _sync_job(lambda _: 1, b"x" * 1000)

    async def main() -> None:
        with trio.fail_after(10):
            runner.submit(job)
            runner.put_submitted()
            while not runner._first_idle:  # the thread registers for the next job last
                await trio.sleep(0.001)
            assert replied.is_set()
            if woken:
                while not booked:
                    await trio.sleep(0.001)
            else:
                assert runner.finished
                assert not runner._delivery_scheduled
                assert job.call.args == []
                assert job.payload == b""
                assert not booked
                runner.book_finished()  # what the loop does when its next message comes
        assert booked == [job]
        assert job.sent is sent
        assert not runner.finished

    trio.run(main)


def test_a_cancel_read_while_a_thread_sends_the_reply_comes_too_late() -> None:
    """Once a thread has taken the send of its reply, a ``cancel`` for the call is refused:
    the call is counted once, as answered. A cancel before the handler ran abandons it."""
    child = mf._child
    booked: list[Any] = []
    refused: list[bool] = []
    job = _sync_job(lambda: 1)

    def send_while_cancelled(sending: Any) -> bool:
        refused.append(not runner.abandon(sending))  # the loop reads the cancel meanwhile
        return True

    runner = child._ThreadRunner(
        1, send=send_while_cancelled, on_done=booked.append, waiting_calls=lambda: 1
    )
    cancelled_early = _sync_job(lambda: 1 / 0)
    assert runner.abandon(cancelled_early)

    async def main() -> None:
        with trio.fail_after(10):
            for count, submitted in enumerate((cancelled_early, job), 1):
                runner.submit(submitted)
                runner.put_submitted()
                while len(booked) < count:  # one at a time: the send needs none waiting
                    await trio.sleep(0.001)

    trio.run(main)
    assert refused == [True]
    assert job.sent
    assert not job.abandoned
    assert not cancelled_early.sent  # never run: its handler would have raised
    assert not cancelled_early.failed


class _NarrowSyncAdder(mf.ChildWorker):
    def add(self, a: int, b: int) -> int:
        return a + b


def test_a_call_joining_the_backlog_books_a_job_finished_meanwhile() -> None:
    """A thread that finished just before a call joined the backlog did not see the backlog
    (so did not wake the loop): the call books that job as it joins, and takes its slot."""

    async def main() -> None:
        worker, _, queues = _child_with_parent_queues(
            [b"parent"], _NarrowSyncAdder(max_concurrency=1)
        )
        queues.make_room(b"parent")
        first, second = (mf._messages.make_call("add", (i, 1)) for i in range(2))
        request = mf._messages.CallRequest.from_raw(first)
        assert request is not None
        finished = mf._child._SyncJob(b"parent", request, worker.add)
        finished.sent = True  # its thread sent the reply, and saw no call waiting
        worker._active = 1
        worker._sync_jobs[request.id] = finished
        worker._threads._done.append(finished)
        second_request = mf._messages.CallRequest.from_raw(second)
        assert second_request is not None
        worker._on_call(b"parent", second_request)  # read just after: the slot is full
        assert not worker._backlog
        assert list(worker._sync_jobs) == [second_request.id]  # handed to a thread
        assert worker.counters.calls_succeeded == 1

    run_with_mock_clock(main)


def test_a_reply_that_fails_to_encode_on_its_thread_becomes_an_error_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Encoding a checked reply fails only for want of memory; the thread then answers with
    an error instead of dying with its call unanswered."""
    child = mf._child
    plain_encode = mf._messages.encode

    def encode_or_fail(message: mf._messages.WireMap) -> bytes:
        if message["type"] == "response":
            raise MemoryError("no room for the reply")
        return plain_encode(message)

    monkeypatch.setattr(mf._messages, "encode", encode_or_fail)
    job = _sync_job(lambda: 1)
    child._ThreadRunner._run(job)
    assert job.failed
    error = mf._messages.unpack(job.payload)
    assert error["type"] == "error"
    assert error["id"] == "call-id"
    assert "MemoryError: no room for the reply" in error["error"]


def test_sync_threads_beyond_the_first_end_after_waiting_idle() -> None:
    """A burst's extra threads end once idle for ``idle_seconds``; the first stays, and
    the pool serves the next job (and starts threads again for the next burst)."""
    child = mf._child
    booked: list[Any] = []
    runner = child._ThreadRunner(
        4,
        send=lambda _: False,
        on_done=booked.append,
        waiting_calls=lambda: 0,
        idle_seconds=0.05,
    )

    async def burst(size: int) -> None:
        together = threading.Barrier(size, timeout=10)  # needs ``size`` threads at once
        for _ in range(size):
            runner.submit(_sync_job(together.wait))
        runner.put_submitted()
        expected = len(booked) + size
        while len(booked) < expected:
            await trio.sleep(0.01)

    async def main() -> None:
        with trio.fail_after(20):
            await burst(4)
            while runner._threads > 1 or not runner._first_idle:  # the three others end
                await trio.sleep(0.01)
            assert runner._idle == 0
            await burst(1)
            await burst(3)
            assert all(not finished.failed for finished in booked)

    trio.run(main)
