"""Pipeline schedules as plain data (in the style of ``torch.distributed.pipelining``).

A schedule is one list of :class:`Action` per stage; stage ``s`` executes its list strictly in
order.  An action is ``(stage, op, microbatch)`` and prints as ``2F0`` (stage 2, forward, mb 0).
Ops: ``F`` forward, ``B`` full backward (input and weight gradient), ``I`` input gradient only,
``W`` weight gradient only (deferred, zero-bubble).  Weight gradients (``B`` or ``W``) always run
in ascending micro-batch order on every stage, so gradient accumulation is bitwise identical to a
single-process reference.  1F1B for S=3 stages and M=4 micro-batches (F=1, B=2 time units,
``-`` = the B continues, ``.`` = idle)::

    0 | 0F0 0F1 0F2  .   .   .   .  0B0  -  0F3 0B1  -   .  0B2  -   .  0B3  -
    1 |  .  1F0 1F1  .   .  1B0  -  1F2 1B1  -  1F3 1B2  -   .  1B3  -   .   .
    2 |  .   .  2F0 2B0  -  2F1 2B1  -  2F2 2B2  -  2F3 2B3  -   .   .   .   .

Communication model (used by :func:`validate` and :func:`simulate`): ``F(s,m)`` needs
``F(s-1,m)``; ``B/I(s,m)`` needs ``F(s,m)`` and ``B/I(s+1,m)``; ``W(s,m)`` needs ``I(s,m)``.
Sends never block.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import NamedTuple


class Op(enum.StrEnum):
    """F forward, B full backward, I input-gradient only, W weight-gradient only."""
    FORWARD = "F"
    BACKWARD = "B"
    BACKWARD_INPUT = "I"
    BACKWARD_WEIGHT = "W"


class Action(NamedTuple):
    stage: int
    op: Op
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{Op(self.op).value}{self.microbatch}"


class ScheduleError(ValueError):
    """A schedule is malformed or cannot run (deadlock)."""


Schedule = list[list[Action]]
F, B, I, W = Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT  # noqa: E741
DEFAULT_COST: Mapping[Op, float] = {F: 1, B: 2, I: 1, W: 1}


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    for what, n in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{what} must be an integer >= 1, got {n!r}")


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """All forwards, then all backwards (ascending). Peak activations per stage: M."""
    _check_sizes(num_stages, num_microbatches)
    mbs = range(num_microbatches)
    return [[Action(s, F, m) for m in mbs] + [Action(s, B, m) for m in mbs]
            for s in range(num_stages)]


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """Warm-up min(S-1-s, M) forwards, then alternate F/B, then cool-down backwards.

    Peak live activations on stage s: min(S - s, M).
    """
    _check_sizes(num_stages, num_microbatches)
    out = []
    for s in range(num_stages):
        warm = min(num_stages - 1 - s, num_microbatches)
        acts = [Action(s, F, m) for m in range(warm)]
        for i in range(num_microbatches):  # steady 1F1B, then cool-down backwards
            acts += [Action(s, F, warm + i)] if i < num_microbatches - warm else []
            acts.append(Action(s, B, i))
        out.append(acts)
    return out


def zero_bubble_h1(num_stages: int, num_microbatches: int) -> Schedule:
    """ZB-H1: 1F1B with B split into I and W; stage s defers its first s W's to the tail.

    Guarantee on stage s: at most min(S - s, M) micro-batches forwarded but not yet I'd (as in
    1F1B) and, whenever a forward runs, at most s with only W pending; so at most min(S, M) live
    activations in total (1F1B's peak, on stage 0).  With F=I=W=1 (B=2) the makespan is
    3M + S - 1 versus 1F1B's 3(M + S - 1).
    """
    _check_sizes(num_stages, num_microbatches)
    out = []
    for s in range(num_stages):
        warm = min(num_stages - 1 - s, num_microbatches)
        acts = [Action(s, F, m) for m in range(warm)]
        next_w = 0
        for i in range(num_microbatches):
            acts += [Action(s, F, warm + i)] if i < num_microbatches - warm else []
            acts.append(Action(s, I, i))
            if i >= s:  # the first s W's are deferred to the tail (fill the cool-down bubbles)
                acts.append(Action(s, W, next_w))
                next_w += 1
        acts += [Action(s, W, m) for m in range(next_w, num_microbatches)]
        out.append(acts)
    return out


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb": zero_bubble_h1}


def build(name: str, num_stages: int, num_microbatches: int) -> Schedule:
    """Build the named schedule ("gpipe", "1f1b" or "zb")."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_stages, num_microbatches)


def _deps(a: Action, num_stages: int) -> list[tuple[Action, ...]]:
    """Dependencies of ``a``: each entry is a group of alternatives (any one suffices)."""
    s, op, m = a
    if op == F:
        return [(Action(s - 1, F, m),)] if s > 0 else []
    if op == W:
        return [(Action(s, I, m),)]
    deps = [(Action(s, F, m),)]
    if s < num_stages - 1:
        deps.append((Action(s + 1, B, m), Action(s + 1, I, m)))
    return deps


def simulate(schedule: Sequence[Sequence[Action]],
             cost: Mapping[Op, float] = DEFAULT_COST) -> dict:
    """Event-driven timing: an action starts at max(stage free, dependencies' finish).

    Returns ``{"makespan", "busy": [per stage], "idle": [makespan - busy per stage],
    "start": {Action: t}, "finish": {Action: t}}``.  Raises ScheduleError on deadlock.
    """
    n = len(schedule)
    pos, free = [0] * n, [0.0] * n
    start: dict[Action, float] = {}
    finish: dict[Action, float] = {}
    progress = True
    while progress:
        progress = False  # sweep until no stage can advance
        for s in range(n):
            while pos[s] < len(schedule[s]):
                a = schedule[s][pos[s]]
                ts = [min((finish[d] for d in grp if d in finish), default=None)
                      for grp in _deps(a, n)]
                if None in ts:
                    break
                start[a] = max([free[s], *ts])
                free[s] = finish[a] = start[a] + cost[a.op]
                pos[s] += 1
                progress = True
    stuck = [(s, schedule[s][pos[s]]) for s in range(n) if pos[s] < len(schedule[s])]
    if stuck:
        why = "; ".join(
            f"stage {s} stuck at {a} waiting for "
            + " and ".join("/".join(map(str, g)) for g in _deps(a, n)
                           if not any(d in finish for d in g))
            for s, a in stuck)
        raise ScheduleError(f"deadlock: no stage can advance; {why}")
    makespan, busy = max(finish.values(), default=0), [sum(cost[a.op] for a in x) for x in schedule]
    return {"makespan": makespan, "busy": busy, "idle": [makespan - b for b in busy],
            "start": start, "finish": finish}


def validate(schedule: Sequence[Sequence[Action]], num_stages: int,
             num_microbatches: int) -> None:
    """Raise ScheduleError (naming the offending action) unless the schedule is runnable."""
    _check_sizes(num_stages, num_microbatches)
    if len(schedule) != num_stages:
        raise ScheduleError(f"expected {num_stages} stage lists, got {len(schedule)}")
    for s, acts in enumerate(schedule):
        ops: dict[int, list[Op]] = {m: [] for m in range(num_microbatches)}  # mb -> ops so far
        last_wgrad = -1
        for a in acts:
            if a.stage != s:
                raise ScheduleError(f"stage {s}'s list contains {a}, an action of stage {a.stage}")
            if a.microbatch not in ops:
                raise ScheduleError(f"{a}: micro-batch out of range 0..{num_microbatches - 1}")
            seen, bwd = ops[a.microbatch], [o for o in ops[a.microbatch] if o != F]
            if a.op == F and F in seen:
                raise ScheduleError(f"duplicate forward {a} on stage {s}")
            if a.op != F and (a.op in bwd or B in bwd or (a.op == B and bwd)):
                raise ScheduleError(f"duplicate or mixed backward {a} on stage {s} "
                                    f"(already has {'+'.join(o.value for o in bwd)})")
            if a.op == W and I not in bwd:
                raise ScheduleError(f"{a} comes before its input gradient {a._replace(op=I)}")
            if a.op in (B, W) and a.microbatch <= last_wgrad:
                raise ScheduleError(f"{a} breaks ascending weight-gradient order on stage {s} "
                                    f"(after micro-batch {last_wgrad})")
            last_wgrad = a.microbatch if a.op in (B, W) else last_wgrad
            seen.append(a.op)
        for m, seen in ops.items():
            if F not in seen:
                raise ScheduleError(f"stage {s} never runs forward {Action(s, F, m)}")
            if len(seen) == 1:
                raise ScheduleError(f"stage {s} never runs backward {Action(s, B, m)} "
                                    f"(or {Action(s, I, m)} + {Action(s, W, m)})")
            if W not in seen and B not in seen:
                raise ScheduleError(f"stage {s} runs {Action(s, I, m)} but never {Action(s, W, m)}")
    simulate(schedule)


def peak_live_activations(stage_actions: Sequence[Action]) -> int:
    """Max number of micro-batches forwarded but not fully backwarded (B, or W after I)."""
    live = peak = 0
    for a in stage_actions:
        live += 1 if a.op == F else -1 if a.op in (B, W) else 0
        peak = max(peak, live)
    return peak


def render(schedule: Sequence[Sequence[Action]], mark: Action | None = None) -> str:
    """Rank-by-time grid using :func:`simulate`'s default costs; ``mark`` is bracketed.

    One row per stage, one column per time unit; ``.`` is idle and ``-`` continues the action
    to its left.  A deadlocking schedule is drawn in list order instead.
    """
    try:
        start = simulate(schedule)["start"]
    except ScheduleError:  # deadlock: draw each stage's list back to back
        start = {a: sum(DEFAULT_COST[b.op] for b in acts[:i])
                 for acts in schedule for i, a in enumerate(acts)}
    width = max((len(str(a)) for acts in schedule for a in acts), default=1)
    idle, cont = ".".center(width), "-".center(width)
    rows = []
    for acts in schedule:
        cells: list[str] = []
        marked = -1
        for a in acts:
            cells += [idle] * (int(start[a]) - len(cells))
            marked = len(cells) if a == mark else marked
            cells.append(str(a).center(width))
            cells += [cont] * (int(DEFAULT_COST[a.op]) - 1)
        rows.append((cells, marked))
    slots = max((len(cells) for cells, _ in rows), default=0)
    lines = []
    for s, (cells, marked) in enumerate(rows):
        cells += [idle] * (slots - len(cells))
        seps = [" "] * (slots + 1)
        if marked >= 0:
            seps[marked], seps[marked + 1] = "[", "]"
        line = "".join(sep + cell for sep, cell in zip(seps, cells + [""], strict=True))
        lines.append(f"{s} |{line}".rstrip())
    return "\n".join(lines)
