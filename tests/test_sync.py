"""The blocking API (``multifrost_trio.sync``), from plain test functions and from threads."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio

import multifrost_trio as mf
from multifrost_trio import sync
from tests.conftest import worker_path

pytestmark = pytest.mark.timeout(60)

ECHO = worker_path("echo_worker.py")
QUIET = mf.SpawnOptions(output=lambda stream, line: None)
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "blocking_script.py"


def _portal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(sync._THREAD_NAME_PREFIX)]


def test_call_forms_and_properties() -> None:
    with sync.open_worker(ECHO, options=QUIET) as worker:
        assert worker.call("add", 1, 2) == 3
        assert worker.call.add(20, 22) == 42
        assert worker.call.add_sync(3, 4) == 7
        assert worker.call.echo({"k": [1, b"x", None]}) == {"k": [1, b"x", None]}
        assert worker.call("echo_sync", "héllo") == "héllo"
        assert {"add", "add_sync", "echo", "sleep", "fail"} <= set(worker.list_functions())
        assert worker.name == "echo_worker.py"
        assert worker.pid == worker.call.pid()
        assert worker.is_healthy
        assert worker.pending_calls == 0
        assert worker.timeout is None
        assert worker.namespace == "default"
        rtt = worker.last_heartbeat_rtt_ms
        assert rtt is not None
        assert rtt >= 0
        assert "echo_worker.py" in repr(worker)
        metrics = worker.metrics()
        assert isinstance(metrics, mf.MetricsSnapshot)
        assert metrics.functions["add"].requests_success == 2
        assert metrics.in_flight == 0


def test_options_are_the_async_apis() -> None:
    options = mf.SpawnOptions(output=lambda stream, line: None, timeout=0.2, namespace="elsewhere")
    with sync.open_worker(ECHO, options=options) as worker:
        assert worker.timeout == 0.2
        # A worker ignores calls for another namespace: the default timeout ends the wait.
        with pytest.raises(mf.CallTimeout):
            worker.call.add(1, 2)
        view = worker.with_options(namespace="default", timeout=5)
        assert view.call.add(1, 2) == 3
        assert view.timeout == 5
        assert worker.namespace == "elsewhere"  # the original view is unchanged
        with pytest.raises(ValueError, match="positive"):
            worker.with_options(timeout=0)


def test_errors_are_raised_as_themselves() -> None:
    with sync.open_worker(ECHO, options=QUIET) as worker:
        with pytest.raises(mf.RemoteCallError) as info:
            worker.call.fail("x")
        assert type(info.value) is mf.RemoteCallError
        assert info.value.remote_type == "ValueError"
        assert info.value.remote_message == "x"
        with pytest.raises(mf.EncodeError, match="int64"):
            worker.call.echo(2**70)
        with pytest.raises(mf.RemoteCallError):
            worker.call.no_such_function()
        assert worker.call.add(1, 1) == 2  # still usable


def test_missing_script_raises_worker_start_error_and_leaves_no_thread() -> None:
    before = set(threading.enumerate())
    with (
        pytest.raises(mf.WorkerStartError),
        sync.open_worker(worker_path("no_such_worker.py"), options=QUIET),
    ):
        pytest.fail("the block must not run")
    assert not (set(_portal_threads()) - before)


def test_worker_death_raises_worker_died() -> None:
    with sync.open_worker(ECHO, options=QUIET) as worker:
        with pytest.raises(mf.WorkerDied) as info:
            worker.call.crash(3)
        assert info.value.exit_code == 3
        assert not worker.is_healthy
        with pytest.raises(mf.WorkerDied):
            worker.call.add(1, 2)


def test_many_threads_share_one_worker() -> None:
    def work(worker: sync.BlockingWorker, thread: int) -> list[int]:
        return [worker.call.add(thread * 1000, i) for i in range(200)]

    with sync.open_worker(ECHO, options=QUIET) as worker, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(work, worker, thread) for thread in range(8)]
        for thread, future in enumerate(futures):
            assert future.result(timeout=50) == [thread * 1000 + i for i in range(200)]
        assert worker.metrics().functions["add"].requests_success == 1600
        assert worker.pending_calls == 0


def test_timeout_releases_the_caller_on_time_and_cancels_the_handler() -> None:
    with sync.open_worker(ECHO, options=QUIET) as worker:
        short = worker.with_options(timeout=0.2)
        started = time.monotonic()
        with pytest.raises(mf.CallTimeout):
            short.call.sleep(30)
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 2.0
        assert worker.call.wait_cancelled(5) is True
        assert worker.metrics().requests_timeout == 1


def test_timeout_in_one_thread_does_not_disturb_others() -> None:
    with sync.open_worker(ECHO, options=QUIET) as worker, ThreadPoolExecutor(2) as pool:
        slow = pool.submit(worker.with_options(timeout=0.3).call.sleep, 30)
        fast = pool.submit(lambda: [worker.call.add(i, i) for i in range(100)])
        assert fast.result(timeout=30) == [2 * i for i in range(100)]
        with pytest.raises(mf.CallTimeout):
            slow.result(timeout=30)
        assert worker.call.wait_cancelled(5) is True


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_keyboard_interrupt_while_waiting_cancels_the_handler() -> None:
    with sync.open_worker(ECHO, options=QUIET) as worker:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                worker.call.sleep(30)
        finally:
            timer.cancel()
        assert worker.call.wait_cancelled(5) is True
        assert worker.call.add(1, 2) == 3


def test_leaving_the_block_stops_the_worker_and_joins_the_thread() -> None:
    before = set(threading.enumerate())
    with sync.open_worker(ECHO, options=QUIET) as worker:
        pid = worker.pid
        assert pid is not None
        os.kill(pid, 0)  # alive
        portals = _portal_threads()
        assert len(portals) == 1
        assert portals[0].is_alive()
        assert "echo_worker.py" in portals[0].name
    assert not portals[0].is_alive()
    assert not _portal_threads()
    # Only trio's own idle thread cache may remain (it exits on its own).
    left = [t for t in set(threading.enumerate()) - before if not t.name.startswith("Trio")]
    assert not left
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not worker.is_healthy
    with pytest.raises(mf.WorkerDied, match="stopped"):
        worker.call.add(1, 2)
    assert worker.metrics().requests_total == 0  # readable after the block, nothing sent


def test_pending_calls_in_other_threads_fail_when_the_block_ends() -> None:
    with ThreadPoolExecutor(1) as pool:
        with sync.open_worker(ECHO, options=QUIET) as worker:
            pending = pool.submit(worker.call.sleep, 30)
            deadline = time.monotonic() + 10
            while worker.pending_calls == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert worker.pending_calls == 1
        with pytest.raises(mf.WorkerDied):
            pending.result(timeout=10)


def test_exception_in_the_block_is_untouched_and_stops_the_worker() -> None:
    cause = KeyError("inner")
    with (
        pytest.raises(RuntimeError, match="outer") as info,
        sync.open_worker(ECHO, options=QUIET) as worker,
    ):
        pid = worker.pid
        assert pid is not None
        raise RuntimeError("outer") from cause
    assert info.value.__cause__ is cause
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not _portal_threads()


def test_refuses_to_block_inside_an_event_loop() -> None:
    async def open_inside() -> None:
        with sync.open_worker(ECHO, options=QUIET):
            pass  # pragma: no cover

    with pytest.raises(RuntimeError, match="async API"):
        trio.run(open_inside)
    with pytest.raises(RuntimeError, match="async API"):
        asyncio.run(open_inside())

    with sync.open_worker(ECHO, options=QUIET) as worker:

        async def call_inside() -> None:
            worker.call.add(1, 2)

        with pytest.raises(RuntimeError, match="async API"):
            trio.run(call_inside)
        with pytest.raises(RuntimeError, match="async API"):
            asyncio.run(call_inside())
        assert worker.call.add(1, 2) == 3

        # A worker thread of an event loop is a plain thread: blocking there is fine.
        async def call_in_thread() -> int:
            result: int = await trio.to_thread.run_sync(worker.call.add, 2, 3)
            return result

        assert trio.run(call_in_thread) == 5
        assert asyncio.run(asyncio.to_thread(worker.call.add, 3, 4)) == 7


def test_calling_from_the_loop_thread_raises_instead_of_deadlocking() -> None:
    # The output sink runs in the portal's own event loop thread.
    seen: list[BaseException] = []
    holder: list[sync.BlockingWorker] = []

    def sink(stream: str, line: str) -> None:
        if stream == "stdout" and line == "hi" and holder:
            try:
                holder[0].call.add(1, 2)
            except BaseException as exc:
                seen.append(exc)

    with sync.open_worker(ECHO, options=mf.SpawnOptions(output=sink)) as worker:
        holder.append(worker)
        assert worker.call.shout("hi") == "HI"
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(seen) == 1
    assert isinstance(seen[0], RuntimeError)
    assert "async API" in str(seen[0])


def test_blocking_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "add(20, 22) = 42" in out
    assert "factorial(20) = 2432902008176640000" in out
    assert "divide(1, 0) failed: ZeroDivisionError" in out
    assert "slow_square timed out" in out
    assert "threads: [0, 1, 4, 9, 16, 25, 36, 49]" in out
    assert "Hello, Ada!" in out


@pytest.mark.timeout(60)
def test_connect_worker_blocking(tmp_path: Path) -> None:
    """The blocking API in connect mode: by service name, from two threads."""
    env = {**os.environ, "MULTIFROST_REGISTRY_DIR": str(tmp_path)}
    service = subprocess.Popen(
        [sys.executable, worker_path("service_worker.py"), "--service-id", "sync-svc"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    try:
        with sync.connect_worker("sync-svc", registry_dir=tmp_path, timeout=20) as worker:
            assert worker.pid == service.pid
            results: list[int] = []

            def calls() -> None:
                results.extend(worker.call.add(i, 1) for i in range(100))

            threads = [threading.Thread(target=calls) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            assert sorted(results) == sorted(list(range(1, 101)) * 2)
        assert service.poll() is None  # disconnecting leaves the shared service running
    finally:
        service.terminate()
        service.wait(timeout=10)
