"""Worker health: the circuit breaker and the heartbeat task.

Both read time through ``anyio.current_time()``, so their timing logic runs unchanged
under ``trio.testing.MockClock``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

import anyio

from ._errors import WorkerDied

if TYPE_CHECKING:
    from ._parent import WorkerCore

log = logging.getLogger("multifrost_trio.health")


class CircuitState(StrEnum):
    """Closed: calls go through. Open: refused at once. Half-open: one probe may go."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``threshold`` consecutive transport failures; after ``cooldown`` seconds
    lets one probe through (a call or a heartbeat): success closes it, failure re-opens it.
    """

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        on_change: Callable[[CircuitState, CircuitState], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.trips = 0
        self._failures = 0
        self._state = CircuitState.CLOSED
        self._opened_at = 0.0
        self._probe_out = False
        self._on_change = on_change

    @property
    def state(self) -> CircuitState:
        """The state now (an open circuit turns half-open once its cool-down is over)."""
        if self._state is CircuitState.OPEN and (
            anyio.current_time() - self._opened_at >= self.cooldown
        ):
            self._set(CircuitState.HALF_OPEN)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def try_acquire(self) -> bool | None:
        """May a call go now? True: as the half-open probe; False: as a normal call;
        None: refused (the circuit is open, or the probe is already out)."""
        if self._state is CircuitState.CLOSED:
            return False
        state = self.state
        if state is CircuitState.HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return True
        return None

    def success(self, probe: bool = False) -> None:
        """The transport worked (a reply, or a heartbeat echo)."""
        if probe:
            self._probe_out = False
        if self._state is CircuitState.CLOSED:
            self._failures = 0
        elif self.state is CircuitState.HALF_OPEN:
            self._failures = 0
            self._set(CircuitState.CLOSED)

    def failure(self, probe: bool = False) -> None:
        """A transport failure: timeout, worker death, heartbeat loss."""
        if probe:
            self._probe_out = False
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED and self._failures >= self.threshold
        ):
            self.force_open()

    def neutral(self, probe: bool = False) -> None:
        """The call ended without telling anything (its caller cancelled it)."""
        if probe:
            self._probe_out = False

    def force_open(self) -> None:
        """Open now (also used when a worker is given up for good)."""
        if self._state is not CircuitState.OPEN:
            self.trips += 1
        self._opened_at = anyio.current_time()
        self._set(CircuitState.OPEN)

    def _set(self, state: CircuitState) -> None:
        old, self._state = self._state, state
        if old is not state and self._on_change is not None:
            self._on_change(old, state)


async def heartbeat_loop(core: WorkerCore, on_lost: Callable[[], None] | None = None) -> None:
    """Every ``heartbeat_interval`` send a heartbeat and wait ``heartbeat_timeout`` for its echo.

    A miss is counted in the metrics; ``heartbeat_max_misses`` in a row make the worker
    unhealthy: pending calls fail with :class:`WorkerDied`, the breaker counts a failure and
    ``on_lost`` runs (spawn mode kills a hung child there, so it can be restarted). A later
    echo makes the worker healthy again. Interval 0 disables heartbeats.
    """
    options = core.options
    if options.heartbeat_interval <= 0:
        return
    misses = 0
    # Heartbeats keep a fixed cadence (the wait for an echo does not delay the next one),
    # so a hang is noticed within interval x max_misses + timeout.
    next_beat = anyio.current_time()
    while True:
        next_beat += options.heartbeat_interval
        await anyio.sleep(max(0.0, next_beat - anyio.current_time()))
        next_beat = max(next_beat, anyio.current_time() - options.heartbeat_interval)
        if core.failed or core.starting:
            misses = 0
            continue
        with anyio.move_on_after(options.heartbeat_timeout):
            try:
                await core.ping()
            except WorkerDied:
                continue
            if misses >= options.heartbeat_max_misses:
                log.info("worker %s answers heartbeats again", core.name, extra=core.log_extra())
            misses = 0
            core.set_healthy(True)
            if core.breaker.state is CircuitState.HALF_OPEN:
                core.breaker.success()  # the heartbeat is the probe
            continue
        misses += 1
        core.metrics.heartbeat_misses += 1
        log.warning(
            "worker %s missed a heartbeat (%d in a row)",
            core.name,
            misses,
            extra={**core.log_extra(), "misses": misses},
        )
        if misses == options.heartbeat_max_misses:
            core.set_healthy(False)
            core.breaker.failure()
            lost = f"worker {core.name} stopped answering heartbeats ({misses} missed in a row)"
            core.fail_pending(lambda: WorkerDied(lost))  # noqa: B023 (called right here)
            if on_lost is not None:
                on_lost()
