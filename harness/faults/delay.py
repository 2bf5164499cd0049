"""delay: every frame sent over one link waits ``latency_ms`` (± ``jitter_ms``) first."""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults._link import LINK_PARAMS, LinkFault
from pipetrain_harness.faults._settings import setting


class Delay(LinkFault):
    kind = "delay"
    params = {**LINK_PARAMS, "latency_ms": (int, float), "jitter_ms": (int, float)}

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        self.plan["latency_ms"] = setting(self, "latency_ms", 20, minimum=0)
        self.plan["jitter_ms"] = setting(self, "jitter_ms", 0, minimum=0)


FAULT = Delay
