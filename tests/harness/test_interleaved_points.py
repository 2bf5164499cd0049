"""The harness names interleaved actions by their piece (``F1@2``), checks them against the
run's schedule, and the hook that parks a stage reports the same name."""

from __future__ import annotations

import pytest

from pipetrain.config import build_config
from pipetrain_harness.faults import FaultError, build_fault
from pipetrain_harness.landing import run_shape

SHAPE = run_shape(build_config({"layers": [64, 32, 24, 16, 10], "stages": 2,
                                "schedule": "interleaved", "microbatches": 4}))


def test_an_action_names_its_piece_and_must_be_one_of_the_stages():
    kill = build_fault({"kind": "kill", "target": "stage:0", "at_step": 3, "at_action": "0F1@2"})
    assert (kill.point.hook, kill.point.action) == ("before_action", "F1@2")
    kill.check_run(kill.place(2, 1, None), SHAPE)
    wrong = build_fault({"kind": "kill", "target": "stage:0", "at_step": 3, "at_action": "F1@1"})
    with pytest.raises(FaultError, match="not an action of stage 0.*F1@2"):
        wrong.check_run(wrong.place(2, 1, None), SHAPE)  # piece 1 is stage 1's


def test_a_reduce_point_must_name_a_layer_of_one_of_the_stages_pieces():
    shape = run_shape(build_config({"layers": [64, 32, 24, 16, 10], "stages": 2, "replicas": 2,
                                    "schedule": "interleaved", "microbatches": 4}))
    assert shape.layers == [(0, 1, 2, 3), (1, 2, 3, 4)]
    held = build_fault({"kind": "kill", "target": "stage:0", "at_step": 3, "at_reduce": 2})
    held.check_run(held.place(2, 2, None), shape)
    other = build_fault({"kind": "kill", "target": "stage:0", "at_step": 3, "at_reduce": 1})
    with pytest.raises(FaultError, match="all-reduces layers 0-0, 2-2"):
        other.check_run(other.place(2, 2, None), shape)
