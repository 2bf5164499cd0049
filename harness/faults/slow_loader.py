"""slow_loader: every stage's loader threads sleep a random 0..``delay_s`` seconds before each
item, for the whole run, so the result can be shown not to depend on the loaders' timing."""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults._settings import refuse, setting
from pipetrain_harness.faults.base import Context, Fault, Landing, Launch
from pipetrain_harness.points import Place


class SlowLoader(Fault):
    kind = "slow_loader"
    params = {"delay_s": (int, float)}
    required = ("delay_s",)

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        refuse(self, ("duration_s", "for_steps"),
               "the loaders are slowed for the whole run")
        self.delay_s = setting(self, "delay_s", None, minimum=0, exclusive=True)

    def prepare(self, launch: Launch, fault_id: int, place: Place | None) -> None:
        launch.plan.loader_delay_s = max(launch.plan.loader_delay_s, float(self.delay_s))

    def invoke(self, ctx: Context, landing: Landing) -> None:
        """In force from launch; the landing is recorded by the runner."""

    def expected_restarts(self, heartbeat_timeout_s: float | None = None) -> int | None:
        return 0


FAULT = SlowLoader
