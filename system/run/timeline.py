"""What a trace says about the pipeline: per stage compute, wait and bubble, against the ideal.

Read from the events of ``RUN_DIR/trace.json`` (``pipetrain.run.trace_file``) and the run's
config (its schedule, stages, micro-batches). For every step that all stages of replica 0 ran,
the step's *window* runs from the first stage starting it to the last one finishing it; within
it each stage's main thread was computing (schedule actions and the optimizer update), sending,
waiting for a neighbour's frame or for a helper thread, or doing neither (the fixed cost of a
step: the command round trip, bookkeeping). A stage's *bubble* is the window less its compute.

The *ideal pipeline* for the same split replays the schedule with each stage's measured
(median) duration of each kind of action and no cost for anything else: no communication, no
fixed cost. Its makespan is the bound a step's time can approach, and its bubble is the
schedule's own; the gap between it and the measured window is what the machinery costs.
``simulate`` is that replay, with a cost per action instead of per kind of action (the
schedule module's own :func:`~pipetrain.pipeline.schedule.simulate` has one cost per kind), and
the schedule module's dependency rule, so both agree on what waits for what.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from pipetrain.pipeline import schedule as schedules
from pipetrain.pipeline.schedule import Action

UPDATE = "update"  # the optimizer step, after a stage's last action


class Track:
    """The spans of one stage worker's threads, by thread name."""

    def __init__(self, stage: int, replica: int, pid: int) -> None:
        self.stage, self.replica, self.pid = stage, replica, pid
        self.threads: dict[int, str] = {}
        self.spans: dict[str, list[dict[str, Any]]] = defaultdict(list)


def tracks(events: Sequence[dict[str, Any]]) -> dict[tuple[int, int], Track]:
    """Each stage worker's track, keyed by (stage, replica), spans sorted by start. A replaced
    worker's spans join those of its place (the process differs, the role does not)."""
    names: dict[int, tuple[int, int]] = {}
    threads: dict[tuple[int, int], str] = {}
    for event in events:
        if event.get("ph") != "M":
            continue
        if event.get("name") == "process_name":
            words = str(event["args"]["name"]).split()
            if len(words) == 4 and words[0] == "stage" and words[2] == "replica":
                names[event["pid"]] = (int(words[1]), int(words[3]))
        elif event.get("name") == "thread_name":
            threads[(event["pid"], event["tid"])] = str(event["args"]["name"])
    out: dict[tuple[int, int], Track] = {}
    for pid, place in names.items():
        out.setdefault(place, Track(*place, pid))
    for event in events:
        if event.get("ph") != "X" or event.get("pid") not in names:
            continue
        track = out[names[event["pid"]]]
        thread = threads.get((event["pid"], event["tid"]), str(event["tid"]))
        track.spans[thread].append(event)
    for track in out.values():
        for spans in track.spans.values():
            spans.sort(key=lambda e: e["ts"])
    return dict(sorted(out.items()))


def _steps(track: Track) -> dict[int, dict[str, Any]]:
    return {e["args"]["step"]: e for e in track.spans.get("main", []) if e["cat"] == "step"}


