"""What the four link kinds (delay, throttle, corrupt, sever) share: each adds one entry to the
run's plan before launch, and the channel wrapper in the sending stage
(:mod:`pipetrain_harness.linkshim`) acts on the real pipe at the planned frame.

A link fault lands at a frame: the first frame of step ``at_step`` (default 1) on the link, or
the frame of micro-batch ``at_microbatch``; the link's direction says its kind (activations
downstream, gradients upstream). Delay and throttle then last ``for_steps`` (0: to the end);
corrupt and sever act on that frame only. ``duration_s`` cannot be honoured inside the system and
is refused rather than silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pipetrain_harness.faults._settings import refuse, setting
from pipetrain_harness.faults.base import (
    FRAME_KEYS,
    Context,
    Fault,
    FaultError,
    Landing,
    Launch,
    RunShape,
)
from pipetrain_harness.points import STAGE, Place, Point, frame_point

LINK_PARAMS: dict[str, type | tuple[type, ...]] = {"link": str, "replica": int}
LINK_PATTERN = re.compile(r"(\d+)->(\d+)")


class LinkFault(Fault):
    required = ("link",)
    point_keys = FRAME_KEYS
    default_for_steps: ClassVar[int] = 0
    restarts: ClassVar[int] = 0
    takes_when: ClassVar[bool] = False

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        refuse(self, ("duration_s",), "the link shim counts steps; use at_step and for_steps")
        match = LINK_PATTERN.fullmatch(table["link"])
        if not match or abs(int(match[1]) - int(match[2])) != 1:
            raise FaultError(f"{where}: link = {table['link']!r} is not a link between "
                             f"neighbouring stages, such as '0->1' or '1->0'")
        self.sender, self.receiver = int(match[1]), int(match[2])
        self.for_steps = table.get("for_steps", self.default_for_steps)
        self.plan: dict[str, Any] = {
            "kind": self.kind, "link": table["link"],
            "replica": setting(self, "replica", 0, minimum=0),
            "at_step": self.point.step, "for_steps": self.for_steps,
        }
        if self.point.microbatch is not None:
            self.plan["microbatch"] = self.point.microbatch
        if "when" in table:
            self.plan["when"] = self.point.when
        if self.point.generation is not None:
            self.plan["generation"] = self.point.generation

    def build_point(self, table: dict[str, Any], where: str) -> Point:
        return frame_point(table, where, when=self.takes_when)

    def place(self, stages: int, replicas: int, rng: Any) -> Place | None:
        return Place(STAGE, self.sender, self.plan["replica"])

    def check_run(self, place: Place | None, run: RunShape) -> None:
        if max(self.sender, self.receiver) >= run.stages or self.plan["replica"] >= run.replicas:
            raise FaultError(f"{self.where}: link {self.table['link']} replica "
                             f"{self.plan['replica']}: the run has {run.stages} stage(s) and "
                             f"{run.replicas} replica(s)")
        microbatch = self.point.microbatch
        if microbatch is not None and not microbatch < run.microbatches:
            raise FaultError(f"{self.where}: at_microbatch = {microbatch}: the run has "
                             f"{run.microbatches} micro-batch(es)")

    def prepare(self, launch: Launch, fault_id: int, place: Place | None) -> None:
        launch.plan.link_faults.append({**self.plan, "id": fault_id})

    def invoke(self, ctx: Context, landing: Landing) -> None:
        """The shim acted by itself at its frame; the landing is recorded by the runner."""

    def expected_restarts(self, heartbeat_timeout_s: float | None = None) -> int | None:
        return self.restarts
