"""fd_pressure: the run's whole process tree may hold at most ``max_open_files`` descriptors
(RLIMIT_NOFILE, soft and hard). Whether that is enough depends on the run's shape, so the
outcome (a clean finish or a clear error) is left to the scenario's expectations."""

from __future__ import annotations

import resource
from typing import Any

from pipetrain_harness.faults._settings import refuse, setting
from pipetrain_harness.faults.base import Context, Fault, FaultError, Landing, Launch
from pipetrain_harness.points import Place

MIN_OPEN_FILES = 16  # below this not even the interpreter starts reliably


class FdPressure(Fault):
    kind = "fd_pressure"
    params = {"max_open_files": int}
    required = ("max_open_files",)

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        refuse(self, ("duration_s", "for_steps"),
               "the limit holds for the whole run")
        self.max_open_files = setting(self, "max_open_files", None, minimum=MIN_OPEN_FILES)

    def prepare(self, launch: Launch, fault_id: int, place: Place | None) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and self.max_open_files > hard:
            raise FaultError(f"{self.where}: max_open_files = {self.max_open_files} is above "
                             f"this machine's hard limit {hard}, which only root may raise")
        limit = (self.max_open_files, self.max_open_files)
        launch.rlimits[resource.RLIMIT_NOFILE] = limit

    def invoke(self, ctx: Context, landing: Landing) -> None:
        """In force from launch; the landing is recorded by the runner."""


FAULT = FdPressure
