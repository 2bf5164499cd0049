"""What the harness asks of the processes of a run under test: one plan, in one variable.

The runner (or a test) puts a :class:`Plan` as JSON into ``PIPETRAIN_HARNESS_PLAN`` and starts
the run through ``python -P -m pipetrain_harness.entry``; every process of the run (the
coordinator, each worker it spawns, every MPI rank) reads it once at start and installs
:class:`pipetrain_harness.hooks.HarnessHooks` with it. Only harness code reads the variable: the
system knows nothing of it.

* ``step_delay_s``: every stage sleeps this long before each step (a stand-in for a heavy model,
  so that faults and signals can land in the middle of a run on a small one);
* ``loader_delay_s``: loader threads sleep a random 0..this before each micro-batch;
* ``stage_faults``: ``{"stage", "step", "kind", "generation" (0), "replica" (any), "id"}`` with kind
  ``raise`` (an exception in the stage), ``exit`` (``os._exit(3)`` without a word), ``hang``
  (stop making progress), ``loader_error`` (a loader thread fails), or one of the planted bugs
  ``perturb`` (a parameter nudged after the update: a silent wrong result), ``leak_fd``,
  ``leak_child``;
* ``link_faults``: ``{"kind": delay|throttle|corrupt|sever, "link": "0->1", "replica",
  "at_step", "for_steps", "microbatch", "when", "generation", "id", ...}`` for the sending
  stage's channel (``pipetrain_harness.linkshim``);
* ``socket``: the harness's rendezvous socket (``pipetrain_harness.rendezvous``); with it, a
  stage or link fault that has an ``id`` lands once, the first time its point is reached in any
  worker group, and ``parks`` are honoured;
* ``parks``: the fault points (``pipetrain_harness.points.Point.entry``) where a process stops
  and tells the harness, which delivers the fault from outside;
* ``quiet_steps``: boundaries the coordinator keeps quiet (no step started early) because a
  fault is planned right after them;
* ``probe_path``: every process of the run appends a sample of itself (fds, threads, memory)
  here as it starts and just before it exits (``pipetrain_harness.probes``);
* ``planted``: planted bugs by name (``stale_restart``: stage 0 forgets its optimizer state when
  the group restarts);
* ``seed``: seeds the harness's own randomness inside the run (jitter, bit flips, loader sleeps).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

PLAN_ENV = "PIPETRAIN_HARNESS_PLAN"
STAGE_FAULT_KINDS = ("raise", "exit", "hang", "loader_error", "perturb", "leak_fd", "leak_child")
PLANTED_BUGS = ("stale_restart",)


@dataclass
class Plan:
    step_delay_s: float = 0.0
    loader_delay_s: float = 0.0
    stage_faults: list[dict[str, Any]] = field(default_factory=list)
    link_faults: list[dict[str, Any]] = field(default_factory=list)
    planted: list[str] = field(default_factory=list)
    seed: int = 0
    socket: str = ""
    parks: list[dict[str, Any]] = field(default_factory=list)
    quiet_steps: list[int] = field(default_factory=list)
    probe_path: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{PLAN_ENV}: unknown keys {sorted(unknown)}")
        plan = cls(**data)
        for fault in plan.stage_faults:
            if fault.get("kind") not in STAGE_FAULT_KINDS:
                raise ValueError(f"{PLAN_ENV}: unknown stage fault {fault}")
        for bug in plan.planted:
            if bug not in PLANTED_BUGS:
                raise ValueError(f"{PLAN_ENV}: unknown planted bug {bug!r}")
        return plan

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Plan:
        text = (os.environ if environ is None else environ).get(PLAN_ENV)
        return cls.from_json(text) if text else cls()

    def env(self) -> dict[str, str]:
        """The variables that carry this plan into a launch."""
        return {PLAN_ENV: self.to_json()}
