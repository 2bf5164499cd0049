"""signal_storm: ``count`` signals, round-robin from ``signals``, at ``rate_per_s`` (0: as fast as
possible), to one process; by default SIGUSR1 (checkpoint requests) to the coordinator.

The contract says any number of signals in any order at any rate leaves the run correct; this
kind is how that is tested. One owned thread sends them; it ends by itself after ``count``
signals or when the target is gone, and heal stops and joins it. A storm holding a stop signal
(SIGTSTP, ...) ends with a SIGCONT at heal, so the run is never left paused: with
``duration_s`` the target stays paused until then (a timed pause); without it the thread sends
that SIGCONT itself as soon as it is done, because a paused run makes no progress, so neither
``for_steps`` nor the end of the run would ever come to heal it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any

from pipetrain.threads import CONTROL_SIGNALS
from pipetrain_harness.faults._settings import setting
from pipetrain_harness.faults._signals import (
    STOPPING,
    OwnedThread,
    check_target,
    parse_signal,
    resolve,
    send,
    worker_restarts,
)
from pipetrain_harness.faults.base import Context, Fault, FaultError

# Signals the coordinator survives: its control signals, a kernel stop (the storm ends with a
# SIGCONT), and the ones Python or the default action ignore.
COORDINATOR_SURVIVES = frozenset({*CONTROL_SIGNALS, signal.SIGSTOP, signal.SIGPIPE, signal.SIGCHLD,
                                  signal.SIGURG, signal.SIGWINCH})


class SignalStorm(Fault):
    kind = "signal_storm"
    params = {"target": str, "signals": list, "count": int, "rate_per_s": (int, float)}

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        self.target = check_target(self, table.get("target", "coordinator"))
        names = table.get("signals", ["SIGUSR1"])
        if not names:
            raise FaultError(f"{where}: signals must name at least one signal")
        self.signals = [parse_signal(self, "signals", name) for name in names]
        self.count = setting(self, "count", 100, minimum=1)
        self.rate_per_s = setting(self, "rate_per_s", 1000, minimum=0)
        self.pid: int | None = None
        self.sent = 0
        self.thread: OwnedThread | None = None

    def invoke(self, ctx: Context) -> None:
        self.pid, self.sent = resolve(ctx, self, self.target), 0
        if self.pid is not None:
            self.thread = OwnedThread("signal-storm", self._storm)

    def _storm(self, stopping: threading.Event) -> None:
        interval_s = 1 / self.rate_per_s if self.rate_per_s else 0.0
        started = time.monotonic()
        for index in range(self.count):
            if stopping.is_set():
                break
            try:
                os.kill(self.pid, self.signals[index % len(self.signals)])
            except ProcessLookupError:
                return  # the target is gone: the storm is over
            self.sent += 1
            if interval_s:  # pace against the start, so slow sends do not lower the rate
                stopping.wait(max(0.0, started + (index + 1) * interval_s - time.monotonic()))
        if self.duration_s is None and STOPPING.intersection(self.signals):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)

    def heal(self, ctx: Context) -> None:
        if self.thread is None:
            return
        try:
            self.thread.stop()
        finally:
            self.thread = None
            ctx.history.record("signals_sent", fault=self.describe(), pid=self.pid,
                               sent=self.sent, signals=[sig.name for sig in self.signals])
            if STOPPING.intersection(self.signals):
                send(ctx, self, self.pid, signal.SIGCONT)  # the last word: never left paused

    def expected_restarts(self) -> int | None:
        if self.target == "coordinator":  # the contract: its signals never cost a restart
            return 0 if COORDINATOR_SURVIVES.issuperset(self.signals) else None
        restarts = {worker_restarts(sig) for sig in self.signals}
        return 0 if restarts == {0} else None


FAULT = SignalStorm
