"""Configuration as frozen, keyword-only value objects, validated at construction.

:class:`PoolConfig` holds what :class:`herd.Pool` takes as keyword arguments; a
bad value raises :class:`ValueError` (or :class:`TypeError` for a wrong type)
when the pool is built, never later in a background task.

Durations are seconds (``float``) or :class:`datetime.timedelta`; ``0`` or
``None`` disables the feature they time, where the field says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import math

__all__ = ["Duration", "PoolConfig", "duration_seconds"]

Duration = float | int | datetime.timedelta | None


def duration_seconds(name: str, value: Duration, *, allow_none: bool = True) -> float | None:
    """Normalise a duration to seconds; ``0``/``None`` give ``None`` when allowed.

    :raises ValueError: negative, NaN or infinite, or ``None``/0 where not allowed.
    :raises TypeError: not a number or timedelta.
    """
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required (a number of seconds)")
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be seconds (a number) or a timedelta, not {value!r}")
    else:
        seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
    if seconds == 0:
        if allow_none:
            return None
        raise ValueError(f"{name} must be > 0, not {value!r}")
    return seconds


def required_seconds(name: str, value: Duration) -> float:
    """:func:`duration_seconds` for a duration that must be there (``None`` and
    ``0`` refused)."""
    seconds = duration_seconds(name, value, allow_none=False)
    assert seconds is not None
    return seconds


def _count(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """Everything that shapes a :class:`herd.Pool`'s behaviour.

    :param min_workers: workers kept running and healthy, even with no session.
    :param max_workers: the most workers alive at once (pinned, idle and starting).
    :param min_idle: idle workers kept ready on top of the pinned ones (pre-warmed
        spares, so a new session never waits for a start), within ``max_workers``.
    :param ttl: seconds a session may go without an open use before it is ended;
        ``0``/``None`` disables eviction.
    :param health_interval: seconds between health checks of every worker;
        ``0``/``None`` disables them (exits are still noticed at once).
    :param health_failures: consecutive failed health probes, spread over at least
        ``(health_failures - 1) * health_interval`` seconds, after which a worker
        whose process still runs is declared dead. Default 3: one slow answer is a
        busy worker (a blocking handler, a long GC pause), not a dead one, and
        killing it loses its session's state; with the default interval a worker
        must fail to answer for 10 s and more before it is killed. ``1`` kills at
        the first failed probe. A worker whose process exited is dead at once.
    :param worker_reuse: ``False``: a worker whose session ended is killed, never
        handed to another session.
    :param acquire_timeout: default seconds an :meth:`~herd.Pool.acquire` waits for a
        free worker at ``max_workers`` before :class:`~herd.PoolExhaustedError`;
        ``0``/``None``: wait until the caller's own timeout.
    :param idle_worker_timeout: seconds an unpinned worker above ``min_workers`` may
        sit idle before it is retired; ``0``/``None`` keeps surplus workers.
    :param refill_delay: seconds after a spare was last taken before the pool
        starts its replacement, so the spawn does not compete with the sessions
        that just started for CPU; ``0``/``None``: at once.
    :param spawn_backoff: first delay after a failed spawn; doubles per failure.
    :param spawn_backoff_max: the longest delay between spawn attempts.
    """

    min_workers: int = 1
    max_workers: int = 10
    min_idle: int = 0
    ttl: float | None = 300.0
    health_interval: float | None = 5.0
    health_failures: int = 3
    worker_reuse: bool = True
    acquire_timeout: float | None = 30.0
    idle_worker_timeout: float | None = 60.0
    refill_delay: float | None = None
    spawn_backoff: float = 0.5
    spawn_backoff_max: float = 30.0

    def __post_init__(self) -> None:
        _count("min_workers", self.min_workers, minimum=0)
        _count("max_workers", self.max_workers, minimum=1)
        if self.max_workers < self.min_workers:
            raise ValueError(
                f"max_workers ({self.max_workers}) must be >= min_workers ({self.min_workers})"
            )
        _count("min_idle", self.min_idle, minimum=0)
        _count("health_failures", self.health_failures, minimum=1)
        if self.min_idle > self.max_workers:
            raise ValueError(
                f"min_idle ({self.min_idle}) must be <= max_workers ({self.max_workers})"
            )
        if not isinstance(self.worker_reuse, bool):
            raise TypeError(f"worker_reuse must be a bool, not {self.worker_reuse!r}")
        for name in (
            "ttl",
            "health_interval",
            "acquire_timeout",
            "idle_worker_timeout",
            "refill_delay",
        ):
            object.__setattr__(self, name, duration_seconds(name, getattr(self, name)))
        for name in ("spawn_backoff", "spawn_backoff_max"):
            object.__setattr__(
                self, name, duration_seconds(name, getattr(self, name), allow_none=False)
            )
        if self.spawn_backoff_max < self.spawn_backoff:
            raise ValueError("spawn_backoff_max must be >= spawn_backoff")
