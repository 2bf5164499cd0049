"""kill: send one signal to one process of the run (by default SIGKILL to a random worker)."""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults._signals import (
    check_target,
    parse_signal,
    resolve,
    send,
    worker_restarts,
)
from pipetrain_harness.faults.base import Context, Fault


class Kill(Fault):
    kind = "kill"
    params = {"target": str, "signal": str}

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        self.target = check_target(self, table.get("target", "random_worker"))
        self.signal = parse_signal(self, "signal", table.get("signal", "SIGKILL"))

    def invoke(self, ctx: Context) -> None:
        pid = resolve(ctx, self, self.target)
        if pid is not None:
            send(ctx, self, pid, self.signal)

    def expected_restarts(self) -> int | None:
        # The coordinator's signals are its control surface (pause, checkpoint, stop), and its
        # death ends the run: no restart count to predict.
        return None if self.target == "coordinator" else worker_restarts(self.signal)


FAULT = Kill
