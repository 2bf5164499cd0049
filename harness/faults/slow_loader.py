"""slow_loader: every stage's loader threads sleep a random 0..``delay_s`` seconds before each
item, for the whole run, so the result can be shown not to depend on the loaders' timing."""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults._settings import refuse, setting
from pipetrain_harness.faults.base import Context, Fault, Launch


class SlowLoader(Fault):
    kind = "slow_loader"
    params = {"delay_s": (int, float)}
    required = ("delay_s",)

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        refuse(self, ("at_step", "after_checkpoint", "duration_s", "for_steps"),
               "the loaders are slowed for the whole run")
        self.delay_s = setting(self, "delay_s", None, minimum=0, exclusive=True)

    def prepare(self, launch: Launch) -> None:
        launch.plan.loader_delay_s = max(launch.plan.loader_delay_s, float(self.delay_s))

    def invoke(self, ctx: Context) -> None:
        ctx.history.record("fault_in_system", fault=self.describe(),
                           loader_delay_s=self.delay_s)

    def expected_restarts(self) -> int | None:
        return 0


FAULT = SlowLoader
