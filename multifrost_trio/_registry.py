"""The connect-mode service registry (PROTOCOL §6): ``services.json`` plus ``services.lock``.

File-compatible with the other Multifrost implementations:

* ``<dir>/services.json`` is a JSON object ``{service_id: {"port", "pid", "started", ...}}``.
  Readers rely only on ``port`` and ``pid``; unknown keys (and entries we cannot parse) of
  other services are written back untouched. We add ``pid_start_ticks`` (Linux: field 22 of
  ``/proc/<pid>/stat``) so an entry whose pid was reused by an unrelated process is
  recognised as stale.
* ``<dir>/services.lock`` is taken with ``O_CREAT|O_EXCL`` and holds the taker's pid. Waiters
  retry (about every 100 ms) for up to 10 s. A lock older than 10 s is stale; a lock whose pid
  is dead is stale at once.
* Rewrites are atomic: temp file in the same directory, fsync, ``os.replace``, fsync the
  directory. Directory 0700, file 0600; a symlink in place of the file or the lock is refused.
* A corrupt ``services.json`` never raises: it is moved aside to
  ``services.json.corrupt-<timestamp>``, logged on ``multifrost_trio.registry`` and the
  registry starts empty.

The directory is ``Path.home() / ".multifrost"`` unless ``MULTIFROST_REGISTRY_DIR`` or an
explicit ``directory`` argument says otherwise.

Every public function is synchronous (blocking file I/O); the ``a*`` variants and
:func:`discover` run them in a worker thread so the event loop never blocks on the disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import secrets
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ._errors import MultifrostError, ServiceNotFound

__all__ = [
    "ENV_REGISTRY_DIR",
    "LOCK_NAME",
    "LOCK_STALE_AFTER",
    "LOCK_TIMEOUT",
    "SERVICES_NAME",
    "RegistryError",
    "RegistryLockTimeout",
    "ServiceEntry",
    "alist_services",
    "alookup",
    "aregister",
    "aunregister",
    "discover",
    "list_services",
    "lookup",
    "register",
    "registry_dir",
    "registry_file",
    "registry_lock",
    "unregister",
]

log = logging.getLogger("multifrost_trio.registry")

ENV_REGISTRY_DIR = "MULTIFROST_REGISTRY_DIR"
SERVICES_NAME = "services.json"
LOCK_NAME = "services.lock"
#: How long a registration waits for the lock before giving up (seconds).
LOCK_TIMEOUT = 10.0
#: A lock file whose mtime is older than this is stale (seconds).
LOCK_STALE_AFTER = 10.0
#: Longest pause between two attempts at the lock (the protocol's "~100 ms").
LOCK_RETRY_INTERVAL = 0.1
#: How often :func:`discover` re-reads the file.
DISCOVER_POLL_INTERVAL = 0.1
#: The extra entry key holding the owner's process start time (clock ticks since boot).
START_TICKS_KEY = "pid_start_ticks"
#: services.json larger than this is treated as corrupt (protects against a hostile file).
MAX_FILE_BYTES = 16 * 1024 * 1024

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_PID_MAX = 2**31 - 1


class RegistryError(MultifrostError):
    """The registry refused an operation or cannot be used (name owned by a live process,
    symlink in place of a registry file, unreadable directory, lock not obtained, ...)."""


class RegistryLockTimeout(RegistryError, TimeoutError):
    """``services.lock`` stayed held by a live process for the whole timeout."""


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """One registry entry as seen now: ``alive`` is False when the owner process is gone
    (or its pid now belongs to an unrelated process)."""

    service_id: str
    port: int
    pid: int
    started: str | None
    alive: bool

    @property
    def stale(self) -> bool:
        """True when the entry's owner is no longer running."""
        return not self.alive


# --------------------------------------------------------------------------- paths


