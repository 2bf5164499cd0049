"""The monitor: one psutil sampler thread over every process of the run, and the leak report.

::

    harness main thread                      sampler thread (owned: started by start(),
      Baseline.capture()  (fds, /dev/shm)      joined by stop(), control signals blocked)
      launch the run ──▶ Monitor(pid).start()    every interval_s: the roots, all their
      ... run ...                                descendants and every process seen before
      Monitor.stop()                             ──▶ samples (one dict per process per tick)
      leak_report(baseline), reap_leftovers()

Processes are identified by (pid, create_time): a pid the kernel hands out again after the run
is a different process, and must not be reported or killed as one of ours. Processes that were
seen once are followed after they leave the tree (an orphan is reparented away from the run),
so the leak report still finds them. A process forked and orphaned between two samples is
invisible to the tree walk; for those the launch environment can carry ``Baseline.env()``, a
unique token every descendant inherits, and the leak report also looks for it in /proc.

Sampling from outside cannot judge the fds of a process that lives less than two ticks; every
process of a run also samples itself as it starts and as it exits (``pipetrain_harness.probes``),
and ``leak_report`` leaves the fds of the processes judged that way to those samples.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from pipetrain.threads import block_control_signals

MARKER_ENV = "PIPETRAIN_HARNESS_TOKEN"
FD_GROWTH_LIMIT = 16  # more new fds than this over a process's life counts as a leak
MB = 1024 * 1024


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd that listdir itself used, closed by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


@dataclass
class Baseline:
    """What the harness process had before the launch: its open fds and /dev/shm entries."""

    fds: dict[int, str] = field(default_factory=dict)
    shm: set[str] = field(default_factory=set)
    marker: str = field(default_factory=lambda: secrets.token_hex(8))

    @classmethod
    def capture(cls) -> Baseline:
        return cls(fds=_open_fds(), shm=_shm_entries())

    def env(self) -> dict[str, str]:
        """Put into the launch environment: lets the leak report find detached descendants."""
        return {MARKER_ENV: self.marker}


TITLE = "pipetrain: "


def role_of(cmdline: list[str], name: str) -> str:
    """A pipetrain process's role: its title once it set one (``stage 1/3 replica 0``,
    ``coordinator runs/x``: see ``pipetrain.runtime.proctitle``), else ``coordinator`` or
    ``worker`` from its command line; any other process's name."""
    title = " ".join(cmdline)
    if title.startswith(TITLE):
        role = title[len(TITLE):].strip()
        return "coordinator" if role.startswith("coordinator") else role
    if "pipetrain.runtime.worker" in cmdline or (
            "pipetrain_harness.entry" in cmdline and "worker" in cmdline):
        return "worker"
    if ({"pipetrain", "pipetrain.cli", "pipetrain_harness.entry"} & set(cmdline)
            or any(os.path.basename(arg) == "pipetrain" for arg in cmdline[:2])):
        return "coordinator"
    return name


