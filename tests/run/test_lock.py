"""pipetrain.run.lock: one coordinator per run directory, and signals only for it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from pipetrain.run.lock import (
    NotTheCoordinator,
    RunDirBusy,
    RunLock,
    lock_holder,
    signal_coordinator,
    start_ticks,
)
from tests.helpers import REPO, cli_env, run_cli

# A stand-in coordinator: takes the lock, says so, counts SIGUSR1s into a file, ends on stdin.
HOLDER = """
import os, signal, sys
from pathlib import Path
from pipetrain.run.lock import RunLock
lock = RunLock(Path(sys.argv[1])); lock.acquire()
got = Path(sys.argv[1]) / "got"
signal.signal(signal.SIGUSR1, lambda *a: got.write_text("SIGUSR1"))
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=cli_env())
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)
    proc.stdout.close()


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_lock_is_refused_naming_the_holder(tmp_path, holder):
    assert lock_holder(tmp_path) == holder.pid
    with pytest.raises(RunDirBusy, match=f"pid {holder.pid}.*pipetrain stop"):
        RunLock(tmp_path).acquire()


def test_the_lock_of_a_dead_coordinator_is_taken_over(tmp_path, holder):
    holder.kill()
    holder.wait()
    assert lock_holder(tmp_path) is None
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        record = json.loads((tmp_path / "lock").read_text())
        assert record["pid"] != holder.pid and record["start_ticks"] == start_ticks(
            record["pid"])
    finally:
        lock.release()
    assert lock_holder(tmp_path) is None


def test_the_live_coordinator_gets_the_signal(tmp_path, holder):
    signal_coordinator(tmp_path, holder.pid, start_ticks(holder.pid), signal.SIGUSR1)
    holder.stdin.close()
    holder.wait(timeout=30)
    assert (tmp_path / "got").read_text() == "SIGUSR1"


def test_a_run_json_naming_another_process_sends_nothing(tmp_path, holder, sleeper):
    with pytest.raises(NotTheCoordinator, match=f"names pid {sleeper.pid}.*held by pid "
                       f"{holder.pid}"):
        signal_coordinator(tmp_path, sleeper.pid, start_ticks(sleeper.pid), signal.SIGTERM)
    assert sleeper.poll() is None


def test_a_reused_pid_is_not_the_coordinator(tmp_path, holder):
    with pytest.raises(NotTheCoordinator, match="did not start when"):
        signal_coordinator(tmp_path, holder.pid, start_ticks(holder.pid) - 1, signal.SIGUSR1)
    assert not (tmp_path / "got").exists()


def test_stale_run_json_with_no_coordinator_sends_nothing(tmp_path, sleeper):
    (tmp_path / "lock").write_text("{}")
    with pytest.raises(NotTheCoordinator, match="no coordinator holds"):
        signal_coordinator(tmp_path, sleeper.pid, start_ticks(sleeper.pid), signal.SIGTERM)
    assert sleeper.poll() is None


@pytest.mark.parametrize("command", ["stop", "pause", "resume", "checkpoint"])
def test_pipetrain_stop_with_a_forged_run_json_leaves_that_process_alone(tmp_path, sleeper,
                                                                         command):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({
        "state": "running", "coordinator_pid": sleeper.pid,
        "coordinator_start_ticks": start_ticks(sleeper.pid)}))
    result = run_cli(command, str(run_dir))
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "nothing was sent" in result.stderr and str(sleeper.pid) in result.stderr
    assert sleeper.poll() is None, "the named process was signalled"
