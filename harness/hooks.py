"""The harness's implementation of the system's hooks seam (``pipetrain.hooks``).

Installed once, first thing in every process of a run under test, by
``pipetrain_harness.entry``, from the :class:`~pipetrain_harness.plan.Plan` the runner put in the
environment. This is where test delays, injected failures, planted bugs and link faults live;
the system only calls the points.
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

ENTRY_MODULE = "pipetrain_harness.entry"
LEAKED_FDS = 50
EXIT_STATUS = 3  # what an ``exit`` fault's os._exit uses: no word, a non-zero status


class HarnessHooks(hooks.Hooks):
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._loader_lock = threading.Lock()
        self._loader_rngs: dict[str, random.Random] = {}

    def _stage_faults(self, place: hooks.Place, step: int, kinds: tuple[str, ...]):
        for fault in self.plan.stage_faults:
            if (fault["kind"] in kinds and fault.get("stage") == place.stage
                    and fault.get("step") == step
                    and fault.get("generation", 0) == place.generation
                    and fault.get("replica", place.replica) == place.replica):
                yield fault

    # -- processes ---------------------------------------------------------------------------

    def worker_command(self, place: hooks.Place, argv: list[str]) -> list[str]:
        """Workers start through the harness's entry point too, so they install these hooks."""
        module = argv.index("-m") + 1
        if argv[module] != WORKER_MODULE:
            return argv
        return [*argv[:module], ENTRY_MODULE, "worker", *argv[module + 1:]]

    # -- steps -------------------------------------------------------------------------------

    def before_step(self, place: hooks.Place, step: int) -> None:
        if self.plan.step_delay_s > 0:
            time.sleep(self.plan.step_delay_s)
        where = f"stage {place.stage} step {step}"
        for fault in self._stage_faults(place, step, ("raise", "exit", "hang", "leak_fd",
                                                      "leak_child")):
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

    def after_update(self, place: hooks.Place, step: int, stage: Any) -> None:
        """``perturb``: nudge the largest parameter element by a millionth of itself, after
        the step's digests were taken: a silent, tiny wrong result that only a comparison with
        the reference reveals."""
        for _ in self._stage_faults(place, step, ("perturb",)):
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

    def checkpoint_phase(self, place: hooks.Place, step: int, phase: str) -> None:
        if phase == "segment_written" and self.plan.checkpoint_delay_s > 0:
            time.sleep(self.plan.checkpoint_delay_s)

    # -- data and links ----------------------------------------------------------------------

    def loader_item(self, place: hooks.Place, step: int, microbatch: int) -> None:
        for _ in self._stage_faults(place, step, ("loader_error",)):
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
                            place.generation)
        return FaultyChannel(channel, faults, seed=self.plan.seed) if faults else channel
