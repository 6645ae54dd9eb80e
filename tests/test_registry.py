"""The service registry (PROTOCOL §6): services.json + services.lock, with real processes.

Every test uses a temporary registry directory (and a temporary HOME), never the real one.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from multifrost_trio._errors import MultifrostError, ServiceNotFound
from multifrost_trio._registry import (
    ENV_REGISTRY_DIR,
    LOCK_NAME,
    SERVICES_NAME,
    RegistryError,
    RegistryLockTimeout,
    ServiceEntry,
    alist_services,
    alookup,
    aregister,
    aunregister,
    discover,
    list_services,
    lookup,
    register,
    registry_dir,
    registry_file,
    registry_lock,
    unregister,
)

LINUX = sys.platform == "linux"
linux_only = pytest.mark.skipif(not LINUX, reason="needs /proc")


@pytest.fixture
def reg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh registry directory; HOME and the env var also point into tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "registry"
    monkeypatch.setenv(ENV_REGISTRY_DIR, str(folder))
    return folder


@pytest.fixture
def other() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not us (waits on stdin; closed and reaped afterwards)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=10)
    return proc.pid


def _ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return int(fields[19])


def _write(folder: Path, content: Any) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (folder / SERVICES_NAME).write_bytes(data)


def _read(folder: Path) -> Any:
    return json.loads((folder / SERVICES_NAME).read_bytes())


def _no_litter(folder: Path) -> None:
    """No lock, temp file or broken-lock file left behind."""
    names = sorted(p.name for p in folder.iterdir())
    assert LOCK_NAME not in names
    assert not [n for n in names if ".tmp-" in n or ".stale-" in n], names


# --------------------------------------------------------------------------- location


def test_directory_follows_home_env_and_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    monkeypatch.delenv(ENV_REGISTRY_DIR, raising=False)
    assert registry_dir() == tmp_path / "h" / ".multifrost"
    assert registry_file() == tmp_path / "h" / ".multifrost" / SERVICES_NAME
    monkeypatch.setenv(ENV_REGISTRY_DIR, str(tmp_path / "env"))
    assert registry_dir() == tmp_path / "env"
    assert registry_dir(tmp_path / "arg") == tmp_path / "arg"
    register("svc", 4000)
    assert (tmp_path / "env" / SERVICES_NAME).exists()
    assert not (tmp_path / "h").exists()
    register("svc", 4001, directory=tmp_path / "arg")
    assert lookup("svc", directory=tmp_path / "arg") is not None
    assert lookup("svc", directory=tmp_path / "arg").port == 4001  # type: ignore[union-attr]
    assert lookup("svc").port == 4000  # type: ignore[union-attr]


def test_errors_are_typed() -> None:
    assert issubclass(RegistryError, MultifrostError)
    assert issubclass(RegistryLockTimeout, RegistryError)
    assert issubclass(ServiceNotFound, MultifrostError)


# --------------------------------------------------------------------------- basics


def test_round_trip(reg: Path) -> None:
    assert lookup("math") is None
    assert list_services() == []
    register("math", 5555)
    entry = lookup("math")
    assert entry is not None
    assert (entry.service_id, entry.port, entry.pid, entry.alive) == (
        "math",
        5555,
        os.getpid(),
        True,
    )
    assert entry.started is not None
    started = datetime.fromisoformat(entry.started)
    assert started.utcoffset() == timedelta(0)
    raw = _read(reg)["math"]
    assert raw["port"] == 5555
    assert raw["pid"] == os.getpid()
    assert raw["started"] == entry.started
    if LINUX:
        assert raw["pid_start_ticks"] == _ticks(os.getpid())
    assert list_services() == [entry]
    # Re-registering our own name (e.g. a new port) is allowed.
    register("math", 5556)
    assert lookup("math").port == 5556  # type: ignore[union-attr]
    assert unregister("math") is True
    assert lookup("math") is None
    assert unregister("math") is False
    assert _read(reg) == {}
    _no_litter(reg)


def test_argument_checks(reg: Path) -> None:
    for port in (0, 70000, -1, True, "80"):
        with pytest.raises(ValueError, match="port"):
            register("svc", port)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="service_id"):
        register("", 80)


def test_unregister_missing_registry(reg: Path) -> None:
    assert unregister("nothing") is False
    assert not reg.exists()


def test_unregister_refuses_someone_elses_entry(reg: Path, other: subprocess.Popen[bytes]) -> None:
    dead = _dead_pid()
    content = {
        "theirs": {"port": 7000, "pid": other.pid, "started": "x"},
        "dead": {"port": 7001, "pid": dead, "started": "y"},
    }
    _write(reg, content)
    assert unregister("theirs") is False
    assert unregister("dead") is False
    assert _read(reg) == content


def test_refuses_name_owned_by_live_process(reg: Path, other: subprocess.Popen[bytes]) -> None:
    theirs: dict[str, Any] = {"port": 7000, "pid": other.pid, "started": "2024-01-01T00:00:00Z"}
    if LINUX:
        theirs["pid_start_ticks"] = _ticks(other.pid)
    _write(reg, {"svc": theirs})
    with pytest.raises(RegistryError, match=rf"'svc'.*pid {other.pid}.*port 7000"):
        register("svc", 8000)
    assert _read(reg) == {"svc": theirs}
    found = lookup("svc")
    assert found is not None
    assert found.pid == other.pid
    assert found.alive
    _no_litter(reg)


def test_takes_over_entry_of_dead_owner(reg: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        _write(reg, {"svc": {"port": 7000, "pid": proc.pid, "started": "then"}})
        with pytest.raises(RegistryError, match="already registered"):
            register("svc", 8000)
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
    finally:
        _stop(proc)
    assert lookup("svc") is None
    [stale] = list_services()
    assert (stale.pid, stale.alive, stale.stale) == (proc.pid, False, True)
    register("svc", 8000)
    entry = lookup("svc")
    assert entry is not None
    assert (entry.pid, entry.port) == (os.getpid(), 8000)


@linux_only
def test_reused_pid_is_recognised(reg: Path, other: subprocess.Popen[bytes]) -> None:
    wrong = {
        "port": 7000,
        "pid": other.pid,
        "started": "x",
        "pid_start_ticks": _ticks(other.pid) + 1,
    }
    _write(reg, {"svc": wrong})
    assert lookup("svc") is None
    assert list_services()[0].alive is False
    register("svc", 8000)
    assert _read(reg)["svc"]["pid"] == os.getpid()
    # Control: the right start ticks mean the owner is alive.
    right = dict(wrong, pid_start_ticks=_ticks(other.pid))
    _write(reg, {"svc": right})
    assert lookup("svc") is not None
    with pytest.raises(RegistryError, match="already registered"):
        register("svc", 8000)


def test_keeps_other_entries_and_unknown_fields(reg: Path, other: subprocess.Popen[bytes]) -> None:
    others: dict[str, Any] = {
        "py": {
            "port": 6000,
            "pid": other.pid,
            "started": "2024-05-01T10:00:00.123456",
            "extra": {"nested": [1, 2.5, None, "ü"]},
            "flag": True,
        },
        "js": {"port": 6001, "pid": other.pid, "start_time": 1714557600000},
        "go": {"port": 6002, "pid": _dead_pid(), "started": "2024-05-01T10:00:00Z", "v": "4"},
        "broken": "not an entry",
        "ill-typed": {"port": "6003", "pid": None},
    }
    _write(reg, others)
    register("mine", 9000)
    after = _read(reg)
    assert {k: v for k, v in after.items() if k != "mine"} == others
    js = lookup("js")
    assert js is not None
    assert js.port == 6001
    assert js.started == "1714557600000"
    py = lookup("py")
    assert py is not None
    assert py.started == others["py"]["started"]
    assert lookup("go") is None
    assert [e.service_id for e in list_services()] == ["go", "js", "mine", "py"]
    assert unregister("mine") is True
    assert _read(reg) == others


# --------------------------------------------------------------------------- corruption

CORRUPT = {
    "empty": b"",
    "blank": b"  \n",
    "truncated": b'{"svc": {"port": 5555, "pid": 12',
    "garbage": b"\x00\xff\xfe garbage \x89PNG",
    "list": b'[{"port": 5555, "pid": 1}]',
    "string": b'"services"',
    "null": b"null",
    "deep": b"[" * 100_000,
}


@pytest.mark.parametrize("first", ["lookup", "list", "register", "unregister"])
@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_corrupt_file_is_kept_aside_and_replaced(
    reg: Path, kind: str, first: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = CORRUPT[kind]
    _write(reg, bad)
    with caplog.at_level(logging.WARNING, logger="multifrost_trio.registry"):
        if first == "lookup":
            assert lookup("svc") is None
        elif first == "list":
            assert list_services() == []
        elif first == "register":
            register("svc", 5555)
        else:
            assert unregister("svc") is False
    [aside] = reg.glob(f"{SERVICES_NAME}.corrupt-*")
    assert aside.read_bytes() == bad
    assert any(
        r.name == "multifrost_trio.registry" and "corrupt" in r.getMessage() for r in caplog.records
    )
    if first != "register":
        register("svc", 5555)
    assert lookup("svc") is not None
    assert list(_read(reg)) == ["svc"]
    _no_litter(reg)


def test_ill_typed_entries_are_ignored_but_kept(reg: Path) -> None:
    me = os.getpid()
    content: dict[str, Any] = {
        "a": "string",
        "b": {"port": "80", "pid": me},
        "c": {"port": 80},
        "d": {"port": True, "pid": True},
        "e": [80, me],
        "f": {"port": 70000, "pid": me},
        "g": {"port": 80, "pid": -1},
        "h": {"port": 80, "pid": 0},
        "i": None,
        "j": {"port": 80.5, "pid": me},
        "k": {"port": 80, "pid": 2**40},
    }
    _write(reg, content)
    for name in content:
        assert lookup(name) is None
    assert list_services() == []
    register("a", 5555)  # ours: the ill-typed entry is overwritten
    register("new", 5556)
    after = _read(reg)
    assert after["a"]["port"] == 5555
    assert {k: v for k, v in after.items() if k not in ("a", "new")} == {
        k: v for k, v in content.items() if k != "a"
    }
    assert not list(reg.glob("*.corrupt-*"))
    # An ill-typed entry that carries our pid is still ours to remove.
    assert unregister("b") is True
    assert "b" not in _read(reg)


def test_loose_but_valid_peer_values_are_accepted(reg: Path) -> None:
    _write(reg, {"svc": {"port": 5555.0, "pid": float(os.getpid())}})
    entry = lookup("svc")
    assert entry is not None
    assert entry.port == 5555
    assert entry.started is None


def test_corrupt_file_with_lock_held_does_not_raise(
    reg: Path, other: subprocess.Popen[bytes]
) -> None:
    _write(reg, b"{{{")
    (reg / LOCK_NAME).write_text(str(other.pid))
    start = time.monotonic()
    assert lookup("svc", lock_timeout=0.3) is None
    assert time.monotonic() - start < 3
    # Not moved aside without the lock (a peer might have been mid-write).
    assert (reg / SERVICES_NAME).read_bytes() == b"{{{"


# --------------------------------------------------------------------------- permissions


def test_permissions(reg: Path) -> None:
    old = os.umask(0)
    try:
        register("svc", 5555)
    finally:
        os.umask(old)
    assert stat.S_IMODE(reg.stat().st_mode) == 0o700
    assert stat.S_IMODE((reg / SERVICES_NAME).stat().st_mode) == 0o600


def test_existing_loose_permissions_are_tightened(reg: Path) -> None:
    reg.mkdir(mode=0o755)
    os.chmod(reg, 0o755)
    _write(reg, {})
    os.chmod(reg / SERVICES_NAME, 0o644)
    register("svc", 5555)
    assert stat.S_IMODE(reg.stat().st_mode) == 0o700
    assert stat.S_IMODE((reg / SERVICES_NAME).stat().st_mode) == 0o600


def test_symlinked_file_is_refused(reg: Path, tmp_path: Path) -> None:
    reg.mkdir(mode=0o700)
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    (reg / SERVICES_NAME).symlink_to(target)
    with pytest.raises(RegistryError, match="symlink"):
        register("svc", 5555)
    with pytest.raises(RegistryError, match="symlink"):
        lookup("svc")
    with pytest.raises(RegistryError, match="symlink"):
        unregister("svc")
    assert target.read_text() == "{}"
    assert (reg / SERVICES_NAME).is_symlink()
    assert not (reg / LOCK_NAME).exists()


@pytest.mark.parametrize("dangling", [True, False])
def test_symlinked_lock_is_refused(reg: Path, tmp_path: Path, dangling: bool) -> None:
    reg.mkdir(mode=0o700)
    target = tmp_path / "lock-target"
    if not dangling:
        target.write_text("1")
    (reg / LOCK_NAME).symlink_to(target)
    start = time.monotonic()
    with pytest.raises(RegistryError, match="symlink"):
        register("svc", 5555, lock_timeout=5)
    assert time.monotonic() - start < 1
    assert (reg / LOCK_NAME).is_symlink()
    assert not (reg / SERVICES_NAME).exists()


# --------------------------------------------------------------------------- the lock


def test_lock_is_exclusive_and_records_pid(reg: Path) -> None:
    with registry_lock() as lock:
        assert lock == reg / LOCK_NAME
        assert lock.read_text() == str(os.getpid())
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        start = time.monotonic()
        with pytest.raises(RegistryLockTimeout, match=str(os.getpid())):
            register("svc", 5555, lock_timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 2
    assert not lock.exists()
    register("svc", 5555)


def test_stale_lock_by_mtime_is_removed(reg: Path, other: subprocess.Popen[bytes]) -> None:
    reg.mkdir(mode=0o700)
    lock = reg / LOCK_NAME
    lock.write_text(str(other.pid))  # a live pid: only the age makes it stale
    past = time.time() - 5
    os.utime(lock, (past, past))
    with pytest.raises(RegistryLockTimeout):
        register("svc", 5555, lock_timeout=0.3)  # 5 s old: not stale yet
    past = time.time() - 11
    os.utime(lock, (past, past))
    start = time.monotonic()
    register("svc", 5555, lock_timeout=5)
    assert time.monotonic() - start < 1
    assert lookup("svc") is not None
    _no_litter(reg)


@pytest.mark.parametrize("content", ["", "not a pid"])
def test_old_lock_without_pid_is_removed(reg: Path, content: str) -> None:
    reg.mkdir(mode=0o700)
    lock = reg / LOCK_NAME
    lock.write_text(content)
    with pytest.raises(RegistryLockTimeout):
        register("svc", 5555, lock_timeout=0.2)  # fresh, pid unknown: may be mid-creation
    past = time.time() - 30
    os.utime(lock, (past, past))
    register("svc", 5555, lock_timeout=1)
    _no_litter(reg)


def test_lock_of_dead_pid_is_removed_at_once(reg: Path) -> None:
    reg.mkdir(mode=0o700)
    (reg / LOCK_NAME).write_text(str(_dead_pid()))
    start = time.monotonic()
    register("svc", 5555, lock_timeout=5)
    assert time.monotonic() - start < 1
    _no_litter(reg)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child did not answer in time"
    return proc.stdout.readline()


# Child processes import only the registry module: the package's __init__ pulls in trio,
# zmq and pydantic, and 20 such start-ups at once cost seconds on a small machine.
LIGHT_IMPORT = """
import importlib.util, sys, types
spec = importlib.util.find_spec("multifrost_trio")
pkg = types.ModuleType("multifrost_trio")
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["multifrost_trio"] = pkg
"""

HOLDER = (
    LIGHT_IMPORT
    + """
