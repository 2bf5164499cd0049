"""The one small interface every fault kind implements (after toxiproxy's toxics).

A fault is built from its ``[[faults]]`` table. Its *point* says where it lands on its target, in
the program's own order (``pipetrain_harness.points``: ``at_step``, ``at_action``,
``at_reduce``, ``at_resume``, ``after_checkpoint`` with ``phase``, a link's frame; or at launch),
and it lands there once, in every replay. Its *span* says for how long it lasts after landing:
``duration_s`` seconds or ``for_steps`` steps, after which the runner calls ``heal``; without a
span, ``heal`` runs when the run ends. ``heal`` always runs, exactly once, for a fault that
landed, even when the run failed: a frozen process is thawed, a paused one continued.

The one required method is ``invoke(ctx, landing)``: act on the process that is parked at the
point (``landing.pid``), from outside, with the real thing (a signal, damage on disk). Faults
that act inside the system (links, loaders, planted bugs) have nothing left to do by then: they
put what they need into the run's plan in the optional ``prepare``. ``expected_restarts`` is the
other optional capability, for the checks and the fuzzer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipetrain.pipeline.partition import describe_layers
from pipetrain_harness.plan import Plan
from pipetrain_harness.points import (
    LAUNCH,
    Place,
    Point,
    PointError,
    parse_target,
    resolve_target,
)

STEP_KEYS = {"at_step": int, "at_action": str, "at_reduce": int, "during_step": bool,
             "at_resume": bool, "generation": int}
CHECKPOINT_KEYS = {"after_checkpoint": int, "phase": str, "generation": int}
FRAME_KEYS = {"at_step": int, "at_microbatch": int, "when": str, "generation": int}
IN_STAGE_KEYS = {"at_step": int, "generation": int}


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


@dataclass(frozen=True)
class Landing:
    """A fault's point reached: which process is parked there, and where exactly."""

    fault_id: int
    pid: int
    place: str  # "coordinator" or "stage:S:replica:R"
    hook: str
    point: str  # before_step, an action such as 1B2, a checkpoint phase, ...
    step: int | None = None
    generation: int = 0


@dataclass(frozen=True)
class RunShape:
    """What a fault's point is checked against: the run's grid, and per stage its schedule
    actions and its layers ``[first, stop)``."""

    stages: int
    replicas: int
    microbatches: int
    schedule: list[list[Any]]
    layers: list[tuple[int, int]] | None  # None: balanced by measured time, not known before


@dataclass
class Context:
    """What a fault may act on while the run goes."""

    run_dir: Path
    history: Any  # pipetrain_harness.history.History
    rng: random.Random


class Fault:
    kind: ClassVar[str] = ""
    # Keys this kind accepts beyond the common ones; each maps to its type.
    params: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    # The point keys this kind accepts (STEP_KEYS, CHECKPOINT_KEYS, ...; none: at launch).
    point_keys: ClassVar[dict[str, type]] = {}
    required: ClassVar[tuple[str, ...]] = ()
    # Kinds that land on one process take a ``target`` key, with this default.
    default_target: ClassVar[str | None] = None
    COMMON: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "kind": str, "duration_s": (int, float), "for_steps": int,
    }

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        allowed = {**self.COMMON, **self.point_keys, **self.params}
        for key, value in table.items():
            if key not in allowed:
                raise FaultError(f"{where}: unknown key {key!r} for kind {self.kind!r} "
                                 f"(allowed: {', '.join(sorted(allowed))})")
            if (isinstance(value, bool) and allowed[key] is not bool) or not isinstance(
                    value, allowed[key]):
                raise FaultError(f"{where}: {key} = {value!r} has the wrong type")
        for key in self.required:
            if key not in table:
                raise FaultError(f"{where}: kind {self.kind!r} needs {key!r}")
        for key in ("at_step", "after_checkpoint", "for_steps"):
            if key in table and table[key] < (0 if key != "at_step" else 1):
                raise FaultError(f"{where}: {key} must be positive, got {table[key]}")
        if "duration_s" in table and not 0 < table["duration_s"] <= 600:
            raise FaultError(f"{where}: duration_s must be in (0, 600], got {table['duration_s']}")
        self.table = dict(table)
        self.where = where
        self.duration_s: float | None = table.get("duration_s")
        self.for_steps: int | None = table.get("for_steps")
        try:
            self.target: str | None = None
            if self.default_target is not None:
                self.target = parse_target(table.get("target", self.default_target), where)
            self.point: Point = self.build_point(table, where)
        except PointError as exc:
            raise FaultError(str(exc)) from None

    def describe(self) -> str:
        details = ", ".join(f"{k}={v}" for k, v in self.table.items() if k != "kind")
        return f"{self.kind}({details})"

    def build_point(self, table: dict[str, Any], where: str) -> Point:
        """Where this fault lands (the kinds with point keys override this)."""
        return LAUNCH

    def place(self, stages: int, replicas: int, rng: random.Random) -> Place | None:
        """The process the fault lands on in an S x R run (None: none, it acts at launch)."""
        if self.target is None:
            return None
        return resolve_target(self.target, stages, replicas, rng)

    def check_run(self, place: Place | None, run: RunShape) -> None:
        """Refuse a point the run cannot reach (a stage it does not have, an action its
        schedule lacks, an all-reduce of a layer the stage does not hold)."""
        if place is None or place.stage is None:
            return
        if place.stage >= run.stages or place.replica >= run.replicas:
            raise FaultError(f"{self.where}: target {self.target}: the run has {run.stages} "
                             f"stage(s) and {run.replicas} replica(s)")
        point = self.point
        if point.action is not None:
            names = [str(a)[len(str(a.stage)):] for a in run.schedule[place.stage]]
            if point.action not in names:
                raise FaultError(f"{self.where}: at_action = {point.action!r} is not an action "
                                 f"of stage {place.stage} (it runs {' '.join(names)})")
        if point.layer is not None and run.layers is not None:
            layers = run.layers[place.stage]  # (first, stop) pairs, one per piece
            held = [layer for first, stop in zip(layers[::2], layers[1::2], strict=True)
                    for layer in range(first, stop)]
            if run.replicas < 2 or point.layer not in held:
                raise FaultError(f"{self.where}: at_reduce = {point.layer}: stage {place.stage} "
                                 f"all-reduces layers {describe_layers(layers)}, and only with "
                                 f"replicas >= 2 (the run has {run.replicas})")

    # -- the interface -------------------------------------------------------------------------

    def prepare(self, launch: Launch, fault_id: int, place: Place | None) -> None:
        """Optional: change how the run is launched (before it starts)."""

    def invoke(self, ctx: Context, landing: Landing) -> None:
        """Required: act on the process parked at the point (or record, for faults that act
        inside the system)."""
        raise NotImplementedError

    def heal(self, ctx: Context) -> None:
        """Optional: undo what invoke did (always called once after invoke)."""

    def expected_restarts(self, heartbeat_timeout_s: float | None = None) -> int | None:
        """Optional: how many worker-group restarts this fault causes once it lands (None:
        it depends on more than the fault)."""
        return None
