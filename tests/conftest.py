"""Every test must leave the machine as it found it: no child process, no zombie, no open fd,
no shared-memory segment, the signal handlers it started with, no stray thread."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import psutil
import pytest

WATCHED_SIGNALS = (
    signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTSTP,
    signal.SIGCONT, signal.SIGCHLD, signal.SIGHUP,
)


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listdir itself used, already closed
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def no_leaks():
    me = psutil.Process()
    fds_before = open_fds()
    shm_before = shm_entries()
    handlers_before = {sig: signal.getsignal(sig) for sig in WATCHED_SIGNALS}
    threads_before = set(threading.enumerate())
    yield
    problems = []
    # Children: give ones that are already exiting a moment, then kill and report the rest.
    deadline = time.monotonic() + 2.0
    children = me.children(recursive=True)
    while children and time.monotonic() < deadline:
        psutil.wait_procs(children, timeout=0.1)
        children = me.children(recursive=True)
    for child in me.children(recursive=True):
        try:
            state = child.status()
            problems.append(f"child process left behind: pid {child.pid} {state} "
                            f"{' '.join(child.cmdline()[:4])}")
            child.kill()
            child.wait(5)
        except psutil.Error:
            pass
    leaked = {fd: target for fd, target in open_fds().items()
              if fd not in fds_before or fds_before[fd] != target}
    for fd, target in sorted(leaked.items()):
        problems.append(f"fd {fd} left open: {target}")
        with contextlib.suppress(OSError):
            os.close(fd)
    new_shm = shm_entries() - shm_before
    if new_shm:
        problems.append(f"shared memory left behind: {sorted(new_shm)}")
    for sig, handler in handlers_before.items():
        if signal.getsignal(sig) != handler:
            problems.append(f"signal handler for {sig.name} not restored")
            signal.signal(sig, handler)
    stray = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    if stray:
        problems.append(f"threads left running: {[t.name for t in stray]}")
    if problems:
        pytest.fail("leak check: " + "; ".join(problems), pytrace=False)