import sys, time
from pathlib import Path
from multifrost_trio._registry import registry_lock
with registry_lock(directory=Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reap", [True, False])
def test_sigkilled_lock_holder_does_not_block(reg: Path, reap: bool) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(reg)],
        stdout=subprocess.PIPE,
        env={**os.environ, "HOME": str(reg.parent / "home")},
    )
    try:
        assert _read_line(proc, 30) == b"locked\n"
        assert (reg / LOCK_NAME).read_text() == str(proc.pid)
        with pytest.raises(RegistryLockTimeout, match=str(proc.pid)):
            register("svc", 5555, lock_timeout=0.3)
        os.kill(proc.pid, signal.SIGKILL)
        if reap:
            proc.wait(timeout=10)
        else:  # a zombie (killed, not yet reaped) is dead too
            deadline = time.monotonic() + 10
            while Path(f"/proc/{proc.pid}/stat").exists() and (
                Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            ):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        start = time.monotonic()
        register("svc", 5555)
        assert time.monotonic() - start < 2
    finally:
        _stop(proc)
    assert lookup("svc") is not None
    _no_litter(reg)


# --------------------------------------------------------------------------- async


@pytest.mark.anyio
async def test_async_wrappers(reg: Path) -> None:
    with anyio.fail_after(10):
        await aregister("svc", 5555)
        entry = await alookup("svc")
        assert entry is not None
        assert entry.port == 5555
        assert await alist_services() == [entry]
        assert await aunregister("svc") is True
        assert await alookup("svc") is None


