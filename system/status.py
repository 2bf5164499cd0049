"""Exit statuses and run states, each defined once, and the error type of a user's mistake."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What ``pipetrain`` and its worker processes exit with."""

    OK = 0              # done, or stopped on request
    FAILED = 1          # the run failed; the message says why
    USAGE = 2           # a bad option, config, dataset or run directory: one line
    THREADS_LEFT = 4    # a worker whose threads were not all joined at exit
    ABORTED = 130       # a second Ctrl-C


class RunState(enum.StrEnum):
    """``run.json``'s ``state``; the last four are also the ``status`` of ``run_end``."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    RECOVERING = "recovering"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"
    ABORTED = "aborted"


# A run in one of these states has a coordinator that can take a control signal.
ACTIVE_STATES = frozenset({RunState.STARTING, RunState.RUNNING, RunState.PAUSED,
                           RunState.RECOVERING})


class UserError(Exception):
    """A mistake of the user's: reported in one line, without a traceback, exit 2."""
