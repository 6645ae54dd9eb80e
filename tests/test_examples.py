"""Every script in ``examples/`` runs and prints what it promises (so they never rot).

Each runs in a subprocess with a deadline; like :mod:`tests.test_cli`, nothing it started
(its workers included) may outlive it. ``examples/blocking_script.py`` is run by
``tests/test_sync.py``; the connect-mode example has its own test where it lives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.test_cli import run_tracked
from tests.test_node import NODE, NPM, node_modules  # noqa: F401  (the session fixture)

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(sys.platform != "linux", reason="the leftover check reads /proc"),
]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_TIMEOUT = 40.0


def run_example(name: str, *args: str) -> str:
    """Run ``examples/<name>`` to completion and return its stdout (it must exit 0)."""
    done = run_tracked(
        [sys.executable, str(EXAMPLES / name), *args], uuid.uuid4().hex, EXAMPLE_TIMEOUT
    )
    assert done.returncode == 0, f"{name} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_trio_parent() -> None:
    out = run_example("trio_parent.py").splitlines()
    assert out[0] == "functions: add, divide, factorial, greet, list_functions, slow_square"
    assert "add(20, 22) = 42" in out
    assert "factorial(10) = 3628800" in out
    squares = next(line for line in out if line.startswith("slow_square x5"))
    assert squares.startswith("slow_square x5: [0, 1, 4, 9, 16] in ")
    assert squares.endswith("(in parallel)")
    assert "divide(1, 0) raised ZeroDivisionError: division by zero" in out
    assert "[math_worker.py STDOUT]: greeting trio" in out
    assert "Hello, trio!" in out
    assert out[-1] == "worker stopped"


def test_asyncio_app() -> None:
    out = run_example("asyncio_app.py").splitlines()
    assert out == [
        "add(20, 22) = 42",
        "slow_square x4 = [0, 1, 4, 9]",
        "with_options(timeout=0.1): CallTimeout (a TimeoutError: True): "
        "call 'slow_square' to math_worker.py timed out after 0.1 s",
        "asyncio.timeout(0.1): TimeoutError",
        "still serving: add(1, 2) = 3",
        "timeouts: 1, cancelled: 1",
    ]


def test_cancellation() -> None:
    out = run_example("cancellation.py").splitlines()
    assert out == [
        "move_on_after(0.2): gave up = True",
        "worker: 1 cancelled, 0 finished",
        "with_options(timeout=0.2): CallTimeout",
        "nursery cancelled with 5 calls in flight",
        "worker: 7 started, 7 cancelled, 0 finished",
        "slept 0.05 s",
    ]


def test_metrics_and_health() -> None:
    out = run_example("metrics_and_health.py")
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    assert fields["requests_total"] == "102"
    assert fields["requests_success"] == "100"
    assert fields["requests_failed"] == "1"
    assert fields["requests_timeout"] == "1"
    assert fields["success_rate"] == "0.980"
    assert float(fields["latency_p50_ms"]) > 0
    assert float(fields["latency_p99_ms"]) >= float(fields["latency_p50_ms"])
    assert fields["in_flight"] == "0"
    assert fields["circuit_breaker_state"] == "closed"
    assert fields["functions['add']"].startswith("100 ok, p50 ")
    assert fields["is_healthy"] == "True"
    assert float(fields["last_heartbeat_rtt_ms"]) >= 0
    assert fields["circuit_open"] == "False"
    assert fields["ping"].endswith(" ms")
    assert float(fields["ping"].removesuffix(" ms")) >= 0


@pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are needed")
@pytest.mark.usefixtures("node_modules")
def test_node_worker() -> None:
    worker = Path(__file__).resolve().parent / "node" / "worker.mjs"
    out = run_example("node_worker.py", str(worker)).splitlines()
    assert out[0].startswith("node worker pid ")
    assert out[0].endswith("functions: ['add', 'echo', 'fail', 'hello', 'list_functions']")
    assert out[1:] == [
        "add(20, 22) = 42",
        "echo round trip equal: True",
        "[worker.mjs STDOUT]: hi python",
        "hello python",
        "fail() raised Error: thrown in node",
    ]


def test_node_worker_default_path_and_missing_script() -> None:
    """Without an argument it uses tests/node/worker.mjs; a wrong path is a clear error."""
    source = (EXAMPLES / "node_worker.py").read_text()
    assert '"tests" / "node" / "worker.mjs"' in source
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "node_worker.py"), "/nonexistent/worker.mjs"],
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT,
    )
    assert done.returncode == 2
    expected = (
        "this example needs Node.js (`node` on PATH)"
        if NODE is None
        else "no such worker script: /nonexistent/worker.mjs"
    )
    assert done.stderr.strip() == expected


def test_connect_mode_service_and_caller(tmp_path: Path) -> None:
    env = {**os.environ, "MULTIFROST_REGISTRY_DIR": str(tmp_path)}
    service = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "math_service.py")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        caller = subprocess.run(
            [sys.executable, str(EXAMPLES / "connect_caller.py")],
            capture_output=True,
            text=True,
            env=env,
            timeout=EXAMPLE_TIMEOUT,
        )
        assert caller.returncode == 0, caller.stderr
        assert f"connected to pid {service.pid}" in caller.stdout
        assert "add(20, 22) -> 42" in caller.stdout
        assert "greet('Ada') -> Hello, Ada!" in caller.stdout
        assert "[math-service STDOUT]: greeting Ada" in caller.stdout
        assert service.poll() is None  # disconnecting did not stop the shared service
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=10) == 0
        assert json.loads((tmp_path / "services.json").read_text()) == {}
    finally:
        if service.poll() is None:
            service.kill()
        service.wait(timeout=10)


def test_secure_service() -> None:
    out = run_example("secure_service.py")
    assert "alice (allowed): add(2, 3) -> 5" in out
    assert "mallory (not on the allow-list): refused" in out
