"""throttle: frames sent over one link take as long as ``bandwidth_bytes_per_s`` allows."""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults._link import LINK_PARAMS, LinkFault
from pipetrain_harness.faults._settings import setting


class Throttle(LinkFault):
    kind = "throttle"
    params = {**LINK_PARAMS, "bandwidth_bytes_per_s": (int, float)}
    required = ("link", "bandwidth_bytes_per_s")

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        self.plan["bandwidth_bytes_per_s"] = setting(self, "bandwidth_bytes_per_s", None,
                                                     minimum=0, exclusive=True)


FAULT = Throttle
