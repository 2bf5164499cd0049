"""pipetrain_harness.canonical: what of a history must replay, where the harness's operations
sit among the run's events, and where two histories part."""

from __future__ import annotations

from pipetrain_harness.canonical import (
    canonical_event,
    canonical_history,
    describe_difference,
    digest,
    first_difference,
    replayed_ranges,
)


def run(event: str, **fields) -> dict:
    return {"source": "run", "t": 1.5, "event": event, **fields}


def op(name: str, **fields) -> dict:
    return {"source": "harness", "t": 9.0, "op": name, **fields}


def test_timing_pids_durations_and_messages_are_dropped():
    assert canonical_event(run("restart", from_step=8, restart=1, recovery_s=0.31,
                               cause="stage 0, pid 4242: killed")) == {
        "event": "restart", "from_step": 8, "restart": 1}
    assert canonical_event(run("worker_exit", pid=7, role="stage 1", returncode=-9,
                               error="boom")) == {"event": "worker_exit", "role": "stage 1"}
    step = canonical_event(run("step", step=3, loss=0.5, grad_digest="ab", metrics=[{}]))
    assert step == {"event": "step", "step": 3, "loss": 0.5, "grad_digest": "ab"}
    assert "config" not in canonical_event(run("run_start", config={"run_dir": "/x"},
                                               from_step=0))


def test_operations_sit_where_they_happened_among_the_events():
    entries = [
        op("launch", resume=False, at_event=0, args=["..."]),
        op("signal_sent", pid=5),  # not canonical: a pid, a timing
        op("fault_landed", fault=0, kind="kill", target="stage:0:replica:0",
           point="before_step", step=3, generation=0, at_event=2, pid=99),
        run("run_start", from_step=0), run("step", step=1), run("step", step=2),
        run("restart", from_step=0, restart=1), run("step", step=1), run("step", step=2),
    ]
    history = canonical_history(entries)
    # at_event 2: two events were written when it landed (run_start and step 1).
    assert [e.get("op") or e["event"] for e in history] == [
        "launch", "run_start", "step", "fault_landed", "step", "restart", "steps_replayed",
        "step", "step"]
    assert history[3] == {"op": "fault_landed", "fault": 0, "kind": "kill",
                          "target": "stage:0:replica:0", "point": "before_step", "step": 3,
                          "generation": 0}


def test_replayed_steps_are_the_runs_back_below_the_highest_step():
    events = [run("step", step=s) for s in (1, 2, 3, 4, 3, 4, 5, 2, 3)]
    assert [(r["first"], r["last"], r["at_event"]) for r in replayed_ranges(events)] == [
        (3, 4, 4), (2, 3, 7)]


def test_digest_and_first_difference():
    a = [{"event": "step", "step": 1}, {"event": "step", "step": 2}]
    b = [{"event": "step", "step": 1}, {"event": "step", "step": 3}]
    assert digest(a) == digest([dict(e) for e in a]) != digest(b)
    assert len(digest(a)) == 64
    assert first_difference(a, a) is None
    assert first_difference(a, b) == (1, a[1], b[1])
    assert first_difference(a, a[:1]) == (1, a[1], None)
    assert "entry 1 of 2" in describe_difference(a, b)
