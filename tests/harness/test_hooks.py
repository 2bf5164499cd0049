"""The harness's side of the seam: what its hooks do with a plan, without running a training."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from pipetrain import hooks
from pipetrain.nn import make_optimizer
from pipetrain.pipeline.schedule import Action, Op
from pipetrain.wire.pipe import PipeChannel, open_pipe
from pipetrain_harness.hooks import ENTRY_MODULE, HarnessHooks
from pipetrain_harness.linkshim import FaultyChannel
from pipetrain_harness.plan import Plan
from pipetrain_harness.rendezvous import Rendezvous

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


# -- parking at a point: the process side against a real rendezvous socket ------------------


class Recorder:
    """A rendezvous handler that records each request and holds the parked caller until the
    test lets it go, as the harness holds a target while it delivers a fault."""

    def __init__(self, grant: bool = True) -> None:
        self.requests: list[dict] = []
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.grant = grant

    def __call__(self, request: dict) -> dict:
        self.requests.append(request)
        self.arrived.set()
        assert self.release.wait(10)
        return {"granted": list(request["ids"]) if self.grant else []}


@pytest.fixture
def rendezvous():
    recorder = Recorder()
    server = Rendezvous(recorder).start()
    try:
        yield server, recorder
    finally:
        recorder.release.set()
        server.stop()


def test_a_stage_parks_before_its_step_until_the_harness_lets_it_go(rendezvous):
    server, recorder = rendezvous
    plan = Plan(socket=server.path, parks=[
        {"id": 2, "hook": "before_step", "role": "stage", "stage": 1, "replica": 0, "step": 5}])
    harness = HarnessHooks(plan)
    harness.before_step(STAGE_1, 4)  # not its step: no stop at all
    assert recorder.requests == []
    done = threading.Event()
    thread = threading.Thread(target=lambda: (harness.before_step(STAGE_1, 5), done.set()))
    thread.start()
    assert recorder.arrived.wait(10)
    assert not done.wait(0.2)  # parked while the harness acts
    recorder.release.set()
    thread.join(10)
    assert done.is_set()
    [request] = recorder.requests
    assert request["ids"] == [2] and request["pid"] == os.getpid()
    assert (request["hook"], request["step"], request["point"]) == ("before_step", 5,
                                                                    "before_step")
    assert (request["stage"], request["replica"], request["generation"]) == (1, 0, 0)


def test_points_match_place_action_generation_and_checkpoint_phase(rendezvous):
    server, recorder = rendezvous
    recorder.release.set()
    plan = Plan(socket=server.path, parks=[
        {"id": 0, "hook": "before_action", "role": "stage", "stage": 1, "replica": 0,
         "step": 3, "action": "B2", "generation": 1},
        {"id": 1, "hook": "checkpoint_phase", "role": "coordinator", "stage": None,
         "replica": None, "phase": "manifest_written"},
        {"id": 2, "hook": "at_boundary", "role": "coordinator", "stage": None,
         "replica": None, "step": 6},
        {"id": 3, "hook": "step_started", "role": "coordinator", "stage": None,
         "replica": None, "step": 7}])
    harness = HarnessHooks(plan)
    action = Action(1, Op.BACKWARD, 2)
    harness.before_action(STAGE_1, 3, action)  # generation 0: not this one
    harness.before_action(hooks.Place(hooks.STAGE, 1, 0, 1), 3, Action(1, Op.FORWARD, 2))
    harness.before_action(hooks.Place(hooks.STAGE, 1, 0, 1), 3, action)
    harness.checkpoint_phase(hooks.Place(hooks.COORDINATOR), 8, "segments_written")
    harness.checkpoint_phase(hooks.Place(hooks.COORDINATOR), 8, "manifest_written")
    harness.at_boundary(5)
    harness.at_boundary(6)
    harness.step_started(6)
    harness.step_started(7)
    assert [(r["ids"], r["point"]) for r in recorder.requests] == [
        ([0], "1B2"), ([1], "manifest_written"), ([2], "boundary"), ([3], "during_step")]
    assert recorder.requests[1]["checkpoint_step"] == 8


def test_quiet_boundaries_are_the_planned_ones():
    harness = HarnessHooks(Plan(quiet_steps=[4, 9]))
    assert [step for step in range(12) if harness.quiet_boundary(step)] == [4, 9]
    assert not hooks.Hooks().quiet_boundary(4)  # the system's default: run ahead freely


def test_an_in_place_fault_is_claimed_once_per_group_and_acts_only_if_granted(rendezvous):
    server, recorder = rendezvous
    recorder.release.set()
    plan = Plan(socket=server.path,
                stage_faults=[{"stage": 1, "step": 3, "kind": "raise", "id": 7}])
    harness = HarnessHooks(plan)
    with pytest.raises(RuntimeError, match="injected fault"):
        harness.before_step(STAGE_1, 3)
    assert [(r["hook"], r["ids"], r["point"]) for r in recorder.requests] == [
        ("claim", [7], "before_step")]
    recorder.grant = False  # the harness says it landed already: a restarted group runs clean
    harness.before_step(hooks.Place(hooks.STAGE, 1, 0, 1), 3)
    assert len(recorder.requests) == 2


def test_a_park_without_a_harness_fails_loudly(tmp_path):
    plan = Plan(socket=str(tmp_path / "gone.sock"), parks=[
        {"id": 0, "hook": "before_step", "role": "stage", "stage": 1, "replica": 0, "step": 1}])
    with pytest.raises(OSError):
        HarnessHooks(plan).before_step(STAGE_1, 1)
