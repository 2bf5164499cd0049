"""The conv net across real stage processes is bitwise equal to `pipetrain reference`: every
stage count 1..4, one and two replicas, every schedule (models in tests/training/model_runs.py)."""

from __future__ import annotations

import pytest

from tests.helpers import (
    assert_bitwise_equal,
    assert_no_survivors,
    assert_same_steps,
    events,
    load_params,
    run_cli,
    run_state,
)
from tests.training.model_runs import DTYPE, GRID


@pytest.mark.parametrize("stages,replicas,schedule", GRID)
def test_conv_is_bitwise_equal_to_reference(tmp_path, configs, references, stages, replicas,
                                            schedule):
    model = "conv"
    run_dir = tmp_path / "train"
    run_cli("train", str(configs[model]), "--run-dir", str(run_dir), "--stages", str(stages),
            "--replicas", str(replicas), "--schedule", schedule, "--dtype", DTYPE[replicas],
            "--quiet", check=True)
    reference = references(model, replicas)
    assert_same_steps(run_dir, reference)
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    assert run_state(run_dir)["state"] == "done"
    assert len(run_state(run_dir)["segments"]) == stages
    evaluated = [e for e in events(run_dir) if e["event"] == "evaluate"]
    assert evaluated and {"loss", "accuracy"} <= set(evaluated[-1])
    assert_no_survivors(run_dir)
