"""kill: send one signal to one process of the run at its point (by default SIGKILL to a random
worker, before step 1)."""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults._signals import (
    check_handled_where,
    parse_signal,
    send,
    worker_restarts,
)
from pipetrain_harness.faults.base import STEP_KEYS, Context, Fault, Landing
from pipetrain_harness.points import Point, step_point


class Kill(Fault):
    kind = "kill"
    params = {"target": str, "signal": str}
    point_keys = STEP_KEYS
    default_target = "random_worker"

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        self.signal = parse_signal(self, "signal", table.get("signal", "SIGKILL"))
        check_handled_where(self, [self.signal])

    def build_point(self, table: dict[str, Any], where: str) -> Point:
        return step_point(table, where, coordinator=self.target == "coordinator")

    def invoke(self, ctx: Context, landing: Landing) -> None:
        send(ctx, self, landing.pid, self.signal)

    def expected_restarts(self, heartbeat_timeout_s: float | None = None) -> int | None:
        # The coordinator's signals are its control surface (pause, checkpoint, stop), and its
        # death ends the run: no restart count to predict.
        return None if self.target == "coordinator" else worker_restarts(self.signal)


FAULT = Kill
