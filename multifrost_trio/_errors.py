"""The exception tree: one root, shallow families."""

from __future__ import annotations

from typing import NoReturn

import anyio


class MultifrostError(Exception):
    """Root of every error this library raises on purpose."""


class RemoteCallError(MultifrostError):
    """The worker's handler raised; raised by ``call`` in the parent.

    ``remote_type`` is the exception's class name on the worker side, ``remote_message`` its
    text and ``remote_traceback`` the traceback text the worker sent (may be empty).
    """

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = "") -> None:
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        super().__init__(f"{remote_type}: {remote_message}" if remote_type else remote_message)

    @classmethod
    def from_wire(cls, text: str) -> RemoteCallError:
        """Parse the wire form ``"<ExcType>: <message>\\n<traceback>"`` (tolerant of any str)."""
        first, _, traceback = text.partition("\n")
        remote_type, sep, message = first.partition(": ")
        if not sep or not remote_type.replace(".", "").replace("_", "").isalnum():
            return cls("", first, traceback)
        return cls(remote_type, message, traceback)


class CallTimeout(MultifrostError, TimeoutError):
    """A call outlived its ``timeout`` option; raised by ``call``.

    The worker was told to cancel the handler. Also a :class:`TimeoutError`.
    """


class CircuitOpenError(MultifrostError):
    """The worker's circuit breaker is open: the call was refused without being sent."""


class WorkerDied(MultifrostError):
    """The worker process exited (or stopped answering) while calls were pending or made.

    ``exit_code`` is the process's return code (negative: killed by that signal; ``None``:
    unknown, e.g. a remote worker), ``stderr_tail`` its last lines of standard error.
    """

    def __init__(
        self, message: str, *, exit_code: int | None = None, stderr_tail: str = ""
    ) -> None:
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        if stderr_tail:
            message = f"{message}\n--- worker stderr (last lines) ---\n{stderr_tail}"
        super().__init__(message)


class WorkerStartError(WorkerDied):
    """The worker could not be started or never became ready; raised by ``open_worker``.

    Carries the exit code (if it exited) and its stderr tail, like :class:`WorkerDied`.
    """


class EncodeError(MultifrostError, ValueError):
    """A value cannot travel on the wire (int beyond int64, non-str map key, too deep,
    unsupported type); raised locally before anything is sent."""


class ServiceNotFound(MultifrostError):
    """A connect-mode service name is not (or no longer) in the registry."""


def reraise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the one real error of a task group as itself (cancellations are not real
    errors), keeping its own cause and context; raise the group if there are several."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    real = [exc for exc in leaves if not isinstance(exc, anyio.get_cancelled_exc_class())]
    if len(real) == 1:
        error = real[0]
    elif not real and leaves:
        error = leaves[0]
    else:
        raise group
    context, suppress = error.__context__, error.__suppress_context__
    try:
        raise error
    finally:
        error.__context__, error.__suppress_context__ = context, suppress
        del error, group
