"""The conv net across real stage processes is bitwise equal to `pipetrain reference`: every
stage count 1..4, one and two replicas, every schedule (models in tests/training/model_runs.py)."""

from __future__ import annotations

import pytest

from tests.training.model_runs import GRID, assert_matches_reference


@pytest.mark.parametrize("stages,replicas,schedule", GRID)
def test_conv_is_bitwise_equal_to_reference(tmp_path, configs, references, stages, replicas,
                                            schedule):
    assert_matches_reference("conv", tmp_path / "train", configs, references, stages,
                             replicas, schedule)
