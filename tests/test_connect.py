"""Connect mode with real processes: a service registers, parents find it and call it.

Every service runs ``tests/workers/service_worker.py`` in its own process, with a temporary
registry (``registry_dir=`` and ``MULTIFROST_REGISTRY_DIR``, HOME moved too): the real home is
never touched. Every wait has a deadline; every process is reaped.

The multi-parent test re-runs this module as ``python -m tests.test_connect --parent ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import zmq
import zmq.auth

import multifrost_trio as mf
from multifrost_trio import _messages
from tests.conftest import worker_path

SERVICE = worker_path("service_worker.py")
ROOT = Path(__file__).resolve().parent.parent
LINUX = sys.platform == "linux"
linux_only = pytest.mark.skipif(not LINUX, reason="needs /proc")

START_TIMEOUT = 10.0
"""Readiness: connect_worker waits this long for the entry and the heartbeat echo."""
EXIT_TIMEOUT = 10.0


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def reg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh registry directory; HOME and MULTIFROST_REGISTRY_DIR point into tmp_path
    (children inherit both), so nothing can reach the real ~/.multifrost."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    folder = tmp_path / "registry"
    monkeypatch.setenv("MULTIFROST_REGISTRY_DIR", str(folder))
    return folder


def _spawn_service(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, SERVICE, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``proc`` if it still runs (SIGTERM, then SIGKILL) and wait for it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@contextlib.contextmanager
def service(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A running service_worker.py; always reaped on exit."""
    proc = _spawn_service(*args)
    try:
        yield proc
    finally:
        _reap(proc)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float = EXIT_TIMEOUT) -> int:
    """Exit status of ``proc`` (waited for off the event loop; raises after ``timeout``)."""
    return await anyio.to_thread.run_sync(partial(proc.wait, timeout))


def read_stderr(proc: subprocess.Popen[bytes]) -> str:
    """All of an exited process's stderr."""
    assert proc.poll() is not None
    assert proc.stderr is not None
    return proc.stderr.read().decode(errors="replace")


def entries(folder: Path) -> dict[str, mf.ServiceEntry]:
    return {entry.service_id: entry for entry in mf.list_services(folder)}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=10)
    return proc.pid


def closed_port() -> int:
    """A loopback port nothing listens on (bound by us, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_registry(folder: Path, raw: dict[str, Any]) -> None:
    """Hand-write services.json the way another implementation would."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / "services.json"
    path.write_text(json.dumps(raw))
    path.chmod(0o600)


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) with a LISTEN socket on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                address, _, hex_port = fields[1].partition(":")
                if int(hex_port, 16) == port and fields[3] == "0A":
                    found.add(address)
    return found


