"""The scenario's faults on the harness's side: where each will land, landing it when its target
reaches the point, healing it when its span is over.

::

    FaultBook(faults, shape)           before launch: each fault's place (seeded), refusal of
      .prepare(launch)                  points the run cannot reach; the plan: parks, quiet
                                        boundaries, in-system faults with their ids
    rendezvous thread ─▶ .handle(req)   a process parked at a point: land the faults planned
                                        there (first time only), record ``fault_landed``
    runner loop ─▶ .heal_due(step)      spans over (duration_s, for_steps): heal
    after the run ─▶ .finish()          heal the rest; ``fault_missed`` for points never reached

Every ``fault_landed`` carries the fault (its index in the scenario), its kind and target, the
``point`` (``before_step``, an action such as ``1B2``, ``boundary``, a checkpoint phase, a frame
such as ``send activation 0``, ``launch``), the ``step`` it lands before (a checkpoint's step at
a checkpoint phase), the worker ``generation`` and ``at_event``: how many of the run's events
were written when it landed. The target is parked, so that number is the same in every replay,
and it places the landing in the canonical history (``pipetrain_harness.canonical``).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipetrain_harness.faults.base import Context, Fault, FaultError, Landing, Launch, RunShape
from pipetrain_harness.points import Place, races

PARK_HOOKS = ("before_step", "before_action", "before_reduce", "state_restored", "at_boundary",
              "step_started", "checkpoint_phase")
COUNT_CHECKPOINTS = -1  # the id of the plan entry that only counts committed checkpoints


@dataclass
class Armed:
    index: int
    fault: Fault
    place: Place | None
    landed_at_s: float | None = None
    landed_step: int | None = None
    healed: bool = False


def count_events(path: Path) -> int:
    """Complete lines in events.jsonl now (a line being written does not count yet)."""
    try:
        return Path(path).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_shape(config: Any) -> RunShape:
    """The shape of a run of ``config`` (a ``TrainConfig``). With ``balance = "time"`` the
    stages' layers are measured at start-up, so they are not known here."""
    from pipetrain.runtime.coordinator import stage_bounds

    layers = None if config.balance == "time" else stage_bounds(config)
    return RunShape(stages=config.stages, replicas=config.replicas,
                    microbatches=config.microbatches,
                    schedule=config.build_schedule(),
                    layers=layers)


def resolve_places(faults: list[Fault], shape: RunShape,
                   rng: random.Random) -> list[Place | None]:
    """Each fault's process in this run (``random_worker`` drawn from ``rng``); refuses a point
    the run cannot reach, and two faults whose landing order timing would decide."""
    places = []
    for fault in faults:
        place = fault.place(shape.stages, shape.replicas, rng)
        fault.check_run(place, shape)
        places.append(place)
    clash = races([(fault.point, place) for fault, place in zip(faults, places, strict=True)])
    if clash is not None:
        first, second = (faults[i] for i in clash)
        raise FaultError(f"{second.where}: lands {second.point.describe()} on "
                         f"{places[clash[1]]}, at the same moment as "
                         f"{first.where.rsplit(': ', 1)[-1]} on "
                         f"{places[clash[0]]}: which comes first would be up to the "
                         f"scheduler; give them different points")
    return places


