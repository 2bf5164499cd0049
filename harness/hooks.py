"""The harness's implementation of the system's hooks seam (``pipetrain.hooks``).

Installed once, first thing in every process of a run under test, by
``pipetrain_harness.entry``, from the :class:`~pipetrain_harness.plan.Plan` the runner put in the
environment. This is where test delays, injected failures, planted bugs and link faults live;
the system only calls the points.

At a point the plan names (``Plan.parks``) the process *parks*: it tells the harness over the
rendezvous socket and waits until the harness has delivered the fault from outside
(``pipetrain_harness.rendezvous``). Faults that act in place first *claim* their landing the
same way, so that each lands once, the first time its point is reached by any worker group.
A plan without a socket (a test's own plan) acts in place as planned, in the generation the
fault names (0 by default).
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from typing import Any

import numpy as np

from pipetrain import hooks
from pipetrain.runtime.launcher import WORKER_MODULE
from pipetrain.wire.pipe import PipeChannel
from pipetrain_harness.linkshim import FaultyChannel, faults_for
from pipetrain_harness.plan import Plan
from pipetrain_harness.points import COORDINATOR, label, layer_of
from pipetrain_harness.rendezvous import park

ENTRY_MODULE = "pipetrain_harness.entry"
LEAKED_FDS = 50
EXIT_STATUS = 3  # what an ``exit`` fault's os._exit uses: no word, a non-zero status


def _matches(entry: dict[str, Any], place: hooks.Place) -> bool:
    if entry["role"] != place.role:
        return False
    if place.role != COORDINATOR and (entry["stage"], entry["replica"]) != (place.stage,
                                                                          place.replica):
        return False
    return entry.get("generation", place.generation) == place.generation


class HarnessHooks(hooks.Hooks):
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._loader_lock = threading.Lock()
        self._loader_rngs: dict[str, random.Random] = {}
        self._parks: dict[str, list[dict[str, Any]]] = {}
        for entry in plan.parks:
            self._parks.setdefault(entry["hook"], []).append(entry)
        self._quiet = frozenset(plan.quiet_steps)
        self._claimed: dict[tuple[int, int], bool] = {}  # (fault id, generation) -> granted

    # -- meeting the harness -----------------------------------------------------------------

    def _request(self, place: hooks.Place, hook: str, ids: list[int], step: int | None,
                 point: str, **extra: Any) -> list[int]:
        reply = park(self.plan.socket, {
            "ids": ids, "pid": os.getpid(), "hook": hook, "role": place.role,
            "stage": place.stage, "replica": place.replica, "generation": place.generation,
            "step": step, "point": point, **extra})
        return list(reply.get("granted", []))

    def _park(self, hook: str, place: hooks.Place, step: int | None = None, *,
              point: str | None = None, **match: Any) -> None:
        """Stop here while the harness delivers the faults planned at this point, if any."""
        entries = self._parks.get(hook)
        if not entries:
            return
        ids = [entry["id"] for entry in entries if _matches(entry, place)
               and (step is None or entry.get("step", step) == step)
               and all(entry.get(key, value) == value for key, value in match.items())]
        if ids:
            self._request(place, hook, ids, step, point or label(hook), **match)

    def claim(self, fault: dict[str, Any], place: hooks.Place, step: int, point: str) -> bool:
        """Whether an in-place fault acts here: asked of the harness once per worker group
        (it lands the first time only); without a harness, only in the planned generation."""
        if not self.plan.socket or "id" not in fault:
            return fault.get("generation", 0) == place.generation
        key = (fault["id"], place.generation)
        if key not in self._claimed:
            granted = self._request(place, "claim", [fault["id"]], step, point)
            self._claimed[key] = fault["id"] in granted
        return self._claimed[key]

    def _stage_faults(self, place: hooks.Place, step: int, kinds: tuple[str, ...], point: str):
        for fault in self.plan.stage_faults:
            if (fault["kind"] in kinds and fault.get("stage") == place.stage
                    and fault.get("step") == step
                    and fault.get("replica", place.replica) == place.replica
                    and self.claim(fault, place, step, point)):
                yield fault

    # -- processes ---------------------------------------------------------------------------

    def worker_command(self, place: hooks.Place, argv: list[str]) -> list[str]:
        """Workers start through the harness's entry point too, so they install these hooks."""
        module = argv.index("-m") + 1
        if argv[module] != WORKER_MODULE:
            return argv
        return [*argv[:module], ENTRY_MODULE, "worker", *argv[module + 1:]]

    def quiet_boundary(self, step: int) -> bool:
        return step in self._quiet

    def at_boundary(self, step: int) -> None:
        self._park("at_boundary", hooks.Place(COORDINATOR), step)

    def step_started(self, step: int) -> None:
        self._park("step_started", hooks.Place(COORDINATOR), step, point="during_step")

    # -- steps -------------------------------------------------------------------------------

    def before_step(self, place: hooks.Place, step: int) -> None:
        if self.plan.step_delay_s > 0:
            time.sleep(self.plan.step_delay_s)
        self._park("before_step", place, step)
        where = f"stage {place.stage} step {step}"
        for fault in self._stage_faults(place, step, ("raise", "exit", "hang", "leak_fd",
                                                      "leak_child"), "before_step"):
            match fault["kind"]:
                case "raise":
                    raise RuntimeError(f"injected fault at {where}")
                case "exit":
                    os._exit(EXIT_STATUS)
                case "hang":
                    threading.Event().wait()
                case "leak_fd":  # a bug the harness's leak check must catch
                    for _ in range(LEAKED_FDS):
                        os.open(os.devnull, os.O_RDONLY)
                case "leak_child":  # an orphan that outlives the run, for the same reason
                    subprocess.Popen(["sleep", "300"], start_new_session=True,  # noqa: S603,S607
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def before_action(self, place: hooks.Place, step: int, action: Any) -> None:
        if "before_action" in self._parks:
            self._park("before_action", place, step, point=str(action),
                       action=str(action)[len(str(action.stage)):])

    def before_reduce(self, place: hooks.Place, step: int, names: list[str]) -> None:
        if "before_reduce" in self._parks:
            layer = layer_of(names)
            self._park("before_reduce", place, step, point=label("before_reduce", layer=layer),
                       layer=layer)

    def after_update(self, place: hooks.Place, step: int, stage: Any) -> None:
        """``perturb``: nudge the largest parameter element by a millionth of itself, after
        the step's digests were taken: a silent, tiny wrong result that only a comparison with
        the reference reveals."""
        for _ in self._stage_faults(place, step, ("perturb",), "after_update"):
            param = stage.params[stage.names[0]]
            flat = param.reshape(-1)
            position = int(np.argmax(np.abs(flat)))
            flat[position] += max(abs(float(flat[position])) * 1e-6, 1e-12)

    def state_restored(self, place: hooks.Place, stage: Any) -> None:
        """``stale_restart``: stage 0 of a restarted group keeps a fresh optimizer state
        instead of the checkpoint's."""
        if "stale_restart" in self.plan.planted and place.generation > 0 and place.stage == 0:
            for value in stage.optimizer.state.values():
                value[...] = 0
            stage.optimizer.step_count = 0
        self._park("state_restored", place)

    def checkpoint_phase(self, place: hooks.Place, step: int, phase: str) -> None:
        self._park("checkpoint_phase", place, point=phase, phase=phase, checkpoint_step=step)

    # -- data and links ----------------------------------------------------------------------

    def loader_item(self, place: hooks.Place, step: int, microbatch: int) -> None:
        for _ in self._stage_faults(place, step, ("loader_error",), f"loader {microbatch}"):
            raise OSError(f"injected loader failure at step {step} micro-batch {microbatch}")
        limit = self.plan.loader_delay_s
        if limit > 0:
            with self._loader_lock:
                rng = self._loader_rngs.setdefault(
                    str(place), random.Random(f"{self.plan.seed}-{place}"))  # noqa: S311
                delay = rng.uniform(0, limit)
            time.sleep(delay)

    def wrap_channel(self, place: hooks.Place, peer: hooks.Place, channel: Any) -> Any:
        if peer.replica != place.replica or not isinstance(channel, PipeChannel):
            return channel  # link faults act on the pipes between pipeline neighbours
        faults = faults_for(self.plan.link_faults, place.stage, peer.stage, place.replica,
                            None if self.plan.socket else place.generation)
        if not faults:
            return channel
        return FaultyChannel(channel, faults, seed=self.plan.seed,
                             claim=lambda fault, step, point: self.claim(fault, place, step,
                                                                         point))
