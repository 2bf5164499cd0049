"""Data-parallel replicas (S x R processes) are bitwise equal to the reference with --replicas R."""

from __future__ import annotations

import os
import random
import signal

import pytest

from pipetrain_harness.plan import Plan
from tests.helpers import (
    assert_bitwise_equal,
    assert_no_survivors,
    assert_same_steps,
    cli_env,
    events,
    load_params,
    read_events,
    run_cli,
    run_state,
    start_cli,
    wait_for,
)

BASE = ["--epochs", "1", "--batch-size", "64", "--microbatches", "2", "--quiet"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runs = {}

    def get(replicas: int):
        if replicas not in runs:
            run_dir = tmp_path_factory.mktemp("ref")
            run_cli("reference", "--run-dir", str(run_dir), "--replicas", str(replicas), *BASE,
                    check=True)
            runs[replicas] = run_dir
        return runs[replicas]

    return get


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("stages,replicas", [(1, 2), (2, 2), (3, 2), (1, 4)])
def test_replicated_pipeline_matches_reference(tmp_path, reference, stages, replicas, schedule):
    run_dir = tmp_path / "train"
    run_cli("train", "--run-dir", str(run_dir), "--stages", str(stages), "--replicas",
            str(replicas), "--schedule", schedule, "--checkpoint-every", "10", *BASE, check=True)
    assert_bitwise_equal(load_params(run_dir), load_params(reference(replicas)))
    assert_same_steps(run_dir, reference(replicas))
    exits = [e for e in events(run_dir) if e["event"] == "worker_exit"]
    assert len(exits) == stages * replicas and all(e["returncode"] == 0 for e in exits)
    assert_no_survivors(run_dir)


def test_replicas_change_the_reduction_order(reference):
    """R = 2 sums two partial gradients: close to R = 1, but the reference follows the order."""
    one, two = load_params(reference(1)), load_params(reference(2))
    for name in one:
        assert abs(one[name] - two[name]).max() < 1e-9 * max(1.0, abs(one[name]).max())


@pytest.mark.parametrize("victim", [0, 1])
def test_killed_replica_mid_run_is_replaced_from_its_peer_bitwise(tmp_path, victim):
    """A replica killed while the other may be inside the overlapped all-reduce (its helper
    thread waiting on the dead replica): the survivor must notice and halt, the replacement
    take the survivor's state (no step lost), and the result still be the reference's."""
    args = ["--stages", "1", "--replicas", "2", "--epochs", "3", "--batch-size", "64",
            "--microbatches", "1", "--checkpoint-every", "8", "--quiet"]
    reference_dir = tmp_path / "reference"
    run_cli("reference", "--run-dir", str(reference_dir), *args, check=True)
    run_dir = tmp_path / "train"
    at_step = random.Random(victim).randint(3, 40)
    proc = start_cli("train", "--run-dir", str(run_dir), *args,
                     env=cli_env(Plan(step_delay_s=0.005)))
    try:
        wait_for(lambda: any(e["event"] == "step" and e["step"] >= at_step
                             for e in read_events(run_dir)),
                 timeout_s=60, what=f"step {at_step}")
        os.kill(run_state(run_dir)["worker_pids"][victim], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    restarts = [e for e in events(run_dir) if e["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["mode"] == "in_place", restarts
    assert restarts[0]["steps_lost"] == 0 and restarts[0]["state_from"] == ["peer"], restarts
    assert_bitwise_equal(load_params(run_dir), load_params(reference_dir))
    assert_no_survivors(run_dir)