def _within(spans: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    return [e for e in spans if e["ts"] >= start and e["ts"] + e["dur"] <= end + 1e-3]


def _kind(args: dict[str, Any] | None) -> str:
    """An action's kind for the ideal's costs: its op, and its piece when it has one (an
    interleaved stage's pieces differ in size); ``update`` for the optimizer step."""
    if not args or "op" not in args:
        return UPDATE
    return str(args["op"]) if args.get("piece") is None else f"{args['op']}@{args['piece']}"


def simulate(stage_actions: Sequence[Sequence[Action]], cost: Callable[[Action], float],
             update: Sequence[float] | None = None) -> dict[str, Any]:
    """Replay the schedule: an action starts once its stage is free and its dependencies
    (the schedule module's rule) are done; it lasts ``cost(action)``. Each stage then runs its
    update (``update[s]``). Returns the makespan, each stage's busy time, each action's start
    and finish."""
    n, pieces = len(stage_actions), schedules.num_pieces(stage_actions)
    pos, free = [0] * n, [0.0] * n
    start: dict[Action, float] = {}
    finish: dict[Action, float] = {}
    done: dict[tuple, float] = {}  # (piece, op, micro-batch) -> finish, as the deps name them
    progress = True
    while progress:
        progress = False
        for s in range(n):
            while pos[s] < len(stage_actions[s]):
                action = stage_actions[s][pos[s]]
                ready = [min((done[d] for d in group if d in done), default=None)
                         for group in schedules.dependencies(action, pieces)]
                if None in ready:
                    break
                start[action] = max([free[s], *ready])
                free[s] = finish[action] = start[action] + cost(action)
                done[(action.segment, action.op, action.microbatch)] = finish[action]
                pos[s] += 1
                progress = True
    if any(pos[s] < len(stage_actions[s]) for s in range(n)):
        raise schedules.ScheduleError("deadlock while replaying the schedule")
    update = list(update or [0.0] * n)
    ends = [free[s] + update[s] for s in range(n)]
    busy = [sum(cost(a) for a in stage_actions[s]) + update[s] for s in range(n)]
    return {"makespan": max(ends, default=0.0), "busy": busy, "start": start,
            "finish": finish}


def bubble_fraction(busy: Sequence[float], makespan: float) -> float:
    """The share of stage-time not spent computing: 1 - sum(busy) / (stages x makespan)."""
    return 1.0 - sum(busy) / (len(busy) * makespan) if makespan > 0 and busy else 0.0


def summarize(events: Sequence[dict[str, Any]], config: dict[str, Any], *,
              skip: int = 3) -> dict[str, Any]:
    """Per-stage compute / send / wait / other / bubble (medians over the steps, in seconds),
    the measured bubble, and the ideal pipeline's step time and bubble (replica 0). The first
    ``skip`` steps (warm-up) are left out while later ones remain."""
    by_place = tracks(events)
    stages = int(config["stages"])
    placed = [by_place.get((s, 0)) for s in range(stages)]
    if any(track is None for track in placed):
        missing = [s for s, t in enumerate(placed) if t is None]
        raise ValueError(f"the trace has no track for stage(s) {missing} of replica 0")
    step_spans = [_steps(track) for track in placed]
    common = sorted(set.intersection(*(set(s) for s in step_spans)))
    timed = [k for k in common if k > skip] or common
    if not timed:
        raise ValueError("the trace holds no step that every stage ran")
    per_stage: list[dict[str, list[float]]] = [defaultdict(list) for _ in range(stages)]
    action_s: list[dict[str, list[float]]] = [defaultdict(list) for _ in range(stages)]
    windows = []
    for k in timed:
        begin = min(spans[k]["ts"] for spans in step_spans)
        end = max(spans[k]["ts"] + spans[k]["dur"] for spans in step_spans)
        windows.append((end - begin) / 1e6)
        for s, track in enumerate(placed):
            span = step_spans[s][k]
            inside = _within(track.spans["main"], span["ts"], span["ts"] + span["dur"])
            totals: dict[str, float] = defaultdict(float)
            for e in inside:
                if e["cat"] == "step":
                    continue
                totals[e["cat"]] += e["dur"] / 1e6
                if e["cat"] == "compute":
                    action_s[s][_kind(e.get("args"))].append(e["dur"] / 1e6)
            own = span["dur"] / 1e6
            row = per_stage[s]
            row["compute_s"].append(totals["compute"])
            row["send_s"].append(totals["send"])
            row["wait_s"].append(totals["wait"])
            row["other_s"].append(own - totals["compute"] - totals["send"] - totals["wait"])
            row["outside_s"].append(windows[-1] - own)  # the window before / after its step
            row["bubble_s"].append(windows[-1] - totals["compute"])
    window_s = statistics.median(windows)
    rows = []
    for s in range(stages):
        row = {key: statistics.median(values) for key, values in per_stage[s].items()}
        row["stage"] = s
        row["action_s"] = {kind: statistics.median(v) for kind, v in action_s[s].items()}
        rows.append(row)
    ideal = ideal_pipeline(config, [row["action_s"] for row in rows])
    measured_bubble = bubble_fraction([row["compute_s"] for row in rows], window_s)
    return {"schedule": config["schedule"], "stages": stages,
            "microbatches": int(config["microbatches"]), "replicas": int(config["replicas"]),
            "steps": [timed[0], timed[-1]], "steps_timed": len(timed), "window_s": window_s,
            "per_stage": rows, "measured_bubble": measured_bubble, **ideal,
            "fraction_of_bound": ideal["ideal_step_s"] / window_s if window_s else None}


def ideal_pipeline(config: dict[str, Any], action_s: Sequence[dict[str, float]]) -> dict:
    """The ideal pipeline's step time and bubble from each stage's median action times, and
    the schedule's textbook bubble (F = 1, B = 2, I = W = 1 time units)."""
    stages, microbatches = int(config["stages"]), int(config["microbatches"])
    plan = schedules.build(config["schedule"], stages, microbatches,
                           config.get("virtual_stages") or None)

    def cost(action: Action) -> float:
        times = action_s[action.stage]
        kind = _kind({"op": str(action.op), "piece": action.piece})
        return times.get(kind, 0.0)

    update = [times.get(UPDATE, 0.0) for times in action_s]
    ideal = simulate(plan, cost, update)
    units = schedules.simulate(plan)
    return {"ideal_step_s": ideal["makespan"],
            "ideal_bubble": bubble_fraction(ideal["busy"], ideal["makespan"]),
            "schedule_bubble": bubble_fraction(units["busy"], units["makespan"]),
            "ideal_start": ideal["start"], "ideal_finish": ideal["finish"]}


def _per_op(action_s: dict[str, float], op: str) -> float | None:
    """A stage's time for one micro-batch's ``op``: summed over its pieces when it has several."""
    if op in action_s:
        return action_s[op]
    pieces = [v for k, v in action_s.items() if k.startswith(f"{op}@")]
    return sum(pieces) if pieces else None


def format_summary(summary: dict[str, Any]) -> str:
    """The table ``pipetrain trace`` prints."""
    ms = 1e3
    lines = [
        f"{summary['schedule']}, S={summary['stages']}, M={summary['microbatches']}, "
        f"R={summary['replicas']}: steps {summary['steps'][0]}-{summary['steps'][1]} "
        f"({summary['steps_timed']} timed), medians in ms (replica 0)",
        "",
        "stage  compute   send   wait  other  bubble  F      B/I    W      update",
    ]
    for row in summary["per_stage"]:
        acts = row["action_s"]
        back = _per_op(acts, "B") or _per_op(acts, "I")
        cells = [_per_op(acts, "F"), back, _per_op(acts, "W"), acts.get(UPDATE)]
        shown = "  ".join(f"{v * ms:5.2f}" if v is not None else "   - " for v in cells)
        lines.append(f"{row['stage']:>5}  {row['compute_s'] * ms:7.2f} {row['send_s'] * ms:6.2f} "
                     f"{row['wait_s'] * ms:6.2f} {row['other_s'] * ms:6.2f} "
                     f"{row['bubble_s'] * ms:7.2f}  {shown}")
    lines += [
        "",
        f"step window (first stage starts to last stage ends): {summary['window_s'] * ms:.2f} ms",
        f"ideal pipeline (same action times, no communication or fixed cost): "
        f"{summary['ideal_step_s'] * ms:.2f} ms; measured reaches "
        f"{summary['fraction_of_bound']:.0%} of that bound",
        f"bubble: measured {summary['measured_bubble']:.1%}, ideal pipeline "
        f"{summary['ideal_bubble']:.1%}, schedule's own (F=1, B=2 units) "
        f"{summary['schedule_bubble']:.1%}",
    ]
    return "\n".join(lines)