@contextlib.contextmanager
def raw_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A private pyzmq context (not the library's), torn down without lingering."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


def raw_dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    return sock


def raw_exchange(sock: zmq.Socket[bytes], message: dict[str, Any], timeout: float) -> Any:
    """Send ``message`` and wait (bounded) for the reply with the same id; None if none came."""
    sock.send_multipart([b"", _messages.encode(message)])
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if not sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
            break
        reply = _messages.decode(sock.recv_multipart()[-1])
        if reply is not None and reply.id == message["id"]:
            return reply
    return None


def entry_endpoint(folder: Path, name: str) -> str:
    return f"tcp://127.0.0.1:{entries(folder)[name].port}"


# --------------------------------------------------------------------------- 1. lifecycle


@pytest.mark.anyio
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_register_serve_and_unregister_on_signal(reg: Path, signum: int) -> None:
    with (
        anyio.fail_after(30),
        service("--service-id", "math-service", "--registry-dir", str(reg)) as proc,
    ):
        async with mf.connect_worker(
            "math-service", registry_dir=reg, timeout=START_TIMEOUT
        ) as worker:
            assert await worker.call.add(2, 3) == 5
            assert await worker.call.echo({"k": [1, b"x"]}) == {"k": [1, b"x"]}
            assert await worker.call.pid() == proc.pid
            assert worker.pid == proc.pid
            assert worker.name == "math-service"
        found = entries(reg)
        assert list(found) == ["math-service"]
        entry = found["math-service"]
        assert entry.alive
        assert entry.pid == proc.pid
        assert 1024 <= entry.port <= 65535
        assert entry.started
        raw = json.loads((reg / "services.json").read_text())
        assert raw["math-service"]["port"] == entry.port
        assert raw["math-service"]["pid"] == proc.pid

        proc.send_signal(signum)
        assert await wait_exit(proc) == 0
        assert entries(reg) == {}
        assert json.loads((reg / "services.json").read_text()) == {}
        assert proc.stdout is not None
        assert proc.stdout.read() == b""  # the service prints nothing


@pytest.mark.anyio
async def test_unregisters_when_serving_dies_of_an_exception(reg: Path) -> None:
    """An exception that escapes the worker (not a handler error) still unregisters it."""
    with anyio.fail_after(30), service("--service-id", "fragile") as proc:  # dir from the env
        async with mf.connect_worker("fragile", timeout=START_TIMEOUT) as worker:
            assert entries(reg)["fragile"].pid == proc.pid

            async def explode() -> None:
                with pytest.raises(mf.WorkerDied):  # never answered: the worker goes down
                    await worker.call.explode()

            async with anyio.create_task_group() as tg:
                tg.start_soon(explode)
                code = await wait_exit(proc)
        assert code != 0
        assert "explode() was called" in read_stderr(proc)
        assert entries(reg) == {}


@pytest.mark.anyio
async def test_a_service_that_goes_away_fails_pending_calls_at_once(reg: Path) -> None:
    """The dropped connection is noticed directly, not after three missed heartbeats."""
    with anyio.fail_after(30), service("--service-id", "fleeting") as proc:
        async with mf.connect_worker("fleeting", timeout=START_TIMEOUT) as worker:
            failed_after: list[float] = []

            async def pending() -> None:
                started = anyio.current_time()
                with pytest.raises(mf.WorkerDied, match="connection"):
                    await worker.call.sleep(30)
                failed_after.append(anyio.current_time() - started)

            async with anyio.create_task_group() as tg:
                tg.start_soon(pending)
                while worker.pending_calls < 1:
                    await anyio.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc) == 0
            assert failed_after[0] < 3.0  # heartbeats alone would take 18 s
            assert not worker.is_healthy


@pytest.mark.anyio
async def test_handler_errors_keep_a_service_alive(reg: Path) -> None:
    with anyio.fail_after(30), service("--service-id", "sturdy") as proc:
        async with mf.connect_worker("sturdy", timeout=START_TIMEOUT) as worker:
            with pytest.raises(mf.RemoteCallError, match="TypeError"):
                await worker.call.add(1)
            with pytest.raises(mf.RemoteCallError, match="not found"):
                await worker.call.nope()
            assert await worker.call.add(1, 1) == 2
        assert proc.poll() is None
        assert entries(reg)["sturdy"].alive


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_printed_output_reaches_only_the_caller(reg: Path) -> None:
    seen: list[tuple[str, str]] = []
    quiet = mf.SpawnOptions(output=lambda stream, line: None)
    listening = mf.SpawnOptions(output=lambda stream, line: seen.append((stream, line)))
    with anyio.fail_after(30), service("--service-id", "chatty"):
        async with (
            mf.connect_worker("chatty", timeout=START_TIMEOUT, options=quiet) as caller,
            mf.connect_worker("chatty", timeout=START_TIMEOUT, options=listening) as bystander,
        ):
            assert await bystander.call.add(1, 1) == 2  # the service now knows the bystander
            assert await caller.call.shout("caller's private text") == "caller's private text"
            await bystander.ping()
            await anyio.sleep(0.3)
    assert seen == []


