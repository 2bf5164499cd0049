"""pipetrain.pipeline.schedule: structure, ordering, memory, makespan and validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipetrain.pipeline.schedule import (
    Action,
    Op,
    ScheduleError,
    build,
    gpipe,
    one_f_one_b,
    peak_live_activations,
    render,
    simulate,
    validate,
    zero_bubble_h1,
)

F, B, I, W = Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT  # noqa: E741
NAMES = ["gpipe", "1f1b", "zb"]
stages = st.integers(1, 6)
mbs = st.integers(1, 10)
names = st.sampled_from(NAMES)


def _makespan(name: str, s: int, m: int) -> float:
    return simulate(build(name, s, m))["makespan"]


@settings(max_examples=150, deadline=None)
@given(name=names, s=stages, m=mbs)
def test_every_schedule_is_valid_and_complete(name: str, s: int, m: int) -> None:
    sched = build(name, s, m)
    validate(sched, s, m)
    assert len(sched) == s
    for stage, acts in enumerate(sched):
        assert all(a.stage == stage for a in acts)
        fwd = [a.microbatch for a in acts if a.op == F]
        assert sorted(fwd) == list(range(m))
        full = [a.microbatch for a in acts if a.op == B]
        inp = [a.microbatch for a in acts if a.op == I]
        wgt = [a.microbatch for a in acts if a.op == W]
        assert sorted(full + inp) == list(range(m))
        assert sorted(full + wgt) == list(range(m))
        # weight gradients accumulate in ascending micro-batch order
        assert [a.microbatch for a in acts if a.op in (B, W)] == list(range(m))
        for a in acts:
            if a.op == W:
                assert acts.index(a._replace(op=I)) < acts.index(a)


@settings(max_examples=100, deadline=None)
@given(s=stages, m=mbs)
def test_memory_bounds(s: int, m: int) -> None:
    for acts in gpipe(s, m):
        assert peak_live_activations(acts) == m
    for stage, acts in enumerate(one_f_one_b(s, m)):
        peak = peak_live_activations(acts)
        assert peak <= s - stage and peak <= m
        assert peak == min(s - stage, m)
    for stage, acts in enumerate(zero_bubble_h1(s, m)):
        # guarantee: <= min(S, M) live in total, <= min(S - s, M) awaiting I (as 1F1B),
        # <= s awaiting only their deferred W whenever a forward runs (s + 1 in between)
        assert peak_live_activations(acts) <= min(s, m)
        pending_i = pending_w = 0
        for a in acts:
            assert a.op != F or pending_w <= stage
            pending_i += {F: 1, I: -1}.get(a.op, 0)
            pending_w += {I: 1, W: -1}.get(a.op, 0)
            assert pending_i <= min(s - stage, m)
            assert pending_w <= stage + 1


@settings(max_examples=60, deadline=None)
@given(s=st.integers(2, 6), m=mbs)
def test_zero_bubble_never_slower(s: int, m: int) -> None:
    assert _makespan("zb", s, m) < _makespan("1f1b", s, m) == _makespan("gpipe", s, m)


@pytest.mark.parametrize("s,m", [(s, m) for s in (2, 3, 4) for m in range(s, 13)])
def test_zero_bubble_beats_1f1b(s: int, m: int) -> None:
    zb, ofob = _makespan("zb", s, m), _makespan("1f1b", s, m)
    assert zb < ofob
    assert zb == 3 * m + s - 1 and ofob == 3 * (m + s - 1)


@pytest.mark.parametrize("s,m", [(1, 1), (1, 5), (3, 4), (4, 8)])
def test_simulate_known_values(s: int, m: int) -> None:
    for name in ("gpipe", "1f1b"):
        res = simulate(build(name, s, m))
        assert res["makespan"] == 3 * (m + s - 1)
        assert res["idle"] == [res["makespan"] - 3 * m] * s
    assert simulate([[Action(0, F, 0), Action(0, B, 0)]], {F: 2, B: 5})["makespan"] == 7


def test_single_stage() -> None:
    assert one_f_one_b(1, 2) == [[Action(0, F, 0), Action(0, B, 0),
                                  Action(0, F, 1), Action(0, B, 1)]]
    assert zero_bubble_h1(1, 1) == [[Action(0, F, 0), Action(0, I, 0), Action(0, W, 0)]]
    assert gpipe(1, 2) == [[Action(0, F, 0), Action(0, F, 1), Action(0, B, 0), Action(0, B, 1)]]


def test_action_str_and_render() -> None:
    assert str(Action(2, F, 0)) == "2F0"
    assert str(Action(10, W, 12)) == "10W12"
    sched = one_f_one_b(3, 4)
    grid = render(sched, mark=Action(1, B, 1))
    assert "[1B1]" in grid and grid.count("[") == 1
    assert len(grid.splitlines()) == 3
    assert " . " in grid
    assert "[" not in render(sched)
    # a deadlocking schedule still renders (list order) so it can go in an error message
    assert "[0B0]" in render([[Action(0, B, 0), Action(0, F, 0)]], mark=Action(0, B, 0))


def test_build_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'"):
        build("pipedream", 2, 2)
    with pytest.raises(ValueError, match="num_stages"):
        build("1f1b", 0, 2)
    with pytest.raises(ValueError, match="num_microbatches"):
        build("gpipe", 2, 0)
    with pytest.raises(ValueError, match="num_microbatches"):
        zero_bubble_h1(2, -1)


def _reject(sched: list[list[Action]], s: int, m: int, needle: str) -> str:
    with pytest.raises(ScheduleError) as info:
        validate(sched, s, m)
    assert needle in str(info.value), str(info.value)
    return str(info.value)


def test_validate_rejects_malformed() -> None:
    sched = one_f_one_b(2, 3)
    missing = [acts[:] for acts in sched]
    missing[1].remove(Action(1, B, 2))
    _reject(missing, 2, 3, "1B2")
    dup = [acts[:] for acts in sched]
    dup[0].insert(1, Action(0, F, 0))
    _reject(dup, 2, 3, "duplicate forward 0F0")
    wrong = [acts[:] for acts in sched]
    wrong[0][0] = Action(1, F, 0)
    _reject(wrong, 2, 3, "1F0")
    _reject(sched[:1], 2, 3, "expected 2 stage lists")
    _reject([[Action(0, F, 0), Action(0, B, 0)]], 1, 2, "0F1")
    _reject([[Action(0, F, 3), Action(0, B, 3)]], 1, 1, "0F3")


def test_validate_rejects_bad_backward_order() -> None:
    f = [Action(0, F, 0), Action(0, F, 1)]
    _reject([f + [Action(0, W, 0), Action(0, I, 0)] + [Action(0, B, 1)]], 1, 2, "0W0")
    _reject([f + [Action(0, B, 1), Action(0, B, 0)]], 1, 2, "0B0")
    _reject([f + [Action(0, I, 1), Action(0, W, 1), Action(0, I, 0), Action(0, W, 0)]],
            1, 2, "0W0")
    _reject([f + [Action(0, B, 0), Action(0, W, 0), Action(0, B, 1)]], 1, 2, "0W0")
    _reject([f + [Action(0, I, 0), Action(0, B, 0), Action(0, B, 1)]], 1, 2, "0B0")
    _reject([f + [Action(0, I, 0), Action(0, B, 1)]], 1, 2, "0W0")


def test_validate_rejects_deadlocks() -> None:
    # last stage does its backward before its forward
    sched = one_f_one_b(2, 1)
    sched[1] = [Action(1, B, 0), Action(1, F, 0)]
    msg = _reject(sched, 2, 1, "deadlock")
    assert "1B0" in msg
    # stage 0 waits for 1B0 before sending 0F1, but stage 1 needs 0F1 before it runs 1B0
    sched = [[Action(0, F, 0), Action(0, B, 0), Action(0, F, 1), Action(0, B, 1)],
             [Action(1, F, 0), Action(1, F, 1), Action(1, B, 0), Action(1, B, 1)]]
    msg = _reject(sched, 2, 2, "deadlock")
    assert "stage 0 stuck at 0B0" in msg and "stage 1 stuck at 1F1" in msg


@settings(max_examples=100, deadline=None)
@given(name=names, s=stages, m=mbs, data=st.data())
def test_mutations_are_rejected_or_valid(name: str, s: int, m: int, data: st.DataObject) -> None:
    sched = build(name, s, m)
    stage = data.draw(st.integers(0, s - 1))
    acts = sched[stage]
    k = data.draw(st.integers(0, len(acts) - 1))
    dropped = [a[:] for a in sched]
    victim = dropped[stage].pop(k)
    _reject(dropped, s, m, str(victim))
    if len(acts) > 1:  # swapping neighbours never crashes: valid or a ScheduleError
        j = data.draw(st.integers(0, len(acts) - 2))
        swapped = [a[:] for a in sched]
        swapped[stage][j], swapped[stage][j + 1] = swapped[stage][j + 1], swapped[stage][j]
        try:
            validate(swapped, s, m)
        except ScheduleError:
            pass
        else:
            simulate(swapped)