class FaultBook:
    def __init__(self, faults: list[Fault], shape: RunShape, ctx: Context, *,
                 rng: random.Random, events_path: Path) -> None:
        self.ctx = ctx
        self.events_path = events_path
        places = resolve_places(faults, shape, rng)
        self.armed = [Armed(index, fault, place)
                      for index, (fault, place) in enumerate(zip(faults, places, strict=True))]
        self.checkpoints = 0  # committed, over the whole scenario
        self.progress_step = 0
        self._lock = threading.Lock()  # the rendezvous thread lands, the runner loop heals

    # -- before launch -----------------------------------------------------------------------

    def prepare(self, launch: Launch, socket_path: str) -> None:
        plan = launch.plan
        plan.socket = socket_path
        quiet: set[int] = set()
        counting = False
        for armed in self.armed:
            armed.fault.prepare(launch, armed.index, armed.place)
            point = armed.fault.point
            quiet |= point.quiet_steps()
            if point.hook in PARK_HOOKS:
                plan.parks.append(point.entry(armed.index, armed.place))
            counting = counting or point.hook == "checkpoint_phase"
        if counting:
            plan.parks.append({"id": COUNT_CHECKPOINTS, "hook": "checkpoint_phase",
                               "role": "coordinator", "stage": None, "replica": None,
                               "phase": "committed"})
        plan.quiet_steps = sorted(quiet)

    def land_at_launch(self) -> None:
        """Faults in force from launch land with the first launch."""
        for armed in self.armed:
            if armed.fault.point.hook == "launch" and armed.landed_at_s is None:
                self._land(armed, Landing(armed.index, 0, "run", "launch", "launch", 0))

    # -- the rendezvous thread ---------------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            committed = (request["hook"] == "checkpoint_phase" and request.get("phase")
                         == "committed" and request["role"] == "coordinator")
            self.checkpoints += committed
            ordinal = self.checkpoints + (0 if committed else 1)
            place = Place(request["role"], request.get("stage"), request.get("replica"))
            step = request.get("checkpoint_step", request.get("step"))
            granted = []
            for fault_id in request["ids"]:
                if fault_id < 0:
                    continue
                armed = self.armed[fault_id]
                point = armed.fault.point
                if armed.landed_at_s is not None or (
                        point.generation is not None
                        and point.generation != request["generation"]):
                    continue
                if point.hook == "checkpoint_phase" and (ordinal < point.checkpoint
                                                         or request.get("phase") != point.phase):
                    continue
                # At a boundary a fault lands before the step its point names.
                landing_step = point.step if point.hook == "at_boundary" else step
                self._land(armed, Landing(fault_id, request["pid"], str(place),
                                          request["hook"], request["point"], landing_step,
                                          request["generation"]))
                granted.append(fault_id)
            return {"granted": granted}

    def _land(self, armed: Armed, landing: Landing) -> None:
        history = self.ctx.history
        history.record("fault_landed", fault=armed.index, kind=armed.fault.kind,
                       target=landing.place, point=landing.point, step=landing.step,
                       generation=landing.generation, at_event=count_events(self.events_path),
                       pid=landing.pid, describe=armed.fault.describe())
        armed.landed_at_s = time.monotonic()
        armed.landed_step = landing.step if landing.step is not None else self.progress_step
        try:
            armed.fault.invoke(self.ctx, landing)
        except Exception as exc:  # noqa: BLE001 - a fault that cannot act is recorded
            history.record("fault_error", fault=armed.index, error=f"{type(exc).__name__}: "
                           f"{exc}", at_event=count_events(self.events_path))

    # -- the runner loop ---------------------------------------------------------------------

    def heal_due(self, step: int) -> None:
        with self._lock:
            self.progress_step = max(self.progress_step, step)
            for armed in self.armed:
                if armed.landed_at_s is None or armed.healed:
                    continue
                fault = armed.fault
                if fault.duration_s is not None:
                    due = time.monotonic() - armed.landed_at_s >= fault.duration_s
                else:
                    due = bool(fault.for_steps) and step >= armed.landed_step + fault.for_steps
                if due:
                    self._heal(armed)

    def _heal(self, armed: Armed) -> None:
        armed.healed = True
        try:
            armed.fault.heal(self.ctx)
        except Exception as exc:  # noqa: BLE001 - healing must not stop the other heals
            self.ctx.history.record("fault_error", fault=armed.index, error=str(exc))
        self.ctx.history.record("fault_heal", fault=armed.index, kind=armed.fault.kind,
                                step=self.progress_step)

    def finish(self) -> None:
        """After the run: heal what landed, and say which points were never reached."""
        with self._lock:
            for armed in self.armed:
                if armed.landed_at_s is not None and not armed.healed:
                    self._heal(armed)
                elif armed.landed_at_s is None:
                    self.ctx.history.record("fault_missed", fault=armed.index,
                                            kind=armed.fault.kind,
                                            point=armed.fault.point.describe(),
                                            at_event=count_events(self.events_path))

    def expected_restarts(self, heartbeat_timeout_s: float) -> int | None:
        """The restarts the faults cause if each lands once (None: not predictable)."""
        total = 0
        for armed in self.armed:
            restarts = armed.fault.expected_restarts(heartbeat_timeout_s)
            if restarts is None:
                return None
            total += restarts
        return total
