"""pipetrain_harness.monitor: sampling real processes, the owned thread, and the leak report."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from pipetrain_harness.monitor import MARKER_ENV, Baseline, Monitor, fd_growth, role_of

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def gone_or_zombie(pid: int) -> bool:
    """Gone, or a zombie of an init that does not reap (some containers): never running."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def sleeper():
    child = subprocess.Popen(SLEEPER, stdin=subprocess.DEVNULL)
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_samples_the_child_and_stop_joins(sleeper):
    monitor = Monitor(sleeper.pid, interval_s=0.05)
    monitor.start()
    try:
        wait_until(lambda: len(monitor.timeline(sleeper.pid)) >= 3, what="three samples")
    finally:
        started = time.monotonic()
        monitor.stop()
        assert time.monotonic() - started < 1.0, "stop() waits on an Event, not a sleep"
    assert not any(t.name == "monitor" for t in threading.enumerate())
    timeline = monitor.timeline(sleeper.pid)
    sample = timeline[-1]
    assert sample["role"] == sample["name"] and sample["name"].startswith("python")
    assert sample["rss"] > 0 and sample["num_threads"] >= 1 and sample["num_fds"] >= 3
    assert sample["status"] in (psutil.STATUS_SLEEPING, psutil.STATUS_RUNNING)
    assert sample["ppid"] == os.getpid() and sample["ctx_switches"] >= 0
    assert {"t", "pid", "cpu_percent", "uss", "create_time"} <= set(sample)
    assert monitor.seen[sleeper.pid]["cmdline"] == SLEEPER
    assert monitor.peak_rss_mb()[sleeper.pid] > 1
    times = [s["t"] for s in timeline]
    assert times == sorted(times)
    n = len(monitor.samples)
    time.sleep(0.15)
    assert len(monitor.samples) == n, "no sampling after stop()"


def test_roles():
    assert role_of([sys.executable, "-m", "pipetrain.cli", "train", "--quiet"], "python3") \
        == "coordinator"
    assert role_of(["/usr/bin/pipetrain", "train"], "pipetrain") == "coordinator"
    assert role_of([sys.executable, "-m", "pipetrain.runtime.worker", "5", "6"],
                   "python3") == "worker"
    assert role_of([sys.executable, "-P", "-m", "pipetrain_harness.entry", "worker", "5", "6"],
                   "python3") == "worker"
    assert role_of([sys.executable, "-P", "-m", "pipetrain_harness.entry", "train"],
                   "python3") == "coordinator"
    assert role_of(["sleep", "300"], "sleep") == "sleep"
    # Once a process has set its title (psutil splits a title without NULs on spaces):
    assert role_of(["pipetrain:", "stage", "1/3", "replica", "0"], "python3") \
        == "stage 1/3 replica 0"
    assert role_of(["pipetrain: stage 0/2 replica 1"], "python3") == "stage 0/2 replica 1"
    assert role_of(["pipetrain:", "coordinator", "runs/x"], "python3") == "coordinator"
    assert role_of(["pipetrain:", "worker", "(starting)"], "python3") == "worker (starting)"


