"""Killed, frozen and failing workers: the run recovers by itself and ends bitwise equal; a
worker that cannot even start fails the run at once."""

from __future__ import annotations

import os
import random
import signal

import psutil
import pytest

from pipetrain_harness.plan import Plan
from tests.helpers import (
    assert_bitwise_equal,
    assert_no_survivors,
    cli_env,
    events,
    finish,
    last_step,
    load_params,
    run_cli,
    run_state,
    start_cli,
    wait_for,
)

BASE = ["--epochs", "2", "--checkpoint-every", "8", "--quiet"]
SLOW = cli_env(Plan(step_delay_s=0.01))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    run_cli("reference", "--run-dir", str(run_dir), *BASE, check=True)
    return run_dir




# Every role (first, middle, last stage), three ways to die, both schedules.
KILLS = [
    (role, sig, schedule)
    for role, sig in [(0, signal.SIGKILL), (1, signal.SIGTERM), (2, signal.SIGSEGV),
                      (0, signal.SIGSEGV), (1, signal.SIGKILL), (2, signal.SIGTERM)]
    for schedule in ("1f1b", "gpipe")
]


@pytest.mark.parametrize("role,sig,schedule", KILLS)
def test_killed_worker_is_replaced_and_nothing_is_lost(tmp_path, reference, role, sig, schedule):
    run_dir = tmp_path / "train"
    at_step = random.Random(f"{role}{sig}{schedule}").randint(3, 35)
    proc = start_cli("train", "--run-dir", str(run_dir), "--schedule", schedule, *BASE, env=SLOW)
    try:
        wait_for(lambda: last_step(run_dir) >= at_step, timeout_s=60, what=f"step {at_step}")
        victim = run_state(run_dir)["worker_pids"][role]
        os.kill(victim, sig)
    finally:
        status = finish(proc)
    assert status == 0, proc
    restarts = [e for e in events(run_dir) if e["event"] == "restart"]
    assert len(restarts) == 1, restarts
    # Only the victim is replaced, from the in-memory state: at most one step is lost.
    assert restarts[0]["mode"] == "in_place" and restarts[0]["steps_lost"] <= 1, restarts
    assert restarts[0]["from_step"] >= at_step - 1 and restarts[0]["recovery_s"] > 0
    exits = [e for e in events(run_dir) if e["event"] == "worker_exit"]
    # SIGTERM asks a worker to leave cleanly (status 0), unless the group is torn down first
    # (SIGKILL); the other signals kill it outright.
    expected = (0, -signal.SIGKILL, -sig) if sig == signal.SIGTERM else (-sig,)
    victim_exit = next(e for e in exits if e["pid"] == victim)
    assert victim_exit["returncode"] in expected, victim_exit
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    assert_no_survivors(run_dir)


def test_frozen_worker_is_detected_within_the_heartbeat_timeout(tmp_path, reference):
    run_dir = tmp_path / "train"
    proc = start_cli("train", "--run-dir", str(run_dir), "--heartbeat-timeout", "2", *BASE,
                     env=SLOW)
    try:
        wait_for(lambda: last_step(run_dir) >= 10, timeout_s=60, what="step 10")
        frozen = run_state(run_dir)["worker_pids"][1]
        os.kill(frozen, signal.SIGSTOP)
    finally:
        status = finish(proc)
    assert status == 0
    restart = next(e for e in events(run_dir) if e["event"] == "restart")
    assert "no heartbeat" in restart["cause"] and "stage 1" in restart["cause"]
    assert restart["recovery_s"] < 10 and restart["mode"] == "in_place"
    assert not psutil.pid_exists(frozen) or psutil.Process(frozen).status() == "zombie"
    assert_bitwise_equal(load_params(run_dir), load_params(reference))


