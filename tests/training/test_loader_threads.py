"""Loader threads inside real stage processes: results independent of thread count and timing."""

from __future__ import annotations

import pytest

from pipetrain_harness.plan import Plan
from tests.helpers import (
    assert_bitwise_equal,
    assert_no_survivors,
    assert_same_steps,
    cli_env,
    events,
    finish,
    load_params,
    run_cli,
    run_state,
    start_cli,
    wait_for,
)

BASE = ["--epochs", "1", "--batch-size", "48", "--microbatches", "3", "--quiet"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    runs = {}
    for augment in ("--no-augment", "--augment"):
        run_dir = tmp_path_factory.mktemp("ref")
        run_cli("reference", "--run-dir", str(run_dir), augment, *BASE, check=True)
        runs[augment] = run_dir
    return runs


@pytest.mark.parametrize("augment", ["--no-augment", "--augment"])
@pytest.mark.parametrize("threads,delay_s", [(1, "0"), (2, "0.002"), (8, "0.002")])
def test_results_do_not_depend_on_loader_threads(tmp_path, references, augment, threads,
                                                 delay_s):
    run_dir = tmp_path / "train"
    run_cli("train", "--run-dir", str(run_dir), augment, "--loader-threads", str(threads),
            "--prefetch", "3", *BASE, check=True,
            env=cli_env(Plan(loader_delay_s=float(delay_s))))
    assert_bitwise_equal(load_params(run_dir), load_params(references[augment]))
    assert_same_steps(run_dir, references[augment])


def test_augmentation_changes_the_training(references):
    a, b = load_params(references["--augment"]), load_params(references["--no-augment"])
    assert any(not (a[name] == b[name]).all() for name in a)


def test_step_events_report_data_and_neighbour_waits(tmp_path):
    run_dir = tmp_path / "train"
    run_cli("train", "--run-dir", str(run_dir), *BASE, check=True)
    steps = [e for e in events(run_dir) if e["event"] == "step"]
    metrics = steps[-1]["metrics"]
    assert {"compute_s", "wait_data_s", "wait_neighbours_s", "loader_depth"} <= set(metrics[0])
    assert len(metrics) == 3  # one entry per stage


def test_loader_exception_reaches_the_user(tmp_path):
    run_dir = tmp_path / "train"
    result = run_cli("train", "--run-dir", str(run_dir), *BASE, "--max-restarts", "0",
                     env=cli_env(Plan(stage_faults=[{"stage": 0, "step": 4,
                                                       "kind": "loader_error"}])))
    assert result.returncode == 1
    assert "stage 0" in result.stderr and "injected loader failure at step 4" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_survivors(run_dir)


def test_stop_mid_epoch_joins_every_thread(tmp_path):
    """SIGTERM mid-epoch: each worker joins its loader and heartbeat threads before exiting (a
    worker with a thread left alive exits 4 and says so in its log). Two loader threads asked
    for: this model's micro-batches are small enough to be loaded by the main thread."""
    run_dir = tmp_path / "train"
    proc = start_cli("train", "--run-dir", str(run_dir), "--epochs", "3", "--quiet",
                     "--loader-threads", "2", env=cli_env(Plan(step_delay_s=0.02)))
    try:
        wait_for(lambda: any(e["event"] == "step" and e["step"] >= 5 for e in events(run_dir)),
                 timeout_s=60, what="step 5")
        proc.terminate()
    finally:
        status = finish(proc, timeout=30)
    assert status == 0
    exits = [e for e in events(run_dir) if e["event"] == "worker_exit"]
    assert len(exits) == 3 and all(e["returncode"] == 0 for e in exits), exits
    assert run_state(run_dir)["state"] == "stopped"
    assert_no_survivors(run_dir)