def test_unusable_bind_address_exits_with_one_line(reg: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for address in (f"tcp://127.0.0.1:{port}", "tcp://not an address"):
            with service("--service-id", "nowhere", "--bind", address) as proc:
                assert proc.wait(timeout=EXIT_TIMEOUT) == 1
                err = read_stderr(proc)
            assert "Traceback" not in err
            assert len(err.strip().splitlines()) == 1, err
            assert address in err
    assert entries(reg) == {}


# --------------------------------------------------------------------------- 2. names


@pytest.mark.anyio
async def test_second_service_with_a_live_name_is_refused(reg: Path) -> None:
    with anyio.fail_after(30), service("--service-id", "math-service") as first:
        async with mf.connect_worker("math-service", timeout=START_TIMEOUT) as worker:
            assert await worker.call.add(1, 2) == 3
            with service("--service-id", "math-service") as second:
                assert await wait_exit(second) == 1
                err = read_stderr(second)
            lines = err.strip().splitlines()
            assert len(lines) == 1, err
            assert "Traceback" not in err
            assert "math-service" in lines[0]
            assert "already registered" in lines[0]
            assert str(first.pid) in lines[0]
            # the first one still owns the name and still answers
            assert entries(reg)["math-service"].pid == first.pid
            assert await worker.call.add(2, 2) == 4


@pytest.mark.anyio
async def test_entry_of_a_dead_owner_is_taken_over(reg: Path) -> None:
    gone = dead_pid()
    write_registry(
        reg,
        {
            "math-service": {"port": 1, "pid": gone, "started": "yesterday"},
            "other": {"port": 5555, "pid": gone, "start_time": 123, "flavour": {"keep": [1]}},
        },
    )
    assert entries(reg)["math-service"].stale
    with anyio.fail_after(30), service("--service-id", "math-service") as proc:
        async with mf.connect_worker("math-service", timeout=START_TIMEOUT) as worker:
            assert await worker.call.pid() == proc.pid
        entry = entries(reg)["math-service"]
        assert entry.alive
        assert entry.pid == proc.pid
        assert entry.port != 1
        raw = json.loads((reg / "services.json").read_text())
        assert raw["other"] == {
            "port": 5555,
            "pid": gone,
            "start_time": 123,
            "flavour": {"keep": [1]},
        }
        proc.terminate()
        assert await wait_exit(proc) == 0
        raw = json.loads((reg / "services.json").read_text())
        assert "math-service" not in raw
        assert "other" in raw


# --------------------------------------------------------------------------- 3. errors


@pytest.mark.anyio
async def test_missing_service_is_not_found_quickly(reg: Path) -> None:
    started = time.monotonic()
    with anyio.fail_after(5), pytest.raises(mf.ServiceNotFound, match="missing"):
        async with mf.connect_worker("missing", registry_dir=reg, timeout=0.5):
            pytest.fail("connected to nothing")
    assert time.monotonic() - started < 1.5

    # an entry whose owner is dead counts as missing too, and the error says why
    write_registry(reg, {"missing": {"port": closed_port(), "pid": dead_pid(), "started": "x"}})
    started = time.monotonic()
    with anyio.fail_after(5), pytest.raises(mf.ServiceNotFound, match="stale"):
        async with mf.connect_worker("missing", registry_dir=reg, timeout=0.5):
            pytest.fail("connected to nothing")
    assert time.monotonic() - started < 1.5


@pytest.mark.anyio
@pytest.mark.parametrize("listener", ["closed", "silent-tcp"])
async def test_stale_entry_whose_port_answers_nothing(reg: Path, listener: str) -> None:
    """A live pid (ours) but nothing that speaks the protocol at the port."""
    with socket.socket() as silent:
        if listener == "closed":
            port = closed_port()
        else:  # accepts TCP connections and never says a word
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            port = silent.getsockname()[1]
        write_registry(reg, {"ghost": {"port": port, "pid": os.getpid(), "started": "x"}})
        for how in ("name", "endpoint"):
            started = time.monotonic()
            with anyio.fail_after(5), pytest.raises(mf.WorkerStartError, match="did not answer"):
                if how == "name":
                    connecting = mf.connect_worker("ghost", registry_dir=reg, timeout=0.5)
                else:
                    connecting = mf.connect_worker(endpoint=f"tcp://127.0.0.1:{port}", timeout=0.5)
                async with connecting:
                    pytest.fail("connected to nothing")
            elapsed = time.monotonic() - started
            assert 0.45 <= elapsed < 1.5, elapsed


@pytest.mark.anyio
async def test_connect_worker_wants_exactly_one_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        async with mf.connect_worker():
            pass
    with pytest.raises(ValueError, match="exactly one"):
        async with mf.connect_worker("a", endpoint="tcp://127.0.0.1:1"):
            pass


# --------------------------------------------------------------------------- 4. many parents

PARENTS = 4
TOTAL_CALLS = 10_000


async def _parent_run(
    name: str, registry: str, tag: str, calls: int, concurrency: int
) -> dict[str, Any]:
    """One parent process's share: ``calls`` unique echo payloads, each reply checked."""
    mismatched = 0
    answered = 0
    async with mf.connect_worker(name, registry_dir=registry, timeout=START_TIMEOUT) as worker:
        worker = worker.with_options(timeout=30)

        async def lane(first: int) -> None:
            nonlocal mismatched, answered
            for i in range(first, calls, concurrency):
                payload = [tag, i, secrets.token_bytes(8)]
                reply = await worker.call.echo(payload)
                answered += 1
                if reply != payload:
                    mismatched += 1

        async with anyio.create_task_group() as tg:
            for lane_number in range(concurrency):
                tg.start_soon(lane, lane_number)
    return {"tag": tag, "answered": answered, "mismatched": mismatched}


def test_several_parent_processes_get_only_their_own_replies(reg: Path) -> None:
    backends = ["trio", "asyncio"]
    share = TOTAL_CALLS // PARENTS
    with service("--service-id", "shared") as proc:
        parents = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.test_connect",
                    "--parent",
                    "shared",
                    str(reg),
                    backends[n % 2],
                    f"parent-{n}",
                    str(share),
                    "25",
                ],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for n in range(PARENTS)
        ]
        results = []
        try:
            deadline = time.monotonic() + 45
            for parent in parents:
                out, err = parent.communicate(timeout=max(0.1, deadline - time.monotonic()))
                assert parent.returncode == 0, err.decode(errors="replace")
                results.append(json.loads(out))
        finally:
            for parent in parents:
                _reap(parent)
        assert proc.poll() is None
    assert sorted(r["tag"] for r in results) == [f"parent-{n}" for n in range(PARENTS)]
    assert sum(r["answered"] for r in results) == TOTAL_CALLS
    assert [r["mismatched"] for r in results] == [0] * PARENTS


