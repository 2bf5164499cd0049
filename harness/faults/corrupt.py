"""corrupt: flip ``flips`` random bits in the payload bytes that really cross one link.

The receiver's CRC must refuse the frame; the worker group then restarts from the newest
checkpoint, so one restart is expected (the fault acts on its one frame, once).
"""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults._link import LINK_PARAMS, LinkFault
from pipetrain_harness.faults._settings import setting


class Corrupt(LinkFault):
    kind = "corrupt"
    params = {**LINK_PARAMS, "flips": int}
    default_for_steps = 1
    restarts = 1

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        self.plan["flips"] = setting(self, "flips", 1, minimum=1)


FAULT = Corrupt
