"""Call counters and latency percentiles, with a frozen snapshot for users."""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field
from typing import Final, Literal

LATENCY_SAMPLES: Final = 4096
"""Latency samples kept (per worker and per function): enough for a stable p99, bounded."""

Outcome = Literal["success", "failed", "timeout", "cancelled"]


@dataclass(frozen=True)
class FunctionMetrics:
    """Counts and latency of one function of a worker."""

    requests_total: int
    requests_success: int
    requests_failed: int
    latency_avg_ms: float
    latency_p50_ms: float
    latency_p99_ms: float


@dataclass(frozen=True)
class MetricsSnapshot:
    """A worker's metrics at one moment (``worker.metrics()``).

    Names follow the Multifrost Python implementation where it has one. ``requests_failed``
    counts remote errors and transport failures (worker died, refused); timeouts and
    cancellations have their own counters and are not in ``requests_failed``.
    """

    requests_total: int
    requests_success: int
    requests_failed: int
    requests_timeout: int
    requests_cancelled: int
    success_rate: float
    latency_avg_ms: float
    latency_min_ms: float
    latency_max_ms: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    in_flight: int
    heartbeat_rtt_last_ms: float | None
    heartbeat_rtt_avg_ms: float | None
    heartbeat_misses: int
    circuit_breaker_state: str
    circuit_breaker_trips: int
    restarts: int
    messages_dropped: int
    functions: dict[str, FunctionMetrics] = field(default_factory=dict)


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


class _Counts:
    __slots__ = ("ended_early", "failed", "latencies", "success")

    def __init__(self) -> None:
        self.success = 0
        self.failed = 0
        self.ended_early = 0
        """Timed out or cancelled."""
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)

    @property
    def total(self) -> int:
        return self.success + self.failed + self.ended_early


class Metrics:
    """Mutable recorder owned by one worker; cheap on the call path (totals are summed
    when a snapshot is taken)."""

    def __init__(self) -> None:
        self._functions: dict[str, _Counts] = {}
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self.timeouts = 0
        self.cancelled = 0
        self.in_flight = 0
        self.messages_dropped = 0
        self.heartbeat_misses = 0
        self.heartbeat_rtts: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self.restarts = 0
        self._latency_sum = 0.0
        self._latency_min = float("inf")
        self._latency_max = 0.0

    def _counts(self, function: str) -> _Counts:
        counts = self._functions.get(function)
        if counts is None:
            counts = self._functions[function] = _Counts()
        return counts

    def record_success(self, function: str, seconds: float) -> None:
        """Count one call answered with a result (the hot path)."""
        counts = self._functions.get(function) or self._counts(function)
        counts.success += 1
        self._completed(counts, seconds * 1000.0)

    def record(self, function: str, outcome: Outcome, seconds: float) -> None:
        """Count one finished call; only completed calls (success/failed) feed latency."""
        if outcome == "success":
            self.record_success(function, seconds)
            return
        counts = self._counts(function)
        if outcome == "failed":
            counts.failed += 1
        else:
            counts.ended_early += 1
            if outcome == "timeout":
                self.timeouts += 1
            else:
                self.cancelled += 1
            return
        self._completed(counts, seconds * 1000.0)

    def _completed(self, counts: _Counts, ms: float) -> None:
        counts.latencies.append(ms)
        self._latencies.append(ms)
        self._latency_sum += ms
        if ms < self._latency_min:
            self._latency_min = ms
        if ms > self._latency_max:
            self._latency_max = ms

    def snapshot(self, *, circuit_state: str = "closed", circuit_trips: int = 0) -> MetricsSnapshot:
        """Freeze the current figures."""
        ordered = sorted(self._latencies)
        success = sum(counts.success for counts in self._functions.values())
        failed = sum(counts.failed for counts in self._functions.values())
        total = success + failed + self.timeouts + self.cancelled
        completed = success + failed
        rtts = self.heartbeat_rtts
        functions = {}
        for name, counts in self._functions.items():
            own = sorted(counts.latencies)
            functions[name] = FunctionMetrics(
                requests_total=counts.total,
                requests_success=counts.success,
                requests_failed=counts.failed,
                latency_avg_ms=statistics.fmean(own) if own else 0.0,
                latency_p50_ms=_percentile(own, 0.5),
                latency_p99_ms=_percentile(own, 0.99),
            )
        return MetricsSnapshot(
            requests_total=total,
            requests_success=success,
            requests_failed=failed,
            requests_timeout=self.timeouts,
            requests_cancelled=self.cancelled,
            success_rate=success / total if total else 1.0,
            latency_avg_ms=self._latency_sum / completed if completed else 0.0,
            latency_min_ms=self._latency_min if completed else 0.0,
            latency_max_ms=self._latency_max,
            latency_p50_ms=_percentile(ordered, 0.50),
            latency_p95_ms=_percentile(ordered, 0.95),
            latency_p99_ms=_percentile(ordered, 0.99),
            in_flight=self.in_flight,
            heartbeat_rtt_last_ms=rtts[-1] if rtts else None,
            heartbeat_rtt_avg_ms=statistics.fmean(rtts) if rtts else None,
            heartbeat_misses=self.heartbeat_misses,
            circuit_breaker_state=circuit_state,
            circuit_breaker_trips=circuit_trips,
            restarts=self.restarts,
            messages_dropped=self.messages_dropped,
            functions=functions,
        )