def registry_dir(directory: Path | None = None) -> Path:
    """The registry directory: ``directory``, else ``$MULTIFROST_REGISTRY_DIR``, else
    ``Path.home() / ".multifrost"`` (looked up at call time, so tests can move it)."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get(ENV_REGISTRY_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".multifrost"


def registry_file(directory: Path | None = None) -> Path:
    """Path of ``services.json`` in the registry directory."""
    return registry_dir(directory) / SERVICES_NAME


def _ensure_dir(path: Path) -> None:
    """Create the registry directory 0700, or tighten an existing one we own to 0700."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        raise RegistryError(f"cannot create registry directory {path}: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise RegistryError(f"registry path {path} is not a directory")
    if st.st_mode & 0o077 and hasattr(os, "getuid") and st.st_uid == os.getuid():
        try:
            os.chmod(path, 0o700)
        except OSError as exc:
            log.warning("cannot restrict registry directory %s to 0700: %s", path, exc)


def _is_symlink(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


def _proc_stat_fields(pid: int) -> list[bytes] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (after the command name), or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw.rsplit(b")", 1)[-1].split()


def _start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot (field 22), None if unknown."""
    fields = _proc_stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    if not 0 < pid <= _PID_MAX:
        return False
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process there
        return _win_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to another user
    except OSError:
        return False
    fields = _proc_stat_fields(pid)
    return not (fields and fields[0] in (b"Z", b"X"))


def _win_pid_alive(pid: int) -> bool:  # pragma: no cover - Windows only
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32")  # type: ignore[attr-defined,unused-ignore]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return bool(code.value == 259)  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


_own_ticks: tuple[int, int | None] | None = None


def _my_start_ticks() -> int | None:
    """Our own start ticks (cached per pid, so a fork re-reads)."""
    global _own_ticks
    pid = os.getpid()
    if _own_ticks is None or _own_ticks[0] != pid:
        _own_ticks = (pid, _start_ticks(pid))
    return _own_ticks[1]


# --------------------------------------------------------------------------- the lock


def _read_lock_pid(lock: Path) -> int | None:
    """The pid written in the lock file, or None (empty, unreadable, garbage, gone)."""
    try:
        fd = os.open(lock, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 64)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        pid = int(text.strip() or b"x")
    except ValueError:
        return None
    return pid if 0 < pid <= _PID_MAX else None


def _break_if_stale(lock: Path, stale_after: float) -> bool:
    """Remove ``lock`` if it is stale; True when the caller should retry at once.

    The lock is first renamed aside and checked to still be the file judged stale, so a
    lock freshly taken by another process in the meantime is put back, not deleted.
    """
    try:
        st = os.lstat(lock)
    except FileNotFoundError:
        return True
    except OSError as exc:
        raise RegistryError(f"cannot inspect registry lock {lock}: {exc}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise RegistryError(f"registry lock {lock} is a symlink; refusing to use it")
    if not stat.S_ISREG(st.st_mode):
        raise RegistryError(f"registry lock {lock} is not a regular file")
    pid = _read_lock_pid(lock)
    age = time.time() - st.st_mtime
    if age > stale_after:
        reason = f"older than {stale_after:g} s"
    elif pid is not None and not _pid_alive(pid):
        reason = f"its pid {pid} is not running"
    else:
        return False
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return True  # someone else removed it
    except OSError as exc:
        raise RegistryError(f"cannot remove stale registry lock {lock}: {exc}") from exc
    try:
        try:
            moved = os.lstat(aside)
        except OSError:
            return True
        same = (moved.st_dev, moved.st_ino, moved.st_mtime_ns, moved.st_size) == (
            st.st_dev,
            st.st_ino,
            st.st_mtime_ns,
            st.st_size,
        ) and _read_lock_pid(aside) == pid
        if not same:
            # Someone replaced the stale lock with a fresh one before our rename: put it
            # back unless yet another process has taken the lock since.
            try:
                os.link(aside, lock)
            except OSError:
                log.warning("registry lock %s changed hands while being broken", lock)
            return False
        log.warning("removed stale registry lock %s (%s, pid %s)", lock, reason, pid)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(aside)


def _acquire(
    lock: Path, timeout: float, stale_after: float, retry_interval: float
) -> tuple[int, int]:
    """Take ``lock``; returns its (st_dev, st_ino) so release removes only our own file."""
    deadline = time.monotonic() + timeout
    delay = min(0.01, retry_interval)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC
    while True:
        try:
            fd = os.open(lock, flags, 0o600)
        except FileExistsError:
            if _break_if_stale(lock, stale_after):
                continue
        except OSError as exc:
            raise RegistryError(f"cannot create registry lock {lock}: {exc}") from exc
        else:
            try:
                os.write(fd, str(os.getpid()).encode())
                st = os.fstat(fd)
            except OSError as exc:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(lock)
                raise RegistryError(f"cannot write registry lock {lock}: {exc}") from exc
            os.close(fd)
            return st.st_dev, st.st_ino
        now = time.monotonic()
        if now >= deadline:
            holder = _read_lock_pid(lock)
            raise RegistryLockTimeout(
                f"could not take the registry lock {lock} within {timeout:g} s"
                f" (held by pid {holder if holder is not None else 'unknown'})"
            )
        # Start fast and back off to ~retry_interval; jitter keeps waiters out of lockstep.
        time.sleep(min(delay * random.uniform(0.5, 1.0), deadline - now))
        delay = min(delay * 2, retry_interval)


def _release(lock: Path, ident: tuple[int, int]) -> None:
    """Delete the lock if it is still the file we created."""
    try:
        st = os.lstat(lock)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(lock)
        else:
            log.warning("registry lock %s was taken over while we held it", lock)
    except FileNotFoundError:
        log.warning("registry lock %s vanished while we held it", lock)
    except OSError as exc:
        log.warning("cannot remove registry lock %s: %s", lock, exc)


@contextlib.contextmanager
def registry_lock(
    *,
    directory: Path | None = None,
    timeout: float = LOCK_TIMEOUT,
    stale_after: float = LOCK_STALE_AFTER,
    retry_interval: float = LOCK_RETRY_INTERVAL,
) -> Iterator[Path]:
    """Hold ``services.lock`` for the block (creates the directory 0700 if needed).

    Raises :class:`RegistryLockTimeout` when a live holder keeps it for ``timeout``
    seconds, :class:`RegistryError` when the lock path is a symlink or cannot be created.
    Not re-entrant.
    """
    folder = registry_dir(directory)
    _ensure_dir(folder)
    lock = folder / LOCK_NAME
    ident = _acquire(lock, timeout, stale_after, retry_interval)
    try:
        yield lock
    finally:
        _release(lock, ident)


# --------------------------------------------------------------------------- the file


def _read_raw(path: Path) -> tuple[dict[str, Any], str | None]:
    """Read services.json: (object, None), or ({}, problem) when the content is corrupt.

    A missing file is an empty registry. A symlink or non-regular file raises.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC)
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) or _is_symlink(path):
            raise RegistryError(f"registry file {path} is a symlink; refusing to use it") from exc
        raise RegistryError(f"cannot read registry file {path}: {exc}") from exc
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RegistryError(f"registry file {path} is not a regular file")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        return {}, f"larger than {MAX_FILE_BYTES} bytes"
    if not data.strip():
        return {}, "empty file"
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        return {}, f"not valid JSON: {str(exc)[:200]}"
    if not isinstance(obj, dict):
        return {}, f"top level is a JSON {type(obj).__name__}, not an object"
    return obj, None