# --------------------------------------------------------------------------- 5. shutdown


def _raw_shutdown_then_heartbeat(endpoint: str) -> bool:
    """Send ``shutdown``, then a heartbeat on the same connection: True if it was echoed
    (so the shutdown, sent first on the same pipe, was processed and ignored)."""
    with raw_context() as ctx:
        sock = raw_dealer(ctx, endpoint)
        sock.send_multipart([b"", _messages.encode(_messages.make_shutdown())])
        return raw_exchange(sock, _messages.make_heartbeat(), timeout=5) is not None


def _raw_shutdown(endpoint: str) -> None:
    with raw_context() as ctx:
        sock = raw_dealer(ctx, endpoint)
        sock.send_multipart([b"", _messages.encode(_messages.make_shutdown())])
        # the message must leave before the socket goes: a heartbeat echo proves it arrived
        raw_exchange(sock, _messages.make_heartbeat(), timeout=5)


@pytest.mark.anyio
async def test_shutdown_from_any_caller_does_not_stop_a_shared_service(reg: Path) -> None:
    with anyio.fail_after(30), service("--service-id", "shared") as proc:
        async with mf.connect_worker("shared", timeout=START_TIMEOUT) as worker:
            assert await worker.call.add(1, 2) == 3
            endpoint = entry_endpoint(reg, "shared")
            for _ in range(3):
                assert await anyio.to_thread.run_sync(_raw_shutdown_then_heartbeat, endpoint)
            assert proc.poll() is None
            assert await worker.call.add(3, 4) == 7
            assert (await worker.call.stats())["messages_dropped"] >= 3
        assert entries(reg)["shared"].alive
        # also from a second, independent parent
        async with mf.connect_worker("shared", timeout=START_TIMEOUT) as again:
            assert await again.call.add(5, 5) == 10


