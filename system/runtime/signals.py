"""Unix signals as run-control requests.

Why this design: a Python signal handler runs only when the main thread next executes bytecode,
and the kernel may deliver a process-directed signal to any thread. A main thread blocked in
``Event.wait()`` or ``Queue.get()`` would then react late or never; and when several signals
arrive between two bytecodes, Python runs their handlers in signal-number order, not arrival
order (a SIGTSTP then SIGCONT would look like SIGCONT then SIGTSTP). So the handlers do nothing
themselves: ``signal.set_wakeup_fd`` makes the C-level handler write each signal's number to a
pipe, in arrival order, and the coordinator's main thread — which only ever waits in ``poll`` with
that pipe among its fds — wakes at once, drains the pipe and folds the numbers into requests.
The requests take effect at the next step boundary. Alternatives rejected: ``signalfd`` (needs
every thread to block the signals, including threads of libraries we do not own) and flags polled
in time slices (latency, and the lost ordering above).

A burst of the same signal collapses into one request. Installation is a context manager that
restores the previous handlers and wake-up fd.

One more trap, which a signal storm shows: Python installs its C-level handler with an
empty ``sa_mask``, so a SIGCONT arriving while the SIGTSTP handler runs *nests* inside it and
writes its byte first: the pipe then says "CONT, TSTP" for a TSTP followed by a CONT, and a run
storm-ended with SIGCONT stays paused. So after installing the handlers we re-install the same C
handler with ``sa_mask`` holding every control signal (``sigaction`` through ctypes): the kernel
then delivers them one at a time, and the bytes keep the delivery order.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pipetrain.threads import CONTROL_SIGNALS


@dataclass
class Requests:
    """What the signals received so far ask for. Cleared by whoever acts on them.

    ``cont_checkpoints``: SIGCONT also asks for a checkpoint (under mpirun it is the first
    signal of the kill sequence, a quarter of a second before SIGTERM).
    """

    checkpoint: bool = False     # SIGUSR1
    epoch_stop: bool = False     # SIGUSR2
    paused: bool = False         # SIGTSTP sets, SIGCONT clears: the last one wins
    stop: bool = False           # SIGTERM or a first SIGINT
    abort: bool = False          # a second SIGINT
    interrupts: int = 0
    received: int = 0
    cont_checkpoints: bool = False

    def apply(self, signum: int) -> None:
        self.received += 1
        match signum:
            case signal.SIGUSR1:
                self.checkpoint = True
            case signal.SIGUSR2:
                self.epoch_stop = True
            case signal.SIGTSTP:
                self.paused = True
            case signal.SIGCONT:
                self.paused = False
                self.checkpoint = self.checkpoint or self.cont_checkpoints
            case signal.SIGTERM:
                self.stop = True
            case signal.SIGINT:
                self.interrupts += 1
                self.stop = True
                self.abort = self.interrupts >= 2


class SignalControl:
    def __init__(self) -> None:
        self.requests = Requests()
        self.installed = True  # the handlers are in place (see signal_control)
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # room for a storm of signals between two drains
            fcntl.fcntl(self._write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)

    def fileno(self) -> int:
        return self._read_fd

    def drain(self) -> Requests:
        """Fold every signal received since the last drain, in arrival order."""
        while True:
            try:
                data = os.read(self._read_fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            for signum in data:
                self.requests.apply(signum)
        return self.requests

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


class _Sigaction(ctypes.Structure):
    """glibc's ``struct sigaction`` (the same layout on x86-64 and aarch64)."""

    _fields_ = [("sa_handler", ctypes.c_void_p), ("sa_mask", ctypes.c_ulong * 16),
                ("sa_flags", ctypes.c_int), ("sa_restorer", ctypes.c_void_p)]


def serialise_handlers(signals: tuple[int, ...]) -> bool:
    """Block every signal of ``signals`` while any of their handlers runs (no nesting).

    Keeps the installed handler and flags, only widens ``sa_mask``. Returns False where the
    C library cannot be reached this way (then nesting stays possible, as before).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for sig in signals:
            action = _Sigaction()
            if libc.sigaction(sig, None, ctypes.byref(action)) != 0:
                return False
            for other in signals:
                libc.sigaddset(ctypes.byref(action, _Sigaction.sa_mask.offset), other)
            if libc.sigaction(sig, ctypes.byref(action), None) != 0:
                return False
    except (OSError, AttributeError):
        return False
    return True


def _noop(signum: int, frame: object) -> None:
    """The work is done by the wake-up fd; a Python handler must exist to replace the default
    action (SIGTSTP would stop the process, SIGTERM and SIGINT would end it)."""


@contextlib.contextmanager
def signal_control() -> Iterator[SignalControl]:
    """Run control by signal for the duration; off the main thread (where Python cannot install
    handlers: a script's worker thread, some notebook runners) none, with ``installed`` False,
    so that the caller can say so instead of failing."""
    control = SignalControl()
    if threading.current_thread() is not threading.main_thread():
        control.installed = False
        try:
            yield control
        finally:
            control.close()
        return
    previous = {sig: signal.signal(sig, _noop) for sig in CONTROL_SIGNALS}
    serialise_handlers(CONTROL_SIGNALS)
    previous_fd = signal.set_wakeup_fd(control._write_fd, warn_on_full_buffer=False)
    try:
        yield control
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        control.close()


# A terminal's Ctrl-C and Ctrl-Z reach the whole foreground process group; in a worker they
# would kill or stop one stage behind the coordinator's back.
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def ignore_job_control() -> None:
    """In a worker: leave the terminal's interrupt and job-control stops to the coordinator."""
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
