"""What both hypothesis machines over a Pool model: pins, their open uses, and
the plumbing of driving an async pool from synchronous rules.

``tests/test_state_machine.py`` drives real process workers;
``tests/test_pool_machine.py`` drives FakeFactory with faults. Each subclasses
:class:`ModelMachine`, owns its event loop (one per example) and closes it in
its ``teardown``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis.stateful import RuleBasedStateMachine, invariant

import herd

T = TypeVar("T")


@dataclass(eq=False)
class Pin:
    """The model of one pinning of a session ID to a worker."""

    sid: str
    worker_id: str
    last_active: float  # fake clock: when made, or when its last use closed
    ended: bool = False  # released, evicted or its worker died
    crashed: bool = False  # its worker died


@dataclass(eq=False)
class Use:
    """An open use (a ``Session`` object) of one pin."""

    session: herd.Session[Any]
    pin: Pin


class ModelMachine(RuleBasedStateMachine):
    """A state machine over one Pool, with the model's pins and open uses."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.pool: herd.Pool[Any] | None = None
        self.pins: dict[str, Pin] = {}  # live pins, by session ID
        self.uses: list[Use] = []  # open uses

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` on the machine's loop, from a synchronous rule."""

        async def wrapper() -> T:
            return await awaitable

        return self.loop.run_until_complete(wrapper())

    @property
    def p(self) -> herd.Pool[Any]:
        assert self.pool is not None
        return self.pool

    def open_uses(self, pin: Pin) -> int:
        return sum(1 for use in self.uses if use.pin is pin)

    def lingering(self) -> list[Pin]:
        """Ended pins whose live worker an open use still holds (stats: "ending")."""
        pins = {id(use.pin): use.pin for use in self.uses}
        return [p for p in pins.values() if p.ended and not p.crashed]

    def held(self) -> set[str]:
        """Workers no new session may get: pinned, or ending with a use open."""
        return {p.worker_id for p in self.pins.values()} | {p.worker_id for p in self.lingering()}

    @invariant()
    def open_uses_match_their_pins(self) -> None:
        for use in self.uses:
            assert not use.session.closed
            assert use.session.worker.id == use.pin.worker_id
            assert use.session.ended == use.pin.ended
            if use.pin.crashed:
                with pytest.raises(herd.WorkerDeadError):
                    use.session.check()
            else:
                use.session.check()
