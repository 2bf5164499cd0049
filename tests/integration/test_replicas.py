"""Data-parallel replicas (S x R processes) are bitwise equal to the reference with --replicas R."""

from __future__ import annotations

import pytest

from tests.helpers import (
    assert_bitwise_equal,
    assert_no_survivors,
    assert_same_steps,
    events,
    load_params,
    run_cli,
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
