"""Leak checks that cannot miss a process: each one samples itself as it starts and just before
it exits, whatever its life's length.

The monitor samples every process every 0.2 s from outside, which is what the report's CPU and
memory plots need; but a worker that lives less than two samples shows no growth, and an fd it
leaked was once missed in CI that way. So every process of a run under test, started through
``pipetrain_harness.entry``, also appends one JSON line about itself to the plan's
``probe_path`` first thing (``start``) and last thing (``exit``): its pid and start time (the
monitor's key), its open fds with their targets, threads and RSS. A process that exits with more
fds open than it started with leaked them, and the line names each new one. A process that is
killed writes no exit line; the kernel closes its fds, and the monitor's samples judge it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

# Fds a process may hold at its exit beyond those it started with: none is needed by a clean
# exit; a little room for an interpreter that keeps a descriptor it opened lazily.
EXIT_FD_ALLOWANCE = 2


def _fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory listdir itself had open
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def sample(when: str, role: str) -> dict[str, Any]:
    me = psutil.Process()
    fds = _fds()
    return {"t": time.time(), "when": when, "pid": os.getpid(), "ppid": os.getppid(),
            "create_time": me.create_time(), "role": role, "argv": sys.argv[1:6],
            "num_fds": len(fds), "fds": {str(fd): target for fd, target in sorted(fds.items())},
            "num_threads": threading.active_count(), "rss": me.memory_info().rss}


def take(path: str, when: str, role: str) -> None:
    """Append this process's sample to ``path`` (one line, one write, O_APPEND)."""
    if not path:
        return
    line = json.dumps(sample(when, role)) + "\n"  # taken before the file is opened
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(path: Path) -> list[dict[str, Any]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def exited_cleanly(probes: list[dict[str, Any]]) -> set[tuple[int, float]]:
    """(pid, create_time) of every process that wrote an exit line."""
    return {(p["pid"], p["create_time"]) for p in probes if p["when"] == "exit"}


def fd_leaks(probes: list[dict[str, Any]],
             allowance: int = EXIT_FD_ALLOWANCE) -> list[str]:
    """One line per process that exited holding more fds than it started with."""
    starts = {(p["pid"], p["create_time"]): p for p in probes if p["when"] == "start"}
    leaks = []
    for probe in probes:
        start = starts.get((probe["pid"], probe["create_time"]))
        if probe["when"] != "exit" or start is None:
            continue
        grown = probe["num_fds"] - start["num_fds"]
        if grown > allowance:
            new = [f"{fd} -> {target}" for fd, target in probe["fds"].items()
                   if start["fds"].get(fd) != target]
            shown = ", ".join(new[:3]) + (f" and {len(new) - 3} more" if len(new) > 3 else "")
            leaks.append(f"fd leak: pid {probe['pid']} ({probe['role']}) exited with "
                         f"{probe['num_fds']} open fds, {grown} more than at its start "
                         f"({shown})")
    return leaks