def _quarantine(path: Path, problem: str) -> None:
    """Move a corrupt services.json aside (kept for inspection) and log it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while os.path.lexists(target):
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning(
            "registry file %s is corrupt (%s) and cannot be moved aside (%s);"
            " treating the registry as empty",
            path,
            problem,
            exc,
        )
        return
    log.warning(
        "registry file %s is corrupt (%s); moved it to %s and starting with an empty registry",
        path,
        problem,
        target,
    )


def _load_locked(path: Path) -> dict[str, Any]:
    """Read services.json while holding the lock; a corrupt file is quarantined."""
    raw, problem = _read_raw(path)
    if problem is not None:
        _quarantine(path, problem)
    return raw


def _load_unlocked(folder: Path, lock_timeout: float) -> dict[str, Any]:
    """Read services.json for a lookup (no lock needed: writers replace it atomically).

    If it looks corrupt, re-read under the lock (a peer might have been mid-write) and
    quarantine it only then. Never raises for corruption.
    """
    path = folder / SERVICES_NAME
    raw, problem = _read_raw(path)
    if problem is None:
        return raw
    try:
        with registry_lock(directory=folder, timeout=lock_timeout):
            return _load_locked(path)
    except RegistryError as exc:
        log.warning(
            "registry file %s looks corrupt (%s) and could not be checked under the lock (%s);"
            " treating the registry as empty",
            path,
            problem,
            exc,
        )
        return {}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, raw: dict[str, Any]) -> None:
    """Replace services.json with ``raw``: temp file (0600), fsync, rename, fsync dir."""
    data = json.dumps(raw).encode() + b"\n"  # no indent: keeps the fast C encoder
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise RegistryError(f"cannot write registry file {path}: {exc}") from exc
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- entries


def _as_int(value: object) -> int | None:
    """A JSON integer (bool excluded; an integral float from a loose peer accepted)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _parse_entry(service_id: str, value: object) -> ServiceEntry | None:
    """A usable entry (with liveness checked now), or None for an ill-typed one."""
    if not isinstance(value, dict):
        return None
    port = _as_int(value.get("port"))
    pid = _as_int(value.get("pid"))
    if port is None or pid is None or not 0 < port <= 65535 or not 0 < pid <= _PID_MAX:
        return None
    started: str | None = None
    for key in ("started", "start_time"):
        item = value.get(key)
        if item is not None and not isinstance(item, dict | list):
            started = item if isinstance(item, str) else json.dumps(item)
            break
    return ServiceEntry(service_id, port, pid, started, _owner_alive(pid, value))


