"""freeze: SIGSTOP one process for ``duration_s`` seconds, then SIGCONT it.

Only a time span makes sense: a frozen process stops training, so a span counted in steps would
never end. Whether the freeze costs a restart depends on ``duration_s`` against the run's
heartbeat timeout, so this kind predicts none.
"""

from __future__ import annotations

import signal
from typing import Any

from pipetrain_harness.faults._signals import check_target, resolve, send
from pipetrain_harness.faults.base import Context, Fault, FaultError


class Freeze(Fault):
    kind = "freeze"
    params = {"target": str}
    required = ("duration_s",)

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        if "for_steps" in table:
            raise FaultError(f"{where}: for_steps cannot end a freeze (a frozen process makes "
                             f"no progress); use duration_s")
        self.target = check_target(self, table.get("target", "random_worker"))
        self.pid: int | None = None

    def invoke(self, ctx: Context) -> None:
        pid = resolve(ctx, self, self.target)
        if pid is not None and send(ctx, self, pid, signal.SIGSTOP):
            self.pid = pid  # heal thaws this process, not a fresh random choice

    def heal(self, ctx: Context) -> None:
        if self.pid is not None:
            send(ctx, self, self.pid, signal.SIGCONT)
            self.pid = None


FAULT = Freeze
