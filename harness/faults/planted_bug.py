"""planted_bug: switch on a deliberate bug in one stage at ``at_step`` (default 3), to prove the
harness catches a broken system: ``wrong_gradient`` (one gradient element one ulp off: the
equivalence check must fail), ``leak_fd`` or ``leak_child`` (the leak check must fail).

The bug lives in :mod:`pipetrain_harness.testhooks` and fires in the first worker generation only; the run
itself goes on without a restart, which is the point: only the checks can see it.
"""

from __future__ import annotations

import json
from typing import Any

from pipetrain_harness.faults._settings import refuse, setting
from pipetrain_harness.faults.base import Context, Fault, FaultError, Launch
from pipetrain_harness.testhooks import ENV

BUGS = {"wrong_gradient": "perturb", "leak_fd": "leak_fd", "leak_child": "leak_child"}


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
        if launch.env.get(ENV):  # the hook holds one fault; a second would silently replace it
            raise FaultError(f"{self.where}: {ENV} is already set ({launch.env[ENV]}); "
                             f"a scenario can plant one bug")
        launch.env[ENV] = json.dumps(self.hook)

    def invoke(self, ctx: Context) -> None:
        ctx.history.record("fault_in_system", fault=self.describe(), env=ENV, hook=self.hook)

    def expected_restarts(self) -> int | None:
        return 0


FAULT = PlantedBug