@pytest.mark.anyio
async def test_shutdown_stops_a_service_that_allows_it(reg: Path) -> None:
    with anyio.fail_after(30), service("--service-id", "stoppable", "--allow-shutdown") as proc:
        async with mf.connect_worker("stoppable", timeout=START_TIMEOUT) as worker:
            assert await worker.call.add(1, 2) == 3
            endpoint = entry_endpoint(reg, "stoppable")
        await anyio.to_thread.run_sync(_raw_shutdown, endpoint)
        assert await wait_exit(proc) == 0
        assert entries(reg) == {}


# --------------------------------------------------------------------------- 6. endpoints


@pytest.mark.anyio
async def test_connect_by_endpoint_without_the_registry(reg: Path) -> None:
    with anyio.fail_after(30), service("--service-id", "by-address") as proc:
        async with mf.connect_worker("by-address", timeout=START_TIMEOUT):
            pass
        port = entries(reg)["by-address"].port
        shutil.rmtree(reg)  # the endpoint alone must do
        async with mf.connect_worker(
            endpoint=f"tcp://127.0.0.1:{port}", timeout=START_TIMEOUT
        ) as worker:
            assert await worker.call.add(20, 22) == 42
            assert await worker.call.pid() == proc.pid
            assert worker.pid is None
            assert await worker.ping() >= 0
        if LINUX:  # default bind stays on loopback
            assert listening_addresses(port) == {"0100007F"}


@pytest.mark.anyio
async def test_explicit_wildcard_bind_is_reachable_on_loopback(reg: Path) -> None:
    with anyio.fail_after(30), service("--service-id", "wide", "--bind", "tcp://0.0.0.0:0") as proc:
        async with mf.connect_worker("wide", timeout=START_TIMEOUT) as worker:
            assert await worker.call.pid() == proc.pid
        port = entries(reg)["wide"].port
        if LINUX:
            assert listening_addresses(port) == {"00000000"}
        async with mf.connect_worker(
            endpoint=f"tcp://127.0.0.1:{port}", timeout=START_TIMEOUT
        ) as worker:
            assert await worker.call.add(1, 1) == 2


# --------------------------------------------------------------------------- 7. CURVE


class Keys:
    """Key files for one CURVE test, each pair in its own 0700 directory."""

    def __init__(self, root: Path) -> None:
        self.server_public, self.server_secret = mf.generate_keypair(root / "server", "server")
        self.client_public, self.client_secret = mf.generate_keypair(root / "client", "client")
        self.rogue_public, self.rogue_secret = mf.generate_keypair(root / "rogue", "rogue")
        self.other_server_public, _ = mf.generate_keypair(root / "impostor", "impostor")
        self.allowed = root / "allowed"
        self.allowed.mkdir(mode=0o700)
        shutil.copy(self.client_public, self.allowed / "client.key")

    def service_args(self) -> list[str]:
        return ["--curve-secret", str(self.server_secret), "--curve-allowed", str(self.allowed)]

    def client(self) -> mf.CurveClient:
        return mf.CurveClient(self.server_public, self.client_secret)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def test_generated_key_files_have_safe_permissions(keys: Keys) -> None:
    assert stat.S_IMODE(keys.server_secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.server_public.stat().st_mode) == 0o644
    assert stat.S_IMODE(keys.server_secret.parent.stat().st_mode) == 0o700
    public, secret = zmq.auth.load_certificate(keys.server_secret)
    assert secret is not None
    assert zmq.auth.load_certificate(keys.server_public) == (public, None)