def _owner_alive(pid: int, value: dict[str, Any]) -> bool:
    """The pid runs and, when we recorded its start ticks, is still the same process."""
    if not _pid_alive(pid):
        return False
    recorded = value.get(START_TICKS_KEY)
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        live = _start_ticks(pid)
        if live is not None and live != recorded:
            return False
    return True


def _check_service_id(service_id: str) -> None:
    if not isinstance(service_id, str) or not service_id:
        raise ValueError(f"service_id must be a non-empty str, not {service_id!r}")


# --------------------------------------------------------------------------- public API


def register(
    service_id: str,
    port: int,
    *,
    directory: Path | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
) -> None:
    """Record that this process serves ``service_id`` on ``port`` (127.0.0.1).

    Refuses with :class:`RegistryError` when the name belongs to another live process;
    takes over an entry whose owner is dead (or whose pid was reused). Other entries are
    written back untouched.
    """
    _check_service_id(service_id)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        raise ValueError(f"port must be an int in 1..65535, not {port!r}")
    folder = registry_dir(directory)
    path = folder / SERVICES_NAME
    me = os.getpid()
    with registry_lock(directory=folder, timeout=lock_timeout):
        raw = _load_locked(path)
        if service_id in raw:
            old = _parse_entry(service_id, raw[service_id])
            if old is None:
                log.warning("replacing ill-typed registry entry %r in %s", service_id, path)
            elif old.pid != me and old.alive:
                raise RegistryError(
                    f"service {service_id!r} is already registered by running process"
                    f" pid {old.pid} (port {old.port}) in {path}"
                )
            elif old.pid != me:
                log.info(
                    "taking over stale registry entry %r (pid %d no longer running)",
                    service_id,
                    old.pid,
                )
        entry: dict[str, Any] = {
            "port": port,
            "pid": me,
            "started": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        ticks = _my_start_ticks()
        if ticks is not None:
            entry[START_TICKS_KEY] = ticks
        raw[service_id] = entry
        _write_atomic(path, raw)


def unregister(
    service_id: str, *, directory: Path | None = None, lock_timeout: float = LOCK_TIMEOUT
) -> bool:
    """Remove ``service_id`` if this process owns it (pid matches); True if removed."""
    _check_service_id(service_id)
    folder = registry_dir(directory)
    path = folder / SERVICES_NAME
    if not os.path.lexists(path):
        return False
    with registry_lock(directory=folder, timeout=lock_timeout):
        raw = _load_locked(path)
        value = raw.get(service_id)
        if not isinstance(value, dict) or _as_int(value.get("pid")) != os.getpid():
            return False
        del raw[service_id]
        _write_atomic(path, raw)
        return True


def list_services(
    directory: Path | None = None, *, lock_timeout: float = LOCK_TIMEOUT
) -> list[ServiceEntry]:
    """Every well-formed entry, sorted by name, each flagged alive or stale."""
    folder = registry_dir(directory)
    raw = _load_unlocked(folder, lock_timeout)
    found = (_parse_entry(name, value) for name, value in raw.items())
    return sorted((e for e in found if e is not None), key=lambda e: e.service_id)


def _lookup_any(
    service_id: str, directory: Path | None, lock_timeout: float
) -> ServiceEntry | None:
    folder = registry_dir(directory)
    raw = _load_unlocked(folder, lock_timeout)
    return _parse_entry(service_id, raw[service_id]) if service_id in raw else None


def lookup(
    service_id: str, *, directory: Path | None = None, lock_timeout: float = LOCK_TIMEOUT
) -> ServiceEntry | None:
    """The entry for ``service_id`` if its owner is running, else None."""
    _check_service_id(service_id)
    entry = _lookup_any(service_id, directory, lock_timeout)
    return entry if entry is not None and entry.alive else None


async def aregister(
    service_id: str,
    port: int,
    *,
    directory: Path | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
) -> None:
    """:func:`register` in a worker thread (not abandoned on cancel, so the file and the
    lock are never left half-done)."""
    await anyio.to_thread.run_sync(
        partial(register, service_id, port, directory=directory, lock_timeout=lock_timeout)
    )


async def aunregister(
    service_id: str, *, directory: Path | None = None, lock_timeout: float = LOCK_TIMEOUT
) -> bool:
    """:func:`unregister` in a worker thread."""
    return await anyio.to_thread.run_sync(
        partial(unregister, service_id, directory=directory, lock_timeout=lock_timeout)
    )


async def alookup(
    service_id: str, *, directory: Path | None = None, lock_timeout: float = LOCK_TIMEOUT
) -> ServiceEntry | None:
    """:func:`lookup` in a worker thread."""
    return await anyio.to_thread.run_sync(
        partial(lookup, service_id, directory=directory, lock_timeout=lock_timeout)
    )


async def alist_services(
    directory: Path | None = None, *, lock_timeout: float = LOCK_TIMEOUT
) -> list[ServiceEntry]:
    """:func:`list_services` in a worker thread."""
    return await anyio.to_thread.run_sync(
        partial(list_services, directory, lock_timeout=lock_timeout)
    )


async def discover(
    service_id: str,
    *,
    timeout: float = 5.0,
    directory: Path | None = None,
    poll_interval: float = DISCOVER_POLL_INTERVAL,
) -> ServiceEntry:
    """Wait until ``service_id`` has an entry whose owner is running and return it.

    Re-reads the file every ``poll_interval`` seconds (off the event loop). Raises
    :class:`ServiceNotFound` after ``timeout`` seconds, naming the registry file (and the
    stale entry's pid, if there was one); :class:`RegistryError` if the file is refused
    (e.g. a symlink).
    """
    _check_service_id(service_id)
    deadline = anyio.current_time() + timeout
    last: ServiceEntry | None = None
    while True:
        last = await anyio.to_thread.run_sync(
            partial(_lookup_any, service_id, directory, min(LOCK_TIMEOUT, max(timeout, 0.1)))
        )
        if last is not None and last.alive:
            return last
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            break
        await anyio.sleep(min(poll_interval, remaining))
    where = registry_file(directory)
    detail = (
        f"; its entry (pid {last.pid}, port {last.port}) is stale: that process is not running"
        if last is not None
        else ""
    )
    raise ServiceNotFound(
        f"service {service_id!r} not found in registry {where} within {timeout:g} s{detail}"
    )
