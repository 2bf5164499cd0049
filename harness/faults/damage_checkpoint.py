"""damage_checkpoint: flip one byte of the newest checkpoint's segment file (or cut it short).

The system must refuse the damaged checkpoint by its digest and fall back to an older intact one
when it next restarts or resumes. There is nothing to heal: damage on disk stays damage.
"""

from __future__ import annotations

from pipetrain_harness.faults.base import Context, Fault

MODES = ("flip", "truncate")


class DamageCheckpoint(Fault):
    kind = "damage_checkpoint"
    params = {"mode": str}

    def __init__(self, table, *, where="fault"):
        super().__init__(table, where=where)
        self.mode = table.get("mode", "flip")
        if self.mode not in MODES:
            from pipetrain_harness.faults.base import FaultError

            raise FaultError(f"{where}: mode {self.mode!r} is not one of {', '.join(MODES)}")

    def invoke(self, ctx: Context) -> None:
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
        ctx.history.record("checkpoint_damaged", path=str(victim), mode=self.mode,
                           offset=position)

    def expected_restarts(self) -> int | None:
        return 0


FAULT = DamageCheckpoint
