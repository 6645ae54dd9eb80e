"""The ``multifrost-trio`` command line, run as ``python -m multifrost_trio`` in a subprocess.

Every run has a deadline, and :func:`run_cli` checks that no process it started (the CLI or
the workers the CLI spawned) outlives it: each run gets a unique environment marker, which
every descendant inherits, and nothing carrying it may still be alive afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import zmq.auth

import multifrost_trio
from multifrost_trio import _cli
from tests.conftest import worker_path

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(sys.platform != "linux", reason="the leftover check reads /proc"),
]

ECHO = worker_path("echo_worker.py")
SERVICE = worker_path("service_worker.py")
CLI_TIMEOUT = 40.0
"""Deadline of one CLI run (a worker starts in about a second on a quiet machine)."""
MARKER = "MULTIFROST_TRIO_TEST_RUN"
BENCH_KEYS = {
    "in_flight",
    "calls",
    "seconds",
    "throughput_per_s",
    "latency_median_ms",
    "latency_p99_ms",
    "latency_mean_ms",
    "latency_min_ms",
    "latency_max_ms",
}

BYTES_WORKER = """
from multifrost_trio import ChildWorker


class BytesWorker(ChildWorker):
    def data(self):
        return {"raw": b"\\x00\\xffhi", "list": [b"ab"], "text": "h\\u00e9"}


if __name__ == "__main__":
    BytesWorker().run()
