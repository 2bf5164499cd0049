"""One coordinator per run directory: a ``flock`` held for the run's whole life.

The coordinator takes an exclusive ``flock`` on ``RUN_DIR/lock`` before it writes anything and
keeps it until it exits (the kernel drops it when the process dies, however it dies, so a lock
left by a dead coordinator is simply taken over; the file also names the holder's pid and start
time, for messages). A second ``train`` or ``--resume`` on a live run is refused at once.

The same lock tells ``pipetrain pause|resume|checkpoint|stop`` whom to signal: only the process
that holds it (``/proc/locks``), if it is the pid ``run.json`` names and its start time (clock
ticks after boot, ``/proc/PID/stat``) is the one recorded. A stale ``run.json`` (the
coordinator died, its pid reused) or a forged one gets one line and no signal, and the signal
goes through a pidfd opened before the last check, so a pid reused in between is not hit either.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
from pathlib import Path

from pipetrain.run.storage import RunDirError

LOCK_NAME = "lock"


class RunDirBusy(RunDirError):
    """Another live coordinator holds the run directory."""


class NotTheCoordinator(RunDirError):
    """``run.json`` does not name the live coordinator of the run: no signal is sent."""


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot (None: no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    return int(text[text.rindex(")") + 2:].split()[19])  # field 22; the name may hold spaces


class RunLock:
    """The coordinator's lock on a run directory (taken by :meth:`acquire`)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunDirError(f"{self.path.parent}: cannot be used as a run directory "
                              f"({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise busy(self.path.parent, lock_holder(self.path.parent)) from None
            raise RunDirError(f"{self.path}: cannot be locked ({exc.strerror})") from None
        self._fd = fd
        record = json.dumps({"pid": os.getpid(), "start_ticks": start_ticks(os.getpid())})
        with contextlib.suppress(OSError):  # a full disk: the lock itself still holds
            os.ftruncate(fd, 0)
            os.pwrite(fd, (record + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only fd of the lock drops it
            self._fd = None


def busy(run_dir: Path, pid: int | None) -> RunDirBusy:
    who = f"pid {pid}" if pid else "another process"
    return RunDirBusy(f"{run_dir}: in use by a running coordinator ({who}); stop it with "
                      f"`pipetrain stop {run_dir}` or use another --run-dir")


def lock_holder(run_dir: Path) -> int | None:
    """The pid holding ``run_dir``'s lock (None when nobody does), from ``/proc/locks``."""
    path = Path(run_dir) / LOCK_NAME
    try:
        info = os.stat(path)
        with open("/proc/locks", encoding="ascii") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    inode = str(info.st_ino)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{inode}"
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->" or parts[1] != "FLOCK":
            continue
        if parts[5] == device:
            return int(parts[4])
    return None


def signal_coordinator(run_dir: Path, pid: int, recorded_ticks: int | None,
                       sig: signal.Signals) -> None:
    """Send ``sig`` to the coordinator ``run.json`` names, if it is the one holding the run
    directory; otherwise raise :class:`NotTheCoordinator` and send nothing."""
    holder = lock_holder(run_dir)
    if holder is None:
        raise NotTheCoordinator(
            f"{run_dir}: no coordinator holds this run directory; run.json names pid {pid}, "
            f"which is not running it (a stale run.json: the run ended without saying so); "
            f"nothing was sent")
    if holder != pid:
        raise NotTheCoordinator(
            f"{run_dir}: run.json names pid {pid} but the run directory is held by pid "
            f"{holder}; nothing was sent (run.json stale or forged)")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotTheCoordinator(f"{run_dir}: coordinator pid {pid} is gone; nothing was "
                                "sent") from None
    try:
        if recorded_ticks is None or start_ticks(pid) != recorded_ticks:
            raise NotTheCoordinator(
                f"{run_dir}: pid {pid} holds the run directory but did not start when run.json "
                f"says it did; nothing was sent (run.json stale or forged)")
        signal.pidfd_send_signal(pidfd, sig)
    finally:
        os.close(pidfd)
