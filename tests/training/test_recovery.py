"""In-place recovery through the command line, with the defaults (no --checkpoint-every): only
the failed worker is replaced, the survivors keep their pids, at most one step is lost with one
replica and none with two, and the result is bitwise the reference's. Without the in-memory
state (a worker killed with the holder of its snapshot) the group restarts from disk."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipetrain.runtime.snapshot import holder_of
from pipetrain.runtime.topology import Grid, Position
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

SLOW = cli_env(Plan(step_delay_s=0.005))




@pytest.fixture(scope="module")
def references(tmp_path_factory):
    made = {}

    def reference(*options: str):
        if options not in made:
            run_dir = tmp_path_factory.mktemp("ref")
            run_cli("reference", "--run-dir", str(run_dir), "--quiet", *options, check=True)
            made[options] = load_params(run_dir)
        return made[options]

    return reference


def kill_at(run_dir, proc, step: int, victims: list[int], sig=signal.SIGKILL) -> list[int]:
    wait_for(lambda: last_step(run_dir) >= step or proc.poll() is not None, timeout_s=120,
             what=f"step {step}")
    pids = run_state(run_dir)["worker_pids"]
    for index in victims:
        os.kill(pids[index], sig)
    return pids


CASES = [  # options, victim (index in worker_pids, grid order), most steps lost
    (("--epochs", "10"), 1, 1),                                  # the defaults: S = 3, R = 1
    (("--epochs", "10", "--schedule", "gpipe"), 0, 1),
    (("--epochs", "10", "--optimizer", "adam"), 2, 1),
    (("--epochs", "10", "--stages", "2", "--replicas", "2"), 3, 0),
    (("--epochs", "10", "--stages", "2", "--replicas", "2", "--schedule", "zb"), 0, 0),
]


@pytest.mark.parametrize("options,victim,most_lost", CASES,
                         ids=["defaults", "gpipe-first", "adam-last", "r2", "r2-zb-first"])
def test_a_killed_worker_is_replaced_alone_and_nothing_is_lost(tmp_path, references, options,
                                                               victim, most_lost):
    run_dir = tmp_path / "train"
    proc = start_cli("train", "--run-dir", str(run_dir), "--quiet", *options, env=SLOW)
    try:
        before = kill_at(run_dir, proc, 200, [victim])
    finally:
        status = finish(proc)
    assert status == 0, status
    restarts = [e for e in events(run_dir) if e["event"] == "restart"]
    assert len(restarts) == 1, restarts
    restart = restarts[0]
    assert restart["mode"] == "in_place" and 0 <= restart["steps_lost"] <= most_lost, restart
    assert restart["from_step"] >= 199 and restart["recovery_s"] > 0
    after = run_state(run_dir)["worker_pids"]
    assert [a == b for a, b in zip(before, after, strict=True)] == [
        i != victim for i in range(len(before))], (before, after)
    assert_bitwise_equal(load_params(run_dir), references(*options))
    assert_no_survivors(run_dir)


def test_a_worker_killed_with_the_holder_of_its_snapshot_restarts_the_group_from_disk(
        tmp_path, references):
    options = ("--epochs", "4", "--checkpoint-every", "20")
    grid = Grid(3, 1)
    victim = Position(1, 0)
    holder = holder_of(grid, victim)
    run_dir = tmp_path / "train"
    proc = start_cli("train", "--run-dir", str(run_dir), "--quiet", *options, env=SLOW)
    try:
        kill_at(run_dir, proc, 50, [grid.positions().index(victim),
                                    grid.positions().index(holder)])
    finally:
        status = finish(proc)
    assert status == 0
    restart = next(e for e in events(run_dir) if e["event"] == "restart")
    assert restart["mode"] == "group" and restart["from_step"] == 40, restart
    assert restart["steps_lost"] == last_step_before(run_dir, restart) - 40
    assert_bitwise_equal(load_params(run_dir), references(*options))


def last_step_before(run_dir, event) -> int:
    return max(e["step"] for e in events(run_dir) if e["event"] == "step" and e["t"] < event["t"])


def test_a_frozen_coordinator_blames_nobody(tmp_path, references):
    """SIGSTOP for three heartbeat timeouts: on waking it finds every worker alive."""
    options = ("--epochs", "3", "--heartbeat-timeout", "2")
    run_dir = tmp_path / "train"
    proc = start_cli("train", "--run-dir", str(run_dir), "--quiet", *options, env=SLOW)
    try:
        wait_for(lambda: last_step(run_dir) >= 20, timeout_s=120, what="step 20")
        os.kill(proc.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            # Time passes for everyone but the coordinator; its workers keep beating.
            while time.monotonic() - frozen_at < 6.0:
                time.sleep(0.05)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    finally:
        status = finish(proc)
    assert status == 0
    assert [e for e in events(run_dir) if e["event"] == "restart"] == []
    assert_bitwise_equal(load_params(run_dir), references(*options))


def test_a_second_coordinator_is_refused_and_the_first_ends_bitwise(tmp_path, references):
    options = ("--epochs", "10")
    run_dir = tmp_path / "train"
    # 220 steps of at least 0.02 s: still running while both attempts are refused.
    proc = start_cli("train", "--run-dir", str(run_dir), "--quiet", *options,
                     env=cli_env(Plan(step_delay_s=0.02)))
    try:
        wait_for(lambda: last_step(run_dir) >= 5, timeout_s=120, what="step 5")
        for again in (["--resume"], []):
            assert proc.poll() is None, "the first run ended too soon for this test"
            started = time.monotonic()
            second = run_cli("train", "--run-dir", str(run_dir), "--quiet", *again, *options)
            assert second.returncode == 2, second
            assert time.monotonic() - started < 10
            line = second.stderr.strip()
            assert "\n" not in line and "Traceback" not in line
            assert f"pid {proc.pid}" in line and f"pipetrain stop {run_dir}" in line, line
    finally:
        status = finish(proc)
    assert status == 0
    assert len([e for e in events(run_dir) if e["event"] == "run_start"]) == 1
    steps = [e["step"] for e in events(run_dir) if e["event"] == "step"]
    assert steps == sorted(set(steps)), "a step was run twice"
    assert_bitwise_equal(load_params(run_dir), references(*options))


# Hooks (in the coordinator and, through worker_command, in every worker) under which stage 1
# dies while its snapshot of step 30 is still to be copied, after step 30 was reported: the
# neighbours may even have finished step 31.
LAGGING_SNAPSHOT = """
import os, signal, sys, time
from pipetrain import cli, hooks
from pipetrain.runtime import worker

