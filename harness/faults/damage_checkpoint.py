"""damage_checkpoint: flip one byte of the newest checkpoint's segment file (or cut it short),
the moment the ``after_checkpoint``-th checkpoint (default 1) has been committed.

The coordinator waits at that commit while the harness damages the files, so the damage always
hits the same checkpoint. The system must refuse it by its digest and fall back to an older
intact one when it next restarts or resumes. There is nothing to heal: damage on disk stays.
"""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults.base import CHECKPOINT_KEYS, Context, Fault, FaultError, Landing
from pipetrain_harness.points import Point, checkpoint_point

MODES = ("flip", "truncate")


class DamageCheckpoint(Fault):
    kind = "damage_checkpoint"
    params = {"mode": str}
    point_keys = {key: kind for key, kind in CHECKPOINT_KEYS.items() if key != "phase"}
    default_target = "coordinator"

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        self.mode = table.get("mode", "flip")
        if self.mode not in MODES:
            raise FaultError(f"{where}: mode {self.mode!r} is not one of {', '.join(MODES)}")

    def build_point(self, table: dict[str, Any], where: str) -> Point:
        return checkpoint_point(table, where, coordinator=True, default_phase=None,
                                default_after=1)

    def invoke(self, ctx: Context, landing: Landing) -> None:
        checkpoints = sorted((ctx.run_dir / "checkpoints").glob("step-*"))
        if not checkpoints:
            ctx.history.record("no_checkpoint_to_damage")
            return
        victim = sorted(checkpoints[-1].glob("segment-*.npz"))[0]
        data = bytearray(victim.read_bytes())
        if self.mode == "flip":
            position = ctx.rng.randrange(len(data))
            data[position] ^= 0xFF
        else:
            position = len(data) // 2
            del data[position:]
        victim.write_bytes(bytes(data))
        ctx.history.record("checkpoint_damaged", path=str(victim.relative_to(ctx.run_dir)),
                           mode=self.mode, offset=position)

    def expected_restarts(self, heartbeat_timeout_s: float | None = None) -> int | None:
        return 0


FAULT = DamageCheckpoint
