"""Spawn mode: start the child, wait until it answers, supervise it, stop it for sure.

``open_worker`` owns one task group for the worker's life: the channel's reader, the
process supervisor and the two output pumps. It yields only once the child echoed a
heartbeat, and on the way out it always reaps the child (shutdown, grace, SIGTERM, SIGKILL),
shielded from cancellation.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import zmq

from . import _messages as m
from ._child import PARENT_FD_ENV, PORT_ENV, WORKER_MODE_ENV
from ._errors import WorkerDied, WorkerStartError, reraise_single
from ._health import heartbeat_loop
from ._parent import SpawnOptions, Stream, Worker, WorkerCore, log
from ._transport import Channel, bind_ephemeral, new_socket

STDERR_TAIL_LINES: Final = 20
_STDERR_SETTLE_SECONDS: Final = 0.25
_MAX_BACKOFF_SECONDS: Final = 5.0
"""After the child exits, how long to wait for the rest of its stderr (for the error text)."""

_INTERPRETERS: Final = {".py": None, ".js": "node", ".mjs": "node", ".cjs": "node", ".ts": "tsx"}


def build_argv(script: str | os.PathLike[str], executable: str | None) -> list[str]:
    """argv for a worker: ``[executable, script, "--worker"]``, or ``[script]`` if compiled."""
    path = os.fspath(script)
    if executable is not None:
        return [executable, path, "--worker"]
    suffix = Path(path).suffix.lower()
    if suffix in _INTERPRETERS:
        interpreter = _INTERPRETERS[suffix]
        if interpreter is None:
            return [sys.executable, path, "--worker"]
        found = shutil.which(interpreter)
        if found is None:
            raise WorkerStartError(f"cannot start {path}: {interpreter!r} is not on PATH")
        return [found, path, "--worker"]
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return [os.path.abspath(path)]
    return [sys.executable, path, "--worker"]


class _ChildOutput:
    """Drains the child's raw stdout/stderr pipes (so its writes never block) and keeps
    the last lines of stderr for error messages."""

    def __init__(self, core: WorkerCore) -> None:
        self._core = core
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.stderr_closed = anyio.Event()
        self.stdout_closed = anyio.Event()

    async def pump(self, stream: anyio.abc.ByteReceiveStream, kind: Stream) -> None:
        buffered = b""
        try:
            async for chunk in stream:
                *lines, buffered = (buffered + chunk).split(b"\n")
                for raw in lines:
                    self._line(kind, raw)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            if buffered:
                self._line(kind, buffered)
            (self.stderr_closed if kind == "stderr" else self.stdout_closed).set()

    def _line(self, kind: Stream, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if kind == "stderr":
            self.tail.append(line)
        self._core.emit_output(kind, line)

    def tail_text(self) -> str:
        return "\n".join(self.tail)


@asynccontextmanager
async def open_worker(
    script: str | os.PathLike[str],
    executable: str | None = None,
    *,
    options: SpawnOptions | None = None,
) -> AsyncIterator[Worker]:
    """Start ``script`` as a worker process and yield a :class:`Worker` once it answers.

    The default executable is this interpreter for ``.py``, node for ``.js``/``.mjs`` and the
    script itself when it is an executable file. Leaving the block stops the child
    (``shutdown``, then SIGTERM, then SIGKILL) and reaps it before returning, also on error
    or cancellation. Raises :class:`WorkerStartError` if the child cannot start or never
    answers within ``options.start_timeout``.
    """
    options = options or SpawnOptions()
    argv = build_argv(script, executable)
    core = WorkerCore(Path(os.fspath(script)).name, options)
    sock = new_socket(zmq.DEALER)
    try:
        port = bind_ephemeral(sock)
    except BaseException:
        sock.close(linger=0)
        raise
    channel = Channel(sock, core.on_frames, batch_sends=True)
    core.attach(channel)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(channel.run)
            supervisor = _Supervisor(argv, port, core, channel, tg)
            try:
                await supervisor.start()
                tg.start_soon(supervisor.run)
                tg.start_soon(heartbeat_loop, core, supervisor.kill_hung_child)
                yield Worker._for(core)
            finally:
                with anyio.CancelScope(shield=True):
                    await supervisor.stop()
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        reraise_single(group)
    finally:
        channel.close()


class _Child:
    """One incarnation of the worker process."""

    def __init__(self, process: anyio.abc.Process, death_pipe: int, core: WorkerCore) -> None:
        self.process = process
        self.death_pipe = death_pipe
        """Write end of the parent-death pipe; closed once the child has exited."""
        self.output = _ChildOutput(core)
        self.exited = anyio.Event()


class _Supervisor:
    """Starts the child, waits for it to exit, restarts it if the options say so, and
    stops it for sure. The socket, its reader and the heartbeat task outlive children:
    a restarted child connects to the same port."""

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        core: WorkerCore,
        channel: Channel,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        self._argv = argv
        self._port = port
        self._core = core
        self._channel = channel
        self._options = core.options
        self._tg = tg
        self._child: _Child | None = None
        self._stopping = False
        self._restarts: collections.deque[float] = collections.deque()

    async def start(self) -> None:
        """Start a child and wait until it answers; WorkerStartError if it never does."""
        core = self._core
        process, death_pipe = await _start_process(self._argv, self._port, self._options)
        core.pid = process.pid
        child = self._child = _Child(process, death_pipe, core)
        assert process.stdout is not None
        assert process.stderr is not None
        self._tg.start_soon(child.output.pump, process.stdout, "stdout")
        self._tg.start_soon(child.output.pump, process.stderr, "stderr")
        self._tg.start_soon(self._watch, child)
        core.attach(self._channel)
        core.starting = True
        try:
            with anyio.fail_after(self._options.start_timeout):
                await core.ping()
        except TimeoutError:
            _signal(process, terminate=False)
            await child.exited.wait()
            raise WorkerStartError(
                f"worker {core.name} did not answer within {self._options.start_timeout} s",
                exit_code=process.returncode,
                stderr_tail=child.output.tail_text(),
            ) from None
        except WorkerDied as died:
            raise WorkerStartError(
                f"worker {core.name} exited during start-up with code {died.exit_code}",
                exit_code=died.exit_code,
                stderr_tail=died.stderr_tail,
            ) from None
        finally:
            core.starting = False
        log.info("worker %s ready", core.name, extra=core.log_extra())

    async def _watch(self, child: _Child) -> None:
        """Wait for ``child`` to exit, then fail every pending call at once."""
        process, core = child.process, self._core
        # Shielded: ``exited`` must mean the child is gone, even while the worker's task
        # group is being cancelled; ``stop`` makes sure it does go.
        try:
            with anyio.CancelScope(shield=True):
                code = await process.wait()
            os.close(child.death_pipe)
            with anyio.move_on_after(_STDERR_SETTLE_SECONDS):
                await child.output.stderr_closed.wait()
                await child.output.stdout_closed.wait()
            tail = child.output.tail_text()
            message = f"worker {core.name} (pid {process.pid}) exited with code {code}"
            restarting = self._will_restart()
            if not self._stopping:
                level = logging.DEBUG if code == 0 else logging.WARNING
                log.log(level, message, extra={**core.log_extra(), "exit_code": code})
                core.breaker.failure()
                if self._options.max_restarts and not restarting:
                    message += (
                        f"; it died {len(self._restarts) + 1} times within "
                        f"{self._options.restart_window} s, not restarting it again"
                    )
                    log.error(message, extra=core.log_extra())
                    core.breaker.force_open()
            core.fail_all(
                lambda: WorkerDied(message, exit_code=code, stderr_tail=tail),
                restarting=restarting,
            )
        finally:
            child.exited.set()
        await process.aclose()

    def _will_restart(self) -> bool:
        """Would a child that died now be restarted (``max_restarts`` per window)?"""
        if self._stopping or not self._options.max_restarts:
            return False
        now = anyio.current_time()
        while self._restarts and now - self._restarts[0] > self._options.restart_window:
            self._restarts.popleft()
        return len(self._restarts) < self._options.max_restarts

    async def run(self) -> None:
        """Restart children that die, within ``max_restarts`` per ``restart_window``."""
        options, core = self._options, self._core
        backoff = options.restart_backoff
        while True:
            child = self._child
            assert child is not None
            await child.exited.wait()
            if self._stopping:
                return
            if not core.restarting:  # decided (and reported) by _watch
                return
            self._restarts.append(anyio.current_time())
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
            core.metrics.restarts += 1
            log.warning("restarting worker %s", core.name, extra=core.log_extra())
            try:
                await self.start()
            except WorkerStartError as exc:
                log.warning("restart of %s failed: %s", core.name, exc, extra=core.log_extra())
                continue
            backoff = options.restart_backoff

    def kill_hung_child(self) -> None:
        """Heartbeats are lost: with restarts on, kill the hung child so it is replaced."""
        child, core = self._child, self._core
        if child is not None and self._will_restart():
            # Doomed from now on: later calls wait for its replacement.
            hung = f"worker {core.name} was hung and is being replaced"
            core.fail_all(lambda: WorkerDied(hung), restarting=True)
            _signal(child.process, terminate=False)

    async def stop(self) -> None:
        """shutdown -> grace -> SIGTERM -> grace -> SIGKILL; returns once the child is reaped."""
        self._stopping = True
        child, core, options = self._child, self._core, self._options
        if child is not None:
            process = child.process
            if process.returncode is None:
                core.send_nowait(m.make_shutdown())
                with anyio.move_on_after(options.shutdown_grace):
                    await child.exited.wait()
            if process.returncode is None:
                log.info("worker %s ignored shutdown; sending SIGTERM", core.name)
                _signal(process, terminate=True)
                with anyio.move_on_after(options.kill_grace):
                    await child.exited.wait()
            if process.returncode is None:
                log.warning("worker %s ignored SIGTERM; sending SIGKILL", core.name)
                _signal(process, terminate=False)
            await child.exited.wait()
            await process.aclose()
        if not core.failed or core.restarting:
            core.fail_all(lambda: WorkerDied(f"worker {core.name} was stopped"))
        log.info("worker %s stopped", core.name, extra=core.log_extra())


async def _start_process(
    argv: Sequence[str], port: int, options: SpawnOptions
) -> tuple[anyio.abc.Process, int]:
    """Start the child with the protocol's environment and a parent-death pipe; returns the
    process and the pipe's write end, which must stay open for as long as the child runs
    (when this process dies the OS closes it, and the child reads EOF)."""
    env = {**os.environ, **options.env, PORT_ENV: str(port), WORKER_MODE_ENV: "1"}
    death_read, death_write = os.pipe()
    env[PARENT_FD_ENV] = f"{death_read}:{os.getpid()}"
    try:
        process = await anyio.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=options.cwd,
            env=env,
            pass_fds=(death_read,),
            start_new_session=True,
        )
    except OSError as exc:
        os.close(death_write)
        raise WorkerStartError(f"cannot start {' '.join(argv)}: {exc}") from exc
    finally:
        os.close(death_read)
    return process, death_write


def _signal(process: anyio.abc.Process, *, terminate: bool) -> None:
    try:
        if terminate:
            process.terminate()
        else:
            process.kill()
    except ProcessLookupError:
        pass
