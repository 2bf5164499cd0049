"""What the four link kinds (delay, throttle, corrupt, sever) share: each adds one entry to the
run's plan before launch, and the channel wrapper in the sending stage
(:mod:`pipetrain_harness.linkshim`) acts on the real pipe at the planned steps.

Because the shim counts steps, a link fault is placed with ``at_step`` (default 1) and lasts
``for_steps`` (0: to the end); ``duration_s`` and ``after_checkpoint`` cannot be honoured
inside the system and are refused rather than silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pipetrain_harness.faults._settings import refuse, setting
from pipetrain_harness.faults.base import Context, Fault, FaultError, Launch

LINK_PARAMS: dict[str, type | tuple[type, ...]] = {"link": str, "replica": int}
LINK_PATTERN = re.compile(r"(\d+)->(\d+)")


class LinkFault(Fault):
    required = ("link",)
    default_for_steps: ClassVar[int] = 0
    restarts: ClassVar[int] = 0

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        refuse(self, ("duration_s", "after_checkpoint"),
               "the link shim counts steps; use at_step and for_steps")
        match = LINK_PATTERN.fullmatch(table["link"])
        if not match or abs(int(match[1]) - int(match[2])) != 1:
            raise FaultError(f"{where}: link = {table['link']!r} is not a link between "
                             f"neighbouring stages, such as '0->1' or '1->0'")
        self.at_step = table.get("at_step", 1)
        self.for_steps = table.get("for_steps", self.default_for_steps)
        self.plan: dict[str, Any] = {
            "kind": self.kind, "link": table["link"],
            "replica": setting(self, "replica", 0, minimum=0),
            "at_step": self.at_step, "for_steps": self.for_steps,
        }

    def prepare(self, launch: Launch) -> None:
        launch.plan.link_faults.append(dict(self.plan))

    def invoke(self, ctx: Context) -> None:
        # The shim acts by itself at the planned step; note the plan beside the run's events.
        ctx.history.record("fault_in_system", fault=self.describe(), plan=self.plan)

    def expected_restarts(self) -> int | None:
        return self.restarts
