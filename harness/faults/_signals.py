"""Helpers shared by the kinds that act with Unix signals (kill, freeze, signal_storm,
checkpoint_crash): parse a signal name, check a target name, send a signal that may find its
target gone, and own a helper thread.

A target that is already gone is a fact to record (``target_gone``), not an error: the run may
have ended or restarted its workers before the fault fired, and the checks judge the history.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Callable
from typing import Any

from pipetrain_harness.faults.base import Context, Fault, FaultError

TARGET_PATTERN = re.compile(r"coordinator|random_worker|stage:\d+(:replica:\d+)?")

# What a stage worker does on each signal: it handles SIGTERM by leaving cleanly, ignores SIGINT
# and the terminal's job-control stops (the coordinator owns Ctrl-C and Ctrl-Z) and keeps the
# default action for everything else, so every signal whose default action ends a process ends
# a worker and costs one group restart. Only SIGSTOP, which cannot be ignored, freezes one.
WORKER_IGNORES = frozenset({signal.SIGINT, signal.SIGPIPE, signal.SIGCHLD, signal.SIGCONT,
                            signal.SIGURG, signal.SIGWINCH, signal.SIGTSTP, signal.SIGTTIN,
                            signal.SIGTTOU})
WORKER_STOPS = frozenset({signal.SIGSTOP})
# Signals after which a target may need a SIGCONT: a kernel stop, or a default-action job-control
# stop (which the kernel drops in an orphaned process group, so it may not stop at all).
STOPPING = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


def parse_signal(fault: Fault, key: str, name: Any) -> signal.Signals:
    try:
        return signal.Signals[name]
    except (KeyError, TypeError):  # TypeError: not even a string (a TOML table, a list)
        raise FaultError(f"{fault.where}: {key} = {name!r} is not a signal name "
                         f"(for example 'SIGKILL')") from None


def check_target(fault: Fault, name: str, key: str = "target") -> str:
    if not TARGET_PATTERN.fullmatch(name):
        raise FaultError(f"{fault.where}: {key} = {name!r} is not a target (coordinator, "
                         f"random_worker, stage:N or stage:N:replica:R)")
    return name


def worker_restarts(sig: signal.Signals) -> int | None:
    """Group restarts one such signal to a worker causes: 1, 0, or None (a stopped worker
    restarts only if it stays stopped past the heartbeat timeout)."""
    if sig in WORKER_IGNORES:
        return 0
    return None if sig in WORKER_STOPS else 1


def resolve(ctx: Context, fault: Fault, target: str) -> int | None:
    """The target's pid now, or None (recorded) when the run has no such process."""
    try:
        return ctx.target.pid(target)
    except (LookupError, OSError, ValueError) as error:
        ctx.history.record("target_gone", fault=fault.describe(), target=target,
                           reason=str(error))
        return None


def send(ctx: Context, fault: Fault, pid: int, sig: signal.Signals) -> bool:
    """Send one signal and record it; False (recorded) when the process is gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        ctx.history.record("target_gone", fault=fault.describe(), pid=pid, signal=sig.name)
        return False
    ctx.history.record("signal_sent", fault=fault.describe(), pid=pid, signal=sig.name)
    return True


class OwnedThread:
    """A helper thread its fault always stops and joins; an exception inside it is kept and
    raised again by :meth:`stop`, so a broken fault fails loudly instead of doing nothing."""

    def __init__(self, name: str, body: Callable[[threading.Event], None]) -> None:
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self._body = body
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._body(self.stopping)
        except BaseException as error:  # noqa: BLE001 - handed to the owner in stop()
            self.error = error

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join()
        if self.error is not None:
            raise self.error

    def is_alive(self) -> bool:
        return self._thread.is_alive()