@pytest.mark.anyio
async def test_discover_waits_for_a_later_entry(reg: Path) -> None:
    found: list[ServiceEntry] = []

    async def seek() -> None:
        found.append(await discover("late", timeout=5))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(seek)
            await anyio.sleep(0.3)
            assert not found
            start = anyio.current_time()
            await aregister("late", 5555)
        assert anyio.current_time() - start < 1
    assert found[0].port == 5555
    assert found[0].pid == os.getpid()
    assert found[0].alive


@pytest.mark.anyio
async def test_discover_times_out(reg: Path) -> None:
    start = anyio.current_time()
    with anyio.fail_after(10), pytest.raises(ServiceNotFound) as info:
        await discover("missing", timeout=0.3)
    assert 0.3 <= anyio.current_time() - start < 2
    assert "'missing'" in str(info.value)
    assert str(reg / SERVICES_NAME) in str(info.value)


@pytest.mark.anyio
async def test_discover_ignores_stale_entry(reg: Path) -> None:
    dead = _dead_pid()
    _write(reg, {"svc": {"port": 5555, "pid": dead, "started": "x"}})
    with (
        anyio.fail_after(10),
        pytest.raises(ServiceNotFound, match=rf"stale.*{dead}|{dead}.*stale"),
    ):
        await discover("svc", timeout=0.2)


