"""Helpers shared by the kinds that act with Unix signals (kill, freeze, signal_storm,
checkpoint_crash): parse a signal name and a target, send a signal that may find its target
gone, and say which signals land deterministically where.

A target that is already gone is a fact to record (``target_gone``), not an error: a heal may
come after the coordinator replaced a frozen worker, and the checks judge the history.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from pipetrain_harness.faults.base import Context, Fault, FaultError

# What a stage worker does on each signal: it handles SIGTERM by leaving cleanly, ignores SIGINT
# and the terminal's job-control stops (the coordinator owns Ctrl-C and Ctrl-Z) and keeps the
# default action for everything else, so every signal whose default action ends a process ends
# a worker and costs one group restart. Only SIGSTOP, which cannot be ignored, freezes one.
WORKER_IGNORES = frozenset({signal.SIGINT, signal.SIGPIPE, signal.SIGCHLD, signal.SIGCONT,
                            signal.SIGURG, signal.SIGWINCH, signal.SIGTSTP, signal.SIGTTIN,
                            signal.SIGTTOU})
WORKER_STOPS = frozenset({signal.SIGSTOP})
# The signal a worker handles in Python: its handler runs in the main thread, so it lands
# deterministically only where the main thread is the one parked, and the worker looks at it
# right after (before a step or an action), not on the all-reduce thread or during start-up.
WORKER_HANDLES = frozenset({signal.SIGTERM})
MAIN_THREAD_POINTS = ("before_step", "before_action")
# Signals after which a target may need a SIGCONT: a kernel stop, or a default-action job-control
# stop (which the kernel drops in an orphaned process group, so it may not stop at all).
STOPPING = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


def parse_signal(fault: Fault, key: str, name: Any) -> signal.Signals:
    try:
        return signal.Signals[name]
    except (KeyError, TypeError):  # TypeError: not even a string (a TOML table, a list)
        raise FaultError(f"{fault.where}: {key} = {name!r} is not a signal name "
                         f"(for example 'SIGKILL')") from None


def check_handled_where(fault: Fault, signals: list[signal.Signals]) -> None:
    """Refuse a signal a worker handles at a point where its handler's effect would be up to
    the scheduler."""
    if fault.target == "coordinator" or fault.point.hook in MAIN_THREAD_POINTS:
        return
    handled = [sig.name for sig in signals if sig in WORKER_HANDLES]
    if handled:
        raise FaultError(f"{fault.where}: {handled[0]} to a worker lands exactly only before a "
                         f"step or an action (at_step, at_action): its handler runs in the "
                         f"main thread")


def worker_restarts(sig: signal.Signals) -> int | None:
    """Group restarts one such signal to a worker causes: 1, 0, or None (a stopped worker
    restarts only if it stays stopped past the heartbeat timeout)."""
    if sig in WORKER_IGNORES:
        return 0
    return None if sig in WORKER_STOPS else 1


def send(ctx: Context, fault: Fault, pid: int, sig: signal.Signals) -> bool:
    """Send one signal and record it; False (recorded) when the process is gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        ctx.history.record("target_gone", fault=fault.describe(), pid=pid, signal=sig.name)
        return False
    ctx.history.record("signal_sent", fault=fault.describe(), pid=pid, signal=sig.name)
    return True
