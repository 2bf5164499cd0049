"""planted_bug: switch on a deliberate bug in one stage at ``at_step`` (default 3), to prove the
harness catches a broken system: ``wrong_gradient`` (one parameter element nudged by a
millionth after an update: the equivalence check must fail), ``leak_fd`` or ``leak_child`` (the
leak check must fail), and ``stale_restart`` (stage 0 forgets its optimizer state whenever the
group restarts: only a run with a restart shows it; what ``fuzz --plant`` switches on).

The bug lives in the harness's hooks (:mod:`pipetrain_harness.hooks`) and fires once, the first
time stage ``stage`` of replica ``replica`` (default 0) reaches its step (``stale_restart``: in
every restarted group, from launch); the run itself goes on without a restart, which is the
point: only the checks can see it.
"""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults._settings import refuse, setting
from pipetrain_harness.faults.base import (
    IN_STAGE_KEYS,
    Context,
    Fault,
    FaultError,
    Landing,
    Launch,
)
from pipetrain_harness.points import LAUNCH, STAGE, Place, Point, in_stage_point

# bug -> the stage fault of the plan that plants it (None: a planted bug of the plan's own)
BUGS = {"wrong_gradient": "perturb", "leak_fd": "leak_fd", "leak_child": "leak_child",
        "stale_restart": None}


class PlantedBug(Fault):
    kind = "planted_bug"
    params = {"bug": str, "stage": int, "replica": int}
    point_keys = IN_STAGE_KEYS
    required = ("bug",)

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        if table.get("bug") not in BUGS and "bug" in table:
            raise FaultError(f"{where}: bug = {table['bug']!r} is not one of {', '.join(BUGS)}")
        super().__init__(table, where=where)
        refuse(self, ("duration_s", "for_steps"), "the bug fires once, at at_step, inside the "
               "system")
        self.stage = setting(self, "stage", 1, minimum=0)
        self.replica = setting(self, "replica", 0, minimum=0)
        self.hook = {"stage": self.stage, "replica": self.replica, "step": self.point.step,
                     "kind": BUGS[table["bug"]]}

    def build_point(self, table: dict[str, Any], where: str) -> Point:
        if BUGS.get(table.get("bug")) is None:
            refuse(self, ("at_step", "generation"), "stale_restart acts in every restarted group")
            return LAUNCH
        return in_stage_point(table, where, default_step=3)

    def place(self, stages: int, replicas: int, rng: Any) -> Place | None:
        return None if self.point is LAUNCH else Place(STAGE, self.stage, self.replica)

    def prepare(self, launch: Launch, fault_id: int, place: Place | None) -> None:
        if self.hook["kind"] is None:
            launch.plan.planted.append(self.table["bug"])
        else:
            launch.plan.stage_faults.append({**self.hook, "id": fault_id})

    def invoke(self, ctx: Context, landing: Landing) -> None:
        """Acts inside the system; the landing is recorded by the runner."""

    def expected_restarts(self, heartbeat_timeout_s: float | None = None) -> int | None:
        return 0


FAULT = PlantedBug