def test_short_freeze_is_not_a_failure(tmp_path, reference):
    run_dir = tmp_path / "train"
    proc = start_cli("train", "--run-dir", str(run_dir), "--heartbeat-timeout", "5", *BASE,
                     env=SLOW)
    try:
        wait_for(lambda: last_step(run_dir) >= 10, timeout_s=60, what="step 10")
        pid = run_state(run_dir)["worker_pids"][1]
        os.kill(pid, signal.SIGSTOP)
        frozen_at = last_step(run_dir)
        # The pipeline cannot advance while a stage is stopped: wait until that is visible
        # (two more steps would be impossible), then let it go well inside the timeout.
        with pytest.raises(AssertionError):
            wait_for(lambda: last_step(run_dir) > frozen_at + 1, timeout_s=0.5, what="no step")
        os.kill(pid, signal.SIGCONT)
    finally:
        status = finish(proc)
    assert status == 0
    assert not [e for e in events(run_dir) if e["event"] == "restart"]
    assert_bitwise_equal(load_params(run_dir), load_params(reference))


def test_hung_worker_main_thread_is_detected(tmp_path, reference):
    """A worker whose main thread hangs (its heartbeat thread still alive) goes silent."""
    run_dir = tmp_path / "train"
    result = run_cli("train", "--run-dir", str(run_dir), "--heartbeat-timeout", "2", *BASE,
                     env=cli_env(Plan(stage_faults=[{"stage": 2, "step": 12, "kind": "hang"}])))
    assert result.returncode == 0, result.stderr
    restart = next(e for e in events(run_dir) if e["event"] == "restart")
    assert "stage 2" in restart["cause"] and "no heartbeat" in restart["cause"]
    assert_bitwise_equal(load_params(run_dir), load_params(reference))


def test_restarts_exhausted_fail_clearly(tmp_path):
    run_dir = tmp_path / "train"
    fault = {"stage": 1, "step": 3, "kind": "raise", "generation": 0}
    # The fault fires in generation 0; with --max-restarts 0 there is no second chance.
    result = run_cli("train", "--run-dir", str(run_dir), "--max-restarts", "0", *BASE,
                     env=cli_env(Plan(stage_faults=[fault])))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "stage 1" in result.stderr and "injected fault" in result.stderr
    assert "--max-restarts is 0" in result.stderr
    assert run_state(run_dir)["state"] == "failed"
    assert_no_survivors(run_dir)


def test_coordinator_killed_takes_its_workers_with_it(tmp_path):
    run_dir = tmp_path / "train"
    proc = start_cli("train", "--run-dir", str(run_dir), *BASE, env=SLOW)
    try:
        wait_for(lambda: last_step(run_dir) >= 5, timeout_s=60, what="step 5")
        workers = [psutil.Process(pid) for pid in run_state(run_dir)["worker_pids"]]
        proc.kill()
    finally:
        finish(proc)
    gone, alive = psutil.wait_procs(workers, timeout=2)
    assert not alive, f"workers outlived the coordinator: {alive}"


# Installs hooks whose worker command for stage 1 fails at start, like an import error would.
BROKEN_START = """
import sys
from pipetrain import cli, hooks
class BrokenStart(hooks.Hooks):
    def worker_command(self, place, argv):
        if place.stage != 1:
            return argv
        return [argv[0], "-c", "import sys; print('Traceback (most recent call last):'); "
                "print('ModuleNotFoundError: No module named boom'); sys.exit(1)"]
hooks.install(BrokenStart())
cli.main(sys.argv[1:])
"""


def test_a_worker_that_cannot_start_fails_the_run_at_once(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    run_dir = tmp_path / "train"
    result = subprocess.run([sys.executable, "-c", BROKEN_START, "train", "--run-dir",
                             str(run_dir), *BASE], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env=cli_env())
    assert result.returncode == 1, result
    assert "stage 1" in result.stderr and "failed while starting" in result.stderr
    assert "No module named boom" in result.stderr  # the worker's own last lines
    assert "Traceback" not in result.stderr.splitlines()[0]
    assert [e for e in events(run_dir) if e["event"] == "restart"] == []
    assert run_state(run_dir)["state"] == "failed"
    assert_no_survivors(run_dir)
