"""The machine and its load: who else is busy, what the suite runs on (``results.json``)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from . import fair


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_for_idle(threshold: float, max_wait_s: float, poll_s: float = 15.0) -> dict:
    start = os.getloadavg()[0]
    started = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - started < max_wait_s:
        log(f"waiting for the 1-minute load average ({os.getloadavg()[0]:.2f}) to fall below "
            f"{threshold} ({time.monotonic() - started:.0f} of {max_wait_s:.0f} s)")
        time.sleep(min(poll_s, max(0.1, max_wait_s - (time.monotonic() - started))))
    now = os.getloadavg()[0]
    return {"threshold": threshold, "max_wait_s": max_wait_s, "load_before_wait": start,
            "waited_s": round(time.monotonic() - started, 1), "load_after_wait": now,
            "reached": now < threshold}


def cpu_busy(window_s: float) -> float:
    """Fraction of all cores busy over ``window_s`` (from /proc/stat). Called between runs, when
    this suite runs nothing itself, it measures what other processes are doing."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    total0, idle0 = sample()
    time.sleep(window_s)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


class QuietGate:
    """Before each measurement: wait while other processes keep more than ``max_busy`` of the
    machine busy (this is a shared machine), within a total ``budget_s``; every wait and the
    busy fraction seen right before each run are recorded with the results."""

    def __init__(self, max_busy: float, budget_s: float, window_s: float = 0.5) -> None:
        self.max_busy, self.budget_s, self.window_s = max_busy, budget_s, window_s
        self.waited_s = 0.0
        self.waits = 0

    def __call__(self, what: str) -> float | None:
        if self.budget_s <= 0:
            return None
        try:
            busy = cpu_busy(self.window_s)
        except (OSError, ValueError, IndexError):
            return None
        logged = False
        while busy > self.max_busy and self.waited_s < self.budget_s:
            if not logged:
                log(f"  waiting before {what}: other processes keep {busy:.0%} of the CPUs busy")
                logged = True
                self.waits += 1
            time.sleep(2.0)
            self.waited_s += 2.0 + self.window_s
            busy = cpu_busy(self.window_s)
        return round(busy, 3)

    def summary(self) -> dict:
        return {"max_busy": self.max_busy, "budget_s": self.budget_s, "waits": self.waits,
                "waited_s": round(self.waited_s, 1),
                "budget_exhausted": self.budget_s > 0 and self.waited_s >= self.budget_s}


def machine_info(with_torch: bool = False) -> dict:
    info: dict = {"platform": platform.platform(), "python": platform.python_version(),
                  "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
        info["pipe_max_size"] = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        pass
    import numpy

    info["numpy"] = numpy.__version__
    try:
        from threadpoolctl import threadpool_info

        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if blas:
            info["blas"] = {k: blas[0].get(k) for k in ("internal_api", "version",
                                                        "architecture", "threading_layer")}
    except ImportError:
        pass
    from .torch_baselines import torch_version

    info["torch"] = torch_version()
    try:
        import matplotlib

        info["matplotlib"] = matplotlib.__version__
    except ImportError:
        info["matplotlib"] = None
    info["env"] = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
                                              "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")
                   if k in os.environ}
    info["blas_environment"] = fair.blas_environment()
    info["kernels"] = fair.kernels(with_torch)
    return info
