"""The one small interface every fault kind implements (after toxiproxy's toxics).

A fault is built from its ``[[faults]]`` table. Its *trigger* says when it acts, in terms of
training progress: ``at_step`` (the first step event with that step number or later), or
``after_checkpoint`` (the N-th checkpoint event, 1-based), or neither (at launch). Its *span*
says for how long: ``duration_s`` seconds or ``for_steps`` steps, after which the runner calls
``heal``; without a span, ``heal`` runs when the run ends. ``heal`` always runs, exactly once,
even when the run failed: a frozen process is thawed, a storm stops.

Capabilities are separate, optional methods: ``prepare`` (change the launch before the run
starts: the plan the harness's hooks read inside the run, resource limits) for faults that act
inside the system, like the link faults and the slow loader, and ``expected_restarts`` for the
checks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipetrain_harness.plan import Plan


class FaultError(ValueError):
    """A fault table that cannot be used; the message names the key."""


@dataclass
class Launch:
    """How the run under test will be started; ``prepare`` may change it."""

    args: list[str]
    env: dict[str, str]
    # Resource limits for the run's process tree: {resource.RLIMIT_*: (soft, hard)}.
    rlimits: dict[int, tuple[int, int]] = field(default_factory=dict)
    # What the harness's hooks do inside the run's processes (pipetrain_harness.plan).
    plan: Plan = field(default_factory=Plan)


class Target:
    """Resolves a target name to a live pid, from the run's ``run.json``.

    Names: ``coordinator``; ``stage:N`` (replica 0) or ``stage:N:replica:R``; ``random_worker``
    (a seeded choice among the workers alive now).
    """

    def __init__(self, run_dir: Path, rng: random.Random) -> None:
        self.run_dir = run_dir
        self.rng = rng

    def state(self) -> dict[str, Any]:
        import json

        return json.loads((self.run_dir / "run.json").read_text())

    def pid(self, name: str) -> int:
        state = self.state()
        if name == "coordinator":
            return int(state["coordinator_pid"])
        workers = [int(p) for p in state.get("worker_pids", [])]
        if not workers:
            raise LookupError("the run has no workers yet")
        if name == "random_worker":
            return self.rng.choice(workers)
        parts = name.split(":")
        if parts[0] == "stage" and len(parts) in (2, 4):
            stages = int(state["config"]["stages"])
            stage = int(parts[1])
            replica = int(parts[3]) if len(parts) == 4 else 0
            if not 0 <= stage < stages:
                raise LookupError(f"no stage {stage} (the run has {stages})")
            return workers[replica * stages + stage]
        raise LookupError(f"unknown target {name!r}")


@dataclass
class Context:
    """What a fault may act on while the run goes."""

    run_dir: Path
    target: Target
    history: Any  # pipetrain_harness.history.History
    rng: random.Random
    progress: Any = None  # callable -> last step seen, set by the runner


class Fault:
    kind: ClassVar[str] = ""
    # Keys this kind accepts beyond the common ones; each maps to its type.
    params: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    required: ClassVar[tuple[str, ...]] = ()
    COMMON: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "kind": str, "at_step": int, "after_checkpoint": int, "duration_s": (int, float),
        "for_steps": int,
    }

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        allowed = {**self.COMMON, **self.params}
        for key, value in table.items():
            if key not in allowed:
                raise FaultError(f"{where}: unknown key {key!r} for kind {self.kind!r} "
                                 f"(allowed: {', '.join(sorted(allowed))})")
            if isinstance(value, bool) or not isinstance(value, allowed[key]):
                raise FaultError(f"{where}: {key} = {value!r} has the wrong type")
        for key in self.required:
            if key not in table:
                raise FaultError(f"{where}: kind {self.kind!r} needs {key!r}")
        for key in ("at_step", "after_checkpoint", "for_steps"):
            if key in table and table[key] < (0 if key == "for_steps" else 1):
                raise FaultError(f"{where}: {key} must be positive, got {table[key]}")
        if "duration_s" in table and not 0 < table["duration_s"] <= 600:
            raise FaultError(f"{where}: duration_s must be in (0, 600], got {table['duration_s']}")
        self.table = dict(table)
        self.where = where
        self.at_step: int | None = table.get("at_step")
        self.after_checkpoint: int | None = table.get("after_checkpoint")
        self.duration_s: float | None = table.get("duration_s")
        self.for_steps: int | None = table.get("for_steps")

    def describe(self) -> str:
        details = ", ".join(f"{k}={v}" for k, v in self.table.items() if k != "kind")
        return f"{self.kind}({details})"

    # -- the interface -------------------------------------------------------------------------

    def prepare(self, launch: Launch) -> None:
        """Optional: change how the run is launched (before it starts)."""

    def invoke(self, ctx: Context) -> None:
        """Required: act on the running system."""
        raise NotImplementedError

    def heal(self, ctx: Context) -> None:
        """Optional: undo what invoke did (always called once after invoke)."""

    def expected_restarts(self) -> int | None:
        """Optional: how many worker-group restarts this fault should cause (None: unknown)."""
        return None
