"""Waits that poll for a while before they sleep.

A reply that is on its way usually comes sooner than a sleeping process wakes: on a virtual
machine with halt-polling off, waking a halted vCPU takes tens of microseconds (a median of
about 60 us after a millisecond of idleness on the machine these figures come from, 3 us when
the waiter polls), longer than a small model's whole action. So a wait first polls without
sleeping, yielding the CPU between polls, for a budget; then it sleeps in ``poll`` as before.
Polling costs a CPU while it lasts, so a process only does it when the run leaves it a core of
its own (:func:`spin_budget`).
"""

from __future__ import annotations

import os
import select
import time

# How long a waiting worker polls: what the coordinator needs to turn a step round, or a
# neighbour to send the next frame of a small model.
WORKER_SPIN_S = 500e-6
# How long the coordinator polls: a small model's whole step.
COORDINATOR_SPIN_S = 2e-3


def cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def spin_budget(budget_s: float, busy_processes: int) -> float:
    """``budget_s`` when ``busy_processes`` (this one included) fit on the CPUs, else 0: a
    process that polls on a CPU another one needs slows the run down."""
    return budget_s if busy_processes <= cpus() else 0.0


def poll_spinning(poller: select.poll, spin_s: float,
                  timeout_ms: int | None) -> list[tuple[int, int]]:
    """``poller.poll(timeout_ms)``, but polling without sleeping for the first ``spin_s``,
    yielding the CPU between polls to whatever else wants it."""
    if spin_s > 0:
        deadline = time.perf_counter() + spin_s
        while True:
            ready = poller.poll(0)
            if ready or time.perf_counter() >= deadline:
                break
            os.sched_yield()
        if ready:
            return ready
    return poller.poll(timeout_ms)
