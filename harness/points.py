"""Fault points: where on its target a fault lands, named in the program's own order, not in time.

A fault table names its point with these keys (which ones a kind takes is its own business):

====================  ==========================================================================
key                   the point
====================  ==========================================================================
``at_step = N``       on a stage: step N-1 is complete in every process (its event written) and
                      the target has not started any work of step N (``before_step``); on the
                      coordinator: the boundary after step N-1, before the signals pending there
                      are read (``at_boundary``), so the boundary that acts on them replays
``at_action = "B2"``  with ``at_step``, on a stage: before that schedule action of step N, in the
                      schedule's own notation (``"1B2"`` with the stage is accepted too;
                      interleaved actions name their piece: ``"F1@2"``)
``at_reduce = L``     with ``at_step``, on a replicated stage: before the all-reduce of layer L
``during_step``       with ``at_step``, on the coordinator: step N has been sent to every worker
                      and the coordinator is about to wait for their results (``step_started``)
``at_resume = true``  on a stage: it has just loaded a checkpoint (after a restart or --resume)
``after_checkpoint``  ``damage_checkpoint``: the K-th checkpoint has just been committed (the
                      coordinator waits); ``checkpoint_crash``: during the next checkpoint, at
                      its ``phase``
``phase``             ``segment_written`` (on a stage), ``segments_written``,
                      ``manifest_written`` (default) or ``committed`` (on the coordinator)
``at_microbatch``     link faults: the frame of that micro-batch of step N (default: the first
                      frame of the step on the link); ``when = "before"|"after"`` it is sent
``generation = G``    only in worker group G (0: before any restart)
====================  ==========================================================================

A fault lands once, the first time its point is reached, whichever worker group or launch of
the run reaches it. How it gets there: the plan tells each process of the run the points that
concern it (:meth:`Point.entry`); a process that reaches one parks and tells the harness, which
delivers the fault from outside and lets it go (``pipetrain_harness.rendezvous``). This module is
the pure part: parsing, the entries, and which faults could race each other.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

COORDINATOR = "coordinator"
STAGE = "stage"
PHASES = ("segment_written", "segments_written", "manifest_written", "committed")
STAGE_PHASES = ("segment_written",)
POINT_KEYS = ("at_step", "at_action", "at_reduce", "during_step", "at_resume",
              "after_checkpoint", "phase", "at_microbatch", "when", "generation")
TARGET_PATTERN = re.compile(r"coordinator|random_worker|stage:(\d+)(?::replica:(\d+))?")
ACTION_PATTERN = re.compile(r"(\d*)([FBIW])(\d+)(@\d+)?")  # "@K": interleaved, piece K


class PointError(ValueError):
    """A point that cannot be reached or named; the message names the key."""


@dataclass(frozen=True)
class Place:
    """A process of the run: the coordinator, or stage ``stage`` of replica ``replica``."""

    role: str
    stage: int | None = None
    replica: int | None = None

    def __str__(self) -> str:
        if self.role == COORDINATOR:
            return COORDINATOR
        return f"stage:{self.stage}:replica:{self.replica}"


def parse_target(name: str, where: str, key: str = "target") -> str:
    if not isinstance(name, str) or not TARGET_PATTERN.fullmatch(name):
        raise PointError(f"{where}: {key} = {name!r} is not a target (coordinator, "
                         f"random_worker, stage:N or stage:N:replica:R)")
    return name


def resolve_target(name: str, stages: int, replicas: int, rng: random.Random) -> Place:
    """The place a target name means in an S x R run (``random_worker``: a seeded choice)."""
    if name == COORDINATOR:
        return Place(COORDINATOR)
    if name == "random_worker":
        return Place(STAGE, rng.randrange(stages), rng.randrange(replicas))
    match = TARGET_PATTERN.fullmatch(name)
    return Place(STAGE, int(match[1]), int(match[2] or 0))


@dataclass(frozen=True)
class Point:
    """Where a fault lands; ``hook`` is the program point (a method of ``pipetrain.hooks``, or
    ``send_frame`` for the link shim, ``stage_fault`` for a fault acting inside a stage, or
    ``launch``)."""

    hook: str
    step: int | None = None
    action: str | None = None  # op and micro-batch: "B2"
    layer: int | None = None
    microbatch: int | None = None
    when: str = "before"
    checkpoint: int | None = None  # lands during the checkpoint of this number (1: the first)
    phase: str | None = None
    generation: int | None = None

    def entry(self, fault_id: int, place: Place) -> dict[str, Any]:
        """What the target's process is told to watch for (JSON for the plan)."""
        entry: dict[str, Any] = {"id": fault_id, "hook": self.hook, "role": place.role,
                                 "stage": place.stage, "replica": place.replica}
        step = self.step
        if self.hook == "at_boundary":
            step = self.step - 1  # the boundary after step N-1
        for key, value in (("step", step), ("action", self.action), ("layer", self.layer),
                           ("microbatch", self.microbatch), ("phase", self.phase),
                           ("generation", self.generation)):
            if value is not None:
                entry[key] = value
        return entry

    def quiet_steps(self) -> set[int]:
        """Boundaries that must be quiet for this point to find the steps before it complete:
        the one before its step, and for a link severed after a frame also the one after it
        (the receiver may only notice in the next step)."""
        if self.step is None or self.hook == "launch":
            return set()
        quiet = {self.step - 1}
        if self.hook == "send_frame" and self.when == "after":
            quiet.add(self.step)
        return {step for step in quiet if step >= 0}

    def moment(self) -> tuple[Any, ...] | None:
        """When this point is reached in a worker, as far as other processes are concerned:
        two faults in different processes at the same moment would land in an order timing
        decides. None: in the coordinator, or at launch (never concurrent)."""
        if self.hook in ("at_boundary", "step_started", "launch") or (
                self.hook == "checkpoint_phase"
                                                      and self.phase not in STAGE_PHASES):
            return None
        if self.hook == "state_restored":
            return ("resume",)
        if self.hook == "checkpoint_phase":
            return ("checkpoint", self.checkpoint)
        return ("step", self.step)

    def describe(self) -> str:
        if self.hook == "launch":
            return "at launch"
        if self.hook == "state_restored":
            return "at resume"
        if self.hook == "checkpoint_phase":
            return f"at {self.phase} of checkpoint number {self.checkpoint}"
        if self.hook == "step_started":
            return f"during step {self.step} (its command sent)"
        text = f"at step {self.step}"
        if self.action:
            text += f" action {self.action}"
        if self.layer is not None:
            text += f" all-reduce of layer {self.layer}"
        if self.microbatch is not None:
            text += f" micro-batch {self.microbatch}"
        return text


