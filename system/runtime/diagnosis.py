"""Naming the worker that failed, and why, in one line a user can act on.

A worker that loses a neighbour's link reports it as a *consequence*; the coordinator then looks
for the neighbour that really died and blames it, with its last words (the error it managed to
send before exiting), instead of the bystander. Every message names the role (stage, replica,
layers), the pid, how the process ended and where its log is. A worker that fails before it
was ready is a :class:`StartupFailed`: no restart would help it, and its message carries the
last lines of its log.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

from pipetrain.runtime import messages
from pipetrain.runtime.launcher import Launcher, WorkerHandle
from pipetrain.wire.channel import ChannelClosed, ChannelTimeout
from pipetrain.wire.frames import Kind, ProtocolError

# A worker's exit closes its pipes an instant before it becomes reapable: allow that instant.
ROOT_CAUSE_GRACE_S = 0.5
LOG_TAIL_LINES = 6


class WorkerFailed(RuntimeError):
    """A stage died, reported an error or stopped answering; the message names it and
    ``worker`` is the one blamed (None when no single worker is)."""

    def __init__(self, message: str, worker: WorkerHandle | None = None) -> None:
        super().__init__(message)
        self.worker = worker


class StartupFailed(WorkerFailed):
    """A worker failed before it was ready (an import error, a bad dataset): the run fails at
    once instead of spending restarts on it."""


def failure(worker: WorkerHandle, reason: str, launcher: Launcher) -> WorkerFailed:
    code = worker.process.poll()
    if code is None and ("exited" in reason or not worker.ready):  # its last words, logged
        try:
            code = worker.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
    status = ""
    if code is not None:
        status = f" (killed by signal {-code})" if code < 0 else f" (exit status {code})"
    where = launcher.where(worker)
    if not worker.ready and (code is None or code >= 0):  # killed by a signal: not its fault
        tail = log_tail(worker.log_path)
        lines = "".join(f"\n    {line}" for line in tail)
        return StartupFailed(f"{worker.role}, pid {worker.process.pid}: failed while starting: "
                             f"{reason}{where}{status}; last lines of {worker.log_path}:"
                             f"{lines or ' (empty)'}", worker)
    return WorkerFailed(f"{worker.role}, pid {worker.process.pid}: {reason}{where}{status}; "
                        f"log: {worker.log_path}", worker)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last non-empty lines of a log (none if it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 8192))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def last_words(worker: WorkerHandle) -> tuple[str | None, bool | None]:
    """(error message, whether it was a consequence) that a dead worker left in its pipe."""
    with contextlib.suppress(ChannelClosed, ChannelTimeout, ProtocolError, ValueError):
        while True:
            frame = worker.control.recv_frame(timeout_s=0.05)
            if frame.kind != Kind.CONTROL:
                continue
            message = messages.decode(frame.array)
            if isinstance(message, messages.Failed):
                worker.last_error = message.message
                return message.message, message.consequence
    return None, None


def root_cause(reporter: WorkerHandle, workers: list[WorkerHandle],
               launcher: Launcher) -> WorkerFailed:
    """``reporter`` lost a neighbour's link: blame the worker that died, if one did."""
    deadline = time.monotonic() + ROOT_CAUSE_GRACE_S
    while True:
        dead = [w for w in workers if w is not reporter and w.process.poll() is not None]
        if dead:
            # Prefer a worker that found a problem itself, then one that died silently.
            words = [(w, *last_words(w)) for w in dead]
            words.sort(key=lambda item: {False: 0, None: 1, True: 2}[item[2]])
            worker, said, _ = words[0]
            return failure(worker, f"{said or 'exited without a word'}; "
                           f"{reporter.role} lost its pipe as a result", launcher)
        if time.monotonic() > deadline:
            return failure(reporter, reporter.last_error or "unknown error", launcher)
        time.sleep(0.01)