"""


# --------------------------------------------------------------------------- helpers


def processes_marked(tag: str) -> list[int]:
    """Live processes whose environment carries ``MARKER=tag``."""
    needle = f"{MARKER}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def assert_none_left(tag: str, timeout: float = 10.0) -> None:
    """Every process of one run is gone (workers notice their parent's death by themselves)."""
    deadline = time.monotonic() + timeout
    while (left := processes_marked(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


def cli_env(tag: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, MARKER: tag, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env.pop("COLUMNS", None)
    return env


def run_cli(
    *args: str, timeout: float = CLI_TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m multifrost_trio *args`` with a deadline; nothing it started survives it."""
    tag = uuid.uuid4().hex
    return run_tracked([sys.executable, "-m", "multifrost_trio", *args], tag, timeout, env)


def run_tracked(
    argv: list[str], tag: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion within ``timeout``; fail if it (or any process it
    started, found by ``tag`` in their environment) is left behind."""
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(tag, env),
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(argv)} ran over {timeout} s\n{stdout}\n{stderr}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert_none_left(tag)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def local_traceback(stderr: str) -> bool:
    """Whether stderr holds a traceback of the CLI process itself (not the worker's)."""
    return "multifrost_trio/_cli.py" in stderr or "trio/_core/_run.py" in stderr


# --------------------------------------------------------------------------- call


def test_call_prints_the_result_as_json() -> None:
    done = run_cli("call", ECHO, "add", "20", "22")
    assert (done.returncode, done.stdout, done.stderr) == (0, "42\n", "")


def test_call_arguments_are_json_or_plain_text() -> None:
    done = run_cli("call", ECHO, "echo", '{"k": [1, 2.5, null, true, "\\u00e9"]}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"k": [1, 2.5, None, True, "é"]}
    assert "é" in done.stdout  # printed readably, not as \u00e9
    done = run_cli("call", ECHO, "echo", "plain words")
    assert (done.returncode, done.stdout) == (0, '"plain words"\n')


def test_call_prints_bytes_as_base64_hex_or_repr(tmp_path: Path) -> None:
    script = tmp_path / "bytes_worker.py"
    script.write_text(BYTES_WORKER)
    done = run_cli("call", str(script), "data")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"raw": "AP9oaQ==", "list": ["YWI="], "text": "hé"}
    done = run_cli("call", str(script), "data", "--bytes", "hex")
    assert json.loads(done.stdout)["raw"] == "00ff6869"
    done = run_cli("call", str(script), "data", "--bytes", "repr")
    assert json.loads(done.stdout)["raw"] == "b'\\x00\\xffhi'"


def test_worker_output_goes_to_stderr_not_stdout() -> None:
    done = run_cli("call", ECHO, "shout", "hey")
    assert done.returncode == 0, done.stderr
    assert done.stdout == '"HEY"\n'
    assert "[echo_worker.py STDOUT]: hey" in done.stderr
    assert "[echo_worker.py STDERR]: err:hey" in done.stderr


def test_remote_error_exits_non_zero_with_remote_message_and_no_local_traceback() -> None:
    done = run_cli("call", ECHO, "fail", "boom from the worker")
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == "remote error: ValueError: boom from the worker"
    # the worker's traceback follows, ending in its own frame
    assert "Traceback (most recent call last)" in done.stderr
    assert "echo_worker.py" in done.stderr
    assert done.stderr.count("Traceback (most recent call last)") == 1
    assert not local_traceback(done.stderr), done.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_local_traceback(where: str) -> None:
    args = ["call", ECHO, "fail", "boom"]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    done = run_cli(*args)
    assert done.returncode == 1
    assert local_traceback(done.stderr), done.stderr
    assert "RemoteCallError: ValueError: boom" in done.stderr
    assert "remote error: ValueError: boom" in done.stderr


def test_call_timeout_is_one_line() -> None:
    done = run_cli("call", ECHO, "sleep", "30", "--timeout", "0.2")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: call 'sleep' to echo_worker.py timed out after 0.2 s"
    ]


def test_unknown_script_is_a_one_line_error() -> None:
    started = time.monotonic()
    done = run_cli("call", "no_such_worker.py", "add", "1", "2")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["error: no such worker script: no_such_worker.py"]
    assert time.monotonic() - started < 20


def test_worker_that_cannot_start_shows_its_stderr_not_ours() -> None:
    done = run_cli("list", worker_path("import_error_worker.py"))
    assert done.returncode == 1
    # the worker's own diagnosis, forwarded as it wrote it, then our one-line error
    assert "[import_error_worker.py STDERR]: RuntimeError: broken worker" in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("error: worker import_error_worker.py exited during start-up")
    assert done.stderr.count("RuntimeError: broken worker") == 1
    assert not local_traceback(done.stderr), done.stderr


def test_unsupported_endpoint_scheme_is_a_one_line_error() -> None:
    done = run_cli("list", "ipc:///tmp/nowhere")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: unsupported endpoint 'ipc:///tmp/nowhere': only tcp:// is supported, not ipc"
    ]


def test_usage_errors_exit_2_with_argparse_message() -> None:
    done = run_cli("bench", ECHO, "--calls", "0")
    assert done.returncode == 2
    assert "--calls: must be at least 1" in done.stderr
    done = run_cli("frobnicate")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


def test_ctrl_c_exits_130_and_stops_the_worker() -> None:
    tag = uuid.uuid4().hex
    process = subprocess.Popen(
        [sys.executable, "-m", "multifrost_trio", "call", ECHO, "sleep", "30"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(tag),
    )
    try:
        deadline = time.monotonic() + CLI_TIMEOUT
        # wait for the worker (a marked process other than the CLI), then its call
        while not set(processes_marked(tag)) - {process.pid}:
            assert time.monotonic() < deadline, "the worker never started"
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert_none_left(tag)
    assert process.returncode == 130, stderr
    assert stdout == ""
    assert stderr.splitlines() == ["interrupted"]


# --------------------------------------------------------------------------- list, demo


def test_list_shows_function_names() -> None:
    done = run_cli("list", ECHO)
    assert done.returncode == 0, done.stderr
    names = done.stdout.split()
    assert {"add", "echo", "fail", "sleep", "list_functions"} <= set(names)
    assert "_private" not in names
    assert names == sorted(names)
    as_json = run_cli("list", ECHO, "--json")
    assert json.loads(as_json.stdout) == names


def test_demo_runs() -> None:
    done = run_cli("demo")
    assert done.returncode == 0, done.stderr
    assert "add(20, 22)        -> 42" in done.stdout
    assert "cancelled in the worker too" in done.stdout
    assert "RemoteCallError: ZeroDivisionError" in done.stdout
    assert done.stdout.rstrip().endswith("worker stopped.")


# --------------------------------------------------------------------------- bench


def test_bench_json() -> None:
    done = run_cli("bench", ECHO, "--calls", "200", "--warmup", "5", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # one JSON document, nothing else on stdout
    assert report["function"] == "add"
    assert report["args"] == [1, 2]
    assert report["calls"] == 200
    assert report["worker"] == "echo_worker.py"
    assert [level["in_flight"] for level in report["results"]] == [1, 10, 100]
    for level in report["results"]:
        assert set(level) == BENCH_KEYS
        assert level["calls"] == 200
        assert level["throughput_per_s"] > 0
        assert 0 < level["latency_min_ms"] <= level["latency_median_ms"]
        assert level["latency_median_ms"] <= level["latency_p99_ms"] <= level["latency_max_ms"]


def test_bench_without_a_terminal_prints_a_plain_table() -> None:
    done = run_cli(
        "bench", ECHO, "--function", "add_async", "--args", "[3, 4]", "--calls", "50",
        "--in-flight", "1,5", "--warmup", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout  # no progress bar in a pipe
    lines = done.stdout.splitlines()
    assert lines[0].startswith("bench add_async(3, 4) on echo_worker.py: 50 calls per level")
    assert lines[1].split() == ["in", "flight", "calls", "median", "ms", "p99", "ms", "mean",
                                "ms", "calls/s"]  # fmt: skip
    assert [line.split()[:2] for line in lines[2:]] == [["1", "50"], ["5", "50"]]


def test_bench_on_a_terminal_draws_a_progress_bar() -> None:
    tag = uuid.uuid4().hex
    leader, follower = pty.openpty()
    argv = [sys.executable, "-m", "multifrost_trio", "bench", ECHO, "--calls", "100",
            "--in-flight", "1,10", "--warmup", "0"]  # fmt: skip
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE,
            env=cli_env(tag),
        )  # fmt: skip
    finally:
        os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + CLI_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the terminal's other side closed
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        process.wait(timeout=10)
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        stderr = process.stderr.read().decode()
        process.stderr.close()
        assert_none_left(tag)
    assert process.returncode == 0, stderr
    text = output.decode()
    assert "\rin flight    1 [" in text
    assert "100% 100/100" in text
    assert "\rin flight   10 [" in text
    assert "calls/s" in text
    assert "median ms" in text  # and the table after the bars


def test_bench_of_a_missing_function_is_a_remote_error() -> None:
    done = run_cli("bench", ECHO, "--function", "nope", "--calls", "10")
    assert done.returncode == 1
    assert done.stderr.splitlines()[0].startswith("remote error: AttributeError")
    assert "nope" in done.stderr
    assert not local_traceback(done.stderr)


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command", [[], ["demo"], ["call"], ["list"], ["bench"], ["services"], ["ping"], ["keygen"]]
)
def test_help(command: list[str]) -> None:
    done = run_cli(*command, "--help", timeout=20)
    assert done.returncode == 0
    assert done.stdout.startswith(f"usage: multifrost-trio {' '.join(command)}".rstrip())
    assert "--debug" in done.stdout
    assert done.stderr == ""


# --------------------------------------------------------------------------- targets


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_service(*args: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """tests/workers/service_worker.py running in connect mode; always reaped."""
    process = subprocess.Popen(
        [sys.executable, SERVICE, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        assert process.stderr is not None
        process.stderr.close()


@pytest.mark.skipif(
    getattr(multifrost_trio, "connect_worker", None) is None or not Path(SERVICE).is_file(),
    reason="no connect mode (or no tests/workers/service_worker.py) yet",
)
def test_call_a_service_by_name_and_by_endpoint(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "MULTIFROST_REGISTRY_DIR": str(tmp_path / "registry")}
    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    with running_service("--service-id", "cli-math", "--bind", endpoint, env=env):
        # connect_worker waits (5 s) for the name to be registered
        by_name = run_cli("call", "cli-math", "add", "20", "22", env=env)
        assert (by_name.returncode, by_name.stdout) == (0, "42\n"), by_name.stderr
        by_endpoint = run_cli("call", endpoint, "echo", '{"x": [1]}', env=env)
        assert by_endpoint.returncode == 0, by_endpoint.stderr
        assert json.loads(by_endpoint.stdout) == {"x": [1]}
        listing = run_cli("list", "cli-math", env=env)
        assert "add" in listing.stdout.split()
        pinged = run_cli("ping", "cli-math", "--count", "2", env=env)
        assert pinged.returncode == 0, pinged.stderr
        assert pinged.stdout.count("heartbeat round trip") == 2
        services = run_cli("services", "--json", env=env)
        [entry] = json.loads(services.stdout)
        assert (entry["service_id"], entry["port"], entry["alive"]) == ("cli-math", port, True)
        table = run_cli("services", env=env)
        assert "cli-math" in table.stdout
        assert "alive" in table.stdout


def test_ping_of_a_missing_service_is_one_clear_line(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "MULTIFROST_REGISTRY_DIR": str(tmp_path / "registry")}
    done = run_cli("ping", "nobody-home", env=env)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "nobody-home" in done.stderr
    assert "not found" in done.stderr


def test_services_on_an_empty_registry(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "MULTIFROST_REGISTRY_DIR": str(tmp_path / "registry")}
    done = run_cli("services", env=env)
    assert done.returncode == 0
    assert "no services registered" in done.stdout


def test_keygen_writes_a_key_pair_with_safe_permissions(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    done = run_cli("keygen", str(folder), "--name", "server")
    assert done.returncode == 0, done.stderr
    assert (folder / "server.key").stat().st_mode & 0o777 == 0o644
    assert (folder / "server.key_secret").stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
    public, secret = zmq.auth.load_certificate(folder / "server.key_secret")
    assert secret is not None
    assert len(public) == 40


def test_open_target_routes_scripts_names_and_endpoints(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In-process: the routing rules of ``_open_target``, without starting anything."""
    options = multifrost_trio.SpawnOptions()
    calls: list[tuple[Sequence[Any], dict[str, Any]]] = []
    connected: Any = object()

    def fake_connect(
        service_id: str | None = None, *, endpoint: str | None = None, options: Any = None
    ) -> Any:
        calls.append(((service_id,), {"endpoint": endpoint, "options": options}))
        return connected

    monkeypatch.setattr(multifrost_trio, "connect_worker", fake_connect, raising=False)
    assert _cli._open_target("my-service", options) is connected
    assert _cli._open_target("tcp://10.0.0.1:5555", options) is connected
    assert calls == [
        (("my-service",), {"endpoint": None, "options": options}),
        ((None,), {"endpoint": "tcp://10.0.0.1:5555", "options": options}),
    ]
    # an existing file is a script whatever its name; a .py that does not exist is an error
    script = tmp_path / "worker"
    script.write_text("")
    spawner = _cli._open_target(str(script), options)
    assert type(spawner).__name__ == "_AsyncGeneratorContextManager"
    with pytest.raises(_cli.CliError, match="no such worker script"):
        _cli._open_target(str(tmp_path / "missing.py"), options)
    with pytest.raises(_cli.CliError, match="no such worker script"):
        _cli._open_target(str(tmp_path / "missing" / "worker"), options)
    assert calls == [
        (("my-service",), {"endpoint": None, "options": options}),
        ((None,), {"endpoint": "tcp://10.0.0.1:5555", "options": options}),
    ]


def test_open_target_without_connect_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(multifrost_trio, "connect_worker", raising=False)
    options = multifrost_trio.SpawnOptions()
    for target in ("my-service", "tcp://127.0.0.1:5555"):
        with pytest.raises(_cli.CliError, match="connect mode is not available yet"):
            _cli._open_target(target, options)


def test_json_conversion_of_results() -> None:
    assert _cli._dump({"b": b"\x00\xff", "t": (1, 2), "n": None}) == (
        '{"b": "AP8=", "t": [1, 2], "n": null}'
    )
    assert _cli._dump({1: b"ab", b"k": 2.5}, "hex") == '{"1": "6162", "6b": 2.5}'
    assert _cli._dump(b"ab", "repr") == "\"b'ab'\""