def _int(table: dict[str, Any], key: str, where: str, minimum: int) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PointError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def step_point(table: dict[str, Any], where: str, *, coordinator: bool,
               default_step: int | None = 1, resume: bool = True) -> Point:
    """A point of a fault that lands on a process at a step (kill, freeze, signal_storm):
    ``at_step`` with optionally ``at_action`` or ``at_reduce``, or ``at_resume``."""
    generation = _int(table, "generation", where, 0)
    step = _int(table, "at_step", where, 1)
    if table.get("at_resume") is not None:
        if table["at_resume"] is not True:
            raise PointError(f"{where}: at_resume must be true, got {table['at_resume']!r}")
        if not resume or coordinator:
            raise PointError(f"{where}: at_resume: only a stage is resumed (use a stage target)")
        for key in ("at_step", "at_action", "at_reduce"):
            if key in table:
                raise PointError(f"{where}: {key} and at_resume name two different points")
        return Point("state_restored", generation=generation)
    if step is None:
        step = default_step
    during = table.get("during_step")
    if during is not None:
        if during is not True:
            raise PointError(f"{where}: during_step must be true, got {during!r}")
        if not coordinator:
            raise PointError(f"{where}: during_step: a stage's points in a step are at_action "
                             f"and at_reduce; during_step is the coordinator's")
        if "at_step" not in table:
            raise PointError(f"{where}: during_step needs at_step (the step it is in)")
        return Point("step_started", step=step, generation=generation)
    action, layer = table.get("at_action"), _int(table, "at_reduce", where, 0)
    if coordinator and (action is not None or layer is not None):
        key = "at_action" if action is not None else "at_reduce"
        raise PointError(f"{where}: {key}: the coordinator runs no schedule action or "
                         f"all-reduce; it is reached at step boundaries (at_step)")
    if action is not None and layer is not None:
        raise PointError(f"{where}: at_action and at_reduce name two different points")
    if (action is not None or layer is not None) and "at_step" not in table:
        key = "at_action" if action is not None else "at_reduce"
        raise PointError(f"{where}: {key} needs at_step (the step whose action it is)")
    if action is not None:
        match = ACTION_PATTERN.fullmatch(action) if isinstance(action, str) else None
        if match is None:
            raise PointError(f"{where}: at_action = {action!r} is not a schedule action "
                             f"(such as 'F0', 'B2', 'I1', 'W3' or '1B2')")
        action = match[2] + match[3] + (match[4] or "")
        if match[1] and "target" in table and table["target"].startswith("stage:"):
            stage = int(table["target"].split(":")[1])
            if int(match[1]) != stage:
                raise PointError(f"{where}: at_action = {table['at_action']!r} is an action of "
                                 f"stage {match[1]}, not of the target stage {stage}")
    if coordinator:
        return Point("at_boundary", step=step, generation=generation)
    if action is not None:
        return Point("before_action", step=step, action=action, generation=generation)
    if layer is not None:
        return Point("before_reduce", step=step, layer=layer, generation=generation)
    return Point("before_step", step=step, generation=generation)


