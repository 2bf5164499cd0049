"""pipetrain_harness.probes: every process samples itself as it starts and as it exits, so an fd
it leaked is seen however short its life."""

from __future__ import annotations

import subprocess
import sys

from pipetrain_harness import probes

CHILD = """
import os, sys
from pipetrain_harness import probes
path, leak = sys.argv[1], int(sys.argv[2])
probes.take(path, "start", "worker")
held = [os.open(os.devnull, os.O_RDONLY) for _ in range(leak)]
probes.take(path, "exit", "worker")
"""


def run_child(path, leak: int) -> None:
    subprocess.run([sys.executable, "-c", CHILD, str(path), str(leak)], check=True, timeout=60)


def test_a_short_lived_process_that_leaks_is_caught(tmp_path):
    path = tmp_path / "probes.jsonl"
    run_child(path, leak=5)  # lives a few milliseconds: the 0.2 s monitor would not see it
    start, end = probes.read(path)
    assert (start["when"], end["when"]) == ("start", "exit")
    assert (start["pid"], start["create_time"]) == (end["pid"], end["create_time"])
    assert end["num_fds"] - start["num_fds"] == 5
    [leak] = probes.fd_leaks([start, end])
    assert f"pid {end['pid']} (worker) exited with" in leak and "/dev/null" in leak
    assert probes.exited_cleanly([start, end]) == {(end["pid"], end["create_time"])}


def test_a_process_that_closes_what_it_opened_is_not(tmp_path):
    path = tmp_path / "probes.jsonl"
    run_child(path, leak=0)
    run_child(path, leak=probes.EXIT_FD_ALLOWANCE)  # within the allowance
    assert len(probes.read(path)) == 4
    assert probes.fd_leaks(probes.read(path)) == []


def test_a_killed_process_has_no_exit_sample_and_is_left_to_the_monitor():
    start = {"when": "start", "pid": 1, "create_time": 1.0, "num_fds": 3, "fds": {}}
    assert probes.fd_leaks([start]) == [] and probes.exited_cleanly([start]) == set()


def test_without_a_path_nothing_is_written(tmp_path):
    probes.take("", "start", "worker")
    assert list(tmp_path.iterdir()) == []
