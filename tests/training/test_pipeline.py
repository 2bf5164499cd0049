"""`pipetrain train` across real stage processes is bitwise equal to `pipetrain reference`."""

from __future__ import annotations

import time

import pytest

from pipetrain_harness.plan import Plan
from tests.helpers import (
    assert_bitwise_equal,
    assert_no_survivors,
    assert_same_steps,
    cli_env,
    load_params,
    run_cli,
    run_state,
)

SMALL = ["--epochs", "1", "--batch-size", "48", "--quiet"]

# (stages, microbatches, schedule, dtype, layers): every S in 1..4, M in 1..8, every schedule,
# both dtypes and several shapes, without the full cross product (each case spawns S processes).
CASES = [
    (1, 1, "gpipe", "float64", "64,32,10"),
    (2, 1, "1f1b", "float64", "64,32,10"),
    (2, 4, "gpipe", "float64", "64,128,64,10"),
    (2, 8, "1f1b", "float32", "64,128,64,10"),
    (3, 2, "zb", "float64", "64,128,64,10"),
    (3, 3, "1f1b", "float32", "64,48,40,32,10"),
    (3, 5, "gpipe", "float32", "64,48,40,32,10"),
    (4, 6, "1f1b", "float64", "64,48,40,32,10"),
    (4, 8, "zb", "float32", "64,48,40,32,10"),
    (4, 7, "gpipe", "float64", "64,20,20,20,20,10"),
]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    cache = {}

    def get(microbatches: int, dtype: str, layers: str, optimizer: str = "momentum"):
        key = (microbatches, dtype, layers, optimizer)
        if key not in cache:
            run_dir = tmp_path_factory.mktemp("ref")
            run_cli("reference", "--run-dir", str(run_dir), "--microbatches", str(microbatches),
                    "--dtype", dtype, "--layers", layers, "--optimizer", optimizer, *SMALL,
                    check=True)
            cache[key] = run_dir
        return cache[key]

    return get


@pytest.mark.parametrize("stages,microbatches,schedule,dtype,layers", CASES)
def test_train_is_bitwise_equal_to_reference(
    tmp_path, reference_runs, stages, microbatches, schedule, dtype, layers
):
    run_dir = tmp_path / "train"
    run_cli("train", "--run-dir", str(run_dir), "--stages", str(stages), "--microbatches",
            str(microbatches), "--schedule", schedule, "--dtype", dtype, "--layers", layers,
            *SMALL, check=True)
    reference = reference_runs(microbatches, dtype, layers)
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    assert_bitwise_equal(load_params(run_dir, "initial.npz"),
                         load_params(reference, "initial.npz"))
    assert_same_steps(run_dir, reference)
    assert run_state(run_dir)["state"] == "done"
    assert_no_survivors(run_dir)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_optimizer_matches(tmp_path, reference_runs, optimizer):
    run_dir = tmp_path / "train"
    run_cli("train", "--run-dir", str(run_dir), "--stages", "3", "--microbatches", "4",
            "--optimizer", optimizer, "--layers", "64,128,64,10", *SMALL, check=True)
    assert_bitwise_equal(load_params(run_dir),
                         load_params(reference_runs(4, "float64", "64,128,64,10", optimizer)))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_exception_in_a_stage_fails_the_run_cleanly(tmp_path, stage):
    run_dir = tmp_path / "train"
    fault = {"stage": stage, "step": 3, "kind": "raise"}
    started = time.monotonic()
    result = run_cli("train", "--run-dir", str(run_dir), *SMALL, "--max-restarts", "0",
                     timeout=60,
                     env=cli_env(Plan(stage_faults=[fault])))
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert f"stage {stage}" in result.stderr and "injected fault" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s to fail"
    assert run_state(run_dir)["state"] == "failed"
    assert_no_survivors(run_dir)


def test_worker_that_dies_silently_is_named(tmp_path):
    run_dir = tmp_path / "train"
    result = run_cli("train", "--run-dir", str(run_dir), *SMALL, "--max-restarts", "0",
                     timeout=60,
                     env=cli_env(Plan(stage_faults=[{"stage": 1, "step": 2, "kind": "exit"}])))
    assert result.returncode == 1
    assert "stage 1" in result.stderr and "exit status 3" in result.stderr, result.stderr
    assert_no_survivors(run_dir)


def test_default_example_reaches_reference_accuracy(tmp_path):
    run_dir = tmp_path / "train"
    result = run_cli("train", "--run-dir", str(run_dir), timeout=300, check=True)
    assert f"run directory: {run_dir}" in result.stdout
    state = run_state(run_dir)
    assert state["config"]["stages"] == 3
    assert state["accuracy"] >= 0.95
