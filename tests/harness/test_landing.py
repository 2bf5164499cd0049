"""pipetrain_harness.landing: each fault lands once, at its point, in the order the run reaches
it; spans heal; a point never reached is said to be missed. The faults here only record what
they were asked to do, so no process is needed."""

from __future__ import annotations

import random
import time

import pytest

from pipetrain.config import build_config
from pipetrain_harness.faults import FaultError, Launch, build_fault
from pipetrain_harness.faults.base import Context
from pipetrain_harness.history import History
from pipetrain_harness.landing import COUNT_CHECKPOINTS, FaultBook, run_shape

SHAPE = run_shape(build_config({"stages": 3, "replicas": 1, "microbatches": 2}))


class Recorded:
    """Wraps a real fault, recording its invocations instead of sending signals."""

    def __init__(self, table: dict) -> None:
        self.inner = build_fault(table)
        self.invoked: list = []
        self.healed = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def invoke(self, ctx, landing) -> None:
        self.invoked.append(landing)

    def heal(self, ctx) -> None:
        self.healed += 1


def book(tmp_path, *tables: dict, shape=SHAPE) -> tuple[FaultBook, list[Recorded]]:
    faults = [Recorded(table) for table in tables]
    events = tmp_path / "events.jsonl"
    ctx = Context(tmp_path, History(), random.Random(0))
    return FaultBook(faults, shape, ctx, rng=random.Random(0), events_path=events), faults


def request(hook: str, ids: list[int], *, role="stage", stage=1, replica=0, generation=0,
            step=None, point=None, **extra) -> dict:
    return {"ids": ids, "pid": 4242, "hook": hook, "role": role, "stage": stage,
            "replica": replica, "generation": generation, "step": step,
            "point": point or hook, **extra}


def test_a_fault_lands_the_first_time_its_point_is_reached(tmp_path):
    faults_book, [kill] = book(tmp_path, {"kind": "kill", "target": "stage:1", "at_step": 5})
    (tmp_path / "events.jsonl").write_text('{"event": "step"}\n' * 4 + '{"event": "st')
    assert faults_book.handle(request("before_step", [0], step=5)) == {"granted": [0]}
    # The group restarted and reached step 5 again: the fault has landed already.
    assert faults_book.handle(request("before_step", [0], step=5, generation=1)) == {
        "granted": []}
    [landing] = kill.invoked
    assert (landing.pid, landing.place, landing.point, landing.step) == (
        4242, "stage:1:replica:0", "before_step", 5)
    [landed] = faults_book.ctx.history.ops("fault_landed")
    assert landed["at_event"] == 4  # complete lines only: the fifth is still being written
    assert (landed["fault"], landed["kind"], landed["generation"]) == (0, "kill", 0)


def test_a_fault_for_a_later_group_waits_for_it(tmp_path):
    faults_book, [kill] = book(tmp_path, {"kind": "kill", "target": "stage:1", "at_step": 5,
                                          "generation": 1})
    assert faults_book.handle(request("before_step", [0], step=5))["granted"] == []
    assert faults_book.handle(request("before_step", [0], step=5, generation=1))[
        "granted"] == [0]


def test_checkpoint_faults_land_by_the_checkpoints_counted_over_the_scenario(tmp_path):
    faults_book, [damage, crash] = book(
        tmp_path, {"kind": "damage_checkpoint", "after_checkpoint": 2},
        {"kind": "checkpoint_crash", "after_checkpoint": 2, "phase": "segments_written"})
    coordinator = {"role": "coordinator", "stage": None, "replica": None}

    def phase(name: str, step: int) -> list[int]:
        return faults_book.handle(request("checkpoint_phase", [COUNT_CHECKPOINTS, 0, 1],
                                          phase=name, checkpoint_step=step, point=name,
                                          **coordinator))["granted"]

    assert phase("segments_written", 8) == [] and phase("committed", 8) == []
    assert phase("segments_written", 16) == []
    assert phase("committed", 16) == [0]  # the second committed: damaged while it waits
    assert phase("segments_written", 24) == [1]  # in the checkpoint after the second
    assert damage.invoked[0].step == 16 and crash.invoked[0].point == "segments_written"


def test_a_coordinator_fault_lands_at_the_boundary_before_its_step(tmp_path):
    faults_book, [storm] = book(tmp_path, {"kind": "signal_storm", "at_step": 7})
    faults_book.handle(request("at_boundary", [0], role="coordinator", stage=None,
                               replica=None, step=6, point="boundary"))
    assert storm.invoked[0].step == 7  # recorded as landing before step 7


def test_prepare_tells_each_process_its_points(tmp_path):
    faults_book, _ = book(
        tmp_path, {"kind": "kill", "target": "stage:2", "at_step": 9},
        {"kind": "signal_storm", "at_step": 4},
        {"kind": "sever", "link": "0->1", "at_step": 12, "when": "after"},
        {"kind": "damage_checkpoint"})
    launch = Launch(args=[], env={})
    faults_book.prepare(launch, "/tmp/x.sock")
    plan = launch.plan
    assert plan.socket == "/tmp/x.sock"
    assert [(p["id"], p["hook"]) for p in plan.parks] == [
        (0, "before_step"), (1, "at_boundary"), (3, "checkpoint_phase"),
        (COUNT_CHECKPOINTS, "checkpoint_phase")]
    assert plan.quiet_steps == [3, 8, 11, 12]
    assert plan.link_faults[0]["id"] == 2


def test_spans_heal_and_points_never_reached_are_missed(tmp_path):
    faults_book, [freeze, delay, kill] = book(
        tmp_path, {"kind": "freeze", "target": "stage:0", "at_step": 2, "duration_s": 0.01},
        {"kind": "delay", "link": "0->1", "at_step": 3, "for_steps": 2},
        {"kind": "kill", "target": "stage:1", "at_step": 99})
    faults_book.handle(request("before_step", [0], stage=0, step=2))
    faults_book.handle(request("claim", [1], stage=0, step=3, point="send activation 0"))
    time.sleep(0.02)
    faults_book.heal_due(4)
    assert (freeze.healed, delay.healed) == (1, 0)
    faults_book.heal_due(5)
    assert delay.healed == 1
    faults_book.finish()
    assert (freeze.healed, delay.healed, kill.healed) == (1, 1, 0)
    [missed] = faults_book.ctx.history.ops("fault_missed")
    assert missed["fault"] == 2 and "step 99" in missed["point"]


def test_faults_that_would_race_are_refused(tmp_path):
    with pytest.raises(FaultError, match="same moment"):
        book(tmp_path, {"kind": "kill", "target": "stage:0", "at_step": 5},
             {"kind": "corrupt", "link": "1->2", "at_step": 5})
    with pytest.raises(FaultError, match="not an action of stage 1"):
        book(tmp_path, {"kind": "kill", "target": "stage:1", "at_step": 5, "at_action": "W0"})
    with pytest.raises(FaultError, match="the run has 3 stage"):
        book(tmp_path, {"kind": "kill", "target": "stage:3"})


def test_a_fault_that_cannot_act_is_recorded(tmp_path):
    faults_book, [kill] = book(tmp_path, {"kind": "kill", "target": "stage:1", "at_step": 5})

    def explode(ctx, landing):
        raise OSError("no such thing")

    kill.invoke = explode
    faults_book.handle(request("before_step", [0], step=5))
    [error] = faults_book.ctx.history.ops("fault_error")
    assert "no such thing" in error["error"]