# --------------------------------------------------------------------------- many processes

# Each long-lived registrant waits for one byte on stdin per round, registers its name for
# that round and answers with a line: a per-round barrier without polling.
HAMMER = (
    LIGHT_IMPORT
    + """
import sys
from pathlib import Path
from multifrost_trio._registry import register
reg, idx, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
for r in range(rounds):
    if sys.stdin.buffer.read(1) != b"g":
        sys.exit(f"worker {idx}: no go signal for round {r}")
    register(f"w{idx}-r{r}", 20000 + idx, directory=reg)
    print(r, flush=True)
"""
)


def _collect_lines(procs: list[subprocess.Popen[bytes]], expect: bytes, timeout: float) -> None:
    """Read one line from every process's stdout, each equal to ``expect``, within timeout."""
    deadline = time.monotonic() + timeout
    waiting = {p.stdout: p for p in procs if p.stdout is not None}
    while waiting:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{len(waiting)} registrants did not answer {expect!r} in time"
        ready, _, _ = select.select(list(waiting), [], [], remaining)
        for stream in ready:
            proc = waiting.pop(stream)
            line = stream.readline()
            assert line == expect, f"pid {proc.pid} answered {line!r} (exit {proc.poll()})"


@pytest.mark.timeout(120)
def test_concurrent_registrations_lose_nothing(reg: Path, tmp_path: Path) -> None:
    workers, rounds = 20, 50
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    procs: list[subprocess.Popen[bytes]] = []
    start = time.monotonic()
    try:
        for i in range(workers):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", HAMMER, str(reg), str(i), str(rounds)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=env,
                )
            )
        _collect_lines(procs, b"ready\n", 60)
        started = time.monotonic()
        for r in range(rounds):
            for proc in procs:  # all 20 go at once
                assert proc.stdin is not None
                proc.stdin.write(b"g")
                proc.stdin.flush()
            _collect_lines(procs, f"{r}\n".encode(), 20)
            present = _read(reg)
            missing = [f"w{i}-r{r}" for i in range(workers) if f"w{i}-r{r}" not in present]
            assert not missing, f"round {r}: lost {missing}"
        rounds_took = time.monotonic() - started
        for proc in procs:
            assert proc.wait(timeout=20) == 0
    finally:
        for proc in procs:
            _stop(proc)
    elapsed = time.monotonic() - start
    final = _read(reg)
    assert len(final) == workers * rounds
    for i, proc in enumerate(procs):
        for r in range(rounds):
            assert final[f"w{i}-r{r}"]["pid"] == proc.pid
            assert final[f"w{i}-r{r}"]["port"] == 20000 + i
    assert elapsed < 60, f"took {elapsed:.1f} s ({rounds_took:.1f} s for the rounds)"
    print(f"{workers} x {rounds} registrations: {elapsed:.1f} s ({rounds_took:.1f} s rounds)")
    _no_litter(reg)