def test_orphaned_grandchild_is_reported_and_reaped(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        grandchild = subprocess.Popen({SLEEPER!r}, start_new_session=True,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        open({str(pid_file)!r}, "w").write(str(grandchild.pid))
        time.sleep(30)
    """)
    baseline = Baseline.capture()
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.DEVNULL)
    monitor = Monitor(child.pid, interval_s=0.05)
    monitor.start()
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), what="the grandchild")
        grandchild = int(pid_file.read_text())
        wait_until(lambda: grandchild in monitor.seen, what="the monitor to see the grandchild")
        child.kill()
        child.wait()
        time.sleep(0.15)  # the orphan stays watched after it left the tree
    finally:
        monitor.stop()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert psutil.Process(grandchild).ppid() != child.pid
    leaks = monitor.leak_report(baseline)
    left = [line for line in leaks if f"pid {grandchild} " in line]
    assert left and left[0].startswith("process left behind:"), leaks
    assert not any(f"pid {child.pid} " in line for line in leaks), "the child was waited for"
    assert grandchild in monitor.reap_leftovers()
    assert gone_or_zombie(grandchild)
    assert not any(f"pid {grandchild} " in line for line in monitor.leak_report(baseline))


def test_marked_descendants_are_found_without_a_sample(tmp_path):
    """A grandchild orphaned before any sample is found by the token in its environment."""
    baseline = Baseline.capture()
    script = textwrap.dedent(f"""
        import subprocess
        p = subprocess.Popen({SLEEPER!r}, start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(p.pid)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, **baseline.env()}, check=True)
    grandchild = int(result.stdout)
    monitor = Monitor(os.getpid() + 10**7)  # a root that never existed: nothing sampled
    try:
        leaks = monitor.leak_report(baseline)
        assert any(line.startswith(f"process left behind: pid {grandchild} ") for line in leaks)
    finally:
        monitor.reap_leftovers()
    assert gone_or_zombie(grandchild)
    assert MARKER_ENV not in os.environ


def test_harness_fd_and_shared_memory_left_open(tmp_path):
    baseline = Baseline.capture()
    monitor = Monitor(os.getpid() + 10**7)
    fd = os.open(tmp_path / "held", os.O_CREAT | os.O_WRONLY)
    try:
        leaks = monitor.leak_report(baseline)
    finally:
        os.close(fd)
    assert any(line.startswith(f"fd left open in the harness: fd {fd} ") and "held" in line
               for line in leaks), leaks
    assert monitor.leak_report(baseline) == []


def test_fd_growth_on_synthetic_samples():
    samples = [
        {"t": 1.0, "pid": 10, "role": "worker", "num_fds": 8, "create_time": 5.0, "rss": 10},
        {"t": 1.0, "pid": 11, "role": "worker", "num_fds": 8, "create_time": 5.0, "rss": 30},
        {"t": 2.0, "pid": 10, "role": "worker", "num_fds": 58, "create_time": 5.0, "rss": 20},
        {"t": 2.0, "pid": 11, "role": "worker", "num_fds": 24, "create_time": 5.0, "rss": 40},
        {"t": 2.0, "pid": 12, "role": "coordinator", "num_fds": None, "create_time": 6.0},
    ]
    assert fd_growth(samples) == ["fd leak: pid 10 (worker) went from 8 to 58 open fds"]
    monitor = Monitor(os.getpid() + 10**7)
    monitor.samples = samples
    assert monitor.leak_report(Baseline.capture()) == fd_growth(samples)
    assert monitor.peak_rss_mb() == {10: 20 / 2**20, 11: 40 / 2**20}
    assert [s["t"] for s in monitor.timeline(10)] == [1.0, 2.0]
    # A reused pid is another process: its fds are not compared with the first one's.
    reused = [{**samples[0]}, {**samples[2], "create_time": 9.0}]
    assert fd_growth(reused) == []


def test_unreaped_child_is_a_zombie(sleeper):
    baseline = Baseline.capture()
    monitor = Monitor(sleeper.pid)
    assert [s["pid"] for s in monitor.sample()] == [sleeper.pid]
    sleeper.send_signal(9)
    wait_until(lambda: psutil.Process(sleeper.pid).status() == psutil.STATUS_ZOMBIE,
               what="the zombie")
    assert monitor.sample()[0]["status"] == psutil.STATUS_ZOMBIE
    leaks = monitor.leak_report(baseline)
    assert leaks == [f"zombie: pid {sleeper.pid} ({monitor.seen[sleeper.pid]['role']}) "
                     f"{' '.join(SLEEPER)}"], leaks
    assert monitor.reap_leftovers() == [sleeper.pid]  # reaps our own child
    assert not psutil.pid_exists(sleeper.pid)
