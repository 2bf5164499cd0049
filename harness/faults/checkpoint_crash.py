"""checkpoint_crash: kill a process *while a checkpoint is being written*, to prove the
write-to-a-temporary-name-then-rename contract (the previous checkpoint survives intact).

It lands at a phase of the checkpoint after the ``after_checkpoint``-th (default 0: the first
one): ``segment_written`` on a stage (its file is written and fsynced, the others may not be),
or on the coordinator ``segments_written``, ``manifest_written`` (the default: the manifest is in
the temporary directory, which is not yet renamed) or ``committed``. The target is parked at
that phase when the signal arrives, so the crash replays exactly.
"""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults._signals import parse_signal, send, worker_restarts
from pipetrain_harness.faults.base import CHECKPOINT_KEYS, Context, Fault, Landing
from pipetrain_harness.points import Point, checkpoint_point


class CheckpointCrash(Fault):
    kind = "checkpoint_crash"
    params = {"target": str, "signal": str}
    point_keys = CHECKPOINT_KEYS
    default_target = "coordinator"

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        self.signal = parse_signal(self, "signal", table.get("signal", "SIGKILL"))

    def build_point(self, table: dict[str, Any], where: str) -> Point:
        coordinator = self.target == "coordinator"
        return checkpoint_point(table, where, coordinator=coordinator, default_after=0,
                                default_phase="manifest_written" if coordinator
                                else "segment_written")

    def invoke(self, ctx: Context, landing: Landing) -> None:
        if send(ctx, self, landing.pid, self.signal):
            ctx.history.record("killed_mid_checkpoint", fault=self.describe(), pid=landing.pid,
                               signal=self.signal.name, phase=landing.point)

    def expected_restarts(self, heartbeat_timeout_s: float | None = None) -> int | None:
        if self.target == "coordinator":
            return 0  # its death ends the run; --resume continues (resume_after_stop)
        return worker_restarts(self.signal)


FAULT = CheckpointCrash
