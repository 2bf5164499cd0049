"""The canonical history of a scenario run: what must be the same in every replay.

It is the run's events (``events.jsonl``, in file order, across relaunches) and the harness's
fault operations, with what timing decides taken out: times, pids, durations, free-text messages
and causes, per-step metrics, the resolved config (it names the run directory) and the exit
status of bystander workers (killed by the coordinator or gone on their own, whichever came
first). Each harness operation is placed among the run's events by ``at_event``, the number of
events written when it happened: a fault lands while its target is parked at a point, so that
number replays too. Derived entries mark the steps a run did twice (after a restart or a
resume), for the report.

``digest`` names a history in 64 hex digits; ``first_difference`` says where two part.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Keys that timing, the machine or the run directory decide.
DROPPED = {"t", "source", "metrics", "message", "cause", "error", "traceback", "config", "pid",
           "pids", "worker_pids", "host", "hosts", "path_abs"}
DROPPED_BY_EVENT = {"worker_exit": {"returncode"}}
# Harness operations that belong to the canonical history, with the keys kept.
OPS = {
    "launch": ("resume",),
    "fault_landed": ("fault", "kind", "target", "point", "step", "generation"),
    "fault_error": ("fault",),
    "fault_missed": ("fault", "kind"),
    "steps_replayed": ("first", "last"),
}


def canonical_event(event: dict[str, Any]) -> dict[str, Any]:
    dropped = DROPPED | DROPPED_BY_EVENT.get(event.get("event"), set())
    return {key: value for key, value in event.items()
            if key not in dropped and not key.endswith(("_s", "_pid", "_pids"))}


def canonical_op(op: dict[str, Any]) -> dict[str, Any]:
    return {"op": op["op"], **{key: op.get(key) for key in OPS[op["op"]]}}


def replayed_ranges(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``steps_replayed`` entries: each run of step events at or below the highest step seen
    before it (the steps a restart or a resume did again), with ``at_event``, the index of its
    first event."""
    ranges: list[dict[str, Any]] = []
    highest, current = 0, None
    for index, event in enumerate(events):
        if event.get("event") != "step":
            continue
        step = event["step"]
        if step <= highest:
            if current is not None and step == current["last"] + 1:
                current["last"] = step
            else:
                current = {"op": "steps_replayed", "first": step, "last": step,
                           "at_event": index, "t": event.get("t")}
                ranges.append(current)
        else:
            current = None
        highest = max(highest, step)
    return ranges


def canonical_history(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """From a :class:`~pipetrain_harness.history.History`'s entries (in recording order)."""
    events = [e for e in entries if e.get("source") == "run"]
    ops = [e for e in entries if e.get("source") == "harness" and e.get("op") in OPS
           and e["op"] != "steps_replayed"]
    ops += replayed_ranges(events)
    # Stable: operations at the same place keep the order they were recorded in.
    placed = sorted(enumerate(ops), key=lambda item: (item[1].get("at_event", len(events)),
                                                      item[0]))
    out: list[dict[str, Any]] = []
    position = 0
    for _, op in placed:
        at = min(op.get("at_event", len(events)), len(events))
        out += [canonical_event(e) for e in events[position:at]]
        position = max(position, at)
        out.append(canonical_op(op))
    out += [canonical_event(e) for e in events[position:]]
    return out


def digest(history: list[dict[str, Any]]) -> str:
    text = json.dumps(history, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def first_difference(a: list[dict[str, Any]],
                     b: list[dict[str, Any]]) -> tuple[int, Any, Any] | None:
    """(index, entry of a, entry of b) where the two first differ (None past an end)."""
    for index in range(max(len(a), len(b))):
        left = a[index] if index < len(a) else None
        right = b[index] if index < len(b) else None
        if left != right:
            return index, left, right
    return None


def describe_difference(a: list[dict[str, Any]], b: list[dict[str, Any]],
                        names: tuple[str, str] = ("first", "second")) -> str:
    found = first_difference(a, b)
    if found is None:
        return "the histories are identical"
    index, left, right = found
    return (f"entry {index} of {max(len(a), len(b))}: {names[0]} has "
            f"{json.dumps(left, sort_keys=True)}, {names[1]} has "
            f"{json.dumps(right, sort_keys=True)}")
