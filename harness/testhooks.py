"""Test hooks: deliberate faults that tests and the harness switch on through the environment.

``PIPETRAIN_TEST_FAULT`` holds a JSON object such as ``{"stage": 1, "step": 3, "kind": "raise"}``.
Kinds: ``raise`` (an exception in the stage), ``exit`` (``os._exit(3)`` without a word),
``hang`` (stop responding), ``perturb`` (a wrong gradient), ``leak_fd`` (open files never
closed), ``leak_child`` (an orphan process): the last three are planted bugs the harness must
catch.
Absent variable, no effect: production runs never see these paths.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from typing import Any

import numpy as np

ENV = "PIPETRAIN_TEST_FAULT"
LEAKED_FDS = 50
# Seconds every stage sleeps before each step: a stand-in for a heavy model, so that tests can
# signal a run in the middle of its steps without training a big network on 2 cores.
DELAY_ENV = "PIPETRAIN_TEST_STEP_DELAY_S"


LOADER_DELAY_ENV = "PIPETRAIN_TEST_LOADER_DELAY_S"


def loader_delay(fault: dict[str, Any] | None = None):
    """Random sleeps of up to ``PIPETRAIN_TEST_LOADER_DELAY_S`` before each loaded item, so
    tests can show the delivered data does not depend on the loader threads' timing; with a
    ``loader_error`` fault, an exception in a loader thread at the fault's step."""
    limit = float(os.environ.get(LOADER_DELAY_ENV) or 0)
    fail_step = fault.get("step") if fault and fault.get("kind") == "loader_error" else None
    if limit <= 0 and fail_step is None:
        return None
    rng = random.Random(os.getpid())  # noqa: S311 - timing noise, not security
    lock = threading.Lock()

    def delay(step: int, microbatch: int) -> float:
        if step == fail_step:
            raise OSError(f"injected loader failure at step {step} micro-batch {microbatch}")
        with lock:
            return rng.uniform(0, limit) if limit > 0 else 0.0

    return delay


PLANTED_ENV = "PIPETRAIN_TEST_PLANTED_BUG"


def planted(name: str) -> bool:
    """A bug planted on purpose (``python -m pipetrain_harness fuzz --plant NAME`` must find it):
    ``stale_restart`` makes stage 0 forget its optimizer state when the group restarts."""
    return os.environ.get(PLANTED_ENV) == name


CHECKPOINT_DELAY_ENV = "PIPETRAIN_TEST_CHECKPOINT_DELAY_S"


def checkpoint_delay() -> None:
    delay = float(os.environ.get(CHECKPOINT_DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)


def step_delay() -> None:
    delay = float(os.environ.get(DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)


def stage_fault(stage: int, generation: int = 0) -> dict[str, Any] | None:
    """The fault planned for this stage in this worker generation (restarts count up from 0),
    so a fault fires once and the restarted group runs clean unless the plan says otherwise."""
    text = os.environ.get(ENV)
    if not text:
        return None
    fault = json.loads(text)
    if fault.get("stage") != stage or fault.get("generation", 0) != generation:
        return None
    return fault


def trigger(fault: dict[str, Any], where: str) -> None:
    kind = fault.get("kind", "raise")
    if kind == "raise":
        raise RuntimeError(f"injected fault at {where}")
    if kind == "exit":
        os._exit(3)
    if kind == "hang":
        threading.Event().wait()
    if kind == "leak_fd":  # a bug the harness's leak check must catch
        for _ in range(LEAKED_FDS):
            os.open(os.devnull, os.O_RDONLY)
    if kind == "leak_child":  # an orphan that outlives the run, for the same reason
        subprocess.Popen(["sleep", "300"], start_new_session=True,  # noqa: S603,S607
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)


def perturb(stage: Any) -> None:
    """Nudge the largest gradient element by a millionth before the update, after the digest
    was taken: a silent, tiny wrong result that only the final parameters reveal."""
    grad = next(iter(stage.segment.grads().values()))
    flat = grad.reshape(-1)
    position = int(np.argmax(np.abs(flat)))
    flat[position] += max(abs(float(flat[position])) * 1e-6, 1e-12)
