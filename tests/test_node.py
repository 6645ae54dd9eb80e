"""Cross-language interop with Node.js peers written from PROTOCOL.md alone.

* our parent -> ``tests/node/worker.mjs`` (a Node ROUTER child), on trio and asyncio;
* ``tests/node/caller.mjs`` (a Node DEALER parent, spawn mode) -> our Python child
  ``tests/workers/echo_worker.py``.

The Node side needs ``zeromq`` and ``msgpackr`` from npm: installed once per session into
``tests/node/node_modules`` if missing (the tests skip when that is impossible).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import multifrost_trio as mf
from tests.conftest import worker_path

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_WORKER = str(NODE_DIR / "worker.mjs")
NODE_CALLER = str(NODE_DIR / "caller.mjs")
NODE = shutil.which("node")
NPM = shutil.which("npm")
NPM_INSTALL_TIMEOUT = 180
CALLER_TIMEOUT = 40  # caller.mjs gives itself 20 s; this is the backstop

pytestmark = [
    pytest.mark.skipif(
        NODE is None or NPM is None, reason="node and npm are needed for the Node.js interop tests"
    ),
    pytest.mark.skipif(sys.platform == "win32", reason="process-group cleanup is POSIX-only"),
    pytest.mark.usefixtures("node_modules"),
]


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """``tests/node/node_modules`` with zeromq and msgpackr (``npm install`` once if missing)."""
    assert NODE is not None
    assert NPM is not None
    modules = NODE_DIR / "node_modules"
    if not (modules / "zeromq").is_dir() or not (modules / "msgpackr").is_dir():
        try:
            done = subprocess.run(
                [NPM, "install", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=NPM_INSTALL_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm install in {NODE_DIR} took longer than {NPM_INSTALL_TIMEOUT} s")
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            pytest.skip(f"npm install in {NODE_DIR} failed ({done.returncode}):\n{tail}")
    # The native zeromq binding must load on this machine, or nothing below can work.
    probe = subprocess.run(
        [NODE, "--input-type=module", "-e", "await import('zeromq'); await import('msgpackr');"],
        cwd=NODE_DIR,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"node cannot load zeromq/msgpackr: {probe.stderr.strip()[-1500:]}")
    return modules


class Lines:
    """An ``output`` sink that records every (stream, line) the worker printed."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __call__(self, stream: str, line: str) -> None:
        self.lines.append((stream, line))


def _options(sink: Lines | None = None) -> mf.SpawnOptions:
    return mf.SpawnOptions(output=sink if sink is not None else Lines())


# --------------------------------------------------------------------------- our parent -> Node


@pytest.mark.anyio
async def test_node_worker_add_and_list_functions() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(NODE_WORKER, options=_options()) as worker:
            assert await worker.call("add", 1, 2) == 3
            assert await worker.call.add(20, 22) == 42
            assert await worker.call.add(1.5, 2.25) == 3.75
            # ints beyond 32 bits reach Node as BigInt and come back as msgpack ints
            assert await worker.call.add(2**40, 1) == 2**40 + 1
            assert await worker.list_functions() == [
                "add",
                "echo",
                "fail",
                "hello",
                "list_functions",
            ]
            assert worker.last_heartbeat_rtt_ms is not None  # readiness was a heartbeat echo


ECHO_VALUES: list[Any] = [
    "",
    "héllo wörld ✓",
    0,
    -1,
    7,
    2**31,
    2**32,
    -(2**63),
    2**63 - 1,
    1.25,
    -0.5,
    True,
    False,
    None,
    b"",
    b"\x00\x01\x7f\x80\xff",
    [],
    [1, "two", 3.5, None, b"4", [True, []]],
    {},
    {"nested": {"list": [1, [2, [3, {"deep": b"x"}]]], "empty": {}, "s": "é"}},
]


@pytest.mark.anyio
async def test_node_worker_echo_round_trips_portable_values() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(NODE_WORKER, options=_options()) as worker:
            for value in ECHO_VALUES:
                echoed = await worker.call.echo(value)
                assert echoed == value
                assert type(echoed) is type(value), (value, echoed)
            # JS has one number type: an integral float comes back as an int (equal value).
            assert await worker.call.echo(2.0) == 2