class LaggingSnapshot(hooks.Hooks):
    def worker_command(self, place, argv):
        return [argv[0], "-P", __file__, "worker", *argv[argv.index("-m") + 2:]]

    def snapshot_copy(self, place, step):
        if (place.stage, place.generation, step) == (1, 0, 30):
            time.sleep(2.0)  # the main thread reports step 30 and runs step 31 meanwhile
            os.kill(os.getpid(), signal.SIGKILL)

hooks.install(LaggingSnapshot())
if sys.argv[1] == "worker":
    sys.exit(worker.main(sys.argv[2:]))
cli.main(sys.argv[1:])
"""


def test_a_snapshot_one_step_behind_costs_one_step_and_survivors_roll_back_two(tmp_path,
                                                                                references):
    import subprocess
    import sys

    from tests.helpers import REPO

    # Stage 1 holds a 256 x 256 layer: a state too big to be copied inline, so its copy runs
    # on the snapshot thread beside the next step (pipetrain.runtime.snapshot.make_snapshots).
    options = ("--epochs", "2", "--layers", "64,256,256,10")
    driver = tmp_path / "driver.py"
    driver.write_text(LAGGING_SNAPSHOT)
    run_dir = tmp_path / "train"
    result = subprocess.run([sys.executable, "-P", str(driver), "train", "--run-dir",
                             str(run_dir), "--quiet", *options], capture_output=True, text=True,
                            timeout=180, cwd=REPO, env=cli_env())
    assert result.returncode == 0, result.stderr
    [restart] = [e for e in events(run_dir) if e["event"] == "restart"]
    assert restart["mode"] == "in_place" and restart["state_from"] == ["snapshot"], restart
    assert restart["from_step"] == 29 and restart["steps_lost"] == 1, restart
    # The neighbours had finished step 31 and rolled back two steps from their own snapshots.
    assert restart["survivor_steps"] == [31, 31], restart
    assert_bitwise_equal(load_params(run_dir), references(*options))
