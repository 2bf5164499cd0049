"""planted_bug: switch on a deliberate bug in one stage at ``at_step`` (default 3), to prove the
harness catches a broken system: ``wrong_gradient`` (one parameter element nudged by a
millionth after an update: the equivalence check must fail), ``leak_fd`` or ``leak_child`` (the
leak check must fail), and ``stale_restart`` (stage 0 forgets its optimizer state whenever the
group restarts: only a run with a restart shows it; what ``fuzz --plant`` switches on).

The bug lives in the harness's hooks (:mod:`pipetrain_harness.hooks`) and fires in the first
worker generation only (``stale_restart``: in every later one); the run itself goes on without a
restart, which is the point: only the checks can see it.
"""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults._settings import refuse, setting
from pipetrain_harness.faults.base import Context, Fault, FaultError, Launch

# bug -> the stage fault of the plan that plants it (None: a planted bug of the plan's own)
BUGS = {"wrong_gradient": "perturb", "leak_fd": "leak_fd", "leak_child": "leak_child",
        "stale_restart": None}


class PlantedBug(Fault):
    kind = "planted_bug"
    params = {"bug": str, "stage": int}
    required = ("bug",)

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        refuse(self, ("after_checkpoint", "duration_s", "for_steps"),
               "the bug fires once, at at_step, inside the system")
        if table["bug"] not in BUGS:
            raise FaultError(f"{where}: bug = {table['bug']!r} is not one of "
                             f"{', '.join(BUGS)}")
        self.at_step = table.get("at_step", 3)
        self.hook = {"stage": setting(self, "stage", 1, minimum=0), "step": self.at_step,
                     "kind": BUGS[table["bug"]]}

    def prepare(self, launch: Launch) -> None:
        if self.hook["kind"] is None:
            launch.plan.planted.append(self.table["bug"])
        else:
            launch.plan.stage_faults.append(dict(self.hook))

    def invoke(self, ctx: Context) -> None:
        ctx.history.record("fault_in_system", fault=self.describe(), hook=self.hook)

    def expected_restarts(self) -> int | None:
        return 0


FAULT = PlantedBug
