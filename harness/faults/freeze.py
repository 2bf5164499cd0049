"""freeze: SIGSTOP one process at its point for ``duration_s`` seconds, then SIGCONT it.

Only a time span makes sense: a frozen process stops training, so a span counted in steps would
never end. The target is parked at its point when the SIGSTOP arrives, so it freezes exactly
there and goes on from there once continued. A worker frozen for longer than the run's
heartbeat timeout is declared hung and the group restarts; a frozen coordinator must cost
nothing (its own stall is not the workers' fault).
"""

from __future__ import annotations

import signal
from typing import Any

from pipetrain_harness.faults._signals import send
from pipetrain_harness.faults.base import STEP_KEYS, Context, Fault, FaultError, Landing
from pipetrain_harness.points import Point, step_point

# A freeze this much shorter or longer than the heartbeat timeout has a predictable outcome.
MARGIN = 2.0


class Freeze(Fault):
    kind = "freeze"
    params = {"target": str}
    point_keys = STEP_KEYS
    required = ("duration_s",)
    default_target = "random_worker"

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        if "for_steps" in table:
            raise FaultError(f"{where}: for_steps cannot end a freeze (a frozen process makes "
                             f"no progress); use duration_s")
        self.pid: int | None = None

    def build_point(self, table: dict[str, Any], where: str) -> Point:
        return step_point(table, where, coordinator=self.target == "coordinator")

    def invoke(self, ctx: Context, landing: Landing) -> None:
        if send(ctx, self, landing.pid, signal.SIGSTOP):
            self.pid = landing.pid  # heal thaws this process

    def heal(self, ctx: Context) -> None:
        if self.pid is not None:
            send(ctx, self, self.pid, signal.SIGCONT)
            self.pid = None

    def expected_restarts(self, heartbeat_timeout_s: float | None = None) -> int | None:
        if self.target == "coordinator":
            return 0
        if heartbeat_timeout_s is None:
            return None
        if self.duration_s * MARGIN < heartbeat_timeout_s:
            return 0
        return 1 if self.duration_s > heartbeat_timeout_s * MARGIN else None


FAULT = Freeze
