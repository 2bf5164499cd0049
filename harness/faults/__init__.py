"""Fault kinds, one module each, in an explicit registry (no registration by import side effect).

Add a kind: write ``harness/faults/<kind>.py`` with a :class:`~pipetrain_harness.faults.base.Fault`
subclass and list it here.
"""

from __future__ import annotations

from typing import Any

from pipetrain_harness.faults.base import Context, Fault, FaultError, Landing, Launch, RunShape

FAULTS: dict[str, type[Fault]] = {}


def _register() -> None:
    from pipetrain_harness.faults import (  # noqa: PLC0415 - one place lists every kind
        checkpoint_crash,
        corrupt,
        damage_checkpoint,
        delay,
        fd_pressure,
        freeze,
        kill,
        planted_bug,
        sever,
        signal_storm,
        slow_loader,
        throttle,
    )

    for module in (kill, freeze, delay, throttle, corrupt, sever, signal_storm, slow_loader,
                   checkpoint_crash, damage_checkpoint, fd_pressure, planted_bug):
        FAULTS[module.FAULT.kind] = module.FAULT


def build_fault(table: dict[str, Any], *, where: str = "fault") -> Fault:
    if not FAULTS:
        _register()
    kind = table.get("kind")
    if kind not in FAULTS:
        raise FaultError(f"{where}: unknown fault kind {kind!r} "
                         f"(known: {', '.join(sorted(FAULTS))})")
    return FAULTS[kind](table, where=where)


__all__ = ["FAULTS", "Context", "Fault", "FaultError", "Landing", "Launch", "RunShape",
           "build_fault"]