class Monitor:
    def __init__(self, root_pid: int, interval_s: float = 0.2) -> None:
        self.roots = [root_pid]
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self.seen: dict[int, dict[str, Any]] = {}
        self.errors: list[str] = []  # unexpected sampling failures (the first few)
        self._procs: dict[int, psutil.Process] = {}  # cached, so cpu_percent has a baseline
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the sampler thread ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("monitor already started")
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=False)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (at once: the thread waits on an Event) and join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def add_root(self, pid: int) -> None:
        """Sample another process tree too (a relaunch of the run)."""
        with self._lock:
            self.roots.append(pid)

    def _run(self) -> None:
        block_control_signals()
        while True:
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a bad tick must not end the monitor
                if len(self.errors) < 10:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            if self._stop.wait(self.interval_s):
                return

    # -- sampling ------------------------------------------------------------------------------

    def _cached(self, proc: psutil.Process) -> psutil.Process | None:
        """The cached Process for ``proc``'s pid, replaced if the pid now names another one."""
        try:
            created = proc.create_time()
        except psutil.Error:
            return None
        cached = self._procs.get(proc.pid)
        if cached is None or cached.create_time() != created:
            cached = self._procs[proc.pid] = proc
        return cached

    def _targets(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        with self._lock:
            roots = list(self.roots)
        for pid in roots:
            try:
                root = self._procs.get(pid) or psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
            if root.is_running():
                found.setdefault(pid, root)
        # Processes seen before stay watched after they leave the tree (orphans).
        for pid, proc in list(self._procs.items()):
            if proc.is_running():
                found.setdefault(pid, proc)
        for proc in list(found.values()):
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
        return [p for p in (self._cached(proc) for proc in found.values()) if p is not None]

    def sample(self) -> list[dict[str, Any]]:
        """One sample of every watched process (also called by the thread each tick)."""
        now = time.time()
        taken = []
        for proc in self._targets():
            record = _sample_one(proc, now)
            if record is None:
                continue
            if proc.pid not in self.seen or self.seen[proc.pid]["create_time"] != \
                    record["create_time"]:
                self.seen[proc.pid] = {
                    "pid": proc.pid, "ppid": record["ppid"], "name": record["name"],
                    "role": record["role"], "cmdline": record.pop("cmdline"),
                    "create_time": record["create_time"], "first_t": now,
                }
            else:
                record.pop("cmdline")
            taken.append(record)
        self.samples.extend(taken)
        return taken

    # -- summaries -----------------------------------------------------------------------------

    def peak_rss_mb(self) -> dict[int, float]:
        peaks: dict[int, float] = {}
        for sample in self.samples:
            if sample.get("rss") is not None:
                peaks[sample["pid"]] = max(peaks.get(sample["pid"], 0.0), sample["rss"] / MB)
        return peaks

    def timeline(self, pid: int) -> list[dict[str, Any]]:
        return [sample for sample in self.samples if sample["pid"] == pid]

    # -- after the run ---------------------------------------------------------------------------

    def _alive(self, info: dict[str, Any]) -> psutil.Process | None:
        """The process ``info`` describes if it still exists (same pid and create_time)."""
        try:
            proc = psutil.Process(info["pid"])
            if abs(proc.create_time() - info["create_time"]) > 0.01:
                return None
        except psutil.Error:
            return None
        return proc if info["pid"] != os.getpid() else None

    def _find_marked(self, marker: str) -> None:
        """Adds to ``seen`` every process whose environment carries the run's marker."""
        needle = f"{MARKER_ENV}={marker}".encode()
        for pid in psutil.pids():
            if pid == os.getpid() or pid in self.seen:
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as handle:
                    if needle not in handle.read().split(b"\0"):
                        continue
                proc = psutil.Process(pid)
                with proc.oneshot():
                    self.seen[pid] = {
                        "pid": pid, "ppid": proc.ppid(), "name": proc.name(),
                        "role": role_of(proc.cmdline(), proc.name()), "cmdline": proc.cmdline(),
                        "create_time": proc.create_time(), "first_t": time.time(),
                    }
            except (OSError, psutil.Error):
                continue

    def leak_report(self, baseline: Baseline,
                    judged: set[tuple[int, float]] = frozenset()) -> list[str]:
        """What the run left behind; call after it ended (and after ``stop``). Processes in
        ``judged`` ((pid, create_time)) had their fds judged from their own exit samples
        (``pipetrain_harness.probes``), which the monitor's samples could only approximate."""
        self._find_marked(baseline.marker)
        leaks = []
        for pid, info in sorted(self.seen.items()):
            proc = self._alive(info)
            if proc is None:
                continue
            what = f"pid {pid} ({info['role']}) {' '.join(info['cmdline'])[:200]}"
            try:
                zombie = proc.status() == psutil.STATUS_ZOMBIE
                # An orphan's zombie waits for init, and some container inits never reap: not
                # the run's doing. A zombie whose parent is alive is (that parent never waits).
                if zombie and proc.ppid() in (0, 1):
                    continue
            except psutil.Error:
                continue
            leaks.append(f"zombie: {what}" if zombie else f"process left behind: {what}")
        new_shm = sorted(_shm_entries() - baseline.shm)
        if new_shm:
            leaks.append(f"shared memory left behind: {', '.join(new_shm)}")
        for fd, target in sorted(_open_fds().items()):
            if baseline.fds.get(fd) != target:
                leaks.append(f"fd left open in the harness: fd {fd} -> {target}")
        leaks += fd_growth([s for s in self.samples
                            if (s["pid"], s.get("create_time")) not in judged])
        return leaks

    def reap_leftovers(self, timeout_s: float = 5.0) -> list[int]:
        """SIGKILL every seen process still alive and wait for it; returns the pids killed."""
        procs = []
        for info in self.seen.values():
            proc = self._alive(info)
            if proc is None:
                continue
            with contextlib.suppress(psutil.Error):
                proc.kill()
                procs.append(proc)
        _wait_gone(procs, timeout_s)
        return [proc.pid for proc in procs]


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> None:
    """Waits until each process is gone, reaping our own children. A zombie that is not our
    child cannot be reaped here: its parent, or init, will (some container inits never do, so
    waiting for it to vanish could take forever)."""
    deadline = time.monotonic() + timeout_s
    pending = list(procs)
    while pending and time.monotonic() < deadline:
        still = []
        for proc in pending:
            try:
                if proc.ppid() == os.getpid():
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                elif proc.status() != psutil.STATUS_ZOMBIE:
                    still.append(proc)
            except psutil.NoSuchProcess:
                pass
            except (psutil.TimeoutExpired, psutil.Error):
                still.append(proc)
        pending = still
        if pending:
            time.sleep(0.01)


def _sample_one(proc: psutil.Process, now: float) -> dict[str, Any] | None:
    try:
        with proc.oneshot():
            name = proc.name()
            try:
                cmdline = proc.cmdline()
            except psutil.ZombieProcess:
                cmdline = []
            record: dict[str, Any] = {
                "t": now, "pid": proc.pid, "ppid": proc.ppid(), "name": name,
                "role": role_of(cmdline, name), "create_time": proc.create_time(),
                "status": proc.status(), "cmdline": cmdline,
            }
            if record["status"] == psutil.STATUS_ZOMBIE:
                record.update(cpu_percent=0.0, rss=0, uss=None, num_threads=0, num_fds=None,
                              ctx_switches=None)
                return record
            record["cpu_percent"] = proc.cpu_percent(None)
            record["rss"] = proc.memory_info().rss
            try:
                record["uss"] = proc.memory_full_info().uss
            except (psutil.AccessDenied, psutil.ZombieProcess):
                record["uss"] = None
            record["num_threads"] = proc.num_threads()
            try:
                record["num_fds"] = proc.num_fds()
            except psutil.AccessDenied:
                record["num_fds"] = None
            switches = proc.num_ctx_switches()
            record["ctx_switches"] = switches.voluntary + switches.involuntary
            return record
    except psutil.Error:  # gone (or became unreadable) while being sampled
        return None


def fd_growth(samples: list[dict[str, Any]], limit: int = FD_GROWTH_LIMIT) -> list[str]:
    """"fd leak" lines for processes whose open fds rose by more than ``limit`` between their
    first and their last sample."""
    first: dict[tuple[int, Any], dict[str, Any]] = {}
    last: dict[tuple[int, Any], dict[str, Any]] = {}
    for sample in samples:
        if sample.get("num_fds") is None:
            continue
        key = (sample["pid"], sample.get("create_time"))
        first.setdefault(key, sample)
        last[key] = sample
    leaks = []
    for key, start in first.items():
        end = last[key]
        if end["num_fds"] - start["num_fds"] > limit:
            leaks.append(f"fd leak: pid {key[0]} ({start.get('role', '?')}) went from "
                         f"{start['num_fds']} to {end['num_fds']} open fds")
    return leaks
