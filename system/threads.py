"""The run-control signals, and helper threads that never take them.

Python runs signal handlers in the main thread only, but the kernel may deliver a
process-directed signal to any thread that does not block it; the C-level handler then runs
there, and two signals handled on two threads at once can reach the main loop out of order
(see ``pipetrain.runtime.signals``). So every helper thread blocks the control signals (and
SIGCHLD) for its whole life, and the kernel leaves them to the main thread.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

# The signals that control a run (the contract's table), in one place.
CONTROL_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGUSR1, signal.SIGUSR2, signal.SIGTSTP, signal.SIGCONT, signal.SIGTERM,
    signal.SIGINT,
)
HELPER_BLOCKED = frozenset({*CONTROL_SIGNALS, signal.SIGCHLD})


def block_control_signals() -> None:
    """Block the control signals in the calling thread (call it first thing in a helper)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELPER_BLOCKED)


def start_helper(target: Callable[..., Any], *, name: str, args: tuple = ()) -> threading.Thread:
    """Start a non-daemon thread running ``target(*args)`` with the control signals blocked.

    The caller owns it: whoever starts a helper joins it.
    """

    def run() -> None:
        block_control_signals()
        target(*args)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


def leftover_threads(allowed: tuple[str, ...] = ()) -> list[str]:
    """Threads still alive besides the main thread (and those named in ``allowed``)."""
    return [t.name for t in threading.enumerate()
            if t is not threading.main_thread() and t.name not in allowed]