def _curve_as(
    public_file: Path, secret_file: Path, server_public_file: Path
) -> Callable[[zmq.Socket[bytes]], None]:
    public, _ = zmq.auth.load_certificate(public_file)
    _, secret = zmq.auth.load_certificate(secret_file)
    server, _ = zmq.auth.load_certificate(server_public_file)

    def configure(sock: zmq.Socket[bytes]) -> None:
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = server

    return configure


def _attack(
    endpoint: str,
    kinds: dict[str, Callable[[zmq.Socket[bytes]], None] | None],
    attempts: int,
    listen: float,
) -> dict[str, tuple[int, int]]:
    """For each kind, ``attempts`` separate DEALER connections each send one valid ``add``
    call; returns ``{kind: (calls queued, replies received)}`` after listening for
    ``listen`` seconds (every wait bounded by a poll timeout)."""
    result: dict[str, tuple[int, int]] = {}
    with raw_context() as ctx:
        sockets: dict[str, list[zmq.Socket[bytes]]] = {}
        sent: dict[str, int] = {}
        for kind, configure in kinds.items():
            sockets[kind] = []
            sent[kind] = 0
            for _ in range(attempts):
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                # a refused handshake can drop the pipe before we send: wait (bounded) for
                # the reconnect's fresh pipe so every attempt really sends its call
                sock.sndtimeo = 2000
                if configure is not None:
                    configure(sock)
                sock.connect(endpoint)
                sockets[kind].append(sock)
                call = _messages.make_call("add", (1, 2))
                try:
                    sock.send_multipart([b"", _messages.encode(call)])
                    sent[kind] += 1
                except zmq.Again:
                    pass
        owner = {sock: kind for kind, socks in sockets.items() for sock in socks}
        received = dict.fromkeys(kinds, 0)
        poller = zmq.Poller()
        for sock in owner:
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + listen
        while (remaining := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(int(remaining * 1000) + 1):
                with contextlib.suppress(zmq.Again):
                    sock.recv_multipart(zmq.NOBLOCK)
                    received[owner[sock]] += 1
        for sock in owner:
            sock.close(linger=0)
        for kind in kinds:
            result[kind] = (sent[kind], received[kind])
    return result


@linux_only
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])  # the attackers are raw pyzmq anyway
async def test_curve_lets_only_the_allowed_client_in(reg: Path, keys: Keys) -> None:
    with anyio.fail_after(40), service("--service-id", "vault", *keys.service_args()) as proc:
        async with mf.connect_worker("vault", curve=keys.client(), timeout=START_TIMEOUT) as worker:
            made = 0
            for i in range(10):
                assert await worker.call.add(i, 1) == i + 1
                made += 1
            endpoint = entry_endpoint(reg, "vault")

            # (d) the secret key is nowhere in the service's argv or environment
            _, secret_text = zmq.auth.load_certificate(keys.server_secret)
            assert secret_text is not None
            assert len(secret_text) == 40
            proc_dir = Path(f"/proc/{proc.pid}")
            assert secret_text not in (proc_dir / "cmdline").read_bytes()
            assert secret_text not in (proc_dir / "environ").read_bytes()
            assert keys.server_secret.read_bytes().count(secret_text) == 1  # we looked right

            # (b) 100 attempts each by three kinds of intruder: nothing gets through
            kinds: dict[str, Callable[[zmq.Socket[bytes]], None] | None] = {
                "plaintext": None,
                "wrong server key": _curve_as(
                    keys.client_public, keys.client_secret, keys.other_server_public
                ),
                "not on the allow-list": _curve_as(
                    keys.rogue_public, keys.rogue_secret, keys.server_public
                ),
            }
            outcome = await anyio.to_thread.run_sync(_attack, endpoint, kinds, 100, 1.5)
            # Nothing is delivered. Nearly every attempt must really have sent its call
            # (on a loaded machine a refused connection can, rarely, not take one in 2 s).
            assert {kind: received for kind, (_, received) in outcome.items()} == dict.fromkeys(
                kinds, 0
            )
            assert all(sent >= 95 for sent, _ in outcome.values()), outcome
            # control: the same harness with the allowed key does get every call through
            allowed: dict[str, Callable[[zmq.Socket[bytes]], None] | None] = {
                "allowed": _curve_as(keys.client_public, keys.client_secret, keys.server_public)
            }
            control = await anyio.to_thread.run_sync(_attack, endpoint, allowed, 100, 1.0)
            assert control == {"allowed": (100, 100)}
            made += 100

            # the library's client refuses them the same way, within its timeout
            for curve in (
                None,
                mf.CurveClient(keys.other_server_public, keys.client_secret),
                mf.CurveClient(keys.server_public, keys.rogue_secret),
            ):
                with pytest.raises(mf.WorkerStartError):
                    async with mf.connect_worker(endpoint=endpoint, curve=curve, timeout=0.5):
                        pytest.fail("an intruder got in")

            # 0 delivered: the service started exactly the calls the allowed client made
            stats = await worker.call.stats()
            made += 1
            assert stats["calls_started"] == made, stats
            assert await worker.call.add(1, 1) == 2


