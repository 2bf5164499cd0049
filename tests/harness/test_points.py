"""pipetrain_harness.points: where a fault lands, what each process is told, what may race."""

from __future__ import annotations

import random

import pytest

from pipetrain_harness.points import (
    COORDINATOR,
    STAGE,
    Place,
    Point,
    PointError,
    checkpoint_point,
    frame_point,
    label,
    layer_of,
    races,
    resolve_target,
    step_point,
)

STAGE_0, STAGE_1 = Place(STAGE, 0, 0), Place(STAGE, 1, 0)


def test_at_step_is_before_the_step_on_a_stage_and_at_the_boundary_before_it_on_the_coordinator():
    stage = step_point({"at_step": 13}, "f", coordinator=False)
    assert stage.entry(0, STAGE_1) == {"id": 0, "hook": "before_step", "role": "stage",
                                       "stage": 1, "replica": 0, "step": 13}
    coordinator = step_point({"at_step": 13}, "f", coordinator=True)
    # The boundary after step 12: signals delivered there are read before step 13 starts.
    assert coordinator.entry(1, Place(COORDINATOR))["step"] == 12
    assert coordinator.entry(1, Place(COORDINATOR))["hook"] == "at_boundary"


def test_finer_points():
    action = step_point({"at_step": 4, "at_action": "2W1"}, "f", coordinator=False)
    assert (action.hook, action.action) == ("before_action", "W1")
    reduce = step_point({"at_step": 4, "at_reduce": 2}, "f", coordinator=False)
    assert reduce.entry(3, STAGE_1)["layer"] == 2
    during = step_point({"at_step": 4, "during_step": True}, "f", coordinator=True)
    assert during.entry(0, Place(COORDINATOR))["step"] == 4  # step 4 sent, results awaited
    assert during.hook == "step_started" and during.moment() is None
    resume = step_point({"at_resume": True, "generation": 1}, "f", coordinator=False)
    assert resume.entry(0, STAGE_0) == {"id": 0, "hook": "state_restored", "role": "stage",
                                        "stage": 0, "replica": 0, "generation": 1}
    crash = checkpoint_point({"after_checkpoint": 1, "phase": "committed"}, "f",
                             coordinator=True, default_phase="manifest_written",
                             default_after=0)
    assert (crash.phase, crash.checkpoint) == ("committed", 2)  # the write after the first
    frame = frame_point({"at_step": 6, "at_microbatch": 1, "when": "after"}, "f", when=True)
    assert frame.entry(0, STAGE_1)["microbatch"] == 1


def test_a_point_that_cannot_be_named_is_refused_naming_the_key():
    for table, key in (({"at_step": 0}, "at_step"), ({"at_step": True}, "at_step"),
                       ({"at_action": "F1"}, "at_step"),
                       ({"at_step": 2, "at_action": "Z1"}, "at_action"),
                       ({"at_resume": True, "at_step": 2}, "at_step")):
        with pytest.raises(PointError, match=key):
            step_point(table, "f", coordinator=False)
    with pytest.raises(PointError, match="at_resume"):
        step_point({"at_resume": True}, "f", coordinator=True)
    with pytest.raises(PointError, match="during_step"):
        step_point({"at_step": 3, "during_step": True}, "f", coordinator=False)
    with pytest.raises(PointError, match="at_step"):
        step_point({"during_step": True}, "f", coordinator=True)
    with pytest.raises(PointError, match="when"):
        frame_point({"when": "after"}, "f", when=False)


def test_quiet_boundaries_come_before_the_point_and_after_a_frame_severed_after_sending():
    assert step_point({"at_step": 9}, "f", coordinator=False).quiet_steps() == {8}
    assert step_point({"at_step": 1}, "f", coordinator=False).quiet_steps() == {0}
    assert frame_point({"at_step": 9, "when": "after"}, "f", when=True).quiet_steps() == {8, 9}
    assert Point("launch").quiet_steps() == set()


def test_points_in_different_processes_at_the_same_moment_race():
    step_3 = step_point({"at_step": 3}, "f", coordinator=False)
    step_4 = step_point({"at_step": 4}, "f", coordinator=False)
    boundary = step_point({"at_step": 3}, "f", coordinator=True)
    assert races([(step_3, STAGE_0), (step_3, STAGE_1)]) == (0, 1)
    assert races([(step_3, STAGE_0), (step_3, STAGE_0)]) is None  # one process: in its order
    assert races([(step_3, STAGE_0), (step_4, STAGE_1)]) is None
    assert races([(boundary, Place(COORDINATOR)), (step_3, STAGE_1)]) is None
    resume = step_point({"at_resume": True}, "f", coordinator=False)
    assert races([(resume, STAGE_0), (step_3, STAGE_1), (resume, STAGE_1)]) == (0, 2)


def test_targets_resolve_in_the_grid():
    rng = random.Random(3)
    assert resolve_target("stage:2", 3, 2, rng) == Place(STAGE, 2, 0)
    assert resolve_target("stage:1:replica:1", 3, 2, rng) == Place(STAGE, 1, 1)
    assert resolve_target("coordinator", 3, 2, rng) == Place(COORDINATOR)
    drawn = {resolve_target("random_worker", 3, 2, random.Random(seed)) for seed in range(40)}
    assert drawn == {Place(STAGE, s, r) for s in range(3) for r in range(2)}
    assert resolve_target("random_worker", 3, 2, random.Random(5)) == resolve_target(
        "random_worker", 3, 2, random.Random(5))  # seeded: the same in every replay


def test_labels():
    assert label("before_step") == "before_step"
    assert label("before_reduce", layer=2) == "reduce layer 2"
    assert label("checkpoint_phase", phase="committed") == "committed"
    assert label("at_boundary") == "boundary"
    assert layer_of(["layers.4.weight", "layers.4.bias"]) == 4