@pytest.mark.anyio
async def test_node_worker_fail_raises_remote_call_error() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(NODE_WORKER, options=_options()) as worker:
            with pytest.raises(mf.RemoteCallError, match="thrown in node") as info:
                await worker.call.fail("thrown in node")
            error = info.value
            assert error.remote_type == "Error"
            assert error.remote_message == "thrown in node"
            assert "worker.mjs" in error.remote_traceback  # the JS stack came along
            # the worker keeps serving after a failing handler
            assert await worker.call.add(2, 3) == 5


@pytest.mark.anyio
async def test_node_worker_stdout_message_reaches_parent_before_reply() -> None:
    with anyio.fail_after(30):
        sink = Lines()
        async with mf.open_worker(NODE_WORKER, options=_options(sink)) as worker:
            assert await worker.call.hello("trio") == "hello trio"
            # the stdout message was sent (and so handled) before the response
            assert sink.lines == [("stdout", "hi trio")]
            assert await worker.call.hello("again") == "hello again"
            assert sink.lines == [("stdout", "hi trio"), ("stdout", "hi again")]


@pytest.mark.anyio
async def test_node_worker_unknown_and_private_functions() -> None:
    with anyio.fail_after(30):
        async with mf.open_worker(NODE_WORKER, options=_options()) as worker:
            with pytest.raises(mf.RemoteCallError, match="not found") as info:
                await worker.call("no_such_function", 1)
            assert info.value.remote_type == "AttributeError"
            with pytest.raises(mf.RemoteCallError, match="private"):
                await worker.call("_hidden")
            assert await worker.call.echo("still alive") == "still alive"


@pytest.mark.anyio
async def test_node_worker_concurrent_calls_are_matched_by_id() -> None:
    results: dict[int, Any] = {}
    with anyio.fail_after(30):
        async with mf.open_worker(NODE_WORKER, options=_options()) as worker:

            async def one(i: int) -> None:
                results[i] = await worker.call.add(i, 1000)

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
            assert results == {i: i + 1000 for i in range(50)}
            assert worker.pending_calls == 0


@pytest.mark.anyio
async def test_node_worker_exits_on_shutdown() -> None:
    options = mf.SpawnOptions(output=Lines(), shutdown_grace=20.0)
    with anyio.fail_after(30):
        async with mf.open_worker(NODE_WORKER, options=options) as worker:
            pid = worker.pid
            assert pid is not None
            assert await worker.call.echo(1) == 1
            leaving = anyio.current_time()
        # Only `shutdown` can end it this fast: SIGTERM would come after 20 s of grace.
        assert anyio.current_time() - leaving < 10
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped: gone, not a zombie


# --------------------------------------------------------------------------- Node -> our child


def _run_caller() -> tuple[int, str, str]:
    """Run caller.mjs against the echo worker; kill its whole process group on timeout."""
    assert NODE is not None
    process = subprocess.Popen(
        [NODE, NODE_CALLER, sys.executable, worker_path("echo_worker.py")],
        cwd=NODE_DIR,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its python child shares the group: one killpg reaps both
    )
    try:
        stdout, stderr = process.communicate(timeout=CALLER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"caller.mjs did not finish within {CALLER_TIMEOUT} s\n{stdout}\n{stderr}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, stdout, stderr


def test_node_caller_drives_python_child() -> None:
    code, stdout, stderr = _run_caller()
    lines = stdout.strip().splitlines()
    assert lines, f"caller.mjs printed nothing (exit {code})\n{stderr}"
    report = json.loads(lines[-1])
    assert code == 0, f"caller.mjs exited {code}: {report}\n{stderr}"
    assert all(report["checks"].values()), report

    assert report["heartbeat"]["metadata"]["hb_response"] is True
    assert report["add"] == {"ok": True, "result": 42}
    echo = report["echo"]["result"]
    assert echo["text"] == "héllo wörld ✓"
    assert echo["bytes"] == {"bin": "0001027f80ff"}
    assert echo["nested"]["deeper"]["bin"] == {"bin": b"zmq".hex()}
    assert echo["big"] == str(2**40)
    assert report["unknown"]["ok"] is False
    assert "not found" in report["unknown"]["error"]
    assert report["fail"]["error"].startswith("ValueError: boom from node\n")
    assert report["shout"] == {"ok": True, "result": "HEY"}
    assert ["stdout", "hey\n"] in report["output"]
    assert ["stderr", "err:hey\n"] in report["output"]
    assert report["exit"] == {"code": 0, "signal": None}
    # the Python child exited on `shutdown` and was reaped by node
    with pytest.raises(ProcessLookupError):
        os.kill(report["child_pid"], 0)