def checkpoint_point(table: dict[str, Any], where: str, *, coordinator: bool,
                     default_phase: str | None, default_after: int) -> Point:
    """A point during a checkpoint: ``phase`` of the write after the ``after_checkpoint``-th
    (``default_phase`` None: the moment the K-th is committed, for damage on disk).
    Checkpoints are counted by the harness over the whole scenario, relaunches included."""
    after = _int(table, "after_checkpoint", where, 0)
    after = default_after if after is None else after
    phase = table.get("phase", default_phase)
    if default_phase is None:
        if after < 1:
            raise PointError(f"{where}: after_checkpoint must be >= 1, got {after}")
        return Point("checkpoint_phase", checkpoint=after, phase="committed")
    if phase not in PHASES:
        raise PointError(f"{where}: phase = {phase!r} is not one of {', '.join(PHASES)}")
    if coordinator == (phase in STAGE_PHASES):
        who = "a stage" if phase in STAGE_PHASES else "the coordinator"
        raise PointError(f"{where}: phase = {phase!r} is reached by {who}, not the target")
    return Point("checkpoint_phase", checkpoint=after + 1, phase=phase,
                 generation=_int(table, "generation", where, 0))


def frame_point(table: dict[str, Any], where: str, *, when: bool) -> Point:
    """The first frame of step ``at_step`` (default 1) on a link, or its ``at_microbatch``."""
    if "when" in table and not when:
        raise PointError(f"{where}: when: only sever acts before or after a frame is sent")
    side = table.get("when", "before")
    if side not in ("before", "after"):
        raise PointError(f"{where}: when = {side!r} is not 'before' or 'after'")
    return Point("send_frame", step=_int(table, "at_step", where, 1) or 1,
                 microbatch=_int(table, "at_microbatch", where, 0), when=side,
                 generation=_int(table, "generation", where, 0))


def in_stage_point(table: dict[str, Any], where: str, default_step: int) -> Point:
    """A fault that acts inside a stage at a step (a planted bug)."""
    step = _int(table, "at_step", where, 1)
    return Point("stage_fault", step=default_step if step is None else step,
                 generation=_int(table, "generation", where, 0))


LAUNCH = Point("launch")


def races(points: list[tuple[Point, Place]]) -> tuple[int, int] | None:
    """The first pair of points (by index) that different processes reach at the same moment:
    which lands first would be up to the scheduler, so a scenario must not ask for it."""
    seen: dict[tuple[Any, ...], tuple[int, Place]] = {}
    for index, (point, place) in enumerate(points):
        moment = point.moment()
        if moment is None:
            continue
        if moment in seen and seen[moment][1] != place:
            return seen[moment][0], index
        seen.setdefault(moment, (index, place))
    return None


def label(hook: str, *, action: Any = None, layer: int | None = None, phase: str | None = None,
          frame: str | None = None) -> str:
    """The ``point`` of a ``fault_landed`` entry: ``before_step``, an action such as ``1B2``,
    ``reduce layer 2``, a checkpoint phase, ``send activation 0``..."""
    if hook == "before_action":
        return str(action)
    if hook == "before_reduce":
        return f"reduce layer {layer}"
    if hook == "checkpoint_phase":
        return str(phase)
    if hook == "send_frame":
        return str(frame)
    if hook == "at_boundary":
        return "boundary"
    return hook


def layer_of(names: list[str]) -> int | None:
    """The layer index of a reduction's parameter names (``layers.2.weight`` -> 2)."""
    for name in names:
        parts = name.split(".")
        if len(parts) >= 2 and parts[0] == "layers" and parts[1].isdigit():
            return int(parts[1])
    return None
