"""signal_storm: ``count`` signals, round-robin from ``signals``, at ``rate_per_s`` (0: as fast as
possible), to one process at its point; by default SIGUSR1 (checkpoint requests) to the
coordinator at a step boundary.

The contract says any number of signals in any order at any rate leaves the run correct; this
kind is how that is tested. The whole storm is sent while the target is parked at its point, so
every signal has been delivered before it goes on: the coordinator reads them all at that one
boundary, and the same storm replays to the same requests (a burst of one signal coalesces in
the kernel, which the coordinator's fold does not mind). A storm holding a stop signal
(SIGTSTP, ...) ends with a SIGCONT: without ``duration_s`` as its last signal, before the target
goes on (nothing is left paused); with it, at heal, so the target stays paused that long.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

from pipetrain.threads import CONTROL_SIGNALS
from pipetrain_harness.faults._settings import setting
from pipetrain_harness.faults._signals import (
    STOPPING,
    check_handled_where,
    parse_signal,
    send,
    worker_restarts,
)
from pipetrain_harness.faults.base import STEP_KEYS, Context, Fault, FaultError, Landing
from pipetrain_harness.points import Point, step_point

# Signals the coordinator survives: its control signals, a kernel stop (the storm ends with a
# SIGCONT), and the ones Python or the default action ignore.
COORDINATOR_SURVIVES = frozenset({*CONTROL_SIGNALS, signal.SIGSTOP, signal.SIGPIPE, signal.SIGCHLD,
                                  signal.SIGURG, signal.SIGWINCH})


class SignalStorm(Fault):
    kind = "signal_storm"
    params = {"target": str, "signals": list, "count": int, "rate_per_s": (int, float)}
    point_keys = STEP_KEYS
    default_target = "coordinator"

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        names = table.get("signals", ["SIGUSR1"])
        if not names:
            raise FaultError(f"{where}: signals must name at least one signal")
        self.signals = [parse_signal(self, "signals", name) for name in names]
        check_handled_where(self, self.signals)
        self.count = setting(self, "count", 100, minimum=1)
        self.rate_per_s = setting(self, "rate_per_s", 1000, minimum=0)
        self.pid: int | None = None

    def build_point(self, table: dict[str, Any], where: str) -> Point:
        return step_point(table, where, coordinator=self.target == "coordinator")

    def invoke(self, ctx: Context, landing: Landing) -> None:
        interval_s = 1 / self.rate_per_s if self.rate_per_s else 0.0
        started, sent = time.monotonic(), 0
        for index in range(self.count):
            try:
                os.kill(landing.pid, self.signals[index % len(self.signals)])
            except ProcessLookupError:
                break  # the target is gone (one of the signals ended it): the storm is over
            sent += 1
            if interval_s:  # pace against the start, so slow sends do not lower the rate
                time.sleep(max(0.0, started + (index + 1) * interval_s - time.monotonic()))
        stops = bool(STOPPING.intersection(self.signals))
        if stops and self.duration_s is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(landing.pid, signal.SIGCONT)
        elif stops:
            self.pid = landing.pid  # continued at heal
        ctx.history.record("signals_sent", fault=self.describe(), pid=landing.pid, sent=sent,
                           signals=[sig.name for sig in self.signals])

    def heal(self, ctx: Context) -> None:
        if self.pid is not None:
            send(ctx, self, self.pid, signal.SIGCONT)  # the last word: never left paused
            self.pid = None

    def expected_restarts(self, heartbeat_timeout_s: float | None = None) -> int | None:
        if self.target == "coordinator":  # the contract: its signals never cost a restart
            return 0 if COORDINATOR_SURVIVES.issuperset(self.signals) else None
        restarts = {worker_restarts(sig) for sig in self.signals}
        if restarts == {0}:
            return 0
        # The first signal that ends a worker ends the storm's effect: one restart.
        first = next(sig for sig in self.signals * 2 if worker_restarts(sig) != 0)
        return worker_restarts(first) if self.count >= len(self.signals) else None


FAULT = SignalStorm