@pytest.mark.anyio
async def test_curve_allowed_client_by_endpoint(reg: Path, keys: Keys) -> None:
    with anyio.fail_after(30), service("--service-id", "vault", *keys.service_args()) as proc:
        async with mf.connect_worker("vault", curve=keys.client(), timeout=START_TIMEOUT):
            pass
        endpoint = entry_endpoint(reg, "vault")
        async with mf.connect_worker(
            endpoint=endpoint, curve=keys.client(), timeout=START_TIMEOUT
        ) as worker:
            assert await worker.call.echo("secret sauce") == "secret sauce"
            assert await worker.call.pid() == proc.pid


@pytest.mark.anyio
async def test_readable_secret_key_is_refused_by_the_client(keys: Keys, tmp_path: Path) -> None:
    loose = tmp_path / "loose.key_secret"
    shutil.copy(keys.client_secret, loose)
    loose.chmod(0o644)
    with anyio.fail_after(5):
        with pytest.raises(mf.SecurityError, match="readable by other users"):
            async with mf.connect_worker(
                endpoint="tcp://127.0.0.1:1", curve=mf.CurveClient(keys.server_public, loose)
            ):
                pytest.fail("connected with a readable secret key")
        with pytest.raises(mf.SecurityError, match="no secret key"):
            async with mf.connect_worker(
                endpoint="tcp://127.0.0.1:1",
                curve=mf.CurveClient(keys.server_public, keys.client_public),
            ):
                pytest.fail("connected with a public key as the secret")
        with pytest.raises(mf.SecurityError, match="cannot load"):
            async with mf.connect_worker(
                endpoint="tcp://127.0.0.1:1",
                curve=mf.CurveClient(tmp_path / "nope.key", keys.client_secret),
            ):
                pytest.fail("connected without a server key")


def test_readable_secret_key_is_refused_by_the_service(
    reg: Path, keys: Keys, tmp_path: Path
) -> None:
    loose = tmp_path / "loose.key_secret"
    shutil.copy(keys.server_secret, loose)
    loose.chmod(0o644)
    with service(
        "--service-id", "leaky", "--curve-secret", str(loose), "--curve-allowed", str(keys.allowed)
    ) as proc:
        assert proc.wait(timeout=EXIT_TIMEOUT) == 1
        err = read_stderr(proc)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "readable by other users" in lines[0]
    assert str(loose) in lines[0]
    assert entries(reg) == {}


# --------------------------------------------------------------------------- parent mode


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--parent",
        nargs=6,
        required=True,
        metavar=("NAME", "REGISTRY", "BACKEND", "TAG", "CALLS", "CONCURRENCY"),
    )
    name, registry, backend, tag, calls, concurrency = parser.parse_args(argv).parent
    result = anyio.run(
        _parent_run, name, registry, tag, int(calls), int(concurrency), backend=backend
    )
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
