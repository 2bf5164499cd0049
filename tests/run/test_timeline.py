"""The trace analysis as pure functions: the ideal pipeline's replay and the per-stage summary
of a trace built by hand (no process runs here)."""

from __future__ import annotations

import pytest

from pipetrain import tracing
from pipetrain.pipeline import schedule as schedules
from pipetrain.run.timeline import bubble_fraction, simulate, summarize, tracks


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb"])
@pytest.mark.parametrize("stages,microbatches", [(1, 1), (2, 4), (3, 4), (4, 8)])
def test_uniform_costs_replay_like_the_schedule_module(name, stages, microbatches):
    plan = schedules.build(name, stages, microbatches)
    ours = simulate(plan, lambda a: schedules.DEFAULT_COST[a.op])
    theirs = schedules.simulate(plan)
    assert ours["makespan"] == theirs["makespan"]
    assert ours["start"] == theirs["start"]


@pytest.mark.parametrize("stages,microbatches,virtual", [(2, 4, 2), (3, 6, 2), (2, 4, 3)])
def test_interleaved_replays_like_the_schedule_module(stages, microbatches, virtual):
    plan = schedules.build("interleaved", stages, microbatches, virtual)
    ours = simulate(plan, lambda a: schedules.DEFAULT_COST[a.op])
    theirs = schedules.simulate(plan)
    assert ours["makespan"] == theirs["makespan"] and ours["start"] == theirs["start"]


def test_a_slow_stage_sets_the_pace_and_the_update_comes_last():
    plan = schedules.build("1f1b", 2, 4)
    # Stage 0 three times as slow as stage 1: it is never idle once stage 1 has returned the
    # first gradient, so its 4 F + 4 B (36) and its update (0.5) are the step.
    cost = {0: {"F": 3.0, "B": 6.0}, 1: {"F": 1.0, "B": 2.0}}
    out = simulate(plan, lambda a: cost[a.stage][str(a.op)], update=[0.5, 0.25])
    assert out["busy"] == [36.5, 12.25]
    assert out["makespan"] == 36.5
    assert max(out["finish"][a] for a in plan[1]) == 27.0  # stage 1's B3 after s0's F3


def test_bubble_fraction():
    assert bubble_fraction([10.0, 10.0], 10.0) == 0.0
    assert bubble_fraction([5.0, 10.0], 10.0) == 0.25
    assert bubble_fraction([], 1.0) == 0.0


def _trace(stages: int, steps: int, action_us: dict[str, float], gap_us: float) -> list[dict]:
    """A hand-made trace of a 1F1B run in which every action takes ``action_us[op]`` and each
    step's actions run back to back, every stage waiting ``gap_us`` before each action."""
    events = []
    plan = schedules.build("1f1b", stages, 2)
    for s in range(stages):
        pid = 100 + s
        events += [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                    "args": {"name": f"stage {s} replica 0"}},
                   {"ph": "M", "name": "thread_name", "pid": pid, "tid": pid,
                    "args": {"name": "main"}}]
        t = 0.0
        for step in range(1, steps + 1):
            begin = t
            for action in plan[s]:
                t += gap_us
                events.append({"ph": "X", "cat": tracing.WAIT, "name": "wait", "pid": pid,
                               "tid": pid, "ts": t - gap_us, "dur": gap_us})
                dur = action_us[str(action.op)]
                events.append({"ph": "X", "cat": tracing.COMPUTE, "name": str(action),
                               "pid": pid, "tid": pid, "ts": t, "dur": dur,
                               "args": {"step": step, **action._asdict()}})
                t += dur
            events.append({"ph": "X", "cat": tracing.STEP, "name": f"step {step}", "pid": pid,
                           "tid": pid, "ts": begin, "dur": t - begin, "args": {"step": step}})
            t += 10.0
    return events


def test_summary_of_a_hand_made_trace():
    events = _trace(2, 6, {"F": 100.0, "B": 200.0}, gap_us=50.0)
    assert set(tracks(events)) == {(0, 0), (1, 0)}
    config = {"schedule": "1f1b", "stages": 2, "microbatches": 2, "replicas": 1}
    summary = summarize(events, config, skip=2)
    assert summary["steps"] == [3, 6] and summary["steps_timed"] == 4
    for row in summary["per_stage"]:
        assert row["compute_s"] == pytest.approx(600e-6)  # 2 F + 2 B
        assert row["wait_s"] == pytest.approx(200e-6)
        assert row["action_s"] == {"F": pytest.approx(100e-6), "B": pytest.approx(200e-6)}
    # The ideal: the schedule with these times and nothing else (1F1B, S=2, M=2: F0 on
    # stage 0, F0 B0 on stage 1, then ... = 0.9 ms), below the 0.8 ms of compute + waits
    # a stage spends, and its bubble that of 1F1B with B = 2F.
    ideal = schedules.simulate(schedules.build("1f1b", 2, 2), {"F": 100e-6, "B": 200e-6})
    assert summary["ideal_step_s"] == pytest.approx(ideal["makespan"])
    assert summary["window_s"] == pytest.approx(800e-6)
    assert summary["fraction_of_bound"] == pytest.approx(ideal["makespan"] / 800e-6)
    assert summary["measured_bubble"] == pytest.approx(0.25)


def test_a_trace_without_every_stage_is_refused():
    events = _trace(2, 3, {"F": 1.0, "B": 2.0}, gap_us=0.0)
    config = {"schedule": "1f1b", "stages": 3, "microbatches": 2, "replicas": 1}
    with pytest.raises(ValueError, match="stage"):
        summarize(events, config)
