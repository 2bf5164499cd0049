"""The harness's side of the seam: what its hooks do with a plan, without running a training."""

from __future__ import annotations

import numpy as np
import pytest

from pipetrain import hooks
from pipetrain.nn import make_optimizer
from pipetrain.wire.pipe import PipeChannel, open_pipe
from pipetrain_harness.hooks import ENTRY_MODULE, HarnessHooks
from pipetrain_harness.linkshim import FaultyChannel
from pipetrain_harness.plan import Plan

STAGE_1 = hooks.Place(hooks.STAGE, 1, 0, 0)


def test_workers_start_through_the_harness_entry_point():
    argv = ["/venv/bin/python", "-P", "-m", "pipetrain.runtime.worker", "7", "8"]
    assert HarnessHooks(Plan()).worker_command(STAGE_1, argv) == [
        "/venv/bin/python", "-P", "-m", ENTRY_MODULE, "worker", "7", "8"]


def test_a_stage_fault_fires_at_its_place_step_and_generation_only():
    plan = Plan(stage_faults=[{"stage": 1, "step": 3, "kind": "raise"}])
    harness = HarnessHooks(plan)
    harness.before_step(STAGE_1, 2)
    harness.before_step(hooks.Place(hooks.STAGE, 0, 0, 0), 3)
    harness.before_step(hooks.Place(hooks.STAGE, 1, 0, 1), 3)  # a restarted group runs clean
    with pytest.raises(RuntimeError, match="injected fault at stage 1 step 3"):
        harness.before_step(STAGE_1, 3)


def test_a_plan_with_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown stage fault"):
        Plan.from_json(Plan(stage_faults=[{"stage": 0, "step": 1, "kind": "melt"}]).to_json())
    with pytest.raises(ValueError, match="unknown keys"):
        Plan.from_json('{"step_delay": 1}')


class FakeStage:
    def __init__(self) -> None:
        self.names = ["layers.0.weight"]
        self.params = {"layers.0.weight": np.array([[0.5, -2.0], [1.0, 0.25]])}
        self.optimizer = make_optimizer("adam", self.params, 0.1)
        self.optimizer.step({"layers.0.weight": np.ones((2, 2))})


def test_perturb_nudges_the_largest_parameter_after_the_update():
    stage = FakeStage()
    before = stage.params["layers.0.weight"].copy()
    harness = HarnessHooks(Plan(stage_faults=[{"stage": 1, "step": 4, "kind": "perturb"}]))
    harness.after_update(STAGE_1, 3, stage)
    assert np.array_equal(stage.params["layers.0.weight"], before)
    harness.after_update(STAGE_1, 4, stage)
    changed = stage.params["layers.0.weight"] != before
    assert changed.sum() == 1 and changed[np.unravel_index(np.argmax(np.abs(before)), (2, 2))]


def test_stale_restart_forgets_the_optimizer_state_of_stage_0_after_a_restart():
    harness = HarnessHooks(Plan(planted=["stale_restart"]))
    first, restarted = FakeStage(), FakeStage()
    harness.state_restored(hooks.Place(hooks.STAGE, 0, 0, 0), first)
    harness.state_restored(hooks.Place(hooks.STAGE, 1, 0, 1), first)
    assert first.optimizer.step_count == 1
    harness.state_restored(hooks.Place(hooks.STAGE, 0, 0, 1), restarted)
    assert restarted.optimizer.step_count == 0
    assert not any(value.any() for value in restarted.optimizer.state.values())


def test_link_faults_wrap_only_the_planned_pipe():
    plan = Plan(link_faults=[{"kind": "delay", "link": "1->2", "replica": 0, "at_step": 1,
                              "for_steps": 0, "latency_ms": 1}])
    harness = HarnessHooks(plan)
    read_fd, write_fd = open_pipe()
    channel = PipeChannel(read_fd, write_fd, name="downstream")
    try:
        downstream = hooks.Place(hooks.STAGE, 2, 0, 0)
        assert isinstance(harness.wrap_channel(STAGE_1, downstream, channel), FaultyChannel)
        upstream = hooks.Place(hooks.STAGE, 0, 0, 0)
        assert harness.wrap_channel(STAGE_1, upstream, channel) is channel
        replica = hooks.Place(hooks.STAGE, 1, 1, 0)
        assert harness.wrap_channel(STAGE_1, replica, channel) is channel
        restarted = hooks.Place(hooks.STAGE, 1, 0, 1)
        assert harness.wrap_channel(restarted, hooks.Place(hooks.STAGE, 2, 0, 1),
                                    channel) is channel
    finally:
        channel.close()
